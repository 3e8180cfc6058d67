//! The background refresher: reloads the pool on a timer, at once after a local admin change, and — when
//! Redis is configured — at once after an admin change on any other gateway node.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use super::{load_snapshot, HostResolver, RefreshHandle, SharedPool};
use crate::crypto::Keyring;
use crate::health::HealthRegistry;
use crate::metrics::METRICS;

const CHANGE_CHANNEL: &str = "tokex:pool-changed";

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
        let spend_marks = self.health.spend_marks();
        let result = load_snapshot(&self.db, &self.keyring, &mut self.resolver, &self.health).await;
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
        tracing::debug!(
            buyers = snapshot.buyers.len(),
            models = snapshot.routes.len(),
            fallback_models = snapshot.fallback.len(),
            "pool refreshed"
        );
        self.pool.store(Arc::new(snapshot));
        self.health.settle_spend(spend_marks);
        self.health.update_gauge();
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
