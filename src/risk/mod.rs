//! Risk control: scheduled per-key checks (provider balance and dilution, failure rate, depletion),
//! re-verification of keys paused by risk control, admin review of flagged keys, webhook delivery.
//!
//! Several nodes may run this at once: a key's check is claimed by moving its `next_check_at_ms` forward
//! with a conditional UPDATE, so each check runs on exactly one node; webhook attempts are claimed the same
//! way on the notification row.

mod checks;
pub mod failures;
pub mod review;
pub mod webhooks;
pub mod window;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sea_orm::{DatabaseConnection, DbErr};
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

/// Keys claimed per scheduler round.
const CLAIM_BATCH: u64 = 64;
/// Checks run at once on one node (each mostly waits: on the provider, then the settle delay).
const CONCURRENT_CHECKS: usize = 8;
const MAX_TICK_MS: u64 = 5_000;
const MIN_TICK_MS: u64 = 100;
const WEBHOOK_TICK: Duration = Duration::from_secs(1);

/// How often the scheduler looks for due checks.
fn tick(config: &crate::config::RiskConfig) -> Duration {
    let ms = config.check_interval_ms.min(config.reverify_interval_ms).clamp(MIN_TICK_MS, MAX_TICK_MS);
    Duration::from_millis(ms)
}

/// Runs the checks (when `risk.enabled`) and the webhook delivery until `shutdown` turns true.
pub async fn run(ctx: RiskContext, shutdown: watch::Receiver<bool>) {
    let ctx = Arc::new(ctx);
    tokio::join!(check_loop(ctx.clone(), shutdown.clone()), webhook_loop(ctx, shutdown));
}

/// Resolves when shutdown is requested (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn check_loop(ctx: Arc<RiskContext>, mut shutdown: watch::Receiver<bool>) {
    if !ctx.config.enabled {
        tracing::info!("risk checks are disabled on this node");
        return stopped(&mut shutdown).await;
    }
    let tick = tick(&ctx.config);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let round = run_due_checks(&ctx, shutdown.clone());
        tokio::select! {
            result = round => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "risk checks failed; retrying");
                }
            }
            () = stopped(&mut shutdown) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Claims the due checks and runs them. Returns how many keys changed status.
pub(crate) async fn run_due_checks(ctx: &RiskContext, shutdown: watch::Receiver<bool>) -> Result<usize, DbErr> {
    let now = crate::now_ms();
    let mut claimed = Vec::new();
    for key in crate::db::risk::due_keys(&ctx.db, now, CLAIM_BATCH).await? {
        let next_at = now.saturating_add(checks::interval_for(&key, &ctx.config));
        if crate::db::risk::claim_check(&ctx.db, &key, next_at).await? {
            claimed.push(key);
        }
    }
    let results: Vec<(i64, Result<checks::Outcome, DbErr>)> = futures::stream::iter(claimed)
        .map(|key| {
            let shutdown = shutdown.clone();
            async move {
                let key_id = key.id;
                let result = checks::check_key(ctx, key, shutdown).await;
                if matches!(result, Ok(checks::Outcome::Moved(_))) {
                    // This node stops (or starts) routing the key at once; the refresher tells the others.
                    ctx.refresh.request_and_wait().await;
                }
                (key_id, result)
            }
        })
        .buffer_unordered(CONCURRENT_CHECKS)
        .collect()
        .await;
    let mut moved = 0;
    for (key_id, result) in results {
        match result {
            Ok(checks::Outcome::Moved(_)) => moved += 1,
            Ok(checks::Outcome::Unchanged) => {}
            Err(e) => tracing::warn!(key_id, error = %e, "a key's risk check failed"),
        }
    }
    Ok(moved)
}

async fn webhook_loop(ctx: Arc<RiskContext>, mut shutdown: watch::Receiver<bool>) {
    let delivery = webhooks::Delivery {
        db: &ctx.db,
        keyring: &ctx.keyring,
        provider: &ctx.provider,
        max_attempts: ctx.config.webhook_max_attempts,
        provider_timeout_ms: ctx.config.provider_timeout_ms,
    };
    loop {
        tokio::select! {
            result = webhooks::deliver_round(&delivery) => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "webhook delivery failed; retrying");
                }
            }
            () = stopped(&mut shutdown) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(WEBHOOK_TICK) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}
