//! Queries over `webhooks` (one per user) and the webhook outbox on `notifications`: a notification is
//! pending while `delivered_at_ms` is NULL and it has attempts left.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};

use super::entities::notifications;
pub use super::entities::webhooks::{ActiveModel, Column, Entity, Model};

pub async fn find_for_user(c: &impl ConnectionTrait, user_id: i64) -> Result<Option<Model>, DbErr> {
    Entity::find().filter(Column::UserId.eq(user_id)).one(c).await
}

/// Sets the user's webhook: a new one, or a new URL and secret for the existing one (which keeps its
/// `created_at_ms`, so notifications already waiting are delivered to the new URL).
pub async fn upsert(
    c: &impl ConnectionTrait,
    user_id: i64,
    url: &str,
    secret_enc: &str,
    now_ms: i64,
) -> Result<Model, DbErr> {
    let updated = Entity::update_many()
        .col_expr(Column::Url, Expr::value(url))
        .col_expr(Column::SecretEnc, Expr::value(secret_enc))
        .col_expr(Column::UpdatedAtMs, Expr::value(now_ms))
        .col_expr(Column::LastError, Expr::value(Option::<String>::None))
        .filter(Column::UserId.eq(user_id))
        .exec(c)
        .await?;
    if updated.rows_affected == 0 {
        ActiveModel {
            user_id: Set(user_id),
            url: Set(url.to_string()),
            secret_enc: Set(secret_enc.to_string()),
            created_at_ms: Set(now_ms),
            updated_at_ms: Set(now_ms),
            last_delivery_at_ms: Set(None),
            last_error: Set(None),
            ..Default::default()
        }
        .insert(c)
        .await?;
    }
    find_for_user(c, user_id).await?.ok_or_else(|| DbErr::RecordNotFound("webhook".into()))
}

/// Removes the user's webhook; false when there was none.
pub async fn delete_for_user(c: &impl ConnectionTrait, user_id: i64) -> Result<bool, DbErr> {
    Ok(Entity::delete_many().filter(Column::UserId.eq(user_id)).exec(c).await?.rows_affected > 0)
}

pub async fn list_all(c: &impl ConnectionTrait) -> Result<Vec<Model>, DbErr> {
    Entity::find().order_by_asc(Column::Id).all(c).await
}

/// The webhook owner's notifications still to deliver, oldest first: created since the webhook exists,
/// not delivered, with attempts left.
pub async fn pending(
    c: &impl ConnectionTrait,
    webhook: &Model,
    max_attempts: u32,
    limit: u64,
) -> Result<Vec<notifications::Model>, DbErr> {
    use notifications::Column as N;
    notifications::Entity::find()
        .filter(N::UserId.eq(webhook.user_id))
        .filter(N::DeliveredAtMs.is_null())
        .filter(N::DeliveryAttempts.lt(i64::from(max_attempts)))
        .filter(N::CreatedAtMs.gte(webhook.created_at_ms))
        .order_by_asc(N::Id)
        .limit(limit)
        .all(c)
        .await
}

/// Claims the next delivery attempt of a notification: its attempt count moves from the value read to the
/// next one (only one node wins), and the webhook records the attempt's time, which holds off retries by
/// other nodes while this one is under way. True when this caller owns the attempt.
pub async fn claim_attempt<C>(
    db: &C,
    notification: &notifications::Model,
    webhook_id: i64,
    now_ms: i64,
) -> Result<bool, DbErr>
where
    C: ConnectionTrait + TransactionTrait,
{
    use notifications::Column as N;
    let txn = db.begin().await?;
    let claimed = notifications::Entity::update_many()
        .col_expr(N::DeliveryAttempts, Expr::value(notification.delivery_attempts.saturating_add(1)))
        .filter(N::Id.eq(notification.id))
        .filter(N::DeliveryAttempts.eq(notification.delivery_attempts))
        .filter(N::DeliveredAtMs.is_null())
        .exec(&txn)
        .await?
        .rows_affected
        == 1;
    if claimed {
        Entity::update_many()
            .col_expr(Column::LastDeliveryAtMs, Expr::value(now_ms))
            .filter(Column::Id.eq(webhook_id))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(claimed)
}

/// The webhook accepted the notification.
pub async fn mark_delivered<C>(db: &C, notification_id: i64, webhook_id: i64, now_ms: i64) -> Result<(), DbErr>
where
    C: ConnectionTrait + TransactionTrait,
{
    let txn = db.begin().await?;
    notifications::Entity::update_many()
        .col_expr(notifications::Column::DeliveredAtMs, Expr::value(now_ms))
        .filter(notifications::Column::Id.eq(notification_id))
        .exec(&txn)
        .await?;
    Entity::update_many()
        .col_expr(Column::LastDeliveryAtMs, Expr::value(now_ms))
        .col_expr(Column::LastError, Expr::value(Option::<String>::None))
        .filter(Column::Id.eq(webhook_id))
        .exec(&txn)
        .await?;
    txn.commit().await
}

/// The attempt failed: the webhook shows why (at most 255 characters).
pub async fn record_failure(c: &impl ConnectionTrait, webhook_id: i64, error: &str, now_ms: i64) -> Result<(), DbErr> {
    let error: String = error.chars().take(255).collect();
    Entity::update_many()
        .col_expr(Column::LastDeliveryAtMs, Expr::value(now_ms))
        .col_expr(Column::LastError, Expr::value(Some(error)))
        .filter(Column::Id.eq(webhook_id))
        .exec(c)
        .await?;
    Ok(())
}

/// Notifications of the user still waiting for delivery (for the webhook's status).
pub async fn pending_count(c: &impl ConnectionTrait, webhook: &Model, max_attempts: u32) -> Result<u64, DbErr> {
    use notifications::Column as N;
    use sea_orm::PaginatorTrait;
    notifications::Entity::find()
        .filter(N::UserId.eq(webhook.user_id))
        .filter(N::DeliveredAtMs.is_null())
        .filter(N::DeliveryAttempts.lt(i64::from(max_attempts)))
        .filter(N::CreatedAtMs.gte(webhook.created_at_ms))
        .count(c)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::key_events::{self, NewEvent};
    use crate::db::testing::TestDb;

    async fn notify(db: &impl ConnectionTrait, owner: i64, at: i64) -> notifications::Model {
        let event = NewEvent {
            hosted_key_id: 9,
            owner_id: owner,
            from_status: Some("active"),
            to_status: "paused",
            reason: "test",
            actor_id: None,
            now_ms: at,
        };
        key_events::record(db, event).await.unwrap();
        key_events::notifications_of(db, owner, 1).await.unwrap().remove(0)
    }

    #[tokio::test]
    async fn the_outbox_delivers_each_notification_once_after_the_webhook_exists() {
        for t in TestDb::all().await {
            let db = &t.db;
            notify(db, 1, 50).await; // before the webhook: never sent
            let hook = upsert(db, 1, "https://example.com/a", "v1.x.y", 100).await.unwrap();
            let again = upsert(db, 1, "https://example.com/b", "v1.x.z", 150).await.unwrap();
            assert_eq!((again.id, again.created_at_ms, again.url.as_str()), (hook.id, 100, "https://example.com/b"));
            let other = upsert(db, 2, "https://example.com/c", "v1.x.w", 100).await.unwrap();
            let n1 = notify(db, 1, 200).await;
            let n2 = notify(db, 1, 210).await;
            notify(db, 2, 220).await;

            let pending_now = pending(db, &again, 3, 10).await.unwrap();
            assert_eq!(pending_now.iter().map(|n| n.id).collect::<Vec<_>>(), [n1.id, n2.id], "{}", t.label);
            assert_eq!(pending_count(db, &again, 3).await.unwrap(), 2);

            // Two nodes race for the first attempt of n1: one wins.
            let (a, b) = tokio::join!(claim_attempt(db, &n1, again.id, 300), claim_attempt(db, &n1, again.id, 301));
            assert!(a.unwrap() ^ b.unwrap(), "{}", t.label);
            record_failure(db, again.id, &"x".repeat(400), 305).await.unwrap();
            let row = find_for_user(db, 1).await.unwrap().unwrap();
            assert_eq!((row.last_delivery_at_ms, row.last_error.map(|e| e.len())), (Some(305), Some(255)));

            let retry = pending(db, &again, 3, 10).await.unwrap().remove(0);
            assert_eq!((retry.id, retry.delivery_attempts), (n1.id, 1));
            assert!(claim_attempt(db, &retry, again.id, 400).await.unwrap());
            mark_delivered(db, retry.id, again.id, 410).await.unwrap();
            assert!(!claim_attempt(db, &retry, again.id, 420).await.unwrap(), "delivered: nothing to claim");
            let row = find_for_user(db, 1).await.unwrap().unwrap();
            assert_eq!((row.last_delivery_at_ms, row.last_error), (Some(410), None));
            assert_eq!(pending(db, &again, 3, 10).await.unwrap().iter().map(|n| n.id).collect::<Vec<_>>(), [n2.id]);

            // Out of attempts: no longer pending.
            let mut n2 = n2;
            for at in 0..3 {
                assert!(claim_attempt(db, &n2, again.id, 500 + at).await.unwrap());
                n2.delivery_attempts += 1;
            }
            assert!(pending(db, &again, 3, 10).await.unwrap().is_empty());
            assert_eq!(pending(db, &other, 3, 10).await.unwrap().len(), 1);

            assert!(delete_for_user(db, 1).await.unwrap());
            assert!(!delete_for_user(db, 1).await.unwrap());
            assert_eq!(list_all(db).await.unwrap().len(), 1);
            t.cleanup().await;
        }
    }
}
