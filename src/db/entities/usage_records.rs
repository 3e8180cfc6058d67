use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_records")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub request_id: String,
    pub buyer_id: i64,
    pub buyer_key_id: i64,
    pub hosted_key_id: Option<i64>,
    pub model: String,
    pub endpoint: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub estimated: bool,
    pub status_code: i32,
    pub attempts: i32,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub client_disconnected: bool,
    pub error_kind: Option<String>,
    pub created_at_ms: i64,
    /// What the request cost the buyer (0 when nothing was delivered).
    pub cost_credits: i64,
    /// The part of the cost the buyer's funds could not cover (a hold overrun with an empty source).
    pub unpaid_credits: i64,
    /// The hold the request was paid from.
    pub hold_id: Option<i64>,
    /// Served by a platform fallback key.
    pub fallback: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
