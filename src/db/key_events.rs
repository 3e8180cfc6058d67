//! Queries over `key_events` (every status change of a seller key, with its reason and actor) and
//! `notifications` (what a key's owner is told).

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

pub use super::entities::key_events::{self as events, Model as KeyEvent};
pub use super::entities::notifications::{self, Model as Notification};

/// A status change to record.
pub struct NewEvent<'a> {
    pub hosted_key_id: i64,
    pub owner_id: i64,
    pub from_status: Option<&'a str>,
    pub to_status: &'a str,
    pub reason: &'a str,
    pub actor_id: Option<i64>,
    pub now_ms: i64,
}

/// Records the change and, unless the owner made it themselves, tells the owner.
pub async fn record(c: &impl ConnectionTrait, e: NewEvent<'_>) -> Result<KeyEvent, DbErr> {
    let reason: String = e.reason.chars().take(255).collect();
    let event = events::ActiveModel {
        hosted_key_id: Set(e.hosted_key_id),
        owner_id: Set(e.owner_id),
        from_status: Set(e.from_status.map(String::from)),
        to_status: Set(e.to_status.to_string()),
        reason: Set(reason.clone()),
        actor_id: Set(e.actor_id),
        created_at_ms: Set(e.now_ms),
        ..Default::default()
    }
    .insert(c)
    .await?;
    if e.actor_id != Some(e.owner_id) {
        let message: String =
            format!("Key {} is now {}: {reason}", e.hosted_key_id, e.to_status).chars().take(500).collect();
        notifications::ActiveModel {
            user_id: Set(e.owner_id),
            kind: Set("key_status".into()),
            hosted_key_id: Set(Some(e.hosted_key_id)),
            message: Set(message),
            created_at_ms: Set(e.now_ms),
            read_at_ms: Set(None),
            ..Default::default()
        }
        .insert(c)
        .await?;
    }
    Ok(event)
}

/// A key's history, newest first.
pub async fn for_key(c: &impl ConnectionTrait, hosted_key_id: i64, limit: u64) -> Result<Vec<KeyEvent>, DbErr> {
    events::Entity::find()
        .filter(events::Column::HostedKeyId.eq(hosted_key_id))
        .order_by_desc(events::Column::Id)
        .limit(limit)
        .all(c)
        .await
}

/// A user's notifications, newest first.
pub async fn notifications_of(c: &impl ConnectionTrait, user_id: i64, limit: u64) -> Result<Vec<Notification>, DbErr> {
    notifications::Entity::find()
        .filter(notifications::Column::UserId.eq(user_id))
        .order_by_desc(notifications::Column::Id)
        .limit(limit)
        .all(c)
        .await
}

/// Marks one of the user's notifications read; false if it is not theirs (or does not exist).
pub async fn mark_read(c: &impl ConnectionTrait, user_id: i64, id: i64, now_ms: i64) -> Result<bool, DbErr> {
    let result = notifications::Entity::update_many()
        .col_expr(notifications::Column::ReadAtMs, Expr::value(now_ms))
        .filter(notifications::Column::Id.eq(id))
        .filter(notifications::Column::UserId.eq(user_id))
        .filter(notifications::Column::ReadAtMs.is_null())
        .exec(c)
        .await?;
    if result.rows_affected > 0 {
        return Ok(true);
    }
    Ok(notifications::Entity::find_by_id(id).one(c).await?.is_some_and(|n| n.user_id == user_id))
}
