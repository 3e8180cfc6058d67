use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "journal_entries")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Unique: the same operation retried finds its entry instead of posting twice.
    #[sea_orm(unique)]
    pub idempotency_key: String,
    pub kind: String,
    pub request_id: Option<String>,
    pub actor_id: Option<i64>,
    pub memo: Option<String>,
    pub created_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
