//! Risk control: scheduled per-key checks (provider balance and dilution, failure rate, depletion),
//! re-verification of keys paused by risk control, admin review of flagged keys, webhook delivery.
//!
//! INTERFACE SKELETON: the scheduler lands with the risk-control change.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use crate::crypto::Keyring;
use crate::pool::RefreshHandle;
use crate::provider::ProviderClient;

/// Worst-case credits of requests this node has in flight on a key (the dilution check's allowance).
pub type InflightCredits = Arc<dyn Fn(i64) -> i64 + Send + Sync>;

pub struct RiskContext {
    pub db: DatabaseConnection,
    pub keyring: Arc<Keyring>,
    pub config: crate::config::RiskConfig,
    pub provider: Arc<ProviderClient>,
    pub refresh: RefreshHandle,
    pub inflight: InflightCredits,
}

/// Runs the checks until `shutdown` turns true.
pub async fn run(ctx: RiskContext, mut shutdown: watch::Receiver<bool>) {
    let _ = ctx;
    while shutdown.changed().await.is_ok() {
        if *shutdown.borrow() {
            return;
        }
    }
}
