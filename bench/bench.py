#!/usr/bin/env python3
"""The benchmark driver of bench/run (Python 3 standard library only).

Measures in one run, side by side and fed the same requests by wrk (bench/chat.lua):
  direct  wrk -> mock-upstream
  bare    wrk -> bench/bare_proxy.rs (a bare Pingora passthrough) -> mock
  nginx   wrk -> nginx (plain reverse proxy, when installed) -> mock
  tokex   wrk -> token-exchange serve (1,000 buyers, 1,000 seller keys over 20 models, MySQL) -> mock
and, on token-exchange: 10,000 concurrent slow streams, settlement on MySQL, and a 100,000-key pool snapshot.
Results go to bench/results/latest.{json,md} and a timestamped copy. bench/README.md explains the method.
"""

import argparse
import base64
import datetime
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where cargo put the release build: CARGO_TARGET_DIR when set (relative to the repository, as cargo reads it).
RELEASE = os.path.join(REPO, os.environ.get("CARGO_TARGET_DIR") or "target", "release")
TOKEX = os.path.join(RELEASE, "token-exchange")
MOCK = os.path.join(RELEASE, "mock-upstream")
BARE = os.path.join(RELEASE, "examples", "bare-proxy")
SEED = os.path.join(RELEASE, "examples", "bench-seed")
LUA = os.path.join(REPO, "bench", "chat.lua")
NGINX_TEMPLATE = os.path.join(REPO, "bench", "nginx.conf.in")
RESULTS = os.path.join(REPO, "bench", "results")

TARGETS = ["direct", "bare", "nginx", "tokex"]
SECTIONS = ["throughput", "latency", "streams", "settlement", "snapshot"]
GATEWAY_THREADS = 2
MODELS = 20
SLOW_MODEL = "bench-slow"
SLOW_EVENT_S = 0.1
# Frames of a mock stream besides its tokens: keep-alive comment, role chunk, finish chunk, usage chunk, [DONE].
STREAM_FRAMES_BESIDES_TOKENS = 5
MAX_TOKENS = 16
NOFILE_WANTED = 200_000
# Descriptors a proxy process needs besides two per stream: listeners, database pool, epoll, logs, and the
# upstream connections of streams that just ended (pooled or closing) while the next ones open.
FD_RESERVE = 1000
# The slow streams are opened by one wrk per STREAM_CHUNK connections, started this far apart.
STREAM_CHUNK = 500
STREAM_CHUNK_INTERVAL_S = 0.2
CLK_TCK = os.sysconf("SC_CLK_TCK")

GOAL_THROUGHPUT_VS_BARE = 0.9
GOAL_ADDED_P50_MS = 0.3
GOAL_ADDED_P99_MS = 1.0
GOAL_STREAMS_RSS_BYTES = 1 << 30
GOAL_SWAP_S = 1.0
GOAL_STALL_MS = 10.0
SETTLEMENT_KEEP_UP = 0.95


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# Processes


def nofile_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)


def raise_nofile():
    limit = nofile_limit()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    except (ValueError, OSError):
        pass


class Processes:
    """Every process the run starts, each in its own session so that it (and nginx's workers) can be ended
    by its process group id, and nothing else is touched."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.running = []

    def spawn(self, name, argv, env=None, cwd=None):
        log_path = os.path.join(self.workdir, f"{name}.log")
        log_file = open(log_path, "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd or REPO,
            start_new_session=True,
            preexec_fn=raise_nofile,
        )
        log_file.close()
        proc.bench_name = name
        proc.bench_log = log_path
        self.running.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM, timeout=30.0):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{proc.bench_name} did not stop within {timeout:.0f} s; killing it")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        # The group may outlive its leader (nginx workers); end what is left of it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.running:
            self.running.remove(proc)
        return proc.returncode

    def stop_all(self):
        for proc in reversed(list(self.running)):
            self.stop(proc, timeout=15.0)


def log_tail(proc, lines=30):
    try:
        with open(proc.bench_log, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def log_summary(text, top=8):
    """Counts of the log's WARN and ERROR lines by message (timestamps and numbers masked)."""
    counts = {}
    for line in text.splitlines():
        if " ERROR " not in line and " WARN " not in line:
            continue
        message = re.sub(r"^\S+\s+", "", line)
        message = re.sub(r"[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}", "<uuid>", message)
        message = re.sub(r"\d+", "N", message)[:200]
        counts[message] = counts.get(message, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.bench_name} exited with {proc.returncode}:\n{log_tail(proc)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{proc.bench_name} did not listen on port {port} within {timeout:.0f} s:\n{log_tail(proc)}")


def http_get(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode("utf-8", "replace")


def children_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def status_kib(pids, field):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def reset_peak_rss(pids):
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each run reports its own peak."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------
# Prometheus text


class Metrics:
    LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
    LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

    def __init__(self, text):
        self.samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = self.LINE.match(line)
            if not m:
                continue
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            self.samples.append((m.group(1), dict(self.LABEL.findall(m.group(2) or "")), value))

    def get(self, name, **labels):
        """The sum over matching series, or None when the metric is absent."""
        found = [v for n, lab, v in self.samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
        return sum(found) if found else None

    def buckets(self, name, **labels):
        """(le, count) summed over the series that match `labels`."""
        out = {}
        for n, lab, v in self.samples:
            if n == name + "_bucket" and "le" in lab and all(lab.get(k) == w for k, w in labels.items()):
                le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
                out[le] = out.get(le, 0) + v
        return sorted(out.items())


# ---------------------------------------------------------------------------------------------------------
# MySQL (through the mysql client, to stay within the standard library)


class MySql:
    def __init__(self, url):
        m = re.match(r"^mysql://(?:([^:@/]+)(?::([^@/]*))?@)?([^:/]+)(?::(\d+))?/?$", url.rstrip("/"))
        if not m:
            raise BenchError(f"--mysql must look like mysql://user[:password]@host[:port], not {url!r}")
        self.server = url.rstrip("/")
        self.user, self.password, self.host, self.port = m.group(1) or "root", m.group(2), m.group(3), m.group(4) or "3306"

    def url(self, database):
        return f"{self.server}/{database}"

    def run(self, sql, database=None):
        argv = ["mysql", "-u", self.user, "-h", self.host, "-P", self.port, "-N", "-B", "-e", sql]
        if database:
            argv.append(database)
        env = dict(os.environ)
        if self.password:
            env["MYSQL_PWD"] = self.password
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        if out.returncode != 0:
            raise BenchError(f"mysql failed ({sql[:80]}...): {out.stderr.strip()}")
        return out.stdout.strip()

    def recreate(self, database):
        self.run(
            f"DROP DATABASE IF EXISTS `{database}`; "
            f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        )

    def count(self, database, table):
        return int(self.run(f"SELECT COUNT(*) FROM `{table}`", database) or 0)


# ---------------------------------------------------------------------------------------------------------
# wrk


class Wrk:
    def __init__(self, procs):
        self.procs = procs
        self.counter = 0

    def run(self, url, threads, connections, duration_s, keys_file, models, stream, max_tokens, mode="random",
            timeout_s=10, during=None, raw=False):
        """Runs wrk and returns its BENCH_JSON summary (latencies in microseconds). `during` is called once
        wrk has started and must return when wrk ends (it is passed the wrk process). `raw` (one connection
        per thread only) adds the uncorrected per-request times as raw_* (see bench/chat.lua)."""
        proc = self.spawn(url, threads, connections, duration_s, keys_file, models, stream, max_tokens, mode,
                          timeout_s, raw)
        try:
            if during is not None:
                during(proc)
            proc.wait(duration_s + timeout_s + 120)
        finally:
            self.procs.stop(proc)
        return self.summary(proc)

    def spawn(self, url, threads, connections, duration_s, keys_file, models, stream, max_tokens, mode="random",
              timeout_s=10, raw=False):
        self.counter += 1
        argv = [
            "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", f"--timeout={timeout_s}s",
            "-s", LUA, url, "--", keys_file, ",".join(models), "1" if stream else "0", str(max_tokens), mode,
            "raw" if raw else "-",
        ]
        return self.procs.spawn(f"wrk-{self.counter:03d}", argv)

    def run_staggered(self, url, connections, chunk, interval_s, duration_s, keys_file, models, stream, max_tokens,
                      timeout_s, during):
        """`connections` spread over several wrk processes of `chunk` connections, started `interval_s` apart:
        thousands of connects in the same millisecond would overflow the accept queues (somaxconn) of the
        proxy and the mock, and the SYNs retried a second later would fail as connect timeouts. Returns the
        merged summary."""
        procs = []
        try:
            for start in range(0, connections, chunk):
                procs.append(self.spawn(url, 1, min(chunk, connections - start), duration_s, keys_file, models,
                                        stream, max_tokens, timeout_s=timeout_s))
                time.sleep(interval_s)
            during(procs)
            for proc in procs:
                proc.wait(duration_s + timeout_s + 120)
        finally:
            for proc in procs:
                self.procs.stop(proc)
        results = [self.summary(proc) for proc in procs]
        merged = {k: sum(r[k] for r in results) for k in ("requests", "errors", "connect_errors", "read_errors",
                                                          "write_errors", "status_errors", "timeouts", "bytes")}
        merged["lat_max_us"] = max(r["lat_max_us"] for r in results)
        merged["processes"] = len(results)
        return merged

    def summary(self, proc):
        with open(proc.bench_log, encoding="utf-8", errors="replace") as f:
            output = f.read()
        for line in reversed(output.splitlines()):
            if line.startswith("BENCH_JSON "):
                result = json.loads(line[len("BENCH_JSON "):])
                result["rps"] = result["requests"] / max(result["duration_us"] / 1e6, 1e-9)
                result["errors"] = sum(
                    result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
                )
                return result
        raise BenchError(f"wrk printed no summary:\n{output[-2000:]}")


# ---------------------------------------------------------------------------------------------------------
# Targets


class Target:
    def __init__(self, name, port, proc):
        self.name = name
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"

    def pids(self):
        return [self.proc.pid] + children_of(self.proc.pid)


class Gateway(Target):
    """A `token-exchange serve` on a database of its own, with its ports and config file."""

    def __init__(self, bench, label, database, refresh_interval_ms, full_refresh_interval_ms=0):
        self.bench = bench
        self.label = label
        self.database = database
        self.admin_port, self.metrics_port = free_port(), free_port()
        port = free_port()
        self.config_path = os.path.join(bench.workdir, f"{label}.toml")
        with open(self.config_path, "w") as f:
            f.write(gateway_config(bench, label, port, self.admin_port, self.metrics_port,
                                   bench.mysql.url(database), refresh_interval_ms, full_refresh_interval_ms))
        self.rows_before = bench.mysql.count(database, "usage_records") if bench.table_exists(database) else 0
        started = time.monotonic()
        proc = bench.procs.spawn(label, [bench.bin["tokex"], "--config", self.config_path, "serve"],
                                 env=bench.tokex_env())
        super().__init__("tokex", port, proc)
        self.wait_ready(timeout=300)
        self.startup_s = time.monotonic() - started
        self.requests_200 = None
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_ready(self, timeout):
        url = f"http://127.0.0.1:{self.admin_port}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"token-exchange exited with {self.proc.returncode}:\n{log_tail(self.proc)}")
            try:
                if http_get(url, timeout=2)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise BenchError(f"token-exchange was not ready within {timeout} s:\n{log_tail(self.proc)}")

    def metrics(self):
        try:
            return Metrics(http_get(self.metrics_url, timeout=5)[1])
        except (OSError, urllib.error.URLError) as e:
            log(f"cannot read {self.metrics_url}: {e}")
            return Metrics("")

    def stop(self):
        """Stops the gateway once its usage queue has drained, after reading how many requests it answered
        200; returns the usage records it wrote (rows now minus rows at start) next to that count."""
        drain_s = SettlementWatch(self).wait_drained(timeout=self.bench.args.drain_timeout)
        metrics = self.metrics()
        self.requests_200 = metrics.get("tokex_requests_total", status="200") or 0
        statuses = {}
        for name, labels, value in metrics.samples:
            if name == "tokex_requests_total":
                statuses[labels.get("status", "?")] = statuses.get(labels.get("status", "?"), 0) + int(value)
        # Every answered request has a record (a refused or cut one too), except those whose record the
        # gateway dropped, which it counts. Requests to routes without a record (GET /v1/models) are not
        # made by the benchmark; their label is model "-" with status 200.
        dropped = int(metrics.get("tokex_usage_records_dropped_total") or 0)
        expected = sum(statuses.values()) - dropped
        code = self.bench.procs.stop(self.proc, timeout=60)
        rows = self.bench.mysql.count(self.database, "usage_records") - self.rows_before
        with open(self.proc.bench_log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return {"exit_code": code, "requests_200": int(self.requests_200), "usage_records": rows,
                "records_expected": expected, "records_dropped": dropped,
                "match": rows == expected, "drain_before_stop_s": drain_s,
                "requests_by_status": statuses,
                "background_task_timeout": "did not stop in time" in text, "log": log_summary(text)}


def gateway_config(bench, label, port, admin_port, metrics_port, database_url, refresh_interval_ms,
                   full_refresh_interval_ms=0):
    # 0: the gateway's default (and a binary older than the setting accepts the file).
    full = f"full_refresh_interval_ms = {full_refresh_interval_ms}\n" if full_refresh_interval_ms else ""
    return f"""# Written by bench/bench.py for one benchmark gateway ({label}); every other setting is the default.
data_dir = "{os.path.join(bench.workdir, label + '-data')}"

[gateway]
listen = "127.0.0.1:{port}"
threads = {GATEWAY_THREADS}
grace_period_secs = 1

[admin]
listen = "127.0.0.1:{admin_port}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[database]
url = "{database_url}"

[security]
upstream_allow = "127.0.0.0/8"

[pool]
refresh_interval_ms = {refresh_interval_ms}
{full}
[ledger]
node_id = "bench-{label}"
"""


def nginx_config(prefix, port, upstream_port, connections):
    with open(NGINX_TEMPLATE) as f:
        text = f.read()
    for key, value in {
        "@PREFIX@": prefix,
        "@WORKERS@": str(GATEWAY_THREADS),
        "@NOFILE@": str(nofile_limit()),
        "@CONNECTIONS@": str(connections),
        "@LISTEN_PORT@": str(port),
        "@UPSTREAM_PORT@": str(upstream_port),
    }.items():
        text = text.replace(key, value)
    return text


# ---------------------------------------------------------------------------------------------------------
# The run


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def slope(points):
    """Least-squares slope of (t, y) points, per second."""
    if len(points) < 3:
        return None
    mt = statistics.fmean(t for t, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else None


class Sampler(threading.Thread):
    def __init__(self, interval_s, fn):
        super().__init__(daemon=True)
        self.interval_s, self.fn = interval_s, fn
        self.samples = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                self.samples.append((started - self.t0, self.fn()))
            except Exception as e:  # a failed sample must not end the run
                log(f"sampler: {e}")
            self.halt.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def finish(self):
        self.halt.set()
        self.join(10)
        return self.samples


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="tokex-bench-")
        os.chmod(self.workdir, 0o755)
        self.bin = self.copy_binaries()
        self.procs = Processes(self.workdir)
        self.wrk = Wrk(self.procs)
        self.mysql = MySql(args.mysql)
        self.master_key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.models = [f"bench-m{i:02d}" for i in range(1, MODELS + 1)]
        self.targets = {}
        self.gateway = None
        self.results = {"sections": {}}
        self.keys_file = os.path.join(self.workdir, "buyer-keys.txt")
        self.slow_mock_keys_file = os.path.join(self.workdir, "slow-mock-keys.txt")

    # --- set-up ------------------------------------------------------------------------------------------

    def size_buffer_pool(self):
        """A production MySQL holds its hot indexes in memory; the default pool (128 MiB) does not hold what
        a full run writes, and the settlement figures would measure the disk instead. Restored by
        `restore_buffer_pool`."""
        self.buffer_pool_before = None
        want = self.args.mysql_buffer_pool_mib << 20
        current = int(self.mysql.run("SELECT @@innodb_buffer_pool_size") or 0)
        self.results["mysql_buffer_pool_mib"] = max(current, want) >> 20
        if want and current < want:
            self.mysql.run(f"SET GLOBAL innodb_buffer_pool_size = {want}")
            self.buffer_pool_before = current
            log(f"innodb_buffer_pool_size raised from {current >> 20} to {want >> 20} MiB for the run")

    def restore_buffer_pool(self):
        if getattr(self, "buffer_pool_before", None):
            try:
                self.mysql.run(f"SET GLOBAL innodb_buffer_pool_size = {self.buffer_pool_before}")
                log(f"innodb_buffer_pool_size restored to {self.buffer_pool_before >> 20} MiB")
            except BenchError as e:
                log(f"could not restore innodb_buffer_pool_size: {e}")

    def copy_binaries(self):
        """Runs copies of the binaries: target/ is shared with other builds, which may replace them mid-run."""
        bindir = os.path.join(self.workdir, "bin")
        os.makedirs(bindir)
        copies = {}
        for name, path in (("tokex", self.args.tokex), ("mock", MOCK), ("bare", BARE), ("seed", self.args.seed)):
            copies[name] = os.path.join(bindir, os.path.basename(path))
            shutil.copy2(path, copies[name])
        return copies

    def tokex_env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEX_")}
        env.update({"TOKEX_MASTER_KEY": self.master_key, "TOKEX_ADMIN_PASSWORD": "bench-admin-password",
                    "TOKEX_LOG": os.environ.get("TOKEX_BENCH_LOG", "warn")})
        return env

    def table_exists(self, database):
        return self.mysql.run(
            "SELECT COUNT(*) FROM information_schema.tables "
            f"WHERE table_schema = '{database}' AND table_name = 'usage_records'") == "1"

    def seed(self, database, seller_keys, slow_keys, keys_out):
        self.mysql.recreate(database)
        started = time.monotonic()
        argv = [self.bin["seed"], "--database-url", self.mysql.url(database), "--buyers", str(self.args.buyers),
                "--seller-keys", str(seller_keys), "--models", str(MODELS), "--upstream", self.mock_base,
                "--slow-keys", str(slow_keys), "--out", keys_out]
        out = subprocess.run(argv, capture_output=True, text=True, env=self.tokex_env(), timeout=900)
        if out.returncode != 0:
            raise BenchError(f"bench-seed failed:\n{out.stderr[-3000:]}")
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        summary["wall_s"] = time.monotonic() - started
        log(f"seeded {database}: {seller_keys} seller keys + {slow_keys} slow, {self.args.buyers} buyers "
            f"in {summary['wall_s']:.1f} s")
        return summary

    def start_mock(self):
        port = free_port()
        proc = self.procs.spawn("mock-upstream", [self.bin["mock"], "--listen", f"127.0.0.1:{port}", "--no-record"])
        wait_port(port, proc)
        self.mock_port = port
        self.mock_base = f"http://127.0.0.1:{port}/v1"
        self.targets["direct"] = Target("direct", port, proc)

    def start_bare(self):
        port = free_port()
        proc = self.procs.spawn("bare-proxy", [self.bin["bare"], "--listen", f"127.0.0.1:{port}",
                                               "--upstream", f"127.0.0.1:{self.mock_port}",
                                               "--threads", str(GATEWAY_THREADS)])
        wait_port(port, proc)
        self.targets["bare"] = Target("bare", port, proc)

    def start_nginx(self):
        nginx = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
        if not nginx or self.args.no_nginx:
            log("nginx not found: not measured" if not nginx else "nginx skipped (--no-nginx)")
            return
        prefix = os.path.join(self.workdir, "nginx")
        os.makedirs(prefix, exist_ok=True)
        os.chmod(prefix, 0o755)
        port = free_port()
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_config(prefix, port, self.mock_port, max(4096, self.args.connections * 4)))
        proc = self.procs.spawn("nginx", [nginx, "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")])
        wait_port(port, proc)
        self.targets["nginx"] = Target("nginx", port, proc)

    def start_main_gateway(self):
        self.gateway = Gateway(self, "tokex-main", self.args.main_db, 10_000)
        self.targets["tokex"] = self.gateway
        log(f"token-exchange ready in {self.gateway.startup_s:.1f} s")

    # --- measurements ------------------------------------------------------------------------------------

    def warm(self, target, stream, connections=16, keys_file=None, models=None, max_tokens=MAX_TOKENS):
        self.wrk.run(target.url, 2, connections, self.args.warmup, keys_file or self.keys_file, models or self.models,
                     stream, max_tokens, mode="sweep")

    def measure(self, target, stream, threads, connections, duration_s, during=None):
        """One measured wrk run against `target`, with the target's CPU time and peak RSS."""
        pids = target.pids()
        reset_peak_rss(pids)
        cpu0 = cpu_seconds(pids)
        result = self.wrk.run(target.url, threads, connections, duration_s, self.keys_file, self.models, stream,
                              MAX_TOKENS, during=during, raw=connections == threads)
        cpu = cpu_seconds(pids) - cpu0
        result["cpu_s"] = cpu
        result["cpu_s_per_1k"] = cpu / result["requests"] * 1000 if result["requests"] else None
        result["peak_rss_kib"] = status_kib(pids, "VmHWM")
        if result["errors"]:
            log(f"  {target.name}: {result['errors']} errors ({result['status_errors']} non-2xx, "
                f"{result['timeouts']} timeouts, {result['connect_errors'] + result['read_errors'] + result['write_errors']} socket)")
        return result

    def interleaved(self, measure_one):
        """Runs `measure_one(name, target, stream)` in rounds (every mode, then every target in turn) and
        returns the results per (target, mode). The gateway's usage queue drains after each of its runs."""
        runs = {(t, mode): [] for t in self.targets for mode in ("nonstream", "stream")}
        for round_no in range(1, self.args.rounds + 1):
            for mode in ("nonstream", "stream"):
                for name in TARGETS:
                    target = self.targets.get(name)
                    if target is None:
                        continue
                    self.warm(target, mode == "stream")
                    result = measure_one(name, target, mode == "stream")
                    if name == "tokex":
                        self.let_settle()
                    runs[(name, mode)].append(result)
                    log(f"round {round_no} c{result['connections']:<3d} {mode:9s} {name:6s} "
                        f"{result['rps']:9.0f} req/s  p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms")
        return runs

    def throughput(self):
        args = self.args
        settlement_runs = []

        def measure_one(name, target, stream):
            watch = SettlementWatch(self.gateway, args.drain_timeout) if name == "tokex" and not stream else None
            result = self.measure(target, stream, 2, args.connections, args.duration,
                                  during=watch.during if watch else None)
            if watch is not None:
                settlement_runs.append(watch.report(result))
            result.update(connections=args.connections, p50_ms=result["p50_us"] / 1000,
                          p99_ms=result["p99_us"] / 1000)
            return result

        runs = self.interleaved(measure_one)
        table = {}
        for (name, mode), results in runs.items():
            if not results:
                continue
            table.setdefault(mode, {})[name] = {
                "rps": median(r["rps"] for r in results),
                "p50_ms": median(r["p50_ms"] for r in results),
                "p99_ms": median(r["p99_ms"] for r in results),
                "cpu_s_per_1k": median(r["cpu_s_per_1k"] for r in results),
                "peak_rss_mib": max(r["peak_rss_kib"] for r in results) / 1024,
                "errors": sum(r["errors"] for r in results),
                "requests": sum(r["requests"] for r in results),
                "rounds": [round(r["rps"]) for r in results],
            }
        for mode, row in table.items():
            for name, entry in row.items():
                entry["vs_bare"] = ratio(entry["rps"], row.get("bare", {}).get("rps"))
                entry["vs_direct"] = ratio(entry["rps"], row.get("direct", {}).get("rps"))
        self.results["sections"]["throughput"] = {
            "load": f"wrk -t2 -c{args.connections} -d{args.duration}s, median of {args.rounds} interleaved rounds",
            "table": table,
            "raw": {f"{n}/{m}": r for (n, m), r in runs.items() if r},
        }
        if settlement_runs:
            self.results["sections"]["settlement_load"] = settlement_runs

    def latency(self):
        args = self.args

        def measure_one(_name, target, stream):
            result = self.measure(target, stream, 1, 1, args.latency_duration)
            # Uncorrected per-request times (raw_*): see bench/chat.lua for why not wrk's own percentiles.
            result.update(connections=1, p50_ms=result["raw_p50_us"] / 1000, p99_ms=result["raw_p99_us"] / 1000)
            return result

        runs = self.interleaved(measure_one)
        table = {}
        for (name, mode), results in runs.items():
            if results:
                table.setdefault(mode, {})[name] = {
                    "rps": median(r["rps"] for r in results),
                    "p50_ms": median(r["p50_ms"] for r in results),
                    "p99_ms": median(r["p99_ms"] for r in results),
                    "p999_ms": median(r["raw_p999_us"] / 1000 for r in results),
                    "max_ms": max(r["raw_max_us"] / 1000 for r in results),
                    "wrk_corrected_p99_ms": median(r["p99_us"] / 1000 for r in results),
                    "errors": sum(r["errors"] for r in results),
                }
        for mode, row in table.items():
            for name, entry in row.items():
                for base in ("bare", "direct"):
                    ref = row.get(base)
                    entry[f"added_p50_ms_vs_{base}"] = entry["p50_ms"] - ref["p50_ms"] if ref else None
                    entry[f"added_p99_ms_vs_{base}"] = entry["p99_ms"] - ref["p99_ms"] if ref else None
        self.results["sections"]["latency"] = {
            "load": f"wrk -t1 -c1 -d{args.latency_duration}s, median of {args.rounds} interleaved rounds",
            "table": table,
        }

    def streams(self):
        """Concurrent slow streams (100 ms before each SSE event) through the gateway and the bare proxy."""
        args = self.args
        limit = nofile_limit()
        # A proxy holds two descriptors per stream (client and upstream); the kernel's hard limit caps it.
        n = min(args.streams, (limit - FD_RESERVE) // 2)
        tokens = max(1, round(args.stream_seconds / SLOW_EVENT_S) - STREAM_FRAMES_BESIDES_TOKENS)
        hold_s = args.stream_hold
        section = {"requested": args.streams, "streams": n, "nofile_limit": limit,
                   "stream_seconds": (tokens + STREAM_FRAMES_BESIDES_TOKENS) * SLOW_EVENT_S,
                   "max_tokens": tokens, "hold_s": hold_s, "targets": {}}
        if n < args.streams:
            log(f"streams: RLIMIT_NOFILE hard limit {limit} allows {n} proxied streams, not {args.streams}")
        for name in ("tokex", "bare"):
            target = self.targets.get(name)
            if target is None:
                continue
            # The buyers' credit holds are opened by fast requests (a hold serves every model of its buyer).
            self.warm(target, False)
            keys = self.keys_file if name == "tokex" else self.slow_mock_keys_file
            models = [SLOW_MODEL]
            time.sleep(1.0)
            pids = target.pids()
            idle_kib = status_kib(pids, "VmRSS")
            samples = {"rss": [], "active": [], "fds": []}

            def during(procs, pids=pids, samples=samples, target=target):
                next_metrics = next_fds = 0.0
                while any(proc.poll() is None for proc in procs):
                    now = time.monotonic()
                    samples["rss"].append(status_kib(pids, "VmRSS"))
                    if isinstance(target, Gateway) and now >= next_metrics:
                        active = target.metrics().get("tokex_active_streams")
                        if active is not None:
                            samples["active"].append(active)
                        next_metrics = now + 0.5
                    if now >= next_fds:
                        samples["fds"].append(open_fds(pids[0]))
                        next_fds = now + 1.0
                    time.sleep(0.2)

            log(f"streams: {n} slow streams of ~{section['stream_seconds']:.0f} s through {name} for {hold_s} s")
            result = self.wrk.run_staggered(target.url, n, STREAM_CHUNK, STREAM_CHUNK_INTERVAL_S, hold_s, keys,
                                            models, True, tokens, timeout_s=120, during=during)
            peak_kib = max(samples["rss"]) if samples["rss"] else None
            entry = {
                "idle_rss_mib": idle_kib / 1024,
                "peak_rss_mib": peak_kib / 1024 if peak_kib else None,
                "rss_per_stream_kib": (peak_kib - idle_kib) / n if peak_kib else None,
                "streams_completed": result["requests"],
                "max_open_fds": max(samples["fds"], default=None),
                "errors": result["errors"],
                "wrk": result,
            }
            if entry["rss_per_stream_kib"] is not None:
                entry["projected_10k_rss_mib"] = (idle_kib + entry["rss_per_stream_kib"] * 10_000) / 1024
            if samples["active"]:
                entry["max_active_streams"] = max(samples["active"])
            if isinstance(target, Gateway):
                entry["drain_s"] = self.wait_streams_drained(target)
                self.let_settle()
            section["targets"][name] = entry
            log(f"streams {name}: idle {entry['idle_rss_mib']:.0f} MiB, peak {entry['peak_rss_mib']:.0f} MiB, "
                f"{entry['rss_per_stream_kib']:.1f} KiB/stream, active max {entry.get('max_active_streams', 'n/a')}")
        self.results["sections"]["streams"] = section

    def let_settle(self):
        """Waits until the gateway's usage queue is empty, so that its database writes do not run into the
        next target's measurement."""
        SettlementWatch(self.gateway).wait_drained(self.args.drain_timeout)

    def wait_streams_drained(self, gateway, timeout=60.0):
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not gateway.metrics().get("tokex_active_streams"):
                return time.monotonic() - started
            time.sleep(0.2)
        return None

    def settlement(self):
        """Settles what the run sent: usage rows against 200s, then the ledger check. Stops the main gateway."""
        section = self.results["sections"].setdefault("settlement", {})
        if "settlement_load" not in self.results["sections"]:
            # --only settlement: one max-rate run of its own.
            self.warm(self.gateway, False)
            watch = SettlementWatch(self.gateway, self.args.drain_timeout)
            result = self.measure(self.gateway, False, 2, self.args.connections, self.args.duration,
                                  during=watch.during)
            self.results["sections"]["settlement_load"] = [watch.report(result)]
        section["load"] = self.results["sections"].pop("settlement_load")
        log("stopping the main gateway to count its usage records")
        section["records"] = self.gateway.stop()
        self.targets.pop("tokex", None)
        section["ledger_check"] = self.ledger_check(self.gateway)
        log(f"settlement: {section['records']['usage_records']} usage records for "
            f"{section['records']['requests_200']} answers 200; ledger check "
            f"{'clean' if section['ledger_check']['clean'] else 'NOT clean'}")

    def ledger_check(self, gateway):
        """`token-exchange ledger check` on the gateway's database. On tables just filled in bulk MariaDB may
        plan its correlated queries from stale statistics and take minutes (seen with 25,000 usage records);
        a check that times out is retried once after ANALYZE TABLE, and both timings are reported."""
        out = {"seconds": [], "analyzed": False}
        for attempt in range(2):
            started = time.monotonic()
            try:
                done = subprocess.run([self.bin["tokex"], "--config", gateway.config_path, "ledger", "check"],
                                      capture_output=True, text=True, env=self.tokex_env(),
                                      timeout=self.args.ledger_check_timeout)
            except subprocess.TimeoutExpired:
                out["seconds"].append(None)
                log(f"ledger check timed out after {self.args.ledger_check_timeout} s"
                    + ("; analyzing the tables and retrying" if attempt == 0 else ""))
                if attempt == 0:
                    self.mysql.run("ANALYZE TABLE usage_records, journal_entries, postings, holds, accounts",
                                   gateway.database)
                    out["analyzed"] = True
                    continue
                out.update(clean=False, exit_code=None, report={"error": "timed out"})
                return out
            out["seconds"].append(time.monotonic() - started)
            try:
                report = json.loads(done.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                report = {"stdout": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
            if isinstance(report.get("violations"), list) and len(report["violations"]) > 20:
                report["violations_total"] = len(report["violations"])
                report["violations"] = report["violations"][:20]
            out.update(clean=done.returncode == 0, exit_code=done.returncode, report=report)
            return out
        return out

    def snapshot(self):
        """Pool refresh every second on 1,000 and on 100,000 seller keys, under light load."""
        args = self.args
        section = {"keys": args.snapshot_keys, "seconds": args.snapshot_duration, "runs": {}}
        section["seed"] = self.seed(args.snapshot_db, args.snapshot_keys, 0, os.path.join(self.workdir, "keys-100k.txt"))
        keys_100k = os.path.join(self.workdir, "keys-100k.txt")
        for label, database, keys in (("baseline", args.main_db, self.keys_file), ("large", args.snapshot_db, keys_100k)):
            gateway = Gateway(self, f"tokex-{label}", database, 1000, args.snapshot_full_interval_ms)
            entry = {"database": database, "startup_s": gateway.startup_s}
            log(f"snapshot {label}: ready in {gateway.startup_s:.1f} s")
            self.wrk.run(gateway.url, 2, 16, args.warmup, keys, self.models, False, MAX_TOKENS, mode="sweep")
            before = gateway.metrics()
            for threads, connections in ((1, 1), (2, 16)):
                raw = connections == threads
                result = self.wrk.run(gateway.url, threads, connections, args.snapshot_duration, keys, self.models,
                                      False, MAX_TOKENS, raw=raw)
                # One connection: uncorrected times; 16: wrk's percentiles (the maximum is never corrected).
                prefix = "raw_" if raw else ""
                entry[f"c{connections}"] = {
                    "rps": result["rps"], "p50_ms": result[prefix + "p50_us"] / 1000,
                    "p99_ms": result[prefix + "p99_us"] / 1000, "p999_ms": result[prefix + "p999_us"] / 1000,
                    "max_ms": result["lat_max_us"] / 1000, "errors": result["errors"],
                }
                log(f"snapshot {label} c{connections}: p99 {entry[f'c{connections}']['p99_ms']:.2f} ms "
                    f"p99.9 {entry[f'c{connections}']['p999_ms']:.2f} ms max {result['lat_max_us'] / 1000:.2f} ms")
            after = gateway.metrics()
            entry["snapshot_keys"] = after.get("tokex_pool_snapshot_keys")
            entry["refresh"] = refresh_stats(before, after)
            entry["refresh_by_kind"] = {kind: refresh_stats(before, after, kind) for kind in ("full", "incremental")}
            entry["records"] = gateway.stop()
            entry["ledger_check"] = self.ledger_check(gateway)
            section["runs"][label] = entry
        base, large = section["runs"]["baseline"], section["runs"]["large"]
        for c in ("c1", "c16"):
            large[c]["stall_ms"] = large[c]["max_ms"] - base[c]["max_ms"]
        self.results["sections"]["snapshot"] = section

    # --- orchestration -----------------------------------------------------------------------------------

    def run(self):
        args = self.args
        sections = [args.only] if args.only else SECTIONS
        self.results["machine"] = machine_facts()
        self.results["config"] = {k: v for k, v in vars(args).items()}
        self.results["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        log(f"work directory {self.workdir}")
        self.size_buffer_pool()
        self.start_mock()
        self.results["seed_main"] = self.seed(args.main_db, args.seller_keys, args.slow_keys, self.keys_file)
        with open(self.slow_mock_keys_file, "w") as f:
            for i in range(args.buyers):
                f.write(f"sk-mock-slow-bench-direct-{i:05d}\n")
        if {"throughput", "latency", "streams"} & set(sections):
            self.start_bare()
            if {"throughput", "latency"} & set(sections):
                self.start_nginx()
        if set(sections) - {"snapshot"}:
            self.start_main_gateway()
        for section in sections:
            if section == "snapshot" and self.main_gateway_running():
                # The baseline gateway of the snapshot test uses the main database.
                self.settlement_or_stop(sections)
            log(f"--- {section}")
            getattr(self, section)()
        if self.main_gateway_running():
            self.settlement_or_stop(sections)
        logs = {}
        for name, target in self.targets.items():
            if not isinstance(target, Gateway):
                with open(target.proc.bench_log, encoding="utf-8", errors="replace") as f:
                    logs[name] = log_summary(f.read())
        self.results["logs"] = logs
        self.results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open("/proc/loadavg") as f:
            self.results["machine"]["loadavg_after"] = f.read().split()[:3]

    def main_gateway_running(self):
        return self.gateway is not None and self.gateway.proc.poll() is None

    def settlement_or_stop(self, sections):
        if "settlement" in sections:
            self.settlement()
        else:
            self.results["sections"]["main_gateway"] = self.gateway.stop()
            self.targets.pop("tokex", None)


class SettlementWatch:
    """Samples the usage writer's progress each second during a max-rate run and until it has drained."""

    def __init__(self, gateway, drain_timeout=120.0):
        self.gateway = gateway
        self.drain_timeout = drain_timeout
        self.sampler = None
        self.end_t = None
        self.drain_s = None

    def sample(self):
        m = self.gateway.metrics()
        return {
            "requests": m.get("tokex_requests_total") or 0,
            "requests_200": m.get("tokex_requests_total", status="200") or 0,
            "written": m.get("tokex_usage_records_written_total") or 0,
            "queue": m.get("tokex_usage_queue_depth"),
            "dropped": m.get("tokex_usage_records_dropped_total") or 0,
        }

    def during(self, proc):
        self.sampler = Sampler(1.0, self.sample)
        self.sampler.start()
        proc.wait()
        self.end_t = time.monotonic() - self.sampler.t0
        self.drain_s = self.wait_drained(self.drain_timeout)
        self.sampler.finish()

    def wait_drained(self, timeout=120.0):
        """Seconds until the queue is empty (or, without the queue gauge, until the records written stop
        lagging the requests answered), None if it did not drain."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            s = self.sample()
            backlog = s["queue"] if s["queue"] is not None else s["requests_200"] - s["written"]
            if backlog <= 0:
                return time.monotonic() - started
            time.sleep(0.05)
        return None

    def report(self, result):
        samples = [(t, s) for t, s in self.sampler.samples if t <= (self.end_t or 0) + 0.5]
        out = {"requests_per_s": result["rps"], "drain_s": self.drain_s}
        if len(samples) >= 2:
            (t0, s0), (t1, s1) = samples[0], samples[-1]
            dt = max(t1 - t0, 1e-9)
            out["answered_per_s"] = (s1["requests"] - s0["requests"]) / dt
            out["written_per_s"] = (s1["written"] - s0["written"]) / dt
            out["dropped"] = s1["dropped"] - s0["dropped"]
        queue = [(t, s["queue"]) for t, s in samples if s["queue"] is not None]
        backlog = [(t, s["requests_200"] - s["written"]) for t, s in samples]
        out["queue_metric"] = bool(queue)
        out["max_queue"] = max((q for _, q in queue), default=None)
        out["queue_slope_per_s"] = slope(queue)
        out["max_backlog"] = max((b for _, b in backlog), default=None)
        out["backlog_slope_per_s"] = slope(backlog)
        return out


def refresh_stats(before, after, kind=None):
    """Refreshes in the window, their mean and the bound on their maximum; of one `kind` (full, incremental)
    when given (gateways since incremental reloads label the metric with it)."""
    name = "tokex_pool_refresh_seconds"
    labels = {"kind": kind} if kind else {}
    s0, s1 = before.get(name + "_sum", **labels) or 0.0, after.get(name + "_sum", **labels)
    c0, c1 = before.get(name + "_count", **labels) or 0.0, after.get(name + "_count", **labels)
    if None in (s0, s1, c0, c1):
        return {"metric": False}
    count = c1 - c0
    out = {"metric": True, "refreshes": count, "mean_s": (s1 - s0) / count if count else None}
    # The largest refresh is at most the smallest bucket bound that holds every refresh of the window.
    b0 = dict(before.buckets(name, **labels))
    for le, v in after.buckets(name, **labels):
        if count and v - b0.get(le, 0) >= count:
            out["max_le_s"] = le
            break
    return out


def machine_facts():
    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    def run(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = re.search(r"^model name\s*:\s*(.+)$", read("/proc/cpuinfo"), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)", read("/proc/meminfo"), re.M)
    nginx = run(["nginx", "-v"]) or subprocess.run(["sh", "-c", "nginx -v 2>&1"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu.group(1).strip() if cpu else "unknown",
        "nproc": os.cpu_count(),
        "ram_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": os.uname().release,
        "rustc": run(["rustc", "--version"]),
        "wrk": (run(["sh", "-c", "wrk -v 2>&1 | head -1"]) or "").split(" [")[0],
        "nginx": nginx.strip().replace("nginx version: ", ""),
        "commit": run(["git", "rev-parse", "--short=12", "HEAD"]),
        "dirty": bool(run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_before": read("/proc/loadavg").split()[:3],
    }


# ---------------------------------------------------------------------------------------------------------
# Report


def table_entries(table):
    """(mode, target, entry) of a per-mode table, targets in their measuring order."""
    for mode, row in table.items():
        for name in TARGETS:
            if name in row:
                yield mode, name, row[name]


def fmt(value, spec=".2f", none="n/a"):
    return none if value is None else format(value, spec)


def yes_no(ok):
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def md_table(title, headers, rows):
    """A markdown section: a heading and a table; headers starting with "#" are right-aligned (numbers)."""
    align = "|".join("--:" if h.startswith("#") else "---" for h in headers)
    return [f"## {title}", "", "| " + " | ".join(h.lstrip("#") for h in headers) + " |", f"|{align}|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


def markdown(results):
    s = results["sections"]
    m = results["machine"]
    lines = [f"# token-exchange benchmark ({m['date']})", ""]
    lines.append(
        f"Machine: {m['cpu']}, {m['nproc']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}; {m['rustc']}; "
        f"{m['wrk']}; nginx {m['nginx'] or 'not installed'}; commit {m['commit']}{' (dirty)' if m['dirty'] else ''}. "
        "Load generator, proxies, mock upstream and MariaDB share the machine"
        f"{' (InnoDB buffer pool ' + str(results['mysql_buffer_pool_mib']) + ' MiB)' if 'mysql_buffer_pool_mib' in results else ''}"
        "; load average before the run "
        f"{' '.join(m.get('loadavg_before', []))}, after {' '.join(m.get('loadavg_after', []))}.")
    lines.append("")
    goals = []

    if "throughput" in s:
        t = s["throughput"]
        lines += md_table(
            f"Throughput ({t['load']})",
            ["mode", "target", "#req/s", "#p50 ms", "#p99 ms", "#CPU s / 1k req", "#peak RSS MiB", "#÷ bare",
             "#÷ direct", "#errors"],
            [[mode, name, f"{e['rps']:.0f}", f"{e['p50_ms']:.2f}", f"{e['p99_ms']:.2f}", fmt(e["cpu_s_per_1k"], ".3f"),
              f"{e['peak_rss_mib']:.0f}", fmt(e["vs_bare"]), fmt(e["vs_direct"], ".3f"), e["errors"]]
             for mode, name, e in table_entries(t["table"])])
        for mode, row in t["table"].items():
            tok = row.get("tokex")
            if tok and tok.get("vs_bare") is not None:
                goals.append((f"throughput {mode}: token-exchange ÷ bare", f"{tok['vs_bare']:.2f}",
                              f"≥ {GOAL_THROUGHPUT_VS_BARE}", tok["vs_bare"] >= GOAL_THROUGHPUT_VS_BARE))

    if "latency" in s:
        t = s["latency"]
        lines += md_table(
            f"Latency at one connection ({t['load']}; uncorrected per-request times, see bench/README.md)",
            ["mode", "target", "#p50 ms", "#p99 ms", "#p99.9 ms", "#+ p50 vs bare", "#+ p99 vs bare",
             "#+ p50 vs direct", "#+ p99 vs direct", "#errors"],
            [[mode, name, f"{e['p50_ms']:.3f}", f"{e['p99_ms']:.3f}", f"{e['p999_ms']:.3f}",
              fmt(e["added_p50_ms_vs_bare"], "+.3f"), fmt(e["added_p99_ms_vs_bare"], "+.3f"),
              fmt(e["added_p50_ms_vs_direct"], "+.3f"), fmt(e["added_p99_ms_vs_direct"], "+.3f"), e["errors"]]
             for mode, name, e in table_entries(t["table"])])
        for mode, row in t["table"].items():
            tok = row.get("tokex")
            if tok and tok.get("added_p50_ms_vs_bare") is not None:
                for q, goal in (("p50", GOAL_ADDED_P50_MS), ("p99", GOAL_ADDED_P99_MS)):
                    added = tok[f"added_{q}_ms_vs_bare"]
                    goals.append((f"added latency {mode}, 1 connection, {q} over bare", f"{added:+.3f} ms",
                                  f"≤ {goal} ms", added <= goal))

    if "streams" in s:
        t = s["streams"]
        note = "" if t["streams"] >= t["requested"] else (
            f" — {t['streams']} rather than {t['requested']}: the hard RLIMIT_NOFILE here is {t['nofile_limit']} "
            "and a proxy holds two descriptors per stream, so RSS at 10,000 is projected from the per-stream figure")
        lines += md_table(
            f"Concurrent slow streams ({t['streams']} streams of ~{t['stream_seconds']:.0f} s, 100 ms between "
            f"events, held {t['hold_s']} s{note})",
            ["target", "#idle RSS MiB", "#peak RSS MiB", "#KiB / stream", "#RSS at 10k MiB (projected)",
             "#max active streams", "#max open fds", "#errors"],
            [[name, f"{e['idle_rss_mib']:.0f}", fmt(e["peak_rss_mib"], ".0f"), fmt(e["rss_per_stream_kib"], ".1f"),
              fmt(e.get("projected_10k_rss_mib"), ".0f"), fmt(e.get("max_active_streams"), ".0f"),
              fmt(e.get("max_open_fds"), "d"), e["errors"]]
             for name, e in t["targets"].items()])
        tok = t["targets"].get("tokex")
        if tok and tok.get("projected_10k_rss_mib") is not None:
            goals.append(("10,000 streams RSS (token-exchange)", f"{tok['projected_10k_rss_mib']:.0f} MiB", "≤ 1024 MiB",
                          tok["projected_10k_rss_mib"] * 1024 * 1024 <= GOAL_STREAMS_RSS_BYTES))

    if "settlement" in s:
        t = s["settlement"]
        lines += md_table(
            "Settlement on MySQL (during the max-rate non-stream token-exchange runs)",
            ["run", "#req/s", "#records written/s", "#max queue", "#queue slope /s", "#drain s", "#dropped"],
            [[i, f"{run['requests_per_s']:.0f}", fmt(run.get("written_per_s"), ".0f"), fmt(run["max_queue"], ".0f"),
              fmt(run["queue_slope_per_s"], "+.1f"), fmt(run["drain_s"], ".2f", "did not drain"),
              fmt(run.get("dropped"), ".0f")]
             for i, run in enumerate(t["load"], 1)])
        rec = t["records"]
        lc = t["ledger_check"]
        expected = rec.get("records_expected", rec["requests_200"])
        lines += [f"Usage records in MySQL: {rec['usage_records']} for {expected} requests answered "
                  f"({rec['requests_200']} of them 200; {rec.get('records_dropped', 0)} records dropped) "
                  f"({'equal' if rec['match'] else '**differ**'}). `token-exchange ledger check`: "
                  f"{'clean' if lc['clean'] else '**not clean** (exit ' + str(lc['exit_code']) + ')'}"
                  f" in {', '.join(fmt(x, '.1f', 'timeout') for x in lc['seconds'])} s"
                  f"{' (retried after ANALYZE TABLE)' if lc['analyzed'] else ''}.", ""]
        if t["load"]:
            # Keeping up: records written as fast as requests are answered while the load lasts (a queue that
            # only absorbs bursts drains within the run), and everything written once the load stops.
            rates = [(r.get("written_per_s"), r.get("answered_per_s")) for r in t["load"]]
            keeps_up = all(w is not None and a and w >= SETTLEMENT_KEEP_UP * a for w, a in rates) and all(
                r["drain_s"] is not None for r in t["load"])
            goals.append(("settlement: records written/s ÷ requests answered/s during max-rate load",
                          ", ".join(fmt(ratio(w, a), ".2f") for w, a in rates),
                          f"≥ {SETTLEMENT_KEEP_UP} (no growing queue)", keeps_up))
        goals.append(("usage records = requests answered (less records dropped)",
                      f"{rec['usage_records']} / {rec.get('records_expected', rec['requests_200'])}",
                      "equal", rec["match"]))
        goals.append(("ledger check after the run", "clean" if lc["clean"] else "not clean", "clean", lc["clean"]))

    if "snapshot" in s:
        t = s["snapshot"]
        runs = t["runs"]
        rows = []
        def by_kind(e, kind):
            k = e.get("refresh_by_kind", {}).get(kind, {})
            if not k.get("refreshes"):
                return ""
            return f"{k['refreshes']:.0f} × {k['mean_s']:.3f}"

        for label, e in runs.items():
            r = e["refresh"]
            for c in ("c1", "c16"):
                x = e[c]
                rows.append([f"{label} ({e['database']})", f"{e['startup_s']:.1f}", fmt(e["snapshot_keys"], ".0f"),
                             fmt(r.get("refreshes"), ".0f"), fmt(r.get("mean_s"), ".3f"), fmt(r.get("max_le_s"), "g"),
                             by_kind(e, "full"), by_kind(e, "incremental"),
                             c, f"{x['rps']:.0f}", f"{x['p99_ms']:.2f}", f"{x['p999_ms']:.2f}", f"{x['max_ms']:.2f}",
                             fmt(x.get("stall_ms"), "+.2f", ""), x["errors"]])
        lines += md_table(
            f"Pool snapshot of {t['keys']:,} keys, refreshed every second (wrk for {t['seconds']} s each)",
            ["database", "#start-up s", "#keys in snapshot", "#refreshes", "#mean load+swap s", "#max ≤ s",
             "#full: n × mean s", "#incremental: n × mean s", "load",
             "#req/s", "#p99 ms", "#p99.9 ms", "#max ms", "#stall ms", "#errors"],
            rows)
        large = runs.get("large", {})
        mean = large.get("refresh", {}).get("mean_s")
        goals.append((f"{t['keys']:,}-key snapshot load+swap (mean)", fmt(mean, ".3f", "n/a") + " s",
                      f"≤ {GOAL_SWAP_S} s", None if mean is None else mean <= GOAL_SWAP_S))
        full = large.get("refresh_by_kind", {}).get("full", {})
        if full.get("refreshes"):
            goals.append((f"{t['keys']:,}-key snapshot full reload+swap (mean)", f"{full['mean_s']:.3f} s",
                          f"≤ {GOAL_SWAP_S} s", full["mean_s"] <= GOAL_SWAP_S))
        for c in ("c1", "c16"):
            if c in large:
                stall = large[c]["stall_ms"]
                goals.append((f"stall during refresh ({c}: max latency over the 1,000-key baseline)",
                              f"{stall:+.2f} ms", f"≤ {GOAL_STALL_MS} ms", stall <= GOAL_STALL_MS))

    gateways = []
    if "settlement" in s:
        gateways.append(("main (all sections above)", s["settlement"]["records"]))
    elif "main_gateway" in s:
        gateways.append(("main (all sections above)", s["main_gateway"]))
    for label, e in s.get("snapshot", {}).get("runs", {}).items():
        gateways.append((f"snapshot {label}", e["records"]))
    if gateways or results.get("logs"):
        rows = [[f"token-exchange {label}",
                 ", ".join(f"{k}: {v}" for k, v in sorted(rec.get("requests_by_status", {}).items())),
                 log_cell(rec.get("log", {}))] for label, rec in gateways]
        rows += [[name, "", log_cell(summary)] for name, summary in results.get("logs", {}).items()]
        lines += md_table("Answers and logs",
                          ["process", "answers by status", "WARN/ERROR lines (most frequent, numbers masked)"], rows)

    if goals:
        lines += md_table("Targets", ["target", "#measured", "goal", "met"],
                          [[what, value, goal, yes_no(ok)] for what, value, goal, ok in goals])
    results["goals"] = [{"target": w, "measured": v, "goal": g, "met": ok} for w, v, g, ok in goals]
    return "\n".join(lines)


def log_cell(summary, top=3):
    if not summary:
        return "none"
    ranked = sorted(summary.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{n}× `{m.replace('|', '/')}`" for m, n in ranked)


def write_results(results):
    """A full run is `latest`; a --quick or --only run is `latest-quick` / `latest-partial`, so that a smoke run
    never replaces the figures the README quotes. Each run also gets a timestamped copy."""
    os.makedirs(RESULTS, exist_ok=True)
    text = markdown(results)
    config = results["config"]
    suffix = "-quick" if config.get("quick") else "-partial" if config.get("only") else ""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    names = ["latest" + suffix, stamp + suffix]
    for name in names:
        with open(os.path.join(RESULTS, name + ".md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(RESULTS, name + ".json"), "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
            f.write("\n")
    print(text)
    log(f"wrote bench/results/{names[0]}.{{md,json}} and {names[1]}.{{md,json}}")


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark token-exchange against the mock upstream called directly, a bare Pingora proxy and "
                    "nginx (see bench/README.md).")
    p.add_argument("--quick", action="store_true", help="a short smoke run (about 4 minutes)")
    p.add_argument("--only", choices=SECTIONS, help="run one section")
    p.add_argument("--rounds", type=int, help="interleaved rounds per measurement (full 3, quick 1)")
    p.add_argument("--duration", type=int, help="seconds per throughput run (full 10, quick 3)")
    p.add_argument("--latency-duration", type=int, help="seconds per one-connection run (full 8, quick 3)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each run (2)")
    p.add_argument("--connections", type=int, default=64, help="connections of the throughput runs (64)")
    p.add_argument("--streams", type=int, help="concurrent slow streams (full 10000, quick 1000)")
    p.add_argument("--stream-seconds", type=float, default=10.0, help="length of one slow stream (10)")
    p.add_argument("--stream-hold", type=int, help="seconds the slow streams are held open (full 20, quick 12)")
    p.add_argument("--snapshot-keys", type=int, help="seller keys of the snapshot test (full 100000, quick 20000)")
    p.add_argument("--snapshot-duration", type=int, help="seconds per load of the snapshot test (full 15, quick 5)")
    p.add_argument("--buyers", type=int, default=1000)
    p.add_argument("--seller-keys", type=int, default=1000)
    p.add_argument("--slow-keys", type=int, default=20, help="seller keys serving the slow model")
    p.add_argument("--mysql", default=os.environ.get("TOKEX_BENCH_MYSQL", "mysql://root@127.0.0.1:3306"))
    p.add_argument("--mysql-buffer-pool-mib", type=int, default=2048,
                   help="raise the server's innodb_buffer_pool_size to this for the run when it is smaller, and "
                        "restore it after (2048: a full run writes over a GiB of rows and indexes; 0: leave it)")
    p.add_argument("--main-db", default="tokex_bench_main")
    p.add_argument("--snapshot-db", default="tokex_bench_100k")
    p.add_argument("--snapshot-full-interval-ms", type=int, default=10000,
                   help="pool.full_refresh_interval_ms of the snapshot gateways (10000, so that the window holds "
                        "full reloads too; 0: the gateway's default, for binaries older than the setting)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds to wait for the usage queue to drain after a run or before a stop (120)")
    p.add_argument("--ledger-check-timeout", type=int, default=120, help="seconds before a ledger check is retried")
    p.add_argument("--tokex", default=TOKEX,
                   help="token-exchange binary to measure (default: the release build), e.g. a copy of another commit's")
    p.add_argument("--seed", default=SEED,
                   help="bench-seed binary (default: the release build); of the same commit as --tokex, whose "
                        "migrations it applies")
    p.add_argument("--no-nginx", action="store_true", help="do not measure nginx even when installed")
    p.add_argument("--keep-workdir", action="store_true", help="keep the logs and configs in /tmp after the run")
    args = p.parse_args(argv)
    defaults = dict(rounds=(1, 3), duration=(3, 10), latency_duration=(3, 8), streams=(1000, 10000),
                    stream_hold=(12, 20), snapshot_keys=(20000, 100000), snapshot_duration=(5, 15))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv):
    args = parse_args(argv)
    for binary in (args.tokex, MOCK, BARE, args.seed):
        if not os.access(binary, os.X_OK):
            raise SystemExit(f"missing {binary}: build first (bench/run does)")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (bench/run installs it)")
    bench = Bench(args)

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    ok = False
    try:
        bench.run()
        ok = True
    except KeyboardInterrupt:
        log("interrupted; stopping everything this run started")
    except BenchError as e:
        log(f"failed: {e}")
    finally:
        bench.procs.stop_all()
        bench.restore_buffer_pool()
        if ok:
            write_results(bench.results)
        if ok and not args.keep_workdir:
            shutil.rmtree(bench.workdir, ignore_errors=True)
        else:
            log(f"logs and configs kept in {bench.workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
