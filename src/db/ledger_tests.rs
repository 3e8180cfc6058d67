//! Tests of the credits ledger (docs/ledger.md) on SQLite and MariaDB: every operation, concurrent writers,
//! `check()` against a deliberately corrupted ledger, and a model-based property test that replays random
//! sequences of operations against a plain in-memory model of the rules.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait,
    PaginatorTrait, QueryFilter, Statement,
};

use super::*;
use crate::db::entities::{accounts, escrows, holds, journal_entries, postings, settlements, usage_records};
use crate::db::testing::TestDb;

/// The fixed clock the tests start at.
const T0: i64 = 1_750_000_000_000;
const DAY: i64 = 86_400_000;
/// `ledger.hold_stale_ms` for `check()`.
const STALE: i64 = 60_000;
const FEE: u32 = 500;
const NODE: &str = "node-1";
const BUYER: i64 = 1;
const OTHER_BUYER: i64 = 2;
const SELLER: i64 = 50;

// ---------------------------------------------------------------------------------------------------------
// Helpers

async fn assert_clean(db: &DatabaseConnection, now: i64, label: &str) {
    let found = violations(db, now, STALE).await;
    assert!(found.is_empty(), "{label}: ledger check found {found:?}");
}

/// `check()`'s violations plus those of [`own_check`], an independent verification of the same invariants.
async fn violations(db: &DatabaseConnection, now: i64, max_hold_idle_ms: i64) -> Vec<String> {
    let mut found: Vec<String> = match check(db, now, max_hold_idle_ms).await {
        Ok(found) => found.into_iter().map(|v| format!("{}: {}", v.rule, v.detail)).collect(),
        Err(e) => panic!("check() failed: {e}"),
    };
    found.extend(own_check(db, now, max_hold_idle_ms).await);
    found
}

/// The invariants of docs/ledger.md, verified in memory from the raw tables.
async fn own_check(db: &DatabaseConnection, now: i64, max_hold_idle_ms: i64) -> Vec<String> {
    let all_accounts = accounts::Entity::find().all(db).await.unwrap();
    let all_postings = postings::Entity::find().all(db).await.unwrap();
    let entries = journal_entries::Entity::find().all(db).await.unwrap();
    let all_holds = holds::Entity::find().all(db).await.unwrap();
    let usage = usage_records::Entity::find().all(db).await.unwrap();
    let mut found = Vec::new();
    let (mut by_entry, mut by_account) = (BTreeMap::<i64, i64>::new(), BTreeMap::<i64, i64>::new());
    for p in &all_postings {
        *by_entry.entry(p.entry_id).or_default() += p.amount;
        *by_account.entry(p.account_id).or_default() += p.amount;
    }
    found.extend(by_entry.iter().filter(|(_, sum)| **sum != 0).map(|(e, sum)| format!("own: entry {e} sums to {sum}")));
    let mut balances = BTreeMap::new();
    for a in &all_accounts {
        balances.insert(a.id, a.balance);
        if a.balance != by_account.get(&a.id).copied().unwrap_or(0) {
            found.push(format!("own: account {} differs from its postings", a.id));
        }
        if a.balance < 0 && a.kind != EXTERNAL {
            found.push(format!("own: account {} is at {}", a.id, a.balance));
        }
    }
    let total: i64 = all_accounts.iter().map(|a| a.balance).sum();
    if total != 0 {
        found.push(format!("own: all balances sum to {total}"));
    }
    // Settlements: one per paid usage record for what it paid, and each settle entry debits what its
    // settlements paid and credits each account what they give it.
    let all_settlements = settlements::Entity::find().all(db).await.unwrap();
    let kind_of: BTreeMap<i64, &str> = entries.iter().map(|e| (e.id, e.kind.as_str())).collect();
    let settled: BTreeMap<&str, &settlements::Model> =
        all_settlements.iter().map(|s| (s.request_id.as_str(), s)).collect();
    for u in usage.iter().filter(|u| u.cost_credits > 0) {
        match settled.get(u.request_id.as_str()) {
            Some(s) if s.paid == u.cost_credits - u.unpaid_credits => {}
            other => found.push(format!("own: usage record {} settled as {other:?}", u.request_id)),
        }
    }
    let revenue = all_accounts.iter().find(|a| a.kind == REVENUE).map(|a| a.id);
    let (mut owed, mut moved) = (BTreeMap::<(i64, Option<i64>), i64>::new(), BTreeMap::new());
    for s in &all_settlements {
        if kind_of.get(&s.entry_id) != Some(&"settle") {
            found.push(format!("own: settlement of {} in entry {}", s.request_id, s.entry_id));
        }
        if !usage.iter().any(|u| u.request_id == s.request_id) {
            found.push(format!("own: settlement of {} without a usage record", s.request_id));
        }
        *owed.entry((s.entry_id, None)).or_default() -= s.paid;
        *owed.entry((s.entry_id, s.seller_account_id)).or_default() += s.seller;
        *owed.entry((s.entry_id, revenue)).or_default() += s.platform;
    }
    for p in all_postings.iter().filter(|p| kind_of.get(&p.entry_id) == Some(&"settle")) {
        let account = if p.amount < 0 { None } else { Some(p.account_id) };
        *moved.entry((p.entry_id, account)).or_default() += p.amount;
    }
    owed.retain(|_, n| *n != 0);
    if owed != moved {
        found.push(format!("own: settle entries move {moved:?}, their settlements {owed:?}"));
    }
    for h in &all_holds {
        let held = balances.get(&h.account_id).copied().unwrap_or(0);
        if h.status == HOLD_OPEN && h.amount - h.spent != held {
            found.push(format!("own: hold {} holds {held}, not {} - {}", h.id, h.amount, h.spent));
        }
        if h.status == HOLD_OPEN && h.renewed_at_ms < now - max_hold_idle_ms {
            found.push(format!("own: hold {} is stale", h.id));
        }
        if h.status == HOLD_CLOSED && held != 0 {
            found.push(format!("own: closed hold {} holds {held}", h.id));
        }
    }
    found
}

async fn rules(db: &DatabaseConnection, now: i64) -> BTreeSet<&'static str> {
    check(db, now, STALE).await.unwrap().into_iter().map(|v| v.rule).collect()
}

async fn give(db: &DatabaseConnection, user: i64, amount: i64, key: &str) -> i64 {
    grant(db, user, amount, None, key, None, T0).await.unwrap().1
}

async fn wallet_of(db: &DatabaseConnection, user: i64) -> i64 {
    wallet_balance(db, user).await.unwrap()
}

async fn bal(db: &DatabaseConnection, account: i64) -> i64 {
    balance(db, account).await.unwrap()
}

async fn revenue_of(db: &DatabaseConnection) -> i64 {
    let id = revenue_account(db, T0).await.unwrap();
    bal(db, id).await
}

async fn external_of(db: &DatabaseConnection) -> i64 {
    let id = external_account(db, T0).await.unwrap();
    bal(db, id).await
}

async fn wallet_src(db: &DatabaseConnection, buyer: i64) -> HoldSource {
    HoldSource { buyer_id: buyer, account_id: wallet_account(db, buyer, T0).await.unwrap(), escrow_id: None }
}

fn escrow_src(e: &escrows::Model) -> HoldSource {
    HoldSource { buyer_id: e.buyer_id, account_id: e.account_id, escrow_id: Some(e.id) }
}

async fn escrow(db: &DatabaseConnection, buyer: i64, amount: i64, expires_at_ms: i64) -> escrows::Model {
    create_escrow(db, buyer, amount, EscrowScope::default(), expires_at_ms, T0).await.unwrap()
}

async fn hold(db: &DatabaseConnection, source: HoldSource, min: i64, max: i64, now: i64) -> holds::Model {
    open_hold(db, source, NODE, min, max, now).await.unwrap().expect("a hold")
}

async fn status_of(db: &DatabaseConnection, escrow_id: i64) -> String {
    find_escrow(db, escrow_id).await.unwrap().unwrap().status
}

async fn reload(db: &DatabaseConnection, hold_id: i64) -> holds::Model {
    find_hold(db, hold_id).await.unwrap().unwrap()
}

async fn settlement(
    db: &DatabaseConnection,
    h: &holds::Model,
    request_id: &str,
    cost: i64,
    seller: Option<i64>,
) -> Settlement {
    let seller_account_id = match seller {
        Some(user) => Some(wallet_account(db, user, T0).await.unwrap()),
        None => None,
    };
    Settlement {
        request_id: request_id.to_string(),
        hold_id: h.id,
        hold_account_id: h.account_id,
        source_account_id: h.source_account_id,
        cost,
        seller_account_id,
        revenue_account_id: revenue_account(db, T0).await.unwrap(),
        fee_bps: FEE,
    }
}

/// One settlement the way the usage writer does it: the settlement and its usage record in one transaction.
async fn settle_once(db: &DatabaseConnection, s: &Settlement, buyer: i64, now: i64) -> Result<Settled, LedgerError> {
    let txn = begin(db).await?;
    let settled = settle(&txn, s, now).await?;
    if !settled.duplicate && s.cost > 0 {
        insert_usage(&txn, &s.request_id, buyer, Some(s.hold_id), s.cost, settled.unpaid, now).await?;
    }
    txn.commit().await?;
    Ok(settled)
}

/// `settle_once`, retried on transient lock conflicts (as the writer retries a batch).
async fn settle_retrying(
    db: &DatabaseConnection,
    s: &Settlement,
    buyer: i64,
    now: i64,
) -> Result<Settled, LedgerError> {
    let mut attempt = 0u64;
    loop {
        match settle_once(db, s, buyer, now).await {
            Err(LedgerError::Db(e)) if is_transient(&e) && attempt < 100 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(2 + (attempt * 7 + s.request_id.len() as u64 * 3) % 23)).await;
            }
            other => return other,
        }
    }
}

async fn insert_usage(
    c: &impl ConnectionTrait,
    request_id: &str,
    buyer: i64,
    hold_id: Option<i64>,
    cost: i64,
    unpaid: i64,
    now: i64,
) -> Result<usage_records::Model, DbErr> {
    usage_records::ActiveModel {
        request_id: Set(request_id.to_string()),
        buyer_id: Set(buyer),
        buyer_key_id: Set(1),
        hosted_key_id: Set(None),
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
        created_at_ms: Set(now),
        cost_credits: Set(cost),
        unpaid_credits: Set(unpaid),
        hold_id: Set(hold_id),
        ..Default::default()
    }
    .insert(c)
    .await
}

async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute(Statement::from_string(db.get_database_backend(), sql.to_string())).await.unwrap();
}

async fn entries_for(db: &DatabaseConnection, request_id: &str, kind: &str) -> u64 {
    journal_entries::Entity::find()
        .filter(journal_entries::Column::RequestId.eq(request_id))
        .filter(journal_entries::Column::Kind.eq(kind))
        .count(db)
        .await
        .unwrap()
}

/// A second pool on the test's database, wider than `TestDb`'s four connections.
async fn wide_pool(t: &TestDb, connections: u32) -> DatabaseConnection {
    let backend = t.db.get_database_backend();
    let url = if backend == DbBackend::Sqlite {
        let row = t.db.query_one(Statement::from_string(backend, "PRAGMA database_list")).await.unwrap().unwrap();
        let file: String = row.try_get("", "file").unwrap();
        format!("sqlite://{file}")
    } else {
        let sql = "SELECT DATABASE() AS name";
        let row = t.db.query_one(Statement::from_string(backend, sql)).await.unwrap().unwrap();
        let name: String = row.try_get("", "name").unwrap();
        let server =
            std::env::var("TOKEX_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_string());
        format!("{server}/{name}")
    };
    crate::db::connect(&url, connections).await.unwrap()
}

// ---------------------------------------------------------------------------------------------------------
// Grants and escrows

#[tokio::test]
async fn grant_credits_the_wallet_once_per_key() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        let (posted, after) = grant(db, BUYER, 100, Some(9), "k1", Some("welcome".into()), T0).await.unwrap();
        let Posted::New(entry) = posted else { panic!("{l}: {posted:?}") };
        assert_eq!(after, 100, "{l}");
        // A retry (even with another amount) finds the entry and changes nothing.
        assert_eq!(grant(db, BUYER, 100, Some(9), "k1", None, T0).await.unwrap(), (Posted::Already(entry), 100), "{l}");
        assert_eq!(grant(db, BUYER, 55, None, "k1", None, T0).await.unwrap(), (Posted::Already(entry), 100), "{l}");
        let (posted, after) = grant(db, BUYER, 50, None, "k2", None, T0).await.unwrap();
        assert!(matches!(posted, Posted::New(e) if e != entry), "{l}: {posted:?}");
        assert_eq!(after, 150, "{l}");
        assert_eq!(external_of(db).await, -150, "{l}");
        assert_eq!(wallet_of(db, OTHER_BUYER).await, 0, "{l}");
        for amount in [0, -5] {
            let r = grant(db, BUYER, amount, None, "bad", None, T0).await;
            assert!(matches!(r, Err(LedgerError::Invalid(_))), "{l}: {r:?}");
        }
        assert_eq!(wallet_of(db, BUYER).await, 150, "{l}");
        assert_clean(db, T0, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn create_escrow_moves_credits_from_the_wallet_or_conflicts() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let r = create_escrow(db, BUYER, 101, EscrowScope::default(), T0 + DAY, T0).await;
        assert!(matches!(r, Err(LedgerError::Conflict(_))), "{l}: {r:?}");
        assert_eq!(wallet_of(db, BUYER).await, 100, "{l}");
        assert!(list_escrows(db, BUYER).await.unwrap().is_empty(), "{l}: the failed escrow was rolled back");
        let r = create_escrow(db, BUYER, 0, EscrowScope::default(), T0 + DAY, T0).await;
        assert!(matches!(r, Err(LedgerError::Invalid(_))), "{l}: {r:?}");
        let r = create_escrow(db, BUYER, 10, EscrowScope::default(), T0, T0).await;
        assert!(matches!(r, Err(LedgerError::Invalid(_))), "{l}: {r:?}");
        // A buyer without a wallet cannot fund anything.
        let r = create_escrow(db, OTHER_BUYER, 1, EscrowScope::default(), T0 + DAY, T0).await;
        assert!(matches!(r, Err(LedgerError::Conflict(_))), "{l}: {r:?}");

        let scope = EscrowScope { model: Some("m1".into()), hosted_key_id: None };
        let e1 = create_escrow(db, BUYER, 60, scope, T0 + DAY, T0).await.unwrap();
        assert_eq!((e1.buyer_id, e1.amount, e1.status.as_str()), (BUYER, 60, ESCROW_ACTIVE), "{l}");
        assert_eq!((e1.model.as_deref(), e1.hosted_key_id, e1.expires_at_ms), (Some("m1"), None, T0 + DAY), "{l}");
        assert_eq!(bal(db, e1.account_id).await, 60, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 40, "{l}");
        let scope = EscrowScope { model: None, hosted_key_id: Some(7) };
        let e2 = create_escrow(db, BUYER, 40, scope, T0 + DAY, T0).await.unwrap();
        assert_eq!(e2.hosted_key_id, Some(7), "{l}");
        assert_ne!(e1.account_id, e2.account_id, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 0, "{l}");
        let r = create_escrow(db, BUYER, 1, EscrowScope::default(), T0 + DAY, T0).await;
        assert!(matches!(r, Err(LedgerError::Conflict(_))), "{l}: {r:?}");
        assert_eq!(list_active_escrows(db).await.unwrap().len(), 2, "{l}");
        assert_clean(db, T0, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn close_escrow_returns_the_rest_once_and_only_to_its_buyer() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let e = escrow(db, BUYER, 70, T0 + DAY).await;
        let h = hold(db, escrow_src(&e), 20, 20, T0).await;
        assert_eq!(bal(db, e.account_id).await, 50, "{l}");

        let r = close_escrow(db, Some(OTHER_BUYER), e.id, ESCROW_RELEASED, T0).await;
        assert!(matches!(r, Err(LedgerError::NotFound(_))), "{l}: {r:?}");
        let r = close_escrow(db, Some(BUYER), e.id + 1000, ESCROW_RELEASED, T0).await;
        assert!(matches!(r, Err(LedgerError::NotFound(_))), "{l}: {r:?}");
        assert_eq!(status_of(db, e.id).await, ESCROW_ACTIVE, "{l}");

        let closed = close_escrow(db, Some(BUYER), e.id, ESCROW_RELEASED, T0 + 1).await.unwrap();
        assert_eq!((closed.status.as_str(), closed.closed_at_ms), (ESCROW_RELEASED, Some(T0 + 1)), "{l}");
        assert_eq!(bal(db, e.account_id).await, 0, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 80, "{l}");
        let r = close_escrow(db, Some(BUYER), e.id, ESCROW_RELEASED, T0 + 2).await;
        assert!(matches!(r, Err(LedgerError::Conflict(_))), "{l}: {r:?}");
        let r = close_escrow(db, None, e.id, ESCROW_EXPIRED, T0 + 2).await;
        assert!(matches!(r, Err(LedgerError::Conflict(_))), "{l}: {r:?}");
        assert_eq!(wallet_of(db, BUYER).await, 80, "{l}");
        // Nothing more can be drawn from it; the hold's 20 go to the wallet when it closes.
        assert!(open_hold(db, escrow_src(&e), NODE, 1, 5, T0 + 3).await.unwrap().is_none(), "{l}");
        assert_eq!(extend_hold(db, h.id, 1, 5, T0 + 3).await.unwrap(), 0, "{l}");
        assert_eq!(close_hold(db, h.id, T0 + 4).await.unwrap(), 20, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 100, "{l}");
        assert_eq!((bal(db, e.account_id).await, status_of(db, e.id).await), (0, ESCROW_RELEASED.to_string()), "{l}");
        assert_clean(db, T0 + 4, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn expire_escrows_returns_what_is_left_of_escrows_past_their_expiry() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let e1 = escrow(db, BUYER, 30, T0 + 1000).await;
        let e2 = escrow(db, BUYER, 20, T0 + 5000).await;
        let e3 = escrow(db, BUYER, 10, T0 + 1000).await;
        let e4 = escrow(db, BUYER, 5, T0 + 3000).await;
        close_escrow(db, Some(BUYER), e3.id, ESCROW_RELEASED, T0).await.unwrap();
        // e4 is spent completely and becomes exhausted.
        let h = hold(db, escrow_src(&e4), 5, 5, T0).await;
        let s = settlement(db, &h, "e4-req", 5, Some(SELLER)).await;
        settle_once(db, &s, BUYER, T0).await.unwrap();
        assert_eq!(close_hold(db, h.id, T0).await.unwrap(), 0, "{l}");
        assert_eq!(status_of(db, e4.id).await, ESCROW_EXHAUSTED, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 45, "{l}");

        assert_eq!(expire_escrows(db, T0 + 999).await.unwrap(), 0, "{l}");
        assert_eq!(expire_escrows(db, T0 + 1000).await.unwrap(), 1, "{l}");
        assert_eq!(status_of(db, e1.id).await, ESCROW_EXPIRED, "{l}");
        assert_eq!(status_of(db, e3.id).await, ESCROW_RELEASED, "{l}");
        assert_eq!(find_escrow(db, e1.id).await.unwrap().unwrap().closed_at_ms, Some(T0 + 1000), "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 75, "{l}");
        assert_eq!(expire_escrows(db, T0 + 1000).await.unwrap(), 0, "{l}");
        assert_eq!(expire_escrows(db, T0 + 3000).await.unwrap(), 1, "{l}: an exhausted escrow expires too");
        assert_eq!(status_of(db, e4.id).await, ESCROW_EXPIRED, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 75, "{l}");
        assert_eq!(expire_escrows(db, T0 + 10_000).await.unwrap(), 1, "{l}");
        assert_eq!(status_of(db, e2.id).await, ESCROW_EXPIRED, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 95, "{l}");
        let r = close_escrow(db, Some(BUYER), e2.id, ESCROW_RELEASED, T0 + 10_000).await;
        assert!(matches!(r, Err(LedgerError::Conflict(_))), "{l}: {r:?}");
        assert!(list_active_escrows(db).await.unwrap().is_empty(), "{l}");
        assert_clean(db, T0 + 10_000, l).await;
        t.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Holds

#[tokio::test]
async fn open_hold_takes_what_the_source_has_up_to_max() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let ws = wallet_src(db, BUYER).await;
        let h1 = hold(db, ws, 10, 30, T0).await;
        assert_eq!((h1.amount, h1.spent, h1.status.as_str()), (30, 0, HOLD_OPEN), "{l}");
        assert_eq!((h1.source_account_id, h1.escrow_id, h1.buyer_id), (ws.account_id, None, BUYER), "{l}");
        assert_eq!((h1.node_id.as_str(), h1.renewed_at_ms, h1.closed_at_ms), (NODE, T0, None), "{l}");
        assert_eq!(bal(db, h1.account_id).await, 30, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 70, "{l}");
        let h2 = hold(db, ws, 10, 100, T0).await;
        assert_eq!(h2.amount, 70, "{l}: capped by what the wallet has");
        assert_eq!(wallet_of(db, BUYER).await, 0, "{l}");
        assert!(open_hold(db, ws, NODE, 1, 5, T0).await.unwrap().is_none(), "{l}");
        for (min, max) in [(0, 5), (-1, 5), (5, 4)] {
            let r = open_hold(db, ws, NODE, min, max, T0).await;
            assert!(matches!(r, Err(LedgerError::Invalid(_))), "{l}: {r:?}");
        }
        give(db, BUYER, 5, "g2").await;
        assert!(open_hold(db, ws, NODE, 6, 10, T0).await.unwrap().is_none(), "{l}: below min");
        assert_eq!(wallet_of(db, BUYER).await, 5, "{l}");
        assert_eq!(hold(db, ws, 5, 10, T0).await.amount, 5, "{l}");
        assert_eq!(held_by_source(db, BUYER).await.unwrap(), BTreeMap::from([(ws.account_id, 105)]), "{l}");
        assert_eq!(open_holds_of_node(db, NODE).await.unwrap().len(), 3, "{l}");
        assert_clean(db, T0, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn open_hold_on_an_escrow_that_cannot_pay_returns_none() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        give(db, OTHER_BUYER, 100, "g2").await;
        let released = escrow(db, BUYER, 10, T0 + DAY).await;
        close_escrow(db, Some(BUYER), released.id, ESCROW_RELEASED, T0).await.unwrap();
        assert!(open_hold(db, escrow_src(&released), NODE, 1, 5, T0).await.unwrap().is_none(), "{l}: released");

        let expiring = escrow(db, BUYER, 10, T0 + 1000).await;
        assert!(
            open_hold(db, escrow_src(&expiring), NODE, 1, 5, T0 + 1000).await.unwrap().is_none(),
            "{l}: past expiry"
        );
        assert_eq!(expire_escrows(db, T0 + 1000).await.unwrap(), 1, "{l}");
        assert!(open_hold(db, escrow_src(&expiring), NODE, 1, 5, T0 + 1000).await.unwrap().is_none(), "{l}: expired");

        let spent = escrow(db, BUYER, 10, T0 + DAY).await;
        let h = hold(db, escrow_src(&spent), 10, 10, T0).await;
        assert!(open_hold(db, escrow_src(&spent), NODE, 1, 5, T0).await.unwrap().is_none(), "{l}: empty");
        settle_once(db, &settlement(db, &h, "spent", 10, None).await, BUYER, T0).await.unwrap();
        close_hold(db, h.id, T0).await.unwrap();
        assert_eq!(status_of(db, spent.id).await, ESCROW_EXHAUSTED, "{l}");
        assert!(open_hold(db, escrow_src(&spent), NODE, 1, 5, T0).await.unwrap().is_none(), "{l}: exhausted");

        // Somebody else's escrow.
        let theirs = escrow(db, OTHER_BUYER, 10, T0 + DAY).await;
        let wrong = HoldSource { buyer_id: BUYER, ..escrow_src(&theirs) };
        assert!(open_hold(db, wrong, NODE, 1, 5, T0).await.unwrap().is_none(), "{l}: not the buyer's");
        assert_eq!(bal(db, theirs.account_id).await, 10, "{l}");
        assert_eq!(hold(db, escrow_src(&theirs), 1, 5, T0).await.amount, 5, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 90, "{l}");
        assert_clean(db, T0 + 1000, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn extend_hold_adds_from_the_source_while_the_hold_is_open() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 10, 10, T0).await;
        assert_eq!(extend_hold(db, h.id, 5, 20, T0 + 5).await.unwrap(), 20, "{l}");
        let now = reload(db, h.id).await;
        assert_eq!((now.amount, now.renewed_at_ms), (30, T0 + 5), "{l}");
        assert_eq!((bal(db, h.account_id).await, wallet_of(db, BUYER).await), (30, 70), "{l}");
        assert_eq!(extend_hold(db, h.id, 80, 100, T0).await.unwrap(), 0, "{l}: the wallet has less than min");
        assert_eq!((bal(db, h.account_id).await, wallet_of(db, BUYER).await), (30, 70), "{l}");
        assert_eq!(extend_hold(db, h.id, 1, 1000, T0).await.unwrap(), 70, "{l}");
        assert_eq!(extend_hold(db, h.id, 1, 1, T0).await.unwrap(), 0, "{l}");
        assert_eq!(reload(db, h.id).await.amount, 100, "{l}");
        let r = extend_hold(db, h.id + 1000, 1, 1, T0).await;
        assert!(matches!(r, Err(LedgerError::NotFound(_))), "{l}: {r:?}");
        let r = extend_hold(db, h.id, 2, 1, T0).await;
        assert!(matches!(r, Err(LedgerError::Invalid(_))), "{l}: {r:?}");
        assert_eq!(close_hold(db, h.id, T0).await.unwrap(), 100, "{l}");
        give(db, BUYER, 10, "g2").await;
        assert_eq!(extend_hold(db, h.id, 1, 5, T0).await.unwrap(), 0, "{l}: closed");
        assert_eq!(wallet_of(db, BUYER).await, 110, "{l}");

        let e = escrow(db, BUYER, 50, T0 + DAY).await;
        let h2 = hold(db, escrow_src(&e), 10, 10, T0).await;
        assert_eq!(extend_hold(db, h2.id, 10, 20, T0).await.unwrap(), 20, "{l}");
        assert_eq!(bal(db, e.account_id).await, 20, "{l}");
        close_escrow(db, Some(BUYER), e.id, ESCROW_RELEASED, T0).await.unwrap();
        assert_eq!(extend_hold(db, h2.id, 1, 5, T0).await.unwrap(), 0, "{l}: the escrow was released");
        assert_eq!(reload(db, h2.id).await.amount, 30, "{l}");
        assert_clean(db, T0 + 5, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn close_hold_returns_the_rest_to_its_source() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 1000, "g").await;
        let r = close_hold(db, 12345, T0).await;
        assert!(matches!(r, Err(LedgerError::NotFound(_))), "{l}: {r:?}");

        // Back to an active escrow, which stays active with credits in it.
        let e = escrow(db, BUYER, 60, T0 + DAY).await;
        let h = hold(db, escrow_src(&e), 40, 40, T0).await;
        settle_once(db, &settlement(db, &h, "a", 15, Some(SELLER)).await, BUYER, T0).await.unwrap();
        assert_eq!(close_hold(db, h.id, T0 + 7).await.unwrap(), 25, "{l}");
        let closed = reload(db, h.id).await;
        assert_eq!((closed.status.as_str(), closed.closed_at_ms, closed.spent), (HOLD_CLOSED, Some(T0 + 7), 15), "{l}");
        assert_eq!((bal(db, e.account_id).await, bal(db, h.account_id).await), (45, 0), "{l}");
        assert_eq!(status_of(db, e.id).await, ESCROW_ACTIVE, "{l}");
        assert_eq!(close_hold(db, h.id, T0 + 8).await.unwrap(), 0, "{l}: closing twice");
        assert_eq!(bal(db, e.account_id).await, 45, "{l}");

        // An escrow emptied by two holds becomes exhausted when the last of them closes.
        let e2 = escrow(db, BUYER, 20, T0 + DAY).await;
        let h2 = hold(db, escrow_src(&e2), 10, 10, T0).await;
        let h3 = hold(db, escrow_src(&e2), 10, 10, T0).await;
        settle_once(db, &settlement(db, &h2, "b", 10, Some(SELLER)).await, BUYER, T0).await.unwrap();
        settle_once(db, &settlement(db, &h3, "c", 10, None).await, BUYER, T0).await.unwrap();
        assert_eq!(close_hold(db, h2.id, T0).await.unwrap(), 0, "{l}");
        assert_eq!(status_of(db, e2.id).await, ESCROW_ACTIVE, "{l}: h3 is still open");
        assert_eq!(close_hold(db, h3.id, T0 + 9).await.unwrap(), 0, "{l}");
        let exhausted = find_escrow(db, e2.id).await.unwrap().unwrap();
        assert_eq!((exhausted.status.as_str(), exhausted.closed_at_ms), (ESCROW_EXHAUSTED, Some(T0 + 9)), "{l}");
        assert!(list_active_escrows(db).await.unwrap().iter().all(|x| x.id != e2.id), "{l}");

        // The escrow was released meanwhile: the rest goes to the wallet.
        let wallet = wallet_of(db, BUYER).await;
        let e3 = escrow(db, BUYER, 20, T0 + DAY).await;
        let h4 = hold(db, escrow_src(&e3), 15, 15, T0).await;
        close_escrow(db, Some(BUYER), e3.id, ESCROW_RELEASED, T0).await.unwrap();
        assert_eq!(wallet_of(db, BUYER).await, wallet - 15, "{l}");
        assert_eq!(close_hold(db, h4.id, T0).await.unwrap(), 15, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, wallet, "{l}");
        assert_eq!((bal(db, e3.account_id).await, status_of(db, e3.id).await), (0, ESCROW_RELEASED.into()), "{l}");

        // Past its expiry but not swept yet: the escrow can no longer pay, so the wallet gets it.
        let e4 = escrow(db, BUYER, 10, T0 + 1000).await;
        let h5 = hold(db, escrow_src(&e4), 10, 10, T0).await;
        assert_eq!(close_hold(db, h5.id, T0 + 1000).await.unwrap(), 10, "{l}");
        assert_eq!((bal(db, e4.account_id).await, wallet_of(db, BUYER).await), (0, wallet), "{l}");
        assert_eq!(expire_escrows(db, T0 + 1000).await.unwrap(), 1, "{l}");

        // A wallet hold goes back to the wallet.
        let h6 = hold(db, wallet_src(db, BUYER).await, 100, 100, T0).await;
        assert_eq!(wallet_of(db, BUYER).await, wallet - 100, "{l}");
        assert_eq!(close_hold(db, h6.id, T0 + 1000).await.unwrap(), 100, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, wallet, "{l}");
        assert_clean(db, T0 + 1000, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn stale_and_renewed_holds() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h1 = hold(db, wallet_src(db, BUYER).await, 10, 10, T0).await;
        let h2 = hold(db, wallet_src(db, BUYER).await, 10, 10, T0).await;
        renew_holds(db, &[h2.id], T0 + 30_000).await.unwrap();
        let stale: Vec<i64> = stale_holds(db, T0 + 1).await.unwrap().iter().map(|h| h.id).collect();
        assert_eq!(stale, vec![h1.id], "{l}");
        // Not renewed for longer than the stale window: check() reports it until it is closed.
        let found = violations(db, T0 + STALE + 1, STALE).await;
        assert!(!found.is_empty() && found.iter().all(|v| v.contains(&format!("hold {}", h1.id))), "{l}: {found:?}");
        assert!(found.iter().all(|v| v.starts_with("no_stale_hold") || v.contains("stale")), "{l}: {found:?}");
        assert_clean(db, T0 + STALE, l).await;
        close_hold(db, h1.id, T0 + STALE + 1).await.unwrap();
        renew_holds(db, &[h1.id], T0 + 2 * STALE).await.unwrap();
        assert_eq!(reload(db, h1.id).await.renewed_at_ms, T0, "{l}: a closed hold is not renewed");
        assert_clean(db, T0 + STALE + 30_000, l).await;
        t.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Settlement and refunds

#[test]
fn split_gives_the_seller_the_rounded_down_share() {
    assert_eq!(split(100, 500, true), (95, 5));
    assert_eq!(split(21, 500, true), (19, 2));
    assert_eq!(split(1, 500, true), (0, 1));
    assert_eq!(split(100, 500, false), (0, 100));
    assert_eq!(split(100, 0, true), (100, 0));
    assert_eq!(split(100, 10_000, true), (0, 100));
    assert_eq!(split(100, 20_000, true), (0, 100));
    assert_eq!(split(i64::MAX, 500, true).0 + split(i64::MAX, 500, true).1, i64::MAX);
    for paid in 0..2000 {
        let (seller, platform) = split(paid, 500, true);
        assert_eq!(seller, paid * 9500 / 10_000);
        assert_eq!(seller + platform, paid);
    }
}

#[tokio::test]
async fn settle_splits_95_5_to_the_credit() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 1_000_000, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 500_000, 500_000, T0).await;
        let costs = [1, 2, 19, 20, 21, 39, 40, 99, 100, 101, 199, 12_345, 99_999];
        let (mut seller_total, mut platform_total) = (0, 0);
        for (i, cost) in costs.into_iter().enumerate() {
            let s = settlement(db, &h, &format!("split-{i}"), cost, Some(SELLER)).await;
            let r = settle_once(db, &s, BUYER, T0 + i as i64).await.unwrap();
            let seller = cost * 9500 / 10_000;
            assert_eq!(r, Settled { paid: cost, unpaid: 0, seller, platform: cost - seller, duplicate: false }, "{l}");
            seller_total += seller;
            platform_total += cost - seller;
        }
        let s = settlement(db, &h, "exact", 12_345, Some(SELLER)).await;
        let r = settle_once(db, &s, BUYER, T0).await.unwrap();
        assert_eq!((r.seller, r.platform), (11_727, 618), "{l}");
        seller_total += 11_727;
        platform_total += 618;
        let total: i64 = costs.iter().sum::<i64>() + 12_345;
        assert_eq!(wallet_of(db, SELLER).await, seller_total, "{l}");
        assert_eq!(revenue_of(db).await, platform_total, "{l}");
        assert_eq!(seller_total + platform_total, total, "{l}");
        let now = reload(db, h.id).await;
        assert_eq!((now.spent, bal(db, h.account_id).await), (total, 500_000 - total), "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 500_000, "{l}");
        assert_clean(db, T0 + 20, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn settle_for_a_platform_key_pays_everything_to_revenue() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 50, 50, T0).await;
        let r = settle_once(db, &settlement(db, &h, "p1", 21, None).await, BUYER, T0).await.unwrap();
        assert_eq!(r, Settled { paid: 21, unpaid: 0, seller: 0, platform: 21, duplicate: false }, "{l}");
        assert_eq!((revenue_of(db).await, wallet_of(db, SELLER).await), (21, 0), "{l}");
        assert_eq!(bal(db, h.account_id).await, 29, "{l}");
        assert_clean(db, T0, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn settle_is_idempotent_by_request_id() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 200, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 100, 100, T0).await;
        let other = hold(db, wallet_src(db, BUYER).await, 50, 50, T0).await;
        let s = settlement(db, &h, "dup", 40, Some(SELLER)).await;
        let first = settle_once(db, &s, BUYER, T0).await.unwrap();
        assert_eq!(first, Settled { paid: 40, unpaid: 0, seller: 38, platform: 2, duplicate: false }, "{l}");
        let duplicate = Settled { duplicate: true, ..Settled::default() };
        assert_eq!(settle_once(db, &s, BUYER, T0 + 1).await.unwrap(), duplicate, "{l}");
        // Another cost, another hold, another seller: still the same request.
        let s2 = settlement(db, &other, "dup", 7, None).await;
        assert_eq!(settle_once(db, &s2, BUYER, T0 + 2).await.unwrap(), duplicate, "{l}");
        assert_eq!((bal(db, h.account_id).await, bal(db, other.account_id).await), (60, 50), "{l}");
        assert_eq!((reload(db, h.id).await.spent, reload(db, other.id).await.spent), (40, 0), "{l}");
        assert_eq!(reload(db, other.id).await.renewed_at_ms, T0, "{l}: a duplicate touches nothing");
        assert_eq!((wallet_of(db, SELLER).await, revenue_of(db).await), (38, 2), "{l}");
        assert_eq!(entries_for(db, "dup", "settle").await, 1, "{l}");
        // A request that cost nothing writes nothing.
        let free = settlement(db, &h, "free", 0, Some(SELLER)).await;
        assert_eq!(settle_once(db, &free, BUYER, T0).await.unwrap(), Settled::default(), "{l}");
        assert_eq!(entries_for(db, "free", "settle").await, 0, "{l}");
        assert_eq!(bal(db, h.account_id).await, 60, "{l}");
        assert_clean(db, T0 + 2, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn settle_takes_an_overrun_from_the_source_and_records_the_unpaid_rest() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 30, 30, T0).await;
        let r = settle_once(db, &settlement(db, &h, "o1", 50, Some(SELLER)).await, BUYER, T0).await.unwrap();
        assert_eq!(r, Settled { paid: 50, unpaid: 0, seller: 47, platform: 3, duplicate: false }, "{l}");
        assert_eq!((bal(db, h.account_id).await, wallet_of(db, BUYER).await), (0, 50), "{l}");
        assert_eq!(reload(db, h.id).await.spent, 30, "{l}: only what came from the hold");
        let r = settle_once(db, &settlement(db, &h, "o2", 80, Some(SELLER)).await, BUYER, T0).await.unwrap();
        assert_eq!(r, Settled { paid: 50, unpaid: 30, seller: 47, platform: 3, duplicate: false }, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 0, "{l}");
        let r = settle_once(db, &settlement(db, &h, "o3", 10, Some(SELLER)).await, BUYER, T0).await.unwrap();
        assert_eq!(r, Settled { paid: 0, unpaid: 10, seller: 0, platform: 0, duplicate: false }, "{l}");
        assert!(settle_once(db, &settlement(db, &h, "o3", 10, None).await, BUYER, T0).await.unwrap().duplicate, "{l}");
        assert_eq!((wallet_of(db, SELLER).await, revenue_of(db).await), (94, 6), "{l}");
        let usage = usage_records::Entity::find().all(db).await.unwrap();
        let unpaid: BTreeMap<String, i64> = usage.into_iter().map(|u| (u.request_id, u.unpaid_credits)).collect();
        assert_eq!(unpaid, BTreeMap::from([("o1".into(), 0), ("o2".into(), 30), ("o3".into(), 10)]), "{l}");

        // From an escrow source: the escrow pays the overrun.
        give(db, BUYER, 100, "g2").await;
        let e = escrow(db, BUYER, 100, T0 + DAY).await;
        let h2 = hold(db, escrow_src(&e), 10, 10, T0).await;
        let r = settle_once(db, &settlement(db, &h2, "o4", 25, None).await, BUYER, T0).await.unwrap();
        assert_eq!((r.paid, r.unpaid), (25, 0), "{l}");
        assert_eq!((bal(db, e.account_id).await, bal(db, h2.account_id).await), (75, 0), "{l}");
        assert_eq!(close_hold(db, h2.id, T0).await.unwrap(), 0, "{l}");
        assert_eq!(status_of(db, e.id).await, ESCROW_ACTIVE, "{l}");
        assert_clean(db, T0, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn refund_reverses_a_settlement_once() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 100, 100, T0).await;
        settle_once(db, &settlement(db, &h, "r1", 21, Some(SELLER)).await, BUYER, T0).await.unwrap();
        settle_once(db, &settlement(db, &h, "r2", 10, None).await, BUYER, T0).await.unwrap();
        assert_eq!((wallet_of(db, SELLER).await, revenue_of(db).await), (19, 12), "{l}");

        let (posted, total) = refund_request(db, "r1", BUYER, Some(99), Some("sorry".into()), T0).await.unwrap();
        let Posted::New(entry) = posted else { panic!("{l}: {posted:?}") };
        assert_eq!(total, 21, "{l}");
        assert_eq!((wallet_of(db, BUYER).await, wallet_of(db, SELLER).await, revenue_of(db).await), (21, 0, 10), "{l}");
        let again = refund_request(db, "r1", BUYER, Some(99), None, T0).await.unwrap();
        assert_eq!(again, (Posted::Already(entry), 21), "{l}");
        assert_eq!((wallet_of(db, BUYER).await, revenue_of(db).await), (21, 10), "{l}");
        let (posted, total) = refund_request(db, "r2", BUYER, None, None, T0).await.unwrap();
        assert!(matches!(posted, Posted::New(_)), "{l}");
        assert_eq!((total, wallet_of(db, BUYER).await, revenue_of(db).await), (10, 31, 0), "{l}");
        let r = refund_request(db, "never", BUYER, None, None, T0).await;
        assert!(matches!(r, Err(LedgerError::NotFound(_))), "{l}: {r:?}");
        assert_eq!(entries_for(db, "r1", "refund").await, 1, "{l}");

        // An overrun the buyer could not pay: the refund gives back what was paid, not the cost.
        let h2 = hold(db, wallet_src(db, BUYER).await, 31, 31, T0).await;
        let r = settle_once(db, &settlement(db, &h2, "r3", 40, Some(SELLER)).await, BUYER, T0).await.unwrap();
        assert_eq!((r.paid, r.unpaid), (31, 9), "{l}");
        assert_eq!(refund_request(db, "r3", BUYER, None, None, T0).await.unwrap().1, 31, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, 31, "{l}");
        assert_clean(db, T0, l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn refund_fails_and_changes_nothing_when_the_seller_spent_its_share() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 100, 100, T0).await;
        settle_once(db, &settlement(db, &h, "r1", 40, Some(SELLER)).await, BUYER, T0).await.unwrap();
        assert_eq!(wallet_of(db, SELLER).await, 38, "{l}");
        // The seller buys with its earnings.
        let e = escrow(db, SELLER, 30, T0 + DAY).await;
        let seller_wallet = wallet_account(db, SELLER, T0).await.unwrap();
        let r = refund_request(db, "r1", BUYER, None, None, T0).await;
        assert!(
            matches!(r, Err(LedgerError::InsufficientFunds { account_id }) if account_id == seller_wallet),
            "{l}: {r:?}"
        );
        assert_eq!((wallet_of(db, BUYER).await, wallet_of(db, SELLER).await, revenue_of(db).await), (0, 8, 2), "{l}");
        assert_eq!(entries_for(db, "r1", "refund").await, 0, "{l}");
        assert!(find_entry(db, "refund:r1").await.unwrap().is_none(), "{l}");
        assert_clean(db, T0, l).await;
        // Once the seller has the credits again, the refund goes through.
        close_escrow(db, Some(SELLER), e.id, ESCROW_RELEASED, T0).await.unwrap();
        let (posted, total) = refund_request(db, "r1", BUYER, None, None, T0).await.unwrap();
        assert!(matches!(posted, Posted::New(_)), "{l}");
        assert_eq!(total, 40, "{l}");
        assert_eq!((wallet_of(db, BUYER).await, wallet_of(db, SELLER).await, revenue_of(db).await), (40, 0, 0), "{l}");
        assert_clean(db, T0, l).await;
        t.cleanup().await;
    }
}

/// A buyer's request served by the buyer's own seller key, with an overrun paid from the wallet: the wallet's
/// debit (the overrun, 20) and credit (the seller share, 28) are one account in one entry. (When `post()`
/// merged them into one posting of +8, the settlement's debits (10) were less than what was paid (30) and
/// `check()` reported `usage_settled` although every balance was right.)
#[tokio::test]
async fn check_accepts_a_request_served_by_the_buyers_own_key() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 10, 10, T0).await;
        let r = settle_once(db, &settlement(db, &h, "own", 30, Some(BUYER)).await, BUYER, T0).await.unwrap();
        assert_eq!(r, Settled { paid: 30, unpaid: 0, seller: 28, platform: 2, duplicate: false }, "{l}");
        assert_eq!((wallet_of(db, BUYER).await, revenue_of(db).await), (98, 2), "{l}");
        let found = check(db, T0, STALE).await.unwrap();
        assert!(found.is_empty(), "{l}: {found:?}");
        t.cleanup().await;
    }
}

/// The same request refunded: the wallet is back at 100 and `refund_request` reports the 30 that were paid
/// (with merged postings it reported the sum of the settlement's credits, 10).
#[tokio::test]
async fn refund_of_a_request_served_by_the_buyers_own_key_reports_what_was_paid() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, 10, 10, T0).await;
        settle_once(db, &settlement(db, &h, "own", 30, Some(BUYER)).await, BUYER, T0).await.unwrap();
        let (posted, total) = refund_request(db, "own", BUYER, None, None, T0).await.unwrap();
        assert!(matches!(posted, Posted::New(_)), "{l}");
        assert_eq!((wallet_of(db, BUYER).await + bal(db, h.account_id).await, revenue_of(db).await), (100, 0), "{l}");
        assert_eq!(total, 30, "{l}");
        t.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// check() finds a corrupted ledger

/// Also on MariaDB, where `SUM()` is a DECIMAL (`check()` once failed there decoding it as BIGINT).
#[tokio::test]
async fn check_detects_a_corrupted_ledger() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        let now = T0 + 10;
        give(db, BUYER, 100, "g").await;
        let e = escrow(db, BUYER, 60, T0 + DAY).await;
        let h = hold(db, escrow_src(&e), 30, 30, T0).await;
        let h_closed = hold(db, escrow_src(&e), 5, 5, T0).await;
        close_hold(db, h_closed.id, T0).await.unwrap();
        settle_once(db, &settlement(db, &h, "paid", 12, Some(SELLER)).await, BUYER, now).await.unwrap();
        // A usage record that cost nothing needs no settlement.
        insert_usage(db, "free", BUYER, Some(h.id), 0, 0, now).await.unwrap();
        renew_holds(db, &[h.id], now).await.unwrap();
        assert_clean(db, now, l).await;
        let wallet = wallet_account(db, BUYER, T0).await.unwrap();

        // A balance changed without a posting.
        exec(db, &format!("UPDATE accounts SET balance = balance + 1 WHERE id = {wallet}")).await;
        assert_eq!(rules(db, now).await, BTreeSet::from(["balance_matches_postings", "ledger_sums_to_zero"]), "{l}");
        exec(db, &format!("UPDATE accounts SET balance = balance - 1 WHERE id = {wallet}")).await;
        assert_clean(db, now, l).await;

        // A posting deleted.
        let grant_posting = postings::Entity::find()
            .filter(postings::Column::AccountId.eq(wallet))
            .filter(postings::Column::Amount.eq(100))
            .one(db)
            .await
            .unwrap()
            .unwrap();
        postings::Entity::delete_by_id(grant_posting.id).exec(db).await.unwrap();
        let found = rules(db, now).await;
        assert!(found.contains("entry_balances") && found.contains("balance_matches_postings"), "{l}: {found:?}");
        postings::ActiveModel::from(grant_posting.clone()).reset_all().insert(db).await.unwrap();
        assert_clean(db, now, l).await;

        // A posting changed.
        exec(db, &format!("UPDATE postings SET amount = amount + 3 WHERE id = {}", grant_posting.id)).await;
        let found = rules(db, now).await;
        assert!(found.contains("entry_balances") && found.contains("balance_matches_postings"), "{l}: {found:?}");
        exec(db, &format!("UPDATE postings SET amount = amount - 3 WHERE id = {}", grant_posting.id)).await;
        assert_clean(db, now, l).await;

        // A hold nobody renews.
        exec(db, &format!("UPDATE holds SET renewed_at_ms = {} WHERE id = {}", now - 10 * STALE, h.id)).await;
        assert_eq!(rules(db, now).await, BTreeSet::from(["no_stale_hold"]), "{l}");
        renew_holds(db, &[h.id], now).await.unwrap();
        assert_clean(db, now, l).await;

        // A hold's bookkeeping off.
        exec(db, &format!("UPDATE holds SET spent = spent + 1 WHERE id = {}", h.id)).await;
        assert_eq!(rules(db, now).await, BTreeSet::from(["hold_accounting"]), "{l}");
        exec(db, &format!("UPDATE holds SET spent = spent - 1 WHERE id = {}", h.id)).await;
        // A closed hold that still holds credits.
        exec(db, &format!("UPDATE holds SET status = 'closed' WHERE id = {}", h.id)).await;
        assert_eq!(rules(db, now).await, BTreeSet::from(["closed_hold_empty"]), "{l}");
        exec(db, &format!("UPDATE holds SET status = 'open' WHERE id = {}", h.id)).await;
        assert_clean(db, now, l).await;

        // A billed request without its settlement, and one settled short.
        let ghost = insert_usage(db, "ghost", BUYER, Some(h.id), 30, 0, now).await.unwrap();
        assert_eq!(rules(db, now).await, BTreeSet::from(["usage_settled"]), "{l}");
        usage_records::Entity::delete_by_id(ghost.id).exec(db).await.unwrap();
        exec(db, "UPDATE usage_records SET cost_credits = cost_credits + 1 WHERE request_id = 'paid'").await;
        assert_eq!(rules(db, now).await, BTreeSet::from(["usage_settled"]), "{l}");
        exec(db, "UPDATE usage_records SET cost_credits = cost_credits - 1 WHERE request_id = 'paid'").await;
        assert_clean(db, now, l).await;

        // A settlement that says the seller got more, and the platform less, than the entry moved.
        let seller_more =
            "UPDATE settlements SET seller = seller + 1, platform = platform - 1 WHERE request_id = 'paid'";
        exec(db, seller_more).await;
        assert_eq!(rules(db, now).await, BTreeSet::from(["settlement_matches_entry"]), "{l}");
        exec(db, "UPDATE settlements SET seller = seller - 1, platform = platform + 1 WHERE request_id = 'paid'").await;
        // A settlement without its usage record.
        let paid = find_settlement(db, "paid").await.unwrap().unwrap();
        let orphan = settlements::ActiveModel {
            request_id: Set("orphan".into()),
            paid: Set(0),
            seller: Set(0),
            platform: Set(0),
            seller_account_id: Set(None),
            ..paid.into()
        }
        .insert(db)
        .await
        .unwrap();
        assert_eq!(rules(db, now).await, BTreeSet::from(["usage_settled"]), "{l}");
        settlements::Entity::delete_by_id(orphan.request_id).exec(db).await.unwrap();
        // An entry that moves nothing.
        let empty = journal_entries::ActiveModel {
            idempotency_key: Set("grant:empty".into()),
            kind: Set("grant".into()),
            request_id: Set(None),
            actor_id: Set(None),
            memo: Set(None),
            created_at_ms: Set(now),
            ..Default::default()
        }
        .insert(db)
        .await
        .unwrap();
        assert_eq!(rules(db, now).await, BTreeSet::from(["entry_has_postings"]), "{l}");
        journal_entries::Entity::delete_by_id(empty.id).exec(db).await.unwrap();
        assert_clean(db, now, l).await;
        t.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Concurrency

/// Runs `n` copies of `op` at once (released together by a barrier) and returns their results in order.
async fn concurrently<T, F, Fut>(n: usize, op: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let fut = op(i);
            tokio::spawn(async move {
                barrier.wait().await;
                fut.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// 50 tasks open a hold of exactly S at once on a source that has K × S: K get one, the others `Ok(None)`
/// (on MariaDB they once got `InsufficientFunds`: the wallet's balance was read without a lock).
async fn concurrent_open_holds(from_escrow: bool) {
    const K: i64 = 7;
    const S: i64 = 13;
    for t in TestDb::all().await {
        let l = t.label;
        let pool = wide_pool(&t, 16).await;
        let db = &pool;
        let source = if from_escrow {
            give(db, BUYER, K * S + 5, "g").await;
            let e = escrow(db, BUYER, K * S, T0 + DAY).await;
            escrow_src(&e)
        } else {
            give(db, BUYER, K * S, "g").await;
            wallet_src(db, BUYER).await
        };
        let results = concurrently(50, |i| {
            let db = pool.clone();
            async move { open_hold(&db, source, &format!("node-{i}"), S, S, T0).await }
        })
        .await;
        let opened: Vec<&holds::Model> =
            results.iter().filter_map(|r| r.as_ref().ok().and_then(Option::as_ref)).collect();
        let errors: Vec<&LedgerError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(errors.is_empty(), "{l}: open_hold failed instead of returning None: {errors:?}");
        assert_eq!(opened.len(), K as usize, "{l}");
        assert!(opened.iter().all(|h| h.amount == S), "{l}");
        assert_eq!(bal(db, source.account_id).await, 0, "{l}");
        let mut held = 0;
        for h in &opened {
            held += bal(db, h.account_id).await;
        }
        assert_eq!(held, K * S, "{l}");
        assert_clean(db, T0, l).await;
        pool.close().await.unwrap();
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_open_holds_never_overdraw_a_wallet() {
    concurrent_open_holds(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_open_holds_never_overdraw_an_escrow() {
    concurrent_open_holds(true).await;
}

/// 50 distinct requests and 10 retries of one more, settled at once against one hold of `hold_amount`
/// drawn from a wallet that keeps `wallet_rest`. Each request costs 7. Transient lock conflicts are retried
/// (as the usage writer retries a batch); nothing else may fail (overruns on MariaDB once failed with
/// `InsufficientFunds`: the hold's and the source's balances were read without a lock).
async fn concurrent_settles(hold_amount: i64, wallet_rest: i64) {
    const COST: i64 = 7;
    for t in TestDb::all().await {
        let l = t.label;
        let pool = wide_pool(&t, 16).await;
        let db = &pool;
        give(db, BUYER, hold_amount + wallet_rest, "g").await;
        let h = hold(db, wallet_src(db, BUYER).await, hold_amount, hold_amount, T0).await;
        let base = settlement(db, &h, "", COST, Some(SELLER)).await;
        let results = concurrently(60, |i| {
            let db = pool.clone();
            let s = Settlement { request_id: if i < 50 { format!("c-{i}") } else { "dup".into() }, ..base.clone() };
            async move { settle_retrying(&db, &s, BUYER, T0).await }
        })
        .await;
        let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err()).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{l}: settle failed: {errors:?}");
        let settled: Vec<Settled> = results.into_iter().map(Result::unwrap).collect();
        assert!(settled[..50].iter().all(|s| !s.duplicate), "{l}");
        assert_eq!(settled[50..].iter().filter(|s| !s.duplicate).count(), 1, "{l}: one settlement of 'dup'");
        let fresh: Vec<&Settled> = settled.iter().filter(|s| !s.duplicate).collect();
        assert!(fresh.iter().all(|s| s.paid + s.unpaid == COST), "{l}");
        let paid: i64 = fresh.iter().map(|s| s.paid).sum();
        let unpaid: i64 = fresh.iter().map(|s| s.unpaid).sum();
        assert_eq!(paid, (51 * COST).min(hold_amount + wallet_rest), "{l}");
        assert_eq!(unpaid, 51 * COST - paid, "{l}");
        let seller: i64 = fresh.iter().map(|s| s.seller).sum();
        let platform: i64 = fresh.iter().map(|s| s.platform).sum();
        assert_eq!((wallet_of(db, SELLER).await, revenue_of(db).await), (seller, platform), "{l}");
        let spent_from_hold = (51 * COST).min(hold_amount);
        assert_eq!(bal(db, h.account_id).await, hold_amount - spent_from_hold, "{l}");
        assert_eq!(reload(db, h.id).await.spent, spent_from_hold, "{l}");
        assert_eq!(wallet_of(db, BUYER).await, wallet_rest - (paid - spent_from_hold), "{l}");
        let settle_entries =
            journal_entries::Entity::find().filter(journal_entries::Column::Kind.eq("settle")).count(db).await.unwrap();
        assert_eq!(settle_entries, 51, "{l}");
        assert_eq!(entries_for(db, "dup", "settle").await, 1, "{l}");
        assert_eq!(usage_records::Entity::find().count(db).await.unwrap(), 51, "{l}");
        assert_clean(db, T0, l).await;
        pool.close().await.unwrap();
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_settles_against_one_hold_settle_each_request_once() {
    concurrent_settles(400, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_settles_overrunning_a_hold_settle_each_request_once() {
    concurrent_settles(100, 120).await;
}

/// Concurrent writers, on SQLite through `TestDb`'s pool of four connections: see
/// `concurrent_escrows_never_overdraw_the_wallet`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_grants_create_one_wallet_and_post_each_key_once() {
    for t in TestDb::all().await {
        let l = t.label;
        let pool = t.db.clone();
        // 20 distinct keys and 10 retries of one more, for a user without a wallet yet.
        let results = concurrently(30, |i| {
            let db = pool.clone();
            let key = if i < 20 { format!("k{i}") } else { "same".to_string() };
            async move { grant(&db, 77, 5 + i as i64 % 3, None, &key, None, T0).await }
        })
        .await;
        let posted: Vec<Posted> = results.into_iter().map(|r| r.unwrap().0).collect();
        assert!(posted[..20].iter().all(|p| matches!(p, Posted::New(_))), "{l}: {posted:?}");
        assert_eq!(posted[20..].iter().filter(|p| matches!(p, Posted::New(_))).count(), 1, "{l}: {posted:?}");
        let expected: i64 = (0..20).map(|i| 5 + i % 3).sum::<i64>();
        let wallets = accounts::Entity::find()
            .filter(accounts::Column::Kind.eq(WALLET))
            .filter(accounts::Column::OwnerId.eq(77))
            .all(&pool)
            .await
            .unwrap();
        assert_eq!(wallets.len(), 1, "{l}");
        let same = wallets[0].balance - expected;
        assert!((5..=7).contains(&same), "{l}: the retried grant counted once ({same})");
        assert_eq!(external_of(&pool).await, -wallets[0].balance, "{l}");
        assert_clean(&pool, T0, l).await;
        t.cleanup().await;
    }
}

/// 25 concurrent `create_escrow` calls, on SQLite through `TestDb`'s pool of four connections. (When ledger
/// transactions started deferred on SQLite — a read, then writes — upgrading to a writer while another
/// connection wrote failed at once with SQLITE_BUSY, which `busy_timeout` does not cover, and `in_txn!`'s
/// 8 retries, with the same backoff for every task, ran out: "database is locked".)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_escrows_never_overdraw_the_wallet() {
    for t in TestDb::all().await {
        let l = t.label;
        let pool = t.db.clone();
        give(&pool, BUYER, 100, "g").await;
        let results = concurrently(25, |_| {
            let db = pool.clone();
            async move { create_escrow(&db, BUYER, 10, EscrowScope::default(), T0 + DAY, T0).await }
        })
        .await;
        let created = results.iter().filter(|r| r.is_ok()).count();
        let unexpected: Vec<_> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter(|e| !matches!(e, LedgerError::Conflict(_)))
            .collect();
        assert!(unexpected.is_empty(), "{l}: {unexpected:?}");
        assert_eq!(created, 10, "{l}");
        assert_eq!(wallet_of(&pool, BUYER).await, 0, "{l}");
        assert_eq!(list_escrows(&pool, BUYER).await.unwrap().len(), 10, "{l}: the failed ones left no row");
        assert_clean(&pool, T0, l).await;
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_closes_return_the_rest_once() {
    for t in TestDb::all().await {
        let l = t.label;
        let pool = wide_pool(&t, 16).await;
        give(&pool, BUYER, 100, "g").await;
        let e = escrow(&pool, BUYER, 60, T0 + 1000).await;
        let h = hold(&pool, escrow_src(&e), 25, 25, T0).await;
        // Ten closes of one hold, while the escrow is released and expired by others.
        let results = concurrently(14, |i| {
            let db = pool.clone();
            async move {
                match i {
                    0..=9 => close_hold(&db, h.id, T0 + 1000).await.map(|n| format!("hold {n}")),
                    10 | 11 => close_escrow(&db, Some(BUYER), e.id, ESCROW_RELEASED, T0 + 1000).await.map(|e| e.status),
                    _ => expire_escrows(&db, T0 + 1000).await.map(|n| format!("expired {n}")),
                }
            }
        })
        .await;
        let hold_rests: Vec<&String> = results[..10].iter().map(|r| r.as_ref().unwrap()).collect();
        assert_eq!(hold_rests.iter().filter(|r| **r == "hold 25").count(), 1, "{l}: {hold_rests:?}");
        assert!(hold_rests.iter().all(|r| *r == "hold 25" || *r == "hold 0"), "{l}: {hold_rests:?}");
        let releases: Vec<&Result<String, LedgerError>> = results[10..12].iter().collect();
        let expiries: Vec<&Result<String, LedgerError>> = results[12..].iter().collect();
        let released = releases.iter().filter(|r| r.is_ok()).count();
        let expired: usize = expiries
            .iter()
            .map(|r| match r {
                Ok(s) => s.trim_start_matches("expired ").parse::<usize>().unwrap(),
                Err(e) => panic!("{l}: expire_escrows failed: {e}"),
            })
            .sum();
        assert_eq!(released + expired, 1, "{l}: {releases:?} {expiries:?}");
        assert!(releases.iter().all(|r| matches!(r, Ok(_) | Err(LedgerError::Conflict(_)))), "{l}: {releases:?}");
        assert_eq!((wallet_of(&pool, BUYER).await, bal(&pool, e.account_id).await), (100, 0), "{l}");
        assert_clean(&pool, T0 + 1000, l).await;
        pool.close().await.unwrap();
        t.cleanup().await;
    }
}

#[tokio::test]
async fn balances_cannot_go_negative_even_by_raw_sql() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 10, "g").await;
        let wallet = wallet_account(db, BUYER, T0).await.unwrap();
        let sql = format!("UPDATE accounts SET balance = -1 WHERE id = {wallet}");
        let r = db.execute(Statement::from_string(db.get_database_backend(), sql)).await;
        assert!(r.is_err(), "{l}: the CHECK constraint let a wallet go negative");
        assert_eq!(wallet_of(db, BUYER).await, 10, "{l}");
        t.cleanup().await;
    }
}

/// docs/ledger.md: "once it is empty it is `exhausted`", also when the overrun of a settlement that arrives
/// after its hold was closed empties it (once only `close_hold` marked escrows exhausted).
#[tokio::test]
async fn an_escrow_emptied_by_a_late_settlement_is_exhausted() {
    for t in TestDb::all().await {
        let (db, l) = (&t.db, t.label);
        give(db, BUYER, 100, "g").await;
        let e = escrow(db, BUYER, 20, T0 + DAY).await;
        let h = hold(db, escrow_src(&e), 10, 10, T0).await;
        settle_once(db, &settlement(db, &h, "a", 10, None).await, BUYER, T0).await.unwrap();
        assert_eq!(close_hold(db, h.id, T0).await.unwrap(), 0, "{l}");
        let late = settle_once(db, &settlement(db, &h, "late", 10, None).await, BUYER, T0).await.unwrap();
        assert_eq!((late.paid, bal(db, e.account_id).await), (10, 0), "{l}");
        assert_clean(db, T0, l).await;
        assert_eq!(status_of(db, e.id).await, ESCROW_EXHAUSTED, "{l}");
        t.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Interleavings: an operation that runs while another transaction holds uncommitted debits on the same
// account. The other transaction is a settlement whose overrun debits the hold's source (the usage writer
// of a node, while the admin API or another node works on the same buyer). On MariaDB (READ COMMITTED)
// these operations once read the balance without a lock, and their guarded debit then failed with
// `InsufficientFunds` once the other transaction committed.

/// Starts `op`, lets it run into the locks of `txn` (uncommitted), then commits `txn` and returns `op`'s result.
async fn while_uncommitted<T: Send + 'static>(
    txn: DatabaseTransaction,
    op: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let task = tokio::spawn(op);
    tokio::time::sleep(Duration::from_millis(400)).await;
    txn.commit().await.unwrap();
    task.await.unwrap()
}

/// A hold of 10 from `source` and an uncommitted settlement of 30 against it: 10 from the hold, 20 from the
/// source.
async fn uncommitted_overrun(db: &DatabaseConnection, source: HoldSource, request_id: &str) -> DatabaseTransaction {
    let h = hold(db, source, 10, 10, T0).await;
    let s = settlement(db, &h, request_id, 30, Some(SELLER)).await;
    let txn = begin(db).await.unwrap();
    let r = settle(&txn, &s, T0).await.unwrap();
    assert_eq!((r.paid, r.unpaid), (30, 0));
    insert_usage(&txn, request_id, source.buyer_id, Some(h.id), 30, 0, T0).await.unwrap();
    txn
}

async fn race_close_escrow(t: TestDb) {
    let (db, l) = (&t.db, t.label);
    give(db, BUYER, 100, "g").await;
    let e = escrow(db, BUYER, 100, T0 + DAY).await;
    let txn = uncommitted_overrun(db, escrow_src(&e), "race").await;
    let db2 = db.clone();
    let closed =
        while_uncommitted(txn, async move { close_escrow(&db2, Some(BUYER), e.id, ESCROW_RELEASED, T0).await }).await;
    assert!(closed.is_ok(), "{l}: close_escrow failed: {closed:?}");
    assert_eq!((wallet_of(db, BUYER).await, bal(db, e.account_id).await), (70, 0), "{l}");
    assert_eq!(status_of(db, e.id).await, ESCROW_RELEASED, "{l}");
    assert_clean(db, T0, l).await;
    t.cleanup().await;
}

async fn race_open_hold(t: TestDb) {
    let (db, l) = (&t.db, t.label);
    give(db, BUYER, 100, "g").await;
    let ws = wallet_src(db, BUYER).await;
    let txn = uncommitted_overrun(db, ws, "race").await;
    let db2 = db.clone();
    let opened = while_uncommitted(txn, async move { open_hold(&db2, ws, NODE, 1, 1000, T0).await }).await;
    assert!(matches!(opened, Ok(Some(ref h)) if h.amount == 70), "{l}: {opened:?}");
    assert_eq!(wallet_of(db, BUYER).await, 0, "{l}");
    assert_clean(db, T0, l).await;
    t.cleanup().await;
}

async fn race_extend_hold(t: TestDb) {
    let (db, l) = (&t.db, t.label);
    give(db, BUYER, 100, "g").await;
    let ws = wallet_src(db, BUYER).await;
    let h = hold(db, ws, 5, 5, T0).await;
    let txn = uncommitted_overrun(db, ws, "race").await;
    let db2 = db.clone();
    let added = while_uncommitted(txn, async move { extend_hold(&db2, h.id, 1, 1000, T0).await }).await;
    assert!(matches!(added, Ok(65)), "{l}: {added:?}");
    assert_eq!(wallet_of(db, BUYER).await, 0, "{l}");
    assert_clean(db, T0, l).await;
    t.cleanup().await;
}

async fn race_settle(t: TestDb) {
    let (db, l) = (&t.db, t.label);
    give(db, BUYER, 100, "g").await;
    let ws = wallet_src(db, BUYER).await;
    let h = hold(db, ws, 10, 10, T0).await;
    let txn = uncommitted_overrun(db, ws, "race").await;
    // The wallet has 80 - 20 = 60 once `txn` commits; this request costs 80: 10 from its hold, 60 from the
    // wallet, 10 unpaid.
    let s = settlement(db, &h, "second", 80, Some(SELLER)).await;
    let db2 = db.clone();
    let settled = while_uncommitted(txn, async move { settle_retrying(&db2, &s, BUYER, T0).await }).await;
    assert!(matches!(settled, Ok(Settled { paid: 70, unpaid: 10, .. })), "{l}: {settled:?}");
    assert_eq!(wallet_of(db, BUYER).await, 0, "{l}");
    assert_clean(db, T0, l).await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_escrow_while_a_settlement_overrun_is_uncommitted() {
    for t in TestDb::all().await {
        race_close_escrow(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_hold_while_a_settlement_overrun_is_uncommitted() {
    for t in TestDb::all().await {
        race_open_hold(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_hold_while_a_settlement_overrun_is_uncommitted() {
    for t in TestDb::all().await {
        race_extend_hold(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_while_another_overrun_is_uncommitted() {
    for t in TestDb::all().await {
        race_settle(t).await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Model-based property test: random operation sequences against an in-memory model of docs/ledger.md.

const TICK: i64 = 1000;
const MODEL_BUYERS: [i64; 3] = [1, 2, 3];
/// User 3 buys and sells (its earnings can fund its escrows, so a refund can find them spent).
const MODEL_SELLERS: [i64; 2] = [3, 4];
const MODEL_USERS: [i64; 4] = [1, 2, 3, 4];

#[derive(Clone, Copy, Debug)]
enum ScopeKind {
    Any,
    Model,
    Key,
}

#[derive(Clone, Debug)]
enum Op {
    Grant {
        user: usize,
        amount: i64,
        key: u8,
    },
    CreateEscrow {
        buyer: usize,
        amount: i64,
        scope: ScopeKind,
        expires_in: i64,
    },
    /// On the buyer's wallet, or on an escrow (for the escrow's buyer). `extra`: max - min.
    OpenHold {
        buyer: usize,
        source: SourceRef,
        min: i64,
        extra: i64,
    },
    /// Holds are picked by `HoldRef`.
    ExtendHold {
        hold: HoldRef,
        min: i64,
        extra: i64,
    },
    /// `cost: None`: exactly what is left in the hold (at least 1), so that holds and escrows run dry.
    Settle {
        hold: HoldRef,
        request: u8,
        cost: Option<i64>,
        seller: Option<usize>,
    },
    CloseHold {
        hold: HoldRef,
    },
    ReleaseEscrow {
        escrow: Index,
        wrong_buyer: bool,
    },
    AdvanceClock {
        ticks: i64,
    },
    ExpireEscrows,
    Refund {
        request: u8,
    },
}

#[derive(Clone, Debug)]
enum SourceRef {
    Wallet,
    /// The latest escrow (the wallet if there is none).
    LatestEscrow,
    Escrow(Index),
}

/// One of the holds opened so far; None: the latest (so that a hold is opened, spent and closed in a few
/// steps more often than a uniform choice would allow).
type HoldRef = Option<Index>;

fn hold_ref() -> impl Strategy<Value = HoldRef> {
    proptest::option::weighted(0.35, any::<Index>())
}

fn pick(len: usize, hold: &HoldRef) -> usize {
    hold.as_ref().map_or(len - 1, |ix| ix.index(len))
}

fn source_ref() -> impl Strategy<Value = SourceRef> {
    prop_oneof![
        2 => Just(SourceRef::Wallet),
        2 => Just(SourceRef::LatestEscrow),
        1 => any::<Index>().prop_map(SourceRef::Escrow),
    ]
}

fn grant_strategy(users: usize) -> impl Strategy<Value = Op> {
    (0..users, 20..=300i64, 0..8u8).prop_map(|(user, amount, key)| Op::Grant { user, amount, key })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let scope = prop_oneof![Just(ScopeKind::Any), Just(ScopeKind::Model), Just(ScopeKind::Key)];
    prop_oneof![
        3 => grant_strategy(MODEL_USERS.len()),
        3 => (0..3usize, 1..=80i64, scope, 1..=10i64)
            .prop_map(|(buyer, amount, scope, expires_in)| Op::CreateEscrow { buyer, amount, scope, expires_in }),
        5 => (0..3usize, source_ref(), 1..=25i64, prop_oneof![3 => 0..=50i64, 1 => Just(1000i64)])
            .prop_map(|(buyer, source, min, extra)| Op::OpenHold { buyer, source, min, extra }),
        2 => (hold_ref(), 1..=20i64, 0..=40i64).prop_map(|(hold, min, extra)| Op::ExtendHold { hold, min, extra }),
        7 => (hold_ref(), 0..10u8, proptest::option::weighted(0.6, 0..=60i64), proptest::option::of(0..2usize))
            .prop_map(|(hold, request, cost, seller)| Op::Settle { hold, request, cost, seller }),
        3 => hold_ref().prop_map(|hold| Op::CloseHold { hold }),
        1 => (any::<Index>(), proptest::bool::weighted(0.2))
            .prop_map(|(escrow, wrong_buyer)| Op::ReleaseEscrow { escrow, wrong_buyer }),
        2 => (1..=2i64).prop_map(|ticks| Op::AdvanceClock { ticks }),
        2 => Just(Op::ExpireEscrows),
        2 => (0..10u8).prop_map(|request| Op::Refund { request }),
    ]
}

/// A few grants to buyers first (so that most operations have something to work with), then anything.
fn ops_strategy() -> impl Strategy<Value = Vec<Op>> {
    (
        proptest::collection::vec(grant_strategy(MODEL_BUYERS.len()), 1..=3),
        proptest::collection::vec(op_strategy(), 1..=38),
    )
        .prop_map(|(mut ops, more)| {
            ops.extend(more);
            ops
        })
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ErrKind {
    Insufficient,
    NotFound,
    Conflict,
    Invalid,
    Db(String),
}

fn err_kind(e: &LedgerError) -> ErrKind {
    match e {
        LedgerError::InsufficientFunds { .. } => ErrKind::Insufficient,
        LedgerError::NotFound(_) => ErrKind::NotFound,
        LedgerError::Conflict(_) => ErrKind::Conflict,
        LedgerError::Invalid(_) => ErrKind::Invalid,
        LedgerError::Db(e) => ErrKind::Db(e.to_string()),
    }
}

/// What an operation returned, as far as the model predicts it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Out {
    Skipped,
    Granted { new: bool, after: i64 },
    Escrow(Result<i64, ErrKind>),
    Hold(Result<Option<i64>, ErrKind>),
    Extended(Result<i64, ErrKind>),
    Settled(Result<Settled, ErrKind>),
    HoldClosed(Result<i64, ErrKind>),
    EscrowClosed(Result<String, ErrKind>),
    Expired(Result<usize, ErrKind>),
    Refunded(Result<(bool, i64), ErrKind>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Wallet,
    Escrow(usize),
}

#[derive(Clone, Debug)]
struct MEscrow {
    id: i64,
    account: i64,
    buyer: i64,
    balance: i64,
    status: &'static str,
    expires_at: i64,
}

#[derive(Clone, Debug)]
struct MHold {
    id: i64,
    account: i64,
    source_account: i64,
    buyer: i64,
    source: Src,
    balance: i64,
    open: bool,
    amount: i64,
    spent: i64,
}

#[derive(Clone, Debug)]
struct MSettle {
    buyer: i64,
    seller: Option<i64>,
    seller_share: i64,
    platform: i64,
    paid: i64,
}

#[derive(Debug, Default)]
struct Model {
    now: i64,
    wallets: BTreeMap<i64, i64>,
    external: i64,
    revenue: i64,
    escrows: Vec<MEscrow>,
    holds: Vec<MHold>,
    grants: HashSet<String>,
    settled: HashMap<String, MSettle>,
    refunded: HashSet<String>,
}

impl Model {
    fn wallet(&self, user: i64) -> i64 {
        self.wallets.get(&user).copied().unwrap_or(0)
    }

    fn wallet_mut(&mut self, user: i64) -> &mut i64 {
        self.wallets.entry(user).or_insert(0)
    }

    fn usable(&self, src: Src) -> bool {
        match src {
            Src::Wallet => true,
            Src::Escrow(i) => self.escrows[i].status == ESCROW_ACTIVE && self.escrows[i].expires_at > self.now,
        }
    }

    fn source_balance(&self, buyer: i64, src: Src) -> i64 {
        match src {
            Src::Wallet => self.wallet(buyer),
            Src::Escrow(i) => self.escrows[i].balance,
        }
    }

    fn source_mut(&mut self, buyer: i64, src: Src) -> &mut i64 {
        match src {
            Src::Wallet => self.wallet_mut(buyer),
            Src::Escrow(i) => &mut self.escrows[i].balance,
        }
    }

    /// An escrow's rest goes back to the wallet (release or expiry).
    fn end_escrow(&mut self, i: usize, status: &'static str) {
        let (buyer, rest) = (self.escrows[i].buyer, self.escrows[i].balance);
        *self.wallet_mut(buyer) += rest;
        self.escrows[i].balance = 0;
        self.escrows[i].status = status;
    }
}

async fn model_step(db: &DatabaseConnection, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let now = m.now;
    let (expected, actual) = match op.clone() {
        Op::Grant { user, amount, key } => {
            let user = MODEL_USERS[user];
            let key = format!("g{key}");
            let new = !m.grants.contains(&key);
            if new {
                m.grants.insert(key.clone());
                *m.wallet_mut(user) += amount;
                m.external -= amount;
            }
            let expected = Out::Granted { new, after: m.wallet(user) };
            let (posted, after) = grant(db, user, amount, None, &key, None, now).await.unwrap();
            (expected, Out::Granted { new: matches!(posted, Posted::New(_)), after })
        }
        Op::CreateEscrow { buyer, amount, scope, expires_in } => {
            let buyer = MODEL_BUYERS[buyer];
            let scope = match scope {
                ScopeKind::Any => EscrowScope::default(),
                ScopeKind::Model => EscrowScope { model: Some("m1".into()), hosted_key_id: None },
                ScopeKind::Key => EscrowScope { model: None, hosted_key_id: Some(7) },
            };
            let expires_at = now + expires_in * TICK;
            let expected = if m.wallet(buyer) < amount { Err(ErrKind::Conflict) } else { Ok(amount) };
            let actual = create_escrow(db, buyer, amount, scope, expires_at, now).await;
            if let (Ok(_), Ok(e)) = (&expected, &actual) {
                prop_assert_eq!((e.buyer_id, e.status.as_str(), e.expires_at_ms), (buyer, ESCROW_ACTIVE, expires_at));
                *m.wallet_mut(buyer) -= amount;
                let (id, account) = (e.id, e.account_id);
                m.escrows.push(MEscrow { id, account, buyer, balance: amount, status: ESCROW_ACTIVE, expires_at });
            }
            (Out::Escrow(expected), Out::Escrow(actual.map(|e| e.amount).map_err(|e| err_kind(&e))))
        }
        Op::OpenHold { buyer, source, min, extra } => {
            let n = m.escrows.len();
            let src = match source {
                SourceRef::LatestEscrow if n > 0 => Src::Escrow(n - 1),
                SourceRef::Escrow(ix) if n > 0 => Src::Escrow(ix.index(n)),
                _ => Src::Wallet,
            };
            let buyer = match src {
                Src::Escrow(i) => m.escrows[i].buyer,
                Src::Wallet => MODEL_BUYERS[buyer],
            };
            let source = match src {
                Src::Wallet => HoldSource {
                    buyer_id: buyer,
                    account_id: wallet_account(db, buyer, now).await.unwrap(),
                    escrow_id: None,
                },
                Src::Escrow(i) => {
                    HoldSource { buyer_id: buyer, account_id: m.escrows[i].account, escrow_id: Some(m.escrows[i].id) }
                }
            };
            let max = min + extra;
            let amount = m.source_balance(buyer, src).min(max);
            let expected = if m.usable(src) && amount >= min { Some(amount) } else { None };
            let actual = open_hold(db, source, NODE, min, max, now).await;
            if let (Some(amount), Ok(Some(h))) = (expected, &actual) {
                *m.source_mut(buyer, src) -= amount;
                m.holds.push(MHold {
                    id: h.id,
                    account: h.account_id,
                    source_account: source.account_id,
                    buyer,
                    source: src,
                    balance: amount,
                    open: true,
                    amount,
                    spent: 0,
                });
            }
            (Out::Hold(Ok(expected)), Out::Hold(actual.map(|h| h.map(|h| h.amount)).map_err(|e| err_kind(&e))))
        }
        Op::ExtendHold { hold, min, extra } => {
            if m.holds.is_empty() {
                return Ok(());
            }
            let i = pick(m.holds.len(), &hold);
            let h = m.holds[i].clone();
            let max = min + extra;
            let amount = m.source_balance(h.buyer, h.source).min(max);
            let expected = if m.usable(h.source) && h.open && amount >= min { amount } else { 0 };
            if expected > 0 {
                *m.source_mut(h.buyer, h.source) -= expected;
                m.holds[i].balance += expected;
                m.holds[i].amount += expected;
            }
            let actual = extend_hold(db, h.id, min, max, now).await;
            (Out::Extended(Ok(expected)), Out::Extended(actual.map_err(|e| err_kind(&e))))
        }
        Op::Settle { hold, request, cost, seller } => {
            if m.holds.is_empty() {
                return Ok(());
            }
            let i = pick(m.holds.len(), &hold);
            let h = m.holds[i].clone();
            let cost = cost.unwrap_or(h.balance.max(1));
            let request_id = format!("req-{request}");
            // User 3 may be served by its own key.
            let seller = seller.map(|s| MODEL_SELLERS[s]);
            let expected = if cost <= 0 {
                Settled::default()
            } else if m.settled.contains_key(&request_id) {
                Settled { duplicate: true, ..Settled::default() }
            } else {
                let from_hold = cost.min(h.balance);
                let from_source = (cost - from_hold).min(m.source_balance(h.buyer, h.source));
                let paid = from_hold + from_source;
                let seller_share = if seller.is_some() { paid * 9500 / 10_000 } else { 0 };
                let platform = paid - seller_share;
                m.holds[i].balance -= from_hold;
                m.holds[i].spent += from_hold;
                *m.source_mut(h.buyer, h.source) -= from_source;
                if let Some(seller) = seller {
                    *m.wallet_mut(seller) += seller_share;
                }
                m.revenue += platform;
                // An overrun that empties an escrow with no open hold left on it exhausts it.
                if let (true, Src::Escrow(e)) = (from_source > 0, h.source) {
                    let open = m.holds.iter().any(|o| o.open && o.source == h.source);
                    if m.escrows[e].balance == 0 && !open && m.escrows[e].status == ESCROW_ACTIVE {
                        m.escrows[e].status = ESCROW_EXHAUSTED;
                    }
                }
                m.settled.insert(request_id.clone(), MSettle { buyer: h.buyer, seller, seller_share, platform, paid });
                Settled { paid, unpaid: cost - paid, seller: seller_share, platform, duplicate: false }
            };
            let seller_account_id = match seller {
                Some(user) => Some(wallet_account(db, user, now).await.unwrap()),
                None => None,
            };
            let s = Settlement {
                request_id,
                hold_id: h.id,
                hold_account_id: h.account,
                source_account_id: h.source_account,
                cost,
                seller_account_id,
                revenue_account_id: revenue_account(db, now).await.unwrap(),
                fee_bps: FEE,
            };
            let actual = settle_once(db, &s, h.buyer, now).await;
            (Out::Settled(Ok(expected)), Out::Settled(actual.map_err(|e| err_kind(&e))))
        }
        Op::CloseHold { hold } => {
            if m.holds.is_empty() {
                return Ok(());
            }
            let i = pick(m.holds.len(), &hold);
            let h = m.holds[i].clone();
            let expected = if h.open { h.balance } else { 0 };
            if h.open {
                m.holds[i].open = false;
                m.holds[i].balance = 0;
                match h.source {
                    Src::Escrow(e) if m.usable(h.source) => {
                        m.escrows[e].balance += h.balance;
                        let others_open = m.holds.iter().any(|o| o.open && o.source == h.source);
                        if m.escrows[e].balance == 0 && !others_open {
                            m.escrows[e].status = ESCROW_EXHAUSTED;
                        }
                    }
                    _ => *m.wallet_mut(h.buyer) += h.balance,
                }
            }
            let actual = close_hold(db, h.id, now).await;
            (Out::HoldClosed(Ok(expected)), Out::HoldClosed(actual.map_err(|e| err_kind(&e))))
        }
        Op::ReleaseEscrow { escrow, wrong_buyer } => {
            if m.escrows.is_empty() {
                return Ok(());
            }
            let i = escrow.index(m.escrows.len());
            let e = m.escrows[i].clone();
            let caller = if wrong_buyer { MODEL_BUYERS.into_iter().find(|&b| b != e.buyer).unwrap() } else { e.buyer };
            let expected = if wrong_buyer {
                Err(ErrKind::NotFound)
            } else if e.status != ESCROW_ACTIVE && e.status != ESCROW_EXHAUSTED {
                Err(ErrKind::Conflict)
            } else {
                m.end_escrow(i, ESCROW_RELEASED);
                Ok(ESCROW_RELEASED.to_string())
            };
            let actual = close_escrow(db, Some(caller), e.id, ESCROW_RELEASED, now).await;
            (Out::EscrowClosed(expected), Out::EscrowClosed(actual.map(|e| e.status).map_err(|e| err_kind(&e))))
        }
        Op::AdvanceClock { ticks } => {
            m.now += ticks * TICK;
            (Out::Skipped, Out::Skipped)
        }
        Op::ExpireEscrows => {
            let due: Vec<usize> = (0..m.escrows.len())
                .filter(|&i| {
                    let e = &m.escrows[i];
                    (e.status == ESCROW_ACTIVE || e.status == ESCROW_EXHAUSTED) && e.expires_at <= now
                })
                .collect();
            for &i in &due {
                m.end_escrow(i, ESCROW_EXPIRED);
            }
            let actual = expire_escrows(db, now).await;
            (Out::Expired(Ok(due.len())), Out::Expired(actual.map_err(|e| err_kind(&e))))
        }
        Op::Refund { request } => {
            let request_id = format!("req-{request}");
            let record = m.settled.get(&request_id).cloned();
            let expected = match &record {
                None => Err(ErrKind::NotFound),
                Some(r) if m.refunded.contains(&request_id) => Ok((false, r.paid)),
                Some(r) => {
                    let mut wallets = m.wallets.clone();
                    if let Some(seller) = r.seller {
                        *wallets.entry(seller).or_insert(0) -= r.seller_share;
                    }
                    *wallets.entry(r.buyer).or_insert(0) += r.paid;
                    if wallets.values().any(|&b| b < 0) || m.revenue < r.platform {
                        Err(ErrKind::Insufficient)
                    } else {
                        m.wallets = wallets;
                        m.revenue -= r.platform;
                        m.refunded.insert(request_id.clone());
                        Ok((true, r.paid))
                    }
                }
            };
            let buyer = record.map_or(MODEL_BUYERS[0], |r| r.buyer);
            let actual = refund_request(db, &request_id, buyer, None, None, now).await;
            let actual = actual.map(|(posted, total)| (matches!(posted, Posted::New(_)), total));
            (Out::Refunded(expected), Out::Refunded(actual.map_err(|e| err_kind(&e))))
        }
    };
    prop_assert_eq!(actual, expected, "the operation's result");
    Ok(())
}

/// Compares every balance, escrow and hold with the model, and runs `check()`.
async fn model_compare(db: &DatabaseConnection, m: &Model) -> Result<(), TestCaseError> {
    let actual: BTreeMap<(String, i64, i64), i64> = accounts::Entity::find()
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.balance != 0)
        .map(|a| ((a.kind, a.owner_id, a.ref_id), a.balance))
        .collect();
    let mut expected = BTreeMap::new();
    for (&user, &b) in &m.wallets {
        expected.insert((WALLET.to_string(), user, 0), b);
    }
    for e in &m.escrows {
        expected.insert((ESCROW.to_string(), e.buyer, e.id), e.balance);
    }
    for h in &m.holds {
        expected.insert((HOLD.to_string(), h.buyer, h.id), h.balance);
    }
    expected.insert((REVENUE.to_string(), 0, 0), m.revenue);
    expected.insert((EXTERNAL.to_string(), 0, 0), m.external);
    expected.retain(|_, b| *b != 0);
    prop_assert_eq!(actual, expected, "balances");

    let actual: BTreeMap<i64, String> =
        escrows::Entity::find().all(db).await.unwrap().into_iter().map(|e| (e.id, e.status)).collect();
    let expected: BTreeMap<i64, String> = m.escrows.iter().map(|e| (e.id, e.status.to_string())).collect();
    prop_assert_eq!(actual, expected, "escrow statuses");

    let actual: BTreeMap<i64, (String, i64, i64)> = holds::Entity::find()
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.id, (h.status, h.amount, h.spent)))
        .collect();
    let expected: BTreeMap<i64, (String, i64, i64)> = m
        .holds
        .iter()
        .map(|h| (h.id, ((if h.open { HOLD_OPEN } else { HOLD_CLOSED }).to_string(), h.amount, h.spent)))
        .collect();
    prop_assert_eq!(actual, expected, "holds");

    // The clock moves without renewals: staleness is covered elsewhere.
    let found = violations(db, m.now, 1_000_000_000).await;
    prop_assert!(found.is_empty(), "ledger check found {:?}", found);
    Ok(())
}

async fn run_model(db: &DatabaseConnection, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut m = Model { now: T0, ..Model::default() };
    for (step, op) in ops.iter().enumerate() {
        let result = async {
            model_step(db, &mut m, op).await?;
            model_compare(db, &m).await
        }
        .await;
        if let Err(e) = result {
            return Err(TestCaseError::fail(format!("step {step} ({op:?}): {e}")));
        }
    }
    Ok(())
}

fn run_model_on(mysql: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let t = if mysql { TestDb::mysql().await } else { TestDb::sqlite().await };
        let result = run_model(&t.db, ops).await;
        t.cleanup().await;
        result
    })
}

fn model_config(cases: u32, max_shrink_iters: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, max_shrink_iters, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(model_config(96, 512))]
    #[test]
    fn ledger_follows_the_model_on_sqlite(ops in ops_strategy()) {
        run_model_on(false, &ops)?;
    }
}

proptest! {
    #![proptest_config(model_config(12, 128))]
    #[test]
    fn ledger_follows_the_model_on_mariadb(ops in ops_strategy()) {
        run_model_on(true, &ops)?;
    }
}
