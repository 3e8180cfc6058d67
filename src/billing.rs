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

use crate::db::ledger::{self, HoldSource};

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

    /// The most a request can cost: no tokenizer makes more tokens than the body has bytes, and the
    /// completion is bounded by the request's own limit or the model's.
    pub fn worst_case(&self, body_bytes: usize, max_tokens: Option<u64>, has_completion: bool) -> i64 {
        let completion = if has_completion { max_tokens.unwrap_or(self.max_output_tokens) } else { 0 };
        self.cost(body_bytes as u64, completion).max(1)
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
    acquiring: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct SlotState {
    hold: Option<Hold>,
    /// (snapshot `loaded_at_ms`, amount): in that snapshot the database said this source cannot give that
    /// amount. No new attempt for as much or more until a newer snapshot, so that a buyer without funds
    /// cannot make every request hit the database.
    empty: Option<(i64, i64)>,
}

struct Hold {
    hold_id: i64,
    account_id: i64,
    /// Held and not reserved by a request in flight nor spent (may go negative after an overrun).
    available: i64,
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
        if let Some(r) = self.take(&slot, candidate, worst) {
            return Ok(Some(r));
        }
        let _single = slot.acquiring.lock().await;
        // Someone else may have extended the hold while we waited.
        if let Some(r) = self.take(&slot, candidate, worst) {
            return Ok(Some(r));
        }
        let (hold, short) = {
            let state = lock(&slot.state);
            let short = worst - state.hold.as_ref().map_or(0, |h| h.available.max(0));
            if state.empty.is_some_and(|(at, amount)| at >= snapshot_at && short >= amount) {
                return Ok(None);
            }
            (state.hold.as_ref().map(|h| h.hold_id), short)
        };
        if candidate.snapshot_balance < short {
            // The snapshot says there is nothing to take; a grant or escrow reloads the snapshot.
            return Ok(None);
        }
        let want = worst.saturating_mul(i64::from(self.settings.block_factor)).max(short);
        let now = crate::now_ms();
        let db = self.db.clone();
        let source = candidate.source;
        let node = self.settings.node_id.clone();
        let result = self
            .runtime
            .spawn(async move {
                match hold {
                    Some(hold_id) => {
                        ledger::extend_hold(&db, hold_id, short, want, now).await.map(|added| (None, added))
                    }
                    None => ledger::open_hold(&db, source, &node, short, want, now).await.map(|h| (h, 0)),
                }
            })
            .await
            .map_err(|e| FundsError::Unavailable(e.to_string()))?
            .map_err(|e| FundsError::Unavailable(e.to_string()))?;
        {
            let mut state = lock(&slot.state);
            match result {
                (Some(opened), _) => {
                    state.hold = Some(Hold {
                        hold_id: opened.id,
                        account_id: opened.account_id,
                        available: opened.amount,
                        in_flight: 0,
                        last_used: Instant::now(),
                    });
                }
                (None, added) if added > 0 => {
                    if let Some(h) = state.hold.as_mut() {
                        h.available += added;
                    }
                }
                _ => {
                    state.empty = Some((snapshot_at, short));
                    return Ok(None);
                }
            }
        }
        Ok(self.take(&slot, candidate, worst))
    }

    /// Reserves from the hold in memory, if it has enough.
    fn take(&self, slot: &Arc<Slot>, candidate: &Candidate, worst: i64) -> Option<Reservation> {
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

    /// Takes the holds idle for longer than the idle time out of use and returns their ids: the caller
    /// closes them once the settlements queued before have been written.
    pub fn retire_idle(&self) -> Vec<i64> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        let mut retired = Vec::new();
        for slot in slots {
            let mut state = lock(&slot.state);
            let idle =
                state.hold.as_ref().is_some_and(|h| h.in_flight == 0 && h.last_used.elapsed() >= self.settings.idle);
            if idle {
                if let Some(hold) = state.hold.take() {
                    retired.push(hold.hold_id);
                }
            }
        }
        // Forget sources with nothing held, so the map does not grow with every buyer ever seen.
        lock(&self.slots).retain(|_, slot| {
            let state = lock(&slot.state);
            state.hold.is_some() || Arc::strong_count(slot) > 1
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

    /// Takes every hold out of use (shutdown): the caller closes them after the last settlements.
    pub fn retire_all(&self) -> Vec<i64> {
        lock(&self.slots).values().filter_map(|slot| lock(&slot.state).hold.take().map(|h| h.hold_id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn worst_case_uses_the_request_limit_or_the_model_cap() {
        let p = price(1_000_000, 1_000_000);
        assert_eq!(p.worst_case(10, Some(5), true), 15);
        assert_eq!(p.worst_case(10, None, true), 110);
        assert_eq!(p.worst_case(10, Some(5), false), 10);
        assert_eq!(price(0, 0).worst_case(10, None, true), 1);
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
        let retired = funds.retire_idle();
        funds.open_holds();
        if !retired.is_empty() && !sink.close_holds(retired) {
            tracing::warn!("the usage queue is full; idle holds stay open until the stale-hold recovery");
        }
        let now = crate::now_ms();
        if last_renew.elapsed() >= renew_every {
            last_renew = Instant::now();
            if let Err(e) = ledger::renew_holds(&db, &funds.open_holds(), now).await {
                tracing::warn!(error = %e, "renewing holds failed");
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
        let candidate = funded(&t, 100).await;
        let funds = funds(&t, 2);
        let a = funds.reserve(std::slice::from_ref(&candidate), 30, 1).await.unwrap();
        // One hold of 2 × 30 was opened; the second request comes from memory.
        let b = funds.reserve(std::slice::from_ref(&candidate), 30, 1).await.unwrap();
        assert_eq!(a.hold_id, b.hold_id);
        assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 40);
        let charge = a.finish(10, Some(3));
        assert_eq!(charge.cost, 10);
        // 20 came back to the hold: a request of 50 extends it by what the wallet has left (40, of up to 100).
        let c = funds.reserve(std::slice::from_ref(&candidate), 50, 1).await.unwrap();
        assert_eq!(c.hold_id, b.hold_id);
        assert_eq!(ledger::wallet_balance(&t.db, 7).await.unwrap(), 0);
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
        assert!(ledger::check(&t.db, 3, 1_000).await.unwrap().is_empty());
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
    async fn a_smaller_request_is_not_refused_because_a_larger_one_was() {
        let t = TestDb::sqlite().await;
        let candidate = funded(&t, 50).await;
        let funds = funds(&t, 1);
        assert!(funds.reserve(std::slice::from_ref(&candidate), 80, 1).await.is_err());
        assert!(funds.reserve(std::slice::from_ref(&candidate), 40, 1).await.is_ok());
    }
}
