#!/usr/bin/env bash
# Settlement throughput: seeds 1,000 buyers (wallet and open hold each) and 1,000 hosted keys over 20
# models in a fresh MariaDB database and an SQLite file, queues TOKEX_BENCH_RECORDS (default 50,000)
# finished requests into the real usage writer at once, and prints records settled per second and the
# time per batch by phase (tests/settlement_bench.rs). Release build, as the gateway runs. The table goes
# to bench/settlement/results.md.
#
#   bench/settlement/run.sh                                     # both databases, 50,000 records
#   TOKEX_BENCH_BACKENDS=mariadb TOKEX_BENCH_RECORDS=20000 TOKEX_BENCH_BATCH=1000 bench/settlement/run.sh
#   TOKEX_BENCH_WRITERS=1 bench/settlement/run.sh                # usage.writers (default 2)
#
# MariaDB: TOKEX_TEST_MYSQL_URL (default mysql://root@127.0.0.1:3306), as for the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${TOKEX_BENCH_OUT:-$PWD/bench/settlement/results.md}"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -n "$(git status --porcelain 2>/dev/null)" ] && commit="$commit, dirty"
{
  echo "# Settlement benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $commit)"
  echo
  echo "Release build; the usage writers draining a full queue (their maximum rate). Per-batch times are means"
  echo "of tokex_usage_batch_seconds by phase, in ms. Load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
} > "$out.head"
TOKEX_BENCH_OUT="$out.body" cargo test --release --test settlement_bench -- --ignored --nocapture --test-threads=1
cat "$out.head" "$out.body" > "$out"
rm -f "$out.head" "$out.body"
echo "wrote $out"
