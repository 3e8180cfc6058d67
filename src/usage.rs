//! Usage records: produced once per gateway request, written to the database in batches by a background
//! task, never on the request path. The queue is bounded: when the database is down the gateway keeps
//! serving and counts what it had to drop, instead of growing without limit.

use std::collections::BTreeMap;
use std::time::Duration;

use sea_orm::{ActiveValue::Set, DatabaseConnection, TransactionTrait};
use tokio::sync::{mpsc, watch};

use crate::db::entities::usage_records;
use crate::db::hosted_keys::KeyOutcome;
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
}

/// The producer side, cloned into every gateway thread.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageRecord>,
}

impl UsageSink {
    /// Never waits: a full queue drops the record and counts it.
    pub fn submit(&self, record: UsageRecord) {
        if let Err(e) = self.tx.try_send(record) {
            METRICS.usage_records_dropped.inc();
            let record = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            tracing::error!(request_id = %record.request_id, "usage queue full or closed; record dropped");
        }
    }
}

pub struct UsageWriter {
    rx: mpsc::Receiver<UsageRecord>,
    db: DatabaseConnection,
    batch_size: usize,
    flush_interval: Duration,
}

pub fn channel(
    db: DatabaseConnection,
    capacity: usize,
    batch_size: usize,
    flush_interval: Duration,
) -> (UsageSink, UsageWriter) {
    let (tx, rx) = mpsc::channel(capacity);
    (UsageSink { tx }, UsageWriter { rx, db, batch_size, flush_interval })
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
                    record = self.rx.recv() => match record {
                        Some(r) => batch.push(r),
                        None => { stop = true; break; }
                    },
                    () = &mut deadline => break,
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() { stop = true; break; }
                    }
                }
            }
            if stop {
                while let Ok(r) = self.rx.try_recv() {
                    batch.push(r);
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

    /// Inserts are idempotent by request id and the batch is one transaction, so a failed write can be retried.
    async fn write(&self, batch: Vec<UsageRecord>) {
        if batch.is_empty() {
            return;
        }
        let outcomes = key_outcomes(&batch);
        let n = batch.len() as u64;
        let rows: Vec<usage_records::ActiveModel> = batch.iter().map(to_row).collect();
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=5 {
            // One transaction: a retried batch can neither duplicate records nor count key outcomes twice.
            let result = async {
                let txn = self.db.begin().await?;
                crate::db::usage_records::insert_batch(&txn, rows.clone()).await?;
                crate::db::hosted_keys::apply_outcomes(&txn, &outcomes).await?;
                txn.commit().await
            }
            .await;
            match result {
                Ok(()) => {
                    METRICS.usage_records_written.inc_by(n);
                    return;
                }
                Err(e) => {
                    METRICS.usage_write_errors.inc();
                    tracing::warn!(error = %e, attempt, records = n, "writing usage records failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        METRICS.usage_records_dropped.inc_by(n);
        tracing::error!(records = n, "usage records dropped after repeated database errors");
    }
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
            });
            o.last_used_at_ms = o.last_used_at_ms.max(Some(record.created_at_ms));
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

fn to_row(r: &UsageRecord) -> usage_records::ActiveModel {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    usage_records::ActiveModel {
        request_id: Set(r.request_id.clone()),
        buyer_id: Set(r.buyer_id),
        buyer_key_id: Set(r.buyer_key_id),
        hosted_key_id: Set(r.hosted_key_id),
        model: Set(r.model.clone()),
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
    }
}
