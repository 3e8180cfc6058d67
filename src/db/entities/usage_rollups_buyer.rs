//! Hourly usage per buyer key and model, kept by the usage writer in the settlement transaction.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_rollups_buyer")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The start of the UTC hour (ms since the epoch, a multiple of 3,600,000).
    pub hour_ms: i64,
    pub buyer_id: i64,
    pub buyer_key_id: i64,
    pub model: String,
    pub requests: i64,
    /// Requests answered with a status of 400 or more.
    pub failed_requests: i64,
    /// Requests served by a platform fallback key.
    pub fallback_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// What the requests cost the buyer.
    pub cost_credits: i64,
    /// The part of the cost the buyer's funds paid (cost less unpaid).
    pub paid_credits: i64,
    /// The sellers' share of what was paid.
    pub seller_credits: i64,
    /// The platform's share of what was paid.
    pub platform_credits: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
