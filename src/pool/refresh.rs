//! The background refresher: reloads the pool on a timer, at once after a local admin change, and — when
//! Redis is configured — at once after an admin change on any other gateway node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use super::{load_snapshot, HostResolver, PoolSnapshot, RefreshHandle, Reload, SharedPool};
use crate::crypto::Keyring;
use crate::health::HealthRegistry;
use crate::metrics::METRICS;

const CHANGE_CHANNEL: &str = "tokex:pool-changed";
/// How often a replaced snapshot is checked for remaining holders.
const RETIRE_POLL: Duration = Duration::from_millis(5);
/// An incremental reload reads the rows changed since the previous load started, minus this: a write
/// stamps its row before its transaction commits (and another node's clock may lag a little), so a row
/// committed just after the previous load read the table is still caught. Rows read twice are reused as
/// they are; a full reload catches anything later still.
const CHANGE_LOOKBACK_MS: i64 = 2_000;

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
    /// Reloads are incremental between full reloads this far apart.
    full_interval: Duration,
    last_full: Option<Instant>,
    /// Where the next incremental reload starts (ms): set by each successful reload.
    changes_since: Option<i64>,
}

impl Refresher {
    pub fn new(
        db: DatabaseConnection,
        keyring: Arc<Keyring>,
        pool: SharedPool,
        dns_ttl: Duration,
        policy: crate::ssrf::UpstreamPolicy,
        health: Arc<HealthRegistry>,
        full_interval: Duration,
    ) -> Self {
        Self {
            db,
            keyring,
            pool,
            resolver: HostResolver::new(dns_ttl, policy),
            health,
            full_interval,
            last_full: None,
            changes_since: None,
        }
    }

    /// Incremental when the previous reload succeeded and the last full one is recent enough.
    fn next_reload(&self) -> Reload {
        match (self.changes_since, self.last_full) {
            (Some(since), Some(full)) if full.elapsed() < self.full_interval => Reload::ChangedSince(since),
            _ => Reload::Full,
        }
    }

    /// Loads and swaps in a new snapshot. On failure the previous snapshot stays in place: a database
    /// outage must not take the gateway down with it.
    ///
    /// The keys' local charges counted before the database was read are in its `spent_today` now (give or
    /// take the usage writer's lag: records still queued are counted by neither until the next reload), so
    /// they are taken off once the new snapshot serves.
    pub async fn refresh(&mut self) -> Result<(), sea_orm::DbErr> {
        let started = Instant::now();
        let started_ms = crate::now_ms();
        let spend_marks = self.health.spend_marks();
        let previous = self.pool.load_full();
        let reload = self.next_reload();
        let result = load_snapshot(&self.db, &self.keyring, &mut self.resolver, &self.health, previous, reload).await;
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
        self.changes_since = Some(started_ms.saturating_sub(CHANGE_LOOKBACK_MS));
        if report.full {
            self.last_full = Some(started);
        }
        let took = started.elapsed();
        let kind = if report.full { "full" } else { "incremental" };
        METRICS.pool_refresh_seconds.with_label_values(&[kind]).observe(took.as_secs_f64());
        tracing::debug!(
            kind,
            rows = report.rows_read,
            read_ms = report.read.as_millis() as u64,
            build_ms = report.build.as_millis() as u64,
            buyers,
            models,
            took_ms = took.as_millis() as u64,
            "pool refreshed"
        );
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
    use crate::db::hosted_keys::{self, KeyOutcome};
    use crate::db::testing::TestDb;
    use sea_orm::sea_query::Expr;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

    fn route(pool: &SharedPool) -> Vec<(i64, u64)> {
        let snapshot = pool.load();
        snapshot.route("m1").map(|r| r.keys().iter().map(|k| (k.id, k.weight)).collect()).unwrap_or_default()
    }

    /// Incremental reloads read the rows stamped since the previous load; a deleted row (or the full
    /// interval) makes the reload full.
    #[tokio::test]
    async fn incremental_reloads_follow_changes_and_keep_health() {
        for t in TestDb::all().await {
            let db = &t.db;
            let keyring = Arc::new(Keyring::new([7u8; 32], vec![]));
            let health = Arc::new(HealthRegistry::with_policy(crate::health::HealthPolicy::default()));
            let pool = super::super::empty_shared_pool();
            let policy = crate::ssrf::UpstreamPolicy::parse("127.0.0.0/8").unwrap();
            let hour = Duration::from_secs(3_600);
            let mut refresher =
                Refresher::new(db.clone(), keyring.clone(), pool.clone(), hour, policy, health.clone(), hour);
            let deposit = |uid: &str, now_ms: i64| {
                let mut key = hosted_keys::tests::new_key(1, uid);
                key.base_url = "http://127.0.0.1:9/v1".into();
                key.models = "m1".into();
                key.api_key_enc = keyring.encrypt(&format!("sk-{uid}"), &crate::accounts::hosted_key_aad(uid));
                key.now_ms = now_ms;
                hosted_keys::insert(db, key)
            };
            // Deposited a minute ago: outside the reload's look-back.
            let earlier = crate::now_ms() - 60_000;
            let a = deposit("uid-a", earlier).await.unwrap().id;
            let b = deposit("uid-b", earlier).await.unwrap().id;
            let c = deposit("uid-c", earlier).await.unwrap().id;
            refresher.refresh().await.unwrap();
            assert_eq!(route(&pool), [(a, 1_000), (b, 1_000), (c, 1_000)], "{}", t.label);
            let (key_a, health_c) = {
                let snapshot = pool.load();
                (snapshot.seller_key(a).unwrap().clone(), snapshot.seller_key(c).unwrap().health.clone())
            };

            let now = crate::now_ms();
            assert!(hosted_keys::transition_status(db, 1, b, "active", "paused", now).await.unwrap());
            let spent = KeyOutcome {
                key_id: c,
                successes: 1,
                failures: 0,
                last_used_at_ms: Some(now),
                last_failure_at_ms: None,
                spent: 400,
            };
            hosted_keys::apply_outcomes(db, &[spent]).await.unwrap();
            let d = deposit("uid-d", now).await.unwrap().id;
            // A write that does not stamp its row: an incremental reload cannot see it, a full one does.
            hosted_keys::Entity::update_many()
                .col_expr(hosted_keys::Column::RemainingBalance, Expr::value(5))
                .filter(hosted_keys::Column::Id.eq(a))
                .exec(db)
                .await
                .unwrap();
            refresher.refresh().await.unwrap();
            assert_eq!(route(&pool), [(a, 1_000), (c, 600), (d, 1_000)], "{}: paused out, re-priced, added", t.label);
            let snapshot = pool.load_full();
            assert!(Arc::ptr_eq(&key_a, snapshot.seller_key(a).unwrap()), "an unchanged row keeps its key");
            assert!(Arc::ptr_eq(&health_c, &snapshot.seller_key(c).unwrap().health), "health carries over");
            assert!(health.get(b).is_none() && health.get(d).is_some());
            assert_eq!((snapshot.status_counts.active, snapshot.status_counts.paused), (3, 1));
            drop(snapshot);

            hosted_keys::Entity::delete_by_id(d).exec(db).await.unwrap();
            refresher.refresh().await.unwrap();
            assert_eq!(route(&pool), [(a, 5), (c, 600)], "{}: the deletion made the reload full", t.label);
            assert!(Arc::ptr_eq(&health_c, &pool.load().seller_key(c).unwrap().health));
            assert!(health.get(d).is_none());
            t.cleanup().await;
        }
    }

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
