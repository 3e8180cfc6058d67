//! Queries of risk control: claiming a key's scheduled check, the key's status changes made by risk control
//! and admin review, provider balance samples, and the usage a dilution window compares them with.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

pub use super::entities::key_balance_samples::{self as samples, Model as Sample};
use super::entities::{hosted_keys, key_events, usage_records};

/// `key_balance_samples.verdict`.
pub mod verdict {
    /// The first good reading after the key became active: starts the first window.
    pub const BASELINE: &str = "baseline";
    pub const OK: &str = "ok";
    pub const DILUTED: &str = "diluted";
    /// The reading failed; it starts no window.
    pub const SKIPPED: &str = "skipped";
}

/// `hosted_keys.status_cause` values risk control sets or reads.
pub mod cause {
    pub const FAILURES: &str = "failures";
    pub const VERIFICATION: &str = "verification";
    pub const DILUTION: &str = "dilution";
    pub const BALANCE: &str = "balance";
}

/// `hosted_keys.review`.
pub mod review {
    pub const NONE: &str = "";
    pub const PENDING: &str = "pending";
    pub const CONFIRMED: &str = "confirmed";
}

/// Keys whose check is due: active and depleted keys, and keys that risk control paused (failures or a
/// failed verification); never keys their seller or an admin paused, and never flagged keys (they wait for
/// an admin). Oldest due first.
pub async fn due_keys(c: &impl ConnectionTrait, now_ms: i64, limit: u64) -> Result<Vec<hosted_keys::Model>, DbErr> {
    use hosted_keys::Column;
    let checked = Condition::any().add(Column::Status.is_in(["active", "depleted"])).add(
        Condition::all()
            .add(Column::Status.eq("paused"))
            .add(Column::StatusCause.is_in([cause::FAILURES, cause::VERIFICATION])),
    );
    hosted_keys::Entity::find()
        .filter(checked)
        .filter(Column::NextCheckAtMs.lte(now_ms))
        .order_by_asc(Column::NextCheckAtMs)
        .order_by_asc(Column::Id)
        .limit(limit)
        .all(c)
        .await
}

/// Claims the key's check: moves `next_check_at_ms` from the value read to `next_at` and the failure-window
/// checkpoint to the counts read, in one conditional UPDATE. Of several nodes that read the same row, only
/// one changes it; true means this caller owns the check.
pub async fn claim_check(c: &impl ConnectionTrait, key: &hosted_keys::Model, next_at: i64) -> Result<bool, DbErr> {
    use hosted_keys::Column;
    let result = hosted_keys::Entity::update_many()
        .col_expr(Column::NextCheckAtMs, Expr::value(next_at))
        .col_expr(Column::CheckedSuccesses, Expr::value(key.success_count))
        .col_expr(Column::CheckedFailures, Expr::value(key.failure_count))
        .filter(Column::Id.eq(key.id))
        .filter(Column::NextCheckAtMs.eq(key.next_check_at_ms))
        .exec(c)
        .await?;
    Ok(result.rows_affected == 1)
}

/// A status change of a hosted key, by its seller, an admin or risk control, with the key event that
/// records it.
#[derive(Clone, Debug)]
pub struct Transition<'a> {
    pub key_id: i64,
    /// The key's owner (the event's user).
    pub owner_id: i64,
    pub from: &'a str,
    pub to: &'a str,
    /// `status_cause` for the new status ("" for active).
    pub cause: &'a str,
    pub review: &'a str,
    /// Reschedules the key's next check (e.g. a paused key is re-verified later, a cleared key soon).
    pub next_check_at_ms: Option<i64>,
    /// When not empty, the key's current `status_cause` must be one of these (a key its seller paused is
    /// never resumed by risk control, even if the seller paused it while risk control was verifying it).
    pub only_causes: &'a [&'a str],
    /// Why, for the key event.
    pub reason: &'a str,
    /// Who (None: the platform, i.e. risk control).
    pub actor_id: Option<i64>,
    pub now_ms: i64,
}

/// Applies the change if the key is still in `from` (a concurrent change, such as its seller pausing it,
/// wins) and records the key event when it did. Run it in a transaction so that the change and its event
/// are one. Returns whether the row changed.
pub async fn transition(c: &impl ConnectionTrait, t: &Transition<'_>) -> Result<bool, DbErr> {
    use hosted_keys::Column;
    let mut update = hosted_keys::Entity::update_many()
        .col_expr(Column::Status, Expr::value(t.to))
        .col_expr(Column::StatusCause, Expr::value(t.cause))
        .col_expr(Column::Review, Expr::value(t.review))
        .col_expr(Column::UpdatedAtMs, Expr::value(t.now_ms))
        .col_expr(Column::PoolChangedAtMs, Expr::value(t.now_ms));
    if let Some(at) = t.next_check_at_ms {
        update = update.col_expr(Column::NextCheckAtMs, Expr::value(at));
    }
    let mut update = update.filter(Column::Id.eq(t.key_id)).filter(Column::Status.eq(t.from));
    if !t.only_causes.is_empty() {
        update = update.filter(Column::StatusCause.is_in(t.only_causes.iter().copied()));
    }
    let changed = update.exec(c).await?.rows_affected > 0;
    if changed {
        let event = super::key_events::NewEvent {
            hosted_key_id: t.key_id,
            owner_id: t.owner_id,
            from_status: Some(t.from),
            to_status: t.to,
            reason: t.reason,
            actor_id: t.actor_id,
            now_ms: t.now_ms,
        };
        super::key_events::record(c, event).await?;
    }
    Ok(changed)
}

/// Sets the review of a key that is still flagged. Returns whether the row changed.
pub async fn set_review(c: &impl ConnectionTrait, key_id: i64, review: &str, now_ms: i64) -> Result<bool, DbErr> {
    use hosted_keys::Column;
    let result = hosted_keys::Entity::update_many()
        .col_expr(Column::Review, Expr::value(review))
        .col_expr(Column::UpdatedAtMs, Expr::value(now_ms))
        .filter(Column::Id.eq(key_id))
        .filter(Column::Status.eq("flagged"))
        .exec(c)
        .await?;
    Ok(result.rows_affected > 0)
}

pub async fn find_key(c: &impl ConnectionTrait, key_id: i64) -> Result<Option<hosted_keys::Model>, DbErr> {
    hosted_keys::Entity::find_by_id(key_id).one(c).await
}

/// Flagged keys waiting for an admin's review, oldest change first.
pub async fn pending_reviews(c: &impl ConnectionTrait) -> Result<Vec<hosted_keys::Model>, DbErr> {
    use hosted_keys::Column;
    hosted_keys::Entity::find()
        .filter(Column::Status.eq("flagged"))
        .filter(Column::Review.eq(review::PENDING))
        .order_by_asc(Column::UpdatedAtMs)
        .order_by_asc(Column::Id)
        .all(c)
        .await
}

/// The key's latest status event into `to_status`.
pub async fn latest_event_to(
    c: &impl ConnectionTrait,
    key_id: i64,
    to_status: &str,
) -> Result<Option<key_events::Model>, DbErr> {
    key_events::Entity::find()
        .filter(key_events::Column::HostedKeyId.eq(key_id))
        .filter(key_events::Column::ToStatus.eq(to_status))
        .order_by_desc(key_events::Column::Id)
        .one(c)
        .await
}

/// Where the key's current dilution window starts: its latest good reading (baseline or ok) taken since it
/// last became active (deposit, resume, clear after review, recovery) and before `before_ms`. Readings
/// from before it last became active belong to a period the platform did not route it (or was told to
/// disregard), so the first reading after that is a new baseline.
pub async fn window_start(
    c: &impl ConnectionTrait,
    key_id: i64,
    not_before_ms: i64,
    before_ms: i64,
) -> Result<Option<Sample>, DbErr> {
    samples::Entity::find()
        .filter(samples::Column::HostedKeyId.eq(key_id))
        .filter(samples::Column::Verdict.is_in([verdict::BASELINE, verdict::OK]))
        .filter(samples::Column::TakenAtMs.gte(not_before_ms))
        .filter(samples::Column::TakenAtMs.lt(before_ms))
        .order_by_desc(samples::Column::Id)
        .one(c)
        .await
}

/// One balance reading to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSample<'a> {
    pub hosted_key_id: i64,
    pub taken_at_ms: i64,
    pub balance_credits: i64,
    pub metered_credits: i64,
    pub inflight_credits: i64,
    pub excess_credits: i64,
    pub verdict: &'a str,
}

pub async fn insert_sample(c: &impl ConnectionTrait, s: NewSample<'_>) -> Result<Sample, DbErr> {
    samples::ActiveModel {
        hosted_key_id: Set(s.hosted_key_id),
        taken_at_ms: Set(s.taken_at_ms),
        balance_credits: Set(s.balance_credits),
        metered_credits: Set(s.metered_credits),
        inflight_credits: Set(s.inflight_credits),
        excess_credits: Set(s.excess_credits),
        verdict: Set(s.verdict.to_string()),
        ..Default::default()
    }
    .insert(c)
    .await
}

/// The key's readings, newest first.
pub async fn samples_of(c: &impl ConnectionTrait, key_id: i64, limit: u64) -> Result<Vec<Sample>, DbErr> {
    samples::Entity::find()
        .filter(samples::Column::HostedKeyId.eq(key_id))
        .order_by_desc(samples::Column::Id)
        .limit(limit)
        .all(c)
        .await
}

/// A usage record as a dilution window reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageRow {
    pub created_at_ms: i64,
    pub latency_ms: i64,
    /// cost_credits + unpaid_credits.
    pub credits: i64,
}

/// The key's usage records that started in `[started_from_ms, started_before_ms)`.
pub async fn usage_rows(
    c: &impl ConnectionTrait,
    key_id: i64,
    started_from_ms: i64,
    started_before_ms: i64,
) -> Result<Vec<UsageRow>, DbErr> {
    use usage_records::Column;
    let rows: Vec<(i64, i64, i64, i64)> = usage_records::Entity::find()
        .select_only()
        .column(Column::CreatedAtMs)
        .column(Column::LatencyMs)
        .column(Column::CostCredits)
        .column(Column::UnpaidCredits)
        .filter(Column::HostedKeyId.eq(key_id))
        .filter(Column::CreatedAtMs.gte(started_from_ms))
        .filter(Column::CreatedAtMs.lt(started_before_ms))
        .into_tuple()
        .all(c)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(created_at_ms, latency_ms, cost, unpaid)| UsageRow {
            created_at_ms,
            latency_ms,
            credits: cost.saturating_add(unpaid),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::hosted_keys::{self, tests::new_key};
    use crate::db::testing::TestDb;

    #[tokio::test]
    async fn of_two_claimers_one_wins_and_only_risk_causes_are_due() {
        for t in TestDb::all().await {
            let db = &t.db;
            let a = hosted_keys::insert(db, new_key(1, "uid-a")).await.unwrap();
            let seller_paused = hosted_keys::insert(db, new_key(1, "uid-b")).await.unwrap();
            hosted_keys::transition_status_with_cause(db, 1, seller_paused.id, "active", "paused", "seller", 2)
                .await
                .unwrap();
            let risk_paused = hosted_keys::insert(db, new_key(1, "uid-c")).await.unwrap();
            hosted_keys::transition_status_with_cause(db, 1, risk_paused.id, "active", "paused", cause::FAILURES, 2)
                .await
                .unwrap();
            let flagged = hosted_keys::insert(db, new_key(1, "uid-d")).await.unwrap();
            hosted_keys::transition_status_with_cause(db, 1, flagged.id, "active", "flagged", cause::DILUTION, 2)
                .await
                .unwrap();

            let due = due_keys(db, 100, 10).await.unwrap();
            let ids: Vec<i64> = due.iter().map(|k| k.id).collect();
            assert_eq!(ids, [a.id, risk_paused.id], "{}", t.label);

            // Two nodes read the same row; both try to claim it.
            let row = due[0].clone();
            hosted_keys::apply_outcomes(
                db,
                &[hosted_keys::KeyOutcome {
                    key_id: a.id,
                    successes: 7,
                    failures: 3,
                    last_used_at_ms: None,
                    last_failure_at_ms: None,
                    spent: 0,
                }],
            )
            .await
            .unwrap();
            let (first, second) = tokio::join!(claim_check(db, &row, 1_000), claim_check(db, &row, 2_000));
            assert!(first.unwrap() ^ second.unwrap(), "exactly one claim wins ({})", t.label);
            let claimed = find_key(db, a.id).await.unwrap().unwrap();
            assert!([1_000, 2_000].contains(&claimed.next_check_at_ms));
            // The checkpoint is the counts that were read: the 10 attempts since count in the next window.
            assert_eq!((claimed.checked_successes, claimed.checked_failures), (0, 0));
            assert_eq!((claimed.success_count, claimed.failure_count), (7, 3));
            assert!(!claim_check(db, &row, 3_000).await.unwrap(), "a stale read never claims");
            assert_eq!(due_keys(db, 100, 10).await.unwrap().len(), 1, "only the paused key is still due");
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn transitions_are_conditional_and_reviews_apply_to_flagged_keys() {
        for t in TestDb::all().await {
            let db = &t.db;
            let a = hosted_keys::insert(db, new_key(1, "uid-a")).await.unwrap();
            let flag = Transition {
                key_id: a.id,
                owner_id: 1,
                from: "active",
                to: "flagged",
                cause: cause::DILUTION,
                review: review::PENDING,
                next_check_at_ms: None,
                only_causes: &[],
                reason: "diluted",
                actor_id: None,
                now_ms: 10,
            };
            assert!(transition(db, &flag).await.unwrap());
            assert!(!transition(db, &flag).await.unwrap(), "no longer active");
            let row = find_key(db, a.id).await.unwrap().unwrap();
            assert_eq!(
                (row.status.as_str(), row.status_cause.as_str(), row.review.as_str()),
                ("flagged", "dilution", "pending")
            );
            assert_eq!(pending_reviews(db).await.unwrap().len(), 1);
            assert!(set_review(db, a.id, review::CONFIRMED, 11).await.unwrap());
            assert!(pending_reviews(db).await.unwrap().is_empty());
            let clear = Transition {
                from: "flagged",
                to: "active",
                cause: "",
                review: review::NONE,
                next_check_at_ms: Some(12),
                reason: "cleared",
                actor_id: Some(9),
                now_ms: 12,
                ..flag
            };
            assert!(transition(db, &clear).await.unwrap());
            assert!(!set_review(db, a.id, review::CONFIRMED, 13).await.unwrap(), "not flagged any more");
            let row = find_key(db, a.id).await.unwrap().unwrap();
            assert_eq!((row.status.as_str(), row.review.as_str(), row.next_check_at_ms), ("active", "", 12));
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn windows_start_at_the_latest_good_reading_since_activation() {
        for t in TestDb::all().await {
            let db = &t.db;
            let sample = |at, verdict| NewSample {
                hosted_key_id: 5,
                taken_at_ms: at,
                balance_credits: at * 10,
                metered_credits: 0,
                inflight_credits: 0,
                excess_credits: 0,
                verdict,
            };
            assert_eq!(window_start(db, 5, 0, 1_000).await.unwrap(), None);
            insert_sample(db, sample(100, verdict::BASELINE)).await.unwrap();
            insert_sample(db, sample(200, verdict::OK)).await.unwrap();
            insert_sample(db, sample(300, verdict::SKIPPED)).await.unwrap();
            insert_sample(db, sample(400, verdict::DILUTED)).await.unwrap();
            insert_sample(db, NewSample { hosted_key_id: 6, ..sample(350, verdict::OK) }).await.unwrap();
            let start = window_start(db, 5, 0, 1_000).await.unwrap().unwrap();
            assert_eq!((start.taken_at_ms, start.balance_credits), (200, 2_000), "{}", t.label);
            assert_eq!(window_start(db, 5, 0, 200).await.unwrap().unwrap().taken_at_ms, 100);
            assert_eq!(window_start(db, 5, 201, 1_000).await.unwrap(), None, "re-activated since");
            let all = samples_of(db, 5, 10).await.unwrap();
            assert_eq!(all.iter().map(|s| s.taken_at_ms).collect::<Vec<_>>(), [400, 300, 200, 100]);
            assert_eq!(samples_of(db, 5, 2).await.unwrap().len(), 2);
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn usage_rows_are_the_keys_records_in_the_start_range() {
        use sea_orm::ActiveValue::Set;
        for t in TestDb::all().await {
            let db = &t.db;
            let row = |id: &str, key: i64, at: i64, cost: i64, unpaid: i64| usage_records::ActiveModel {
                request_id: Set(id.to_string()),
                buyer_id: Set(1),
                buyer_key_id: Set(1),
                hosted_key_id: Set(Some(key)),
                model: Set("m".into()),
                endpoint: Set("chat.completions".into()),
                prompt_tokens: Set(1),
                completion_tokens: Set(1),
                estimated: Set(false),
                status_code: Set(200),
                attempts: Set(1),
                latency_ms: Set(50),
                ttft_ms: Set(None),
                request_bytes: Set(1),
                response_bytes: Set(1),
                client_disconnected: Set(false),
                error_kind: Set(None),
                created_at_ms: Set(at),
                cost_credits: Set(cost),
                unpaid_credits: Set(unpaid),
                hold_id: Set(None),
                fallback: Set(false),
                ..Default::default()
            };
            crate::db::usage_records::insert_batch(
                db,
                vec![row("a", 1, 10, 5, 1), row("b", 1, 20, 7, 0), row("c", 2, 15, 100, 0), row("d", 1, 30, 9, 0)],
            )
            .await
            .unwrap();
            let rows = usage_rows(db, 1, 10, 30).await.unwrap();
            let mut got: Vec<(i64, i64)> = rows.iter().map(|r| (r.created_at_ms, r.credits)).collect();
            got.sort_unstable();
            assert_eq!(got, [(10, 6), (20, 7)], "{}", t.label);
            assert_eq!(rows[0].latency_ms, 50);
            t.cleanup().await;
        }
    }
}
