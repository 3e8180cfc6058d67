//! Hourly usage rollups (docs/reports.md): the usage writer adds each batch's new records to
//! `usage_rollups_buyer` (hour, buyer key, model), `usage_rollups_seller` (hour, hosted key, model) and
//! `usage_rollups_platform` (hour, model) inside the batch's settlement transaction, so the rollups always
//! agree with the usage records and the ledger, and a retried batch (whose records are skipped as
//! duplicates) adds nothing.
//!
//! Each group is one `UPDATE ... SET n = n + ?` (several gateway nodes add to the same rows, so a
//! read-modify-write would lose increments); a group without a row is inserted, and an insert that meets
//! the unique index (another node inserted the row meanwhile) falls back to the update. On MySQL sqlx
//! connects with CLIENT_FOUND_ROWS, so the update's affected rows are the rows it matched, which is what
//! "has a row" means here (on SQLite they are the same). Groups are applied in key order, so concurrent
//! writers lock rows in the same order.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, SqlErr, Statement, Value};

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

impl Table {
    fn update_sql(&self) -> String {
        let set: Vec<String> = COUNTER_COLUMNS.iter().map(|c| format!("{c} = {c} + ?")).collect();
        let filter: Vec<String> = self.key.iter().map(|c| format!("{c} = ?")).collect();
        format!("UPDATE {} SET {} WHERE {}", self.name, set.join(", "), filter.join(" AND "))
    }

    fn insert_sql(&self) -> String {
        let mut columns: Vec<&str> = self.key.to_vec();
        columns.extend(self.owner);
        columns.extend(COUNTER_COLUMNS);
        let placeholders = vec!["?"; columns.len()].join(", ");
        format!("INSERT INTO {} ({}) VALUES ({placeholders})", self.name, columns.join(", "))
    }
}

/// Adds the batch's deltas to the rollups, inside the caller's transaction.
pub async fn apply(c: &impl ConnectionTrait, rollups: &Rollups) -> Result<(), DbErr> {
    for ((hour, key_id, model), (buyer_id, counters)) in &rollups.buyer {
        let key = [Value::from(*hour), Value::from(*key_id), Value::from(model.as_str())];
        add_to_row(c, &BUYER, &key, Some(*buyer_id), counters).await?;
    }
    for ((hour, key_id, model), (owner_id, counters)) in &rollups.seller {
        let key = [Value::from(*hour), Value::from(*key_id), Value::from(model.as_str())];
        add_to_row(c, &SELLER, &key, Some(*owner_id), counters).await?;
    }
    for ((hour, model), counters) in &rollups.platform {
        let key = [Value::from(*hour), Value::from(model.as_str())];
        add_to_row(c, &PLATFORM, &key, None, counters).await?;
    }
    Ok(())
}

async fn add_to_row(
    c: &impl ConnectionTrait,
    table: &Table,
    key: &[Value],
    owner: Option<i64>,
    counters: &Counters,
) -> Result<(), DbErr> {
    if update_row(c, table, key, counters).await? {
        return Ok(());
    }
    match insert_row(c, table, key, owner, counters).await {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            // Another node inserted the row after our update found none: add to theirs. (A failed
            // statement does not end the transaction, on MySQL nor on SQLite.)
            if update_row(c, table, key, counters).await? {
                Ok(())
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

/// Whether a row matched (see the module docs for MySQL's affected rows).
async fn update_row(
    c: &impl ConnectionTrait,
    table: &Table,
    key: &[Value],
    counters: &Counters,
) -> Result<bool, DbErr> {
    let mut values: Vec<Value> = counters.values().into();
    values.extend(key.iter().cloned());
    let result =
        c.execute(Statement::from_sql_and_values(c.get_database_backend(), table.update_sql(), values)).await?;
    Ok(result.rows_affected() > 0)
}

async fn insert_row(
    c: &impl ConnectionTrait,
    table: &Table,
    key: &[Value],
    owner: Option<i64>,
    counters: &Counters,
) -> Result<(), DbErr> {
    let mut values: Vec<Value> = key.to_vec();
    values.extend(owner.map(Value::from));
    values.extend(counters.values());
    c.execute(Statement::from_sql_and_values(c.get_database_backend(), table.insert_sql(), values)).await?;
    Ok(())
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
    /// MariaDB the second writer's update or insert waits for the first transaction's lock on the new row
    /// (its update then matches it, or its insert fails as a duplicate and the update follows); SQLite
    /// serialises writers, so there the second writer simply finds the row.
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

    #[tokio::test]
    async fn an_insert_that_meets_the_unique_index_falls_back_to_the_update() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let key = [Value::from(hour_of(T0)), Value::from(3i64), Value::from("m")];
            insert_row(db, &BUYER, &key, Some(7), &counters(1, 10)).await.unwrap();
            let err = insert_row(db, &BUYER, &key, Some(7), &counters(1, 10)).await.unwrap_err();
            assert!(matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))), "{l}: {err}");
            // Inside a transaction the failed insert leaves the transaction usable.
            let txn = db.begin().await.unwrap();
            assert!(insert_row(&txn, &BUYER, &key, Some(7), &counters(1, 10)).await.is_err());
            assert!(update_row(&txn, &BUYER, &key, &counters(2, 20)).await.unwrap(), "{l}");
            txn.commit().await.unwrap();
            let rows = buyer_rows(db).await;
            assert_eq!((rows.len(), rows[0].requests, rows[0].cost_credits), (1, 3, 30), "{l}");
            t.cleanup().await;
        }
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
