//! The in-memory pool: buyer keys and routable seller keys, swapped atomically by a background refresher.
//!
//! The gateway's hot path only ever reads an immutable [`PoolSnapshot`] through [`SharedPool`]; it never
//! queries the database or resolves DNS. One seller key is one routable entry (its own address, TLS/SNI,
//! credentials and weight): several keys on one provider host are never collapsed into one backend.
//!
//! Seller keys are chosen by weighted random pick (balance × health, see [`ModelRoute::pick`] and
//! `crate::health`); platform keys form a separate fallback pool per model, tried in priority order when
//! no seller key can serve.

mod load;
mod refresh;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::health::{InFlight, KeyHealth, Tick};

pub use load::{build_snapshot, load_snapshot, HostResolver, KeyRows, LoadReport, PoolEntry, Reload, Upstreams};
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

/// One routable key (a seller's, or a platform fallback key).
pub struct SellerKey {
    pub id: i64,
    pub owner_id: i64,
    pub provider: String,
    /// Shared by every key on the same base URL.
    pub upstream: Arc<Upstream>,
    /// `Bearer <seller key>`, marked sensitive so that it is never printed by `Debug`.
    pub authorization: HeaderValue,
    /// The balance weight: grows linearly with the remaining balance, at least 1.
    pub weight: u64,
    /// A platform key: the platform earns the whole price of what it serves. Platform keys form the
    /// fallback pool and are never in the seller routes.
    pub platform: bool,
    /// Fallback keys are tried in ascending priority (then id).
    pub priority: i64,
    /// Requests this gateway node may have in flight on the key at once; 0 = no cap. Per node: N nodes
    /// may run up to N times as many.
    pub max_concurrency: u32,
    /// Credits the key may be charged per UTC day; 0 = no cap. A soft cap: checked before a request with
    /// the database's `spent_today` as of the snapshot, this node's charges since and the worst cases in
    /// flight here, so it can be exceeded by what other nodes charged since the snapshot, by the usage
    /// writer's lag, and by the requests in flight when it is reached.
    pub max_spend_per_day: i64,
    /// `hosted_keys.spent_today` / `spend_day` when the snapshot was loaded.
    pub spent_today: i64,
    pub spend_day: i64,
    /// This node's health of the key, shared by every snapshot that holds the key.
    pub health: Arc<KeyHealth>,
}

impl std::fmt::Debug for SellerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SellerKey")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("upstream", &self.upstream)
            .field("weight", &self.weight)
            .field("platform", &self.platform)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl SellerKey {
    /// Credits spent on the key on `day` as far as this node knows, in-flight worst cases included.
    pub fn spend_on(&self, day: i64) -> i64 {
        let stored = if self.spend_day == day { self.spent_today } else { 0 };
        stored.saturating_add(self.health.charged()).saturating_add(self.health.inflight_credits())
    }

    fn under_spend_cap(&self, day: i64) -> bool {
        self.max_spend_per_day <= 0 || self.spend_on(day) < self.max_spend_per_day
    }

    /// May serve a request now: not rate-limited, circuit closed or due for a probe, a concurrency slot
    /// free on this node, the daily spend cap not reached.
    pub fn selectable(&self, now: Tick) -> bool {
        self.health.available(now.mono_ms)
            && (self.max_concurrency == 0 || self.health.inflight() < self.max_concurrency)
            && self.under_spend_cap(now.day)
    }

    /// The selection weight: balance weight × health factor.
    pub fn effective_weight(&self) -> f64 {
        self.weight.max(1) as f64 * self.health.factor()
    }

    /// Claims the key for one attempt whose worst case is `credits` (see [`KeyHealth::acquire`]). None when
    /// it stopped being selectable since it was picked.
    pub fn acquire(&self, now: Tick, credits: i64) -> Option<InFlight> {
        if !self.under_spend_cap(now.day) {
            return None;
        }
        self.health.acquire(now.mono_ms, self.max_concurrency, credits)
    }
}

/// Picks that a health factor below 1 rejects are drawn again this often before an exact scan.
const SAMPLE_TRIES: usize = 8;
/// Two effective weights this close (relative) are a tie, which the least recently used key wins.
const TIE_TOLERANCE: f64 = 0.02;

/// The active seller keys that serve one model, with cumulative balance weights for O(log n) picks.
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

    /// Picks a selectable key not in `exclude` (the keys this request tried already) with probability
    /// proportional to its effective weight (balance weight × health factor), or None when there is none.
    ///
    /// Two distinct candidates are drawn; when their effective weights tie (within [`TIE_TOLERANCE`]) the
    /// one used least recently wins, else the first. The winner's class of weight is always the first
    /// draw's, so shares stay proportional, while equal keys take turns.
    ///
    /// Cost for a healthy pool: two draws by binary search over the static cumulative balance weights,
    /// each accepted with probability equal to the key's health factor (rejection sampling: exact, since
    /// the factor is at most 1); after [`SAMPLE_TRIES`] rejections an exact scan over the keys decides.
    /// No allocation, no lock.
    pub fn pick(&self, rng: &mut impl Rng, exclude: &[i64], now: Tick) -> Option<Arc<SellerKey>> {
        let first = self.draw(rng, exclude, None, now)?;
        let a = &self.keys[first];
        if self.keys.len() < 2 {
            return Some(a.clone());
        }
        let Some(second) = self.draw(rng, exclude, Some(first), now) else {
            return Some(a.clone());
        };
        let b = &self.keys[second];
        let (wa, wb) = (a.effective_weight(), b.effective_weight());
        if (wa - wb).abs() <= TIE_TOLERANCE * wa.max(wb) && b.health.last_used() < a.health.last_used() {
            return Some(b.clone());
        }
        Some(a.clone())
    }

    /// The index of one key drawn by effective weight, never `skip` nor an excluded or unselectable key.
    fn draw(&self, rng: &mut impl Rng, exclude: &[i64], skip: Option<usize>, now: Tick) -> Option<usize> {
        let total = *self.cumulative.last()?;
        // The skipped key's interval is cut out of the range, so the draw needs no retry for it.
        let (skip_start, skip_width) = match skip {
            Some(i) => {
                let start = if i == 0 { 0 } else { self.cumulative[i - 1] };
                (start, self.cumulative[i] - start)
            }
            None => (0, 0),
        };
        let span = total - skip_width;
        if span == 0 {
            return None;
        }
        for _ in 0..SAMPLE_TRIES {
            let mut r = rng.gen_range(0..span);
            if skip.is_some() && r >= skip_start {
                r += skip_width;
            }
            let index = self.cumulative.partition_point(|&c| c <= r);
            let Some(key) = self.keys.get(index) else { continue };
            if exclude.contains(&key.id) || !key.selectable(now) {
                continue;
            }
            let factor = key.health.factor();
            if factor >= 1.0 || rng.gen::<f64>() < factor {
                return Some(index);
            }
        }
        self.draw_exact(rng, exclude, skip, now)
    }

    /// The same distribution as [`ModelRoute::draw`] by a scan: for pools where most of the weight is
    /// excluded, unavailable or unhealthy.
    fn draw_exact(&self, rng: &mut impl Rng, exclude: &[i64], skip: Option<usize>, now: Tick) -> Option<usize> {
        let eligible =
            |(i, key): &(usize, &Arc<SellerKey>)| Some(*i) != skip && !exclude.contains(&key.id) && key.selectable(now);
        let total: f64 = self.keys.iter().enumerate().filter(eligible).map(|(_, k)| k.effective_weight()).sum();
        if total <= 0.0 {
            return None;
        }
        let mut r = rng.gen::<f64>() * total;
        let mut last = None;
        for (i, key) in self.keys.iter().enumerate().filter(eligible) {
            let w = key.effective_weight();
            if r < w {
                return Some(i);
            }
            r -= w;
            last = Some(i);
        }
        // Health moved between the two passes; any eligible key will do.
        last
    }
}

/// The platform's fallback keys for one model, in the order they are tried: priority, then id.
#[derive(Debug, Default)]
pub struct FallbackRoute {
    keys: Vec<Arc<SellerKey>>,
}

impl FallbackRoute {
    pub fn new(mut keys: Vec<Arc<SellerKey>>) -> Self {
        keys.sort_by_key(|k| (k.priority, k.id));
        Self { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[Arc<SellerKey>] {
        &self.keys
    }

    pub fn get(&self, key_id: i64) -> Option<Arc<SellerKey>> {
        self.keys.iter().find(|k| k.id == key_id).cloned()
    }

    /// The first selectable key in priority order that is not in `exclude`.
    pub fn next(&self, exclude: &[i64], now: Tick) -> Option<Arc<SellerKey>> {
        self.keys.iter().find(|k| !exclude.contains(&k.id) && k.selectable(now)).cloned()
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
    /// Routable seller keys per model.
    pub routes: HashMap<String, ModelRoute>,
    /// Active platform fallback keys per model, in priority order: used when no seller key can serve.
    pub fallback: HashMap<String, FallbackRoute>,
    /// Every model any seller key declares, whatever its status: tells "unknown model" (404) apart from
    /// "no key can serve it now" (503).
    pub known_models: HashSet<String>,
    pub status_counts: StatusCounts,
    /// Prices per model; a model without one is not served.
    pub prices: HashMap<String, crate::billing::Price>,
    /// What each buyer (user id) can pay from.
    pub funds: HashMap<i64, crate::billing::BuyerFunds>,
    pub loaded_at_ms: i64,
    /// Every key row, routable or not, by id: the next reload starts from these and reuses the unchanged.
    pub(crate) entries: BTreeMap<i64, Arc<PoolEntry>>,
    /// The upstream of each base URL of an active key.
    pub(crate) upstreams: Upstreams,
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

    /// The seller keys that serve the model.
    pub fn route(&self, model: &str) -> Option<&ModelRoute> {
        self.routes.get(model).filter(|r| !r.is_empty())
    }

    /// The platform fallback keys that serve the model.
    pub fn fallback(&self, model: &str) -> Option<&FallbackRoute> {
        self.fallback.get(model).filter(|r| !r.is_empty())
    }

    /// Some active key, seller or fallback, serves the model.
    pub fn serves(&self, model: &str) -> bool {
        self.route(model).is_some() || self.fallback(model).is_some()
    }

    /// The key with this id if it serves the model (an escrow pinned to it pays for it alone).
    pub fn key_for(&self, model: &str, key_id: i64) -> Option<Arc<SellerKey>> {
        self.route(model).and_then(|r| r.get(key_id)).or_else(|| self.fallback(model).and_then(|r| r.get(key_id)))
    }

    /// The routable key (seller or fallback) with this id, whatever model it serves.
    pub fn seller_key(&self, key_id: i64) -> Option<&Arc<SellerKey>> {
        self.entries.get(&key_id).and_then(|e| e.key())
    }

    pub fn price(&self, model: &str) -> Option<&crate::billing::Price> {
        self.prices.get(model)
    }

    /// Models the buyer may call and the pool can serve now, sorted.
    pub fn servable_models(&self, buyer: &BuyerKey) -> Vec<&str> {
        let mut models: Vec<&str> = self
            .routes
            .keys()
            .chain(self.fallback.keys())
            .filter(|model| self.serves(model) && buyer.allows(model) && self.prices.contains_key(*model))
            .map(String::as_str)
            .collect();
        models.sort_unstable();
        models.dedup();
        models
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{HealthPolicy, Outcome};
    use rand::SeedableRng;

    const NOW: Tick = Tick { mono_ms: 1_000_000, day: 20_000 };

    fn policy() -> Arc<HealthPolicy> {
        Arc::new(HealthPolicy { circuit_failures: 2, ..HealthPolicy::default() })
    }

    fn key_with(id: i64, weight: u64, edit: impl FnOnce(&mut SellerKey)) -> Arc<SellerKey> {
        let mut key = SellerKey {
            id,
            owner_id: 1,
            provider: "openai".into(),
            upstream: Arc::new(Upstream {
                addr: "127.0.0.1:1".parse().unwrap(),
                tls: false,
                host: "127.0.0.1".into(),
                authority: "127.0.0.1:1".into(),
                base_path: "/v1".into(),
            }),
            authorization: HeaderValue::from_static("Bearer x"),
            weight,
            platform: false,
            priority: 0,
            max_concurrency: 0,
            max_spend_per_day: 0,
            spent_today: 0,
            spend_day: 0,
            health: Arc::new(KeyHealth::new(policy())),
        };
        edit(&mut key);
        Arc::new(key)
    }

    fn key(id: i64, weight: u64) -> Arc<SellerKey> {
        key_with(id, weight, |_| {})
    }

    fn shares(route: &ModelRoute, n: u32, seed: u64) -> HashMap<i64, f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut counts: HashMap<i64, u32> = HashMap::new();
        for _ in 0..n {
            let key = route.pick(&mut rng, &[], NOW).unwrap();
            // Used as the gateway uses it (which moves the least-recently-used order), outcome neutral.
            drop(key.acquire(NOW, 0));
            *counts.entry(key.id).or_default() += 1;
        }
        counts.into_iter().map(|(id, c)| (id, f64::from(c) / f64::from(n))).collect()
    }

    #[test]
    fn picks_are_proportional_to_weight() {
        let route = ModelRoute::new(vec![key(1, 1000), key(2, 3000), key(3, 6000)]);
        let shares = shares(&route, 100_000, 7);
        for (id, expected) in [(1, 0.1), (2, 0.3), (3, 0.6)] {
            let share = shares[&id];
            assert!((share - expected).abs() < 0.01, "key {id} share {share} expected {expected}");
        }
    }

    #[test]
    fn picks_are_proportional_to_balance_times_health() {
        let (a, b, c) = (key(1, 1000), key(2, 1000), key(3, 2000));
        // b fails every other request: success average about 0.45 -> factor about 0.2. c is slow: TTFT at the
        // latency reference -> 0.5.
        for _ in 0..200 {
            b.health.acquire(0, 0, 0).unwrap().finish(Outcome::Success { ttft: None }, 0);
            b.health.acquire(0, 0, 0).unwrap().finish(Outcome::Failure, 0);
        }
        let slow = Some(std::time::Duration::from_millis(2_000));
        c.health.acquire(0, 0, 0).unwrap().finish(Outcome::Success { ttft: slow }, 0);
        let (fa, fb, fc) = (a.health.factor(), b.health.factor(), c.health.factor());
        // a and c tie (1000 × 1 = 2000 × 0.5): they take turns within their combined share.
        assert!((fb - 0.25).abs() < 0.1 && (fc - 0.5).abs() < 1e-9, "{fb} {fc}");
        let total = 1000.0 * fa + 1000.0 * fb + 2000.0 * fc;
        let route = ModelRoute::new(vec![a, b, c]);
        let shares = shares(&route, 100_000, 5);
        for (id, expected) in [(1, 1000.0 * fa / total), (2, 1000.0 * fb / total), (3, 2000.0 * fc / total)] {
            let share = shares[&id];
            assert!((share - expected).abs() < 0.01, "key {id} share {share} expected {expected}");
        }
    }

    #[test]
    fn failover_picks_skip_tried_keys_and_stay_proportional() {
        let route = ModelRoute::new(vec![key(1, 1000), key(2, 1000), key(3, 3000)]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            let k = route.pick(&mut rng, &[1], NOW).unwrap();
            assert_ne!(k.id, 1);
            counts[(k.id - 1) as usize] += 1;
        }
        let share3 = f64::from(counts[2]) / 40_000.0;
        assert!((share3 - 0.75).abs() < 0.015, "share {share3}");
        assert!(route.pick(&mut rng, &[1, 2, 3], NOW).is_none());
        assert!(ModelRoute::new(vec![]).pick(&mut rng, &[], NOW).is_none());
    }

    #[test]
    fn unavailable_keys_are_never_picked() {
        let cooling = key(1, 1_000_000);
        let open = key(2, 1_000_000);
        let busy = key_with(3, 1_000_000, |k| k.max_concurrency = 1);
        let spent = key_with(4, 1_000_000, |k| {
            k.max_spend_per_day = 500;
            k.spent_today = 500;
            k.spend_day = NOW.day;
        });
        let fine = key(5, 1);
        let t = NOW.mono_ms;
        cooling.health.acquire(t, 0, 0).unwrap().finish(Outcome::RateLimited { retry_after: None }, t);
        for _ in 0..2 {
            open.health.acquire(t, 0, 0).unwrap().finish(Outcome::Failure, t);
        }
        let _slot = busy.acquire(NOW, 0).unwrap();
        let route = ModelRoute::new(vec![cooling.clone(), open, busy.clone(), spent.clone(), fine]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..2_000 {
            assert_eq!(route.pick(&mut rng, &[], NOW).unwrap().id, 5);
        }
        assert!(route.pick(&mut rng, &[5], NOW).is_none());
        assert!(busy.acquire(NOW, 0).is_none() && spent.acquire(NOW, 0).is_none());
        // Yesterday's spend does not count today; the cooldown ends by time.
        let tomorrow = Tick { day: NOW.day + 1, ..NOW };
        assert!(spent.selectable(tomorrow));
        let later = Tick { mono_ms: NOW.mono_ms + 3_600_000, ..NOW };
        assert!(cooling.selectable(later));
    }

    #[test]
    fn the_spend_cap_counts_local_charges_and_requests_in_flight() {
        let k = key_with(1, 10, |k| {
            k.max_spend_per_day = 1_000;
            k.spent_today = 600;
            k.spend_day = NOW.day;
        });
        assert_eq!(k.spend_on(NOW.day), 600);
        let claim = k.acquire(NOW, 300).unwrap();
        assert!(k.selectable(NOW), "600 + 300 in flight < 1000");
        k.health.add_charge(150);
        assert_eq!(k.spend_on(NOW.day), 1_050);
        assert!(!k.selectable(NOW) && k.acquire(NOW, 1).is_none());
        // The request cost less than its worst case.
        claim.finish(Outcome::Success { ttft: None }, NOW.mono_ms);
        assert_eq!(k.spend_on(NOW.day), 750);
        assert!(k.selectable(NOW));
    }

    #[test]
    fn two_equal_keys_take_turns() {
        let route = ModelRoute::new(vec![key(1, 500), key(2, 500)]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut picked = Vec::new();
        for _ in 0..40 {
            let k = route.pick(&mut rng, &[], NOW).unwrap();
            k.acquire(NOW, 0).unwrap().finish(Outcome::Success { ttft: None }, NOW.mono_ms);
            picked.push(k.id);
        }
        assert!(picked.windows(2).all(|w| w[0] != w[1]), "{picked:?}");
    }

    #[test]
    fn unequal_keys_stay_proportional_when_used() {
        let route = ModelRoute::new(vec![key(1, 1_000), key(2, 3_000)]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let mut first = 0u32;
        let n = 40_000;
        for _ in 0..n {
            let k = route.pick(&mut rng, &[], NOW).unwrap();
            drop(k.acquire(NOW, 0));
            first += u32::from(k.id == 1);
        }
        let share = f64::from(first) / f64::from(n);
        assert!((share - 0.25).abs() < 0.01, "share {share}");
    }

    #[test]
    fn a_due_circuit_lets_exactly_one_probe_through() {
        let k = key(1, 10);
        let t = NOW.mono_ms;
        for _ in 0..2 {
            k.acquire(NOW, 0).unwrap().finish(Outcome::Failure, t);
        }
        let route = ModelRoute::new(vec![k.clone()]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        assert!(route.pick(&mut rng, &[], NOW).is_none(), "open");
        let due = Tick { mono_ms: t + 30_000, ..NOW };
        let probe = route.pick(&mut rng, &[], due).unwrap().acquire(due, 0).unwrap();
        assert!(probe.is_probe());
        assert!(route.pick(&mut rng, &[], due).is_none(), "one probe at a time");
        probe.finish(Outcome::Success { ttft: None }, due.mono_ms);
        assert!(route.pick(&mut rng, &[], due).is_some());
    }

    #[test]
    fn fallback_keys_go_in_priority_order_skipping_unavailable_ones() {
        let p = |id, priority| {
            key_with(id, 1, |k| {
                k.platform = true;
                k.priority = priority;
            })
        };
        let route = FallbackRoute::new(vec![p(7, 5), p(3, 5), p(9, 0), p(1, 9)]);
        let order: Vec<i64> = route.keys().iter().map(|k| k.id).collect();
        assert_eq!(order, [9, 3, 7, 1]);
        assert_eq!(route.next(&[], NOW).unwrap().id, 9);
        assert_eq!(route.next(&[9], NOW).unwrap().id, 3);
        let t = NOW.mono_ms;
        route.keys()[1].acquire(NOW, 0).unwrap().finish(Outcome::RateLimited { retry_after: None }, t);
        assert_eq!(route.next(&[9], NOW).unwrap().id, 7);
        assert!(route.next(&[9, 7, 1], NOW).is_none());
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
        let picked: HashSet<i64> = (0..200).map(|_| route.pick(&mut rng, &[], NOW).unwrap().id).collect();
        assert_eq!(picked.len(), 2);
    }
}
