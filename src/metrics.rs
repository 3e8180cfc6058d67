//! Every Prometheus metric the gateway exports, defined once, all with the `tokex_` prefix.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Encoder, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    TextEncoder,
};

/// Latency buckets in seconds: LLM calls range from milliseconds (cached embeddings) to minutes (long streams).
const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Buckets in seconds for background database work: a usage batch or a pool snapshot takes from about a
/// millisecond (a few rows on a local database) to seconds (100,000 keys, a busy server).
const BACKGROUND_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

pub struct Metrics {
    /// Finished gateway requests by model and the status the buyer received.
    pub requests: IntCounterVec,
    /// Time from the start of the request to the end of the response, by model.
    pub upstream_latency: HistogramVec,
    /// Time to first token: from the start of the request to the first response body byte.
    pub ttft: HistogramVec,
    /// Metered tokens by model and kind (prompt|completion).
    pub tokens: IntCounterVec,
    pub active_streams: IntGauge,
    /// Seller keys in the pool by status.
    pub pool_keys: IntGaugeVec,
    /// Attempts that failed before any byte reached the buyer and moved on to another key, by model and reason.
    pub failovers: IntCounterVec,
    pub usage_records_written: IntCounter,
    pub usage_records_dropped: IntCounter,
    pub usage_write_errors: IntCounter,
    /// Usage records accepted and not yet written (or dropped): the usage writer's backlog.
    pub usage_queue_depth: IntGauge,
    /// Time the usage writer spends per batch, by phase: prepare, ledger, usage_rows, key_outcomes, rollups,
    /// commit (`usage::UsageWriter::write_batch`).
    pub usage_batch_seconds: HistogramVec,
    pub pool_refresh_errors: IntCounter,
    /// Time to load a pool snapshot from the database and swap it in.
    /// By kind: `full` (every key row) or `incremental` (the rows changed since the previous reload).
    pub pool_refresh_seconds: HistogramVec,
    /// Seller keys in the last pool snapshot loaded, all statuses.
    pub pool_snapshot_keys: IntGauge,
    /// Credits buyers paid for settled requests, by model.
    pub credits_spent: IntCounterVec,
    /// Credits the platform earned (fees and platform-key requests).
    pub platform_revenue: IntCounter,
    /// Credits requests cost that the buyer's funds could not cover (hold overruns).
    pub credits_unpaid: IntCounter,
    /// From the end of a request to the commit of its settlement.
    pub settlement_lag: Histogram,
    /// Requests refused because no source could cover their worst case.
    pub insufficient_funds: IntCounter,
    /// Holds this node keeps open.
    pub holds_open: IntGauge,
    /// Requests served by a platform fallback key, by model.
    pub fallback_requests: IntCounterVec,
    /// Keys put in rate-limit cooldown (429), by model.
    pub key_cooldowns: IntCounterVec,
    /// Circuit transitions on this node, by state entered (open|half_open|closed).
    pub circuit_transitions: IntCounterVec,
    /// Keys whose circuit is open or in cooldown on this node (not selectable now).
    pub keys_unavailable: IntGauge,
    /// Scheduled risk checks by kind (balance|failures|verify) and result.
    pub risk_checks: IntCounterVec,
    /// Status changes made by risk control, by status entered (paused|depleted|flagged|active).
    pub risk_transitions: IntCounterVec,
    /// Webhook deliveries by result (delivered|failed|abandoned).
    pub webhook_deliveries: IntCounterVec,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::register);

impl Metrics {
    #[allow(clippy::expect_used)] // registering a fixed, valid metric set can only fail on a programming error
    fn register() -> Self {
        Self {
            requests: register_int_counter_vec!(
                "tokex_requests_total",
                "Gateway requests by model and response status",
                &["model", "status"]
            )
            .expect("metric"),
            upstream_latency: register_histogram_vec!(
                "tokex_upstream_latency_seconds",
                "Request latency through the gateway, by model",
                &["model"],
                LATENCY_BUCKETS.to_vec()
            )
            .expect("metric"),
            ttft: register_histogram_vec!(
                "tokex_ttft_seconds",
                "Time to first response byte, by model",
                &["model"],
                LATENCY_BUCKETS.to_vec()
            )
            .expect("metric"),
            tokens: register_int_counter_vec!(
                "tokex_tokens_total",
                "Metered tokens by model and kind",
                &["model", "kind"]
            )
            .expect("metric"),
            active_streams: register_int_gauge!("tokex_active_streams", "Streaming responses in progress")
                .expect("metric"),
            pool_keys: register_int_gauge_vec!("tokex_pool_keys", "Seller keys in the pool by status", &["status"])
                .expect("metric"),
            failovers: register_int_counter_vec!(
                "tokex_failovers_total",
                "Attempts that failed before the first byte and were retried on another key",
                &["model", "reason"]
            )
            .expect("metric"),
            usage_records_written: register_int_counter!(
                "tokex_usage_records_written_total",
                "Usage records written to the database"
            )
            .expect("metric"),
            usage_records_dropped: register_int_counter!(
                "tokex_usage_records_dropped_total",
                "Usage records dropped because the write queue was full"
            )
            .expect("metric"),
            usage_write_errors: register_int_counter!(
                "tokex_usage_write_errors_total",
                "Failed usage-record batch writes (retried)"
            )
            .expect("metric"),
            usage_queue_depth: register_int_gauge!(
                "tokex_usage_queue_depth",
                "Usage records waiting to be written to the database"
            )
            .expect("metric"),
            usage_batch_seconds: register_histogram_vec!(
                "tokex_usage_batch_seconds",
                "Time the usage writer spends per batch, by phase",
                &["phase"],
                BACKGROUND_BUCKETS.to_vec()
            )
            .expect("metric"),
            pool_refresh_errors: register_int_counter!(
                "tokex_pool_refresh_errors_total",
                "Failed reloads of the key pool from the database"
            )
            .expect("metric"),
            pool_refresh_seconds: register_histogram_vec!(
                "tokex_pool_refresh_seconds",
                "Time to load a pool snapshot from the database and swap it in, by kind (full, incremental)",
                &["kind"],
                BACKGROUND_BUCKETS.to_vec()
            )
            .expect("metric"),
            pool_snapshot_keys: register_int_gauge!(
                "tokex_pool_snapshot_keys",
                "Seller keys in the last pool snapshot loaded, all statuses"
            )
            .expect("metric"),
            credits_spent: register_int_counter_vec!(
                "tokex_credits_spent_total",
                "Credits paid by buyers for settled requests, by model",
                &["model"]
            )
            .expect("metric"),
            platform_revenue: register_int_counter!(
                "tokex_platform_revenue_credits_total",
                "Credits earned by the platform (fees and platform keys)"
            )
            .expect("metric"),
            credits_unpaid: register_int_counter!(
                "tokex_credits_unpaid_total",
                "Credits owed by requests that the buyer's funds could not cover"
            )
            .expect("metric"),
            settlement_lag: register_histogram!(
                "tokex_settlement_lag_seconds",
                "Time from the end of a request to the commit of its settlement",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
            )
            .expect("metric"),
            insufficient_funds: register_int_counter!(
                "tokex_insufficient_funds_total",
                "Requests refused with 402 because no escrow or wallet could cover them"
            )
            .expect("metric"),
            holds_open: register_int_gauge!("tokex_holds_open", "Credit holds this node keeps open").expect("metric"),
            fallback_requests: register_int_counter_vec!(
                "tokex_fallback_requests_total",
                "Requests served by a platform fallback key, by model",
                &["model"]
            )
            .expect("metric"),
            key_cooldowns: register_int_counter_vec!(
                "tokex_key_cooldowns_total",
                "Seller keys put in rate-limit cooldown after a 429, by model",
                &["model"]
            )
            .expect("metric"),
            circuit_transitions: register_int_counter_vec!(
                "tokex_circuit_transitions_total",
                "Key circuit-breaker transitions on this node, by state entered",
                &["state"]
            )
            .expect("metric"),
            keys_unavailable: register_int_gauge!(
                "tokex_keys_unavailable",
                "Keys this node does not select now (circuit open or rate-limit cooldown)"
            )
            .expect("metric"),
            risk_checks: register_int_counter_vec!(
                "tokex_risk_checks_total",
                "Scheduled seller-key checks by kind and result",
                &["kind", "result"]
            )
            .expect("metric"),
            risk_transitions: register_int_counter_vec!(
                "tokex_risk_transitions_total",
                "Seller-key status changes made by risk control, by status entered",
                &["status"]
            )
            .expect("metric"),
            webhook_deliveries: register_int_counter_vec!(
                "tokex_webhook_deliveries_total",
                "Notification deliveries to seller webhooks by result",
                &["result"]
            )
            .expect("metric"),
        }
    }
}

/// The text exposition of every registered metric, for the metrics listener.
pub fn render() -> String {
    // Touch the registry so a scrape before the first request still lists every metric family.
    LazyLock::force(&METRICS);
    let mut out = Vec::with_capacity(16 * 1024);
    let families = prometheus::gather();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}
