//! Usage records and their settlement: produced once per gateway request, written to the database in
//! batches by a background task, never on the request path. A record and the settlement of what the
//! request cost are written in one transaction, idempotent by request id (docs/ledger.md).
//!
//! The queue is bounded. A request that can cost money takes a queue slot before it is proxied (a
//! [`UsagePermit`]), so its record can never be dropped for lack of room: when the database is down long
//! enough to fill the queue, new paid requests are refused instead of served unbilled.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sea_orm::{ActiveValue::Set, DatabaseConnection};
use tokio::sync::{mpsc, watch};

use crate::billing::Charge;
use crate::db::entities::usage_records;
use crate::db::hosted_keys::KeyOutcome;
use crate::db::ledger::{self, LedgerError, Settlement};
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

/// What the writer is asked to do, in queue order.
#[derive(Debug)]
pub enum UsageItem {
    Record(Box<UsageRecord>),
    /// Close these holds: queued after every settlement that draws from them.
    CloseHolds(Vec<i64>),
}

/// The producer side, cloned into every gateway thread.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageItem>,
}

/// A reserved queue slot: the record sent with it is never dropped.
pub struct UsagePermit(mpsc::OwnedPermit<UsageItem>);

impl UsagePermit {
    pub fn send(self, record: UsageRecord) {
        self.0.send(UsageItem::Record(Box::new(record)));
    }

    /// Queues the closing of holds behind the settlements already queued.
    pub fn close_holds(self, hold_ids: Vec<i64>) {
        self.0.send(UsageItem::CloseHolds(hold_ids));
    }
}

impl UsageSink {
    /// Never waits: a full queue drops the record and counts it. For records that cost nothing.
    pub fn submit(&self, record: UsageRecord) {
        if let Err(e) = self.tx.try_send(UsageItem::Record(Box::new(record))) {
            METRICS.usage_records_dropped.inc();
            if let mpsc::error::TrySendError::Full(UsageItem::Record(r))
            | mpsc::error::TrySendError::Closed(UsageItem::Record(r)) = e
            {
                tracing::error!(request_id = %r.request_id, "usage queue full or closed; record dropped");
            }
        }
    }

    /// A queue slot for a request that may cost money, or None when the queue is full.
    pub fn reserve(&self) -> Option<UsagePermit> {
        self.tx.clone().try_reserve_owned().ok().map(UsagePermit)
    }

    /// Queues the closing of holds behind the settlements already queued. False when the queue is full.
    pub fn close_holds(&self, hold_ids: Vec<i64>) -> bool {
        hold_ids.is_empty() || self.tx.try_send(UsageItem::CloseHolds(hold_ids)).is_ok()
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
}

pub fn channel(
    db: DatabaseConnection,
    capacity: usize,
    batch_size: usize,
    flush_interval: Duration,
    fee_bps: u32,
) -> (UsageSink, UsageWriter) {
    let (tx, rx) = mpsc::channel(capacity);
    let writer = UsageWriter { rx, db, batch_size, flush_interval, fee_bps, wallets: HashMap::new(), revenue: None };
    (UsageSink { tx }, writer)
}

impl UsageWriter {
    /// Writes batches until `shutdown` turns true, then drains the queue and writes what is left. Call the
    /// shutdown only after the gateway stopped producing records, so nothing is lost.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            let deadline = tokio::time::sleep(self.flush_interval);
            tokio::pin!(deadline);
            let mut stop = false;
            while batch.len() < self.batch_size {
                tokio::select! {
                    item = self.rx.recv() => match item {
                        Some(item) => batch.push(item),
                        None => { stop = true; break; }
                    },
                    () = &mut deadline => break,
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() { stop = true; break; }
                    }
                }
            }
            if stop {
                while let Ok(item) = self.rx.try_recv() {
                    batch.push(item);
                    if batch.len() >= self.batch_size {
                        self.write(std::mem::take(&mut batch)).await;
                    }
                }
                self.write(batch).await;
                return;
            }
            if !batch.is_empty() {
                self.write(std::mem::take(&mut batch)).await;
            }
        }
    }

    /// Writes the records (with their settlements) in queue order, closing holds where they were queued.
    async fn write(&mut self, items: Vec<UsageItem>) {
        let mut records = Vec::new();
        for item in items {
            match item {
                UsageItem::Record(r) => records.push(*r),
                UsageItem::CloseHolds(ids) => {
                    self.write_records(std::mem::take(&mut records)).await;
                    self.close_holds(&ids).await;
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
        for record in &batch {
            tracing::error!(request_id = %record.request_id, "usage record dropped after repeated database errors");
        }
    }

    async fn write_batch(&mut self, batch: &[UsageRecord]) -> Result<(), LedgerError> {
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
        let outcomes = key_outcomes(batch);
        let txn = ledger::begin(&self.db).await?;
        let mut rows = Vec::with_capacity(batch.len());
        let mut settled_all = Vec::with_capacity(batch.len());
        for record in batch {
            let mut unpaid = 0;
            if let Some(charge) = record.charge.as_ref().filter(|c| c.cost > 0) {
                let settlement = Settlement {
                    request_id: record.request_id.clone(),
                    hold_id: charge.hold_id,
                    hold_account_id: charge.hold_account_id,
                    source_account_id: charge.source_account_id,
                    cost: charge.cost,
                    seller_account_id: charge.seller_id.and_then(|s| self.wallets.get(&s).copied()),
                    revenue_account_id: revenue,
                    fee_bps: self.fee_bps,
                };
                let settled = ledger::settle(&txn, &settlement, now).await?;
                if settled.unpaid > 0 {
                    tracing::warn!(request_id = %record.request_id, unpaid = settled.unpaid, "the buyer could not pay the whole cost");
                }
                unpaid = settled.unpaid + charge.excess;
                settled_all.push((record.model.as_str(), settled, charge.excess));
            }
            rows.push(to_row(record, unpaid));
        }
        crate::db::usage_records::insert_batch(&txn, rows).await?;
        crate::db::hosted_keys::apply_outcomes(&txn, &outcomes).await?;
        txn.commit().await?;
        let done = crate::now_ms();
        for record in batch {
            let ended = record.created_at_ms.saturating_add(i64::try_from(record.latency_ms).unwrap_or(0));
            METRICS.settlement_lag.observe((done - ended).max(0) as f64 / 1000.0);
        }
        for (model, settled, excess) in settled_all.into_iter().filter(|(_, s, _)| !s.duplicate) {
            METRICS.credits_spent.with_label_values(&[model]).inc_by(settled.paid.unsigned_abs());
            METRICS.platform_revenue.inc_by(settled.platform.unsigned_abs());
            METRICS.credits_unpaid.inc_by(settled.unpaid.saturating_add(excess).unsigned_abs());
        }
        Ok(())
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

fn key_outcomes(batch: &[UsageRecord]) -> Vec<KeyOutcome> {
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

fn to_row(r: &UsageRecord, unpaid: i64) -> usage_records::ActiveModel {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    usage_records::ActiveModel {
        request_id: Set(r.request_id.clone()),
        buyer_id: Set(r.buyer_id),
        buyer_key_id: Set(r.buyer_key_id),
        hosted_key_id: Set(r.hosted_key_id),
        // Rejected requests carry whatever model name the buyer sent: never more than the column holds.
        model: Set(r.model.chars().take(crate::openai::request::MAX_MODEL_CHARS).collect()),
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
        cost_credits: Set(r.charge.as_ref().map_or(0, |c| c.cost.saturating_add(c.excess))),
        unpaid_credits: Set(unpaid),
        hold_id: Set(r.charge.as_ref().map(|c| c.hold_id)),
        fallback: Set(r.fallback),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, attempts: Vec<(i64, bool)>, at: i64) -> UsageRecord {
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
        let outcomes = key_outcomes(&[paid]);
        assert_eq!((outcomes[0].spent, outcomes[1].spent), (0, 7));
    }

    #[test]
    fn rows_say_whether_the_fallback_pool_served() {
        let mut served = record("f", vec![(9, true)], 1);
        assert_eq!(to_row(&served, 0).fallback, Set(false));
        served.fallback = true;
        assert_eq!(to_row(&served, 0).fallback, Set(true));
    }
}
