//! Queries over `sessions` (admin-port logins).

use sea_orm::{ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter};

pub use super::entities::sessions::{ActiveModel, Column, Entity, Model};

pub async fn insert(
    db: &impl ConnectionTrait,
    token_hash: &str,
    user_id: i64,
    expires_at_ms: i64,
    now_ms: i64,
) -> Result<Model, DbErr> {
    ActiveModel {
        token_hash: Set(token_hash.to_string()),
        user_id: Set(user_id),
        expires_at_ms: Set(expires_at_ms),
        created_at_ms: Set(now_ms),
        ..Default::default()
    }
    .insert(db)
    .await
}

/// The session with this token hash if it has not expired.
pub async fn find_live(db: &impl ConnectionTrait, token_hash: &str, now_ms: i64) -> Result<Option<Model>, DbErr> {
    Entity::find().filter(Column::TokenHash.eq(token_hash)).filter(Column::ExpiresAtMs.gt(now_ms)).one(db).await
}

/// Returns whether a session was deleted.
pub async fn delete_by_token_hash(db: &impl ConnectionTrait, token_hash: &str) -> Result<bool, DbErr> {
    let result = Entity::delete_many().filter(Column::TokenHash.eq(token_hash)).exec(db).await?;
    Ok(result.rows_affected > 0)
}

/// Removes expired sessions; returns how many.
pub async fn delete_expired(db: &impl ConnectionTrait, now_ms: i64) -> Result<u64, DbErr> {
    let result = Entity::delete_many().filter(Column::ExpiresAtMs.lte(now_ms)).exec(db).await?;
    Ok(result.rows_affected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::TestDb;

    #[tokio::test]
    async fn sessions_expire_and_can_be_deleted() {
        for t in TestDb::all().await {
            let db = &t.db;
            insert(db, &"a".repeat(64), 1, 1_000, 0).await.unwrap();
            insert(db, &"b".repeat(64), 1, 5_000, 0).await.unwrap();
            assert_eq!(find_live(db, &"a".repeat(64), 999).await.unwrap().unwrap().user_id, 1);
            assert_eq!(find_live(db, &"a".repeat(64), 1_000).await.unwrap(), None, "{}", t.label);
            assert_eq!(delete_expired(db, 1_000).await.unwrap(), 1);
            assert!(delete_by_token_hash(db, &"b".repeat(64)).await.unwrap());
            assert!(!delete_by_token_hash(db, &"b".repeat(64)).await.unwrap());
            t.cleanup().await;
        }
    }
}
