//! A buyer's dispute of one request or one escrow, resolved by an admin (refund through the ledger, or
//! reject).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "disputes")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub buyer_id: i64,
    /// `request:<request id>` or `escrow:<escrow id>`.
    pub target: String,
    /// `target` while open, None once resolved (unique: one open dispute per target).
    pub open_target: Option<String>,
    pub request_id: Option<String>,
    pub escrow_id: Option<i64>,
    pub reason: String,
    /// open | refunded | rejected.
    pub status: String,
    pub refunded_credits: i64,
    pub resolution_note: Option<String>,
    pub resolved_by: Option<i64>,
    pub created_at_ms: i64,
    pub resolved_at_ms: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
