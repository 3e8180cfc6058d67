//! Queries over `hosted_keys` (seller keys in the pool).

use std::collections::BTreeMap;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Select, Statement, TransactionTrait, Value,
};

pub use super::entities::hosted_keys::{ActiveModel, Column, Entity, Model};

pub struct NewHostedKey {
    pub uid: String,
    pub owner_id: i64,
    pub name: String,
    pub provider: String,
    pub base_url: String,
    /// Comma-separated model names.
    pub models: String,
    pub api_key_enc: String,
    pub key_hint: String,
    pub status: String,
    pub declared_balance: i64,
    pub now_ms: i64,
    /// `seller` or `platform` (a fallback key).
    pub pool: String,
    /// Fallback keys are tried in ascending priority.
    pub priority: i64,
    /// 0 = no cap.
    pub max_concurrency: i64,
    pub max_spend_per_day: i64,
    /// Empty: derived from the provider.
    pub balance_api: String,
    pub verified_at_ms: Option<i64>,
}

pub async fn insert(db: &impl ConnectionTrait, new: NewHostedKey) -> Result<Model, DbErr> {
    ActiveModel {
        uid: Set(new.uid),
        owner_id: Set(new.owner_id),
        name: Set(new.name),
        provider: Set(new.provider),
        base_url: Set(new.base_url),
        models: Set(new.models),
        api_key_enc: Set(new.api_key_enc),
        key_hint: Set(new.key_hint),
        status: Set(new.status),
        declared_balance: Set(new.declared_balance),
        remaining_balance: Set(new.declared_balance),
        failure_count: Set(0),
        success_count: Set(0),
        last_used_at_ms: Set(None),
        last_failure_at_ms: Set(None),
        created_at_ms: Set(new.now_ms),
        updated_at_ms: Set(new.now_ms),
        pool: Set(new.pool),
        priority: Set(new.priority),
        max_concurrency: Set(new.max_concurrency),
        max_spend_per_day: Set(new.max_spend_per_day),
        spent_today: Set(0),
        spend_day: Set(0),
        balance_api: Set(new.balance_api),
        verified_at_ms: Set(new.verified_at_ms),
        next_check_at_ms: Set(0),
        review: Set(String::new()),
        status_cause: Set(String::new()),
        checked_successes: Set(0),
        checked_failures: Set(0),
        pool_changed_at_ms: Set(new.now_ms),
        ..Default::default()
    }
    .insert(db)
    .await
}

/// Every key whatever its status (the pool counts paused, depleted and flagged keys too).
pub async fn list_all(db: &impl ConnectionTrait) -> Result<Vec<Model>, DbErr> {
    Entity::find().order_by_asc(Column::Id).all(db).await
}

/// The columns of a key that the gateway's pool snapshot is built from: a reload of 100,000 keys reads
/// these, not whole rows.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct PoolRow {
    pub id: i64,
    pub uid: String,
    pub owner_id: i64,
    pub provider: String,
    pub base_url: String,
    /// Comma-separated model names.
    pub models: String,
    pub api_key_enc: String,
    pub status: String,
    pub pool: String,
    pub remaining_balance: i64,
    pub priority: i64,
    pub max_concurrency: i64,
    pub max_spend_per_day: i64,
    pub spent_today: i64,
    pub spend_day: i64,
}

fn pool_rows_query() -> Select<Entity> {
    Entity::find().select_only().columns([
        Column::Id,
        Column::Uid,
        Column::OwnerId,
        Column::Provider,
        Column::BaseUrl,
        Column::Models,
        Column::ApiKeyEnc,
        Column::Status,
        Column::Pool,
        Column::RemainingBalance,
        Column::Priority,
        Column::MaxConcurrency,
        Column::MaxSpendPerDay,
        Column::SpentToday,
        Column::SpendDay,
    ])
}

/// Every key whatever its status, for the pool snapshot (in no particular order).
pub async fn pool_rows(db: &impl ConnectionTrait) -> Result<Vec<PoolRow>, DbErr> {
    pool_rows_query().into_model::<PoolRow>().all(db).await
}

/// The keys whose pool columns changed at or after `since_ms` (`pool_changed_at_ms`), in no particular order
/// (an `ORDER BY id` could make MySQL scan the whole table in id order rather than the index range).
pub async fn pool_rows_changed_since(db: &impl ConnectionTrait, since_ms: i64) -> Result<Vec<PoolRow>, DbErr> {
    pool_rows_query().filter(Column::PoolChangedAtMs.gte(since_ms)).into_model::<PoolRow>().all(db).await
}

/// How many keys there are, whatever their status. A plain `COUNT(*)` (the paginator's count wraps the
/// whole select in a derived table, which MySQL materialises).
pub async fn count(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    let n: Option<i64> = Entity::find().select_only().column_as(Column::Id.count(), "n").into_tuple().one(db).await?;
    Ok(n.unwrap_or(0))
}

pub async fn list_for_owner(db: &impl ConnectionTrait, owner_id: i64) -> Result<Vec<Model>, DbErr> {
    Entity::find().filter(Column::OwnerId.eq(owner_id)).order_by_asc(Column::Id).all(db).await
}

/// The platform's fallback keys, in the order they are tried (priority, then id).
pub async fn list_platform(db: &impl ConnectionTrait) -> Result<Vec<Model>, DbErr> {
    Entity::find()
        .filter(Column::Pool.eq("platform"))
        .order_by_asc(Column::Priority)
        .order_by_asc(Column::Id)
        .all(db)
        .await
}

pub async fn find(db: &impl ConnectionTrait, key_id: i64) -> Result<Option<Model>, DbErr> {
    Entity::find_by_id(key_id).one(db).await
}

/// Changes a platform key's priority and/or name. Returns whether a platform key with this id exists.
pub async fn update_platform(
    db: &impl ConnectionTrait,
    key_id: i64,
    priority: Option<i64>,
    name: Option<&str>,
    now_ms: i64,
) -> Result<bool, DbErr> {
    let mut update = Entity::update_many()
        .col_expr(Column::UpdatedAtMs, Expr::value(now_ms))
        .col_expr(Column::PoolChangedAtMs, Expr::value(now_ms));
    if let Some(priority) = priority {
        update = update.col_expr(Column::Priority, Expr::value(priority));
    }
    if let Some(name) = name {
        update = update.col_expr(Column::Name, Expr::value(name));
    }
    let result = update.filter(Column::Id.eq(key_id)).filter(Column::Pool.eq("platform")).exec(db).await?;
    Ok(result.rows_affected > 0)
}

/// What a seller may change on a key of theirs (None: unchanged).
#[derive(Clone, Debug, Default)]
pub struct SellerKeyUpdate<'a> {
    pub name: Option<&'a str>,
    pub max_concurrency: Option<i64>,
    pub max_spend_per_day: Option<i64>,
    pub balance_api: Option<&'a str>,
}

/// Changes a seller's key (one in the seller pool that `owner_id` owns). Returns whether such a key exists.
pub async fn update_seller(
    db: &impl ConnectionTrait,
    owner_id: i64,
    key_id: i64,
    changes: &SellerKeyUpdate<'_>,
    now_ms: i64,
) -> Result<bool, DbErr> {
    let mut update = Entity::update_many()
        .col_expr(Column::UpdatedAtMs, Expr::value(now_ms))
        .col_expr(Column::PoolChangedAtMs, Expr::value(now_ms));
    if let Some(name) = changes.name {
        update = update.col_expr(Column::Name, Expr::value(name));
    }
    if let Some(cap) = changes.max_concurrency {
        update = update.col_expr(Column::MaxConcurrency, Expr::value(cap));
    }
    if let Some(cap) = changes.max_spend_per_day {
        update = update.col_expr(Column::MaxSpendPerDay, Expr::value(cap));
    }
    if let Some(api) = changes.balance_api {
        update = update.col_expr(Column::BalanceApi, Expr::value(api));
    }
    let result = update
        .filter(Column::Id.eq(key_id))
        .filter(Column::OwnerId.eq(owner_id))
        .filter(Column::Pool.eq("seller"))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// The key if it belongs to `owner_id`.
pub async fn find_for_owner(db: &impl ConnectionTrait, owner_id: i64, key_id: i64) -> Result<Option<Model>, DbErr> {
    Entity::find().filter(Column::Id.eq(key_id)).filter(Column::OwnerId.eq(owner_id)).one(db).await
}

/// Moves the key from status `from` to `to` if it belongs to `owner_id` and is still in `from`, as one
/// conditional UPDATE so that a concurrent change (say, risk control flagging the key) is never
/// overwritten. Returns whether the row changed.
pub async fn transition_status(
    db: &impl ConnectionTrait,
    owner_id: i64,
    key_id: i64,
    from: &str,
    to: &str,
    now_ms: i64,
) -> Result<bool, DbErr> {
    transition_status_with_cause(db, owner_id, key_id, from, to, "", now_ms).await
}

/// [`transition_status`] that also records what caused the new status (`status_cause`: seller, admin,
/// failures, verification, dilution, balance; empty for active).
pub async fn transition_status_with_cause(
    db: &impl ConnectionTrait,
    owner_id: i64,
    key_id: i64,
    from: &str,
    to: &str,
    cause: &str,
    now_ms: i64,
) -> Result<bool, DbErr> {
    let result = Entity::update_many()
        .col_expr(Column::Status, Expr::value(to))
        .col_expr(Column::StatusCause, Expr::value(cause))
        .col_expr(Column::UpdatedAtMs, Expr::value(now_ms))
        .col_expr(Column::PoolChangedAtMs, Expr::value(now_ms))
        .filter(Column::Id.eq(key_id))
        .filter(Column::OwnerId.eq(owner_id))
        .filter(Column::Status.eq(from))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Replaces the stored ciphertext if it is still `expected`: a key rotation running on two machines, or
/// racing with a seller's change, never overwrites a newer value. Returns whether the row changed.
pub async fn replace_ciphertext(
    db: &impl ConnectionTrait,
    key_id: i64,
    expected: &str,
    replacement: &str,
    now_ms: i64,
) -> Result<bool, DbErr> {
    let result = Entity::update_many()
        .col_expr(Column::ApiKeyEnc, Expr::value(replacement))
        .col_expr(Column::UpdatedAtMs, Expr::value(now_ms))
        .col_expr(Column::PoolChangedAtMs, Expr::value(now_ms))
        .filter(Column::Id.eq(key_id))
        .filter(Column::ApiKeyEnc.eq(expected))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// What the gateway observed for one key over a batch of requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyOutcome {
    pub key_id: i64,
    pub successes: i64,
    pub failures: i64,
    pub last_used_at_ms: Option<i64>,
    pub last_failure_at_ms: Option<i64>,
    /// Credits settled on requests this key served: taken off its remaining balance.
    pub spent: i64,
}

/// Keys per update. The database tries the `CASE id` arms one by one for each row and column (up to six
/// columns here), so a chunk costs the square of its size (see `ledger::CASE_CHUNK`); at about 7 ns per arm
/// on MariaDB, 100 keys cost about what a round trip does.
const KEYS_PER_UPDATE: usize = 100;

/// Adds the counts with `col = col + n` (several gateway nodes update the same keys concurrently, so a
/// read-modify-write would lose increments) and moves the timestamps forward, never back, atomically: one
/// `UPDATE ... SET col = CASE id WHEN ... END ... WHERE id IN (...)` per `KEYS_PER_UPDATE` keys (a round
/// trip per key made this the slowest phase of a usage batch on MySQL). Outcomes of one key are merged;
/// keys go in id order so that concurrent writers lock rows in the same order.
pub async fn apply_outcomes<C>(db: &C, outcomes: &[KeyOutcome]) -> Result<(), DbErr>
where
    C: ConnectionTrait + TransactionTrait,
{
    let mut merged: BTreeMap<i64, KeyOutcome> = BTreeMap::new();
    for o in outcomes {
        let nothing = o.successes == 0
            && o.failures == 0
            && o.spent == 0
            && o.last_used_at_ms.is_none()
            && o.last_failure_at_ms.is_none();
        if nothing {
            continue;
        }
        let m = merged.entry(o.key_id).or_insert(KeyOutcome {
            key_id: o.key_id,
            successes: 0,
            failures: 0,
            last_used_at_ms: None,
            last_failure_at_ms: None,
            spent: 0,
        });
        m.successes = m.successes.saturating_add(o.successes);
        m.failures = m.failures.saturating_add(o.failures);
        m.spent = m.spent.saturating_add(o.spent);
        m.last_used_at_ms = m.last_used_at_ms.max(o.last_used_at_ms);
        m.last_failure_at_ms = m.last_failure_at_ms.max(o.last_failure_at_ms);
    }
    let outcomes: Vec<KeyOutcome> = merged.into_values().collect();
    let backend = db.get_database_backend();
    let now = crate::now_ms();
    let statements: Vec<Statement> = outcomes
        .chunks(KEYS_PER_UPDATE)
        .map(|chunk| {
            let (sql, values) = outcomes_update(chunk, now);
            Statement::from_sql_and_values(backend, sql, values)
        })
        .collect();
    if statements.len() <= 1 {
        // One statement is atomic by itself: no savepoint round trips inside the usage writer's transaction.
        for statement in statements {
            db.execute(statement).await?;
        }
        return Ok(());
    }
    let txn = db.begin().await?;
    for statement in statements {
        txn.execute(statement).await?;
    }
    txn.commit().await
}

/// The update of one chunk of merged outcomes, each column changed only on the keys that have something
/// for it (`ELSE` keeps the others' value), and left out when no key has.
fn outcomes_update(chunk: &[KeyOutcome], now: i64) -> (String, Vec<Value>) {
    let today = utc_day(now);
    let mut update = CaseUpdate::default();
    let some = |n: i64| (n != 0).then(|| vec![Value::from(n)]);
    update.set("success_count", chunk, "success_count + ?", |o| some(o.successes));
    update.set("failure_count", chunk, "failure_count + ?", |o| some(o.failures));
    update.set("remaining_balance", chunk, "remaining_balance - ?", |o| some(o.spent));
    // spent_today before spend_day: MySQL evaluates SET assignments left to right with the values already
    // assigned (SQLite uses the old row), so this order reads the old day on both.
    let spent = |o: &KeyOutcome| (o.spent != 0).then(|| vec![Value::from(o.spent), Value::from(o.spent)]);
    update.set("spent_today", chunk, &format!("CASE WHEN spend_day = {today} THEN spent_today + ? ELSE ? END"), spent);
    update.set("spend_day", chunk, &today.to_string(), |o| (o.spent != 0).then(Vec::new));
    // The balance (the key's weight) and the day's spend are in the pool snapshot.
    update.set("pool_changed_at_ms", chunk, &now.to_string(), |o| (o.spent != 0).then(Vec::new));
    let at = |at: Option<i64>| at.map(|at| vec![Value::from(at), Value::from(at)]);
    update.set("last_used_at_ms", chunk, &latest("last_used_at_ms"), |o| at(o.last_used_at_ms));
    update.set("last_failure_at_ms", chunk, &latest("last_failure_at_ms"), |o| at(o.last_failure_at_ms));
    let ids = vec!["?"; chunk.len()].join(", ");
    update.values.extend(chunk.iter().map(|o| Value::from(o.key_id)));
    (format!("UPDATE hosted_keys SET {} WHERE id IN ({ids})", update.sets.join(", ")), update.values)
}

/// The `SET` list of an update by key id, with its values in placeholder order.
#[derive(Default)]
struct CaseUpdate {
    sets: Vec<String>,
    values: Vec<Value>,
}

impl CaseUpdate {
    /// `column = CASE id WHEN ? THEN {then} ... ELSE column END` over the keys for which `arm` gives the
    /// values of `then`'s placeholders; nothing when no key does.
    fn set(&mut self, column: &str, chunk: &[KeyOutcome], then: &str, arm: impl Fn(&KeyOutcome) -> Option<Vec<Value>>) {
        let mut case = String::new();
        for o in chunk {
            if let Some(values) = arm(o) {
                case.push_str(" WHEN ? THEN ");
                case.push_str(then);
                self.values.push(o.key_id.into());
                self.values.extend(values);
            }
        }
        if !case.is_empty() {
            self.sets.push(format!("{column} = CASE id{case} ELSE {column} END"));
        }
    }
}

/// Days since the Unix epoch (UTC) of a millisecond timestamp: the unit of the daily spend cap.
pub fn utc_day(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// `CASE WHEN col IS NULL OR col < ? THEN ? ELSE col END` (the time twice): batches from several nodes may
/// arrive out of order. (SQLite's `max()` and MySQL's `GREATEST()` differ, and both return NULL for a NULL
/// argument.)
fn latest(column: &str) -> String {
    format!("CASE WHEN {column} IS NULL OR {column} < ? THEN ? ELSE {column} END")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::db::testing::TestDb;

    pub(crate) fn new_key(owner_id: i64, uid: &str) -> NewHostedKey {
        NewHostedKey {
            uid: uid.to_string(),
            owner_id,
            name: "k".into(),
            provider: "openai".into(),
            base_url: "https://api.openai.com/v1".into(),
            models: "gpt-4o".into(),
            api_key_enc: "v1.x.y".into(),
            key_hint: "sk-...abcd".into(),
            status: "active".into(),
            declared_balance: 1_000,
            now_ms: 1,
            pool: "seller".into(),
            priority: 0,
            max_concurrency: 0,
            max_spend_per_day: 0,
            balance_api: String::new(),
            verified_at_ms: None,
        }
    }

    fn outcome(key_id: i64, successes: i64, failures: i64, used: Option<i64>, failed: Option<i64>) -> KeyOutcome {
        KeyOutcome { key_id, successes, failures, last_used_at_ms: used, last_failure_at_ms: failed, spent: 0 }
    }

    #[tokio::test]
    async fn keys_are_scoped_to_their_owner_and_change_status_conditionally() {
        for t in TestDb::all().await {
            let db = &t.db;
            let a = insert(db, new_key(1, "uid-a")).await.unwrap();
            let b = insert(db, new_key(2, "uid-b")).await.unwrap();
            assert_eq!((a.remaining_balance, a.success_count, a.failure_count), (1_000, 0, 0));
            assert_eq!(list_all(db).await.unwrap().len(), 2);
            assert_eq!(list_for_owner(db, 1).await.unwrap(), vec![a.clone()]);
            assert_eq!(find_for_owner(db, 1, b.id).await.unwrap(), None);
            assert!(insert(db, new_key(1, "uid-a")).await.is_err(), "uid is unique");

            assert!(!transition_status(db, 2, a.id, "active", "paused", 5).await.unwrap(), "not the owner");
            assert!(transition_status(db, 1, a.id, "active", "paused", 5).await.unwrap());
            assert!(!transition_status(db, 1, a.id, "active", "paused", 6).await.unwrap(), "no longer active");
            let a = find_for_owner(db, 1, a.id).await.unwrap().unwrap();
            assert_eq!((a.status.as_str(), a.updated_at_ms), ("paused", 5));
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn outcomes_add_counts_and_only_move_timestamps_forward() {
        for t in TestDb::all().await {
            let db = &t.db;
            let a = insert(db, new_key(1, "uid-a")).await.unwrap();
            let b = insert(db, new_key(1, "uid-b")).await.unwrap();
            apply_outcomes(db, &[outcome(b.id, 0, 2, Some(50), Some(50)), outcome(a.id, 3, 1, Some(100), Some(90))])
                .await
                .unwrap();
            // An older batch arriving late adds its counts but leaves the newer timestamps alone.
            apply_outcomes(db, &[outcome(a.id, 2, 0, Some(80), None)]).await.unwrap();
            apply_outcomes(db, &[]).await.unwrap();
            apply_outcomes(db, &[outcome(999, 1, 1, Some(1), Some(1))]).await.unwrap();

            let a = find_for_owner(db, 1, a.id).await.unwrap().unwrap();
            assert_eq!((a.success_count, a.failure_count), (5, 1), "{}", t.label);
            assert_eq!((a.last_used_at_ms, a.last_failure_at_ms), (Some(100), Some(90)), "{}", t.label);
            let b = find_for_owner(db, 1, b.id).await.unwrap().unwrap();
            assert_eq!((b.success_count, b.failure_count), (0, 2));
            assert_eq!((b.last_used_at_ms, b.last_failure_at_ms), (Some(50), Some(50)));
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn spend_accumulates_per_utc_day() {
        for t in TestDb::all().await {
            let db = &t.db;
            let a = insert(db, new_key(1, "uid-a")).await.unwrap();
            let spend = |spent| KeyOutcome { spent, ..outcome(a.id, 1, 0, None, None) };
            apply_outcomes(db, &[spend(30)]).await.unwrap();
            apply_outcomes(db, &[spend(12)]).await.unwrap();
            let row = find_for_owner(db, 1, a.id).await.unwrap().unwrap();
            assert_eq!((row.spent_today, row.spend_day), (42, utc_day(crate::now_ms())), "{}", t.label);
            assert_eq!(row.remaining_balance, 1_000 - 42);
            // A new day starts from the day's first spend, whatever was spent the day before.
            Entity::update_many()
                .col_expr(Column::SpendDay, Expr::value(utc_day(crate::now_ms()) - 1))
                .filter(Column::Id.eq(a.id))
                .exec(db)
                .await
                .unwrap();
            apply_outcomes(db, &[spend(5)]).await.unwrap();
            let row = find_for_owner(db, 1, a.id).await.unwrap().unwrap();
            assert_eq!((row.spent_today, row.spend_day), (5, utc_day(crate::now_ms())), "{}", t.label);
            t.cleanup().await;
        }
    }

    /// (successes, failures, remaining balance, spent today, spend day, last used, last failure).
    type Row = (i64, i64, i64, i64, i64, Option<i64>, Option<i64>);

    async fn row(db: &sea_orm::DatabaseConnection, key_id: i64) -> Row {
        let k = find(db, key_id).await.unwrap().unwrap();
        (
            k.success_count,
            k.failure_count,
            k.remaining_balance,
            k.spent_today,
            k.spend_day,
            k.last_used_at_ms,
            k.last_failure_at_ms,
        )
    }

    /// One batch over many keys sets each row as applying its outcome alone would: spend with and without
    /// a day rollover, keys without spend, NULL and newer timestamps, a key repeated in the batch, keys
    /// given out of order, and more keys than one update takes.
    #[tokio::test]
    async fn a_batch_of_outcomes_sets_every_row_as_one_by_one_would() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let today = utc_day(crate::now_ms());
            let mut ids = Vec::new();
            for uid in ["a", "b", "c", "d", "e", "f"] {
                ids.push(insert(db, new_key(1, uid)).await.unwrap().id);
            }
            let [a, b, c, d, e, f] = ids[..] else { unreachable!() };
            let set = |id: i64, spend_day: i64, spent_today: i64, used: Option<i64>, failed: Option<i64>| {
                Entity::update_many()
                    .col_expr(Column::SpendDay, Expr::value(spend_day))
                    .col_expr(Column::SpentToday, Expr::value(spent_today))
                    .col_expr(Column::LastUsedAtMs, Expr::value(used))
                    .col_expr(Column::LastFailureAtMs, Expr::value(failed))
                    .filter(Column::Id.eq(id))
                    .exec(db)
            };
            set(b, today - 1, 70, Some(100), Some(100)).await.unwrap();
            set(c, today, 20, Some(500), None).await.unwrap();
            set(f, today - 1, 9, Some(7), None).await.unwrap();
            let spend = |o: KeyOutcome, spent| KeyOutcome { spent, ..o };
            let batch = [
                spend(outcome(c, 1, 0, Some(400), None), 5),
                outcome(a, 2, 1, Some(300), Some(250)),
                spend(outcome(b, 0, 2, Some(50), Some(150)), 10),
                outcome(d, 0, 0, None, None),
                spend(outcome(e, 0, 0, None, None), 7),
                outcome(a, 1, 0, Some(350), None),
            ];
            apply_outcomes(db, &batch).await.unwrap();
            assert_eq!(row(db, a).await, (3, 1, 1_000, 0, 0, Some(350), Some(250)), "{l}: NULLs take the times");
            assert_eq!(row(db, b).await, (0, 2, 990, 10, today, Some(100), Some(150)), "{l}: a new day");
            assert_eq!(row(db, c).await, (1, 0, 995, 25, today, Some(500), None), "{l}: the same day");
            assert_eq!(row(db, d).await, (0, 0, 1_000, 0, 0, None, None), "{l}: nothing to apply");
            assert_eq!(row(db, e).await, (0, 0, 993, 7, today, None, None), "{l}: spend alone");
            assert_eq!(row(db, f).await, (0, 0, 1_000, 9, today - 1, Some(7), None), "{l}: not in the batch");

            // More keys than one update takes, given in descending id order.
            let mut many = Vec::new();
            for i in 0..KEYS_PER_UPDATE + 2 {
                many.push(insert(db, new_key(2, &format!("m{i}"))).await.unwrap().id);
            }
            let batch: Vec<KeyOutcome> =
                many.iter().rev().map(|&id| spend(outcome(id, id, 1, Some(id), None), 1)).collect();
            apply_outcomes(db, &batch).await.unwrap();
            for &id in &many {
                assert_eq!(row(db, id).await, (id, 1, 999, 1, today, Some(id), None), "{l}: key {id}");
            }
            t.cleanup().await;
        }
    }

    /// Several writers (the usage writer of several nodes, the admin API) hit the same rows at once:
    /// no increment may be lost and no writer may fail with "database is locked" or a deadlock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_outcomes_lose_no_increment() {
        for t in TestDb::all().await {
            let a = insert(&t.db, new_key(1, "uid-a")).await.unwrap();
            let b = insert(&t.db, new_key(1, "uid-b")).await.unwrap();
            let mut tasks = Vec::new();
            for i in 0..8i64 {
                let db = t.db.clone();
                tasks.push(tokio::spawn(async move {
                    for j in 0..10i64 {
                        let at = i * 100 + j;
                        // Opposite orders across tasks: apply_outcomes sorts, so no deadlock.
                        let batch = if i % 2 == 0 {
                            vec![outcome(a.id, 1, 0, Some(at), None), outcome(b.id, 0, 1, Some(at), Some(at))]
                        } else {
                            vec![outcome(b.id, 0, 1, Some(at), Some(at)), outcome(a.id, 1, 0, Some(at), None)]
                        };
                        apply_outcomes(&db, &batch).await?;
                        transition_status(&db, 1, a.id, "active", "active", at).await?;
                    }
                    Ok::<_, DbErr>(())
                }));
            }
            for task in tasks {
                task.await.unwrap().unwrap_or_else(|e| panic!("{}: {e}", t.label));
            }
            let a = find_for_owner(&t.db, 1, a.id).await.unwrap().unwrap();
            let b = find_for_owner(&t.db, 1, b.id).await.unwrap().unwrap();
            assert_eq!(a.success_count, 80, "{}", t.label);
            assert_eq!(b.failure_count, 80, "{}", t.label);
            assert_eq!(b.last_failure_at_ms, Some(709));
            t.cleanup().await;
        }
    }
}
