//! Queries over `buyer_keys` (platform-issued keys).

use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter,
    QueryOrder,
};

pub use super::entities::buyer_keys::{ActiveModel, Column, Entity, Model};
use super::entities::users;

pub struct NewBuyerKey {
    pub user_id: i64,
    pub name: String,
    pub lookup_id: String,
    pub key_hash: String,
    /// Comma-separated allow-list; None: any model.
    pub models: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub now_ms: i64,
}

pub async fn insert(db: &impl ConnectionTrait, new: NewBuyerKey) -> Result<Model, DbErr> {
    ActiveModel {
        user_id: Set(new.user_id),
        name: Set(new.name),
        lookup_id: Set(new.lookup_id),
        key_hash: Set(new.key_hash),
        models: Set(new.models),
        expires_at_ms: Set(new.expires_at_ms),
        revoked_at_ms: Set(None),
        created_at_ms: Set(new.now_ms),
        ..Default::default()
    }
    .insert(db)
    .await
}

/// Keys the gateway accepts now: not revoked, not expired, and the owner is not disabled.
pub async fn list_usable(db: &impl ConnectionTrait, now_ms: i64) -> Result<Vec<Model>, DbErr> {
    let enabled_users = Query::select()
        .column(users::Column::Id)
        .from(users::Entity)
        .and_where(Expr::col(users::Column::Disabled).eq(false))
        .to_owned();
    Entity::find()
        .filter(Column::RevokedAtMs.is_null())
        .filter(Condition::any().add(Column::ExpiresAtMs.is_null()).add(Column::ExpiresAtMs.gt(now_ms)))
        .filter(Column::UserId.in_subquery(enabled_users))
        .order_by_asc(Column::Id)
        .all(db)
        .await
}

/// All of a user's keys, revoked and expired ones included, oldest first.
pub async fn list_for_user(db: &impl ConnectionTrait, user_id: i64) -> Result<Vec<Model>, DbErr> {
    Entity::find().filter(Column::UserId.eq(user_id)).order_by_asc(Column::Id).all(db).await
}

/// The key if it belongs to `user_id`.
pub async fn find_for_user(db: &impl ConnectionTrait, user_id: i64, key_id: i64) -> Result<Option<Model>, DbErr> {
    Entity::find().filter(Column::Id.eq(key_id)).filter(Column::UserId.eq(user_id)).one(db).await
}

/// Revokes the key if it belongs to `user_id` and is not revoked yet; returns whether it changed.
pub async fn revoke(db: &impl ConnectionTrait, user_id: i64, key_id: i64, now_ms: i64) -> Result<bool, DbErr> {
    let result = Entity::update_many()
        .col_expr(Column::RevokedAtMs, Expr::value(now_ms))
        .filter(Column::Id.eq(key_id))
        .filter(Column::UserId.eq(user_id))
        .filter(Column::RevokedAtMs.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::TestDb;
    use crate::db::users;

    fn key(user_id: i64, lookup_id: &str, expires_at_ms: Option<i64>) -> NewBuyerKey {
        NewBuyerKey {
            user_id,
            name: lookup_id.to_string(),
            lookup_id: lookup_id.to_string(),
            key_hash: "0".repeat(64),
            models: None,
            expires_at_ms,
            now_ms: 1,
        }
    }

    #[tokio::test]
    async fn usable_keys_exclude_revoked_expired_and_disabled_owners() {
        for t in TestDb::all().await {
            let db = &t.db;
            let user = |name| users::NewUser { username: name, password_hash: "h", roles: "buyer", now_ms: 1 };
            let alice = users::insert(db, user("alice")).await.unwrap();
            let bob = users::insert(db, user("bob")).await.unwrap();
            let live = insert(db, key(alice.id, "live0001", None)).await.unwrap();
            let later = insert(db, key(alice.id, "later001", Some(2_000))).await.unwrap();
            insert(db, key(alice.id, "expired1", Some(1_000))).await.unwrap();
            let revoked = insert(db, key(alice.id, "revoked1", None)).await.unwrap();
            insert(db, key(bob.id, "bobkey01", None)).await.unwrap();
            let mut with_models = key(alice.id, "models01", None);
            with_models.models = Some("gpt-4o,gpt-4o-mini".into());
            let with_models = insert(db, with_models).await.unwrap();
            assert_eq!(with_models.models.as_deref(), Some("gpt-4o,gpt-4o-mini"));

            assert!(revoke(db, alice.id, revoked.id, 1_500).await.unwrap());
            assert!(!revoke(db, alice.id, revoked.id, 1_600).await.unwrap(), "already revoked");
            assert!(!revoke(db, bob.id, live.id, 1_600).await.unwrap(), "not bob's key");
            assert_eq!(find_for_user(db, alice.id, revoked.id).await.unwrap().unwrap().revoked_at_ms, Some(1_500));
            assert_eq!(find_for_user(db, bob.id, live.id).await.unwrap(), None);
            users::set_disabled(db, bob.id, true).await.unwrap();

            let usable: Vec<i64> = list_usable(db, 1_000).await.unwrap().into_iter().map(|k| k.id).collect();
            assert_eq!(usable, [live.id, later.id, with_models.id], "{}", t.label);
            assert_eq!(list_for_user(db, alice.id).await.unwrap().len(), 5);
            t.cleanup().await;
        }
    }
}
