use sea_orm::entity::prelude::*;

/// One provider balance reading of a seller key and the dilution verdict over the window it closes.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Serialize, utoipa::ToSchema)]
#[schema(as = BalanceSample)]
#[sea_orm(table_name = "key_balance_samples")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub hosted_key_id: i64,
    pub taken_at_ms: i64,
    /// Provider-reported balance, converted to credits.
    pub balance_credits: i64,
    /// What the platform metered on the key since the previous sample (credits, paid and unpaid).
    pub metered_credits: i64,
    /// Allowance for requests in flight at the sample.
    pub inflight_credits: i64,
    /// Drop in balance beyond metered use, allowance and threshold (0 when none).
    pub excess_credits: i64,
    /// baseline | ok | diluted | skipped
    pub verdict: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
