use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "escrows")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub buyer_id: i64,
    /// The escrow's own ledger account; its balance is what is left to spend.
    pub account_id: i64,
    /// None: any model.
    pub model: Option<String>,
    /// Pinned to one seller key: only that key serves requests paid from this escrow.
    pub hosted_key_id: Option<i64>,
    /// The amount funded.
    pub amount: i64,
    /// active | exhausted | released | expired.
    pub status: String,
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    pub closed_at_ms: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
