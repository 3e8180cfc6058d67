//! Disputes (docs/reports.md, "Disputes"): a buyer disputes one request or one escrow with a reason; an
//! admin resolves the dispute by refunding through the ledger or by rejecting it.
//!
//! Every input is validated here, once; the queries are in `db::disputes` and the money moves only through
//! `db::ledger` (a refund reverses a settlement, exactly as the admin refund endpoint does, under the same
//! idempotency key `refund:<request id>`, so that a request is never refunded twice whichever way it is
//! refunded).

use http::StatusCode;
use sea_orm::{DatabaseConnection, DbErr};
use serde::{Deserialize, Serialize};

use crate::db::disputes::{self as queries, NewDispute, Resolution, ResolveError};
use crate::db::entities::disputes;
use crate::db::ledger::{self as core, LedgerError};

pub const MAX_REASON_CHARS: usize = 1000;
pub const MAX_NOTE_CHARS: usize = 1000;
/// The most requests one escrow dispute refunds: one transaction holds the locks of every account it
/// touches (the platform's revenue account among them) until it commits.
pub const MAX_REFUNDED_REQUESTS: u64 = 10_000;
pub const DEFAULT_PAGE: u64 = 100;
pub const MAX_PAGE: u64 = 500;
/// `usage_records.request_id` holds 40 characters.
const MAX_REQUEST_ID_CHARS: usize = 40;

/// The one error of dispute operations; it knows its HTTP status and a stable code for clients.
#[derive(Debug, thiserror::Error)]
pub enum DisputeError {
    #[error("{message}")]
    Invalid { message: String },
    #[error("{what} not found")]
    NotFound { what: &'static str },
    /// The target exists and is the buyer's, but there is nothing to dispute.
    #[error("{message}")]
    NotDisputable { message: String },
    #[error("this {what} has an open dispute already")]
    AlreadyOpen { what: &'static str },
    #[error("the dispute is {status} already")]
    Resolved { status: String },
    #[error("{message}")]
    InsufficientFunds { message: String },
    #[error("{message}")]
    TooLarge { message: String },
    /// The ledger disagrees with itself (a paid request without its settlement): for the operator's log.
    #[error("ledger error: {0}")]
    Ledger(String),
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

impl DisputeError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::NotDisputable { .. }
            | Self::AlreadyOpen { .. }
            | Self::Resolved { .. }
            | Self::InsufficientFunds { .. } => StatusCode::CONFLICT,
            Self::TooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Ledger(_) | Self::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_request",
            Self::NotFound { .. } => "not_found",
            Self::NotDisputable { .. } => "not_disputable",
            Self::AlreadyOpen { .. } => "dispute_open",
            Self::Resolved { .. } => "dispute_resolved",
            Self::InsufficientFunds { .. } => "insufficient_funds",
            Self::TooLarge { .. } => "dispute_too_large",
            Self::Ledger(_) => "internal_error",
            Self::Db(_) => "database_error",
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid { message: message.into() }
    }

    fn not_disputable(message: impl Into<String>) -> Self {
        Self::NotDisputable { message: message.into() }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Views and inputs

/// A dispute as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DisputeView {
    pub id: i64,
    pub buyer_id: i64,
    /// `request` or `escrow`.
    pub target_kind: TargetKind,
    /// The disputed request (a request dispute).
    pub request_id: Option<String>,
    /// The disputed escrow, or the escrow that paid the disputed request.
    pub escrow_id: Option<i64>,
    pub reason: String,
    pub status: DisputeStatus,
    /// Credits this resolution returned to the buyer's wallet (0 for a request refunded before).
    pub refunded_credits: i64,
    pub resolution_note: Option<String>,
    /// The admin who resolved it.
    pub resolved_by: Option<i64>,
    pub created_at_ms: i64,
    pub resolved_at_ms: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Request,
    Escrow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DisputeStatus {
    Open,
    Refunded,
    Rejected,
}

impl DisputeStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Open => queries::OPEN,
            Self::Refunded => queries::REFUNDED,
            Self::Rejected => queries::REJECTED,
        }
    }

    fn parse(status: &str) -> Self {
        match status {
            queries::REFUNDED => Self::Refunded,
            queries::REJECTED => Self::Rejected,
            _ => Self::Open,
        }
    }
}

impl From<disputes::Model> for DisputeView {
    fn from(d: disputes::Model) -> Self {
        Self {
            id: d.id,
            buyer_id: d.buyer_id,
            target_kind: if d.request_id.is_some() { TargetKind::Request } else { TargetKind::Escrow },
            request_id: d.request_id,
            escrow_id: d.escrow_id,
            reason: d.reason,
            status: DisputeStatus::parse(&d.status),
            refunded_credits: d.refunded_credits,
            resolution_note: d.resolution_note,
            resolved_by: d.resolved_by,
            created_at_ms: d.created_at_ms,
            resolved_at_ms: d.resolved_at_ms,
        }
    }
}

/// What a buyer disputes: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenDispute {
    pub request_id: Option<String>,
    pub escrow_id: Option<i64>,
    pub reason: String,
}

/// An admin's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Reverse the settlement of the request, or of every request the escrow paid for.
    Refund,
    Reject,
}

/// One page of disputes, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DisputePage {
    pub disputes: Vec<DisputeView>,
    /// Pass as `before` for the next page; null on the last page.
    pub next_before: Option<i64>,
}

// ---------------------------------------------------------------------------------------------------------
// Validation

/// Free text of 1..=`max` characters after trimming; line breaks and tabs are kept, other control
/// characters refused.
fn text(field: &str, value: &str, max: usize) -> Result<String, DisputeError> {
    let value = value.trim();
    let n = value.chars().count();
    if n == 0 || n > max {
        return Err(DisputeError::invalid(format!("{field}: 1 to {max} characters")));
    }
    if value.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        return Err(DisputeError::invalid(format!("{field}: control characters are not allowed")));
    }
    Ok(value.to_string())
}

fn note(note: Option<String>) -> Result<Option<String>, DisputeError> {
    match note.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(n) => text("note", n, MAX_NOTE_CHARS).map(Some),
    }
}

fn page_limit(limit: Option<u64>) -> Result<u64, DisputeError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(DisputeError::invalid(format!("limit: 1 to {MAX_PAGE}"))),
    }
}

enum Target {
    Request(String),
    Escrow(i64),
}

fn target(req: &OpenDispute) -> Result<Target, DisputeError> {
    match (&req.request_id, req.escrow_id) {
        (Some(request_id), None) => Ok(Target::Request(request_id.clone())),
        (None, Some(escrow_id)) => Ok(Target::Escrow(escrow_id)),
        _ => Err(DisputeError::invalid("give exactly one of request_id and escrow_id")),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Operations

/// Opens a dispute of one of the buyer's requests or escrows.
pub async fn open(db: &DatabaseConnection, buyer_id: i64, req: OpenDispute) -> Result<DisputeView, DisputeError> {
    let reason = text("reason", &req.reason, MAX_REASON_CHARS)?;
    let now = crate::now_ms();
    let (new, what) = match target(&req)? {
        Target::Request(request_id) => {
            let escrow_id = disputable_request(db, buyer_id, &request_id).await?;
            let new = NewDispute {
                buyer_id,
                target: queries::request_target(&request_id),
                request_id: Some(&request_id),
                escrow_id,
                reason: &reason,
                now_ms: now,
            };
            (queries::insert(db, new).await?, "request")
        }
        Target::Escrow(escrow_id) => {
            disputable_escrow(db, buyer_id, escrow_id).await?;
            let new = NewDispute {
                buyer_id,
                target: queries::escrow_target(escrow_id),
                request_id: None,
                escrow_id: Some(escrow_id),
                reason: &reason,
                now_ms: now,
            };
            (queries::insert(db, new).await?, "escrow")
        }
    };
    new.map(DisputeView::from).ok_or(DisputeError::AlreadyOpen { what })
}

/// Checks that the buyer may dispute the request; returns the escrow that paid for it, if one did.
async fn disputable_request(
    db: &DatabaseConnection,
    buyer_id: i64,
    request_id: &str,
) -> Result<Option<i64>, DisputeError> {
    const NOT_FOUND: DisputeError = DisputeError::NotFound { what: "request" };
    if request_id.is_empty() || request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(NOT_FOUND);
    }
    let record = match crate::db::funds::usage_record(db, request_id).await? {
        Some(record) if record.buyer_id == buyer_id => record,
        _ => return Err(NOT_FOUND),
    };
    if record.cost_credits - record.unpaid_credits <= 0 {
        return Err(DisputeError::not_disputable("this request cost nothing; there is nothing to refund"));
    }
    if core::find_settlement(db, request_id).await?.is_none() {
        return Err(DisputeError::not_disputable("this request is not settled yet"));
    }
    if queries::entry_exists(db, &format!("refund:{request_id}")).await? {
        return Err(DisputeError::not_disputable("this request was refunded already"));
    }
    Ok(match record.hold_id {
        Some(hold_id) => core::find_hold(db, hold_id).await?.and_then(|h| h.escrow_id),
        None => None,
    })
}

async fn disputable_escrow(db: &DatabaseConnection, buyer_id: i64, escrow_id: i64) -> Result<(), DisputeError> {
    let escrow = match core::find_escrow(db, escrow_id).await? {
        Some(escrow) if escrow.buyer_id == buyer_id => escrow,
        _ => return Err(DisputeError::NotFound { what: "escrow" }),
    };
    if queries::escrow_spending(db, escrow.account_id, false).await?.requests == 0 {
        return Err(DisputeError::not_disputable("nothing was spent from this escrow"));
    }
    if queries::escrow_spending(db, escrow.account_id, true).await?.requests == 0 {
        return Err(DisputeError::not_disputable("every request paid from this escrow was refunded already"));
    }
    Ok(())
}

/// The buyer's disputes, newest first.
pub async fn list_for_buyer(
    db: &DatabaseConnection,
    buyer_id: i64,
    before: Option<i64>,
    limit: Option<u64>,
) -> Result<DisputePage, DisputeError> {
    let limit = page_limit(limit)?;
    page(queries::list_by_buyer(db, buyer_id, before, limit + 1).await?, limit)
}

/// Every buyer's disputes in one status (all when None), newest first.
pub async fn list(
    db: &DatabaseConnection,
    status: Option<DisputeStatus>,
    before: Option<i64>,
    limit: Option<u64>,
) -> Result<DisputePage, DisputeError> {
    let limit = page_limit(limit)?;
    page(queries::list_by_status(db, status.map(DisputeStatus::as_str), before, limit + 1).await?, limit)
}

/// `rows` holds one more than a page when another page follows.
fn page(mut rows: Vec<disputes::Model>, limit: u64) -> Result<DisputePage, DisputeError> {
    let next_before = if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|d| d.id)
    } else {
        None
    };
    Ok(DisputePage { disputes: rows.into_iter().map(DisputeView::from).collect(), next_before })
}

/// Resolves an open dispute. A refund reverses the disputed request's settlement, or the settlement of
/// every request the disputed escrow paid for that is not refunded yet; the credits go to the buyer's
/// wallet. The status change and the refunds commit together or not at all.
pub async fn resolve(
    db: &DatabaseConnection,
    dispute_id: i64,
    outcome: Outcome,
    note_text: Option<String>,
    admin_id: i64,
) -> Result<DisputeView, DisputeError> {
    let note = note(note_text)?;
    let resolution = Resolution {
        dispute_id,
        refund: outcome == Outcome::Refund,
        note,
        admin_id,
        max_requests: MAX_REFUNDED_REQUESTS,
        now_ms: crate::now_ms(),
    };
    match queries::resolve(db, &resolution).await {
        Ok(dispute) => Ok(dispute.into()),
        Err(ResolveError::NotFound) => Err(DisputeError::NotFound { what: "dispute" }),
        Err(ResolveError::Resolved(status)) => Err(DisputeError::Resolved { status }),
        Err(ResolveError::TooManyRequests { limit }) => Err(DisputeError::TooLarge {
            message: format!(
                "the escrow paid for more than {limit} requests that are not refunded yet, more than one \
                 resolution refunds; refund them one by one (POST /api/v1/admin/requests/{{request_id}}/refund) \
                 or reject the dispute"
            ),
        }),
        Err(ResolveError::Ledger(LedgerError::InsufficientFunds { .. })) => Err(DisputeError::InsufficientFunds {
            message: "a seller's wallet no longer holds what the disputed requests earned; nothing was refunded \
                      and the dispute stays open"
                .into(),
        }),
        Err(ResolveError::Ledger(LedgerError::Db(e))) => Err(DisputeError::Db(e)),
        Err(ResolveError::Ledger(e)) => Err(DisputeError::Ledger(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_trimmed_and_bounded() {
        assert_eq!(text("reason", "  slow\nand wrong \t", 1000).unwrap(), "slow\nand wrong");
        assert!(matches!(text("reason", "   ", 1000), Err(DisputeError::Invalid { .. })));
        assert!(matches!(text("reason", "", 1000), Err(DisputeError::Invalid { .. })));
        let long = "é".repeat(1000);
        assert_eq!(text("reason", &format!(" {long} "), 1000).unwrap(), long);
        assert!(matches!(text("reason", &format!("{long}x"), 1000), Err(DisputeError::Invalid { .. })));
        assert!(matches!(text("reason", "a\u{0}b", 1000), Err(DisputeError::Invalid { .. })));
    }

    #[test]
    fn a_dispute_names_exactly_one_target() {
        let both = OpenDispute { request_id: Some("r".into()), escrow_id: Some(1), reason: "x".into() };
        assert!(matches!(target(&both), Err(DisputeError::Invalid { .. })));
        assert!(matches!(target(&OpenDispute::default()), Err(DisputeError::Invalid { .. })));
        let request = OpenDispute { request_id: Some("r".into()), ..OpenDispute::default() };
        assert!(matches!(target(&request), Ok(Target::Request(r)) if r == "r"));
        let escrow = OpenDispute { escrow_id: Some(7), ..OpenDispute::default() };
        assert!(matches!(target(&escrow), Ok(Target::Escrow(7))));
    }

    #[test]
    fn an_empty_note_is_no_note() {
        assert_eq!(note(None).unwrap(), None);
        assert_eq!(note(Some("  ".into())).unwrap(), None);
        assert_eq!(note(Some(" ok ".into())).unwrap().as_deref(), Some("ok"));
        assert!(note(Some("x".repeat(1001))).is_err());
    }

    #[test]
    fn errors_have_their_status_and_code() {
        let cases = [
            (DisputeError::invalid("x"), 400, "invalid_request"),
            (DisputeError::NotFound { what: "request" }, 404, "not_found"),
            (DisputeError::not_disputable("x"), 409, "not_disputable"),
            (DisputeError::AlreadyOpen { what: "request" }, 409, "dispute_open"),
            (DisputeError::Resolved { status: "refunded".into() }, 409, "dispute_resolved"),
            (DisputeError::InsufficientFunds { message: "x".into() }, 409, "insufficient_funds"),
            (DisputeError::TooLarge { message: "x".into() }, 422, "dispute_too_large"),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status().as_u16(), e.code()), (status, code), "{e}");
        }
    }
}
