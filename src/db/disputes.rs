//! Queries behind disputes (docs/reports.md, "Disputes"): a buyer's claim against one request or one
//! escrow, and its resolution, whose refunds commit in the same transaction as the status change.
//!
//! One open dispute per target is the unique index on `open_target` (the target while open, NULL once
//! resolved: NULLs never collide), so two buyers' clicks racing each other cannot open two. A resolution is
//! a conditional `UPDATE ... WHERE status = 'open'`: of two admins resolving at once, one changes the row and
//! the other finds it resolved, and since the refunds are posted in that same transaction, a dispute is
//! refunded at most once.

use std::time::Duration;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, SqlErr, Statement,
};

use super::entities::{disputes, journal_entries};
use super::ledger::{self, LedgerError, Posted};

pub const OPEN: &str = "open";
pub const REFUNDED: &str = "refunded";
pub const REJECTED: &str = "rejected";

/// The `target` of a dispute of a request.
pub fn request_target(request_id: &str) -> String {
    format!("request:{request_id}")
}

/// The `target` of a dispute of an escrow.
pub fn escrow_target(escrow_id: i64) -> String {
    format!("escrow:{escrow_id}")
}

/// A dispute to open.
#[derive(Clone, Debug)]
pub struct NewDispute<'a> {
    pub buyer_id: i64,
    pub target: String,
    pub request_id: Option<&'a str>,
    /// The escrow disputed, or the escrow that paid the disputed request.
    pub escrow_id: Option<i64>,
    pub reason: &'a str,
    pub now_ms: i64,
}

/// Inserts an open dispute. `Ok(None)` when the target has an open dispute already.
pub async fn insert(c: &impl ConnectionTrait, new: NewDispute<'_>) -> Result<Option<disputes::Model>, DbErr> {
    let inserted = disputes::ActiveModel {
        buyer_id: Set(new.buyer_id),
        target: Set(new.target.clone()),
        open_target: Set(Some(new.target)),
        request_id: Set(new.request_id.map(str::to_string)),
        escrow_id: Set(new.escrow_id),
        reason: Set(new.reason.to_string()),
        status: Set(OPEN.to_string()),
        refunded_credits: Set(0),
        resolution_note: Set(None),
        resolved_by: Set(None),
        created_at_ms: Set(new.now_ms),
        resolved_at_ms: Set(None),
        ..Default::default()
    }
    .insert(c)
    .await;
    match inserted {
        Ok(model) => Ok(Some(model)),
        // The only unique index besides the primary key is the one on `open_target`.
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn find(c: &impl ConnectionTrait, id: i64) -> Result<Option<disputes::Model>, DbErr> {
    disputes::Entity::find_by_id(id).one(c).await
}

/// The buyer's disputes, newest first, at most `limit` with an id below `before`.
pub async fn list_by_buyer(
    c: &impl ConnectionTrait,
    buyer_id: i64,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<disputes::Model>, DbErr> {
    let mut query = disputes::Entity::find().filter(disputes::Column::BuyerId.eq(buyer_id));
    if let Some(before) = before {
        query = query.filter(disputes::Column::Id.lt(before));
    }
    query.order_by_desc(disputes::Column::Id).limit(limit).all(c).await
}

/// Disputes in one status (all when None), newest first, at most `limit` with an id below `before`.
pub async fn list_by_status(
    c: &impl ConnectionTrait,
    status: Option<&str>,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<disputes::Model>, DbErr> {
    let mut query = disputes::Entity::find();
    if let Some(status) = status {
        query = query.filter(disputes::Column::Status.eq(status));
    }
    if let Some(before) = before {
        query = query.filter(disputes::Column::Id.lt(before));
    }
    query.order_by_desc(disputes::Column::Id).limit(limit).all(c).await
}

/// Whether the ledger has an entry with this idempotency key (e.g. `refund:<request>`).
pub async fn entry_exists(c: &impl ConnectionTrait, idempotency_key: &str) -> Result<bool, DbErr> {
    let n = journal_entries::Entity::find()
        .filter(journal_entries::Column::IdempotencyKey.eq(idempotency_key))
        .count(c)
        .await?;
    Ok(n > 0)
}

// ---------------------------------------------------------------------------------------------------------
// What an escrow paid for

/// Requests paid from the escrow's account: usage records whose hold drew from it, with something paid.
const PAID_FROM_ESCROW: &str = "FROM holds h JOIN usage_records u ON u.hold_id = h.id \
     WHERE h.source_account_id = ? AND u.cost_credits > u.unpaid_credits";
/// ... and not refunded (by the admin refund endpoint or an earlier dispute).
const NOT_REFUNDED: &str =
    "AND NOT EXISTS (SELECT 1 FROM journal_entries e WHERE e.request_id = u.request_id AND e.kind = 'refund')";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromQueryResult)]
pub struct Spending {
    /// Requests paid from the escrow.
    pub requests: i64,
    /// What the buyer paid for them.
    pub credits: i64,
}

/// What the escrow account paid for: all of it, or only what is not refunded yet.
pub async fn escrow_spending(
    c: &impl ConnectionTrait,
    escrow_account_id: i64,
    unrefunded_only: bool,
) -> Result<Spending, DbErr> {
    let backend = c.get_database_backend();
    let sql = format!(
        "SELECT COUNT(*) AS requests, {} AS credits {PAID_FROM_ESCROW} {}",
        super::funds::sum(backend, "u.cost_credits - u.unpaid_credits"),
        if unrefunded_only { NOT_REFUNDED } else { "" }
    );
    let row = Spending::find_by_statement(Statement::from_sql_and_values(backend, sql, [escrow_account_id.into()]))
        .one(c)
        .await?;
    Ok(row.unwrap_or_default())
}

/// The ids of the requests the escrow account paid for that are not refunded yet, oldest first, at most
/// `limit`.
async fn unrefunded_requests(
    c: &impl ConnectionTrait,
    escrow_account_id: i64,
    limit: u64,
) -> Result<Vec<String>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        request_id: String,
    }
    let backend = c.get_database_backend();
    let sql =
        format!("SELECT u.request_id AS request_id {PAID_FROM_ESCROW} {NOT_REFUNDED} ORDER BY u.id LIMIT {limit}");
    let rows =
        Row::find_by_statement(Statement::from_sql_and_values(backend, sql, [escrow_account_id.into()])).all(c).await?;
    Ok(rows.into_iter().map(|r| r.request_id).collect())
}

/// Every account that received credits from the settlements of requests the escrow account paid for.
async fn escrow_earner_accounts(c: &impl ConnectionTrait, escrow_account_id: i64) -> Result<Vec<i64>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        account_id: i64,
    }
    let backend = c.get_database_backend();
    let sql = format!(
        "SELECT DISTINCT s.seller_account_id AS account_id FROM settlements s \
         WHERE s.seller_account_id IS NOT NULL AND s.request_id IN (SELECT u.request_id {PAID_FROM_ESCROW}) \
         UNION SELECT r.id FROM accounts r WHERE r.kind = 'revenue'"
    );
    let rows =
        Row::find_by_statement(Statement::from_sql_and_values(backend, sql, [escrow_account_id.into()])).all(c).await?;
    Ok(rows.into_iter().map(|r| r.account_id).collect())
}

// ---------------------------------------------------------------------------------------------------------
// Resolution

/// An admin's decision on an open dispute.
#[derive(Clone, Debug)]
pub struct Resolution {
    pub dispute_id: i64,
    /// Refund (`REFUNDED`) or not (`REJECTED`).
    pub refund: bool,
    pub note: Option<String>,
    pub admin_id: i64,
    /// An escrow dispute that would refund more requests than this fails with `TooManyRequests`.
    pub max_requests: u64,
    pub now_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("dispute not found")]
    NotFound,
    #[error("the dispute is {0} already")]
    Resolved(String),
    /// The escrow paid for more requests than one resolution refunds.
    #[error("the escrow paid for more than {limit} requests that are not refunded")]
    TooManyRequests { limit: u64 },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<DbErr> for ResolveError {
    fn from(e: DbErr) -> Self {
        Self::Ledger(LedgerError::Db(e))
    }
}

/// Resolves an open dispute: the status change and the refunds it makes commit together or not at all
/// (a seller who spent the credits already fails it with `LedgerError::InsufficientFunds`, and the dispute
/// stays open). Retried on transient lock conflicts, as every ledger transaction is.
pub async fn resolve(db: &DatabaseConnection, r: &Resolution) -> Result<disputes::Model, ResolveError> {
    let mut attempt = 0u32;
    loop {
        match resolve_once(db, r).await {
            Err(ResolveError::Ledger(LedgerError::Db(e))) if ledger::is_transient(&e) && attempt < 8 => {
                attempt += 1;
                // Jittered, so that transactions that collided do not collide again.
                let base = 5u64 << attempt.min(6);
                let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=base);
                tokio::time::sleep(Duration::from_millis(base + jitter)).await;
            }
            other => return other,
        }
    }
}

async fn resolve_once(db: &DatabaseConnection, r: &Resolution) -> Result<disputes::Model, ResolveError> {
    let txn = ledger::begin(db).await?;
    let status = if r.refund { REFUNDED } else { REJECTED };
    // The dispute row first (it is locked until the commit), then the accounts in ascending id order.
    let changed = disputes::Entity::update_many()
        .col_expr(disputes::Column::Status, Expr::value(status))
        .col_expr(disputes::Column::OpenTarget, Expr::value(Option::<String>::None))
        .col_expr(disputes::Column::ResolutionNote, Expr::value(r.note.clone()))
        .col_expr(disputes::Column::ResolvedBy, Expr::value(Some(r.admin_id)))
        .col_expr(disputes::Column::ResolvedAtMs, Expr::value(Some(r.now_ms)))
        .filter(disputes::Column::Id.eq(r.dispute_id))
        .filter(disputes::Column::Status.eq(OPEN))
        .exec(&txn)
        .await?;
    let current = find(&txn, r.dispute_id).await?;
    let dispute = match current {
        Some(d) if changed.rows_affected == 1 => d,
        Some(d) => return Err(ResolveError::Resolved(d.status)),
        None => return Err(ResolveError::NotFound),
    };
    if !r.refund {
        txn.commit().await?;
        return Ok(dispute);
    }
    let refunded = refund_target(&txn, &dispute, r).await?;
    disputes::Entity::update_many()
        .col_expr(disputes::Column::RefundedCredits, Expr::value(refunded))
        .filter(disputes::Column::Id.eq(dispute.id))
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(disputes::Model { refunded_credits: refunded, ..dispute })
}

/// Refunds what the dispute covers; returns the credits that went back to the buyer now (a request refunded
/// before adds nothing).
async fn refund_target(
    txn: &DatabaseTransaction,
    dispute: &disputes::Model,
    r: &Resolution,
) -> Result<i64, ResolveError> {
    let requests = match (&dispute.request_id, dispute.escrow_id) {
        (Some(request_id), _) => vec![request_id.clone()],
        (None, Some(escrow_id)) => {
            let escrow = ledger::find_escrow(txn, escrow_id).await?.ok_or(LedgerError::NotFound("escrow"))?;
            let requests = unrefunded_requests(txn, escrow.account_id, r.max_requests.saturating_add(1)).await?;
            if requests.len() as u64 > r.max_requests {
                return Err(ResolveError::TooManyRequests { limit: r.max_requests });
            }
            if requests.len() > 1 {
                // Each refund locks its own accounts in ascending order; across many refunds only locking
                // them all first, in one ascending pass, keeps the order (docs: the ledger's lock order).
                let mut accounts = escrow_earner_accounts(txn, escrow.account_id).await?;
                accounts.push(ledger::wallet_account(txn, dispute.buyer_id, r.now_ms).await?);
                accounts.sort_unstable();
                accounts.dedup();
                for account in accounts {
                    ledger::balance_for_update(txn, account).await?;
                }
            }
            requests
        }
        (None, None) => Vec::new(),
    };
    let memo = Some(format!("dispute {}", dispute.id));
    let mut refunded = 0;
    for request_id in &requests {
        let (posted, amount) =
            ledger::refund_request_in(txn, request_id, dispute.buyer_id, Some(r.admin_id), memo.clone(), r.now_ms)
                .await?;
        if let Posted::New(_) = posted {
            refunded += amount;
        }
    }
    Ok(refunded)
}

#[cfg(test)]
mod tests {
    use sea_orm::{EntityTrait, QueryFilter};

    use super::*;
    use crate::db::entities::{escrows, holds, usage_records};
    use crate::db::ledger::{EscrowScope, HoldSource, Settlement};
    use crate::db::testing::TestDb;

    const T0: i64 = 1_750_000_000_000;
    const DAY: i64 = 86_400_000;
    const BUYER: i64 = 1;
    const OTHER_BUYER: i64 = 2;
    const SELLER: i64 = 50;
    const ADMIN: i64 = 99;

    async fn assert_clean(db: &DatabaseConnection, label: &str) {
        let found = ledger::check(db, T0, DAY).await.unwrap();
        assert!(found.is_empty(), "{label}: ledger check found {found:?}");
    }

    async fn wallet(db: &DatabaseConnection, user: i64) -> i64 {
        ledger::wallet_balance(db, user).await.unwrap()
    }

    async fn revenue(db: &DatabaseConnection) -> i64 {
        let id = ledger::revenue_account(db, T0).await.unwrap();
        ledger::balance(db, id).await.unwrap()
    }

    async fn wallet_hold(db: &DatabaseConnection, buyer: i64, amount: i64) -> holds::Model {
        let account_id = ledger::wallet_account(db, buyer, T0).await.unwrap();
        let source = HoldSource { buyer_id: buyer, account_id, escrow_id: None };
        ledger::open_hold(db, source, "node", amount, amount, T0).await.unwrap().expect("a hold")
    }

    async fn escrow_hold(db: &DatabaseConnection, e: &escrows::Model, amount: i64) -> holds::Model {
        let source = HoldSource { buyer_id: e.buyer_id, account_id: e.account_id, escrow_id: Some(e.id) };
        ledger::open_hold(db, source, "node", amount, amount, T0).await.unwrap().expect("a hold")
    }

    /// Settles a request from the hold and writes its usage record, as the usage writer does.
    async fn paid_request(db: &DatabaseConnection, h: &holds::Model, request_id: &str, cost: i64) {
        let s = Settlement {
            request_id: request_id.to_string(),
            hold_id: h.id,
            hold_account_id: h.account_id,
            source_account_id: h.source_account_id,
            cost,
            seller_account_id: Some(ledger::wallet_account(db, SELLER, T0).await.unwrap()),
            revenue_account_id: ledger::revenue_account(db, T0).await.unwrap(),
            fee_bps: 500,
        };
        let txn = ledger::begin(db).await.unwrap();
        let settled = ledger::settle(&txn, &s, T0).await.unwrap();
        usage_records::ActiveModel {
            request_id: Set(request_id.to_string()),
            buyer_id: Set(h.buyer_id),
            buyer_key_id: Set(1),
            hosted_key_id: Set(Some(1)),
            model: Set("m".to_string()),
            endpoint: Set("chat".to_string()),
            prompt_tokens: Set(10),
            completion_tokens: Set(5),
            estimated: Set(false),
            status_code: Set(200),
            attempts: Set(1),
            latency_ms: Set(5),
            ttft_ms: Set(None),
            request_bytes: Set(100),
            response_bytes: Set(100),
            client_disconnected: Set(false),
            error_kind: Set(None),
            created_at_ms: Set(T0),
            cost_credits: Set(cost),
            unpaid_credits: Set(settled.unpaid),
            hold_id: Set(Some(h.id)),
            fallback: Set(false),
            ..Default::default()
        }
        .insert(&txn)
        .await
        .unwrap();
        txn.commit().await.unwrap();
    }

    async fn open_request(db: &DatabaseConnection, buyer: i64, request_id: &str) -> Option<disputes::Model> {
        let new = NewDispute {
            buyer_id: buyer,
            target: request_target(request_id),
            request_id: Some(request_id),
            escrow_id: None,
            reason: "broken answer",
            now_ms: T0,
        };
        insert(db, new).await.unwrap()
    }

    async fn open_escrow(db: &DatabaseConnection, buyer: i64, escrow_id: i64) -> disputes::Model {
        let new = NewDispute {
            buyer_id: buyer,
            target: escrow_target(escrow_id),
            request_id: None,
            escrow_id: Some(escrow_id),
            reason: "the seller's key served garbage",
            now_ms: T0,
        };
        insert(db, new).await.unwrap().expect("no open dispute on the escrow yet")
    }

    fn resolution(dispute_id: i64, refund: bool) -> Resolution {
        Resolution {
            dispute_id,
            refund,
            note: Some("checked".into()),
            admin_id: ADMIN,
            max_requests: 10_000,
            now_ms: T0 + 1,
        }
    }

    async fn refunds(db: &DatabaseConnection) -> u64 {
        journal_entries::Entity::find().filter(journal_entries::Column::Kind.eq("refund")).count(db).await.unwrap()
    }

    #[tokio::test]
    async fn one_open_dispute_per_target_and_a_new_one_after_resolution() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            let first = open_request(db, BUYER, "r1").await.expect("the first dispute");
            assert_eq!((first.status.as_str(), first.open_target.as_deref()), (OPEN, Some("request:r1")), "{l}");
            assert!(open_request(db, BUYER, "r1").await.is_none(), "{l}: a second open dispute of r1");
            // Another target is independent.
            let other = open_request(db, BUYER, "r2").await.expect("a dispute of r2");

            let rejected = resolve(db, &resolution(first.id, false)).await.unwrap();
            assert_eq!((rejected.status.as_str(), rejected.open_target), (REJECTED, None), "{l}");
            assert_eq!((rejected.resolved_by, rejected.resolved_at_ms), (Some(ADMIN), Some(T0 + 1)), "{l}");
            assert_eq!(rejected.resolution_note.as_deref(), Some("checked"), "{l}");
            let again = resolve(db, &resolution(first.id, true)).await;
            assert!(matches!(&again, Err(ResolveError::Resolved(s)) if s == REJECTED), "{l}: {again:?}");
            assert!(matches!(resolve(db, &resolution(12345, true)).await, Err(ResolveError::NotFound)), "{l}");

            let reopened = open_request(db, BUYER, "r1").await.expect("a new dispute once the first is resolved");
            assert!(open_request(db, BUYER, "r1").await.is_none(), "{l}");

            let mine: Vec<i64> = list_by_buyer(db, BUYER, None, 10).await.unwrap().iter().map(|d| d.id).collect();
            assert_eq!(mine, vec![reopened.id, other.id, first.id], "{l}: newest first");
            let page: Vec<i64> =
                list_by_buyer(db, BUYER, Some(reopened.id), 1).await.unwrap().iter().map(|d| d.id).collect();
            assert_eq!(page, vec![other.id], "{l}");
            assert!(list_by_buyer(db, OTHER_BUYER, None, 10).await.unwrap().is_empty(), "{l}");
            let open: Vec<i64> = list_by_status(db, Some(OPEN), None, 10).await.unwrap().iter().map(|d| d.id).collect();
            assert_eq!(open, vec![reopened.id, other.id], "{l}");
            let rejected: Vec<i64> =
                list_by_status(db, Some(REJECTED), None, 10).await.unwrap().iter().map(|d| d.id).collect();
            assert_eq!(rejected, vec![first.id], "{l}");
            assert_eq!(list_by_status(db, None, None, 10).await.unwrap().len(), 3, "{l}");
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn a_refund_reverses_the_request_and_commits_with_the_status() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            ledger::grant(db, BUYER, 1_000, None, "g", None, T0).await.unwrap();
            let h = wallet_hold(db, BUYER, 1_000).await;
            paid_request(db, &h, "r1", 200).await;
            paid_request(db, &h, "r2", 100).await;
            assert_eq!((wallet(db, SELLER).await, revenue(db).await), (190 + 95, 10 + 5), "{l}");

            let d = open_request(db, BUYER, "r1").await.unwrap();
            let resolved = resolve(db, &resolution(d.id, true)).await.unwrap();
            assert_eq!((resolved.status.as_str(), resolved.refunded_credits), (REFUNDED, 200), "{l}");
            assert_eq!(find(db, d.id).await.unwrap().unwrap().refunded_credits, 200, "{l}");
            assert_eq!((wallet(db, BUYER).await, wallet(db, SELLER).await, revenue(db).await), (200, 95, 5), "{l}");
            assert!(entry_exists(db, "refund:r1").await.unwrap(), "{l}");
            assert_clean(db, l).await;

            // r2 was refunded by the admin refund endpoint first: the dispute's refund adds nothing.
            ledger::refund_request(db, "r2", BUYER, Some(ADMIN), None, T0).await.unwrap();
            let d2 = open_request(db, BUYER, "r2").await.unwrap();
            let resolved = resolve(db, &resolution(d2.id, true)).await.unwrap();
            assert_eq!((resolved.status.as_str(), resolved.refunded_credits), (REFUNDED, 0), "{l}");
            assert_eq!((wallet(db, BUYER).await, wallet(db, SELLER).await, revenue(db).await), (300, 0, 0), "{l}");
            assert_eq!(refunds(db).await, 2, "{l}");
            assert_clean(db, l).await;
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn a_refund_the_seller_cannot_pay_changes_nothing() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            ledger::grant(db, BUYER, 1_000, None, "g", None, T0).await.unwrap();
            let h = wallet_hold(db, BUYER, 1_000).await;
            paid_request(db, &h, "r1", 200).await;
            // The seller spends its 190 credits of earnings.
            ledger::create_escrow(db, SELLER, 150, EscrowScope::default(), T0 + DAY, T0).await.unwrap();
            let d = open_request(db, BUYER, "r1").await.unwrap();
            let r = resolve(db, &resolution(d.id, true)).await;
            assert!(matches!(r, Err(ResolveError::Ledger(LedgerError::InsufficientFunds { .. }))), "{l}: {r:?}");
            let still = find(db, d.id).await.unwrap().unwrap();
            assert_eq!((still.status.as_str(), still.open_target.as_deref()), (OPEN, Some("request:r1")), "{l}");
            assert_eq!((still.refunded_credits, still.resolved_by), (0, None), "{l}");
            assert_eq!((refunds(db).await, wallet(db, BUYER).await, wallet(db, SELLER).await), (0, 0, 40), "{l}");
            assert_clean(db, l).await;
            // Rejecting is still possible.
            assert_eq!(resolve(db, &resolution(d.id, false)).await.unwrap().status, REJECTED, "{l}");
            t.cleanup().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_resolutions_refund_once() {
        for t in TestDb::all().await {
            let l = t.label;
            let db = &t.db;
            ledger::grant(db, BUYER, 10_000, None, "g", None, T0).await.unwrap();
            let e = ledger::create_escrow(db, BUYER, 5_000, EscrowScope::default(), T0 + DAY, T0).await.unwrap();
            let h = escrow_hold(db, &e, 5_000).await;
            for i in 0..5 {
                paid_request(db, &h, &format!("e{i}"), 100 + i).await;
            }
            let w = wallet_hold(db, BUYER, 1_000).await;
            paid_request(db, &w, "w1", 300).await;
            let request_dispute = open_request(db, BUYER, "w1").await.unwrap();
            let escrow_dispute = open_escrow(db, BUYER, e.id).await;
            let before = wallet(db, BUYER).await;

            for (dispute, credits) in [(request_dispute.id, 300), (escrow_dispute.id, 510)] {
                let mut tasks = Vec::new();
                for i in 0..4 {
                    let db = db.clone();
                    // Half refund, half reject: whichever wins, the other three find it resolved.
                    let r = resolution(dispute, i % 2 == 0);
                    tasks.push(tokio::spawn(async move { resolve(&db, &r).await }));
                }
                let mut won = Vec::new();
                for task in tasks {
                    match task.await.unwrap() {
                        Ok(d) => won.push(d),
                        Err(ResolveError::Resolved(_)) => {}
                        Err(e) => panic!("{l}: {e:?}"),
                    }
                }
                assert_eq!(won.len(), 1, "{l}: {won:?}");
                let stored = find(db, dispute).await.unwrap().unwrap();
                assert_eq!(stored, won[0], "{l}");
                let want = if stored.status == REFUNDED { credits } else { 0 };
                assert_eq!(stored.refunded_credits, want, "{l}");
            }
            let refunded: i64 =
                list_by_buyer(db, BUYER, None, 10).await.unwrap().iter().map(|d| d.refunded_credits).sum();
            assert_eq!(wallet(db, BUYER).await, before + refunded, "{l}");
            let entries = journal_entries::Entity::find()
                .filter(journal_entries::Column::Kind.eq("refund"))
                .all(db)
                .await
                .unwrap();
            let mut refunded_requests: Vec<_> = entries.iter().filter_map(|e| e.request_id.clone()).collect();
            refunded_requests.sort();
            let len = refunded_requests.len();
            refunded_requests.dedup();
            assert_eq!(refunded_requests.len(), len, "{l}: a request refunded twice");
            assert_clean(db, l).await;
            t.cleanup().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_opens_of_one_target_open_one_dispute() {
        for t in TestDb::all().await {
            let l = t.label;
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let db = t.db.clone();
                    tokio::spawn(async move { open_request(&db, BUYER, "r1").await })
                })
                .collect();
            let mut opened = 0;
            for task in tasks {
                opened += usize::from(task.await.unwrap().is_some());
            }
            assert_eq!(opened, 1, "{l}");
            assert_eq!(list_by_status(&t.db, Some(OPEN), None, 10).await.unwrap().len(), 1, "{l}");
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn an_escrow_refund_covers_every_request_it_paid_that_is_not_refunded() {
        for t in TestDb::all().await {
            let (db, l) = (&t.db, t.label);
            ledger::grant(db, BUYER, 10_000, None, "g", None, T0).await.unwrap();
            let e = ledger::create_escrow(db, BUYER, 3_000, EscrowScope::default(), T0 + DAY, T0).await.unwrap();
            let other = ledger::create_escrow(db, BUYER, 1_000, EscrowScope::default(), T0 + DAY, T0).await.unwrap();
            // Two holds on the escrow (two nodes), one closed since.
            let h1 = escrow_hold(db, &e, 1_000).await;
            let h2 = escrow_hold(db, &e, 1_000).await;
            paid_request(db, &h1, "a", 101).await;
            paid_request(db, &h1, "b", 202).await;
            paid_request(db, &h2, "c", 303).await;
            ledger::close_hold(db, h1.id, T0).await.unwrap();
            // Not the escrow's: another escrow and the plain wallet.
            paid_request(db, &escrow_hold(db, &other, 500).await, "x", 50).await;
            paid_request(db, &wallet_hold(db, BUYER, 500).await, "y", 60).await;
            // Refunded before the dispute.
            ledger::refund_request(db, "b", BUYER, Some(ADMIN), None, T0).await.unwrap();

            let all = escrow_spending(db, e.account_id, false).await.unwrap();
            assert_eq!(all, Spending { requests: 3, credits: 606 }, "{l}");
            let open = escrow_spending(db, e.account_id, true).await.unwrap();
            assert_eq!(open, Spending { requests: 2, credits: 404 }, "{l}");

            let d = open_escrow(db, BUYER, e.id).await;
            let too_few = Resolution { max_requests: 1, ..resolution(d.id, true) };
            let r = resolve(db, &too_few).await;
            assert!(matches!(r, Err(ResolveError::TooManyRequests { limit: 1 })), "{l}: {r:?}");
            assert_eq!(find(db, d.id).await.unwrap().unwrap().status, OPEN, "{l}: the bound changes nothing");

            let (buyer, seller) = (wallet(db, BUYER).await, wallet(db, SELLER).await);
            let resolved = resolve(db, &resolution(d.id, true)).await.unwrap();
            assert_eq!((resolved.status.as_str(), resolved.refunded_credits), (REFUNDED, 404), "{l}");
            // Back to the wallet, not to the escrow.
            assert_eq!(wallet(db, BUYER).await, buyer + 404, "{l}");
            let seller_share = 101 * 95 / 100 + 303 * 95 / 100;
            assert_eq!(wallet(db, SELLER).await, seller - seller_share, "{l}");
            for (request, refunded) in [("a", true), ("b", true), ("c", true), ("x", false), ("y", false)] {
                assert_eq!(entry_exists(db, &format!("refund:{request}")).await.unwrap(), refunded, "{l}: {request}");
            }
            assert_eq!(escrow_spending(db, e.account_id, true).await.unwrap(), Spending::default(), "{l}");
            let stored = escrows::Entity::find_by_id(e.id).one(db).await.unwrap().unwrap();
            assert_eq!(stored.status, ledger::ESCROW_ACTIVE, "{l}");
            assert_clean(db, l).await;
            t.cleanup().await;
        }
    }
}
