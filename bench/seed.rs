//! `bench-seed`: fills a database for `bench/run` straight through the library's database layer: buyers with
//! one buyer key each and credits, sellers with seller keys over N models, and prices. Bulk inserts (one
//! multi-row statement per chunk), no REST and no provider verification, so that 100,000 seller keys take
//! seconds rather than the hours a deposit each would.
//!
//! What the gateway reads is stored exactly as the deposit path stores it: seller keys encrypted under the
//! master key with `accounts::hosted_key_aad(uid)`, status active, in the seller pool. Credits go through
//! `ledger::grant_credits` (what `token-exchange credits grant` does), so `token-exchange ledger check`
//! stays clean. The seller API keys are mock keys (`sk-mock-bench-...`); `--slow-keys` adds keys with the
//! mock's `slow` token (100 ms before each SSE event) serving the model `bench-slow` only.
//!
//! Prints one JSON line with counts and timings; the plaintext buyer keys go to `--out`, one per line.

use std::io::Write;
use std::time::Instant;

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use rand::Rng;
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QuerySelect};
use token_exchange::accounts::hosted_key_aad;
use token_exchange::credentials;
use token_exchange::crypto::{self, Keyring};
use token_exchange::db::entities::{buyer_keys, hosted_keys, users};

/// Rows per multi-row INSERT: ~30 columns × 1,000 rows stays under MySQL's 65,535 placeholders.
const CHUNK: usize = 1_000;
/// Chunks inserted at once (each on its own pooled connection).
const PARALLEL_CHUNKS: usize = 4;
/// Concurrent credit grants; the ledger retries the ones that collide on the shared external account.
const PARALLEL_GRANTS: usize = 4;
const SLOW_MODEL: &str = "bench-slow";
const BUYER_PREFIX: &str = "bench-buyer-";
const SELLER_PREFIX: &str = "bench-seller-";
/// Credits per million tokens (1,000,000 credits = 1 USD at the default rate): a small model's price.
const PROMPT_PRICE: i64 = 150_000;
const COMPLETION_PRICE: i64 = 600_000;

#[derive(Parser)]
#[command(about = "Seed a token-exchange database for the benchmark (bench/run)")]
struct Args {
    /// mysql://user@host:3306/database or sqlite://path; migrated first.
    #[arg(long, env = "TOKEX_DATABASE_URL")]
    database_url: String,
    /// Base64 of 32 bytes: the gateway's TOKEX_MASTER_KEY.
    #[arg(long, env = "TOKEX_MASTER_KEY", hide_env_values = true)]
    master_key: String,
    #[arg(long, default_value_t = 1_000)]
    buyers: usize,
    #[arg(long, default_value_t = 1_000)]
    seller_keys: usize,
    /// Models `bench-m01` .. `bench-mNN`; each key serves `--models-per-key` of them.
    #[arg(long, default_value_t = 20)]
    models: usize,
    #[arg(long, default_value_t = 3)]
    models_per_key: usize,
    /// Seller accounts the keys are spread over (default: one per 10 keys, at most 1,000).
    #[arg(long)]
    sellers: Option<usize>,
    /// The mock upstream's OpenAI base URL, e.g. http://127.0.0.1:9000/v1.
    #[arg(long)]
    upstream: String,
    /// Extra keys whose mock API key contains `slow`, serving only the model `bench-slow`.
    #[arg(long, default_value_t = 0)]
    slow_keys: usize,
    /// Credits granted to each buyer.
    #[arg(long, default_value_t = 1_000_000_000_000)]
    credits: i64,
    /// Balance each seller key declares (its routing weight), in credits.
    #[arg(long, default_value_t = 1_000_000_000_000)]
    declared_balance: i64,
    /// Scheduled risk checks are spread over this many milliseconds from now (risk.check_interval_ms),
    /// as in a pool whose keys were deposited over time, rather than all falling due at start-up.
    #[arg(long, default_value_t = 300_000)]
    check_spread_ms: i64,
    /// File for the plaintext buyer keys, one per line, in buyer order.
    #[arg(long)]
    out: std::path::PathBuf,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Failure> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(seed(args))
}

async fn seed(args: Args) -> Result<(), Failure> {
    if args.models == 0 || args.models_per_key == 0 || args.models_per_key > args.models {
        return Err("--models and --models-per-key must be positive, and models-per-key at most models".into());
    }
    let keyring = Keyring::new(crypto::parse_master_key(args.master_key.trim())?, Vec::new());
    let started = Instant::now();
    let db = token_exchange::db::connect(&args.database_url, 8).await?;
    token_exchange::db::migrate(&db).await?;
    let migrated_s = started.elapsed().as_secs_f64();

    let models: Vec<String> = (1..=args.models).map(|i| format!("bench-m{i:02}")).collect();
    for model in models.iter().map(String::as_str).chain([SLOW_MODEL]) {
        token_exchange::ledger::set_price(&db, model, PROMPT_PRICE, COMPLETION_PRICE, None, None).await?;
    }

    let now = token_exchange::now_ms();
    // One real hash for every bench user (argon2 costs ~50 ms each): they can log in with "bench-password".
    let password_hash = credentials::hash_password("bench-password")?;
    let sellers = args.sellers.unwrap_or(args.seller_keys.div_ceil(10).clamp(1, 1_000));
    let users_started = Instant::now();
    let buyer_ids = insert_users(&db, BUYER_PREFIX, args.buyers, "buyer", &password_hash, now).await?;
    let seller_ids = insert_users(&db, SELLER_PREFIX, sellers, "seller", &password_hash, now).await?;
    let buyer_keys = insert_buyer_keys(&db, &buyer_ids, now).await?;
    write_keys(&args.out, &buyer_keys)?;
    let users_s = users_started.elapsed().as_secs_f64();

    let grants_started = Instant::now();
    futures::stream::iter(buyer_ids.iter().copied())
        .map(|user_id| {
            let db = &db;
            async move {
                token_exchange::ledger::grant_credits(db, user_id, args.credits, Some("bench".into()), None, None)
                    .await
                    .map_err(|e| -> Failure { format!("grant to user {user_id}: {e}").into() })
            }
        })
        .buffer_unordered(PARALLEL_GRANTS)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let grants_s = grants_started.elapsed().as_secs_f64();

    let keys_started = Instant::now();
    let plan = KeyPlan {
        upstream: args.upstream.trim_end_matches('/').to_string(),
        models: &models,
        models_per_key: args.models_per_key,
        seller_ids: &seller_ids,
        declared_balance: args.declared_balance,
        check_spread_ms: args.check_spread_ms.max(1),
        now,
    };
    let total_keys = args.seller_keys + args.slow_keys;
    let rows = (0..total_keys).map(|i| plan.row(&keyring, i, i >= args.seller_keys)).collect::<Result<Vec<_>, _>>()?;
    let encrypted_s = keys_started.elapsed().as_secs_f64();
    insert_chunks(&db, rows).await?;
    let keys_s = keys_started.elapsed().as_secs_f64();

    let summary = serde_json::json!({
        "buyers": buyer_ids.len(),
        "sellers": seller_ids.len(),
        "seller_keys": args.seller_keys,
        "slow_keys": args.slow_keys,
        "models": models.len(),
        "seconds": {
            "migrate": migrated_s,
            "users_and_buyer_keys": users_s,
            "grants": grants_s,
            "seller_keys_encrypt": encrypted_s,
            "seller_keys_total": keys_s,
            "total": started.elapsed().as_secs_f64(),
        },
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{summary}")?;
    db.close().await?;
    Ok(())
}

/// Inserts `n` users `<prefix>00001`.. and returns their ids in that order.
async fn insert_users(
    db: &DatabaseConnection,
    prefix: &str,
    n: usize,
    roles: &str,
    password_hash: &str,
    now: i64,
) -> Result<Vec<i64>, Failure> {
    let names: Vec<String> = (1..=n).map(|i| format!("{prefix}{i:05}")).collect();
    let rows: Vec<users::ActiveModel> = names
        .iter()
        .map(|name| users::ActiveModel {
            username: Set(name.clone()),
            password_hash: Set(password_hash.to_string()),
            roles: Set(roles.to_string()),
            disabled: Set(false),
            wallet_pays: Set(true),
            created_at_ms: Set(now),
            ..Default::default()
        })
        .collect();
    insert_chunks(db, rows).await?;
    let found: Vec<(String, i64)> = users::Entity::find()
        .select_only()
        .column(users::Column::Username)
        .column(users::Column::Id)
        .filter(users::Column::Username.starts_with(prefix))
        .into_tuple()
        .all(db)
        .await?;
    let ids: std::collections::HashMap<String, i64> = found.into_iter().collect();
    names
        .iter()
        .map(|name| ids.get(name).copied().ok_or_else(|| format!("user {name} was not inserted").into()))
        .collect()
}

/// One unrestricted key per buyer, stored as the gateway expects (lookup id + sha256); returns the plaintexts.
async fn insert_buyer_keys(db: &DatabaseConnection, buyer_ids: &[i64], now: i64) -> Result<Vec<String>, Failure> {
    let mut plaintexts = Vec::with_capacity(buyer_ids.len());
    let mut rows = Vec::with_capacity(buyer_ids.len());
    for &user_id in buyer_ids {
        let generated = credentials::generate_buyer_key();
        plaintexts.push(generated.plaintext.expose().to_string());
        rows.push(buyer_keys::ActiveModel {
            user_id: Set(user_id),
            name: Set("bench".into()),
            lookup_id: Set(generated.lookup_id),
            key_hash: Set(generated.key_hash),
            models: Set(None),
            expires_at_ms: Set(None),
            revoked_at_ms: Set(None),
            created_at_ms: Set(now),
            ..Default::default()
        });
    }
    insert_chunks(db, rows).await?;
    Ok(plaintexts)
}

fn write_keys(path: &std::path::Path, keys: &[String]) -> Result<(), Failure> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for key in keys {
        writeln!(file, "{key}")?;
    }
    file.flush()?;
    Ok(())
}

/// How seller keys are laid out over models and sellers.
struct KeyPlan<'a> {
    upstream: String,
    models: &'a [String],
    models_per_key: usize,
    seller_ids: &'a [i64],
    declared_balance: i64,
    check_spread_ms: i64,
    now: i64,
}

impl KeyPlan<'_> {
    /// Key `i` serves `models_per_key` models spread evenly: every model gets the same number of keys.
    fn models_of(&self, i: usize) -> String {
        let n = self.models.len();
        let stride = (n / self.models_per_key).max(1);
        let mut chosen: Vec<&str> = Vec::with_capacity(self.models_per_key);
        for j in 0..self.models_per_key {
            let mut index = (i + j * stride) % n;
            while chosen.contains(&self.models[index].as_str()) {
                index = (index + 1) % n;
            }
            chosen.push(&self.models[index]);
        }
        chosen.join(",")
    }

    fn row(&self, keyring: &Keyring, i: usize, slow: bool) -> Result<hosted_keys::ActiveModel, Failure> {
        let uid = uuid::Uuid::now_v7().to_string();
        let random = credentials::random_base62(12);
        let (api_key, models) = if slow {
            (format!("sk-mock-slow-bench-{i:06}-{random}"), SLOW_MODEL.to_string())
        } else {
            (format!("sk-mock-bench-{i:06}-{random}"), self.models_of(i))
        };
        let api_key_enc = keyring.try_encrypt(&api_key, &hosted_key_aad(&uid))?;
        let owner_id = self.seller_ids[i % self.seller_ids.len()];
        let next_check = self.now + rand::thread_rng().gen_range(0..self.check_spread_ms);
        Ok(hosted_keys::ActiveModel {
            uid: Set(uid),
            owner_id: Set(owner_id),
            name: Set(format!("bench-{i:06}")),
            provider: Set("openai".into()),
            base_url: Set(self.upstream.clone()),
            models: Set(models),
            api_key_enc: Set(api_key_enc),
            key_hint: Set(crypto::mask_api_key(&api_key)),
            status: Set("active".into()),
            declared_balance: Set(self.declared_balance),
            remaining_balance: Set(self.declared_balance),
            failure_count: Set(0),
            success_count: Set(0),
            last_used_at_ms: Set(None),
            last_failure_at_ms: Set(None),
            created_at_ms: Set(self.now),
            updated_at_ms: Set(self.now),
            pool: Set("seller".into()),
            priority: Set(0),
            // No cap: the slow-stream test runs 10,000 streams at once over a few keys.
            max_concurrency: Set(0),
            max_spend_per_day: Set(0),
            spent_today: Set(0),
            spend_day: Set(0),
            balance_api: Set(String::new()),
            verified_at_ms: Set(Some(self.now)),
            next_check_at_ms: Set(next_check),
            review: Set(String::new()),
            status_cause: Set(String::new()),
            checked_successes: Set(0),
            checked_failures: Set(0),
            ..Default::default()
        })
    }
}

/// Multi-row inserts of `CHUNK` rows, `PARALLEL_CHUNKS` at a time.
async fn insert_chunks<A>(db: &DatabaseConnection, rows: Vec<A>) -> Result<(), Failure>
where
    A: sea_orm::ActiveModelTrait + Send + 'static,
    <A::Entity as EntityTrait>::Model: sea_orm::IntoActiveModel<A>,
{
    let mut chunks = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        chunks.push(rows.by_ref().take(CHUNK).collect::<Vec<A>>());
    }
    futures::stream::iter(chunks)
        .map(|chunk| async move { <A::Entity as EntityTrait>::insert_many(chunk).exec_without_returning(db).await })
        .buffer_unordered(PARALLEL_CHUNKS)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(())
}
