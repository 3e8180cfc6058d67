use sea_orm::entity::prelude::*;

/// One settled request: what it paid and to whom. The credits moved in `entry_id`, a `settle` journal entry
/// shared by the requests of one usage writer batch (docs/ledger.md).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "settlements")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub request_id: String,
    pub entry_id: i64,
    pub paid: i64,
    pub seller: i64,
    pub platform: i64,
    pub seller_account_id: Option<i64>,
    pub created_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
