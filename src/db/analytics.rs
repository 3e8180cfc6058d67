//! Queries behind the reports (docs/reports.md): sums over the hourly rollups, grouped by the database
//! (never rows in memory), and pages of usage records and postings for the CSV exports (keyset pagination
//! by id).
//!
//! Rollup ranges are whole hours: a row counts when its hour starts within [`Hours::from_ms`,
//! `Hours::to_ms`].

use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, Statement, Value};
use serde::Serialize;
use utoipa::ToSchema;

use super::funds::sum;

/// Whose rows a query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Everything.
    Platform,
    /// The buyer's own requests (and, for postings, their wallet, escrow and hold accounts).
    Buyer(i64),
    /// Requests served by the seller's keys (and, for postings, their wallet).
    Seller(i64),
}

/// Rollup rows whose hour starts in [from_ms, to_ms].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hours {
    pub from_ms: i64,
    pub to_ms: i64,
}

impl Hours {
    pub const ALL: Hours = Hours { from_ms: i64::MIN, to_ms: i64::MAX };
}

fn statement(c: &impl ConnectionTrait, sql: String, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(c.get_database_backend(), sql, values)
}

/// `SUM(col) AS col` for each column, as integers on both databases.
fn sums(backend: DbBackend, columns: &[&str]) -> String {
    columns.iter().map(|c| format!("{} AS {c}", sum(backend, c))).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------------------------------------------------
// The platform

/// All-time usage of one model.
#[derive(Clone, Debug, Default, PartialEq, Eq, FromQueryResult, Serialize, ToSchema)]
pub struct PlatformModelUsage {
    pub model: String,
    pub requests: i64,
    pub failed_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_credits: i64,
    pub platform_credits: i64,
    pub fallback_requests: i64,
}

/// Usage per model, all time, by requests (most first).
pub async fn platform_by_model(c: &impl ConnectionTrait) -> Result<Vec<PlatformModelUsage>, DbErr> {
    let sql = format!(
        "SELECT * FROM (SELECT model, {} FROM usage_rollups_platform GROUP BY model) q \
         ORDER BY q.requests DESC, q.model",
        sums(
            c.get_database_backend(),
            &[
                "requests",
                "failed_requests",
                "prompt_tokens",
                "completion_tokens",
                "cost_credits",
                "platform_credits",
                "fallback_requests"
            ]
        )
    );
    PlatformModelUsage::find_by_statement(statement(c, sql, vec![])).all(c).await
}

#[derive(Clone, Debug, Default, PartialEq, Eq, FromQueryResult)]
pub struct PlatformRecent {
    pub requests: i64,
    pub tokens: i64,
    pub paid_credits: i64,
    pub platform_credits: i64,
}

/// Platform totals of the hours from `since_hour_ms` on.
pub async fn platform_recent(c: &impl ConnectionTrait, since_hour_ms: i64) -> Result<PlatformRecent, DbErr> {
    let b = c.get_database_backend();
    let sql = format!(
        "SELECT {}, {} AS tokens FROM usage_rollups_platform WHERE hour_ms >= ?",
        sums(b, &["requests", "paid_credits", "platform_credits"]),
        sum(b, "prompt_tokens + completion_tokens")
    );
    let row = PlatformRecent::find_by_statement(statement(c, sql, vec![since_hour_ms.into()])).one(c).await?;
    Ok(row.unwrap_or_default())
}

#[derive(Debug, FromQueryResult)]
struct Count {
    n: i64,
}

/// Journal entries posted from `since_ms` on.
pub async fn journal_entries_since(c: &impl ConnectionTrait, since_ms: i64) -> Result<i64, DbErr> {
    let sql = "SELECT COUNT(*) AS n FROM journal_entries WHERE created_at_ms >= ?".to_string();
    Ok(Count::find_by_statement(statement(c, sql, vec![since_ms.into()])).one(c).await?.map_or(0, |r| r.n))
}

#[derive(Clone, Debug, Default, PartialEq, Eq, FromQueryResult)]
pub struct Orders {
    pub total: i64,
    pub active: i64,
    pub completed: i64,
    /// Escrows with any dispute: of the escrow itself, or of a request paid from it.
    pub disputed: i64,
}

/// Escrows by state.
pub async fn orders(c: &impl ConnectionTrait) -> Result<Orders, DbErr> {
    let b = c.get_database_backend();
    let sql = format!(
        "SELECT COUNT(*) AS total, {} AS active, {} AS completed, \
         (SELECT COUNT(DISTINCT d.escrow_id) FROM disputes d JOIN escrows x ON x.id = d.escrow_id) AS disputed \
         FROM escrows",
        sum(b, "CASE WHEN status = 'active' THEN 1 ELSE 0 END"),
        sum(b, "CASE WHEN status IN ('exhausted', 'released', 'expired') THEN 1 ELSE 0 END"),
    );
    Ok(Orders::find_by_statement(statement(c, sql, vec![])).one(c).await?.unwrap_or_default())
}

#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct StatusCount {
    pub status: String,
    pub n: i64,
    /// Credits refunded (disputes only; 0 for keys).
    pub credits: i64,
}

/// Seller-pool keys per status.
pub async fn seller_keys_by_status(c: &impl ConnectionTrait) -> Result<Vec<StatusCount>, DbErr> {
    let sql = "SELECT status, COUNT(*) AS n, 0 AS credits FROM hosted_keys WHERE pool = 'seller' \
               GROUP BY status ORDER BY status"
        .to_string();
    StatusCount::find_by_statement(statement(c, sql, vec![])).all(c).await
}

/// Disputes per status, with what they refunded.
pub async fn disputes_by_status(c: &impl ConnectionTrait) -> Result<Vec<StatusCount>, DbErr> {
    let sql = format!(
        "SELECT status, COUNT(*) AS n, {} AS credits FROM disputes GROUP BY status ORDER BY status",
        sum(c.get_database_backend(), "refunded_credits")
    );
    StatusCount::find_by_statement(statement(c, sql, vec![])).all(c).await
}

// ---------------------------------------------------------------------------------------------------------
// A buyer

#[derive(Clone, Debug, Default, PartialEq, Eq, FromQueryResult)]
pub struct Totals {
    pub requests: i64,
    /// Buyers: what their funds paid. Sellers: what their keys earned.
    pub credits: i64,
}

/// The buyer's requests and what their funds paid, in the hours.
pub async fn buyer_totals(c: &impl ConnectionTrait, buyer_id: i64, hours: Hours) -> Result<Totals, DbErr> {
    let b = c.get_database_backend();
    let sql = format!(
        "SELECT {} AS requests, {} AS credits FROM usage_rollups_buyer \
         WHERE buyer_id = ? AND hour_ms >= ? AND hour_ms <= ?",
        sum(b, "requests"),
        sum(b, "paid_credits")
    );
    let values = vec![buyer_id.into(), hours.from_ms.into(), hours.to_ms.into()];
    Ok(Totals::find_by_statement(statement(c, sql, values)).one(c).await?.unwrap_or_default())
}

#[derive(Clone, Debug, Default, PartialEq, Eq, FromQueryResult, Serialize, ToSchema)]
pub struct BuyerModelUsage {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_credits: i64,
}

const USAGE_COLUMNS: [&str; 4] = ["requests", "prompt_tokens", "completion_tokens", "cost_credits"];

/// The buyer's usage per model in the hours, by requests (most first).
pub async fn buyer_by_model(
    c: &impl ConnectionTrait,
    buyer_id: i64,
    hours: Hours,
) -> Result<Vec<BuyerModelUsage>, DbErr> {
    let sql = format!(
        "SELECT * FROM (SELECT model, {} FROM usage_rollups_buyer WHERE buyer_id = ? AND hour_ms >= ? \
         AND hour_ms <= ? GROUP BY model) q ORDER BY q.requests DESC, q.model",
        sums(c.get_database_backend(), &USAGE_COLUMNS)
    );
    let values = vec![buyer_id.into(), hours.from_ms.into(), hours.to_ms.into()];
    BuyerModelUsage::find_by_statement(statement(c, sql, values)).all(c).await
}

#[derive(Clone, Debug, Default, PartialEq, Eq, FromQueryResult, Serialize, ToSchema)]
pub struct BuyerKeyUsage {
    pub buyer_key_id: i64,
    pub name: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_credits: i64,
}

/// The buyer's usage per key in the hours (keys with usage only), by requests (most first).
pub async fn buyer_by_key(c: &impl ConnectionTrait, buyer_id: i64, hours: Hours) -> Result<Vec<BuyerKeyUsage>, DbErr> {
    let sql = format!(
        "SELECT q.buyer_key_id AS buyer_key_id, COALESCE(k.name, '') AS name, q.requests AS requests, \
         q.prompt_tokens AS prompt_tokens, q.completion_tokens AS completion_tokens, \
         q.cost_credits AS cost_credits FROM (SELECT buyer_key_id, {} FROM usage_rollups_buyer \
         WHERE buyer_id = ? AND hour_ms >= ? AND hour_ms <= ? GROUP BY buyer_key_id) q \
         LEFT JOIN buyer_keys k ON k.id = q.buyer_key_id ORDER BY q.requests DESC, q.buyer_key_id",
        sums(c.get_database_backend(), &USAGE_COLUMNS)
    );
    let values = vec![buyer_id.into(), hours.from_ms.into(), hours.to_ms.into()];
    BuyerKeyUsage::find_by_statement(statement(c, sql, values)).all(c).await
}

#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult, Serialize, ToSchema)]
pub struct BuyerEscrowUsage {
    pub id: i64,
    /// None: any model.
    pub model: Option<String>,
    /// Funded.
    pub amount: i64,
    /// Settled from the escrow's holds.
    pub spent: i64,
    /// Still in the escrow (credits a gateway holds from it are in neither).
    pub remaining: i64,
    pub status: String,
    pub created_at_ms: i64,
}

/// The buyer's escrows, newest first.
pub async fn buyer_escrows(c: &impl ConnectionTrait, buyer_id: i64) -> Result<Vec<BuyerEscrowUsage>, DbErr> {
    let sql = format!(
        "SELECT e.id AS id, e.model AS model, e.amount AS amount, \
         (SELECT {} FROM holds h WHERE h.source_account_id = e.account_id) AS spent, a.balance AS remaining, \
         e.status AS status, e.created_at_ms AS created_at_ms \
         FROM escrows e JOIN accounts a ON a.id = e.account_id WHERE e.buyer_id = ? ORDER BY e.id DESC",
        sum(c.get_database_backend(), "h.spent")
    );
    BuyerEscrowUsage::find_by_statement(statement(c, sql, vec![buyer_id.into()])).all(c).await
}

// ---------------------------------------------------------------------------------------------------------
// A seller

/// Requests the seller's keys served and what they earned, in the hours.
pub async fn seller_totals(c: &impl ConnectionTrait, owner_id: i64, hours: Hours) -> Result<Totals, DbErr> {
    let b = c.get_database_backend();
    let sql = format!(
        "SELECT {} AS requests, {} AS credits FROM usage_rollups_seller \
         WHERE owner_id = ? AND hour_ms >= ? AND hour_ms <= ?",
        sum(b, "requests"),
        sum(b, "seller_credits")
    );
    let values = vec![owner_id.into(), hours.from_ms.into(), hours.to_ms.into()];
    Ok(Totals::find_by_statement(statement(c, sql, values)).one(c).await?.unwrap_or_default())
}

#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult, Serialize, ToSchema)]
pub struct SellerKeyUsage {
    pub id: i64,
    pub name: String,
    pub provider: String,
    pub status: String,
    pub review: String,
    /// In the range.
    pub requests: i64,
    pub failed_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub earned_credits: i64,
    /// The key's lifetime counts of successful and failed upstream attempts.
    pub success_count: i64,
    pub failure_count: i64,
    pub remaining_balance: i64,
    pub last_used_at_ms: Option<i64>,
}

/// Every key the seller owns (also those without usage), with its usage in the hours, by id.
pub async fn seller_keys(c: &impl ConnectionTrait, owner_id: i64, hours: Hours) -> Result<Vec<SellerKeyUsage>, DbErr> {
    let sql = format!(
        "SELECT k.id AS id, k.name AS name, k.provider AS provider, k.status AS status, k.review AS review, \
         COALESCE(q.requests, 0) AS requests, COALESCE(q.failed_requests, 0) AS failed_requests, \
         COALESCE(q.prompt_tokens, 0) AS prompt_tokens, COALESCE(q.completion_tokens, 0) AS completion_tokens, \
         COALESCE(q.seller_credits, 0) AS earned_credits, k.success_count AS success_count, \
         k.failure_count AS failure_count, k.remaining_balance AS remaining_balance, \
         k.last_used_at_ms AS last_used_at_ms \
         FROM hosted_keys k LEFT JOIN (SELECT hosted_key_id, {} FROM usage_rollups_seller \
         WHERE owner_id = ? AND hour_ms >= ? AND hour_ms <= ? GROUP BY hosted_key_id) q ON q.hosted_key_id = k.id \
         WHERE k.owner_id = ? ORDER BY k.id",
        sums(
            c.get_database_backend(),
            &["requests", "failed_requests", "prompt_tokens", "completion_tokens", "seller_credits"]
        )
    );
    let values = vec![owner_id.into(), hours.from_ms.into(), hours.to_ms.into(), owner_id.into()];
    SellerKeyUsage::find_by_statement(statement(c, sql, values)).all(c).await
}

// ---------------------------------------------------------------------------------------------------------
// Time series

#[derive(Clone, Debug, Default, PartialEq, Eq, FromQueryResult, Serialize, ToSchema)]
pub struct TimeSeriesPoint {
    /// The bucket's start (ms since the epoch, UTC).
    pub t: i64,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// What the requests cost their buyers.
    pub spend_credits: i64,
    /// The platform's share (platform scope), the seller's share (seller scope), 0 (buyer scope).
    pub earnings_credits: i64,
}

/// Sums per bucket of `bucket_ms` (a multiple of an hour; UTC, buckets start at multiples of it), only
/// buckets with rows, oldest first. Earnings are the platform's share (platform), the sellers' share
/// (seller), or 0 (buyer).
pub async fn series(
    c: &impl ConnectionTrait,
    subject: Subject,
    bucket_ms: i64,
    hours: Hours,
    model: Option<&str>,
) -> Result<Vec<TimeSeriesPoint>, DbErr> {
    let b = c.get_database_backend();
    let mut values: Vec<Value> = Vec::new();
    let (table, earnings, owner) = match subject {
        Subject::Platform => ("usage_rollups_platform", "platform_credits", None),
        Subject::Buyer(id) => ("usage_rollups_buyer", "0", Some(("buyer_id", id))),
        Subject::Seller(id) => ("usage_rollups_seller", "seller_credits", Some(("owner_id", id))),
    };
    let mut filter = String::new();
    if let Some((column, id)) = owner {
        filter.push_str(&format!("{column} = ? AND "));
        values.push(id.into());
    }
    filter.push_str("hour_ms >= ? AND hour_ms <= ?");
    values.extend([hours.from_ms.into(), hours.to_ms.into()]);
    if let Some(model) = model {
        filter.push_str(" AND model = ?");
        values.push(model.into());
    }
    // `bucket_ms` is an integer of ours, never caller text.
    let bucket = format!("hour_ms - hour_ms % {bucket_ms}");
    let sql = format!(
        "SELECT {bucket} AS t, {}, {} AS spend_credits, {} AS earnings_credits FROM {table} WHERE {filter} \
         GROUP BY {bucket} ORDER BY t",
        sums(b, &["requests", "prompt_tokens", "completion_tokens"]),
        sum(b, "cost_credits"),
        sum(b, earnings),
    );
    TimeSeriesPoint::find_by_statement(statement(c, sql, values)).all(c).await
}

// ---------------------------------------------------------------------------------------------------------
// Exports

/// Rows per export query.
pub const EXPORT_PAGE: u64 = 1_000;

/// Inclusive bounds on `created_at_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

impl Period {
    fn push(&self, column: &str, filter: &mut Vec<String>, values: &mut Vec<Value>) {
        if let Some(from) = self.from_ms {
            filter.push(format!("{column} >= ?"));
            values.push(from.into());
        }
        if let Some(to) = self.to_ms {
            filter.push(format!("{column} <= ?"));
            values.push(to.into());
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct UsageExportRow {
    pub id: i64,
    pub request_id: String,
    pub created_at_ms: i64,
    pub model: String,
    pub endpoint: String,
    pub buyer_id: i64,
    pub buyer_key_id: i64,
    pub hosted_key_id: Option<i64>,
    pub status_code: i32,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub estimated: bool,
    pub cost_credits: i64,
    pub unpaid_credits: i64,
    pub fallback: bool,
    pub attempts: i32,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
}

/// The next page of usage records after the record `after_id`, in id order.
pub async fn usage_page(
    c: &impl ConnectionTrait,
    subject: Subject,
    period: Period,
    after_id: i64,
    limit: u64,
) -> Result<Vec<UsageExportRow>, DbErr> {
    let mut filter = vec!["id > ?".to_string()];
    let mut values: Vec<Value> = vec![after_id.into()];
    match subject {
        Subject::Platform => {}
        Subject::Buyer(id) => {
            filter.push("buyer_id = ?".into());
            values.push(id.into());
        }
        Subject::Seller(id) => {
            filter.push("hosted_key_id IN (SELECT k.id FROM hosted_keys k WHERE k.owner_id = ?)".into());
            values.push(id.into());
        }
    }
    period.push("created_at_ms", &mut filter, &mut values);
    let sql = format!(
        "SELECT id, request_id, created_at_ms, model, endpoint, buyer_id, buyer_key_id, hosted_key_id, \
         status_code, prompt_tokens, completion_tokens, estimated, cost_credits, unpaid_credits, fallback, \
         attempts, latency_ms, ttft_ms FROM usage_records WHERE {} ORDER BY id LIMIT {}",
        filter.join(" AND "),
        limit.min(EXPORT_PAGE)
    );
    UsageExportRow::find_by_statement(statement(c, sql, values)).all(c).await
}

#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct PostingExportRow {
    pub posting_id: i64,
    pub entry_id: i64,
    pub created_at_ms: i64,
    pub kind: String,
    pub request_id: Option<String>,
    pub account_id: i64,
    pub account_kind: String,
    pub amount: i64,
    pub memo: Option<String>,
}

/// The next page of postings after the posting `after_id`, in id order: all of them (platform), those on
/// the buyer's wallet, escrow and hold accounts, or those on the seller's wallet.
pub async fn postings_page(
    c: &impl ConnectionTrait,
    subject: Subject,
    period: Period,
    after_id: i64,
    limit: u64,
) -> Result<Vec<PostingExportRow>, DbErr> {
    let mut filter = vec!["p.id > ?".to_string()];
    let mut values: Vec<Value> = vec![after_id.into()];
    let accounts = |kinds: &str| {
        format!("p.account_id IN (SELECT x.id FROM accounts x WHERE x.owner_id = ? AND x.kind IN ({kinds}))")
    };
    match subject {
        Subject::Platform => {}
        Subject::Buyer(id) => {
            filter.push(accounts("'wallet', 'escrow', 'hold'"));
            values.push(id.into());
        }
        Subject::Seller(id) => {
            filter.push(accounts("'wallet'"));
            values.push(id.into());
        }
    }
    period.push("p.created_at_ms", &mut filter, &mut values);
    let sql = format!(
        "SELECT p.id AS posting_id, p.entry_id AS entry_id, p.created_at_ms AS created_at_ms, e.kind AS kind, \
         e.request_id AS request_id, p.account_id AS account_id, a.kind AS account_kind, p.amount AS amount, \
         e.memo AS memo FROM postings p JOIN journal_entries e ON e.id = p.entry_id \
         JOIN accounts a ON a.id = p.account_id WHERE {} ORDER BY p.id LIMIT {}",
        filter.join(" AND "),
        limit.min(EXPORT_PAGE)
    );
    PostingExportRow::find_by_statement(statement(c, sql, values)).all(c).await
}
