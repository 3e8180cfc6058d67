//! The in-memory pool: buyer keys and routable seller keys, swapped atomically by a background refresher.
//!
//! The gateway's hot path only ever reads an immutable [`PoolSnapshot`] through [`SharedPool`]; it never
//! queries the database or resolves DNS. One seller key is one routable entry (its own address, TLS/SNI,
//! credentials and weight): several keys on one provider host are never collapsed into one backend.

mod load;
mod refresh;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rand::Rng;
use subtle::ConstantTimeEq;

pub use load::{build_snapshot, load_snapshot, HostResolver, LoadReport};
pub use refresh::{Refresher, RefresherConfig};

/// Asks the pool refresher to reload from the database now (after an admin change), and lets the caller
/// wait until the reload is in place, so that an admin API answer means "in effect on this node".
#[derive(Clone, Default)]
pub struct RefreshHandle(Arc<RefreshState>);

#[derive(Default)]
struct RefreshState {
    wake: tokio::sync::Notify,
    /// Generation of the latest request.
    requested: AtomicU64,
    /// Highest request generation that a completed reload covers.
    applied: tokio::sync::watch::Sender<u64>,
    /// Set while a refresher serves this handle; without one (unit tests) nobody would ever answer.
    attached: AtomicBool,
}

/// How long an admin change waits for the pool to pick it up before answering anyway.
const APPLY_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

impl RefreshHandle {
    /// Requests a reload without waiting.
    pub fn request(&self) -> u64 {
        let generation = self.0.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.wake.notify_one();
        generation
    }

    /// Requests a reload and waits (bounded) until a snapshot loaded after this call serves requests.
    /// Returns false when it did not happen in time; the change then applies with a later reload.
    pub async fn request_and_wait(&self) -> bool {
        let generation = self.request();
        if !self.0.attached.load(Ordering::SeqCst) {
            return false;
        }
        let mut applied = self.0.applied.subscribe();
        let done = tokio::time::timeout(APPLY_WAIT_LIMIT, applied.wait_for(|g| *g >= generation)).await;
        let in_time = matches!(done, Ok(Ok(_)));
        if !in_time {
            tracing::warn!("the key pool did not reload in time; the change applies with the next reload");
        }
        in_time
    }

    /// For the refresher: waits for a request.
    pub(crate) async fn requested(&self) {
        self.0.wake.notified().await;
    }

    /// For the refresher: the generation a reload starting now will cover.
    pub(crate) fn current_generation(&self) -> u64 {
        self.0.requested.load(Ordering::SeqCst)
    }

    /// For the refresher: a reload that started at `generation` is in place.
    pub(crate) fn mark_applied(&self, generation: u64) {
        self.0.applied.send_if_modified(|g| {
            let newer = generation > *g;
            if newer {
                *g = generation;
            }
            newer
        });
    }

    pub(crate) fn attach(&self, attached: bool) {
        self.0.attached.store(attached, Ordering::SeqCst);
    }
}

/// The current snapshot, readable without locks from every gateway thread.
pub type SharedPool = Arc<ArcSwap<PoolSnapshot>>;

pub fn empty_shared_pool() -> SharedPool {
    Arc::new(ArcSwap::from_pointee(PoolSnapshot::default()))
}

/// A platform-issued buyer key, as the gateway needs it to authenticate.
#[derive(Debug)]
pub struct BuyerKey {
    pub id: i64,
    pub user_id: i64,
    /// sha256 of the whole presented key; the plaintext is never stored.
    pub key_hash: [u8; 32],
    /// None: any model.
    pub allowed_models: Option<HashSet<String>>,
    pub expires_at_ms: Option<i64>,
}

impl BuyerKey {
    pub fn allows(&self, model: &str) -> bool {
        self.allowed_models.as_ref().is_none_or(|m| m.contains(model))
    }
}

/// Where and how to reach one seller key's provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub tls: bool,
    /// TLS server name and the Host header.
    pub host: String,
    /// `Host` header value (with the port when it is not the scheme's default).
    pub authority: String,
    /// Path prefix of the base URL without a trailing slash, e.g. `/v1`.
    pub base_path: String,
}

/// One routable seller key.
pub struct SellerKey {
    pub id: i64,
    pub owner_id: i64,
    pub provider: String,
    pub upstream: Upstream,
    /// `Bearer <seller key>`, marked sensitive so that it is never printed by `Debug`.
    pub authorization: HeaderValue,
    pub weight: u64,
    /// A platform key: the platform earns the whole price of what it serves.
    pub platform: bool,
}

impl std::fmt::Debug for SellerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SellerKey")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("upstream", &self.upstream)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// The active keys that serve one model, with cumulative weights for O(log n) weighted picks.
#[derive(Debug, Default)]
pub struct ModelRoute {
    keys: Vec<Arc<SellerKey>>,
    cumulative: Vec<u64>,
}

impl ModelRoute {
    pub fn new(keys: Vec<Arc<SellerKey>>) -> Self {
        let mut total = 0u64;
        let cumulative = keys
            .iter()
            .map(|k| {
                total = total.saturating_add(k.weight.max(1));
                total
            })
            .collect();
        Self { keys, cumulative }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[Arc<SellerKey>] {
        &self.keys
    }

    /// The key with this id, if it serves this model.
    pub fn get(&self, key_id: i64) -> Option<Arc<SellerKey>> {
        self.keys.iter().find(|k| k.id == key_id).cloned()
    }

    /// Picks a key with probability proportional to its weight, skipping keys already tried in this request.
    pub fn pick(&self, rng: &mut impl Rng, exclude: &[i64]) -> Option<Arc<SellerKey>> {
        let total = *self.cumulative.last()?;
        if exclude.is_empty() {
            let r = rng.gen_range(0..total);
            let index = self.cumulative.partition_point(|&c| c <= r);
            return self.keys.get(index).cloned();
        }
        // Failover path (rare, few keys excluded): an exact weighted pick over the remaining keys.
        let remaining: u64 = self.keys.iter().filter(|k| !exclude.contains(&k.id)).map(|k| k.weight.max(1)).sum();
        if remaining == 0 {
            return None;
        }
        let mut r = rng.gen_range(0..remaining);
        for key in self.keys.iter().filter(|k| !exclude.contains(&k.id)) {
            let w = key.weight.max(1);
            if r < w {
                return Some(key.clone());
            }
            r -= w;
        }
        None
    }
}

/// Seller keys per status, for the pool-size metric and health reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub active: i64,
    pub paused: i64,
    pub depleted: i64,
    pub flagged: i64,
    /// Active keys that could not be routed (undecryptable secret, bad URL, unresolvable host).
    pub unroutable: i64,
}

#[derive(Debug, Default)]
pub struct PoolSnapshot {
    /// Buyer keys by their public lookup id.
    pub buyers: HashMap<String, BuyerKey>,
    /// Routable keys per model.
    pub routes: HashMap<String, ModelRoute>,
    /// Every model any seller key declares, whatever its status: tells "unknown model" (404) apart from
    /// "no key can serve it now" (503).
    pub known_models: HashSet<String>,
    pub status_counts: StatusCounts,
    /// Prices per model; a model without one is not served.
    pub prices: HashMap<String, crate::billing::Price>,
    /// What each buyer (user id) can pay from.
    pub funds: HashMap<i64, crate::billing::BuyerFunds>,
    pub loaded_at_ms: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// Missing, malformed, unknown or revoked key.
    InvalidKey,
    Expired,
}

impl PoolSnapshot {
    /// Authenticates a presented buyer key: a format check, a map lookup by the public id, then a
    /// constant-time comparison of the hash.
    pub fn authenticate(&self, presented: &str, now_ms: i64) -> Result<&BuyerKey, AuthError> {
        let (lookup_id, hash) = crate::credentials::parse_buyer_key(presented).ok_or(AuthError::InvalidKey)?;
        let key = self.buyers.get(lookup_id.as_str()).ok_or(AuthError::InvalidKey)?;
        if !bool::from(key.key_hash.ct_eq(&hash)) {
            return Err(AuthError::InvalidKey);
        }
        if key.expires_at_ms.is_some_and(|t| t <= now_ms) {
            return Err(AuthError::Expired);
        }
        Ok(key)
    }

    pub fn route(&self, model: &str) -> Option<&ModelRoute> {
        self.routes.get(model).filter(|r| !r.is_empty())
    }

    pub fn price(&self, model: &str) -> Option<&crate::billing::Price> {
        self.prices.get(model)
    }

    /// Models the buyer may call and the pool can serve now, sorted.
    pub fn servable_models(&self, buyer: &BuyerKey) -> Vec<&str> {
        let mut models: Vec<&str> = self
            .routes
            .iter()
            .filter(|(model, route)| !route.is_empty() && buyer.allows(model) && self.prices.contains_key(*model))
            .map(|(model, _)| model.as_str())
            .collect();
        models.sort_unstable();
        models
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn key(id: i64, weight: u64) -> Arc<SellerKey> {
        Arc::new(SellerKey {
            id,
            owner_id: 1,
            provider: "openai".into(),
            upstream: Upstream {
                addr: "127.0.0.1:1".parse().unwrap(),
                tls: false,
                host: "127.0.0.1".into(),
                authority: "127.0.0.1:1".into(),
                base_path: "/v1".into(),
            },
            authorization: HeaderValue::from_static("Bearer x"),
            weight,
            platform: false,
        })
    }

    #[test]
    fn picks_are_proportional_to_weight() {
        let route = ModelRoute::new(vec![key(1, 1000), key(2, 3000), key(3, 6000)]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        let n = 100_000;
        for _ in 0..n {
            let k = route.pick(&mut rng, &[]).unwrap();
            counts[(k.id - 1) as usize] += 1;
        }
        for (i, expected) in [0.1, 0.3, 0.6].iter().enumerate() {
            let share = f64::from(counts[i]) / f64::from(n);
            assert!((share - expected).abs() < 0.01, "key {} share {share} expected {expected}", i + 1);
        }
    }

    #[test]
    fn failover_picks_skip_tried_keys_and_stay_proportional() {
        let route = ModelRoute::new(vec![key(1, 1000), key(2, 1000), key(3, 3000)]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            let k = route.pick(&mut rng, &[1]).unwrap();
            assert_ne!(k.id, 1);
            counts[(k.id - 1) as usize] += 1;
        }
        let share3 = f64::from(counts[2]) / 40_000.0;
        assert!((share3 - 0.75).abs() < 0.015, "share {share3}");
        assert!(route.pick(&mut rng, &[1, 2, 3]).is_none());
        assert!(ModelRoute::new(vec![]).pick(&mut rng, &[]).is_none());
    }

    #[tokio::test]
    async fn admin_changes_wait_for_the_reload_that_covers_them() {
        let handle = RefreshHandle::default();
        // No refresher attached: nothing would ever answer, so do not wait.
        assert!(!handle.request_and_wait().await);

        handle.attach(true);
        let refresher = handle.clone();
        let reloads = Arc::new(AtomicU64::new(0));
        let counted = reloads.clone();
        tokio::spawn(async move {
            loop {
                refresher.requested().await;
                let generation = refresher.current_generation();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                counted.fetch_add(1, Ordering::SeqCst);
                refresher.mark_applied(generation);
            }
        });
        assert!(handle.request_and_wait().await);
        assert!(reloads.load(Ordering::SeqCst) >= 1, "answered before any reload completed");
        let (a, b) = tokio::join!(handle.request_and_wait(), handle.request_and_wait());
        assert!(a && b);
    }

    #[test]
    fn zero_weight_keys_still_get_a_minimal_share() {
        let route = ModelRoute::new(vec![key(1, 0), key(2, 0)]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let picked: HashSet<i64> = (0..200).map(|_| route.pick(&mut rng, &[]).unwrap().id).collect();
        assert_eq!(picked.len(), 2);
    }
}
