//! token-exchange: an LLM API gateway and token marketplace on Pingora.
//!
//! Module map (one concern each):
//! - `config`: the one validated configuration type (defaults < file < environment).
//! - `crypto`: AES-256-GCM secret box for seller keys; `credentials`: buyer keys, passwords, sessions.
//! - `db`: sea-orm entities and the query functions; handlers never build SQL.
//! - `openai`: pure wire-format handling (request inspection/rewrite, SSE parsing, metering, token counts).
//! - `pool`: the in-memory snapshot of buyer keys and routable seller keys, and its refresher.
//! - `proxy`: the Pingora `ProxyHttp` service (thin hooks over plain functions).
//! - `usage`: the batched, off-path writer of usage records and their settlements.
//! - `billing`: what requests cost and who pays: prices, a node's credit holds, per-request reservations.
//! - `admin`: the admin REST API (axum); `accounts`: user and key management shared by the REST API and the CLI;
//!   `ledger`: credits, prices and escrows, also shared by both (the money itself moves in `db::ledger`).
//! - `disputes`: buyers' disputes of requests and escrows, and their resolution (refunds through the ledger).
//! - `ssrf`: which addresses a seller's base URL may reach; `provider`: calls to providers off the request
//!   path (key verification, balance readings, webhooks).
//! - `health` (per node): each key's success/latency averages, cooldowns and circuit; `risk`: scheduled
//!   checks (dilution, failure rate, depletion), re-verification, webhook delivery.
//! - `analytics`: reports, time series and CSV exports over the hourly usage rollups (docs/reports.md).
//! - `metrics`: every Prometheus metric, defined once.
//! - `cli`: the admin commands of the binary; `telemetry`: logging.
//! - `app`: wires config, database, services and listeners together.

pub mod accounts;
pub mod admin;
pub mod analytics;
pub mod app;
pub mod billing;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod crypto;
pub mod db;
pub mod disputes;
pub mod health;
pub mod ledger;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod provider;
pub mod proxy;
pub mod risk;
pub mod ssrf;
pub mod telemetry;
pub mod usage;

/// Milliseconds since the Unix epoch: the one time representation stored in the database.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
