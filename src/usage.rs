//! Usage records and their settlement: produced once per gateway request, written to the database in
//! batches by a background task, never on the request path. A record, the settlement of what the
//! request cost and its share of the hourly rollups (docs/reports.md) are written in one transaction,
//! idempotent by request id (docs/ledger.md).
//!
//! The queue is bounded. A request that can cost money takes a queue slot before it is proxied (a
//! [`UsagePermit`]), so its record can never be dropped for lack of room: when the database is down long
//! enough to fill the queue, new paid requests are refused instead of served unbilled.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ActiveValue::Set, DatabaseConnection};
use tokio::sync::{mpsc, watch};

use crate::billing::Charge;
use crate::db::hosted_keys::KeyOutcome;
use crate::db::ledger::{self, LedgerError, Settled, Settlement};
use crate::db::rollups::{self, Counters, RollupRecord, Rollups};
use crate::db::usage_records;
use crate::metrics::METRICS;

/// One finished gateway request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub request_id: String,
    pub buyer_id: i64,
    pub buyer_key_id: i64,
    /// The key that served the response (None when no key was reached).
    pub hosted_key_id: Option<i64>,
    pub model: String,
    pub endpoint: &'static str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Tokens were counted locally because the upstream reported no usage (or the stream was cut).
    pub estimated: bool,
    /// The status the buyer received.
    pub status_code: u16,
    pub attempts: u32,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub client_disconnected: bool,
    pub error_kind: Option<&'static str>,
    pub created_at_ms: i64,
    /// Every attempt's key and whether it succeeded, to keep the keys' success and failure counts.
    pub key_attempts: Vec<(i64, bool)>,
    /// What the request owes and where it is paid from (None: nothing was reserved).
    pub charge: Option<Charge>,
    /// Served by a platform fallback key (no seller key could serve it).
    pub fallback: bool,
}

/// What a writer is asked to do, in queue order.
#[derive(Debug)]
pub enum UsageItem {
    Record(Box<UsageRecord>),
    /// Close these holds: queued to every writer, after every settlement that draws from them.
    CloseHolds(Arc<HoldClosing>),
}

/// Holds to close once every writer has written what was queued before the closing: the last writer to
/// reach it closes them (a hold's settlements may sit in any writer's queue only through its buyer, but the
/// sender does not know the buyers of the holds it closes).
#[derive(Debug)]
pub struct HoldClosing {
    hold_ids: Vec<i64>,
    /// Writers that have not reached it yet.
    pending: AtomicUsize,
}

/// The producer side, cloned into every gateway thread: one queue per writer, records by buyer.
#[derive(Clone)]
pub struct UsageSink {
    queues: Arc<[mpsc::Sender<UsageItem>]>,
}

/// A reserved queue slot: the record sent with it is never dropped.
pub struct UsagePermit(mpsc::OwnedPermit<UsageItem>);

impl UsagePermit {
    pub fn send(self, record: UsageRecord) {
        // Counted before the send, so that the writer can never count it out first.
        METRICS.usage_queue_depth.inc();
        self.0.send(UsageItem::Record(Box::new(record)));
    }
}

/// A slot in every writer's queue, for a closing of holds.
pub struct ClosePermit(Vec<mpsc::OwnedPermit<UsageItem>>);

impl ClosePermit {
    /// Queues the closing of holds behind the settlements already queued.
    pub fn close_holds(self, hold_ids: Vec<i64>) {
        let closing = Arc::new(HoldClosing { hold_ids, pending: AtomicUsize::new(self.0.len()) });
        for permit in self.0 {
            permit.send(UsageItem::CloseHolds(closing.clone()));
        }
    }
}

impl UsageSink {
    /// The queue of a buyer's records: a buyer's settlements (and its holds' rows) are always written by
    /// the same writer, so that writers never wait for each other's locks on them.
    fn queue_of(&self, buyer_id: i64) -> &mpsc::Sender<UsageItem> {
        &self.queues[(buyer_id.unsigned_abs() % self.queues.len() as u64) as usize]
    }

    /// Never waits: a full queue drops the record and counts it. For records that cost nothing.
    pub fn submit(&self, record: UsageRecord) {
        METRICS.usage_queue_depth.inc();
        if let Err(e) = self.queue_of(record.buyer_id).try_send(UsageItem::Record(Box::new(record))) {
            METRICS.usage_queue_depth.dec();
            METRICS.usage_records_dropped.inc();
            if let mpsc::error::TrySendError::Full(UsageItem::Record(r))
            | mpsc::error::TrySendError::Closed(UsageItem::Record(r)) = e
            {
                tracing::error!(request_id = %r.request_id, "usage queue full or closed; record dropped");
            }
        }
    }

    /// A queue slot for a request of this buyer that may cost money, or None when the queue is full.
    pub fn reserve(&self, buyer_id: i64) -> Option<UsagePermit> {
        self.queue_of(buyer_id).clone().try_reserve_owned().ok().map(UsagePermit)
    }

    /// A slot in every queue for a closing of holds, or None when one of them is full.
    pub fn reserve_close(&self) -> Option<ClosePermit> {
        let permits: Option<Vec<_>> = self.queues.iter().map(|q| q.clone().try_reserve_owned().ok()).collect();
        permits.map(ClosePermit)
    }

    /// Queues the closing of holds behind the settlements already queued. False when a queue is full.
    pub fn close_holds(&self, hold_ids: Vec<i64>) -> bool {
        if hold_ids.is_empty() {
            return true;
        }
        self.reserve_close().map(|permit| permit.close_holds(hold_ids)).is_some()
    }
}

pub struct UsageWriter {
    rx: mpsc::Receiver<UsageItem>,
    db: DatabaseConnection,
    batch_size: usize,
    flush_interval: Duration,
    fee_bps: u32,
    /// Wallet account per seller, and the revenue account, created on first use (outside batches).
    wallets: HashMap<i64, i64>,
    revenue: Option<i64>,
    /// Owner per hosted key, for the sellers' rollups.
    owners: HashMap<i64, i64>,
}

/// The sink and `writers` writers (at least one), each with its share of `capacity`. Each writer writes
/// the records of its share of the buyers in its own transactions; their batches overlap in the database
/// except where they change the same rows (sellers' wallets, keys, rollups), which they take last.
pub fn channel(
    db: DatabaseConnection,
    capacity: usize,
    batch_size: usize,
    flush_interval: Duration,
    fee_bps: u32,
    writers: usize,
) -> (UsageSink, Vec<UsageWriter>) {
    let writers = writers.max(1);
    let capacity = capacity.div_ceil(writers).max(1);
    let (queues, writers): (Vec<_>, Vec<_>) = (0..writers)
        .map(|_| {
            let (tx, rx) = mpsc::channel(capacity);
            let writer = UsageWriter {
                rx,
                db: db.clone(),
                batch_size,
                flush_interval,
                fee_bps,
                wallets: HashMap::new(),
                revenue: None,
                owners: HashMap::new(),
            };
            (tx, writer)
        })
        .unzip();
    (UsageSink { queues: queues.into() }, writers)
}

impl UsageWriter {
    /// Writes batches until `shutdown` turns true, then drains the queue and writes what is left. Call the
    /// shutdown only after the gateway stopped producing records, so nothing is lost.
    ///
    /// A batch is taken when the queue holds a full one or the flush interval has passed, whichever comes
    /// first. The writer sleeps in between rather than waiting on the queue, so that a record sent by a
    /// gateway thread never has to wake it (a cross-thread wake-up per request).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut stop = false;
        let mut next_flush = tokio::time::Instant::now() + self.flush_interval;
        loop {
            stop |= *shutdown.borrow();
            while !stop && self.rx.len() < self.batch_size && tokio::time::Instant::now() < next_flush {
                // Checked at a fraction of the interval: a queue that fills up is written before the deadline.
                let nap = (self.flush_interval / 8).max(Duration::from_millis(1));
                tokio::select! {
                    () = tokio::time::sleep_until(next_flush.min(tokio::time::Instant::now() + nap)) => {}
                    changed = shutdown.changed() => stop = changed.is_err() || *shutdown.borrow(),
                }
            }
            let mut batch = Vec::with_capacity(self.batch_size.min(self.rx.len().max(1)));
            let closed = loop {
                if batch.len() >= self.batch_size {
                    break false;
                }
                match self.rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(mpsc::error::TryRecvError::Empty) => break false,
                    Err(mpsc::error::TryRecvError::Disconnected) => break true,
                }
            };
            let drained = batch.len() < self.batch_size;
            if !batch.is_empty() {
                self.write(batch).await;
            }
            if drained {
                next_flush = tokio::time::Instant::now() + self.flush_interval;
                if stop || closed {
                    return;
                }
            }
        }
    }

    /// Writes the records (with their settlements) in queue order, closing holds where they were queued.
    async fn write(&mut self, items: Vec<UsageItem>) {
        let mut records = Vec::new();
        for item in items {
            match item {
                UsageItem::Record(r) => records.push(*r),
                UsageItem::CloseHolds(closing) => {
                    self.write_records(std::mem::take(&mut records)).await;
                    // The last writer to get here closes them: every writer has written what came before.
                    if closing.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                        self.close_holds(&closing.hold_ids).await;
                    }
                }
            }
        }
        self.write_records(records).await;
    }

    async fn close_holds(&self, ids: &[i64]) {
        for &id in ids {
            if let Err(e) = ledger::close_hold(&self.db, id, crate::now_ms()).await {
                // Left open, it is closed as stale by the maintenance task later.
                tracing::warn!(hold_id = id, error = %e, "closing a hold failed");
            }
        }
    }

    /// One transaction per batch: a retried batch can neither duplicate records, settle twice nor count key
    /// outcomes twice. While the database is unreachable or busy the batch is retried without end (the
    /// queue then fills up and paid requests are refused, rather than served unbilled). A batch that fails
    /// for another reason is split, so that one bad record cannot lose the others.
    async fn write_records(&mut self, batch: Vec<UsageRecord>) {
        if batch.is_empty() {
            return;
        }
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0;
        loop {
            match self.write_batch(&batch).await {
                Ok(()) => {
                    METRICS.usage_records_written.inc_by(batch.len() as u64);
                    METRICS.usage_queue_depth.sub(batch.len() as i64);
                    return;
                }
                Err(e) => {
                    METRICS.usage_write_errors.inc();
                    let unavailable = is_unavailable(&e);
                    tracing::warn!(error = %e, unavailable, records = batch.len(), "writing usage records failed");
                    if !unavailable {
                        failures += 1;
                        if failures >= if batch.len() > 1 { 2 } else { 4 } {
                            break;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if batch.len() > 1 {
            for record in batch {
                Box::pin(self.write_records(vec![record])).await;
            }
            return;
        }
        METRICS.usage_records_dropped.inc_by(batch.len() as u64);
        METRICS.usage_queue_depth.sub(batch.len() as i64);
        for record in &batch {
            tracing::error!(request_id = %record.request_id, "usage record dropped after repeated database errors");
        }
    }

    /// The batch in one transaction, each phase in a few multi-row statements whatever the batch's size
    /// (on MySQL a round trip costs far more than the rows it writes): settlements, usage rows, the keys'
    /// outcomes, the rollups.
    async fn write_batch(&mut self, batch: &[UsageRecord]) -> Result<(), LedgerError> {
        let mut laps = Laps::start();
        let now = crate::now_ms();
        // Accounts are created outside the batch transaction, so that a rolled-back batch cannot leave
        // cached ids of accounts that do not exist.
        let revenue = match self.revenue {
            Some(id) => id,
            None => {
                let id = ledger::revenue_account(&self.db, now).await?;
                self.revenue = Some(id);
                id
            }
        };
        for seller in batch.iter().filter_map(|r| r.charge.as_ref().and_then(|c| c.seller_id)) {
            if !self.wallets.contains_key(&seller) {
                let id = ledger::wallet_account(&self.db, seller, now).await?;
                self.wallets.insert(seller, id);
            }
        }
        // A key's owner never changes: read each once.
        let unknown: BTreeSet<i64> =
            batch.iter().filter_map(|r| r.hosted_key_id).filter(|id| !self.owners.contains_key(id)).collect();
        if !unknown.is_empty() {
            let unknown: Vec<i64> = unknown.into_iter().collect();
            self.owners.extend(rollups::key_owners(&self.db, &unknown).await?);
        }
        let txn = ledger::begin(&self.db).await?;
        // Records of a retried batch whose first attempt committed (the commit's answer was lost) are
        // not written again; they must not count again in the rollups and the keys' outcomes either.
        let existing = usage_records::existing_request_ids(&txn, batch.iter().map(|r| r.request_id.as_str())).await?;
        // Of ids repeated within the batch, the first counts.
        let mut seen = HashSet::with_capacity(batch.len());
        let is_new: Vec<bool> =
            batch.iter().map(|r| !existing.contains(&r.request_id) && seen.insert(r.request_id.as_str())).collect();
        let outcomes = key_outcomes(batch.iter().zip(&is_new).filter(|(_, new)| **new).map(|(r, _)| r));
        // Every paid record is settled, new or not: the ledger knows which were settled before.
        let paid: Vec<(usize, &Charge)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.charge.as_ref().filter(|c| c.cost > 0).map(|c| (i, c)))
            .collect();
        let settlements: Vec<Settlement> = paid
            .iter()
            .map(|&(i, charge)| Settlement {
                request_id: batch[i].request_id.clone(),
                hold_id: charge.hold_id,
                hold_account_id: charge.hold_account_id,
                source_account_id: charge.source_account_id,
                cost: charge.cost,
                seller_account_id: charge.seller_id.and_then(|s| self.wallets.get(&s).copied()),
                revenue_account_id: revenue,
                fee_bps: self.fee_bps,
            })
            .collect();
        laps.lap("prepare");

        // The buyers' side first: it is this writer's alone (its buyers' holds). What every writer shares
        // (sellers' wallets and the revenue account, keys, rollups) comes last, so that another writer's
        // batch waits for those rows only during the last phases of this one.
        let (settled, credits) = ledger::settle_batch_debits(&txn, &settlements, now).await?;
        laps.lap("ledger");

        let mut settled_of = vec![None; batch.len()];
        for (&(i, charge), s) in paid.iter().zip(&settled) {
            if s.unpaid > 0 {
                tracing::warn!(request_id = %batch[i].request_id, unpaid = s.unpaid, "the buyer could not pay the whole cost");
            }
            settled_of[i] = Some((*s, charge.excess));
        }
        let owner = |key_id: i64| self.owners.get(&key_id).copied().unwrap_or(0);
        let mut rows = Vec::with_capacity(batch.len());
        let mut rollup = Rollups::default();
        for ((record, &new), settled) in batch.iter().zip(&is_new).zip(&settled_of) {
            if !new {
                continue;
            }
            let (settled, excess) = settled.unwrap_or_default();
            let unpaid = if record.charge.as_ref().is_some_and(|c| c.cost > 0) { settled.unpaid + excess } else { 0 };
            let model = stored_model(record);
            rollup.add(&rollup_record(record, &model, &settled, owner));
            rows.push(to_row(record, model, unpaid));
        }
        usage_records::insert_new(&txn, rows).await?;
        laps.lap("usage_rows");
        credits.apply(&txn, now).await?;
        laps.lap("credits");
        crate::db::hosted_keys::apply_outcomes(&txn, &outcomes).await?;
        laps.lap("key_outcomes");
        rollups::apply(&txn, &rollup).await?;
        laps.lap("rollups");
        txn.commit().await?;
        laps.lap("commit");

        let done = crate::now_ms();
        for record in batch {
            let ended = record.created_at_ms.saturating_add(i64::try_from(record.latency_ms).unwrap_or(0));
            METRICS.settlement_lag.observe((done - ended).max(0) as f64 / 1000.0);
        }
        for (&(i, charge), s) in paid.iter().zip(&settled).filter(|(_, s)| !s.duplicate) {
            METRICS.credits_spent.with_label_values(&[batch[i].model.as_str()]).inc_by(s.paid.unsigned_abs());
            METRICS.platform_revenue.inc_by(s.platform.unsigned_abs());
            METRICS.credits_unpaid.inc_by(s.unpaid.saturating_add(charge.excess).unsigned_abs());
        }
        Ok(())
    }
}

/// Times the phases of a batch into `tokex_usage_batch_seconds`, each from the end of the one before.
struct Laps(Instant);

impl Laps {
    fn start() -> Self {
        Self(Instant::now())
    }

    fn lap(&mut self, phase: &str) {
        let now = Instant::now();
        METRICS.usage_batch_seconds.with_label_values(&[phase]).observe((now - self.0).as_secs_f64());
        self.0 = now;
    }
}

/// The database cannot be reached or is busy: retrying later will work. Anything else (a constraint, a
/// value out of range) would fail again.
fn is_unavailable(e: &LedgerError) -> bool {
    let LedgerError::Db(db) = e else { return false };
    if matches!(db, sea_orm::DbErr::Conn(_) | sea_orm::DbErr::ConnectionAcquire(_)) || ledger::is_transient(db) {
        return true;
    }
    let text = db.to_string().to_ascii_lowercase();
    ["connection", "timed out", "broken pipe", "io error", "server has gone away", "lost connection"]
        .iter()
        .any(|m| text.contains(m))
}

fn key_outcomes<'a>(batch: impl IntoIterator<Item = &'a UsageRecord>) -> Vec<KeyOutcome> {
    let mut by_key: BTreeMap<i64, KeyOutcome> = BTreeMap::new();
    for record in batch {
        for &(key_id, ok) in &record.key_attempts {
            let o = by_key.entry(key_id).or_insert(KeyOutcome {
                key_id,
                successes: 0,
                failures: 0,
                last_used_at_ms: None,
                last_failure_at_ms: None,
                spent: 0,
            });
            o.last_used_at_ms = o.last_used_at_ms.max(Some(record.created_at_ms));
            if ok && record.hosted_key_id == Some(key_id) {
                o.spent += record.charge.as_ref().map_or(0, |c| c.cost);
            }
            if ok {
                o.successes += 1;
            } else {
                o.failures += 1;
                o.last_failure_at_ms = o.last_failure_at_ms.max(Some(record.created_at_ms));
            }
        }
    }
    by_key.into_values().collect()
}

/// What the request cost, metered (the part beyond the reservation included, see `unpaid_credits`).
fn cost_of(r: &UsageRecord) -> i64 {
    r.charge.as_ref().map_or(0, |c| c.cost.saturating_add(c.excess))
}

/// The model name as stored: rejected requests carry whatever name the buyer sent, never more than the
/// column holds.
fn stored_model(r: &UsageRecord) -> String {
    r.model.chars().take(crate::openai::request::MAX_MODEL_CHARS).collect()
}

/// A new record as the rollups count it: `settled` is what its settlement moved (nothing when it cost
/// nothing); `owner` names the owner of a hosted key.
fn rollup_record<'a>(
    r: &UsageRecord,
    model: &'a str,
    settled: &Settled,
    owner: impl Fn(i64) -> i64,
) -> RollupRecord<'a> {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    RollupRecord {
        created_at_ms: r.created_at_ms,
        buyer_id: r.buyer_id,
        buyer_key_id: r.buyer_key_id,
        hosted_key: r.hosted_key_id.map(|id| (id, owner(id))),
        model,
        counters: Counters {
            requests: 1,
            failed_requests: i64::from(r.status_code >= 400),
            fallback_requests: i64::from(r.fallback),
            prompt_tokens: int(r.prompt_tokens),
            completion_tokens: int(r.completion_tokens),
            cost_credits: cost_of(r),
            paid_credits: settled.paid,
            seller_credits: settled.seller,
            platform_credits: settled.platform,
        },
    }
}

fn to_row(r: &UsageRecord, model: String, unpaid: i64) -> usage_records::ActiveModel {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    usage_records::ActiveModel {
        request_id: Set(r.request_id.clone()),
        buyer_id: Set(r.buyer_id),
        buyer_key_id: Set(r.buyer_key_id),
        hosted_key_id: Set(r.hosted_key_id),
        model: Set(model),
        endpoint: Set(r.endpoint.to_string()),
        prompt_tokens: Set(int(r.prompt_tokens)),
        completion_tokens: Set(int(r.completion_tokens)),
        estimated: Set(r.estimated),
        status_code: Set(i32::from(r.status_code)),
        attempts: Set(i32::try_from(r.attempts).unwrap_or(i32::MAX)),
        latency_ms: Set(int(r.latency_ms)),
        ttft_ms: Set(r.ttft_ms.map(int)),
        request_bytes: Set(int(r.request_bytes)),
        response_bytes: Set(int(r.response_bytes)),
        client_disconnected: Set(r.client_disconnected),
        error_kind: Set(r.error_kind.map(String::from)),
        created_at_ms: Set(r.created_at_ms),
        cost_credits: Set(cost_of(r)),
        unpaid_credits: Set(unpaid),
        hold_id: Set(r.charge.as_ref().map(|c| c.hold_id)),
        fallback: Set(r.fallback),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record(id: &str, attempts: Vec<(i64, bool)>, at: i64) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            buyer_id: 1,
            buyer_key_id: 1,
            hosted_key_id: attempts.last().map(|a| a.0),
            model: "m".into(),
            endpoint: "chat.completions",
            prompt_tokens: 1,
            completion_tokens: 1,
            estimated: false,
            status_code: 200,
            attempts: attempts.len() as u32,
            latency_ms: 1,
            ttft_ms: None,
            request_bytes: 1,
            response_bytes: 1,
            client_disconnected: false,
            error_kind: None,
            created_at_ms: at,
            key_attempts: attempts,
            charge: None,
            fallback: false,
        }
    }

    #[test]
    fn key_outcomes_aggregate_per_key() {
        let batch = vec![record("a", vec![(1, false), (2, true)], 10), record("b", vec![(2, true)], 20)];
        let outcomes = key_outcomes(&batch);
        assert_eq!(outcomes.len(), 2);
        assert_eq!((outcomes[0].key_id, outcomes[0].successes, outcomes[0].failures), (1, 0, 1));
        assert_eq!(outcomes[0].last_failure_at_ms, Some(10));
        assert_eq!((outcomes[1].key_id, outcomes[1].successes, outcomes[1].failures), (2, 2, 0));
        assert_eq!(outcomes[1].last_used_at_ms, Some(20));
        assert_eq!(outcomes[1].last_failure_at_ms, None);
        // Spending counts on the key that served, once per request.
        let mut paid = record("c", vec![(1, false), (2, true)], 30);
        paid.charge =
            Some(Charge { hold_id: 1, hold_account_id: 1, source_account_id: 1, cost: 7, seller_id: None, excess: 0 });
        let outcomes = key_outcomes([&paid]);
        assert_eq!((outcomes[0].spent, outcomes[1].spent), (0, 7));
    }

    #[test]
    fn rows_say_whether_the_fallback_pool_served() {
        let mut served = record("f", vec![(9, true)], 1);
        assert_eq!(to_row(&served, stored_model(&served), 0).fallback, Set(false));
        served.fallback = true;
        assert_eq!(to_row(&served, stored_model(&served), 0).fallback, Set(true));
    }
}

/// The usage writer against real databases: rollups counted once per request however often a batch is
/// retried, and equal to what the migration's backfill computes from the records and the ledger.
#[cfg(test)]
mod rollup_tests {
    use super::*;
    use crate::db::entities::settlements;
    use crate::db::entities::{usage_rollups_buyer as rb, usage_rollups_platform as rp, usage_rollups_seller as rs};
    use crate::db::hosted_keys;
    use crate::db::ledger::HoldSource;
    use crate::db::testing::TestDb;
    use migration::MigratorTrait;
    use sea_orm::{EntityTrait, QueryOrder};

    const T0: i64 = 1_750_000_000_000;
    const SELLER: i64 = 50;
    const BUYER: i64 = 1;

    type Row = (i64, i64, i64, String, [i64; 9]);

    /// Every rollup row without its id, in key order: (table, hour, key, model, counters).
    async fn rollups(db: &DatabaseConnection) -> Vec<Row> {
        let mut out = Vec::new();
        for r in rb::Entity::find().order_by_asc(rb::Column::Id).all(db).await.unwrap() {
            let c = [r.requests, r.failed_requests, r.fallback_requests, r.prompt_tokens, r.completion_tokens];
            let m = [r.cost_credits, r.paid_credits, r.seller_credits, r.platform_credits];
            out.push((0, r.hour_ms, r.buyer_key_id * 1000 + r.buyer_id, r.model, concat(c, m)));
        }
        for r in rs::Entity::find().order_by_asc(rs::Column::Id).all(db).await.unwrap() {
            let c = [r.requests, r.failed_requests, r.fallback_requests, r.prompt_tokens, r.completion_tokens];
            let m = [r.cost_credits, r.paid_credits, r.seller_credits, r.platform_credits];
            out.push((1, r.hour_ms, r.hosted_key_id * 1000 + r.owner_id, r.model, concat(c, m)));
        }
        for r in rp::Entity::find().order_by_asc(rp::Column::Id).all(db).await.unwrap() {
            let c = [r.requests, r.failed_requests, r.fallback_requests, r.prompt_tokens, r.completion_tokens];
            let m = [r.cost_credits, r.paid_credits, r.seller_credits, r.platform_credits];
            out.push((2, r.hour_ms, 0, r.model, concat(c, m)));
        }
        out.sort();
        out
    }

    fn concat(a: [i64; 5], b: [i64; 4]) -> [i64; 9] {
        [a[0], a[1], a[2], a[3], a[4], b[0], b[1], b[2], b[3]]
    }

    struct Fixture {
        writer: UsageWriter,
        key: i64,
        fallback_key: i64,
        charge: Charge,
    }

    async fn fixture(db: &DatabaseConnection) -> Fixture {
        let key = hosted_keys::insert(db, hosted_keys::tests::new_key(SELLER, "uid-seller")).await.unwrap().id;
        let mut platform = hosted_keys::tests::new_key(99, "uid-platform");
        platform.pool = "platform".into();
        let fallback_key = hosted_keys::insert(db, platform).await.unwrap().id;
        let charge = funded_charge(db, BUYER).await;
        let (_, mut writers) = channel(db.clone(), 16, 16, Duration::from_millis(10), 500, 1);
        let writer = writers.pop().unwrap();
        Fixture { writer, key, fallback_key, charge }
    }

    /// A charge (of nothing yet, to the seller) on a hold opened on the buyer's freshly granted wallet.
    async fn funded_charge(db: &DatabaseConnection, buyer: i64) -> Charge {
        ledger::grant(db, buyer, 1_000_000, None, &format!("g{buyer}"), None, T0).await.unwrap();
        let wallet = ledger::wallet_account(db, buyer, T0).await.unwrap();
        let source = HoldSource { buyer_id: buyer, account_id: wallet, escrow_id: None };
        let hold = ledger::open_hold(db, source, "node", 10_000, 10_000, crate::now_ms()).await.unwrap().unwrap();
        Charge {
            hold_id: hold.id,
            hold_account_id: hold.account_id,
            source_account_id: wallet,
            cost: 0,
            seller_id: Some(SELLER),
            excess: 0,
        }
    }

    fn served(f: &Fixture, id: &str, at: i64, model: &str, cost: i64) -> UsageRecord {
        let mut r = tests::record(id, vec![(f.key, true)], at);
        r.model = model.into();
        r.prompt_tokens = 11;
        r.completion_tokens = 7;
        r.charge = Some(Charge { cost, ..f.charge.clone() });
        r
    }

    /// A mixed batch: paid requests in two hours and two models, an overrun, a fallback request paid to
    /// the platform, an upstream failure and a request that reached no key.
    fn batch(f: &Fixture) -> Vec<UsageRecord> {
        let mut overrun = served(f, "r-overrun", T0 + 5, "m1", 100);
        overrun.charge = overrun.charge.map(|c| c.with_excess(30));
        let mut fallback = served(f, "r-fallback", T0 + 6, "m1", 40);
        fallback.hosted_key_id = Some(f.fallback_key);
        fallback.key_attempts = vec![(f.key, false), (f.fallback_key, true)];
        fallback.fallback = true;
        fallback.charge = fallback.charge.map(|c| Charge { seller_id: None, ..c });
        let mut failed = tests::record("r-failed", vec![(f.key, false)], T0 + 7);
        failed.status_code = 502;
        failed.model = "m1".into();
        let mut unserved = tests::record("r-unserved", vec![], T0 + 8);
        unserved.status_code = 429;
        unserved.model = "m2".into();
        vec![
            served(f, "r-1", T0, "m1", 33),
            served(f, "r-2", T0 + 1, "m1", 17),
            served(f, "r-3", T0 + 2, "m2", 1),
            served(f, "r-4", T0 + rollups::HOUR_MS, "m1", 58),
            overrun,
            fallback,
            failed,
            unserved,
        ]
    }

    #[tokio::test]
    async fn a_retried_batch_counts_once_in_rollups_and_key_outcomes() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let mut f = fixture(db).await;
            let records = batch(&f);
            f.writer.write_batch(&records).await.unwrap();
            let once = rollups(db).await;
            let key_once = hosted_keys::find_for_owner(db, SELLER, f.key).await.unwrap().unwrap();
            // The same batch again (its first commit's answer was lost), and one that overlaps it.
            f.writer.write_batch(&records).await.unwrap();
            let mut overlap = vec![records[0].clone(), served(&f, "r-5", T0 + 9, "m1", 5)];
            overlap.push(served(&f, "r-5", T0 + 9, "m1", 5));
            f.writer.write_batch(&overlap).await.unwrap();
            let twice = rollups(db).await;
            let key_twice = hosted_keys::find_for_owner(db, SELLER, f.key).await.unwrap().unwrap();
            assert_eq!((key_once.success_count, key_once.failure_count), (5, 2), "{l}");
            assert_eq!((key_twice.success_count, key_twice.failure_count), (6, 2), "{l}: r-5 only");
            assert_eq!(key_once.remaining_balance - key_twice.remaining_balance, 5, "{l}");

            let buyer: Vec<&Row> = twice.iter().filter(|r| r.0 == 0).collect();
            let total = |rows: &[&Row], i: usize| rows.iter().map(|r| r.4[i]).sum::<i64>();
            assert_eq!(total(&buyer, 0), 9, "{l}: 8 records, then r-5");
            assert_eq!(total(&buyer, 1), 2, "{l}: failed");
            assert_eq!(total(&buyer, 2), 1, "{l}: fallback");
            // Costs: the overrun's excess is in the cost and not paid.
            assert_eq!(total(&buyer, 5), 33 + 17 + 1 + 58 + 130 + 40 + 5, "{l}");
            assert_eq!(total(&buyer, 6), 33 + 17 + 1 + 58 + 100 + 40 + 5, "{l}");
            // Seller and platform credits are what the ledger's accounts received.
            let seller_wallet = ledger::wallet_balance(db, SELLER).await.unwrap();
            let revenue = ledger::balance(db, ledger::revenue_account(db, T0).await.unwrap()).await.unwrap();
            assert_eq!((total(&buyer, 7), total(&buyer, 8)), (seller_wallet, revenue), "{l}");
            let seller: Vec<&Row> = twice.iter().filter(|r| r.0 == 1).collect();
            assert_eq!(total(&seller, 0), 8, "{l}: the unserved request has no seller side");
            assert_eq!(total(&seller, 7), seller_wallet, "{l}");
            assert!(seller.iter().any(|r| r.2 == f.fallback_key * 1000 + 99), "{l}: owner of the fallback key");
            let platform: Vec<&Row> = twice.iter().filter(|r| r.0 == 2).collect();
            for i in 0..9 {
                assert_eq!(total(&platform, i), total(&buyer, i), "{l}: platform counter {i}");
            }
            // The first write's rows changed only by r-5.
            assert_eq!(once.len(), twice.len(), "{l}");
            let hour = rollups::hour_of(T0);
            let m1 = |rows: &[Row]| rows.iter().find(|r| r.0 == 2 && r.1 == hour && r.3 == "m1").unwrap().4;
            assert_eq!(m1(&twice)[0] - m1(&once)[0], 1, "{l}");
            t.cleanup().await;
        }
    }

    /// Two writers, each with its share of the buyers: a closing of holds queued behind both buyers'
    /// settlements closes the holds only once both writers have written what came before it, whichever
    /// writer gets there first; both buyers' records are settled from their own holds.
    #[tokio::test]
    async fn holds_close_after_every_writers_earlier_settlements() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let f = fixture(db).await;
            // A second buyer, in the other writer's share (buyers go to writer `id % 2`).
            let other = BUYER + 1;
            let other_charge = funded_charge(db, other).await;

            let (sink, writers) = channel(db.clone(), 64, 16, Duration::from_millis(10), 500, 2);
            let mut first = served(&f, "w-first", T0 + 1, "m1", 30);
            first.buyer_id = BUYER;
            let mut second = served(&f, "w-second", T0 + 2, "m1", 20);
            second.buyer_id = other;
            second.charge = Some(Charge { cost: 20, ..other_charge.clone() });
            sink.reserve(first.buyer_id).unwrap().send(first);
            sink.reserve(second.buyer_id).unwrap().send(second);
            assert!(sink.close_holds(vec![f.charge.hold_id, other_charge.hold_id]), "{l}");

            // Each writer drains its queue and stops; the other one has not run yet.
            let mut writers = writers.into_iter();
            let (stop, stopped) = watch::channel(true);
            let (one, two) = (writers.next().unwrap(), writers.next().unwrap());
            // Buyer 1 is the second writer's; run that one first.
            two.run(stopped.clone()).await;
            for id in [f.charge.hold_id, other_charge.hold_id] {
                let h = ledger::find_hold(db, id).await.unwrap().unwrap();
                assert_eq!(h.status, ledger::HOLD_OPEN, "{l}: closed before the other writer's settlements");
            }
            assert_eq!(ledger::find_hold(db, f.charge.hold_id).await.unwrap().unwrap().spent, 30, "{l}");
            one.run(stopped).await;
            drop(stop);
            for (id, spent) in [(f.charge.hold_id, 30), (other_charge.hold_id, 20)] {
                let h = ledger::find_hold(db, id).await.unwrap().unwrap();
                assert_eq!((h.status.as_str(), h.spent), (ledger::HOLD_CLOSED, spent), "{l}");
            }
            assert_eq!(
                sea_orm::PaginatorTrait::count(crate::db::usage_records::Entity::find(), db).await.unwrap(),
                2,
                "{l}"
            );
            let violations = ledger::check(db, crate::now_ms(), 3_600_000).await.unwrap();
            assert!(violations.is_empty(), "{l}: {violations:?}");
            t.cleanup().await;
        }
    }

    /// A batch of the default size with as many settlements, key outcomes and rollup rows as records: every
    /// multi-row statement is chunked below the placeholder limits (SQLite's 32766, MySQL's 65535).
    #[tokio::test]
    async fn a_batch_of_the_default_size_fits_the_statement_limits() {
        use sea_orm::PaginatorTrait;
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let mut f = fixture(db).await;
            let n = crate::config::UsageConfig::default().batch_size;
            let records: Vec<UsageRecord> = (0..n as i64)
                .map(|i| {
                    let mut r = served(&f, &format!("big-{i}"), T0 + i, &format!("m{}", i % 7), 3);
                    r.buyer_key_id = i + 1;
                    // Keys that do not exist: their outcomes and rollups are still written.
                    r.hosted_key_id = Some(f.key + 100 + i);
                    r.key_attempts = vec![(f.key + 100 + i, true)];
                    r
                })
                .collect();
            f.writer.write_batch(&records).await.unwrap();
            let n = n as u64;
            assert_eq!(crate::db::usage_records::Entity::find().count(db).await.unwrap(), n, "{l}");
            assert_eq!(rb::Entity::find().count(db).await.unwrap(), n, "{l}");
            assert_eq!(rs::Entity::find().count(db).await.unwrap(), n, "{l}");
            let hold = ledger::find_hold(db, f.charge.hold_id).await.unwrap().unwrap();
            assert_eq!(hold.spent, 3 * n as i64, "{l}");
            let violations = ledger::check(db, crate::now_ms(), 3_600_000).await.unwrap();
            assert!(violations.is_empty(), "{l}: {violations:?}");
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn the_migration_backfills_what_the_writer_counts() {
        for mut t in TestDb::all().await {
            let l = t.label;
            let db = &t.db;
            let mut f = fixture(db).await;
            // One record per batch: each settle entry then settles one request, the layout from before
            // the settlements migration (7), which cannot be rolled back past batch entries.
            for record in batch(&f) {
                f.writer.write_batch(std::slice::from_ref(&record)).await.unwrap();
            }
            f.writer.write_batch(&[served(&f, "r-late", T0 + 3 * rollups::HOUR_MS, "m3", 9)]).await.unwrap();
            let online = rollups(db).await;
            assert!(online.len() > 8, "{l}");
            // Back to the schema before the reports migration (its tables are dropped), and up again: the
            // rollups are rebuilt from the usage records and the settlements alone.
            let migrations = migration::Migrator::migrations();
            let reports = migrations.iter().position(|m| m.name() == "m20261124_000005_reports").unwrap();
            let steps = u32::try_from(migrations.len() - reports).unwrap();
            drop(f);
            let settled = settlements::Entity::find().order_by_asc(settlements::Column::RequestId).all(&t.db).await;
            t.remigrate(Some(steps)).await;
            assert_eq!(rollups(&t.db).await, online, "{l}");
            // The settlements migration (7) rebuilt the settlements from the per-request entries.
            let rebuilt = settlements::Entity::find().order_by_asc(settlements::Column::RequestId).all(&t.db).await;
            assert_eq!(rebuilt.unwrap(), settled.unwrap(), "{l}");
            let violations = ledger::check(&t.db, T0 + 4 * rollups::HOUR_MS, i64::MAX / 2).await.unwrap();
            assert!(violations.is_empty(), "{l}: {violations:?}");
            t.cleanup().await;
        }
    }
}
