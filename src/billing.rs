//! Paying for requests on the gateway (docs/ledger.md): prices, who can pay, and the node's holds.
//!
//! A request reserves its worst-case cost in memory from a hold this node keeps on one of the buyer's
//! sources (an escrow or the wallet). Only this node spends from its holds, so the in-memory figure is
//! exact and never lets a buyer overdraw; the database is touched only to open or extend a hold (once per
//! block of requests) and, off the request path, to settle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;

use crate::db::ledger::{self, HoldSource, LedgerError};

/// Prompt tokens reserved per image or audio part (a high-detail image costs up to about 2,500).
pub const MEDIA_PART_TOKENS: u64 = 3_000;

/// How long a source's "cannot pay" marker is kept without a hold (longer than a snapshot refresh).
const EMPTY_MARKER_MS: i64 = 60_000;

/// A model's price.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    pub prompt_per_million: u64,
    pub completion_per_million: u64,
    /// Completion tokens assumed for the hold when the request sets no limit.
    pub max_output_tokens: u64,
}

impl Price {
    /// ⌈(prompt × prompt rate + completion × completion rate) / 10⁶⌉ credits.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> i64 {
        let micro = (u128::from(prompt_tokens) * u128::from(self.prompt_per_million))
            .saturating_add(u128::from(completion_tokens) * u128::from(self.completion_per_million));
        i64::try_from(micro.div_ceil(1_000_000)).unwrap_or(i64::MAX)
    }

    /// The most a request can cost, reserved before it is proxied. No tokenizer makes more tokens than the
    /// text has bytes, except for media parts, counted at `MEDIA_PART_TOKENS` each; the completion is
    /// bounded by the request's limit (0 counts as none: some providers read it as "no limit") or the
    /// model's, once per choice. The charge never exceeds this reservation.
    pub fn worst_case(&self, request: &crate::openai::request::InspectedRequest, has_completion: bool) -> i64 {
        let prompt = (request.body.len() as u64).saturating_add(request.media_parts.saturating_mul(MEDIA_PART_TOKENS));
        let completion = if has_completion {
            let limit = request.max_tokens.filter(|&n| n > 0).unwrap_or(self.max_output_tokens);
            limit.saturating_mul(request.choices.max(1))
        } else {
            0
        };
        self.cost(prompt, completion).max(1)
    }
}

/// One escrow in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscrowFunds {
    pub escrow_id: i64,
    pub account_id: i64,
    /// Balance when the snapshot was loaded (what a new hold could take).
    pub balance: i64,
    pub model: Option<String>,
    pub hosted_key_id: Option<i64>,
    pub expires_at_ms: i64,
}

/// What a buyer can pay from, as of the snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuyerFunds {
    /// (account, balance) of the wallet, if the buyer has one.
    pub wallet: Option<(i64, i64)>,
    pub wallet_pays: bool,
    /// Active escrows, soonest expiry first.
    pub escrows: Vec<EscrowFunds>,
}

/// A source a request may be paid from, in the order they are tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub source: HoldSource,
    pub snapshot_balance: i64,
    /// Paid from an escrow pinned to this key: only this key may serve the request.
    pub pinned_key: Option<i64>,
}

impl BuyerFunds {
    /// The sources that may pay for `model`, best first: escrows pinned to a key that serves the model
    /// (`serves`), then escrows for this model, then any-model escrows, then the wallet if allowed.
    pub fn candidates(&self, buyer_id: i64, model: &str, now_ms: i64, serves: impl Fn(i64) -> bool) -> Vec<Candidate> {
        let mut out = Vec::new();
        let usable = |e: &&EscrowFunds| e.expires_at_ms > now_ms && e.model.as_deref().is_none_or(|m| m == model);
        let escrow = |e: &EscrowFunds, pinned: Option<i64>| Candidate {
            source: HoldSource { buyer_id, account_id: e.account_id, escrow_id: Some(e.escrow_id) },
            snapshot_balance: e.balance,
            pinned_key: pinned,
        };
        for e in self.escrows.iter().filter(usable) {
            if let Some(key) = e.hosted_key_id.filter(|k| serves(*k)) {
                out.push(escrow(e, Some(key)));
            }
        }
        for e in self.escrows.iter().filter(usable).filter(|e| e.hosted_key_id.is_none() && e.model.is_some()) {
            out.push(escrow(e, None));
        }
        for e in self.escrows.iter().filter(usable).filter(|e| e.hosted_key_id.is_none() && e.model.is_none()) {
            out.push(escrow(e, None));
        }
        if let Some((account_id, balance)) = self.wallet.filter(|_| self.wallet_pays) {
            out.push(Candidate {
                source: HoldSource { buyer_id, account_id, escrow_id: None },
                snapshot_balance: balance,
                pinned_key: None,
            });
        }
        out
    }
}

#[derive(Clone, Debug)]
pub struct FundsSettings {
    pub node_id: String,
    pub block_factor: u32,
    pub idle: Duration,
}

/// This node's holds, one per source at most.
pub struct Funds {
    db: DatabaseConnection,
    /// Database work runs on the application runtime, not on the gateway's threads.
    runtime: tokio::runtime::Handle,
    settings: FundsSettings,
    slots: Mutex<HashMap<i64, Arc<Slot>>>,
}

/// One source's state on this node.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// One database call per source at a time; the others wait and then use its result.
    acquiring: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct SlotState {
    hold: Option<Hold>,
    /// (snapshot `loaded_at_ms`, amount): in that snapshot the database said this source cannot give that
    /// amount. No new attempt for as much or more until a newer snapshot, so that a buyer without funds
    /// cannot make every request hit the database.
    empty: Option<(i64, i64)>,
    /// How many times the configured block this source's next block is, as a power of two (see
    /// [`SlotState::block_factor`]).
    growth: u32,
    /// When a block was last taken from the source for this slot.
    last_fill: Option<Instant>,
    /// A background top-up of the hold is under way (see [`Funds::reserve`]).
    refilling: bool,
}

/// A block used up sooner than this after the previous one makes the next block twice as large...
/// (Ten seconds: with a one-second window a buyer at a few requests a second, which costs far less than
/// their worst case, extended its hold every few seconds at every node, and a thousand such buyers made
/// the hold extensions ten times as many database statements as their settlements: bench, issue 6.)
const REFILL_SOON: Duration = Duration::from_secs(10);
/// ...up to this power of two times the configured block (a busy buyer then reaches the database every
/// few seconds at most, instead of once per `hold_block_factor` requests).
const MAX_GROWTH: u32 = 6;

impl SlotState {
    /// The block factor for the fill starting at `now`: the configured one, doubled for every fill that
    /// followed the previous one within [`REFILL_SOON`], halved again for every one that did not.
    fn block_factor(&mut self, configured: u32, now: Instant) -> i64 {
        match self.last_fill {
            Some(at) if now.saturating_duration_since(at) < REFILL_SOON => {
                self.growth = (self.growth + 1).min(MAX_GROWTH);
            }
            Some(_) => self.growth = self.growth.saturating_sub(1),
            None => {}
        }
        self.last_fill = Some(now);
        i64::from(configured) << self.growth
    }
}

struct Hold {
    hold_id: i64,
    account_id: i64,
    /// Held and not reserved by a request in flight nor spent (may go negative after an overrun).
    available: i64,
    /// The size of the last block taken into the hold: below half of it, the hold is topped up.
    block: i64,
    in_flight: u32,
    last_used: Instant,
}

/// Credits reserved for one request. Give it back with [`Reservation::finish`]; dropping it unfinished
/// (a panic, a cancelled request) releases the whole amount unspent.
pub struct Reservation {
    slot: Arc<Slot>,
    pub source: HoldSource,
    pub hold_id: i64,
    pub hold_account_id: i64,
    pub amount: i64,
    pub pinned_key: Option<i64>,
    done: bool,
}

/// What a finished request owes, for the settlement writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    pub hold_id: i64,
    pub hold_account_id: i64,
    pub source_account_id: i64,
    pub cost: i64,
    /// The seller to pay; None when a platform key served it (or nothing was served).
    pub seller_id: Option<i64>,
    /// Metered cost beyond the reservation: recorded as unpaid, never charged.
    pub excess: i64,
}

impl Charge {
    pub fn with_excess(mut self, excess: i64) -> Self {
        self.excess = excess.max(0);
        self
    }
}

impl Reservation {
    /// Returns the reservation with `cost` spent.
    pub fn finish(mut self, cost: i64, seller_id: Option<i64>) -> Charge {
        self.release(cost);
        Charge {
            hold_id: self.hold_id,
            hold_account_id: self.hold_account_id,
            source_account_id: self.source.account_id,
            cost,
            seller_id,
            excess: 0,
        }
    }

    fn release(&mut self, spent: i64) {
        if self.done {
            return;
        }
        self.done = true;
        let mut state = lock(&self.slot.state);
        if let Some(hold) = state.hold.as_mut().filter(|h| h.hold_id == self.hold_id) {
            hold.available += self.amount - spent;
            hold.in_flight = hold.in_flight.saturating_sub(1);
            hold.last_used = Instant::now();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release(0);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, thiserror::Error)]
pub enum FundsError {
    #[error("insufficient funds")]
    Insufficient,
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
}

impl Funds {
    pub fn new(db: DatabaseConnection, runtime: tokio::runtime::Handle, settings: FundsSettings) -> Arc<Self> {
        Arc::new(Self { db, runtime, settings, slots: Mutex::new(HashMap::new()) })
    }

    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    fn slot(&self, account_id: i64) -> Arc<Slot> {
        lock(&self.slots).entry(account_id).or_default().clone()
    }

    /// Reserves `worst` credits from the first candidate that can pay. `snapshot_at` is the snapshot's
    /// load time (see `SlotState::empty`).
    pub async fn reserve(
        &self,
        candidates: &[Candidate],
        worst: i64,
        snapshot_at: i64,
    ) -> Result<Reservation, FundsError> {
        let mut last_error = None;
        for candidate in candidates {
            match self.reserve_from(candidate, worst, snapshot_at).await {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(FundsError::Insufficient))
    }

    async fn reserve_from(
        &self,
        candidate: &Candidate,
        worst: i64,
        snapshot_at: i64,
    ) -> Result<Option<Reservation>, FundsError> {
        let slot = self.slot(candidate.source.account_id);
        // The database work runs as its own task on the application runtime and applies its result to the
        // slot itself: a request cancelled meanwhile cannot leave a hold open that memory does not know.
        let job = |slot| Acquire {
            db: self.db.clone(),
            node_id: self.settings.node_id.clone(),
            block_factor: self.settings.block_factor,
            slot,
            candidate: candidate.clone(),
            worst,
            snapshot_at,
        };
        if let Some(r) = take(&slot, candidate, worst) {
            // A hold running low is topped up before it runs out, off the request path: the requests after
            // this one then find their credits in memory instead of waiting for the database (where a
            // settlement batch may hold the same rows).
            if claim_refill(&slot) {
                drop(self.runtime.spawn(job(slot).refill()));
            }
            return Ok(Some(r));
        }
        self.runtime.spawn(job(slot).run()).await.map_err(|e| FundsError::Unavailable(e.to_string()))?
    }
}

/// Reserves from the hold in memory, if it has enough.
fn take(slot: &Arc<Slot>, candidate: &Candidate, worst: i64) -> Option<Reservation> {
    let mut state = lock(&slot.state);
    let hold = state.hold.as_mut().filter(|h| h.available >= worst)?;
    hold.available -= worst;
    hold.in_flight += 1;
    hold.last_used = Instant::now();
    Some(Reservation {
        slot: slot.clone(),
        source: candidate.source,
        hold_id: hold.hold_id,
        hold_account_id: hold.account_id,
        amount: worst,
        pinned_key: candidate.pinned_key,
        done: false,
    })
}

/// Whether the slot's hold is below half of its last block with no top-up under way; if so, the caller
/// runs one ([`Acquire::refill`]).
fn claim_refill(slot: &Slot) -> bool {
    let mut state = lock(&slot.state);
    let low = state.hold.as_ref().is_some_and(|h| h.available < h.block / 2);
    if !low || state.refilling || state.empty.is_some() {
        return false;
    }
    state.refilling = true;
    true
}

/// Opening or extending a source's hold in the database for one request, then reserving from it.
struct Acquire {
    db: DatabaseConnection,
    node_id: String,
    block_factor: u32,
    slot: Arc<Slot>,
    candidate: Candidate,
    worst: i64,
    snapshot_at: i64,
}

impl Acquire {
    async fn run(self) -> Result<Option<Reservation>, FundsError> {
        let _single = self.slot.acquiring.clone().lock_owned().await;
        // Someone else may have extended the hold while we waited.
        if let Some(r) = take(&self.slot, &self.candidate, self.worst) {
            return Ok(Some(r));
        }
        let (hold, short, factor) = {
            let mut state = lock(&self.slot.state);
            let short = self.worst - state.hold.as_ref().map_or(0, |h| h.available.max(0));
            if state.empty.is_some_and(|(at, amount)| at >= self.snapshot_at && short >= amount) {
                return Ok(None);
            }
            let factor = state.block_factor(self.block_factor, Instant::now());
            (state.hold.as_ref().map(|h| h.hold_id), short, factor)
        };
        // A block for the next requests too, but at most half of what the snapshot saw in the source, so that
        // other nodes serving this buyer find credits left.
        let want = self.worst.saturating_mul(factor).min(self.candidate.snapshot_balance / 2).max(short);
        let unavailable = |e: LedgerError| FundsError::Unavailable(e.to_string());
        let now = crate::now_ms();
        if let Some(hold_id) = hold {
            let added = ledger::extend_hold(&self.db, hold_id, short, want, now).await.map_err(unavailable)?;
            if added > 0 {
                if let Some(h) = lock(&self.slot.state).hold.as_mut().filter(|h| h.hold_id == hold_id) {
                    h.available += added;
                    h.block = added;
                }
                return Ok(take(&self.slot, &self.candidate, self.worst));
            }
            // Nothing added: the source is short, or the hold was closed under us (its node was taken for
            // dead after a database outage). A closed hold leaves memory; a fresh one is opened below.
            let open = ledger::find_hold(&self.db, hold_id).await?.is_some_and(|h| h.status == ledger::HOLD_OPEN);
            if open {
                lock(&self.slot.state).empty = Some((self.snapshot_at, short));
                return Ok(None);
            }
            tracing::warn!(hold_id, "a hold of this node was closed by another node; opening a new one");
            let mut state = lock(&self.slot.state);
            if state.hold.as_ref().is_some_and(|h| h.hold_id == hold_id) {
                state.hold = None;
            }
        }
        let want = want.max(self.worst);
        match ledger::open_hold(&self.db, self.candidate.source, &self.node_id, self.worst, want, now)
            .await
            .map_err(unavailable)?
        {
            Some(opened) => {
                lock(&self.slot.state).hold = Some(Hold {
                    hold_id: opened.id,
                    account_id: opened.account_id,
                    available: opened.amount,
                    block: opened.amount,
                    in_flight: 0,
                    last_used: Instant::now(),
                });
                Ok(take(&self.slot, &self.candidate, self.worst))
            }
            None => {
                lock(&self.slot.state).empty = Some((self.snapshot_at, self.worst));
                Ok(None)
            }
        }
    }
}

impl Acquire {
    /// Tops the hold up by a block in the background (see [`claim_refill`]). Nothing happens when another
    /// fill is under way or the hold is no longer low; a source that cannot give anything is left to the
    /// next request that does not fit, which finds out on the request path as before.
    async fn refill(self) {
        let added = match self.slot.acquiring.clone().try_lock_owned() {
            Ok(_single) => self.top_up().await,
            Err(_) => Ok(None),
        };
        let mut state = lock(&self.slot.state);
        state.refilling = false;
        match added {
            Ok(Some((hold_id, added))) => {
                if let Some(h) = state.hold.as_mut().filter(|h| h.hold_id == hold_id) {
                    h.available += added;
                    h.block = added;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "topping up a hold failed; requests will extend it themselves"),
        }
    }

    /// The (hold, credits) added, if any. Runs with the slot's `acquiring` lock held.
    async fn top_up(&self) -> Result<Option<(i64, i64)>, LedgerError> {
        let (hold_id, factor) = {
            let mut state = lock(&self.slot.state);
            let Some(hold_id) = state.hold.as_ref().filter(|h| h.available < h.block / 2).map(|h| h.hold_id) else {
                return Ok(None);
            };
            (hold_id, state.block_factor(self.block_factor, Instant::now()))
        };
        let want = self.worst.saturating_mul(factor).min(self.candidate.snapshot_balance / 2).max(1);
        let added = ledger::extend_hold(&self.db, hold_id, 1, want, crate::now_ms()).await?;
        Ok((added > 0).then_some((hold_id, added)))
    }
}

impl From<sea_orm::DbErr> for FundsError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Unavailable(e.to_string())
    }
}

impl Funds {
    /// Takes the holds idle for longer than the idle time out of use and returns their ids: the caller
    /// closes them once the settlements queued before have been written.
    pub fn retire_idle(&self) -> Vec<i64> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        let mut retired = Vec::new();
        for slot in slots {
            // A hold being extended or opened right now is in use.
            let Ok(_busy) = slot.acquiring.try_lock() else { continue };
            let mut state = lock(&slot.state);
            let idle =
                state.hold.as_ref().is_some_and(|h| h.in_flight == 0 && h.last_used.elapsed() >= self.settings.idle);
            if idle {
                if let Some(hold) = state.hold.take() {
                    retired.push(hold.hold_id);
                    // Its rest goes back to the source: worth asking the database again.
                    state.empty = None;
                }
            }
        }
        // Forget sources with nothing held once their "cannot pay" marker is old, so that the map does not
        // grow with every buyer ever seen, yet a buyer without funds cannot reach the database per request.
        let forget_before = crate::now_ms() - EMPTY_MARKER_MS;
        lock(&self.slots).retain(|_, slot| {
            let state = lock(&slot.state);
            state.hold.is_some()
                || Arc::strong_count(slot) > 1
                || state.empty.is_some_and(|(at, _)| at >= forget_before)
        });
        retired
    }

    /// Every hold this node has open (to renew them).
    pub fn open_holds(&self) -> Vec<i64> {
        let open: Vec<i64> =
            lock(&self.slots).values().filter_map(|slot| lock(&slot.state).hold.as_ref().map(|h| h.hold_id)).collect();
        crate::metrics::METRICS.holds_open.set(open.len() as i64);
        open
    }

    /// Forgets holds that the database says are closed (another node took this one for dead after a
    /// database outage): requests must not keep spending from them.
    pub fn evict(&self, closed: &[i64]) {
        if closed.is_empty() {
            return;
        }
        for slot in lock(&self.slots).values() {
            let mut state = lock(&slot.state);
            if state.hold.as_ref().is_some_and(|h| closed.contains(&h.hold_id)) {
                tracing::warn!("a hold of this node was closed by another node; it is no longer used");
                state.hold = None;
                state.empty = None;
            }
        }
    }

    /// Takes every hold out of use (shutdown): the caller closes them after the last settlements.
    pub fn retire_all(&self) -> Vec<i64> {
        lock(&self.slots).values().filter_map(|slot| lock(&slot.state).hold.take().map(|h| h.hold_id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::InspectedRequest;

    fn price(p: u64, c: u64) -> Price {
        Price { prompt_per_million: p, completion_per_million: c, max_output_tokens: 100 }
    }

    #[test]
    fn cost_rounds_up_to_the_credit() {
        assert_eq!(price(1_000_000, 2_000_000).cost(3, 4), 11);
        assert_eq!(price(1, 1).cost(1, 0), 1);
        assert_eq!(price(1, 1).cost(0, 0), 0);
        assert_eq!(price(500_000, 0).cost(3, 0), 2);
        assert_eq!(price(u64::MAX, u64::MAX).cost(u64::MAX, u64::MAX), i64::MAX);
    }

    fn request(body: &str, max_tokens: Option<u64>, choices: u64, media_parts: u64) -> InspectedRequest {
        InspectedRequest {
            model: "m".into(),
            stream: false,
            client_wants_usage: false,
            max_tokens,
            choices,
            media_parts,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn worst_case_uses_the_request_limit_or_the_model_cap() {
        let p = price(1_000_000, 1_000_000);
        let body = "0123456789";
        assert_eq!(p.worst_case(&request(body, Some(5), 1, 0), true), 15);
        assert_eq!(p.worst_case(&request(body, None, 1, 0), true), 110);
        // 0 is no limit for some providers.
        assert_eq!(p.worst_case(&request(body, Some(0), 1, 0), true), 110);
        assert_eq!(p.worst_case(&request(body, Some(5), 3, 0), true), 25);
        assert_eq!(p.worst_case(&request(body, Some(5), 1, 2), true), 15 + 2 * MEDIA_PART_TOKENS as i64);
        assert_eq!(p.worst_case(&request(body, Some(5), 1, 0), false), 10);
        assert_eq!(price(0, 0).worst_case(&request(body, None, 1, 0), true), 1);
    }

    #[test]
    fn candidates_come_pinned_then_model_then_any_then_wallet() {
        let e = |id: i64, model: Option<&str>, key: Option<i64>, expires: i64| EscrowFunds {
            escrow_id: id,
            account_id: 100 + id,
            balance: 10,
            model: model.map(String::from),
            hosted_key_id: key,
            expires_at_ms: expires,
        };
        let funds = BuyerFunds {
            wallet: Some((1, 50)),
            wallet_pays: true,
            escrows: vec![
                e(1, None, None, 1_000),
                e(2, Some("m"), None, 1_000),
                e(3, Some("other"), None, 1_000),
                e(4, None, Some(7), 1_000),
                e(5, None, Some(8), 1_000),
                e(6, None, None, 10),
            ],
        };
        let order: Vec<(i64, Option<i64>)> =
            funds.candidates(9, "m", 100, |k| k == 7).iter().map(|c| (c.source.account_id, c.pinned_key)).collect();
        assert_eq!(order, vec![(104, Some(7)), (102, None), (101, None), (1, None)]);
        let no_wallet = BuyerFunds { wallet_pays: false, ..funds };
        assert!(no_wallet.candidates(9, "x", 100, |_| false).iter().all(|c| c.source.escrow_id.is_some()));
    }
}

/// The node's ledger housekeeping: retires idle holds (closed by the writer after their settlements),
/// renews the open ones, expires escrows and recovers holds of dead nodes.
pub async fn maintenance(
    db: DatabaseConnection,
    funds: Arc<Funds>,
    sink: crate::usage::UsageSink,
    refresh: crate::pool::RefreshHandle,
    config: crate::config::LedgerConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let tick = Duration::from_millis((config.hold_idle_ms / 4).clamp(50, 1_000));
    let renew_every = Duration::from_millis(config.hold_renew_ms);
    let sweep_every = Duration::from_millis(config.maintenance_interval_ms);
    let (mut last_renew, mut last_sweep) = (Instant::now(), None::<Instant>);
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
        // A queue slot first: a hold taken out of memory must be closed, or it stays locked until recovery.
        if let Some(permit) = sink.reserve_close() {
            let retired = funds.retire_idle();
            if !retired.is_empty() {
                permit.close_holds(retired);
            }
        }
        funds.open_holds();
        let now = crate::now_ms();
        if last_renew.elapsed() >= renew_every {
            last_renew = Instant::now();
            match ledger::renew_holds(&db, &funds.open_holds(), now).await {
                Ok(closed) => funds.evict(&closed),
                Err(e) => tracing::warn!(error = %e, "renewing holds failed"),
            }
        }
        if last_sweep.is_none_or(|at| at.elapsed() >= sweep_every) {
            last_sweep = Some(Instant::now());
            sweep(&db, &funds, &refresh, &config, now).await;
        }
    }
}

async fn sweep(
    db: &DatabaseConnection,
    funds: &Funds,
    refresh: &crate::pool::RefreshHandle,
    config: &crate::config::LedgerConfig,
    now: i64,
) {
    match ledger::expire_escrows(db, now).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(escrows = n, "escrows expired");
            refresh.request();
        }
        Err(e) => tracing::warn!(error = %e, "expiring escrows failed"),
    }
    let stale_before = now - i64::try_from(config.hold_stale_ms).unwrap_or(i64::MAX);
    let ours = funds.open_holds();
    match ledger::stale_holds(db, stale_before).await {
        Ok(stale) => {
            for hold in stale.into_iter().filter(|h| !ours.contains(&h.id)) {
                match ledger::close_hold(db, hold.id, now).await {
                    Ok(returned) => {
                        tracing::warn!(hold_id = hold.id, node = %hold.node_id, returned, "closed a stale hold")
                    }
                    Err(e) => tracing::warn!(hold_id = hold.id, error = %e, "closing a stale hold failed"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "looking for stale holds failed"),
    }
}

#[cfg(test)]
mod db_tests {
    use super::*;
    use crate::db::testing::TestDb;

    async fn funded(t: &TestDb, credits: i64) -> Candidate {
        ledger::grant(&t.db, 7, credits, None, "g", None, 1).await.unwrap();
        let account_id = ledger::wallet_account(&t.db, 7, 1).await.unwrap();
        Candidate {
            source: HoldSource { buyer_id: 7, account_id, escrow_id: None },
            snapshot_balance: credits,
            pinned_key: None,
        }
    }

    fn funds(t: &TestDb, factor: u32) -> Arc<Funds> {
        let settings = FundsSettings { node_id: "n1".into(), block_factor: factor, idle: Duration::ZERO };
        Funds::new(t.db.clone(), tokio::runtime::Handle::current(), settings)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_reserve_from_one_hold_and_extend_it() {
        let t = TestDb::sqlite().await;
        // A snapshot that saw plenty: the blocks are sized by the factor alone.
        let candidate = Candidate { snapshot_balance: i64::MAX, ..funded(&t, 100).await };
        let funds = funds(&t, 2);
        let a = funds.reserve(std::slice::from_ref(&candidate), 30, 1).await.unwrap();
        assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 40);
        // One hold of 2 × 30 was opened; the second request comes from memory and leaves it empty, so the
        // hold is topped up in the background with what the wallet has left (40, of the 4 × 30 wanted).
        let b = funds.reserve(std::slice::from_ref(&candidate), 30, 1).await.unwrap();
        assert_eq!(a.hold_id, b.hold_id);
        no_refill_under_way(&funds).await;
        assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 0);
        let charge = a.finish(10, Some(3));
        assert_eq!(charge.cost, 10);
        // 20 came back to the hold: a request of 50 fits in memory.
        let c = funds.reserve(std::slice::from_ref(&candidate), 50, 1).await.unwrap();
        assert_eq!(c.hold_id, b.hold_id);
        let d = funds.reserve(std::slice::from_ref(&candidate), 10, 1).await.unwrap();
        // Nothing left anywhere.
        assert!(matches!(funds.reserve(std::slice::from_ref(&candidate), 1, 1).await, Err(FundsError::Insufficient)));
        drop((b, c, d));
        // The settlement of `a` is written before the hold closes (the writer's queue order).
        let revenue = ledger::revenue_account(&t.db, 2).await.unwrap();
        let seller = ledger::wallet_account(&t.db, 3, 2).await.unwrap();
        let txn = ledger::begin(&t.db).await.unwrap();
        let settlement = ledger::Settlement {
            request_id: "r1".into(),
            hold_id: charge.hold_id,
            hold_account_id: charge.hold_account_id,
            source_account_id: charge.source_account_id,
            cost: charge.cost,
            seller_account_id: Some(seller),
            revenue_account_id: revenue,
            fee_bps: 500,
        };
        let settled = ledger::settle(&txn, &settlement, 2).await.unwrap();
        txn.commit().await.unwrap();
        assert_eq!((settled.paid, settled.seller, settled.platform), (10, 9, 1));
        let retired = funds.retire_idle();
        assert_eq!(retired.len(), 1);
        assert_eq!(ledger::close_hold(&t.db, retired[0], 2).await.unwrap(), 90);
        assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 90);
        // The request has no usage record here (the usage writer writes it with the settlement).
        let violations = ledger::check(&t.db, 3, 1_000).await.unwrap();
        assert!(violations.iter().all(|v| v.rule == "usage_settled"), "{violations:?}");
    }

    #[tokio::test]
    async fn a_busy_source_gets_larger_blocks() {
        let t = TestDb::sqlite().await;
        let candidate = Candidate { snapshot_balance: i64::MAX, ..funded(&t, 1_000_000).await };
        let funds = funds(&t, 2);
        let mut taken = Vec::new();
        let mut before = 1_000_000;
        // Each request spends its whole reservation; a hold below half of its last block is topped up.
        for _ in 0..30 {
            funds.reserve(std::slice::from_ref(&candidate), 10, 1).await.unwrap().finish(10, None);
            no_refill_under_way(&funds).await;
            let now = ledger::wallet_balance(&t.db, 7).await.unwrap();
            if now != before {
                taken.push(before - now);
                before = now;
            }
        }
        // Blocks refilled within ten seconds of each other double, from the configured 2 × 10; all but the
        // first were taken in the background, before the hold ran out.
        assert_eq!(taken, [20, 40, 80, 160, 320], "{taken:?}");
        let hold = lock(&funds.slot(candidate.source.account_id).state).hold.as_ref().map(|h| h.available);
        assert_eq!(hold, Some(620 - 300));
    }

    /// Waits until no background top-up is under way.
    async fn no_refill_under_way(funds: &Funds) {
        for _ in 0..500 {
            let slots: Vec<Arc<Slot>> = lock(&funds.slots).values().cloned().collect();
            if slots.iter().all(|slot| !lock(&slot.state).refilling) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("a top-up never finished");
    }

    #[test]
    fn blocks_grow_while_refills_come_fast_and_shrink_when_they_do_not() {
        let mut state = SlotState::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(state.block_factor(20, at(0)), 20);
        assert_eq!(state.block_factor(20, at(100)), 40);
        assert_eq!(state.block_factor(20, at(200)), 80);
        for i in 0..10 {
            state.block_factor(20, at(300 + i));
        }
        assert_eq!(state.block_factor(20, at(400)), 20 << MAX_GROWTH, "capped");
        assert_eq!(state.block_factor(20, at(9_000)), 20 << MAX_GROWTH, "within ten seconds");
        assert_eq!(state.block_factor(20, at(20_000)), 20 << (MAX_GROWTH - 1), "a slow refill halves it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_never_reserve_more_than_the_balance() {
        for t in TestDb::all().await {
            let candidate = funded(&t, 350).await;
            let funds = funds(&t, 20);
            let mut tasks = Vec::new();
            for _ in 0..50 {
                let (funds, candidate) = (funds.clone(), candidate.clone());
                tasks.push(tokio::spawn(async move { funds.reserve(&[candidate], 100, 1).await.ok() }));
            }
            let mut granted = Vec::new();
            for task in tasks {
                granted.extend(task.await.unwrap());
            }
            assert_eq!(granted.len(), 3, "{}", t.label);
            assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 0);
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn a_hold_leaves_half_of_the_source_to_other_nodes() {
        let t = TestDb::sqlite().await;
        let candidate = funded(&t, 1_000).await;
        let node_a = funds(&t, 100);
        let node_b = Funds::new(
            t.db.clone(),
            tokio::runtime::Handle::current(),
            FundsSettings { node_id: "n2".into(), block_factor: 100, idle: Duration::ZERO },
        );
        let _a = node_a.reserve(std::slice::from_ref(&candidate), 10, 1).await.unwrap();
        assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 500);
        // Node B's snapshot (loaded after A's hold) sees 500 and takes half of that.
        let seen_by_b = Candidate { snapshot_balance: 500, ..candidate };
        let _b = node_b.reserve(std::slice::from_ref(&seen_by_b), 10, 2).await.unwrap();
        assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 250);
    }

    #[tokio::test]
    async fn a_smaller_request_is_not_refused_because_a_larger_one_was() {
        let t = TestDb::sqlite().await;
        let candidate = funded(&t, 50).await;
        let funds = funds(&t, 1);
        assert!(funds.reserve(std::slice::from_ref(&candidate), 80, 1).await.is_err());
        assert!(funds.reserve(std::slice::from_ref(&candidate), 40, 1).await.is_ok());
    }
}
