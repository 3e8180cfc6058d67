//! Reports, time series and CSV exports (docs/reports.md): who may see what, the validation of every
//! parameter, and the shapes of the answers. The sums come from the database (`db::analytics`, over the
//! hourly rollups the usage writer keeps); the exports stream pages of rows, never all of them at once.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sea_orm::{DatabaseConnection, DbErr};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::accounts::{self, Role};
use crate::db::analytics::{
    self as q, BuyerEscrowUsage, BuyerKeyUsage, BuyerModelUsage, Hours, Period, PlatformModelUsage, PostingExportRow,
    SellerKeyUsage, Subject, TimeSeriesPoint, UsageExportRow,
};
use crate::db::entities::users;
use crate::db::rollups::{hour_of, HOUR_MS};

pub const DAY_MS: i64 = 86_400_000;
/// The most points one time series may have.
pub const MAX_BUCKETS: i64 = 2_000;
pub const MAX_WINDOW_DAYS: u32 = 90;
pub const DEFAULT_WINDOW_DAYS: u32 = 7;
/// The time series' default spans, back from `to`.
const DEFAULT_HOURLY_SPAN_MS: i64 = 48 * HOUR_MS;
const DEFAULT_DAILY_SPAN_MS: i64 = 30 * DAY_MS;
const MAX_MODEL_CHARS: usize = crate::openai::request::MAX_MODEL_CHARS;

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("{message}")]
    Invalid { message: String },
    #[error("this report needs the {role} role")]
    Forbidden { role: Role },
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

fn invalid(message: impl Into<String>) -> AnalyticsError {
    AnalyticsError::Invalid { message: message.into() }
}

// ---------------------------------------------------------------------------------------------------------
// Scopes and ranges

/// Whose data a time series or an export covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReportScope {
    /// Everything (admins only).
    Platform,
    /// The caller's own requests (buyers).
    Buyer,
    /// Requests served by the caller's keys (sellers).
    Seller,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn bucket_ms(self) -> i64 {
        match self {
            Self::Hour => HOUR_MS,
            Self::Day => DAY_MS,
        }
    }
}

/// The scope asked for, or the caller's default (platform for admins, else buyer, else seller), checked
/// against the caller's roles.
pub fn resolve_scope(user: &users::Model, requested: Option<ReportScope>) -> Result<ReportScope, AnalyticsError> {
    let roles = accounts::roles_of(user);
    let scope = match requested {
        Some(scope) => scope,
        None if roles.contains(&Role::Admin) => ReportScope::Platform,
        None if roles.contains(&Role::Buyer) => ReportScope::Buyer,
        None => ReportScope::Seller,
    };
    let role = match scope {
        ReportScope::Platform => Role::Admin,
        ReportScope::Buyer => Role::Buyer,
        ReportScope::Seller => Role::Seller,
    };
    if roles.contains(&role) {
        Ok(scope)
    } else {
        Err(AnalyticsError::Forbidden { role })
    }
}

fn subject(scope: ReportScope, user: &users::Model) -> Subject {
    match scope {
        ReportScope::Platform => Subject::Platform,
        ReportScope::Buyer => Subject::Buyer(user.id),
        ReportScope::Seller => Subject::Seller(user.id),
    }
}

/// Optional `from`/`to` (ms since the epoch): neither negative, `from` not after `to`.
pub fn period(from: Option<i64>, to: Option<i64>) -> Result<Period, AnalyticsError> {
    for (name, value) in [("from", from), ("to", to)] {
        if value.is_some_and(|v| v < 0) {
            return Err(invalid(format!("{name} must be a time in milliseconds since the epoch (not negative)")));
        }
    }
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            return Err(invalid(format!("from ({from}) is after to ({to})")));
        }
    }
    Ok(Period { from_ms: from, to_ms: to })
}

/// The rollup hours of a period: those starting from the hour of `from` up to `to`.
fn hours_of(period: Period) -> Hours {
    Hours { from_ms: period.from_ms.map_or(i64::MIN, hour_of), to_ms: period.to_ms.unwrap_or(i64::MAX) }
}

// ---------------------------------------------------------------------------------------------------------
// The platform report

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct PlatformOrders {
    /// Escrows ever funded.
    pub total: i64,
    pub active: i64,
    /// Exhausted, released or expired.
    pub completed: i64,
    /// Escrows with a dispute of their own or of a request they paid for.
    pub disputed: i64,
    /// disputed / total, in basis points.
    pub dispute_rate_bps: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct PlatformRecent {
    /// Paid by buyers in the window.
    pub volume_credits: i64,
    /// Journal entries posted in the window.
    pub transactions: i64,
    pub requests: i64,
    /// Prompt and completion tokens.
    pub tokens: i64,
    /// The platform's share of what was paid.
    pub platform_credits: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct PlatformKeys {
    /// Seller-pool keys that are active.
    pub active: i64,
    /// Seller-pool keys per status.
    pub by_status: BTreeMap<String, i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct PlatformFallback {
    /// Requests served by a platform fallback key, all time.
    pub requests: i64,
    pub total_requests: i64,
    pub share_bps: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct PlatformDisputes {
    pub open: i64,
    pub refunded: i64,
    pub rejected: i64,
    pub refunded_credits: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct PlatformReport {
    pub generated_at_ms: i64,
    /// Days of the `recent` window (whole hours: from the start of the hour `window_days` ago).
    pub window_days: u32,
    pub orders: PlatformOrders,
    pub recent: PlatformRecent,
    pub keys: PlatformKeys,
    /// All time, by requests (most first).
    pub by_model: Vec<PlatformModelUsage>,
    pub fallback: PlatformFallback,
    pub disputes: PlatformDisputes,
}

/// `part / whole` in basis points (0 for an empty whole).
fn bps(part: i64, whole: i64) -> i64 {
    if whole <= 0 {
        return 0;
    }
    i64::try_from(i128::from(part) * 10_000 / i128::from(whole)).unwrap_or(i64::MAX)
}

pub async fn platform_report(
    db: &DatabaseConnection,
    days: Option<u32>,
    now_ms: i64,
) -> Result<PlatformReport, AnalyticsError> {
    let days = days.unwrap_or(DEFAULT_WINDOW_DAYS);
    if !(1..=MAX_WINDOW_DAYS).contains(&days) {
        return Err(invalid(format!("days must be between 1 and {MAX_WINDOW_DAYS}")));
    }
    let since = hour_of(now_ms.saturating_sub(i64::from(days) * DAY_MS));
    let orders = q::orders(db).await?;
    let recent = q::platform_recent(db, since).await?;
    let transactions = q::journal_entries_since(db, since).await?;
    let by_status: BTreeMap<String, i64> =
        q::seller_keys_by_status(db).await?.into_iter().map(|s| (s.status, s.n)).collect();
    let by_model = q::platform_by_model(db).await?;
    let disputes = q::disputes_by_status(db).await?;
    let dispute = |status: &str| disputes.iter().find(|d| d.status == status).map_or(0, |d| d.n);
    // One row per model: summing them here is not loading usage.
    let total_requests: i64 = by_model.iter().map(|m| m.requests).sum();
    let fallback_requests: i64 = by_model.iter().map(|m| m.fallback_requests).sum();
    Ok(PlatformReport {
        generated_at_ms: now_ms,
        window_days: days,
        orders: PlatformOrders {
            total: orders.total,
            active: orders.active,
            completed: orders.completed,
            disputed: orders.disputed,
            dispute_rate_bps: bps(orders.disputed, orders.total),
        },
        recent: PlatformRecent {
            volume_credits: recent.paid_credits,
            transactions,
            requests: recent.requests,
            tokens: recent.tokens,
            platform_credits: recent.platform_credits,
        },
        keys: PlatformKeys { active: by_status.get(accounts::status::ACTIVE).copied().unwrap_or(0), by_status },
        by_model,
        fallback: PlatformFallback {
            requests: fallback_requests,
            total_requests,
            share_bps: bps(fallback_requests, total_requests),
        },
        disputes: PlatformDisputes {
            open: dispute("open"),
            refunded: dispute("refunded"),
            rejected: dispute("rejected"),
            refunded_credits: disputes.iter().map(|d| d.credits).sum(),
        },
    })
}

// ---------------------------------------------------------------------------------------------------------
// A user's report

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct BuyerReport {
    /// What the buyer's funds paid in the range (cost less what they could not cover).
    pub spent_credits: i64,
    pub requests: i64,
    /// By requests (most first).
    pub by_model: Vec<BuyerModelUsage>,
    /// Keys with requests in the range, by requests (most first).
    pub by_key: Vec<BuyerKeyUsage>,
    /// Every escrow of the buyer (whatever the range), newest first.
    pub escrows: Vec<BuyerEscrowUsage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct SellerReport {
    /// Earned in the range.
    pub earned_credits: i64,
    /// Earned from the start of the hour 7 days ago.
    pub earned_last_7_days: i64,
    /// Requests the seller's keys served in the range.
    pub requests: i64,
    /// Every key the seller owns, also those without usage, by id.
    pub keys: Vec<SellerKeyUsage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct UserReport {
    /// Null unless the caller is a buyer.
    pub buyer: Option<BuyerReport>,
    /// Null unless the caller is a seller.
    pub seller: Option<SellerReport>,
}

pub async fn user_report(
    db: &DatabaseConnection,
    user: &users::Model,
    from: Option<i64>,
    to: Option<i64>,
    now_ms: i64,
) -> Result<UserReport, AnalyticsError> {
    let roles = accounts::roles_of(user);
    let (is_buyer, is_seller) = (roles.contains(&Role::Buyer), roles.contains(&Role::Seller));
    if !is_buyer && !is_seller {
        return Err(AnalyticsError::Forbidden { role: Role::Buyer });
    }
    let hours = hours_of(period(from, to)?);
    let buyer = if is_buyer {
        let totals = q::buyer_totals(db, user.id, hours).await?;
        Some(BuyerReport {
            spent_credits: totals.credits,
            requests: totals.requests,
            by_model: q::buyer_by_model(db, user.id, hours).await?,
            by_key: q::buyer_by_key(db, user.id, hours).await?,
            escrows: q::buyer_escrows(db, user.id).await?,
        })
    } else {
        None
    };
    let seller = if is_seller {
        let totals = q::seller_totals(db, user.id, hours).await?;
        let week = Hours { from_ms: hour_of(now_ms.saturating_sub(7 * DAY_MS)), to_ms: i64::MAX };
        Some(SellerReport {
            earned_credits: totals.credits,
            earned_last_7_days: q::seller_totals(db, user.id, week).await?.credits,
            requests: totals.requests,
            keys: q::seller_keys(db, user.id, hours).await?,
        })
    } else {
        None
    };
    Ok(UserReport { buyer, seller })
}

// ---------------------------------------------------------------------------------------------------------
// Time series

/// What a time series asks for, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesRequest {
    pub granularity: Granularity,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub model: Option<String>,
    pub scope: Option<ReportScope>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct TimeSeries {
    pub granularity: Granularity,
    pub scope: ReportScope,
    /// The first bucket's start: `from` rounded down to the bucket.
    pub from: i64,
    pub to: i64,
    pub model: Option<String>,
    /// Every bucket from `from` to `to`, empty ones included, oldest first.
    pub points: Vec<TimeSeriesPoint>,
}

/// The buckets' starts from the bucket of `from` to that of `to`; at most `MAX_BUCKETS`.
fn buckets(from: i64, to: i64, bucket_ms: i64) -> Result<(i64, i64), AnalyticsError> {
    let first = from - from.rem_euclid(bucket_ms);
    let last = to - to.rem_euclid(bucket_ms);
    let n = (i128::from(last) - i128::from(first)) / i128::from(bucket_ms) + 1;
    if n > i128::from(MAX_BUCKETS) {
        return Err(invalid(format!(
            "the range spans {n} buckets; at most {MAX_BUCKETS} (narrow from/to or use a coarser granularity)"
        )));
    }
    Ok((first, last))
}

pub async fn timeseries(
    db: &DatabaseConnection,
    user: &users::Model,
    req: SeriesRequest,
    now_ms: i64,
) -> Result<TimeSeries, AnalyticsError> {
    let scope = resolve_scope(user, req.scope)?;
    if let Some(model) = &req.model {
        if model.is_empty() || model.chars().count() > MAX_MODEL_CHARS {
            return Err(invalid(format!("model must have 1 to {MAX_MODEL_CHARS} characters")));
        }
    }
    let bucket_ms = req.granularity.bucket_ms();
    let to = req.to.unwrap_or(now_ms);
    let span = match req.granularity {
        Granularity::Hour => DEFAULT_HOURLY_SPAN_MS,
        Granularity::Day => DEFAULT_DAILY_SPAN_MS,
    };
    let from = req.from.unwrap_or_else(|| to.saturating_sub(span).max(0));
    period(Some(from), Some(to))?;
    let (first, last) = buckets(from, to, bucket_ms)?;
    let hours = Hours { from_ms: first, to_ms: to };
    let rows = q::series(db, subject(scope, user), bucket_ms, hours, req.model.as_deref()).await?;
    Ok(TimeSeries {
        granularity: req.granularity,
        scope,
        from: first,
        to,
        model: req.model,
        points: dense(rows, first, last, bucket_ms),
    })
}

/// Every bucket from `first` to `last`, taking the sums of those the database returned (oldest first).
fn dense(rows: Vec<TimeSeriesPoint>, first: i64, last: i64, bucket_ms: i64) -> Vec<TimeSeriesPoint> {
    let mut rows = rows.into_iter().peekable();
    let mut points = Vec::new();
    let mut t = first;
    while t <= last {
        match rows.next_if(|r| r.t == t) {
            Some(row) => points.push(row),
            None => points.push(TimeSeriesPoint { t, ..TimeSeriesPoint::default() }),
        }
        // Rows outside the buckets cannot come back (the query is bounded by them); skip any anyway.
        while rows.next_if(|r| r.t <= t).is_some() {}
        t += bucket_ms;
    }
    points
}

// ---------------------------------------------------------------------------------------------------------
// CSV exports

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportKind {
    Usage,
    Transactions,
}

impl ExportKind {
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Usage => "usage.csv",
            Self::Transactions => "transactions.csv",
        }
    }

    fn header(self) -> &'static str {
        match self {
            Self::Usage => {
                "request_id,created_at_ms,model,endpoint,buyer_id,buyer_key_id,hosted_key_id,status_code,\
                 prompt_tokens,completion_tokens,estimated,cost_credits,unpaid_credits,fallback,attempts,\
                 latency_ms,ttft_ms\r\n"
            }
            Self::Transactions => {
                "posting_id,entry_id,created_at_ms,kind,request_id,account_id,account_kind,amount,memo\r\n"
            }
        }
    }
}

/// An RFC 4180 field: quoted when it holds a comma, a quote or a line break, quotes doubled. A text that
/// a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first) gets a leading `'` (OWASP's
/// advice for CSV injection): model names and memos are caller text.
fn push_text(out: &mut String, value: &str) {
    let neutralised;
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutralised = format!("'{value}");
        neutralised.as_str()
    } else {
        value
    };
    if value.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// One CSV line (CRLF-terminated, as RFC 4180 has it).
fn push_line(out: &mut String, fields: &[Field<'_>]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match field {
            Field::Int(v) => out.push_str(&v.to_string()),
            Field::OptInt(v) => {
                if let Some(v) = v {
                    out.push_str(&v.to_string());
                }
            }
            Field::Bool(v) => out.push_str(if *v { "true" } else { "false" }),
            Field::Text(v) => push_text(out, v),
            Field::OptText(v) => push_text(out, v.unwrap_or("")),
        }
    }
    out.push_str("\r\n");
}

enum Field<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Bool(bool),
    Text(&'a str),
    OptText(Option<&'a str>),
}

fn usage_line(out: &mut String, r: &UsageExportRow) {
    push_line(
        out,
        &[
            Field::Text(&r.request_id),
            Field::Int(r.created_at_ms),
            Field::Text(&r.model),
            Field::Text(&r.endpoint),
            Field::Int(r.buyer_id),
            Field::Int(r.buyer_key_id),
            Field::OptInt(r.hosted_key_id),
            Field::Int(i64::from(r.status_code)),
            Field::Int(r.prompt_tokens),
            Field::Int(r.completion_tokens),
            Field::Bool(r.estimated),
            Field::Int(r.cost_credits),
            Field::Int(r.unpaid_credits),
            Field::Bool(r.fallback),
            Field::Int(i64::from(r.attempts)),
            Field::Int(r.latency_ms),
            Field::OptInt(r.ttft_ms),
        ],
    );
}

fn posting_line(out: &mut String, r: &PostingExportRow) {
    push_line(
        out,
        &[
            Field::Int(r.posting_id),
            Field::Int(r.entry_id),
            Field::Int(r.created_at_ms),
            Field::Text(&r.kind),
            Field::OptText(r.request_id.as_deref()),
            Field::Int(r.account_id),
            Field::Text(&r.account_kind),
            Field::Int(r.amount),
            Field::OptText(r.memo.as_deref()),
        ],
    );
}

/// Where an export goes on from: the id of the last row sent, or None when the last page was short.
type Cursor = Option<i64>;

/// One page of CSV lines after `after`, and where the next page starts.
async fn page(
    db: &DatabaseConnection,
    kind: ExportKind,
    subject: Subject,
    period: Period,
    after: i64,
) -> Result<(String, Cursor), DbErr> {
    let mut out = String::new();
    let (rows, last) = match kind {
        ExportKind::Usage => {
            let rows = q::usage_page(db, subject, period, after, q::EXPORT_PAGE).await?;
            rows.iter().for_each(|r| usage_line(&mut out, r));
            (rows.len(), rows.last().map(|r| r.id))
        }
        ExportKind::Transactions => {
            let rows = q::postings_page(db, subject, period, after, q::EXPORT_PAGE).await?;
            rows.iter().for_each(|r| posting_line(&mut out, r));
            (rows.len(), rows.last().map(|r| r.posting_id))
        }
    };
    let full = u64::try_from(rows).unwrap_or(u64::MAX) >= q::EXPORT_PAGE;
    Ok((out, if full { last } else { None }))
}

/// A CSV export as a stream of chunks: the header row with the first page, then one chunk per page of
/// 1,000 rows (keyset pagination by id, so rows written meanwhile neither repeat nor shift pages). The
/// first page is read before the answer starts, so a database that is down is a JSON error; an error
/// later ends the stream with an error, which cuts the response short (the client sees an incomplete
/// transfer, never a silently truncated file).
pub async fn export(
    db: DatabaseConnection,
    kind: ExportKind,
    user: &users::Model,
    scope: Option<ReportScope>,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static, AnalyticsError> {
    let subject = subject(resolve_scope(user, scope)?, user);
    let period = period(from, to)?;
    let (first, next) = page(&db, kind, subject, period, 0).await?;
    let head = Bytes::from(format!("{}{first}", kind.header()));
    let rest = futures::stream::unfold((db, next), move |(db, cursor)| async move {
        let after = cursor?;
        match page(&db, kind, subject, period, after).await {
            Ok((lines, _)) if lines.is_empty() => None,
            Ok((lines, next)) => Some((Ok(Bytes::from(lines)), (db, next))),
            Err(e) => {
                tracing::error!(error = %e, export = kind.file_name(), "a CSV export failed midway");
                Some((Err(std::io::Error::other(e.to_string())), (db, None)))
            }
        }
    });
    Ok(futures::stream::once(async move { Ok(head) }).chain(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(roles: &str) -> users::Model {
        users::Model {
            id: 7,
            username: "u".into(),
            password_hash: String::new(),
            roles: roles.into(),
            disabled: false,
            wallet_pays: true,
            created_at_ms: 0,
        }
    }

    #[test]
    fn scopes_default_by_role_and_need_the_role() {
        assert_eq!(resolve_scope(&user("admin,buyer"), None).unwrap(), ReportScope::Platform);
        assert_eq!(resolve_scope(&user("buyer,seller"), None).unwrap(), ReportScope::Buyer);
        assert_eq!(resolve_scope(&user("seller"), None).unwrap(), ReportScope::Seller);
        assert_eq!(resolve_scope(&user("admin,seller"), Some(ReportScope::Seller)).unwrap(), ReportScope::Seller);
        for (roles, scope, role) in [
            ("buyer", Some(ReportScope::Platform), Role::Admin),
            ("buyer", Some(ReportScope::Seller), Role::Seller),
            ("admin", Some(ReportScope::Buyer), Role::Buyer),
            ("", None, Role::Seller),
        ] {
            let err = resolve_scope(&user(roles), scope).unwrap_err();
            assert!(matches!(err, AnalyticsError::Forbidden { role: r } if r == role), "{roles}: {err}");
        }
    }

    #[test]
    fn periods_are_checked() {
        assert_eq!(period(None, None).unwrap(), Period { from_ms: None, to_ms: None });
        assert_eq!(period(Some(5), Some(5)).unwrap(), Period { from_ms: Some(5), to_ms: Some(5) });
        for (from, to) in [(Some(6), Some(5)), (Some(-1), None), (None, Some(-1))] {
            let err = period(from, to).unwrap_err();
            assert!(matches!(err, AnalyticsError::Invalid { .. }), "{err}");
        }
        let hours = hours_of(Period { from_ms: Some(HOUR_MS + 5), to_ms: None });
        assert_eq!(hours, Hours { from_ms: HOUR_MS, to_ms: i64::MAX });
    }

    #[test]
    fn buckets_are_bounded() {
        assert_eq!(buckets(HOUR_MS + 1, 3 * HOUR_MS - 1, HOUR_MS).unwrap(), (HOUR_MS, 2 * HOUR_MS));
        assert_eq!(buckets(0, (MAX_BUCKETS - 1) * HOUR_MS, HOUR_MS).unwrap().1, (MAX_BUCKETS - 1) * HOUR_MS);
        assert!(buckets(0, MAX_BUCKETS * HOUR_MS, HOUR_MS).is_err());
        assert!(buckets(0, i64::MAX, DAY_MS).is_err());
        assert_eq!(buckets(DAY_MS + 7, DAY_MS + 8, DAY_MS).unwrap(), (DAY_MS, DAY_MS));
    }

    #[test]
    fn series_are_dense() {
        let point = |t: i64, requests: i64| TimeSeriesPoint { t, requests, ..TimeSeriesPoint::default() };
        let points = dense(vec![point(HOUR_MS, 3), point(3 * HOUR_MS, 4)], 0, 4 * HOUR_MS, HOUR_MS);
        let got: Vec<(i64, i64)> = points.iter().map(|p| (p.t / HOUR_MS, p.requests)).collect();
        assert_eq!(got, [(0, 0), (1, 3), (2, 0), (3, 4), (4, 0)]);
        assert_eq!(dense(vec![], 0, 0, DAY_MS).len(), 1);
    }

    #[test]
    fn csv_fields_are_quoted_per_rfc_4180_and_formulas_neutralised() {
        let mut out = String::new();
        push_line(
            &mut out,
            &[
                Field::Text("plain"),
                Field::Text("a,b"),
                Field::Text("say \"hi\""),
                Field::Text("two\nlines"),
                Field::Text("=SUM(A1)"),
                Field::Int(-5),
                Field::OptInt(None),
                Field::OptText(None),
                Field::Bool(true),
            ],
        );
        assert_eq!(out, "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",'=SUM(A1),-5,,,true\r\n");
        let mut out = String::new();
        push_text(&mut out, "-1,2");
        assert_eq!(out, "\"'-1,2\"");
    }

    #[test]
    fn the_headers_name_the_contracts_columns() {
        assert_eq!(ExportKind::Usage.header().trim_end().split(',').count(), 17);
        assert!(ExportKind::Usage.header().starts_with("request_id,created_at_ms,model,"));
        assert!(ExportKind::Transactions.header().ends_with("account_kind,amount,memo\r\n"));
    }
}
