//! Queries over `usage_records`.

use sea_orm::sea_query::OnConflict;
use std::collections::HashSet;

use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect,
    TransactionTrait,
};

pub use super::entities::usage_records::{ActiveModel, Column, Entity, Model};

/// Rows per INSERT statement: 19 bound columns per row stays far below SQLite's 32766 and MySQL's 65535
/// placeholder limits.
const ROWS_PER_STATEMENT: usize = 500;

/// Inserts the rows with one multi-row INSERT (several in one transaction only beyond
/// `ROWS_PER_STATEMENT`). Rows whose `request_id` already exists are skipped, so a retried batch neither
/// duplicates nor fails. Returns how many rows were new.
pub async fn insert_batch<C>(db: &C, rows: Vec<ActiveModel>) -> Result<u64, DbErr>
where
    C: ConnectionTrait + TransactionTrait,
{
    if rows.is_empty() {
        return Ok(0);
    }
    let mysql = db.get_database_backend() == DbBackend::MySql;
    if rows.len() <= ROWS_PER_STATEMENT && !mysql {
        return insert_chunk(db, rows).await;
    }
    let txn = db.begin().await?;
    let mut inserted = 0;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<ActiveModel> = rows.by_ref().take(ROWS_PER_STATEMENT).collect();
        inserted += if mysql { insert_chunk_mysql(&txn, chunk).await? } else { insert_chunk(&txn, chunk).await? };
    }
    txn.commit().await?;
    Ok(inserted)
}

/// Inserts rows that the caller found new (with `existing_request_ids`, in the same transaction): one
/// multi-row INSERT per `ROWS_PER_STATEMENT`, without the counting of `insert_batch`. A duplicate is still
/// skipped, never an error.
pub async fn insert_new(db: &impl ConnectionTrait, rows: Vec<ActiveModel>) -> Result<(), DbErr> {
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        insert_chunk(db, rows.by_ref().take(ROWS_PER_STATEMENT).collect()).await?;
    }
    Ok(())
}

/// The ids among `request_ids` that have a usage record already. The usage writer asks inside its batch
/// transaction, before inserting, to learn which records of a retried batch are new (only those count in
/// the rollups and the keys' outcomes).
pub async fn existing_request_ids<'a>(
    db: &impl ConnectionTrait,
    request_ids: impl IntoIterator<Item = &'a str>,
) -> Result<HashSet<String>, DbErr> {
    let ids: Vec<&str> = request_ids.into_iter().collect::<HashSet<_>>().into_iter().collect();
    let mut existing = HashSet::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let found: Vec<String> = Entity::find()
            .select_only()
            .column(Column::RequestId)
            .filter(Column::RequestId.is_in(chunk.iter().copied()))
            .into_tuple()
            .all(db)
            .await?;
        existing.extend(found);
    }
    Ok(existing)
}

fn skip_duplicates() -> OnConflict {
    // `do_nothing_on` renders `ON CONFLICT (request_id) DO NOTHING` on SQLite and
    // `ON DUPLICATE KEY UPDATE request_id = request_id` on MySQL, which has no DO NOTHING.
    OnConflict::column(Column::RequestId).do_nothing_on([Column::RequestId]).to_owned()
}

async fn insert_chunk(db: &impl ConnectionTrait, rows: Vec<ActiveModel>) -> Result<u64, DbErr> {
    Entity::insert_many(rows).on_conflict(skip_duplicates()).exec_without_returning(db).await
}

/// sqlx always connects to MySQL with CLIENT_FOUND_ROWS, so a skipped duplicate counts as an affected
/// row; count the rows that already exist instead (inside the caller's transaction). Request ids are
/// unique per request, so no concurrent writer inserts the same ids between the two statements.
async fn insert_chunk_mysql(db: &impl ConnectionTrait, rows: Vec<ActiveModel>) -> Result<u64, DbErr> {
    let ids: HashSet<String> = rows
        .iter()
        .filter_map(|r| match &r.request_id {
            ActiveValue::Set(id) | ActiveValue::Unchanged(id) => Some(id.clone()),
            ActiveValue::NotSet => None,
        })
        .collect();
    let new_ids = u64::try_from(ids.len()).unwrap_or(u64::MAX);
    let existing = Entity::find().filter(Column::RequestId.is_in(ids)).count(db).await?;
    Entity::insert_many(rows).on_conflict(skip_duplicates()).exec_without_returning(db).await?;
    Ok(new_ids.saturating_sub(existing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::TestDb;
    use sea_orm::{ActiveValue::Set, QueryOrder};

    fn row(request_id: &str) -> ActiveModel {
        ActiveModel {
            request_id: Set(request_id.to_string()),
            buyer_id: Set(1),
            buyer_key_id: Set(2),
            hosted_key_id: Set(Some(3)),
            model: Set("gpt-4o".into()),
            endpoint: Set("chat.completions".into()),
            prompt_tokens: Set(10),
            completion_tokens: Set(20),
            estimated: Set(false),
            status_code: Set(200),
            attempts: Set(1),
            latency_ms: Set(123),
            ttft_ms: Set(None),
            request_bytes: Set(1_000),
            response_bytes: Set(2_000),
            client_disconnected: Set(true),
            error_kind: Set(None),
            created_at_ms: Set(42),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn retried_batches_neither_duplicate_nor_fail() {
        for t in TestDb::all().await {
            let db = &t.db;
            assert_eq!(insert_batch(db, vec![]).await.unwrap(), 0);
            assert_eq!(insert_batch(db, vec![row("r1"), row("r2")]).await.unwrap(), 2);
            assert_eq!(insert_batch(db, vec![row("r1"), row("r2")]).await.unwrap(), 0, "{}", t.label);
            assert_eq!(insert_batch(db, vec![row("r2"), row("r3")]).await.unwrap(), 1, "{}", t.label);
            assert_eq!(insert_batch(db, vec![row("r4"), row("r4")]).await.unwrap(), 1, "{}", t.label);
            let rows = Entity::find().order_by_asc(Column::Id).all(db).await.unwrap();
            let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
            assert_eq!(ids, ["r1", "r2", "r3", "r4"]);
            let r = &rows[0];
            assert_eq!(
                (r.hosted_key_id, r.status_code, r.client_disconnected, r.estimated),
                (Some(3), 200, true, false)
            );
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn existing_request_ids_are_found() {
        for t in TestDb::all().await {
            let db = &t.db;
            assert!(existing_request_ids(db, ["a"]).await.unwrap().is_empty());
            insert_batch(db, vec![row("a"), row("b")]).await.unwrap();
            let found = existing_request_ids(db, ["a", "c", "a", "b"]).await.unwrap();
            assert_eq!(found, HashSet::from(["a".to_string(), "b".to_string()]), "{}", t.label);
            let many: Vec<String> = (0..1_200).map(|i| format!("x{i}")).chain(["b".to_string()]).collect();
            let found = existing_request_ids(db, many.iter().map(String::as_str)).await.unwrap();
            assert_eq!(found, HashSet::from(["b".to_string()]), "{}", t.label);
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn large_batches_are_split_below_placeholder_limits() {
        for t in TestDb::all().await {
            let rows: Vec<ActiveModel> = (0..1_234).map(|i| row(&format!("req-{i}"))).collect();
            assert_eq!(insert_batch(&t.db, rows.clone()).await.unwrap(), 1_234, "{}", t.label);
            assert_eq!(insert_batch(&t.db, rows).await.unwrap(), 0);
            assert_eq!(Entity::find().count(&t.db).await.unwrap(), 1_234);
            t.cleanup().await;
        }
    }
}
