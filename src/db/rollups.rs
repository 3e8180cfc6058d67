//! Hourly usage rollups (docs/reports.md): the usage writer adds each batch's new records to
//! `usage_rollups_buyer` (hour, buyer key, model), `usage_rollups_seller` (hour, hosted key, model) and
//! `usage_rollups_platform` (hour, model) inside the batch's settlement transaction, so the rollups always
//! agree with the usage records and the ledger, and a retried batch (whose records are skipped as
//! duplicates) adds nothing.
//!
//! A batch's deltas go in with one multi-row upsert per table (per `ROWS_PER_UPSERT` rows): a row that
//! exists gets the deltas added in the database (`n = n + delta`: several gateway nodes add to the same
//! rows, so a read-modify-write would lose increments), a missing row is inserted. MySQL writes it
//! `ON DUPLICATE KEY UPDATE n = n + VALUES(n)`, SQLite `ON CONFLICT (key) DO UPDATE SET n = n + excluded.n`.
//! Rows go in key order (the unique index's), so concurrent writers lock them in the same order; one that
//! meets a row another transaction has just inserted waits for it and adds to it.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, Statement, Value};

pub const HOUR_MS: i64 = 3_600_000;

/// The start of the UTC hour of `ms`.
pub fn hour_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR_MS)
}

/// The counters of one rollup row, as added by one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub requests: i64,
    pub failed_requests: i64,
    pub fallback_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_credits: i64,
    pub paid_credits: i64,
    pub seller_credits: i64,
    pub platform_credits: i64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.requests = self.requests.saturating_add(o.requests);
        self.failed_requests = self.failed_requests.saturating_add(o.failed_requests);
        self.fallback_requests = self.fallback_requests.saturating_add(o.fallback_requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.cost_credits = self.cost_credits.saturating_add(o.cost_credits);
        self.paid_credits = self.paid_credits.saturating_add(o.paid_credits);
        self.seller_credits = self.seller_credits.saturating_add(o.seller_credits);
        self.platform_credits = self.platform_credits.saturating_add(o.platform_credits);
    }

    fn values(&self) -> [Value; 9] {
        [
            self.requests.into(),
            self.failed_requests.into(),
            self.fallback_requests.into(),
            self.prompt_tokens.into(),
            self.completion_tokens.into(),
            self.cost_credits.into(),
            self.paid_credits.into(),
            self.seller_credits.into(),
            self.platform_credits.into(),
        ]
    }
}

const COUNTER_COLUMNS: [&str; 9] = [
    "requests",
    "failed_requests",
    "fallback_requests",
    "prompt_tokens",
    "completion_tokens",
    "cost_credits",
    "paid_credits",
    "seller_credits",
    "platform_credits",
];

/// One usage record as the rollups see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollupRecord<'a> {
    pub created_at_ms: i64,
    pub buyer_id: i64,
    pub buyer_key_id: i64,
    /// The key that served it, with the key's owner.
    pub hosted_key: Option<(i64, i64)>,
    /// As stored in the usage record (truncated to the column).
    pub model: &'a str,
    pub counters: Counters,
}

/// A batch's rollup deltas, one entry per row to change, in the order the rows are updated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollups {
    /// (hour, buyer key, model) -> (buyer, counters).
    pub buyer: BTreeMap<(i64, i64, String), (i64, Counters)>,
    /// (hour, hosted key, model) -> (owner, counters).
    pub seller: BTreeMap<(i64, i64, String), (i64, Counters)>,
    /// (hour, model) -> counters.
    pub platform: BTreeMap<(i64, String), Counters>,
}

impl Rollups {
    pub fn add(&mut self, r: &RollupRecord<'_>) {
        let hour = hour_of(r.created_at_ms);
        let model = r.model.to_string();
        let buyer =
            self.buyer.entry((hour, r.buyer_key_id, model.clone())).or_insert((r.buyer_id, Counters::default()));
        buyer.1.add(&r.counters);
        if let Some((key_id, owner_id)) = r.hosted_key {
            let seller = self.seller.entry((hour, key_id, model.clone())).or_insert((owner_id, Counters::default()));
            seller.1.add(&r.counters);
        }
        self.platform.entry((hour, model)).or_default().add(&r.counters);
    }

    pub fn is_empty(&self) -> bool {
        self.buyer.is_empty() && self.platform.is_empty()
    }
}

/// One rollup table: its name, the columns of its unique key, and the owner column set on insert.
struct Table {
    name: &'static str,
    key: &'static [&'static str],
    owner: Option<&'static str>,
}

const BUYER: Table =
    Table { name: "usage_rollups_buyer", key: &["hour_ms", "buyer_key_id", "model"], owner: Some("buyer_id") };
const SELLER: Table =
    Table { name: "usage_rollups_seller", key: &["hour_ms", "hosted_key_id", "model"], owner: Some("owner_id") };
const PLATFORM: Table = Table { name: "usage_rollups_platform", key: &["hour_ms", "model"], owner: None };

/// Rows per upsert: at 13 values per row, far below the placeholder limits of SQLite (32766) and MySQL
/// (65535).
const ROWS_PER_UPSERT: usize = 1_000;

impl Table {
    fn columns(&self) -> Vec<&'static str> {
        let mut columns: Vec<&str> = self.key.to_vec();
        columns.extend(self.owner);
        columns.extend(COUNTER_COLUMNS);
        columns
    }

    /// Inserts `rows` rows, adding the counters of those that meet an existing row to it.
    fn upsert_sql(&self, backend: DbBackend, rows: usize) -> String {
        let columns = self.columns();
        let row = format!("({})", vec!["?"; columns.len()].join(", "));
        let values = vec![row.as_str(); rows].join(", ");
        let add = |new: &dyn Fn(&str) -> String| -> String {
            COUNTER_COLUMNS.iter().map(|c| format!("{c} = {c} + {}", new(c))).collect::<Vec<_>>().join(", ")
        };
        let on_conflict = match backend {
            DbBackend::MySql => format!("ON DUPLICATE KEY UPDATE {}", add(&|c| format!("VALUES({c})"))),
            _ => format!("ON CONFLICT ({}) DO UPDATE SET {}", self.key.join(", "), add(&|c| format!("excluded.{c}"))),
        };
        format!("INSERT INTO {} ({}) VALUES {values} {on_conflict}", self.name, columns.join(", "))
    }
}

/// Adds the batch's deltas to the rollups, inside the caller's transaction.
pub async fn apply(c: &impl ConnectionTrait, rollups: &Rollups) -> Result<(), DbErr> {
    for statement in upserts(c.get_database_backend(), rollups) {
        c.execute(statement).await?;
    }
    Ok(())
}

/// The upserts of a batch: per table, one per `ROWS_PER_UPSERT` rows, rows in key order.
fn upserts(backend: DbBackend, rollups: &Rollups) -> Vec<Statement> {
    let buyer = rollups.buyer.iter().map(|((hour, key_id, model), (buyer_id, counters))| {
        (vec![Value::from(*hour), Value::from(*key_id), Value::from(model.as_str()), Value::from(*buyer_id)], counters)
    });
    let seller = rollups.seller.iter().map(|((hour, key_id, model), (owner_id, counters))| {
        (vec![Value::from(*hour), Value::from(*key_id), Value::from(model.as_str()), Value::from(*owner_id)], counters)
    });
    let platform = rollups
        .platform
        .iter()
        .map(|((hour, model), counters)| (vec![Value::from(*hour), Value::from(model.as_str())], counters));
    let mut statements = table_upserts(backend, &BUYER, buyer);
    statements.extend(table_upserts(backend, &SELLER, seller));
    statements.extend(table_upserts(backend, &PLATFORM, platform));
    statements
}

/// `rows`: the key and owner values of each row, with its deltas.
fn table_upserts<'a>(
    backend: DbBackend,
    table: &Table,
    rows: impl Iterator<Item = (Vec<Value>, &'a Counters)>,
) -> Vec<Statement> {
    let mut statements = Vec::new();
    let mut rows = rows.peekable();
    while rows.peek().is_some() {
        let mut values = Vec::new();
        let mut n = 0;
        for (key, counters) in rows.by_ref().take(ROWS_PER_UPSERT) {
            values.extend(key);
            values.extend(counters.values());
            n += 1;
        }
        statements.push(Statement::from_sql_and_values(backend, table.upsert_sql(backend, n), values));
    }
    statements
}

#[derive(Debug, FromQueryResult)]
struct KeyOwner {
    id: i64,
    owner_id: i64,
}

/// The owners of the hosted keys (keys are never deleted and never change owner, so callers may cache).
pub async fn key_owners(c: &impl ConnectionTrait, key_ids: &[i64]) -> Result<HashMap<i64, i64>, DbErr> {
    let mut owners = HashMap::with_capacity(key_ids.len());
    for chunk in key_ids.chunks(500) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let sql = format!("SELECT id, owner_id FROM hosted_keys WHERE id IN ({placeholders})");
        let values: Vec<Value> = chunk.iter().map(|&id| id.into()).collect();
        let rows = KeyOwner::find_by_statement(Statement::from_sql_and_values(c.get_database_backend(), sql, values))
            .all(c)
            .await?;
        owners.extend(rows.into_iter().map(|r| (r.id, r.owner_id)));
    }
    Ok(owners)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::entities::{usage_rollups_buyer, usage_rollups_platform, usage_rollups_seller};
    use crate::db::testing::TestDb;
    use sea_orm::{DbBackend, EntityTrait, QueryOrder, TransactionTrait};

    const T0: i64 = 1_750_000_000_000;

    fn counters(requests: i64, cost: i64) -> Counters {
        Counters {
            requests,
            failed_requests: requests / 2,
            fallback_requests: 1,
            prompt_tokens: 10 * requests,
            completion_tokens: 20 * requests,
            cost_credits: cost,
            paid_credits: cost - 1,
            seller_credits: (cost - 1) * 95 / 100,
            platform_credits: (cost - 1) - (cost - 1) * 95 / 100,
        }
    }

    fn record(at: i64, buyer_key_id: i64, hosted: Option<(i64, i64)>, model: &str, c: Counters) -> RollupRecord<'_> {
        RollupRecord { created_at_ms: at, buyer_id: 7, buyer_key_id, hosted_key: hosted, model, counters: c }
    }

    #[test]
    fn hours_start_on_the_hour() {
        assert_eq!(hour_of(0), 0);
        assert_eq!(hour_of(HOUR_MS - 1), 0);
        assert_eq!(hour_of(HOUR_MS), HOUR_MS);
        assert_eq!(hour_of(T0) % HOUR_MS, 0);
        assert!(T0 - hour_of(T0) < HOUR_MS);
    }

    #[test]
    fn a_batch_is_aggregated_per_row() {
        let mut r = Rollups::default();
        r.add(&record(T0, 1, Some((5, 50)), "m", counters(1, 10)));
        r.add(&record(T0 + 1, 1, Some((5, 50)), "m", counters(2, 20)));
        r.add(&record(T0, 2, None, "m", counters(1, 5)));
        r.add(&record(T0 + HOUR_MS, 1, Some((6, 60)), "m", counters(1, 7)));
        assert_eq!(r.buyer.len(), 3);
        assert_eq!(r.buyer[&(hour_of(T0), 1, "m".to_string())].1.requests, 3);
        assert_eq!(r.buyer[&(hour_of(T0), 1, "m".to_string())].1.cost_credits, 30);
        // A request no key served is on the buyer and platform side only.
        assert_eq!(r.seller.len(), 2);
        assert_eq!(r.seller[&(hour_of(T0), 5, "m".to_string())].0, 50);
        assert_eq!(r.platform[&(hour_of(T0), "m".to_string())].requests, 4);
        assert_eq!(r.platform[&(hour_of(T0) + HOUR_MS, "m".to_string())].requests, 1);
    }

    async fn buyer_rows(db: &impl ConnectionTrait) -> Vec<usage_rollups_buyer::Model> {
        usage_rollups_buyer::Entity::find().order_by_asc(usage_rollups_buyer::Column::Id).all(db).await.unwrap()
    }

    #[tokio::test]
    async fn deltas_are_added_to_existing_rows() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let mut batch = Rollups::default();
            batch.add(&record(T0, 1, Some((5, 50)), "gpt-4o", counters(2, 10)));
            batch.add(&record(T0, 1, Some((5, 50)), "GPT-4o", counters(1, 10)));
            apply(db, &batch).await.unwrap();
            apply(db, &batch).await.unwrap();
            let rows = buyer_rows(db).await;
            // Model names differ by case only: two rows on both databases (binary collation on MySQL).
            assert_eq!(rows.len(), 2, "{l}");
            let lower = rows.iter().find(|r| r.model == "gpt-4o").unwrap();
            let c = counters(2, 10);
            assert_eq!(
                (lower.hour_ms, lower.buyer_id, lower.buyer_key_id, lower.requests, lower.failed_requests),
                (hour_of(T0), 7, 1, 4, 2),
                "{l}"
            );
            assert_eq!(
                (lower.prompt_tokens, lower.completion_tokens, lower.cost_credits, lower.paid_credits),
                (2 * c.prompt_tokens, 2 * c.completion_tokens, 20, 18),
                "{l}"
            );
            assert_eq!((lower.seller_credits, lower.platform_credits), (2 * c.seller_credits, 2 * c.platform_credits));
            let sellers = usage_rollups_seller::Entity::find().all(db).await.unwrap();
            assert_eq!(sellers.len(), 2, "{l}");
            assert!(sellers.iter().all(|s| s.owner_id == 50 && s.hosted_key_id == 5), "{l}");
            let platform = usage_rollups_platform::Entity::find().all(db).await.unwrap();
            assert_eq!(platform.iter().map(|p| p.requests).sum::<i64>(), 6, "{l}");
            t.cleanup().await;
        }
    }

    /// Two gateway nodes add the first delta of a new row at once: the second adds to the first's row. On
    /// MariaDB the second writer's upsert meets the first transaction's uncommitted row, waits for its lock
    /// and then adds to it; SQLite serialises writers, so there the second writer simply finds the row.
    #[tokio::test]
    async fn a_concurrent_insert_of_the_same_row_is_added_to() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let mut batch = Rollups::default();
            batch.add(&record(T0, 1, Some((5, 50)), "m", counters(1, 10)));
            let first = db.begin().await.unwrap();
            apply(&first, &batch).await.unwrap();
            if db.get_database_backend() == DbBackend::MySql {
                let second_db = db.clone();
                let second_batch = batch.clone();
                let second = tokio::spawn(async move {
                    let txn = crate::db::ledger::begin(&second_db).await?;
                    apply(&txn, &second_batch).await?;
                    txn.commit().await
                });
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                first.commit().await.unwrap();
                second.await.unwrap().unwrap();
            } else {
                first.commit().await.unwrap();
                apply(db, &batch).await.unwrap();
            }
            let rows = buyer_rows(db).await;
            assert_eq!(rows.len(), 1, "{l}");
            assert_eq!((rows[0].requests, rows[0].cost_credits), (2, 20), "{l}");
            t.cleanup().await;
        }
    }

    /// A batch of more rows than one statement takes, applied twice: every row once, with twice the deltas.
    #[tokio::test]
    async fn large_batches_are_upserted_in_chunks() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let models: Vec<String> = (0..5).map(|m| format!("m{m}")).collect();
            let mut batch = Rollups::default();
            for key in 0..500 {
                for model in &models {
                    batch.add(&record(T0, key, Some((key, 9)), model, counters(1, 3)));
                }
            }
            assert!(batch.buyer.len() > 2 * ROWS_PER_UPSERT);
            let txn = crate::db::ledger::begin(db).await.unwrap();
            apply(&txn, &batch).await.unwrap();
            apply(&txn, &batch).await.unwrap();
            txn.commit().await.unwrap();
            let rows = buyer_rows(db).await;
            assert_eq!(rows.len(), 2_500, "{l}");
            assert!(rows.iter().all(|r| (r.requests, r.cost_credits, r.buyer_id) == (2, 6, 7)), "{l}");
            let sellers = usage_rollups_seller::Entity::find().all(db).await.unwrap();
            assert_eq!((sellers.len(), sellers.iter().map(|s| s.requests).sum::<i64>()), (2_500, 5_000), "{l}");
            let platform = usage_rollups_platform::Entity::find().all(db).await.unwrap();
            assert_eq!((platform.len(), platform.iter().map(|p| p.requests).sum::<i64>()), (5, 5_000), "{l}");
            t.cleanup().await;
        }
    }

    /// Several gateway nodes add overlapping batches (new rows and existing ones) at the same time: no
    /// writer fails (no deadlock on MariaDB, no "database is locked" on SQLite) and no increment is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_neither_deadlock_nor_lose_increments() {
        const WRITERS: i64 = 4;
        const ROUNDS: i64 = 6;
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let db = db.clone();
                    tokio::spawn(async move {
                        for round in 0..ROUNDS {
                            // Each round shares most rows with the other writers and adds new ones.
                            let mut batch = Rollups::default();
                            for key in (w * 7 + round * 40)..(w * 7 + round * 40 + 200) {
                                batch.add(&record(T0 + round, key % 300, Some((key % 50, 9)), "m", counters(1, 2)));
                            }
                            let txn = crate::db::ledger::begin(&db).await?;
                            apply(&txn, &batch).await?;
                            txn.commit().await?;
                        }
                        Ok::<_, DbErr>(())
                    })
                })
                .collect();
            for writer in writers {
                writer.await.unwrap().unwrap_or_else(|e| panic!("{l}: {e}"));
            }
            let expected = WRITERS * ROUNDS * 200;
            let rows = buyer_rows(db).await;
            assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), expected, "{l}");
            assert_eq!(rows.iter().map(|r| r.cost_credits).sum::<i64>(), 2 * expected, "{l}");
            assert_eq!(rows.len(), 300, "{l}: one row per key");
            let sellers = usage_rollups_seller::Entity::find().all(db).await.unwrap();
            assert_eq!((sellers.len(), sellers.iter().map(|s| s.requests).sum::<i64>()), (50, expected), "{l}");
            let platform = usage_rollups_platform::Entity::find().all(db).await.unwrap();
            assert_eq!((platform.len(), platform[0].requests), (1, expected), "{l}");
            t.cleanup().await;
        }
    }

    #[test]
    fn upserts_add_in_each_dialect() {
        let sql = BUYER.upsert_sql(DbBackend::MySql, 2);
        assert!(sql.contains("), (") && sql.contains("ON DUPLICATE KEY UPDATE requests = requests + VALUES(requests)"));
        let sql = PLATFORM.upsert_sql(DbBackend::Sqlite, 1);
        assert!(sql.contains("ON CONFLICT (hour_ms, model) DO UPDATE SET requests = requests + excluded.requests"));
        assert!(!sql.contains("owner"), "{sql}");
    }

    #[tokio::test]
    async fn key_owners_are_read_in_one_query_per_chunk() {
        for t in TestDb::all().await {
            let db = &t.db;
            let a =
                crate::db::hosted_keys::insert(db, crate::db::hosted_keys::tests::new_key(11, "uid-a")).await.unwrap();
            let b =
                crate::db::hosted_keys::insert(db, crate::db::hosted_keys::tests::new_key(12, "uid-b")).await.unwrap();
            let owners = key_owners(db, &[a.id, b.id, 999]).await.unwrap();
            assert_eq!(owners, HashMap::from([(a.id, 11), (b.id, 12)]), "{}", t.label);
            assert!(key_owners(db, &[]).await.unwrap().is_empty());
            t.cleanup().await;
        }
    }
}
