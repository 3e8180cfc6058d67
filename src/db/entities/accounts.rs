use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "accounts")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// wallet | escrow | hold | revenue | external.
    pub kind: String,
    /// The user for wallets, escrows and holds; 0 for the platform's accounts.
    pub owner_id: i64,
    /// The escrow or hold id; 0 for wallets and platform accounts.
    pub ref_id: i64,
    /// Always the sum of the account's postings; never negative except for `external`.
    pub balance: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
