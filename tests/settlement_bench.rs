//! Settlement throughput (issue 6): how many usage records per second the usage writer settles on MariaDB
//! and on SQLite. Seeds a realistic set (1,000 buyers with a wallet and an open hold each, 100 sellers with
//! 1,000 hosted keys over 20 models), queues `TOKEX_BENCH_RECORDS` (default 50,000) finished requests into
//! the real writer (`usage::channel` and `UsageWriter::run`, as the gateway wires them) at once, and times
//! how long it takes to write them all: the writer's maximum rate, every batch full. The time per batch by
//! phase comes from `tokex_usage_batch_seconds`. Afterwards the ledger must pass `ledger::check` and the
//! rollups must count every request once. Run by `bench/settlement/run.sh`; `#[ignore]`d, no timing
//! assertions.

// A benchmark fails on bad setup the way a test does.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestDatabase};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement};
use token_exchange::billing::Charge;
use token_exchange::config::UsageConfig;
use token_exchange::db::hosted_keys::{self, NewHostedKey};
use token_exchange::db::ledger::{self, HoldSource};
use token_exchange::metrics::METRICS;
use token_exchange::usage::{self, UsageRecord};

const BUYERS: usize = 1_000;
/// User ids: buyers from 1, sellers from here (the ledger and the rollups need no `users` rows).
const FIRST_SELLER: i64 = 100_000;
const SELLERS: usize = 100;
const KEYS_PER_SELLER: usize = 10;
const MODELS: usize = 20;
const FEE_BPS: u32 = 500;
/// The phases of a batch, as the writer labels them in `tokex_usage_batch_seconds`.
const PHASES: [&str; 7] = ["prepare", "ledger", "usage_rows", "credits", "key_outcomes", "rollups", "commit"];

struct World {
    /// Per buyer: (buyer id, its hold's id, the hold's account, the wallet the hold draws from).
    buyers: Vec<(i64, i64, i64, i64)>,
    /// Per model: the hosted keys serving it, with their owners.
    keys_by_model: Vec<Vec<(i64, i64)>>,
}

async fn seed(db: &DatabaseConnection) -> World {
    let now = token_exchange::now_ms();
    let mut buyers = Vec::with_capacity(BUYERS);
    for buyer in 1..=BUYERS as i64 {
        ledger::grant(db, buyer, 1_000_000_000, None, &format!("bench-{buyer}"), None, now).await.unwrap();
        let wallet = ledger::wallet_account(db, buyer, now).await.unwrap();
        let source = HoldSource { buyer_id: buyer, account_id: wallet, escrow_id: None };
        let hold = ledger::open_hold(db, source, "bench", 1, 100_000_000, now).await.unwrap().unwrap();
        buyers.push((buyer, hold.id, hold.account_id, wallet));
    }
    let mut keys_by_model = vec![Vec::new(); MODELS];
    for k in 0..SELLERS * KEYS_PER_SELLER {
        let owner = FIRST_SELLER + (k / KEYS_PER_SELLER) as i64;
        let new = NewHostedKey {
            uid: format!("bench-{k}"),
            owner_id: owner,
            name: format!("hosted-{k}"),
            provider: "openai".into(),
            base_url: "https://api.openai.com/v1".into(),
            models: model(k % MODELS),
            api_key_enc: "v1.x.y".into(),
            key_hint: "sk-...abcd".into(),
            status: "active".into(),
            declared_balance: 1_000_000_000_000,
            now_ms: now,
            pool: "seller".into(),
            priority: 0,
            max_concurrency: 0,
            max_spend_per_day: 0,
            balance_api: String::new(),
            verified_at_ms: Some(now),
        };
        keys_by_model[k % MODELS].push((hosted_keys::insert(db, new).await.unwrap().id, owner));
    }
    World { buyers, keys_by_model }
}

fn model(m: usize) -> String {
    format!("model-{m:02}")
}

/// `n` finished requests spread evenly over buyers, models and keys: 95 % served on the first attempt,
/// 3 % after a failover to a second key, 2 % failed upstream (nothing to pay).
fn records(world: &World, n: usize, run: &str) -> Vec<UsageRecord> {
    let mut rng = StdRng::seed_from_u64(6);
    let now = token_exchange::now_ms();
    (0..n)
        .map(|i| {
            let (buyer, hold_id, hold_account_id, wallet) = world.buyers[rng.gen_range(0..BUYERS)];
            let m = rng.gen_range(0..MODELS);
            let keys = &world.keys_by_model[m];
            let (key, owner) = keys[rng.gen_range(0..keys.len())];
            let roll = rng.gen_range(0..100);
            let mut attempts = vec![(key, roll < 98)];
            if (95..98).contains(&roll) {
                let (first, _) = keys[rng.gen_range(0..keys.len())];
                attempts = vec![(first, false), (key, true)];
            }
            let failed = roll >= 98;
            let (prompt, completion) = (rng.gen_range(10..4_000u64), rng.gen_range(1..1_000u64));
            UsageRecord {
                request_id: format!("{run}-{i}"),
                buyer_id: buyer,
                buyer_key_id: buyer,
                hosted_key_id: (!failed).then_some(key),
                model: model(m),
                endpoint: "chat.completions",
                prompt_tokens: prompt,
                completion_tokens: if failed { 0 } else { completion },
                estimated: false,
                status_code: if failed { 502 } else { 200 },
                attempts: attempts.len() as u32,
                latency_ms: rng.gen_range(50..5_000),
                ttft_ms: (!failed).then(|| rng.gen_range(20..500)),
                request_bytes: prompt * 4,
                response_bytes: completion * 4,
                client_disconnected: false,
                error_kind: failed.then_some("upstream"),
                created_at_ms: now - rng.gen_range(0..1_000),
                key_attempts: attempts,
                charge: (!failed).then(|| Charge {
                    hold_id,
                    hold_account_id,
                    source_account_id: wallet,
                    cost: i64::try_from(prompt + 3 * completion).unwrap(),
                    seller_id: Some(owner),
                    excess: 0,
                }),
                fallback: false,
            }
        })
        .collect()
}

/// (sum of seconds, observations) per phase so far.
fn phase_totals() -> Vec<(f64, u64)> {
    PHASES
        .iter()
        .map(|p| {
            let h = METRICS.usage_batch_seconds.with_label_values(&[p]);
            (h.get_sample_sum(), h.get_sample_count())
        })
        .collect()
}

#[derive(Debug, FromQueryResult)]
struct N {
    n: i64,
}

async fn scalar(db: &DatabaseConnection, sql: &str) -> i64 {
    let sql = match db.get_database_backend() {
        sea_orm::DbBackend::MySql => format!("SELECT CAST(({sql}) AS SIGNED) AS n"),
        _ => format!("SELECT ({sql}) AS n"),
    };
    N::find_by_statement(Statement::from_string(db.get_database_backend(), sql)).one(db).await.unwrap().unwrap().n
}

/// Runs the benchmark on one database and returns its line of the report (markdown).
async fn run(db: &DatabaseConnection, label: &str, n: usize, conf: &UsageConfig) -> String {
    let started = Instant::now();
    let world = seed(db).await;
    eprintln!("{label}: seeded in {:.1}s", started.elapsed().as_secs_f64());
    let records = records(&world, n, "bench");
    let paid: i64 = records.iter().filter_map(|r| r.charge.as_ref()).map(|c| c.cost).sum();

    let (sink, writers) = usage::channel(
        db.clone(),
        conf.queue_capacity.max(n),
        conf.batch_size,
        Duration::from_millis(conf.flush_interval_ms),
        FEE_BPS,
        conf.writers,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (written, phases) = (METRICS.usage_records_written.get(), phase_totals());
    let start = Instant::now();
    let tasks: Vec<_> = writers.into_iter().map(|w| tokio::spawn(w.run(stopped.clone()))).collect();
    for record in records {
        sink.reserve(record.buyer_id).expect("the queue holds every record").send(record);
    }
    let mut peak_depth = 0;
    while METRICS.usage_records_written.get() - written < n as u64 {
        peak_depth = peak_depth.max(METRICS.usage_queue_depth.get());
        assert!(!tasks.iter().any(|t| t.is_finished()), "a writer stopped");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }

    let after = phase_totals();
    let batches = after[0].1 - phases[0].1;
    let per_batch: Vec<f64> =
        after.iter().zip(&phases).map(|(a, b)| (a.0 - b.0) * 1000.0 / batches.max(1) as f64).collect();
    let total: f64 = per_batch.iter().sum();

    // Everything written once, and the ledger intact.
    assert_eq!(scalar(db, "SELECT COUNT(*) FROM usage_records").await, n as i64);
    assert_eq!(scalar(db, "SELECT SUM(requests) FROM usage_rollups_platform").await, n as i64);
    assert_eq!(scalar(db, "SELECT SUM(paid_credits) FROM usage_rollups_buyer").await, paid);
    let violations = ledger::check(db, token_exchange::now_ms(), 3_600_000).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");

    let rate = n as f64 / secs;
    eprintln!(
        "{label}: {n} records in {secs:.2}s = {rate:.0} records/s; {batches} batches of ~{:.0}; peak queue {peak_depth}",
        n as f64 / batches.max(1) as f64
    );
    let cells: Vec<String> = per_batch.iter().map(|ms| format!("{ms:.1}")).collect();
    format!(
        "| {label} | {n} | {:.0} | {rate:.0} | {total:.1} | {} |\n",
        n as f64 / batches.max(1) as f64,
        cells.join(" | ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by bench/settlement/run.sh"]
async fn settlement_throughput() {
    let n: usize = std::env::var("TOKEX_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let backends = std::env::var("TOKEX_BENCH_BACKENDS").unwrap_or_else(|_| "mariadb,sqlite".into());
    let mut conf = UsageConfig::default();
    if let Some(size) = std::env::var("TOKEX_BENCH_BATCH").ok().and_then(|v| v.parse().ok()) {
        conf.batch_size = size;
    }
    if let Some(writers) = std::env::var("TOKEX_BENCH_WRITERS").ok().and_then(|v| v.parse().ok()) {
        conf.writers = writers;
    }
    let mut report = format!(
        "Usage batches of up to {} records (flush every {} ms), {} writers, fee {FEE_BPS} bps.\n\n\
         | database | records | records per batch | records/s | ms per batch | {} |\n|---|---:|---:|---:|---:|{}\n",
        conf.batch_size,
        conf.flush_interval_ms,
        conf.writers,
        PHASES.join(" | "),
        "---:|".repeat(PHASES.len())
    );
    for backend in backends.split(',') {
        let (backend, label) = match backend.trim() {
            "sqlite" => (Backend::Sqlite, "SQLite"),
            "mariadb" => (Backend::MariaDb, "MariaDB"),
            other => panic!("unknown backend {other:?} in TOKEX_BENCH_BACKENDS"),
        };
        let dir = tempfile::tempdir().unwrap();
        let database = TestDatabase::create(backend, dir.path()).await;
        let db = token_exchange::db::connect(&database.url, 4).await.unwrap();
        token_exchange::db::migrate(&db).await.unwrap();
        report.push_str(&run(&db, label, n, &conf).await);
        db.close().await.unwrap();
    }
    eprintln!("{report}");
    if let Ok(path) = std::env::var("TOKEX_BENCH_OUT") {
        std::fs::write(path, report).unwrap();
    }
}
