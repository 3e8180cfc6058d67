use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Notification)]
#[sea_orm(table_name = "notifications")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub user_id: i64,
    /// e.g. key_status.
    pub kind: String,
    pub hosted_key_id: Option<i64>,
    pub message: String,
    pub created_at_ms: i64,
    pub read_at_ms: Option<i64>,
    /// Webhook outbox: when the owner's webhook accepted it (None: not delivered, or no webhook).
    #[serde(skip)]
    pub delivered_at_ms: Option<i64>,
    #[serde(skip)]
    pub delivery_attempts: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
