use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "model_prices")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub model: String,
    /// Credits per million prompt tokens.
    pub prompt_per_million: i64,
    /// Credits per million completion tokens.
    pub completion_per_million: i64,
    /// Completion tokens assumed for the hold when a request sets no max_tokens.
    pub max_output_tokens: i64,
    pub updated_at_ms: i64,
    pub updated_by: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
