//! Queries over `model_prices`.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder};

pub use super::entities::model_prices::{ActiveModel, Column, Entity, Model};

pub async fn list(c: &impl ConnectionTrait) -> Result<Vec<Model>, DbErr> {
    Entity::find().order_by_asc(Column::Model).all(c).await
}

pub async fn find(c: &impl ConnectionTrait, model: &str) -> Result<Option<Model>, DbErr> {
    Entity::find().filter(Column::Model.eq(model)).one(c).await
}

/// Sets the model's price (insert or replace).
pub async fn upsert(
    c: &impl ConnectionTrait,
    model: &str,
    prompt_per_million: i64,
    completion_per_million: i64,
    max_output_tokens: i64,
    actor_id: Option<i64>,
    now_ms: i64,
) -> Result<(), DbErr> {
    let row = ActiveModel {
        model: Set(model.to_string()),
        prompt_per_million: Set(prompt_per_million),
        completion_per_million: Set(completion_per_million),
        max_output_tokens: Set(max_output_tokens),
        updated_at_ms: Set(now_ms),
        updated_by: Set(actor_id),
        ..Default::default()
    };
    Entity::insert(row)
        .on_conflict(
            OnConflict::column(Column::Model)
                .update_columns([
                    Column::PromptPerMillion,
                    Column::CompletionPerMillion,
                    Column::MaxOutputTokens,
                    Column::UpdatedAtMs,
                    Column::UpdatedBy,
                ])
                .to_owned(),
        )
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// Removes the price: the model can no longer be served. Returns whether it existed.
pub async fn delete(c: &impl ConnectionTrait, model: &str) -> Result<bool, DbErr> {
    Ok(Entity::delete_many().filter(Column::Model.eq(model)).exec(c).await?.rows_affected > 0)
}
