//! The background refresher: reloads the pool on a timer, at once after a local admin change, and — when
//! Redis is configured — at once after an admin change on any other gateway node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use super::{load_snapshot, HostResolver, PoolSnapshot, RefreshHandle, SharedPool};
use crate::crypto::Keyring;
use crate::health::HealthRegistry;
use crate::metrics::METRICS;

const CHANGE_CHANNEL: &str = "tokex:pool-changed";
/// How often a replaced snapshot is checked for remaining holders.
const RETIRE_POLL: Duration = Duration::from_millis(5);

pub struct RefresherConfig {
    pub interval: Duration,
    /// Empty: single node, no cross-node notification.
    pub redis_url: String,
}

pub struct Refresher {
    db: DatabaseConnection,
    keyring: Arc<Keyring>,
    pool: SharedPool,
    resolver: HostResolver,
    /// This node's key health, carried from snapshot to snapshot.
    health: Arc<HealthRegistry>,
}

impl Refresher {
    pub fn new(
        db: DatabaseConnection,
        keyring: Arc<Keyring>,
        pool: SharedPool,
        dns_ttl: Duration,
        policy: crate::ssrf::UpstreamPolicy,
        health: Arc<HealthRegistry>,
    ) -> Self {
        Self { db, keyring, pool, resolver: HostResolver::new(dns_ttl, policy), health }
    }

    /// Loads and swaps in a new snapshot. On failure the previous snapshot stays in place: a database
    /// outage must not take the gateway down with it.
    ///
    /// The keys' local charges counted before the database was read are in its `spent_today` now (give or
    /// take the usage writer's lag: records still queued are counted by neither until the next reload), so
    /// they are taken off once the new snapshot serves.
    pub async fn refresh(&mut self) -> Result<(), sea_orm::DbErr> {
        let started = Instant::now();
        let spend_marks = self.health.spend_marks();
        let previous = self.pool.load_full();
        let result = load_snapshot(&self.db, &self.keyring, &mut self.resolver, &self.health, previous).await;
        let (snapshot, report) = match result {
            Ok(loaded) => loaded,
            Err(e) => {
                METRICS.pool_refresh_errors.inc();
                return Err(e);
            }
        };
        for (key_id, reason) in &report.unroutable {
            tracing::warn!(key_id, reason = %reason, "active seller key is not routable");
        }
        let counts = &snapshot.status_counts;
        for (status, n) in [
            ("active", counts.active),
            ("paused", counts.paused),
            ("depleted", counts.depleted),
            ("flagged", counts.flagged),
            ("unroutable", counts.unroutable),
        ] {
            METRICS.pool_keys.with_label_values(&[status]).set(n);
        }
        METRICS.pool_snapshot_keys.set(counts.active + counts.paused + counts.depleted + counts.flagged);
        let buyers = snapshot.buyers.len();
        let models = snapshot.routes.len();
        let previous = self.pool.swap(Arc::new(snapshot));
        retire(previous);
        self.health.settle_spend(spend_marks);
        self.health.update_gauge();
        let took = started.elapsed();
        METRICS.pool_refresh_seconds.observe(took.as_secs_f64());
        tracing::debug!(buyers, models, took_ms = took.as_millis() as u64, "pool refreshed");
        Ok(())
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, handle: RefreshHandle, config: RefresherConfig, mut shutdown: watch::Receiver<bool>) {
        let peers = PeerNotifier::connect(&config.redis_url).await;
        let mut peer_changes = peers.as_ref().map(|p| p.subscriber.message_rx());
        handle.attach(true);
        let mut ticker = tokio::time::interval(config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = handle.requested() => {
                    if let Some(peers) = &peers {
                        peers.announce().await;
                    }
                }
                message = recv_peer(&mut peer_changes) => {
                    if message.is_none() {
                        peer_changes = None;
                        continue;
                    }
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
            }
            // Any reload that starts after a request covers it.
            let generation = handle.current_generation();
            match self.refresh().await {
                Ok(()) => handle.mark_applied(generation),
                Err(e) => tracing::error!(error = %e, "pool refresh failed; keeping the previous snapshot"),
            }
        }
        handle.attach(false);
        if let Some(peers) = peers {
            peers.close().await;
        }
    }
}

/// Frees a replaced snapshot once no request holds it any more, on a blocking thread: otherwise the last
/// request to let go of it would free it on a gateway thread, and freeing a pool of 100,000 keys takes
/// long enough to stall every request queued on that thread. Requests hold a snapshot only while they
/// authenticate and pick a key (not while the upstream answers), so this waits microseconds to
/// milliseconds.
fn retire(previous: Arc<PoolSnapshot>) {
    tokio::spawn(async move {
        let mut previous = previous;
        loop {
            // Nobody can take a new reference once it is swapped out: when the count is one, it is ours.
            match Arc::try_unwrap(previous) {
                Ok(snapshot) => {
                    let _ = tokio::task::spawn_blocking(move || drop(snapshot)).await;
                    return;
                }
                Err(held) => {
                    previous = held;
                    tokio::time::sleep(RETIRE_POLL).await;
                }
            }
        }
    });
}

async fn recv_peer(rx: &mut Option<tokio::sync::broadcast::Receiver<Message>>) -> Option<()> {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        // Missed messages still mean "something changed".
        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some(()),
        Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
    }
}

/// Redis pub/sub between gateway nodes that share one database.
struct PeerNotifier {
    publisher: Client,
    subscriber: SubscriberClient,
}

impl PeerNotifier {
    async fn connect(url: &str) -> Option<Self> {
        if url.is_empty() {
            return None;
        }
        match Self::try_connect(url).await {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::error!(error = %e, "cannot connect to Redis; pool changes on other nodes arrive only with the periodic refresh");
                None
            }
        }
    }

    async fn try_connect(url: &str) -> Result<Self, Error> {
        let config = Config::from_url(url)?;
        let policy = ReconnectPolicy::new_exponential(0, 100, 10_000, 2);
        let publisher = Builder::from_config(config.clone()).set_policy(policy.clone()).build()?;
        let subscriber = Builder::from_config(config).set_policy(policy).build_subscriber_client()?;
        tokio::time::timeout(Duration::from_secs(5), async {
            publisher.init().await?;
            subscriber.init().await?;
            subscriber.manage_subscriptions();
            subscriber.subscribe(CHANGE_CHANNEL).await
        })
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "connecting to Redis timed out"))??;
        Ok(Self { publisher, subscriber })
    }

    async fn announce(&self) {
        if let Err(e) = self.publisher.publish::<i64, _, _>(CHANGE_CHANNEL, "changed").await {
            tracing::warn!(error = %e, "cannot announce a pool change to other nodes");
        }
    }

    async fn close(self) {
        let _ = self.subscriber.quit().await;
        let _ = self.publisher.quit().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replaced_snapshot_is_freed_once_its_last_request_lets_go() {
        let snapshot = Arc::new(PoolSnapshot::default());
        let watch = Arc::downgrade(&snapshot);
        let held_by_a_request = snapshot.clone();
        retire(snapshot);
        tokio::time::sleep(RETIRE_POLL * 4).await;
        assert!(watch.upgrade().is_some(), "freed while a request still held it");
        drop(held_by_a_request);
        let deadline = Instant::now() + Duration::from_secs(5);
        while watch.upgrade().is_some() {
            assert!(Instant::now() < deadline, "never freed");
            tokio::time::sleep(RETIRE_POLL).await;
        }
    }
}
