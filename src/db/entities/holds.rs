use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "holds")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The hold's own ledger account: what is held and not yet spent.
    pub account_id: i64,
    /// The wallet or escrow account the credits came from and unspent credits return to.
    pub source_account_id: i64,
    pub buyer_id: i64,
    pub escrow_id: Option<i64>,
    /// The gateway node that holds it.
    pub node_id: String,
    /// open | closed.
    pub status: String,
    /// Everything moved in from the source.
    pub amount: i64,
    /// Everything settled out of it.
    pub spent: i64,
    pub created_at_ms: i64,
    /// Last sign of life from the node; a hold not renewed for long is recovered.
    pub renewed_at_ms: i64,
    pub closed_at_ms: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
