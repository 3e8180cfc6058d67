//! Queries over `users`.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder,
};

pub use super::entities::users::{ActiveModel, Column, Entity, Model};

pub struct NewUser<'a> {
    pub username: &'a str,
    pub password_hash: &'a str,
    /// Comma-separated roles.
    pub roles: &'a str,
    pub now_ms: i64,
}

/// Inserts a user; a duplicate username fails with the database's unique-constraint error
/// (`DbErr::sql_err()` is `UniqueConstraintViolation`).
pub async fn insert(db: &impl ConnectionTrait, new: NewUser<'_>) -> Result<Model, DbErr> {
    ActiveModel {
        username: Set(new.username.to_string()),
        password_hash: Set(new.password_hash.to_string()),
        roles: Set(new.roles.to_string()),
        disabled: Set(false),
        created_at_ms: Set(new.now_ms),
        ..Default::default()
    }
    .insert(db)
    .await
}

pub async fn find_by_id(db: &impl ConnectionTrait, id: i64) -> Result<Option<Model>, DbErr> {
    Entity::find_by_id(id).one(db).await
}

pub async fn find_by_username(db: &impl ConnectionTrait, username: &str) -> Result<Option<Model>, DbErr> {
    Entity::find().filter(Column::Username.eq(username)).one(db).await
}

pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<Model>, DbErr> {
    Entity::find().order_by_asc(Column::Id).all(db).await
}

/// Returns whether the user exists.
pub async fn set_disabled(db: &impl ConnectionTrait, user_id: i64, disabled: bool) -> Result<bool, DbErr> {
    let result = Entity::update_many()
        .col_expr(Column::Disabled, Expr::value(disabled))
        .filter(Column::Id.eq(user_id))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

pub async fn count(db: &impl ConnectionTrait) -> Result<u64, DbErr> {
    Entity::find().count(db).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::TestDb;
    use sea_orm::SqlErr;

    fn new(username: &str) -> NewUser<'_> {
        NewUser { username, password_hash: "h", roles: "buyer", now_ms: 1 }
    }

    #[tokio::test]
    async fn usernames_are_unique_and_case_sensitive_on_every_backend() {
        for t in TestDb::all().await {
            let db = &t.db;
            let alice = insert(db, new("alice")).await.unwrap();
            assert_eq!(alice.roles, "buyer");
            assert!(!alice.disabled);
            let err = insert(db, new("alice")).await.unwrap_err();
            assert!(matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))), "{}: {err}", t.label);
            insert(db, new("Alice")).await.unwrap();
            assert_eq!(find_by_username(db, "ALICE").await.unwrap(), None, "{}", t.label);
            assert_eq!(find_by_username(db, "alice").await.unwrap().unwrap().id, alice.id);
            assert_eq!(count(db).await.unwrap(), 2);
            assert!(set_disabled(db, alice.id, true).await.unwrap());
            assert!(find_by_id(db, alice.id).await.unwrap().unwrap().disabled);
            assert!(!set_disabled(db, 999, true).await.unwrap());
            let names: Vec<String> = list(db).await.unwrap().into_iter().map(|u| u.username).collect();
            assert_eq!(names, ["alice", "Alice"]);
            t.cleanup().await;
        }
    }
}
