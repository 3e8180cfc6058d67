//! Queries over `hosted_keys` (seller keys in the pool).

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    TransactionTrait,
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
        ..Default::default()
    }
    .insert(db)
    .await
}

/// Every key whatever its status (the pool counts paused, depleted and flagged keys too).
pub async fn list_all(db: &impl ConnectionTrait) -> Result<Vec<Model>, DbErr> {
    Entity::find().order_by_asc(Column::Id).all(db).await
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
    let mut update = Entity::update_many().col_expr(Column::UpdatedAtMs, Expr::value(now_ms));
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
    let mut update = Entity::update_many().col_expr(Column::UpdatedAtMs, Expr::value(now_ms));
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

/// Adds the counts with `col = col + n` (several gateway nodes update the same keys concurrently, so a
/// read-modify-write would lose increments) and moves the timestamps forward, never back, in one
/// transaction. Keys are updated in id order so that concurrent writers lock rows in the same order.
pub async fn apply_outcomes<C>(db: &C, outcomes: &[KeyOutcome]) -> Result<(), DbErr>
where
    C: ConnectionTrait + TransactionTrait,
{
    let mut outcomes: Vec<&KeyOutcome> = outcomes
        .iter()
        .filter(|o| {
            o.successes != 0
                || o.failures != 0
                || o.spent != 0
                || o.last_used_at_ms.is_some()
                || o.last_failure_at_ms.is_some()
        })
        .collect();
    if outcomes.is_empty() {
        return Ok(());
    }
    outcomes.sort_by_key(|o| o.key_id);
    let today = utc_day(crate::now_ms());
    let txn = db.begin().await?;
    for outcome in outcomes {
        let mut update = Entity::update_many()
            .col_expr(Column::SuccessCount, Expr::col(Column::SuccessCount).add(outcome.successes))
            .col_expr(Column::FailureCount, Expr::col(Column::FailureCount).add(outcome.failures))
            .col_expr(Column::RemainingBalance, Expr::col(Column::RemainingBalance).sub(outcome.spent));
        if outcome.spent != 0 {
            // spent_today before spend_day: MySQL evaluates SET assignments left to right with the values
            // already assigned (SQLite uses the old row), so this order reads the old day on both.
            update = update
                .col_expr(
                    Column::SpentToday,
                    Expr::case(Expr::col(Column::SpendDay).eq(today), Expr::col(Column::SpentToday).add(outcome.spent))
                        .finally(Expr::value(outcome.spent))
                        .into(),
                )
                .col_expr(Column::SpendDay, Expr::value(today));
        }
        if let Some(at) = outcome.last_used_at_ms {
            update = update.col_expr(Column::LastUsedAtMs, latest(Column::LastUsedAtMs, at));
        }
        if let Some(at) = outcome.last_failure_at_ms {
            update = update.col_expr(Column::LastFailureAtMs, latest(Column::LastFailureAtMs, at));
        }
        update.filter(Column::Id.eq(outcome.key_id)).exec(&txn).await?;
    }
    txn.commit().await
}

/// Days since the Unix epoch (UTC) of a millisecond timestamp: the unit of the daily spend cap.
pub fn utc_day(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// `CASE WHEN col IS NULL OR col < at THEN at ELSE col END`: batches from several nodes may arrive out of
/// order. (SQLite's `max()` and MySQL's `GREATEST()` differ, and both return NULL for a NULL argument.)
fn latest(column: Column, at: i64) -> sea_orm::sea_query::SimpleExpr {
    Expr::case(Expr::col(column).is_null().or(Expr::col(column).lt(at)), at).finally(Expr::col(column)).into()
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
