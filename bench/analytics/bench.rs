//! The reports with a million usage records (docs/reports.md, "Figures"): fills a database with
//! `TOKEX_BENCH_RECORDS` (default 1,000,000) usage records over 30 days, 20 models, 1,000 buyer keys and
//! 1,000 hosted keys, and their hourly rollups, then times each report and time series against the naive
//! GROUP BY over `usage_records` that computes the same figures. Run by `bench/analytics/run.sh`; compiled
//! into the `analytics` test target (`#[ignore]`d, no timing assertions).

use std::collections::HashMap;
use std::time::Instant;

use migration::MigratorTrait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseConnection, EntityTrait, FromQueryResult, Statement, TransactionTrait,
};
use token_exchange::analytics::{self, Granularity, SeriesRequest};
use token_exchange::db::analytics as q;
use token_exchange::db::entities::{buyer_keys, users};
use token_exchange::db::hosted_keys::{self, NewHostedKey};
use token_exchange::db::ledger;
use token_exchange::db::rollups::{self, hour_of, Counters, RollupRecord, Rollups};

const DAY: i64 = 86_400_000;
/// The end of the data (an hour boundary, 2026-01-01T00:00Z) and "now" for the reports.
const T_END: i64 = 1_767_225_600_000;
const MODELS: usize = 20;
const BUYERS: usize = 250;
const KEYS_PER_BUYER: usize = 4;
const SELLERS: usize = 100;
const KEYS_PER_SELLER: usize = 10;
const ROWS_PER_INSERT: usize = 1_000;
const RUNS: usize = 5;

/// Zipf(1) over `n` items: the first is most frequent (traffic concentrates on a few buyers and models).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let weights: Vec<f64> = (1..=n).map(|k| 1.0 / k as f64).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        Self {
            cdf: weights
                .iter()
                .map(|w| {
                    acc += w / total;
                    acc
                })
                .collect(),
        }
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

struct World {
    buyer_ids: Vec<i64>,
    /// Ledger accounts for the settlements: a hold per buyer, a wallet per seller, the revenue account.
    holds: HashMap<i64, i64>,
    wallets: HashMap<i64, i64>,
    revenue: i64,
    /// Per buyer key: (key id, buyer id).
    buyer_keys: Vec<(i64, i64)>,
    /// Per hosted key: (key id, owner id); key k serves model k % MODELS.
    hosted_keys: Vec<(i64, i64)>,
    seller_ids: Vec<i64>,
}

async fn create_world(db: &DatabaseConnection) -> World {
    let user = |name: String, roles: &str| users::ActiveModel {
        username: Set(name),
        password_hash: Set("x".into()),
        roles: Set(roles.into()),
        disabled: Set(false),
        wallet_pays: Set(true),
        created_at_ms: Set(T_END - 40 * DAY),
        ..Default::default()
    };
    users::Entity::insert_many((0..BUYERS).map(|i| user(format!("buyer-{i}"), "buyer"))).exec(db).await.unwrap();
    users::Entity::insert_many((0..SELLERS).map(|i| user(format!("seller-{i}"), "seller"))).exec(db).await.unwrap();
    let all = users::Entity::find().all(db).await.unwrap();
    let id_of = |name: &str| all.iter().find(|u| u.username == name).unwrap().id;
    let buyer_ids: Vec<i64> = (0..BUYERS).map(|i| id_of(&format!("buyer-{i}"))).collect();
    let seller_ids: Vec<i64> = (0..SELLERS).map(|i| id_of(&format!("seller-{i}"))).collect();
    let key = |k: usize| buyer_keys::ActiveModel {
        user_id: Set(buyer_ids[k / KEYS_PER_BUYER]),
        name: Set(format!("key-{k}")),
        lookup_id: Set(format!("lk{k:08}")),
        key_hash: Set(format!("{k:064}")),
        models: Set(None),
        expires_at_ms: Set(None),
        revoked_at_ms: Set(None),
        created_at_ms: Set(T_END - 40 * DAY),
        ..Default::default()
    };
    buyer_keys::Entity::insert_many((0..BUYERS * KEYS_PER_BUYER).map(key)).exec(db).await.unwrap();
    let keys = buyer_keys::Entity::find().all(db).await.unwrap();
    let mut buyer_keys: Vec<(i64, i64)> = keys.iter().map(|k| (k.id, k.user_id)).collect();
    buyer_keys.sort_unstable();
    let mut hosted = Vec::new();
    for k in 0..SELLERS * KEYS_PER_SELLER {
        let owner = seller_ids[k / KEYS_PER_SELLER];
        let new = NewHostedKey {
            uid: format!("bench-{k}"),
            owner_id: owner,
            name: format!("hosted-{k}"),
            provider: "openai".into(),
            base_url: "https://api.openai.com/v1".into(),
            models: format!("model-{:02}", k % MODELS),
            api_key_enc: "v1.x.y".into(),
            key_hint: "sk-...abcd".into(),
            status: "active".into(),
            declared_balance: 1_000_000_000,
            now_ms: T_END - 40 * DAY,
            pool: "seller".into(),
            priority: 0,
            max_concurrency: 0,
            max_spend_per_day: 0,
            balance_api: String::new(),
            verified_at_ms: None,
        };
        hosted.push((hosted_keys::insert(db, new).await.unwrap().id, owner));
    }
    let now = T_END - 40 * DAY;
    let revenue = ledger::revenue_account(db, now).await.unwrap();
    let mut holds = HashMap::new();
    for &buyer in &buyer_ids {
        holds.insert(buyer, ledger::ensure_account(db, ledger::HOLD, buyer, 1, now).await.unwrap());
    }
    let mut wallets = HashMap::new();
    for &seller in &seller_ids {
        wallets.insert(seller, ledger::wallet_account(db, seller, now).await.unwrap());
    }
    World { buyer_ids, holds, wallets, revenue, buyer_keys, hosted_keys: hosted, seller_ids }
}

struct Generated {
    rollups: Rollups,
    records: usize,
}

/// Inserts the usage records in time order (as gateways write them) and returns their rollups.
async fn fill(db: &DatabaseConnection, world: &World, n: usize) -> Generated {
    let mut rng = StdRng::seed_from_u64(5);
    let (key_dist, model_dist) = (Zipf::new(world.buyer_keys.len()), Zipf::new(MODELS));
    let mut times: Vec<i64> = (0..n).map(|_| T_END - 30 * DAY + rng.gen_range(0..30 * DAY)).collect();
    times.sort_unstable();
    let mut rollups = Rollups::default();
    let mut rows = Vec::with_capacity(ROWS_PER_INSERT);
    let (mut entries, mut postings) = (Vec::new(), Vec::new());
    let txn_every = 20;
    let mut statements = 0;
    let mut txn = db.begin().await.unwrap();
    for (i, at) in times.into_iter().enumerate() {
        let (buyer_key, buyer) = world.buyer_keys[key_dist.sample(&mut rng)];
        let m = model_dist.sample(&mut rng);
        let model = format!("model-{m:02}");
        let failed = rng.gen_bool(0.03);
        let unserved = failed && rng.gen_bool(0.5);
        let fallback = !failed && rng.gen_bool(0.02);
        let hosted = if unserved {
            None
        } else {
            let serving = world.hosted_keys.len() / MODELS;
            Some(world.hosted_keys[m + MODELS * rng.gen_range(0..serving)])
        };
        let (prompt, completion) =
            if failed { (rng.gen_range(10..2_000), 0) } else { (rng.gen_range(10..2_000), rng.gen_range(1..1_000)) };
        let cost = if failed { 0 } else { prompt + 2 * completion };
        let (seller, platform) = if fallback { (0, cost) } else { (cost * 95 / 100, cost - cost * 95 / 100) };
        rollups.add(&RollupRecord {
            created_at_ms: at,
            buyer_id: buyer,
            buyer_key_id: buyer_key,
            hosted_key: hosted,
            model: &model,
            counters: Counters {
                requests: 1,
                failed_requests: i64::from(failed),
                fallback_requests: i64::from(fallback),
                prompt_tokens: prompt,
                completion_tokens: completion,
                cost_credits: cost,
                paid_credits: cost,
                seller_credits: seller,
                platform_credits: platform,
            },
        });
        if cost > 0 {
            // The settle entry as `ledger::settle` posts it: the hold pays, the seller and the platform get
            // their shares (zero amounts are not posted).
            let entry = i + 1;
            entries.push(format!("({entry},'settle:b{i:09}','settle','b{i:09}',NULL,NULL,{at})"));
            postings.push(format!("({entry},{},{},{at})", world.holds[&buyer], -cost));
            if let (Some((_, owner)), true) = (hosted, seller > 0) {
                postings.push(format!("({entry},{},{seller},{at})", world.wallets[&owner]));
            }
            postings.push(format!("({entry},{},{platform},{at})", world.revenue));
        }
        let hosted_id = hosted.map_or("NULL".to_string(), |(id, _)| id.to_string());
        let status = if failed { 502 } else { 200 };
        let boolean = |b: bool| if b { "TRUE" } else { "FALSE" };
        rows.push(format!(
            "('b{i:09}',{buyer},{buyer_key},{hosted_id},'{model}','chat.completions',{prompt},{completion},FALSE,\
             {status},1,{},{},1000,2000,FALSE,NULL,{at},{cost},0,NULL,{})",
            rng.gen_range(100..5_000),
            if failed { "NULL".to_string() } else { rng.gen_range(50..800).to_string() },
            boolean(fallback)
        ));
        if rows.len() == ROWS_PER_INSERT {
            insert_records(&txn, &mut rows).await;
            insert_ledger(&txn, &mut entries, &mut postings).await;
            statements += 1;
            if statements % txn_every == 0 {
                txn.commit().await.unwrap();
                txn = db.begin().await.unwrap();
            }
        }
    }
    if !rows.is_empty() {
        insert_records(&txn, &mut rows).await;
        insert_ledger(&txn, &mut entries, &mut postings).await;
    }
    txn.commit().await.unwrap();
    Generated { rollups, records: n }
}

async fn insert_records(db: &impl ConnectionTrait, rows: &mut Vec<String>) {
    let sql = format!(
        "INSERT INTO usage_records (request_id, buyer_id, buyer_key_id, hosted_key_id, model, endpoint, \
         prompt_tokens, completion_tokens, estimated, status_code, attempts, latency_ms, ttft_ms, request_bytes, \
         response_bytes, client_disconnected, error_kind, created_at_ms, cost_credits, unpaid_credits, hold_id, \
         fallback) VALUES {}",
        rows.join(",")
    );
    db.execute_unprepared(&sql).await.unwrap();
    rows.clear();
}

async fn insert_ledger(db: &impl ConnectionTrait, entries: &mut Vec<String>, postings: &mut Vec<String>) {
    if !entries.is_empty() {
        let sql = format!(
            "INSERT INTO journal_entries (id, idempotency_key, kind, request_id, actor_id, memo, created_at_ms) \
             VALUES {}",
            entries.join(",")
        );
        db.execute_unprepared(&sql).await.unwrap();
    }
    for chunk in postings.chunks(3 * ROWS_PER_INSERT) {
        let sql =
            format!("INSERT INTO postings (entry_id, account_id, amount, created_at_ms) VALUES {}", chunk.join(","));
        db.execute_unprepared(&sql).await.unwrap();
    }
    entries.clear();
    postings.clear();
}

/// Bulk-inserts the rollups (what the usage writer would have added batch by batch).
async fn insert_rollups(db: &DatabaseConnection, r: &Rollups) {
    let c = |c: &Counters| {
        format!(
            "{},{},{},{},{},{},{},{},{}",
            c.requests,
            c.failed_requests,
            c.fallback_requests,
            c.prompt_tokens,
            c.completion_tokens,
            c.cost_credits,
            c.paid_credits,
            c.seller_credits,
            c.platform_credits
        )
    };
    let cols = "requests, failed_requests, fallback_requests, prompt_tokens, completion_tokens, cost_credits, \
                paid_credits, seller_credits, platform_credits";
    let buyer: Vec<String> =
        r.buyer.iter().map(|((h, k, m), (b, x))| format!("({h},{k},'{m}',{b},{})", c(x))).collect();
    let seller: Vec<String> =
        r.seller.iter().map(|((h, k, m), (o, x))| format!("({h},{k},'{m}',{o},{})", c(x))).collect();
    let platform: Vec<String> = r.platform.iter().map(|((h, m), x)| format!("({h},'{m}',{})", c(x))).collect();
    let txn = db.begin().await.unwrap();
    for chunk in buyer.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO usage_rollups_buyer (hour_ms, buyer_key_id, model, buyer_id, {cols}) VALUES {}",
            chunk.join(",")
        );
        txn.execute_unprepared(&sql).await.unwrap();
    }
    for chunk in seller.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO usage_rollups_seller (hour_ms, hosted_key_id, model, owner_id, {cols}) VALUES {}",
            chunk.join(",")
        );
        txn.execute_unprepared(&sql).await.unwrap();
    }
    for chunk in platform.chunks(ROWS_PER_INSERT) {
        let sql = format!("INSERT INTO usage_rollups_platform (hour_ms, model, {cols}) VALUES {}", chunk.join(","));
        txn.execute_unprepared(&sql).await.unwrap();
    }
    txn.commit().await.unwrap();
}

/// Rows and counter totals of each rollup table.
async fn rollup_totals(db: &DatabaseConnection) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    for table in ["usage_rollups_buyer", "usage_rollups_seller", "usage_rollups_platform"] {
        let mut row = vec![count(db, table).await];
        for column in [
            "requests",
            "failed_requests",
            "fallback_requests",
            "prompt_tokens",
            "completion_tokens",
            "cost_credits",
            "paid_credits",
            "seller_credits",
            "platform_credits",
        ] {
            #[derive(FromQueryResult)]
            struct N {
                n: i64,
            }
            let sql = format!("SELECT {} AS n FROM {table}", sum_sql(db, column));
            let n = N::find_by_statement(Statement::from_string(db.get_database_backend(), sql)).one(db).await;
            row.push(n.unwrap().unwrap().n);
        }
        out.push(row);
    }
    out
}

fn expected_totals(r: &Rollups) -> Vec<Vec<i64>> {
    let totals = |rows: usize, counters: Vec<&Counters>| {
        let mut row = vec![rows as i64, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for c in counters {
            let values = [
                c.requests,
                c.failed_requests,
                c.fallback_requests,
                c.prompt_tokens,
                c.completion_tokens,
                c.cost_credits,
                c.paid_credits,
                c.seller_credits,
                c.platform_credits,
            ];
            for (i, v) in values.into_iter().enumerate() {
                row[i + 1] += v;
            }
        }
        row
    };
    vec![
        totals(r.buyer.len(), r.buyer.values().map(|(_, c)| c).collect()),
        totals(r.seller.len(), r.seller.values().map(|(_, c)| c).collect()),
        totals(r.platform.len(), r.platform.values().collect()),
    ]
}

#[derive(Debug, FromQueryResult, PartialEq, Eq)]
struct Sums {
    requests: i64,
    tokens: i64,
    cost: i64,
}

/// Median milliseconds of `RUNS` runs after one warm-up, and the last result.
async fn time<T, F: std::future::Future<Output = T>>(mut f: impl FnMut() -> F) -> (f64, T) {
    let mut last = f().await;
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        last = f().await;
        runs.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    runs.sort_by(f64::total_cmp);
    (runs[RUNS / 2], last)
}

fn sum_sql(db: &DatabaseConnection, expr: &str) -> String {
    match db.get_database_backend() {
        sea_orm::DbBackend::MySql => format!("CAST(COALESCE(SUM({expr}), 0) AS SIGNED)"),
        _ => format!("CAST(COALESCE(SUM({expr}), 0) AS INTEGER)"),
    }
}

/// The naive query: one GROUP BY over `usage_records` with the same filter; returns sums over its
/// groups (the caller compares them with the rollups' answer).
async fn naive(db: &DatabaseConnection, group: &str, filter: &str) -> Sums {
    let sql = format!(
        "SELECT {} AS requests, {} AS tokens, {} AS cost FROM (SELECT {group} AS g, COUNT(*) AS n, \
         SUM(prompt_tokens + completion_tokens) AS t, SUM(cost_credits) AS c, \
         SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END) AS f, SUM(CASE WHEN fallback THEN 1 ELSE 0 END) AS fb \
         FROM usage_records WHERE {filter} GROUP BY {group}) q",
        sum_sql(db, "q.n"),
        sum_sql(db, "q.t"),
        sum_sql(db, "q.c")
    );
    Sums::find_by_statement(Statement::from_string(db.get_database_backend(), sql)).one(db).await.unwrap().unwrap()
}

fn series_sums(points: &[q::TimeSeriesPoint]) -> Sums {
    Sums {
        requests: points.iter().map(|p| p.requests).sum(),
        tokens: points.iter().map(|p| p.prompt_tokens + p.completion_tokens).sum(),
        cost: points.iter().map(|p| p.spend_credits).sum(),
    }
}

async fn count(db: &DatabaseConnection, table: &str) -> i64 {
    #[derive(FromQueryResult)]
    struct N {
        n: i64,
    }
    let sql = format!("SELECT COUNT(*) AS n FROM {table}");
    N::find_by_statement(Statement::from_string(db.get_database_backend(), sql)).one(db).await.unwrap().unwrap().n
}

/// Runs the benchmark on one database and returns its lines of the report (markdown).
pub async fn run(db: &DatabaseConnection, label: &str, n: usize) -> String {
    let mut out = String::new();
    let started = Instant::now();
    let world = create_world(db).await;
    let generated = fill(db, &world, n).await;
    let filled = started.elapsed().as_secs_f64();
    // The rollups: rebuilt from the records and settlements by migration 5's backfill (as on an upgrade),
    // which must come to what the usage writer would have counted; or bulk-inserted
    // (TOKEX_BENCH_BACKFILL=0).
    let start = Instant::now();
    let backfilled = std::env::var("TOKEX_BENCH_BACKFILL").map_or(true, |v| v != "0");
    let mut how = "bulk-inserted".to_string();
    if backfilled {
        let migrations = migration::Migrator::migrations();
        let reports = migrations.iter().position(|m| m.name() == "m20261124_000005_reports").unwrap();
        migration::Migrator::down(db, Some(u32::try_from(migrations.len() - reports).unwrap())).await.unwrap();
        let start = Instant::now();
        migration::Migrator::up(db, None).await.unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(rollup_totals(db).await, expected_totals(&generated.rollups), "backfill = writer");
        how = format!("built by migration 5's backfill in {secs:.1} s (tables and indexes included)");
        eprintln!("{label}: migration 5 with backfill: {secs:.1}s");
    } else {
        insert_rollups(db, &generated.rollups).await;
    }
    let rolled = start.elapsed().as_secs_f64();
    if db.get_database_backend() == sea_orm::DbBackend::MySql {
        for t in ["usage_records", "usage_rollups_buyer", "usage_rollups_seller", "usage_rollups_platform"] {
            db.execute_unprepared(&format!("ANALYZE TABLE {t}")).await.unwrap();
        }
    } else {
        db.execute_unprepared("ANALYZE").await.unwrap();
    }
    let (rb, rs, rp) = (
        count(db, "usage_rollups_buyer").await,
        count(db, "usage_rollups_seller").await,
        count(db, "usage_rollups_platform").await,
    );
    eprintln!("{label}: {} records in {filled:.1}s, rollups in {rolled:.1}s ({rb}/{rs}/{rp} rows)", generated.records);
    out.push_str(&format!(
        "\n### {label}\n\n{} usage records and their settlements (inserted in {filled:.0} s); rollups {how}: \
         buyer {rb} rows, seller {rs}, platform {rp}.\n\n| query | rollups (ms) | naive over usage_records (ms) | ratio |\n|---|---:|---:|---:|\n",
        generated.records
    ));
    let mut row = |name: &str, fast: f64, slow: f64| {
        let line = format!("| {name} | {fast:.1} | {slow:.1} | {:.0}x |\n", slow / fast.max(0.001));
        eprint!("{label}: {line}");
        out.push_str(&line);
    };

    // The platform report (the whole endpoint) against its naive equivalent: usage by model all time and
    // the 7-day totals (without the platform's share, which usage_records do not hold: the baseline is
    // cheaper than a true equivalent).
    let since = hour_of(T_END - 7 * DAY);
    let (fast, report) = time(|| analytics::platform_report(db, Some(7), T_END)).await;
    let (slow, (by_model, recent)) = time(|| async {
        let by_model = naive(db, "model", "1 = 1").await;
        let recent = naive(db, "model", &format!("created_at_ms >= {since}")).await;
        (by_model, recent)
    })
    .await;
    let report = report.unwrap();
    let all_requests: i64 = report.by_model.iter().map(|m| m.requests).sum();
    assert_eq!(all_requests, by_model.requests);
    assert_eq!(report.recent.requests, recent.requests);
    assert_eq!(report.recent.tokens, recent.tokens);
    row("platform report (GET /analytics/platform)", fast, slow);

    // User reports: the busiest buyer (Zipf: ~13 % of all traffic on their first key), a typical one, a
    // seller.
    let load = |buyer: i64| async move {
        let user = users::Entity::find_by_id(buyer).one(db).await.unwrap().unwrap();
        user
    };
    for (name, buyer) in [("busiest buyer", world.buyer_ids[0]), ("typical buyer", world.buyer_ids[BUYERS / 2])] {
        let user = load(buyer).await;
        let (fast, report) = time(|| analytics::user_report(db, &user, None, None, T_END)).await;
        let (slow, naive_sums) = time(|| async {
            let filter = format!("buyer_id = {buyer}");
            let by_model = naive(db, "model", &filter).await;
            naive(db, "buyer_key_id", &filter).await;
            by_model
        })
        .await;
        let report = report.unwrap().buyer.unwrap();
        assert_eq!(report.requests, naive_sums.requests);
        assert_eq!(report.by_model.iter().map(|m| m.cost_credits).sum::<i64>(), naive_sums.cost);
        row(&format!("user report, {name} ({} requests)", report.requests), fast, slow);
    }
    let seller = world.seller_ids[0];
    let user = load(seller).await;
    let (fast, report) = time(|| analytics::user_report(db, &user, None, None, T_END)).await;
    let owned = format!("hosted_key_id IN (SELECT id FROM hosted_keys WHERE owner_id = {seller})");
    let (slow, sums) = time(|| naive(db, "hosted_key_id", &owned)).await;
    let report = report.unwrap().seller.unwrap();
    assert_eq!(report.requests, sums.requests);
    row(&format!("user report, seller ({} requests)", report.requests), fast, slow);

    // Time series.
    let admin = users::Model {
        id: 0,
        username: "admin".into(),
        password_hash: String::new(),
        roles: "admin".into(),
        disabled: false,
        wallet_pays: false,
        created_at_ms: 0,
    };
    let buyer = load(world.buyer_ids[0]).await;
    // (name, caller, granularity, span, model, the naive query's filter); every caller's default scope.
    type Case<'a> = (&'a str, &'a users::Model, Granularity, i64, Option<&'a str>, String);
    let buyer_filter = format!("buyer_id = {}", buyer.id);
    let cases: Vec<Case<'_>> = vec![
        ("hourly, platform, 48 h", &admin, Granularity::Hour, 2 * DAY, None, "1 = 1".into()),
        ("hourly, platform, 30 days", &admin, Granularity::Hour, 30 * DAY, None, "1 = 1".into()),
        ("daily, platform, 30 days", &admin, Granularity::Day, 30 * DAY, None, "1 = 1".into()),
        (
            "daily, platform, 30 days, one model",
            &admin,
            Granularity::Day,
            30 * DAY,
            Some("model-03"),
            "model = 'model-03'".into(),
        ),
        ("hourly, busiest buyer, 48 h", &buyer, Granularity::Hour, 2 * DAY, None, buyer_filter.clone()),
        ("daily, busiest buyer, 30 days", &buyer, Granularity::Day, 30 * DAY, None, buyer_filter.clone()),
        ("daily, seller, 30 days", &user, Granularity::Day, 30 * DAY, None, owned.clone()),
    ];
    for (name, who, granularity, span, model, filter) in cases {
        let request = SeriesRequest {
            granularity,
            from: Some(T_END - span),
            to: Some(T_END - 1),
            model: model.map(String::from),
            scope: None,
        };
        let (fast, series) = time(|| analytics::timeseries(db, who, request.clone(), T_END)).await;
        let bucket = granularity.bucket_ms();
        let group = format!("created_at_ms - created_at_ms % {bucket}");
        let range = format!("created_at_ms >= {} AND created_at_ms <= {}", T_END - span, T_END - 1);
        let where_ = format!("{filter} AND {range}");
        let (slow, sums) = time(|| naive(db, &group, &where_)).await;
        let series = series.unwrap();
        assert_eq!(series_sums(&series.points), sums, "{name}");
        row(&format!("timeseries {name} ({} points)", series.points.len()), fast, slow);
    }

    // Upkeep: what the rollups add to a usage writer's batch transaction (256 records of the current hour).
    let mut rng = StdRng::seed_from_u64(9);
    let (key_dist, model_dist) = (Zipf::new(world.buyer_keys.len()), Zipf::new(MODELS));
    let models: Vec<String> = (0..MODELS).map(|m| format!("model-{m:02}")).collect();
    let mut batches = Vec::new();
    for b in 0..20 {
        let mut batch = Rollups::default();
        for _ in 0..256 {
            let (buyer_key, buyer) = world.buyer_keys[key_dist.sample(&mut rng)];
            let m = model_dist.sample(&mut rng);
            let hosted = world.hosted_keys[m + MODELS * rng.gen_range(0..world.hosted_keys.len() / MODELS)];
            batch.add(&RollupRecord {
                created_at_ms: T_END + b * 1_000,
                buyer_id: buyer,
                buyer_key_id: buyer_key,
                hosted_key: Some(hosted),
                model: &models[m],
                counters: Counters { requests: 1, prompt_tokens: 100, completion_tokens: 50, ..Counters::default() },
            });
        }
        batches.push(batch);
    }
    let mut per_batch = Vec::new();
    for batch in &batches {
        let start = Instant::now();
        let txn = token_exchange::db::ledger::begin(db).await.unwrap();
        rollups::apply(&txn, batch).await.unwrap();
        txn.commit().await.unwrap();
        per_batch.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    per_batch.sort_by(f64::total_cmp);
    let groups: usize = batches.iter().map(|b| b.buyer.len() + b.seller.len() + b.platform.len()).sum::<usize>() / 20;
    let line = format!(
        "\nRollup upkeep in the usage writer's transaction: median {:.1} ms per batch of 256 records \
         (~{groups} rows touched), first batches of a new hour included.\n",
        per_batch[per_batch.len() / 2]
    );
    eprint!("{label}: {line}");
    out.push_str(&line);
    out
}
