use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "hosted_keys")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Random uuid; also the AES-GCM associated data (`hosted_keys:<uid>`).
    #[sea_orm(unique)]
    pub uid: String,
    pub owner_id: i64,
    pub name: String,
    pub provider: String,
    pub base_url: String,
    /// Comma-separated model names.
    #[sea_orm(column_type = "Text")]
    pub models: String,
    /// Versioned ciphertext (`crate::crypto`); never serialised in an API response.
    #[sea_orm(column_type = "Text")]
    pub api_key_enc: String,
    pub key_hint: String,
    /// active | paused | depleted | flagged.
    pub status: String,
    pub declared_balance: i64,
    pub remaining_balance: i64,
    pub failure_count: i64,
    pub success_count: i64,
    pub last_used_at_ms: Option<i64>,
    pub last_failure_at_ms: Option<i64>,
    pub created_at_ms: i64,
    /// seller | platform (platform keys earn the platform the whole price).
    pub pool: String,
    pub updated_at_ms: i64,
    /// Platform (fallback) keys are tried in ascending priority.
    pub priority: i64,
    /// Seller caps; 0 = no cap. Concurrency is enforced per gateway node.
    pub max_concurrency: i64,
    /// Credits per UTC day.
    pub max_spend_per_day: i64,
    /// Credits settled on the key on `spend_day` (days since the Unix epoch, UTC).
    pub spent_today: i64,
    pub spend_day: i64,
    /// Provider balance adapter; empty = derived from the provider name, `none` = no balance API.
    pub balance_api: String,
    pub verified_at_ms: Option<i64>,
    /// The next risk check is due; a node claims a key's check by moving this forward.
    pub next_check_at_ms: i64,
    /// Admin review of a flagged key: '' | pending | confirmed.
    pub review: String,
    /// What put the key in its current status: seller | admin | failures | verification | dilution | balance.
    pub status_cause: String,
    /// The key's success/failure counts at its last risk check (the failure-rate window starts there).
    pub checked_successes: i64,
    pub checked_failures: i64,
    /// When a column the pool snapshot is built from last changed (status, ciphertext, balance, spend, caps,
    /// priority, ...): incremental pool reloads read the rows changed since the previous load, so every
    /// write of such a column moves it.
    pub pool_changed_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
