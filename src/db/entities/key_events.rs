use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Serialize, utoipa::ToSchema)]
#[schema(as = KeyEvent)]
#[sea_orm(table_name = "key_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub hosted_key_id: i64,
    pub owner_id: i64,
    /// None for the deposit.
    pub from_status: Option<String>,
    pub to_status: String,
    pub reason: String,
    /// Who made the change; None for the platform itself (risk control).
    pub actor_id: Option<i64>,
    pub created_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
