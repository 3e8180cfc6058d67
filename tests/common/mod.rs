//! Harness for the gateway integration tests: every test owns its mock upstream, its database (a SQLite
//! file or a fresh MariaDB database), its data directory and its ports, so tests run in parallel.
//!
//! A test is an `async fn name(backend: Backend)` listed in `backend_tests!`, which makes a `name::sqlite`
//! and a `name::mariadb` test of it. The test sets up accounts and keys with the real CLI
//! (`TestEnv::create_user`, `add_seller_key`, `issue_buyer_key`), starts the real `token-exchange serve`
//! (`TestEnv::start_gateway`) and talks to it over HTTP. When a test fails, the gateway's log is printed.
#![allow(dead_code)]

pub mod capture;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::RngCore as _;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, FromQueryResult, QueryResult, Statement};
use serde::Deserialize;
use serde_json::{json, Value};

pub use reqwest::StatusCode;

/// Longest a single test may run; past it the test fails (with the gateway log) instead of hanging CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(240);
const GATEWAY_START_TIMEOUT: Duration = Duration::from_secs(60);
const MOCK_START_TIMEOUT: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Usage records are written in batches shortly after the request; this is how long tests wait for them.
pub const USAGE_WAIT: Duration = Duration::from_secs(15);
pub const PASSWORD: &str = "correct-horse-battery-staple-42";
const DEFAULT_MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

const TOKEX_BIN: &str = env!("CARGO_BIN_EXE_token-exchange");
const MOCK_BIN: &str = env!("CARGO_BIN_EXE_mock-upstream");

/// Generates `$name::sqlite` and `$name::mariadb` tests from `async fn $name(backend: Backend)`.
/// The test future stays alive while the timeout panics, so the harness's drops see a failing test and
/// print the gateway log. Attributes before a name apply to both of its tests (`#[ignore = "bug: ..."] name`).
#[macro_export]
macro_rules! backend_tests {
    ($($(#[$attr:meta])* $name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])*
            async fn sqlite() {
                $crate::common::run_with_timeout(super::$name($crate::common::Backend::Sqlite)).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])*
            async fn mariadb() {
                $crate::common::run_with_timeout(super::$name($crate::common::Backend::MariaDb)).await
            }
        }
    )+};
}

pub async fn run_with_timeout(test: impl std::future::Future<Output = ()>) {
    let mut test = std::pin::pin!(test);
    tokio::select! {
        () = &mut test => {}
        () = tokio::time::sleep(TEST_TIMEOUT) => panic!("test timed out after {TEST_TIMEOUT:?}"),
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos)
}

/// A port that was free a moment ago and that this process has not handed out before. Another process
/// can still take it before the gateway binds; `TestEnv::start_gateway` retries on "address in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Mutex::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral port")
            .port();
        if handed_out.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// Tests talk to 127.0.0.1 only; a proxy from the environment must not get in the way.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("build the HTTP client")
}

fn random_master_key() -> String {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default()
}

// --- child processes ------------------------------------------------------------------------------

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    fn new(child: Child, name: impl Into<String>) -> Self {
        Self { child: Some(child), name: name.into() }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            // std has no kill(2) with a signal number and the test crate has no libc; kill(1) does it.
            let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        }
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop_blocking(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("harness: {} did not stop within {STOP_GRACE:?} of SIGTERM; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// Collects what a child writes to one of its pipes, readable at any moment (for the report of a hung
/// command) and in full once the pipe closes.
struct PipeCollector {
    bytes: std::sync::Arc<Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PipeCollector {
    fn start(pipe: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>) -> Self {
        use tokio::io::AsyncReadExt as _;
        let bytes = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = bytes.clone();
        let task = pipe.map(|mut pipe| {
            tokio::spawn(async move {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
                }
            })
        });
        Self { bytes, task }
    }

    fn snapshot(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Everything, once the pipe has closed.
    async fn finish(mut self, args: &[&str]) -> Vec<u8> {
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(STOP_GRACE, task).await.is_err() {
                panic!(
                    "`token-exchange {}` exited but its output pipe stayed open for {STOP_GRACE:?} (a process it \
                     started still holds it); output so far:\n{}",
                    args.join(" "),
                    self.snapshot()
                );
            }
        }
        std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What a process that does not finish is doing, for the failure message: its state and CPU use (spinning
/// or blocked?), each thread's state, kernel wait channel and kernel stack, its open files (the SQLite
/// database, -wal and -shm), the POSIX locks it holds or waits for (SQLite's), and a backtrace of every
/// thread from gdb when gdb is installed. Blocking (gdb gets up to 30 s): call it from a blocking thread.
pub fn diagnose_process(pid: u32) -> String {
    use std::fmt::Write as _;
    const GDB_TIMEOUT: Duration = Duration::from_secs(30);
    const MAX_GDB_OUTPUT: usize = 200_000;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let read = |path: &Path| std::fs::read_to_string(path).map(|s| s.trim_end().to_owned());
    let cpu_ticks = || -> Option<u64> {
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th of the line.
        let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let mut out = format!("===== diagnosis of pid {pid} =====\n");
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let after = cpu_ticks();
    if let (Some(before), Some(after)) = (before, after) {
        let _ =
            writeln!(out, "CPU over one second: {} clock ticks (100 = one busy core)", after.saturating_sub(before));
    }
    let _ = writeln!(out, "load average: {}", read(Path::new("/proc/loadavg")).unwrap_or_default());
    match read(&proc_dir.join("status")) {
        Ok(status) => {
            let wanted = ["Name", "State", "Threads", "VmRSS", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"];
            for line in status.lines().filter(|l| wanted.iter().any(|w| l.starts_with(&format!("{w}:")))) {
                let _ = writeln!(out, "{line}");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "(no /proc/{pid}/status: {e}; the process is gone)");
            return out;
        }
    }
    let _ = writeln!(out, "--- threads (comm, state, wchan, kernel stack) ---");
    let mut tids: Vec<u32> = std::fs::read_dir(proc_dir.join("task"))
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    tids.sort_unstable();
    for tid in tids {
        let task = proc_dir.join("task").join(tid.to_string());
        let state = read(&task.join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{tid} {} state {state} wchan {}",
            read(&task.join("comm")).unwrap_or_default(),
            read(&task.join("wchan")).unwrap_or_default()
        );
        if let Ok(stack) = read(&task.join("stack")) {
            for frame in stack.lines() {
                let _ = writeln!(out, "    {frame}");
            }
        }
    }
    let _ = writeln!(out, "--- open files ---");
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
        let mut fds: Vec<(u32, String)> = fds
            .filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                if let Ok(meta) = std::fs::metadata(e.path()) {
                    use std::os::unix::fs::MetadataExt as _;
                    if meta.is_file() {
                        inodes.insert(meta.ino().to_string());
                    }
                }
                Some((e.file_name().to_str()?.parse().ok()?, target.display().to_string()))
            })
            .collect();
        fds.sort();
        for (fd, target) in fds {
            let _ = writeln!(out, "{fd} -> {target}");
        }
    }
    // SQLite locks with fcntl: every lock on a file this process has open, whoever holds it, says who
    // blocks whom. A line `N: -> POSIX ...` is a process waiting for lock N.
    let _ = writeln!(out, "--- POSIX locks on its files (/proc/locks: kind, mode, pid, dev:inode, range) ---");
    for line in read(Path::new("/proc/locks")).unwrap_or_default().lines() {
        let fields: Vec<&str> = line.split_whitespace().filter(|f| *f != "->").collect();
        let inode = fields.get(5).and_then(|f| f.rsplit(':').next()).unwrap_or_default();
        if inodes.contains(inode) || fields.get(4) == Some(&pid.to_string().as_str()) {
            let holder = fields.get(4).copied().unwrap_or_default();
            let comm = read(&PathBuf::from(format!("/proc/{holder}/comm"))).unwrap_or_default();
            let _ = writeln!(out, "{line}    ({holder} is {comm})");
        }
    }
    let _ = writeln!(out, "--- gdb: thread apply all bt ---");
    // gdb writes to a file: a pipe that nobody reads while we wait would stall it on a long backtrace.
    let log = tempfile::NamedTempFile::new().expect("a temporary file for gdb's output");
    let gdb = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "set pagination off", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("reopen gdb's log"))
        .stderr(log.reopen().expect("reopen gdb's log"))
        .spawn();
    match gdb {
        Err(e) => {
            let _ = writeln!(out, "(gdb could not run: {e}; install gdb for user-space stacks)");
        }
        Ok(mut gdb) => {
            let deadline = Instant::now() + GDB_TIMEOUT;
            while gdb.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if gdb.try_wait().ok().flatten().is_none() {
                let _ = gdb.kill();
                let _ = gdb.wait();
                let _ = writeln!(out, "(gdb did not finish within {GDB_TIMEOUT:?}; killed it)");
            }
            let mut text = read_lossy(log.path());
            if text.len() > MAX_GDB_OUTPUT {
                let mut cut = MAX_GDB_OUTPUT;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push_str("\n(truncated)");
            }
            out.push_str(&text);
        }
    }
    out.push_str("===== end of diagnosis =====");
    out
}

/// Our children get exactly the `TOKEX_` variables we choose: the gateway rejects unknown ones, and a
/// developer's own settings must not leak into a test.
fn scrub_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TOKEX_") {
            command.env_remove(&name);
        }
    }
}

// --- mock upstream --------------------------------------------------------------------------------

/// One request as the mock upstream saw it (`GET /_mock/requests`).
#[derive(Clone, Debug, Deserialize)]
pub struct MockRequest {
    pub method: String,
    pub path: String,
    pub api_key: Option<String>,
    pub body_len: usize,
    pub body_sha256: String,
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub include_usage: Option<bool>,
    pub headers: BTreeMap<String, String>,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    process: ChildGuard,
    log_path: PathBuf,
    client: reqwest::Client,
}

impl MockUpstream {
    pub async fn start(dir: &Path) -> Self {
        let log_path = dir.join("mock-upstream.log");
        let log = File::create(&log_path).expect("create the mock log");
        let mut command = Command::new(MOCK_BIN);
        command.args(["--listen", "127.0.0.1:0"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        scrub_env(&mut command);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("spawn {MOCK_BIN}: {e}"));
        let stdout = child.stdout.take().expect("mock stdout");
        let process = ChildGuard::new(child, "mock-upstream");
        let first_line = tokio::time::timeout(
            MOCK_START_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(stdout);
                reader.read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("mock-upstream printed nothing within {MOCK_START_TIMEOUT:?}"))
        .expect("join the mock reader")
        .expect("read the mock's first line");
        let addr =
            first_line.trim().strip_prefix("LISTENING ").and_then(|addr| addr.parse().ok()).unwrap_or_else(|| {
                panic!("mock-upstream's first line is {first_line:?}; log:\n{}", read_lossy(&log_path))
            });
        Self { addr, process, log_path, client: http_client() }
    }

    /// The OpenAI base URL of the mock, as a seller would register it.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub async fn requests(&self) -> Vec<MockRequest> {
        let url = format!("http://{}/_mock/requests", self.addr);
        let response = self.client.get(url).send().await.expect("GET /_mock/requests");
        assert!(response.status().is_success(), "GET /_mock/requests: {}", response.status());
        response.json().await.expect("parse /_mock/requests")
    }

    pub async fn clear(&self) {
        let url = format!("http://{}/_mock/requests", self.addr);
        let response = self.client.delete(url).send().await.expect("DELETE /_mock/requests");
        assert!(response.status().is_success(), "DELETE /_mock/requests: {}", response.status());
    }

    /// Requests seen per seller API key.
    pub async fn counts(&self) -> BTreeMap<String, u64> {
        let url = format!("http://{}/_mock/counts", self.addr);
        let response = self.client.get(url).send().await.expect("GET /_mock/counts");
        response.json().await.expect("parse /_mock/counts")
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }
}

// --- databases ------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MariaDb,
}

fn mysql_server() -> String {
    std::env::var("TOKEX_TEST_MYSQL_URL").unwrap_or_else(|_| DEFAULT_MYSQL_SERVER.to_owned())
}

/// A database of its own for one test: a SQLite file in the test's directory, or a MariaDB database
/// `tokex_t_<pid>_<counter>_<nanos>` that is dropped again with this value.
pub struct TestDatabase {
    pub backend: Backend,
    pub url: String,
    mariadb_name: Option<String>,
}

impl TestDatabase {
    pub async fn create(backend: Backend, dir: &Path) -> Self {
        match backend {
            Backend::Sqlite => {
                let path = dir.join("token-exchange.db");
                Self { backend, url: format!("sqlite://{}", path.display()), mariadb_name: None }
            }
            Backend::MariaDb => {
                let server = mysql_server();
                let admin = Database::connect(format!("{server}/test"))
                    .await
                    .unwrap_or_else(|e| panic!("connect to MariaDB at {server}/test (is it running?): {e}"));
                drop_stale_databases(&admin).await;
                let name = format!("tokex_t_{}", unique_suffix());
                admin
                    .execute_unprepared(&format!(
                        "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("create database {name}: {e}"));
                let _ = admin.close().await;
                Self { backend, url: format!("{server}/{name}"), mariadb_name: Some(name) }
            }
        }
    }

    pub async fn connect(&self) -> DatabaseConnection {
        Database::connect(&self.url).await.unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(name) = self.mariadb_name.take() else { return };
        // Drop may run inside the test's runtime, which cannot be blocked on: use a runtime of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let admin = Database::connect(format!("{}/test", mysql_server())).await.map_err(to_io)?;
                admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS `{name}`")).await.map_err(to_io)?;
                admin.close().await.map_err(to_io)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("harness: could not drop a test database: {dropped:?}");
        }
    }
}

fn to_io(error: sea_orm::DbErr) -> std::io::Error {
    std::io::Error::other(error.to_string())
}

/// Databases left behind by test processes that were killed (their pid is gone) are dropped once per run.
async fn drop_stale_databases(admin: &DatabaseConnection) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let sql = r"SELECT SCHEMA_NAME AS name FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'tokex\_t\_%'";
    let Ok(rows) = admin.query_all(Statement::from_string(admin.get_database_backend(), sql)).await else {
        return;
    };
    for row in rows {
        let Ok(name) = row.try_get::<String>("", "name") else { continue };
        // `tokex_t_<pid>_...` (integration tests) or `tokex_t_db_<pid>_...` (unit tests): the first number.
        let pid = name
            .split('_')
            .find(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
            .unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS `{name}`")).await;
        }
    }
}

// --- usage records --------------------------------------------------------------------------------

/// One row of `usage_records`: the gateway's own entity, so the tests read exactly what it writes.
pub use token_exchange::db::entities::usage_records::Model as UsageRecord;

fn usage_record(row: &QueryResult) -> UsageRecord {
    UsageRecord::from_query_result(row, "").unwrap_or_else(|e| panic!("read a usage_records row: {e}"))
}

/// What the harness allows seller keys to reach (`security.upstream_allow`).
pub const LOOPBACK_ALLOWED: &str = "127.0.0.0/8,::1";

/// Credits granted to every buyer the harness creates.
pub const BUYER_GRANT: i64 = 1_000_000_000_000;
/// The price of models priced by the harness: 1 credit per prompt token, 2 per completion token.
pub const TEST_PROMPT_PRICE: i64 = 1_000_000;
pub const TEST_COMPLETION_PRICE: i64 = 2_000_000;

/// Prompt tokens as the mock counts them: a quarter of the upstream request body, rounded up.
pub fn mock_prompt_tokens(upstream_body_len: usize) -> i64 {
    upstream_body_len.div_ceil(4) as i64
}

// --- the test environment -------------------------------------------------------------------------

/// Options of `buyer-key issue`.
#[derive(Clone, Debug, Default)]
pub struct BuyerKeyOptions<'a> {
    pub name: Option<&'a str>,
    pub models: Option<&'a [&'a str]>,
    pub expires_at_ms: Option<i64>,
}

/// A buyer key as issued: its id and the secret `tkx-...` text.
#[derive(Clone, Debug)]
pub struct BuyerKey {
    pub id: i64,
    pub key: String,
}

/// Everything one test owns except the gateway process: a directory, a database, a mock upstream and
/// the environment shared by the CLI and `serve` (database URL, master key, data directory).
pub struct TestEnv {
    pub backend: Backend,
    pub mock: MockUpstream,
    pub db: TestDatabase,
    env: BTreeMap<String, String>,
    dir: tempfile::TempDir,
    gateways_started: AtomicU64,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::Builder::new().prefix("tokex-test-").tempdir().expect("create a temp dir");
        let db = TestDatabase::create(backend, dir.path()).await;
        let mock = MockUpstream::start(dir.path()).await;
        let log_filter = std::env::var("TOKEX_TEST_LOG").unwrap_or_else(|_| "info".to_owned());
        let env = BTreeMap::from([
            ("TOKEX_DATABASE_URL".to_owned(), db.url.clone()),
            ("TOKEX_DATA_DIR".to_owned(), dir.path().join("data").display().to_string()),
            ("TOKEX_MASTER_KEY".to_owned(), random_master_key()),
            ("TOKEX_ADMIN_PASSWORD".to_owned(), PASSWORD.to_owned()),
            ("TOKEX_LOG".to_owned(), log_filter),
            // Pingora sleeps the whole grace period on SIGTERM even when idle; tests stop gateways often.
            ("TOKEX_GATEWAY_GRACE_PERIOD_SECS".to_owned(), "1".to_owned()),
            // The mock upstreams listen on loopback, which seller keys may not reach by default.
            ("TOKEX_SECURITY_UPSTREAM_ALLOW".to_owned(), LOOPBACK_ALLOWED.to_owned()),
        ]);
        Self { backend, mock, db, env, dir, gateways_started: AtomicU64::new(0) }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sets a `TOKEX_` variable for the CLI and for gateways started after this call.
    pub fn set_env(&mut self, name: &str, value: impl Into<String>) {
        assert!(name.starts_with("TOKEX_"), "{name} is not a TOKEX_ variable");
        self.env.insert(name.to_owned(), value.into());
    }

    fn command(&self, extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(TOKEX_BIN);
        scrub_env(&mut command);
        command.current_dir(self.dir.path()).envs(&self.env).envs(extra_env.iter().copied()).stdin(Stdio::null());
        // The shipped config file is what an operator starts from; the tests validate it on every run.
        command.arg("--config").arg(repo_root().join("conf/token-exchange.toml"));
        command
    }

    /// Runs `token-exchange <args>` and returns its output whatever the exit status. A command still
    /// running after `CLI_TIMEOUT` fails the test with what it printed so far and a dump of its threads
    /// (`diagnose_process`), taken before it is killed.
    pub async fn cli_output(&self, args: &[&str], extra_env: &[(&str, &str)]) -> std::process::Output {
        let mut command = tokio::process::Command::from(self.command(extra_env));
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let started = Instant::now();
        let mut child = command.spawn().unwrap_or_else(|e| panic!("run token-exchange: {e}"));
        let stdout = PipeCollector::start(child.stdout.take());
        let stderr = PipeCollector::start(child.stderr.take());
        let status = match tokio::time::timeout(CLI_TIMEOUT, child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for token-exchange: {e}")),
            Err(_) => {
                let dump = match child.id() {
                    Some(pid) => tokio::task::spawn_blocking(move || diagnose_process(pid))
                        .await
                        .unwrap_or_else(|e| format!("(the diagnosis panicked: {e})")),
                    None => "(no pid: the process exited, but its exit was not noticed)".to_owned(),
                };
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                panic!(
                    "`token-exchange {}` took longer than {CLI_TIMEOUT:?} (killed after {:?})\n\
                     ===== its stdout so far =====\n{}\n===== its stderr so far =====\n{}\n{dump}",
                    args.join(" "),
                    started.elapsed(),
                    stdout.snapshot(),
                    stderr.snapshot()
                );
            }
        };
        // It exited; its pipes close with it unless something it started still holds them.
        let (stdout, stderr) = (stdout.finish(args).await, stderr.finish(args).await);
        std::process::Output { status, stdout, stderr }
    }

    /// Runs `token-exchange <args>`, which must succeed and print one JSON line on stdout.
    pub async fn cli(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Value {
        let output = self.cli_output(args, extra_env).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "`token-exchange {}` failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            args.join(" "),
            output.status
        );
        stdout
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<Value>(line.trim()).ok().filter(Value::is_object))
            .unwrap_or_else(|| {
                panic!(
                    "`token-exchange {}` printed no JSON object\nstdout:\n{stdout}\nstderr:\n{stderr}",
                    args.join(" ")
                )
            })
    }

    /// `user create`; the password is always `PASSWORD`. Returns the user id. A buyer is granted
    /// `BUYER_GRANT` credits, so that tests of other things never run out.
    pub async fn create_user(&self, username: &str, roles: &[&str]) -> i64 {
        let id = self.create_user_without_credits(username, roles).await;
        if roles.contains(&"buyer") {
            self.grant(username, BUYER_GRANT).await;
        }
        id
    }

    pub async fn create_user_without_credits(&self, username: &str, roles: &[&str]) -> i64 {
        let roles = roles.join(",");
        let user =
            self.cli(&["user", "create", "--username", username, "--password", PASSWORD, "--roles", &roles], &[]).await;
        assert_eq!(user["username"], username, "user create printed {user}");
        user["id"].as_i64().unwrap_or_else(|| panic!("user create printed no id: {user}"))
    }

    /// `token-exchange migrate`: creates the schema in a process of its own. Tests whose first command is an
    /// upsert (`price set`) call it first: on a fresh SQLite database the first `ON CONFLICT` upsert in the
    /// process that ran the migrations sometimes fails ("ON CONFLICT clause does not match any PRIMARY KEY or
    /// UNIQUE constraint"; see `ledger_e2e::the_first_price_set_on_a_fresh_database_succeeds`).
    pub async fn migrate(&self) {
        let out = self.cli(&["migrate"], &[]).await;
        assert_eq!(out["migrated"], true, "migrate printed {out}");
    }

    /// `credits grant`; returns the wallet balance after.
    pub async fn grant(&self, username: &str, amount: i64) -> i64 {
        let amount = amount.to_string();
        let out = self.cli(&["credits", "grant", "--username", username, "--amount", &amount], &[]).await;
        out["balance"].as_i64().unwrap_or_else(|| panic!("credits grant printed {out}"))
    }

    /// `price set` (credits per million tokens).
    pub async fn set_price(&self, model: &str, prompt_per_million: i64, completion_per_million: i64) {
        let (p, c) = (prompt_per_million.to_string(), completion_per_million.to_string());
        self.cli(&["price", "set", "--model", model, "--prompt", &p, "--completion", &c], &[]).await;
    }

    /// Runs `token-exchange ledger check` and returns (exit code, printed JSON).
    pub async fn ledger_check(&self) -> (i32, Value) {
        self.ledger_check_with(&[]).await
    }

    /// `ledger check` with extra `TOKEX_` variables (e.g. the gateway's `TOKEX_LEDGER_HOLD_STALE_MS`, which
    /// the check uses to find stale holds).
    pub async fn ledger_check_with(&self, extra_env: &[(&str, &str)]) -> (i32, Value) {
        let out = self.cli_output(&["ledger", "check"], extra_env).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
            panic!("ledger check printed {text:?}; stderr {}", String::from_utf8_lossy(&out.stderr))
        });
        (out.status.code().unwrap_or(-1), value)
    }

    /// `seller-key add` for the mock upstream (the API key goes through the environment, as an operator
    /// would pass it). Returns the hosted key id.
    pub async fn add_seller_key(&self, owner: &str, api_key: &str, models: &[&str], declared_balance: i64) -> i64 {
        let base_url = self.mock.base_url();
        self.add_seller_key_at(owner, &base_url, api_key, models, declared_balance).await
    }

    pub async fn add_seller_key_at(
        &self,
        owner: &str,
        base_url: &str,
        api_key: &str,
        models: &[&str],
        declared_balance: i64,
    ) -> i64 {
        // Every model a test key serves gets the test price unless a test priced it already.
        for model in models {
            let listed = self.cli_output(&["price", "list"], &[]).await;
            let priced: Value = serde_json::from_slice(&listed.stdout).unwrap_or(Value::Null);
            let known = priced.as_array().is_some_and(|list| list.iter().any(|p| p["model"] == *model));
            if !known {
                self.set_price(model, TEST_PROMPT_PRICE, TEST_COMPLETION_PRICE).await;
            }
        }
        let models = models.join(",");
        let balance = declared_balance.to_string();
        let mut args = vec![
            "seller-key",
            "add",
            "--username",
            owner,
            "--provider",
            "openai",
            "--base-url",
            base_url,
            "--models",
            &models,
            "--declared-balance",
            &balance,
        ];
        // Only the shared mock lists models; a test's own upstream (a dead port, a TLS relay, a capture or
        // overrun server) is deposited the way an operator deposits a provider without a models endpoint.
        if base_url != self.mock.base_url() {
            args.push("--skip-verify");
        }
        let key = self.cli(&args, &[("TOKEX_SELLER_API_KEY", api_key)]).await;
        let hint = key["key_hint"].as_str().unwrap_or_default();
        assert!(!hint.is_empty() && !hint.contains(api_key), "seller-key add printed {key}");
        key["id"].as_i64().unwrap_or_else(|| panic!("seller-key add printed no id: {key}"))
    }

    pub async fn issue_buyer_key(&self, username: &str, options: BuyerKeyOptions<'_>) -> BuyerKey {
        let mut args = vec!["buyer-key".to_owned(), "issue".to_owned(), "--username".to_owned(), username.to_owned()];
        if let Some(name) = options.name {
            args.extend(["--name".to_owned(), name.to_owned()]);
        }
        if let Some(models) = options.models {
            args.extend(["--models".to_owned(), models.join(",")]);
        }
        if let Some(expires_at_ms) = options.expires_at_ms {
            args.extend(["--expires-at-ms".to_owned(), expires_at_ms.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let issued = self.cli(&args, &[]).await;
        let key = issued["key"].as_str().unwrap_or_default().to_owned();
        assert!(key.starts_with("tkx-"), "buyer-key issue printed {issued}");
        BuyerKey { id: issued["id"].as_i64().unwrap_or_else(|| panic!("no id in {issued}")), key }
    }

    /// The common set-up: a seller, a buyer, and an unrestricted key for the buyer.
    pub async fn seller_and_buyer(&self) -> BuyerKey {
        self.create_user("seller", &["seller"]).await;
        self.create_user("buyer", &["buyer"]).await;
        self.issue_buyer_key("buyer", BuyerKeyOptions::default()).await
    }

    /// Starts `token-exchange serve` on free ports and waits for `/healthz`.
    pub async fn start_gateway(&self) -> Gateway {
        self.start_gateway_with(&[]).await
    }

    pub async fn start_gateway_with(&self, extra_env: &[(&str, &str)]) -> Gateway {
        self.start_gateway_ready(extra_env, Readiness::HealthzAndGatewayPort).await
    }

    pub async fn start_gateway_ready(&self, extra_env: &[(&str, &str)], readiness: Readiness) -> Gateway {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let number = self.gateways_started.fetch_add(1, Ordering::Relaxed);
            let log_path = self.dir.path().join(format!("gateway-{number}.log"));
            match self.try_start_gateway(extra_env, &log_path, readiness).await {
                Ok(gateway) => return gateway,
                Err(log) if attempt < ATTEMPTS && log.to_ascii_lowercase().contains("address already in use") => {
                    eprintln!("harness: a gateway port was taken meanwhile; starting again on new ports");
                }
                Err(log) => panic!("token-exchange serve did not become ready; its log:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    async fn try_start_gateway(
        &self,
        extra_env: &[(&str, &str)],
        log_path: &Path,
        readiness: Readiness,
    ) -> Result<Gateway, String> {
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let (gateway_addr, admin_addr, metrics_addr) = (addr(free_port()), addr(free_port()), addr(free_port()));
        let log = File::create(log_path).expect("create the gateway log");
        let mut command = self.command(extra_env);
        command
            .env("TOKEX_GATEWAY_LISTEN", gateway_addr.to_string())
            .env("TOKEX_ADMIN_LISTEN", admin_addr.to_string())
            .env("TOKEX_METRICS_LISTEN", metrics_addr.to_string())
            .arg("serve")
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        let child = command.spawn().unwrap_or_else(|e| panic!("spawn {TOKEX_BIN}: {e}"));
        let mut gateway = Gateway {
            process: ChildGuard::new(child, "token-exchange serve"),
            gateway_addr,
            admin_addr,
            metrics_addr,
            log_path: log_path.to_owned(),
            client: http_client(),
            mock_log: self.dir.path().join("mock-upstream.log"),
        };
        let health = format!("http://{admin_addr}/healthz");
        let deadline = Instant::now() + GATEWAY_START_TIMEOUT;
        loop {
            if let Some(status) = gateway.process.try_wait() {
                let log = gateway.log();
                gateway.process.child = None;
                return Err(format!("(exited with {status})\n{log}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("(not ready within {GATEWAY_START_TIMEOUT:?})\n{}", gateway.log()));
            }
            if let Ok(response) = gateway.client.get(&health).timeout(Duration::from_secs(2)).send().await {
                let gateway_port_open = match readiness {
                    Readiness::Healthz => true,
                    Readiness::HealthzAndGatewayPort => {
                        tokio::net::TcpStream::connect(gateway.gateway_addr).await.is_ok()
                    }
                };
                if response.status() == StatusCode::OK && gateway_port_open {
                    return Ok(gateway);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn connect_db(&self) -> DatabaseConnection {
        self.db.connect().await
    }

    /// All usage records, oldest first.
    pub async fn usage_records(&self) -> Vec<UsageRecord> {
        let db = self.db.connect().await;
        let sql = "SELECT * FROM usage_records ORDER BY id";
        let rows = db
            .query_all(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap_or_else(|e| panic!("query usage_records: {e}"));
        let _ = db.close().await;
        rows.iter().map(usage_record).collect()
    }

    /// Polls until at least `n` usage records exist (they are written in batches shortly after the
    /// request), then returns all of them. Fails after `USAGE_WAIT`.
    pub async fn wait_usage_records(&self, n: usize) -> Vec<UsageRecord> {
        let deadline = Instant::now() + USAGE_WAIT;
        loop {
            let records = self.usage_records_if_table().await;
            if records.len() >= n {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "expected at least {n} usage records within {USAGE_WAIT:?}, found {}: {records:#?}",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for exactly `n` records: at least `n`, and no more after a further moment.
    pub async fn wait_exact_usage_records(&self, n: usize) -> Vec<UsageRecord> {
        self.wait_usage_records(n).await;
        // A later batch would land within a couple of flush intervals.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let records = self.usage_records().await;
        assert_eq!(records.len(), n, "expected exactly {n} usage records, found: {records:#?}");
        records
    }

    async fn usage_records_if_table(&self) -> Vec<UsageRecord> {
        let db = self.db.connect().await;
        let sql = "SELECT * FROM usage_records ORDER BY id";
        let rows = db.query_all(Statement::from_string(db.get_database_backend(), sql)).await;
        let _ = db.close().await;
        match rows {
            Ok(rows) => rows.iter().map(usage_record).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Runs one SQL statement against the test database (for set-ups the API does not offer).
    pub async fn execute_sql(&self, sql: &str) {
        let db = self.db.connect().await;
        db.execute_unprepared(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = db.close().await;
    }
}

/// When `start_gateway` considers the gateway started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The contract: `GET /healthz` on the admin port answers 200.
    Healthz,
    /// `/healthz` and a TCP connect to the gateway port. The default, so that tests of other things do
    /// not depend on the readiness contract, which `gateway_lifecycle` tests on its own.
    HealthzAndGatewayPort,
}

// --- the gateway process --------------------------------------------------------------------------

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response ({}) is not JSON: {e}\n{}", self.status, self.text()))
    }

    /// Asserts OpenAI's error shape `{"error":{"message","type","param","code"}}` with `status`, and
    /// returns the error object.
    pub fn assert_openai_error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "expected {status}, got {}: {}", self.status, self.text());
        let body = self.json();
        let error = body.get("error").unwrap_or_else(|| panic!("no `error` object in {body}")).clone();
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "error.message missing: {body}");
        assert!(error["type"].as_str().is_some_and(|t| !t.is_empty()), "error.type missing: {body}");
        assert!(error.get("param").is_some(), "error.param missing (null is fine): {body}");
        assert!(error.get("code").is_some(), "error.code missing (null is fine): {body}");
        error
    }
}

pub struct Gateway {
    pub process: ChildGuard,
    pub gateway_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    log_path: PathBuf,
    mock_log: PathBuf,
    pub client: reqwest::Client,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway_addr)
    }

    /// The base URL an OpenAI SDK is given.
    pub fn openai_base_url(&self) -> String {
        self.url("/v1")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// A POST to the gateway port with a raw body; `key` becomes `Authorization: Bearer <key>`.
    pub async fn post_raw(&self, path: &str, key: Option<&str>, body: impl Into<reqwest::Body>) -> Reply {
        let mut request = self.client.post(self.url(path)).header("content-type", "application/json").body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        read_reply(request.send().await.unwrap_or_else(|e| panic!("POST {path}: {e}"))).await
    }

    pub async fn post_json(&self, path: &str, key: Option<&str>, body: &Value) -> Reply {
        self.post_raw(path, key, serde_json::to_vec(body).expect("serialize")).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        let mut request = self.client.get(self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        read_reply(request.send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"))).await
    }

    /// `POST /v1/chat/completions` for the model with `max_tokens` content tokens.
    pub async fn chat(&self, key: &str, model: &str, max_tokens: u32, stream: bool) -> Reply {
        self.post_json("/v1/chat/completions", Some(key), &chat_body(model, max_tokens, stream)).await
    }

    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.metrics_url()).send().await.expect("GET /metrics");
        assert_eq!(response.status(), StatusCode::OK, "GET /metrics");
        response.text().await.expect("read /metrics")
    }

    /// Logs in on the admin port and returns the session token.
    pub async fn login(&self, username: &str) -> String {
        let response = self
            .client
            .post(self.admin_url("/api/v1/auth/login"))
            .json(&json!({ "username": username, "password": PASSWORD }))
            .send()
            .await
            .expect("POST /api/v1/auth/login");
        let reply = read_reply(response).await;
        assert_eq!(reply.status, StatusCode::OK, "login as {username}: {}", reply.text());
        reply.json()["token"].as_str().unwrap_or_else(|| panic!("no token in {}", reply.text())).to_owned()
    }

    /// A request to the admin REST API with a session token.
    pub async fn admin(&self, method: reqwest::Method, path: &str, token: &str, body: Option<&Value>) -> Reply {
        let mut request = self.client.request(method, self.admin_url(path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        read_reply(request.send().await.unwrap_or_else(|e| panic!("{path}: {e}"))).await
    }

    pub fn sigterm(&self) {
        self.process.signal("TERM");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Stop first, so the log is complete when it is printed.
        self.process.stop_blocking();
        if std::thread::panicking() {
            eprintln!("===== token-exchange serve log ({}) =====\n{}", self.log_path.display(), self.log());
            eprintln!("===== mock-upstream log =====\n{}", read_lossy(&self.mock_log));
            eprintln!("===== end of logs =====");
        }
    }
}

pub async fn read_reply(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap_or_else(|e| panic!("read a {status} response body: {e}"));
    Reply { status, headers, body }
}

pub fn chat_body(model: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": "Say hello." }],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// The `data:` payloads of an SSE body, without `[DONE]`, parsed as JSON.
pub fn sse_events(body: &str) -> Vec<Value> {
    let normalized = body.replace("\r\n", "\n");
    normalized
        .split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> =
                event.lines().filter_map(|line| line.strip_prefix("data:")).map(str::trim_start).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .filter(|data| data != "[DONE]")
        .map(|data| serde_json::from_str(&data).unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data}")))
        .collect()
}

/// The concatenated `delta.content` of SSE chat chunks.
pub fn sse_content(events: &[Value]) -> String {
    events.iter().filter_map(|event| event.pointer("/choices/0/delta/content").and_then(Value::as_str)).collect()
}

/// What the mock answers for `n` completion tokens.
pub fn mock_content(n: u32) -> String {
    (0..n).map(|i| format!("tok{i} ")).collect()
}

// --- the OpenAI Python SDK ------------------------------------------------------------------------

/// The venv's Python with the `openai` package. Missing is a failure, never a skip: the SDK tests are
/// the proof that real clients work.
pub fn python() -> PathBuf {
    let path = std::env::var_os("TOKEX_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "{} does not exist: the OpenAI SDK tests need the project venv. Run `make test` (or `scripts/setup.sh`) \
         once, or point TOKEX_TEST_PYTHON at a Python with the `openai` package.",
        path.display()
    );
    path
}

/// Output of one `tests/python/sdk_client.py` run.
#[derive(Debug)]
pub struct SdkRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl SdkRun {
    /// The JSON result of a successful run.
    pub fn json(&self) -> Value {
        assert!(
            self.status.success(),
            "the Python SDK client failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!("the Python SDK client printed no JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }
}

/// Runs the SDK client against the gateway with `key`; `args` are the mode and its options.
pub async fn run_sdk(gateway: &Gateway, key: &str, args: &[&str]) -> SdkRun {
    run_python_client(gateway, "sdk_client.py", key, args).await
}

/// Runs `tests/python/<script>` (an SDK client taking `--base-url` and `--api-key`) against the gateway.
pub async fn run_python_client(gateway: &Gateway, script: &str, key: &str, args: &[&str]) -> SdkRun {
    let script = repo_root().join("tests/python").join(script);
    let mut command = tokio::process::Command::new(python());
    command
        .arg(&script)
        .args(["--base-url", &gateway.openai_base_url(), "--api-key", key])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for var in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        command.env_remove(var);
    }
    command.env("NO_PROXY", "127.0.0.1,localhost").env("PYTHONDONTWRITEBYTECODE", "1");
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish within 90 s", script.display()))
        .unwrap_or_else(|e| panic!("run {}: {e}", python().display()));
    SdkRun {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

// --- the ledger -----------------------------------------------------------------------------------

pub use token_exchange::db::entities::{accounts, escrows, holds, journal_entries, postings, settlements};

/// `ledger.platform_fee_bps` as the tests run it (the default).
pub const PLATFORM_FEE_BPS: i64 = 500;
/// How long tests wait for the gateway to close its holds (idle or stale).
pub const HOLD_CLOSE_WAIT: Duration = Duration::from_secs(20);

/// docs/ledger.md: cost = ⌈(prompt × prompt rate + completion × completion rate) / 1,000,000⌉ credits.
pub fn expected_cost(
    prompt_tokens: i64,
    completion_tokens: i64,
    prompt_per_million: i64,
    completion_per_million: i64,
) -> i64 {
    let micro = i128::from(prompt_tokens) * i128::from(prompt_per_million)
        + i128::from(completion_tokens) * i128::from(completion_per_million);
    i64::try_from((micro + 999_999) / 1_000_000).expect("a cost fits in i64")
}

/// docs/ledger.md: the seller gets ⌊cost × (10,000 − fee) / 10,000⌋, the platform the rest.
pub fn expected_seller_share(cost: i64) -> i64 {
    cost * (10_000 - PLATFORM_FEE_BPS) / 10_000
}

/// The worst case a request reserves: cost(body bytes, completion bound).
pub fn worst_case(body_bytes: usize, max_tokens: i64, prompt_per_million: i64, completion_per_million: i64) -> i64 {
    expected_cost(body_bytes as i64, max_tokens, prompt_per_million, completion_per_million).max(1)
}

/// Did this request deliver something billable? (docs/ledger.md: an upstream error, a failure before the
/// first byte, a response broken off before the first completion token cost nothing.)
pub fn is_billable(record: &UsageRecord) -> bool {
    let delivered_nothing =
        record.error_kind.as_deref() == Some("upstream_interrupted") && record.completion_tokens == 0;
    record.hosted_key_id.is_some() && (200..300).contains(&record.status_code) && !delivered_nothing
}

/// Asserts every record's `cost_credits` is the price formula applied to its own tokens (0 when it
/// delivered nothing), and that nothing is unpaid. `price` gives (prompt, completion) per million for a model.
pub fn assert_record_costs(records: &[UsageRecord], price: impl Fn(&str) -> (i64, i64)) {
    for record in records {
        let want = if is_billable(record) {
            let (p, c) = price(&record.model);
            expected_cost(record.prompt_tokens, record.completion_tokens, p, c)
        } else {
            0
        };
        assert_eq!(record.cost_credits, want, "cost of {record:#?}");
        assert_eq!(record.unpaid_credits, 0, "nothing may be unpaid: {record:#?}");
    }
}

/// Who is paid for what a key serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Earner {
    Seller(i64),
    /// A platform key (`hosted_keys.pool = 'platform'`): the platform keeps the whole cost.
    Platform,
}

/// What the books must say after `records`, by the rules of docs/ledger.md.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExpectedBooks {
    /// Paid per buyer (cost − unpaid).
    pub paid: BTreeMap<i64, i64>,
    /// Earned per seller.
    pub earned: BTreeMap<i64, i64>,
    pub revenue: i64,
}

pub fn expected_books(records: &[UsageRecord], earner: impl Fn(i64) -> Earner) -> ExpectedBooks {
    let mut books = ExpectedBooks::default();
    for record in records.iter().filter(|r| r.cost_credits > 0) {
        let paid = record.cost_credits - record.unpaid_credits;
        *books.paid.entry(record.buyer_id).or_default() += paid;
        let key = record.hosted_key_id.unwrap_or_else(|| panic!("a billed record without a key: {record:#?}"));
        match earner(key) {
            Earner::Platform => books.revenue += paid,
            Earner::Seller(seller) => {
                let share = expected_seller_share(paid);
                *books.earned.entry(seller).or_default() += share;
                books.revenue += paid - share;
            }
        }
    }
    books
}

/// Every ledger table, read one after the other (take it while the gateway is quiet).
#[derive(Debug)]
pub struct LedgerSnapshot {
    pub accounts: Vec<accounts::Model>,
    pub entries: Vec<journal_entries::Model>,
    pub postings: Vec<postings::Model>,
    pub holds: Vec<holds::Model>,
    pub escrows: Vec<escrows::Model>,
    pub settlements: Vec<settlements::Model>,
}

impl LedgerSnapshot {
    fn sum(&self, kind: &str, owner: Option<i64>) -> i64 {
        self.accounts
            .iter()
            .filter(|a| a.kind == kind && owner.is_none_or(|o| a.owner_id == o))
            .map(|a| a.balance)
            .sum()
    }

    pub fn wallet(&self, user_id: i64) -> i64 {
        self.sum("wallet", Some(user_id))
    }

    /// What the buyer's escrow accounts hold (active or not).
    pub fn escrowed(&self, buyer_id: i64) -> i64 {
        self.sum("escrow", Some(buyer_id))
    }

    /// What the buyer's hold accounts hold (open or not: closed ones must be empty).
    pub fn held(&self, buyer_id: i64) -> i64 {
        self.sum("hold", Some(buyer_id))
    }

    /// Wallet + escrows + holds: everything the buyer still owns.
    pub fn buyer_funds(&self, buyer_id: i64) -> i64 {
        self.wallet(buyer_id) + self.escrowed(buyer_id) + self.held(buyer_id)
    }

    pub fn revenue(&self) -> i64 {
        self.sum("revenue", None)
    }

    pub fn external(&self) -> i64 {
        self.sum("external", None)
    }

    /// Σ of all balances: 0 in a sound ledger.
    pub fn total(&self) -> i64 {
        self.accounts.iter().map(|a| a.balance).sum()
    }

    pub fn open_holds(&self) -> Vec<&holds::Model> {
        self.holds.iter().filter(|h| h.status == "open").collect()
    }

    pub fn entries_of_kind(&self, kind: &str) -> Vec<&journal_entries::Model> {
        self.entries.iter().filter(|e| e.kind == kind).collect()
    }

    /// The settlements per request id (one each: the request id is the table's key). Asserts first that
    /// each `settle` entry debits what its settlements paid (an entry settles a usage writer's batch).
    pub fn settlements(&self) -> BTreeMap<String, Vec<&settlements::Model>> {
        let mut paid_in: BTreeMap<i64, i64> = BTreeMap::new();
        for s in &self.settlements {
            *paid_in.entry(s.entry_id).or_default() += s.paid;
        }
        for entry in self.entries_of_kind("settle") {
            let paid = paid_in.remove(&entry.id).unwrap_or(0);
            assert_eq!(self.debits_of(entry.id), paid, "settle entry {entry:?} against its settlements");
        }
        assert!(paid_in.is_empty(), "settlements of entries that are not settle entries: {paid_in:?}");
        let mut by_request: BTreeMap<String, Vec<&settlements::Model>> = BTreeMap::new();
        for s in &self.settlements {
            by_request.entry(s.request_id.clone()).or_default().push(s);
        }
        by_request
    }

    pub fn postings_of(&self, entry_id: i64) -> Vec<&postings::Model> {
        self.postings.iter().filter(|p| p.entry_id == entry_id).collect()
    }

    /// What the buyer paid in an entry: minus the sum of its debits.
    pub fn debits_of(&self, entry_id: i64) -> i64 {
        -self.postings_of(entry_id).iter().filter(|p| p.amount < 0).map(|p| p.amount).sum::<i64>()
    }

    /// Σ of the grants (what entered the system).
    pub fn granted(&self) -> i64 {
        self.entries_of_kind("grant")
            .iter()
            .map(|e| self.postings_of(e.id).iter().filter(|p| p.amount > 0).map(|p| p.amount).sum::<i64>())
            .sum()
    }

    /// Asserts the books: each buyer owns what was granted minus what they paid, each seller and the
    /// platform earned what `expected` says, nothing is negative but the external account, which is −Σ
    /// grants, and all balances sum to 0. `grants` is (buyer id, credits granted).
    pub fn assert_books(&self, grants: &[(i64, i64)], expected: &ExpectedBooks) {
        for &(buyer, granted) in grants {
            let paid = expected.paid.get(&buyer).copied().unwrap_or(0);
            assert_eq!(
                self.buyer_funds(buyer),
                granted - paid,
                "buyer {buyer}: wallet {} + escrows {} + holds {} must be granted {granted} − paid {paid}",
                self.wallet(buyer),
                self.escrowed(buyer),
                self.held(buyer)
            );
        }
        for (&seller, &earned) in &expected.earned {
            assert_eq!(self.wallet(seller), earned, "seller {seller}'s wallet");
        }
        assert_eq!(self.revenue(), expected.revenue, "platform revenue");
        let negative: Vec<_> = self.accounts.iter().filter(|a| a.balance < 0 && a.kind != "external").collect();
        assert!(negative.is_empty(), "negative balances: {negative:#?}");
        assert_eq!(self.external(), -self.granted(), "the external account is minus the grants");
        assert_eq!(self.total(), 0, "all balances sum to zero: {:#?}", self.accounts);
    }
}

impl TestEnv {
    /// The ledger tables read in one transaction: a consistent picture even while a gateway writes (InnoDB's
    /// REPEATABLE READ snapshot; SQLite's read transaction).
    pub async fn ledger_snapshot(&self) -> LedgerSnapshot {
        use sea_orm::{EntityTrait, QueryOrder, TransactionTrait};
        let db = self.db.connect().await;
        let txn = db.begin().await.expect("begin a read transaction");
        let snapshot = LedgerSnapshot {
            accounts: accounts::Entity::find()
                .order_by_asc(accounts::Column::Id)
                .all(&txn)
                .await
                .expect("read accounts"),
            entries: journal_entries::Entity::find()
                .order_by_asc(journal_entries::Column::Id)
                .all(&txn)
                .await
                .expect("read journal_entries"),
            postings: postings::Entity::find()
                .order_by_asc(postings::Column::Id)
                .all(&txn)
                .await
                .expect("read postings"),
            holds: holds::Entity::find().order_by_asc(holds::Column::Id).all(&txn).await.expect("read holds"),
            escrows: escrows::Entity::find().order_by_asc(escrows::Column::Id).all(&txn).await.expect("read escrows"),
            settlements: settlements::Entity::find()
                .order_by_asc(settlements::Column::RequestId)
                .all(&txn)
                .await
                .expect("read settlements"),
        };
        let _ = txn.rollback().await;
        let _ = db.close().await;
        snapshot
    }

    /// Polls until no hold is open (run gateways with a short `TOKEX_LEDGER_HOLD_IDLE_MS`), then returns the
    /// ledger as it is then.
    pub async fn wait_holds_closed(&self) -> LedgerSnapshot {
        let deadline = Instant::now() + HOLD_CLOSE_WAIT;
        loop {
            let snapshot = self.ledger_snapshot().await;
            if snapshot.open_holds().is_empty() {
                return snapshot;
            }
            assert!(
                Instant::now() < deadline,
                "holds still open after {HOLD_CLOSE_WAIT:?}: {:#?}",
                snapshot.open_holds()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `ledger check` must pass.
    pub async fn assert_ledger_ok(&self, extra_env: &[(&str, &str)]) {
        let (code, report) = self.ledger_check_with(extra_env).await;
        assert_eq!((code, &report["ok"]), (0, &Value::Bool(true)), "ledger check: {report:#}");
        assert_eq!(report["violations"], json!([]), "ledger check: {report:#}");
    }
}

// --- an upstream that ignores max_tokens ----------------------------------------------------------

/// A provider that ignores `max_tokens`: every chat completion (non-stream) reports `completion_tokens`
/// completion tokens and the mock's prompt count (a quarter of the body), whatever the request asked for.
/// The shared mock honours the limit, so the overrun cases of docs/ledger.md need this one.
pub struct OverrunUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl OverrunUpstream {
    pub async fn start(completion_tokens: u64) -> Self {
        use axum::routing::post;
        let handler = move |body: bytes::Bytes| async move {
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let prompt_tokens = body.len().div_ceil(4) as u64;
            let content: String = (0..completion_tokens.min(64)).map(|i| format!("tok{i} ")).collect();
            axum::Json(json!({
                "id": "chatcmpl-overrun",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": request["model"],
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "length",
                }],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }))
        };
        let app = axum::Router::new().route("/v1/chat/completions", post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the overrun upstream");
        let addr = listener.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for OverrunUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
