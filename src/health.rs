//! Per-node health of every key: success and time-to-first-token moving averages, rate-limit cooldowns,
//! circuit breakers, in-flight counts and the credits this node charged on each key.
//!
//! Everything here is per gateway node and lock-free: the hot path only loads and updates atomics of the
//! key's [`KeyHealth`], which the pool snapshot holds next to the key itself. The [`HealthRegistry`] keeps
//! one `Arc<KeyHealth>` per key id across snapshot reloads (a reload must not forget a key's circuit or
//! cooldown); the refresher attaches each key's entry while it builds a snapshot and drops the entries of
//! keys that left the pool.
//!
//! The rules, per key and per request (never per subrequest, which Pingora may retry):
//! - a success updates the success average (towards 1) and, for streams, the time-to-first-token average,
//!   resets the consecutive failures and closes a half-open circuit;
//! - a 429 puts the key in cooldown for its `Retry-After` (seconds or an HTTP date, at most
//!   `routing.cooldown_max_ms`; `routing.cooldown_default_ms` without one); it is not a failure;
//! - connection errors, timeouts, 5xx, 401/403 and streams the upstream broke off are failures: the
//!   success average moves towards 0 and `routing.circuit_failures` of them in a row open the circuit for
//!   `routing.circuit_open_ms`; then one request at a time may probe the key (half-open); a failed probe
//!   opens it again for twice as long (at most `routing.circuit_max_open_ms`), a successful one closes it;
//! - the buyer's own errors (4xx passed on) and client disconnects are neutral.
//!
//! The selection weight of a key is its balance weight times its health factor:
//!
//! ```text
//! health = max(MIN_HEALTH, success² × L / (L + ttft))
//! ```
//!
//! with `success` the success-rate average in [0, 1], `ttft` the time-to-first-token average in ms (0 until
//! the first streamed answer) and `L` = `routing.latency_reference_ms`: a key that always answers keeps
//! its whole weight, one whose TTFT averages `L` keeps half of it, one failing half of its requests keeps
//! a quarter. The floor keeps a key that is selectable at all from starving: it must be tried now and then
//! to show that it recovered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::RoutingConfig;
use crate::metrics::METRICS;

/// The lowest health factor: a selectable key keeps at least this share of its balance weight.
pub const MIN_HEALTH: f64 = 0.01;

/// How often the `keys_unavailable` gauge is recounted at most when keys change state (besides the
/// periodic recount, which catches cooldowns and circuits that end by time).
const GAUGE_MIN_INTERVAL_MS: u64 = 100;
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Milliseconds on a monotonic clock (process-local, starts at 1): cooldowns and circuits must not move
/// with the wall clock.
pub fn mono_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX >> 2).saturating_add(1)
}

/// One point in time as the routing decisions need it: the monotonic clock for health, the UTC day for
/// the daily spend caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    pub mono_ms: u64,
    /// Days since the Unix epoch (UTC), as in `hosted_keys.spend_day`.
    pub day: i64,
}

impl Tick {
    pub fn now() -> Self {
        Self { mono_ms: mono_ms(), day: crate::db::hosted_keys::utc_day(crate::now_ms()) }
    }
}

/// [`RoutingConfig`] in the units the hot path uses.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthPolicy {
    /// Weight of the newest observation in the moving averages, in (0, 1].
    pub ewma_weight: f64,
    pub latency_reference_ms: f64,
    pub circuit_failures: u32,
    pub circuit_open_ms: u64,
    pub circuit_max_open_ms: u64,
    pub cooldown_default_ms: u64,
    pub cooldown_max_ms: u64,
}

impl From<&RoutingConfig> for HealthPolicy {
    fn from(c: &RoutingConfig) -> Self {
        Self {
            ewma_weight: (f64::from(c.ewma_weight_permille) / 1000.0).clamp(0.001, 1.0),
            latency_reference_ms: (c.latency_reference_ms as f64).max(1.0),
            circuit_failures: c.circuit_failures.max(1),
            circuit_open_ms: c.circuit_open_ms.max(1),
            circuit_max_open_ms: c.circuit_max_open_ms.max(c.circuit_open_ms).max(1),
            cooldown_default_ms: c.cooldown_default_ms,
            cooldown_max_ms: c.cooldown_max_ms,
        }
    }
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self::from(&RoutingConfig::default())
    }
}

/// A key's circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Not selectable before `until_ms`; from then on one request may probe the key.
    Open {
        until_ms: u64,
    },
    /// A probe is in flight since `since_ms`; nobody else may use the key until it reports.
    HalfOpen {
        since_ms: u64,
    },
}

const STATE_SHIFT: u32 = 62;
const TIME_MASK: u64 = (1 << STATE_SHIFT) - 1;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;

impl Circuit {
    fn encode(self) -> u64 {
        match self {
            Self::Closed => 0,
            Self::Open { until_ms } => (OPEN << STATE_SHIFT) | (until_ms & TIME_MASK),
            Self::HalfOpen { since_ms } => (HALF_OPEN << STATE_SHIFT) | (since_ms & TIME_MASK),
        }
    }

    fn decode(bits: u64) -> Self {
        match bits >> STATE_SHIFT {
            OPEN => Self::Open { until_ms: bits & TIME_MASK },
            HALF_OPEN => Self::HalfOpen { since_ms: bits & TIME_MASK },
            _ => Self::Closed,
        }
    }
}

/// What one request observed on one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The key answered. `ttft` only for streams: the first byte of a non-stream answer comes after the
    /// whole generation and measures the request's length, not the key.
    Success { ttft: Option<Duration> },
    /// 429, with the upstream's `Retry-After` if it sent a usable one.
    RateLimited { retry_after: Option<Duration> },
    /// Connection error, timeout, 5xx, 401/403, or a stream the upstream broke off.
    Failure,
    /// Says nothing about the key: the buyer's own error, or the buyer went away.
    Neutral,
}

/// What recording an outcome changed, for metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The key entered (or extended) a rate-limit cooldown.
    pub cooled_down: bool,
    /// The circuit state the key entered, if it changed.
    pub circuit: Option<CircuitChange>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitChange {
    /// Opened after consecutive failures, for this long.
    Opened { for_ms: u64 },
    /// A failed probe opened it again, for this long.
    Reopened { for_ms: u64 },
    /// A probe succeeded.
    Closed,
}

impl Recorded {
    /// The key's availability may have changed (for the `keys_unavailable` gauge).
    pub fn changed_availability(&self) -> bool {
        self.cooled_down || self.circuit.is_some()
    }
}

/// Process-wide use order: the least recently used of two equal keys has the lowest number.
static USE_SEQUENCE: AtomicU64 = AtomicU64::new(1);

/// One key's health on this node. All atomics: read on every pick, written once per attempt.
#[derive(Debug)]
pub struct KeyHealth {
    policy: Arc<HealthPolicy>,
    /// Success-rate moving average in [0, 1] (f64 bits); starts at 1.
    success: AtomicU64,
    /// Time-to-first-token moving average in ms (f64 bits); 0 until the first sample.
    ttft_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// [`Circuit`], encoded.
    circuit: AtomicU64,
    /// How long the circuit opens next time (doubles after each failed probe, reset when it closes).
    open_wait_ms: AtomicU64,
    /// Monotonic ms before which the key is rate-limited.
    cooldown_until_ms: AtomicU64,
    /// [`USE_SEQUENCE`] value of its last use (0: never used).
    last_used: AtomicU64,
    inflight: AtomicU32,
    /// Worst-case credits of the requests in flight on this key on this node.
    inflight_credits: AtomicI64,
    /// Credits this node charged on the key since the current snapshot's spend figures were read.
    charged: AtomicI64,
}

impl KeyHealth {
    pub fn new(policy: Arc<HealthPolicy>) -> Self {
        let open_wait = policy.circuit_open_ms;
        Self {
            policy,
            success: AtomicU64::new(1.0f64.to_bits()),
            ttft_ms: AtomicU64::new(0.0f64.to_bits()),
            consecutive_failures: AtomicU32::new(0),
            circuit: AtomicU64::new(Circuit::Closed.encode()),
            open_wait_ms: AtomicU64::new(open_wait),
            cooldown_until_ms: AtomicU64::new(0),
            last_used: AtomicU64::new(0),
            inflight: AtomicU32::new(0),
            inflight_credits: AtomicI64::new(0),
            charged: AtomicI64::new(0),
        }
    }

    pub fn success_rate(&self) -> f64 {
        f64::from_bits(self.success.load(Ordering::Relaxed))
    }

    /// None until a streamed answer was timed.
    pub fn ttft_ms(&self) -> Option<f64> {
        let v = f64::from_bits(self.ttft_ms.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// The health factor in [`MIN_HEALTH`, 1] (see the module documentation).
    pub fn factor(&self) -> f64 {
        let success = self.success_rate().clamp(0.0, 1.0);
        let latency = f64::from_bits(self.ttft_ms.load(Ordering::Relaxed)).max(0.0);
        let reference = self.policy.latency_reference_ms;
        (success * success * reference / (reference + latency)).clamp(MIN_HEALTH, 1.0)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn circuit(&self) -> Circuit {
        Circuit::decode(self.circuit.load(Ordering::Acquire))
    }

    pub fn cooling_down(&self, now_ms: u64) -> bool {
        self.cooldown_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn inflight_credits(&self) -> i64 {
        self.inflight_credits.load(Ordering::Relaxed)
    }

    /// Credits charged on this node since the snapshot's spend figures were read.
    pub fn charged(&self) -> i64 {
        self.charged.load(Ordering::Relaxed)
    }

    /// Counts a charge towards the key's daily spend (until the next snapshot has it from the database).
    pub fn add_charge(&self, credits: i64) {
        if credits > 0 {
            self.charged.fetch_add(credits, Ordering::Relaxed);
        }
    }

    /// Neither rate-limited nor behind an open circuit: either closed, or open long enough that a probe
    /// may be claimed. (Caps are the pool's business: they depend on the snapshot.)
    pub fn available(&self, now_ms: u64) -> bool {
        if self.cooling_down(now_ms) {
            return false;
        }
        match self.circuit() {
            Circuit::Closed => true,
            Circuit::Open { until_ms } => until_ms <= now_ms,
            Circuit::HalfOpen { .. } => false,
        }
    }

    /// Rate-limited or circuit not closed: what the `keys_unavailable` gauge counts.
    pub fn benched(&self, now_ms: u64) -> bool {
        self.cooling_down(now_ms)
            || match self.circuit() {
                Circuit::Closed => false,
                Circuit::Open { until_ms } => until_ms > now_ms,
                Circuit::HalfOpen { .. } => true,
            }
    }

    /// Claims the key for one attempt: re-checks the cooldown, claims the half-open probe if the circuit
    /// is open and due (one at a time, by compare-and-swap), takes a concurrency slot if
    /// `max_concurrency` > 0 allows one, and counts `credits` (the request's worst case) as in flight.
    /// None when any of it fails (another request got there first); nothing is held then.
    pub fn acquire(self: &Arc<Self>, now_ms: u64, max_concurrency: u32, credits: i64) -> Option<InFlight> {
        if self.cooling_down(now_ms) {
            return None;
        }
        let current = self.circuit.load(Ordering::Acquire);
        let probe = match Circuit::decode(current) {
            Circuit::Closed => false,
            Circuit::Open { until_ms } if until_ms <= now_ms => {
                let claimed = Circuit::HalfOpen { since_ms: now_ms }.encode();
                self.circuit.compare_exchange(current, claimed, Ordering::AcqRel, Ordering::Acquire).ok()?;
                METRICS.circuit_transitions.with_label_values(&["half_open"]).inc();
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => return None,
        };
        let slot = if max_concurrency == 0 {
            self.inflight.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            self.inflight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_concurrency).then_some(n + 1))
                .is_ok()
        };
        if !slot {
            if probe {
                self.release_probe(now_ms);
            }
            return None;
        }
        let credits = credits.max(0);
        self.inflight_credits.fetch_add(credits, Ordering::Relaxed);
        self.last_used.store(USE_SEQUENCE.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Some(InFlight { health: self.clone(), credits, probe, done: false })
    }

    fn release(&self, credits: i64) {
        self.inflight_credits.fetch_sub(credits, Ordering::Relaxed);
        // Never below zero, whatever happens to the pairing.
        let _ = self.inflight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
    }

    /// A probe that proved nothing: the next request may probe at once.
    fn release_probe(&self, now_ms: u64) {
        let current = self.circuit.load(Ordering::Acquire);
        if matches!(Circuit::decode(current), Circuit::HalfOpen { .. }) {
            let reopened = Circuit::Open { until_ms: now_ms }.encode();
            let _ = self.circuit.compare_exchange(current, reopened, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn ewma(&self, cell: &AtomicU64, sample: f64, first_sample_sets: bool) {
        let alpha = self.policy.ewma_weight;
        let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let old = f64::from_bits(bits);
            let new = if first_sample_sets && old <= 0.0 { sample } else { old + alpha * (sample - old) };
            Some(new.to_bits())
        });
    }

    fn record(&self, probe: bool, outcome: Outcome, now_ms: u64) -> Recorded {
        let mut recorded = Recorded::default();
        match outcome {
            Outcome::Success { ttft } => {
                self.ewma(&self.success, 1.0, false);
                if let Some(ttft) = ttft {
                    self.ewma(&self.ttft_ms, (ttft.as_secs_f64() * 1000.0).max(0.001), true);
                }
                self.consecutive_failures.store(0, Ordering::Relaxed);
                if probe {
                    let current = self.circuit.load(Ordering::Acquire);
                    if matches!(Circuit::decode(current), Circuit::HalfOpen { .. })
                        && self
                            .circuit
                            .compare_exchange(current, Circuit::Closed.encode(), Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    {
                        self.open_wait_ms.store(self.policy.circuit_open_ms, Ordering::Relaxed);
                        METRICS.circuit_transitions.with_label_values(&["closed"]).inc();
                        recorded.circuit = Some(CircuitChange::Closed);
                    }
                }
            }
            Outcome::RateLimited { retry_after } => {
                let wait = retry_after
                    .map_or(self.policy.cooldown_default_ms, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .min(self.policy.cooldown_max_ms);
                self.cooldown_until_ms.fetch_max(now_ms.saturating_add(wait), Ordering::Relaxed);
                recorded.cooled_down = wait > 0;
                if probe {
                    self.release_probe(now_ms);
                }
            }
            Outcome::Failure => {
                self.ewma(&self.success, 0.0, false);
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                if probe {
                    let max = self.policy.circuit_max_open_ms;
                    let previous = self
                        .open_wait_ms
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(w.saturating_mul(2).min(max)))
                        .unwrap_or(self.policy.circuit_open_ms);
                    let wait = previous.saturating_mul(2).min(max);
                    self.circuit
                        .store(Circuit::Open { until_ms: now_ms.saturating_add(wait) }.encode(), Ordering::Release);
                    METRICS.circuit_transitions.with_label_values(&["open"]).inc();
                    recorded.circuit = Some(CircuitChange::Reopened { for_ms: wait });
                } else if failures >= self.policy.circuit_failures {
                    let wait = self.open_wait_ms.load(Ordering::Relaxed);
                    let opened = Circuit::Open { until_ms: now_ms.saturating_add(wait) }.encode();
                    if self
                        .circuit
                        .compare_exchange(Circuit::Closed.encode(), opened, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        METRICS.circuit_transitions.with_label_values(&["open"]).inc();
                        recorded.circuit = Some(CircuitChange::Opened { for_ms: wait });
                    }
                }
            }
            Outcome::Neutral => {
                if probe {
                    self.release_probe(now_ms);
                }
            }
        }
        recorded
    }
}

/// One attempt's claim on a key: its concurrency slot, its in-flight credits and, for a half-open key,
/// the probe. [`InFlight::finish`] records the attempt's outcome; dropped unfinished (a panic, a cancelled
/// request) it releases everything and counts as neutral, so a probe can never stay claimed.
#[must_use = "an attempt's claim must be finished with its outcome"]
#[derive(Debug)]
pub struct InFlight {
    health: Arc<KeyHealth>,
    credits: i64,
    probe: bool,
    done: bool,
}

impl InFlight {
    /// This attempt probes a half-open circuit.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn health(&self) -> &Arc<KeyHealth> {
        &self.health
    }

    /// Records the attempt's outcome (once per request and key) and releases the claim.
    pub fn finish(mut self, outcome: Outcome, now_ms: u64) -> Recorded {
        self.done = true;
        self.health.release(self.credits);
        self.health.record(self.probe, outcome, now_ms)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.health.release(self.credits);
            let _ = self.health.record(self.probe, Outcome::Neutral, mono_ms());
        }
    }
}

/// Every key's [`KeyHealth`] on this node, by key id, kept across snapshot reloads.
pub struct HealthRegistry {
    policy: Arc<HealthPolicy>,
    keys: ArcSwap<HashMap<i64, Arc<KeyHealth>>>,
    gauge_counted_at: AtomicU64,
}

impl HealthRegistry {
    pub fn new(config: &RoutingConfig) -> Self {
        Self::with_policy(HealthPolicy::from(config))
    }

    pub fn with_policy(policy: HealthPolicy) -> Self {
        Self { policy: Arc::new(policy), keys: ArcSwap::default(), gauge_counted_at: AtomicU64::new(0) }
    }

    pub fn policy(&self) -> &Arc<HealthPolicy> {
        &self.policy
    }

    /// Starts the key set of a new snapshot: [`HealthAttacher::attach`] each of its keys, then
    /// [`HealthAttacher::commit`] drops the entries of every key that was not attached.
    pub fn attacher(&self) -> HealthAttacher<'_> {
        let previous = self.keys.load_full();
        let next = HashMap::with_capacity(previous.len());
        HealthAttacher { registry: self, previous, next }
    }

    pub fn get(&self, key_id: i64) -> Option<Arc<KeyHealth>> {
        self.keys.load().get(&key_id).cloned()
    }

    /// Worst-case credits of the requests this node has in flight on the key (0 for an unknown key): the
    /// risk checker's allowance for requests whose usage is not metered yet.
    pub fn inflight_credits(&self, key_id: i64) -> i64 {
        self.keys.load().get(&key_id).map_or(0, |h| h.inflight_credits())
    }

    /// The local charges of every key, read before the database is: after the new snapshot is in place,
    /// [`HealthRegistry::settle_spend`] takes them off again, since the database's `spent_today` includes
    /// them from then on (give or take the usage writer's lag). Charges made during the load stay counted.
    pub fn spend_marks(&self) -> Vec<(Arc<KeyHealth>, i64)> {
        self.keys.load().values().filter_map(|h| Some((h.clone(), h.charged())).filter(|(_, c)| *c != 0)).collect()
    }

    pub fn settle_spend(&self, marks: Vec<(Arc<KeyHealth>, i64)>) {
        for (health, charged) in marks {
            health.charged.fetch_sub(charged, Ordering::Relaxed);
        }
    }

    /// Keys rate-limited or behind a circuit that is not closed, now.
    pub fn benched(&self, now_ms: u64) -> i64 {
        self.keys.load().values().filter(|h| h.benched(now_ms)).count() as i64
    }

    /// Recounts the `keys_unavailable` gauge.
    pub fn update_gauge(&self) {
        let now = mono_ms();
        self.gauge_counted_at.store(now, Ordering::Relaxed);
        METRICS.keys_unavailable.set(self.benched(now));
    }

    /// Recounts the gauge after a key changed state, at most every [`GAUGE_MIN_INTERVAL_MS`] (the periodic
    /// recount catches the rest): a burst of 429s must not turn into a burst of scans.
    pub fn note_change(&self) {
        let now = mono_ms();
        let last = self.gauge_counted_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= GAUGE_MIN_INTERVAL_MS
            && self.gauge_counted_at.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            METRICS.keys_unavailable.set(self.benched(now));
        }
    }

    /// Recounts the gauge every second until `shutdown` turns true: cooldowns and open circuits end by
    /// time, without an event.
    pub async fn run_gauge(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(GAUGE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.update_gauge(),
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// Builds the key set of a new snapshot (see [`HealthRegistry::attacher`]).
pub struct HealthAttacher<'a> {
    registry: &'a HealthRegistry,
    previous: Arc<HashMap<i64, Arc<KeyHealth>>>,
    next: HashMap<i64, Arc<KeyHealth>>,
}

impl HealthAttacher<'_> {
    /// The key's health: the one it had if it was in the pool before, else a fresh (healthy) one.
    pub fn attach(&mut self, key_id: i64) -> Arc<KeyHealth> {
        if let Some(health) = self.next.get(&key_id) {
            return health.clone();
        }
        let health = self
            .previous
            .get(&key_id)
            .cloned()
            .unwrap_or_else(|| Arc::new(KeyHealth::new(self.registry.policy.clone())));
        self.next.insert(key_id, health.clone());
        health
    }

    /// Replaces the registry's key set with the attached keys.
    pub fn commit(self) {
        self.registry.keys.store(Arc::new(self.next));
    }
}

/// The wait a `Retry-After` header asks for: delta-seconds (integer, or fractional as some providers
/// send) or an HTTP date, relative to `now_unix_ms`. A date in the past means no wait. None when the value
/// is neither.
pub fn parse_retry_after(value: &str, now_unix_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = date.timestamp_millis().saturating_sub(now_unix_ms).max(0);
    Some(Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Arc<HealthPolicy> {
        Arc::new(HealthPolicy {
            ewma_weight: 0.2,
            latency_reference_ms: 2_000.0,
            circuit_failures: 3,
            circuit_open_ms: 1_000,
            circuit_max_open_ms: 3_000,
            cooldown_default_ms: 10_000,
            cooldown_max_ms: 60_000,
        })
    }

    fn key() -> Arc<KeyHealth> {
        Arc::new(KeyHealth::new(policy()))
    }

    fn run(h: &Arc<KeyHealth>, outcome: Outcome, now: u64) -> Recorded {
        h.acquire(now, 0, 10).expect("available").finish(outcome, now)
    }

    #[test]
    fn starts_healthy_and_averages_move_with_outcomes() {
        let h = key();
        assert_eq!(h.factor(), 1.0);
        assert_eq!(h.ttft_ms(), None);
        run(&h, Outcome::Failure, 1);
        assert!((h.success_rate() - 0.8).abs() < 1e-9);
        assert!((h.factor() - 0.64).abs() < 1e-9, "success² without latency: {}", h.factor());
        run(&h, Outcome::Success { ttft: Some(Duration::from_millis(2_000)) }, 2);
        assert!((h.success_rate() - 0.84).abs() < 1e-9);
        // The first TTFT sample sets the average; at the reference latency half the weight is kept.
        assert_eq!(h.ttft_ms(), Some(2_000.0));
        assert!((h.factor() - 0.84 * 0.84 * 0.5).abs() < 1e-9);
        run(&h, Outcome::Success { ttft: Some(Duration::from_millis(1_000)) }, 3);
        assert!((h.ttft_ms().unwrap() - 1_800.0).abs() < 1e-9);
        // A non-stream success leaves the latency alone; neutral outcomes leave everything alone.
        let before = h.ttft_ms();
        run(&h, Outcome::Success { ttft: None }, 4);
        assert_eq!(h.ttft_ms(), before);
        let rate = h.success_rate();
        run(&h, Outcome::Neutral, 5);
        assert_eq!(h.success_rate(), rate);
        // Failures alone never take the factor to zero.
        for t in 0..50 {
            h.record(false, Outcome::Failure, 10 + t);
        }
        assert_eq!(h.factor(), MIN_HEALTH);
    }

    #[test]
    fn rate_limits_cool_down_for_the_retry_after_clamped_and_do_not_count_as_failures() {
        let h = key();
        let r = run(&h, Outcome::RateLimited { retry_after: Some(Duration::from_secs(2)) }, 1_000);
        assert!(r.cooled_down && r.circuit.is_none());
        assert!(!h.available(2_999) && h.available(3_000));
        assert!(h.acquire(2_500, 0, 1).is_none(), "no claim during the cooldown");
        assert_eq!((h.consecutive_failures(), h.success_rate()), (0, 1.0));
        // Without a Retry-After: the default. A huge one is clamped to the maximum.
        run(&h, Outcome::RateLimited { retry_after: None }, 5_000);
        assert!(!h.available(14_999) && h.available(15_000));
        run(&h, Outcome::RateLimited { retry_after: Some(Duration::from_secs(86_400)) }, 20_000);
        assert!(!h.available(79_999) && h.available(80_000));
        // Many 429s in a row never open the circuit.
        for t in 0..10 {
            run(&h, Outcome::RateLimited { retry_after: Some(Duration::ZERO) }, 100_000 + t);
        }
        assert_eq!(h.circuit(), Circuit::Closed);
    }

    #[test]
    fn retry_after_in_seconds_or_as_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT").unwrap().timestamp_millis();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5", now), Some(Duration::from_millis(1_500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO), "in the past");
        for bad in ["", "soon", "-5", "NaN", "Wed, 32 Oct 2015 07:28:30 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn consecutive_failures_open_the_circuit_then_one_probe_at_a_time() {
        let h = key();
        for t in 0..2 {
            assert_eq!(run(&h, Outcome::Failure, t).circuit, None);
        }
        // A success in between resets the run.
        run(&h, Outcome::Success { ttft: None }, 2);
        for t in 3..5 {
            run(&h, Outcome::Failure, t);
        }
        assert_eq!(h.circuit(), Circuit::Closed, "two in a row since the success");
        let r = run(&h, Outcome::Failure, 10);
        assert_eq!(r.circuit, Some(CircuitChange::Opened { for_ms: 1_000 }));
        assert_eq!(h.circuit(), Circuit::Open { until_ms: 1_010 });
        assert!(!h.available(1_009) && h.benched(1_009));
        assert!(h.acquire(1_009, 0, 1).is_none());

        // Due: exactly one request claims the probe; the others stay away until it reports.
        assert!(h.available(1_010));
        let probe = h.acquire(1_010, 0, 1).expect("the probe");
        assert!(probe.is_probe());
        assert_eq!(h.circuit(), Circuit::HalfOpen { since_ms: 1_010 });
        assert!(!h.available(1_011) && h.acquire(1_011, 0, 1).is_none());

        // A failed probe opens it again for twice as long, then up to the maximum.
        let r = probe.finish(Outcome::Failure, 1_020);
        assert_eq!(r.circuit, Some(CircuitChange::Reopened { for_ms: 2_000 }));
        assert_eq!(h.circuit(), Circuit::Open { until_ms: 3_020 });
        let r = h.acquire(3_020, 0, 1).unwrap().finish(Outcome::Failure, 3_020);
        assert_eq!(r.circuit, Some(CircuitChange::Reopened { for_ms: 3_000 }));
        let r = h.acquire(6_020, 0, 1).unwrap().finish(Outcome::Failure, 6_020);
        assert_eq!(r.circuit, Some(CircuitChange::Reopened { for_ms: 3_000 }), "capped");

        // A probe that proves nothing (the buyer left) lets the next request probe at once.
        let probe = h.acquire(9_020, 0, 1).unwrap();
        assert_eq!(probe.finish(Outcome::Neutral, 9_030).circuit, None);
        assert!(h.available(9_030));
        // So does one dropped without an outcome (released at the clock's now).
        drop(h.acquire(9_040, 0, 1).unwrap());
        let t = mono_ms().max(9_040);
        assert!(h.available(t));

        // A successful probe closes it, and the next opening starts from the base wait again.
        let r = h.acquire(t, 0, 1).unwrap().finish(Outcome::Success { ttft: None }, t + 10);
        assert_eq!(r.circuit, Some(CircuitChange::Closed));
        assert_eq!((h.circuit(), h.consecutive_failures()), (Circuit::Closed, 0));
        for i in 0..3 {
            run(&h, Outcome::Failure, t + 100 + i);
        }
        assert_eq!(h.circuit(), Circuit::Open { until_ms: t + 1_102 });
    }

    #[test]
    fn late_outcomes_of_other_requests_do_not_decide_the_circuit() {
        let h = key();
        let late_success = h.acquire(0, 0, 1).unwrap();
        let late_failure = h.acquire(0, 0, 1).unwrap();
        for t in 0..3 {
            run(&h, Outcome::Failure, t);
        }
        assert!(matches!(h.circuit(), Circuit::Open { .. }));
        // Requests that started before the circuit opened are not probes.
        assert_eq!(late_success.finish(Outcome::Success { ttft: None }, 5).circuit, None);
        assert!(matches!(h.circuit(), Circuit::Open { until_ms: 1_002 }));
        assert_eq!(late_failure.finish(Outcome::Failure, 6).circuit, None, "does not extend the opening");
        assert!(matches!(h.circuit(), Circuit::Open { until_ms: 1_002 }));
    }

    #[test]
    fn concurrency_slots_and_inflight_credits_are_claimed_and_released() {
        let h = key();
        let a = h.acquire(0, 2, 100).unwrap();
        let b = h.acquire(0, 2, 50).unwrap();
        assert!(h.acquire(0, 2, 1).is_none(), "the cap is reached");
        assert_eq!((h.inflight(), h.inflight_credits()), (2, 150));
        a.finish(Outcome::Success { ttft: None }, 1);
        assert_eq!((h.inflight(), h.inflight_credits()), (1, 50));
        drop(b);
        assert_eq!((h.inflight(), h.inflight_credits()), (0, 0));
        // A probe that cannot get a slot is released, not lost.
        let hog = h.acquire(0, 1, 1).unwrap();
        for t in 0..3 {
            run(&h, Outcome::Failure, t);
        }
        assert!(h.acquire(5_000, 1, 1).is_none(), "no slot");
        assert!(h.available(5_000), "the probe is still free to claim");
        drop(hog);
        assert!(h.acquire(5_000, 1, 1).unwrap().is_probe());
    }

    #[test]
    fn a_claim_records_one_outcome() {
        let h = key();
        let claim = h.acquire(0, 0, 5).unwrap();
        claim.finish(Outcome::Failure, 1);
        // `finish` consumed the claim: its drop released nothing twice and recorded nothing more.
        assert_eq!((h.consecutive_failures(), h.inflight(), h.inflight_credits()), (1, 0, 0));
        drop(h.acquire(2, 0, 5));
        assert_eq!((h.consecutive_failures(), h.inflight(), h.inflight_credits()), (1, 0, 0));
    }

    #[test]
    fn each_claim_marks_the_use_order() {
        let (a, b) = (key(), key());
        assert_eq!((a.last_used(), b.last_used()), (0, 0));
        drop(a.acquire(0, 0, 0));
        drop(b.acquire(0, 0, 0));
        assert!(a.last_used() < b.last_used());
        drop(a.acquire(0, 0, 0));
        assert!(a.last_used() > b.last_used());
    }

    #[test]
    fn the_registry_keeps_health_across_reloads_and_drops_keys_that_left() {
        let registry = HealthRegistry::with_policy((*policy()).clone());
        let mut attacher = registry.attacher();
        let one = attacher.attach(1);
        let two = attacher.attach(2);
        assert!(Arc::ptr_eq(&one, &attacher.attach(1)), "one entry per key within a load");
        attacher.commit();
        let claim = one.acquire(0, 0, 70).unwrap();
        assert_eq!(registry.inflight_credits(1), 70);
        assert_eq!(registry.inflight_credits(3), 0);
        one.add_charge(40);

        // Reload: key 1 stays (same state), key 2 left, key 3 is new.
        let marks = registry.spend_marks();
        one.add_charge(5); // charged while the database was read: still counted afterwards
        let mut attacher = registry.attacher();
        assert!(Arc::ptr_eq(&one, &attacher.attach(1)));
        let three = attacher.attach(3);
        attacher.commit();
        registry.settle_spend(marks);
        assert_eq!(one.charged(), 5);
        assert!(registry.get(2).is_none() && registry.get(3).is_some());
        assert!(!Arc::ptr_eq(&two, &three));
        drop(claim);
        assert_eq!(registry.inflight_credits(1), 0);
    }

    #[test]
    fn the_registry_counts_benched_keys() {
        let registry = HealthRegistry::with_policy((*policy()).clone());
        let mut attacher = registry.attacher();
        let (a, b, c) = (attacher.attach(1), attacher.attach(2), attacher.attach(3));
        attacher.commit();
        run(&a, Outcome::RateLimited { retry_after: Some(Duration::from_secs(1)) }, 0);
        for t in 0..3 {
            run(&b, Outcome::Failure, t);
        }
        assert_eq!(registry.benched(10), 2);
        assert_eq!(registry.benched(1_002), 0, "both are due again");
        let _ = c;
    }

    #[test]
    fn policy_from_config() {
        let p = HealthPolicy::from(&RoutingConfig::default());
        assert_eq!((p.ewma_weight, p.latency_reference_ms, p.circuit_failures), (0.2, 2_000.0, 5));
        assert_eq!((p.circuit_open_ms, p.circuit_max_open_ms), (30_000, 600_000));
    }
}
