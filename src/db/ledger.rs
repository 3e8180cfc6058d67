//! The credits ledger (docs/ledger.md): double-entry accounts, immutable journal entries whose postings
//! sum to zero, escrows and holds. Every operation is one transaction; balances change only through
//! guarded `UPDATE ... WHERE balance + amount >= 0`, never read-check-write, so concurrent writers (several
//! gateway nodes, the admin API) can never overdraw an account. Every entry has an idempotency key: an
//! operation retried after an ambiguous failure finds its entry instead of posting twice.
//!
//! Lock order, to keep MySQL free of deadlocks between operations: escrow row, hold row, then accounts in
//! ascending id order. Reads that decide an amount come after the locks; on MySQL the transactions run at
//! READ COMMITTED so that those reads see the latest committed state. A settlement batch is the exception:
//! it takes the accounts it debits, then (as late as its caller can) those it credits, each group in
//! ascending order, so that usage writers overlap; the rare deadlock that allows (an account both debited
//! by one batch and credited by another) is retried as a transient error.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use sea_orm::sea_query::Expr;
use sea_orm::{
    AccessMode, ActiveModelTrait, ActiveValue::NotSet, ActiveValue::Set, ColumnTrait, ConnectionTrait,
    DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait, IsolationLevel, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait, Value,
};

use super::entities::{accounts, escrows, holds, journal_entries, postings, settlements};

pub const WALLET: &str = "wallet";
pub const ESCROW: &str = "escrow";
pub const HOLD: &str = "hold";
pub const REVENUE: &str = "revenue";
pub const EXTERNAL: &str = "external";

pub const ESCROW_ACTIVE: &str = "active";
pub const ESCROW_EXHAUSTED: &str = "exhausted";
pub const ESCROW_RELEASED: &str = "released";
pub const ESCROW_EXPIRED: &str = "expired";

pub const HOLD_OPEN: &str = "open";
pub const HOLD_CLOSED: &str = "closed";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Db(#[from] DbErr),
    #[error("insufficient funds in account {account_id}")]
    InsufficientFunds { account_id: i64 },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

impl LedgerError {
    /// Lock conflicts that a fresh attempt of the whole transaction resolves.
    fn is_transient(&self) -> bool {
        match self {
            Self::Db(e) => is_transient(e),
            _ => false,
        }
    }
}

/// Deadlocks and lock timeouts (MySQL), and a stale SQLite read snapshot upgraded to a write.
pub fn is_transient(e: &DbErr) -> bool {
    let text = e.to_string();
    ["Deadlock found", "Lock wait timeout", "database is locked", "SQLITE_BUSY", "40001"]
        .iter()
        .any(|m| text.contains(m))
}

/// Starts a ledger transaction (READ COMMITTED on MySQL, see the module docs).
///
/// On SQLite the transaction takes the database's write lock with its first statement (a write that
/// changes nothing), waiting for other writers through the busy timeout. A transaction that read first
/// and wrote later would instead fail at once with "database is locked" when another writer committed in
/// between (SQLite cannot upgrade a stale read snapshot), which under load exhausts any retry budget.
pub async fn begin(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    if db.get_database_backend() == DbBackend::MySql {
        db.begin_with_config(Some(IsolationLevel::ReadCommitted), Some(AccessMode::ReadWrite)).await
    } else {
        let txn = db.begin().await?;
        txn.execute_unprepared("UPDATE accounts SET balance = balance WHERE 0 = 1").await?;
        Ok(txn)
    }
}

/// Runs `$body` (an expression using the transaction `$txn`) in a ledger transaction, committing on Ok and
/// retrying the whole transaction on transient lock conflicts.
macro_rules! in_txn {
    ($db:expr, |$txn:ident| $body:expr) => {{
        let mut attempt = 0u32;
        loop {
            let result: Result<_, LedgerError> = async {
                let $txn = begin($db).await?;
                let value = $body.await?;
                $txn.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Err(e) if e.is_transient() && attempt < 8 => {
                    attempt += 1;
                    // Jittered, so that transactions that collided do not collide again.
                    let base = 5u64 << attempt.min(6);
                    let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=base);
                    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                }
                other => break other,
            }
        }
    }};
}

// ---------------------------------------------------------------------------------------------------------
// Accounts and entries

/// The account's id, creating it on first use (concurrent creators meet at the unique index).
pub async fn ensure_account(
    c: &impl ConnectionTrait,
    kind: &str,
    owner_id: i64,
    ref_id: i64,
    now_ms: i64,
) -> Result<i64, DbErr> {
    if let Some(id) = find_account(c, kind, owner_id, ref_id).await? {
        return Ok(id);
    }
    let inserted = accounts::ActiveModel {
        kind: Set(kind.to_string()),
        owner_id: Set(owner_id),
        ref_id: Set(ref_id),
        balance: Set(0),
        created_at_ms: Set(now_ms),
        updated_at_ms: Set(now_ms),
        ..Default::default()
    }
    .insert(c)
    .await;
    match inserted {
        Ok(model) => Ok(model.id),
        Err(e) => find_account(c, kind, owner_id, ref_id).await?.ok_or(e),
    }
}

async fn find_account(c: &impl ConnectionTrait, kind: &str, owner_id: i64, ref_id: i64) -> Result<Option<i64>, DbErr> {
    accounts::Entity::find()
        .select_only()
        .column(accounts::Column::Id)
        .filter(accounts::Column::Kind.eq(kind))
        .filter(accounts::Column::OwnerId.eq(owner_id))
        .filter(accounts::Column::RefId.eq(ref_id))
        .into_tuple::<i64>()
        .one(c)
        .await
}

pub async fn wallet_account(c: &impl ConnectionTrait, user_id: i64, now_ms: i64) -> Result<i64, DbErr> {
    ensure_account(c, WALLET, user_id, 0, now_ms).await
}

pub async fn revenue_account(c: &impl ConnectionTrait, now_ms: i64) -> Result<i64, DbErr> {
    ensure_account(c, REVENUE, 0, 0, now_ms).await
}

pub async fn external_account(c: &impl ConnectionTrait, now_ms: i64) -> Result<i64, DbErr> {
    ensure_account(c, EXTERNAL, 0, 0, now_ms).await
}

pub async fn balance(c: &impl ConnectionTrait, account_id: i64) -> Result<i64, DbErr> {
    read_balance(c, account_id, false).await
}

async fn read_balance(c: &impl ConnectionTrait, account_id: i64, lock: bool) -> Result<i64, DbErr> {
    let mut query = accounts::Entity::find_by_id(account_id).select_only().column(accounts::Column::Balance);
    if lock {
        query = query.lock_exclusive();
    }
    query.into_tuple::<i64>().one(c).await?.ok_or_else(|| DbErr::RecordNotFound(format!("account {account_id}")))
}

/// The balance, with the account's row locked until the transaction ends (MySQL; SQLite transactions
/// that write are serialised anyway): an amount computed from it cannot be invalidated by a concurrent
/// writer before it is posted. A caller that posts several entries in one transaction (a dispute's
/// refunds) locks their accounts with it first, in ascending id order.
pub async fn balance_for_update(txn: &DatabaseTransaction, account_id: i64) -> Result<i64, DbErr> {
    read_balance(txn, account_id, true).await
}

/// The user's wallet account, if they ever had one (reading never creates it).
pub async fn find_wallet(c: &impl ConnectionTrait, user_id: i64) -> Result<Option<i64>, DbErr> {
    find_account(c, WALLET, user_id, 0).await
}

/// The wallet balance, 0 for a user who never had one.
pub async fn wallet_balance(c: &impl ConnectionTrait, user_id: i64) -> Result<i64, DbErr> {
    match find_wallet(c, user_id).await? {
        Some(id) => balance(c, id).await,
        None => Ok(0),
    }
}

/// One journal entry to post.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub idempotency_key: String,
    pub kind: &'static str,
    pub request_id: Option<String>,
    pub actor_id: Option<i64>,
    pub memo: Option<String>,
    /// (account, signed amount); zero amounts are dropped.
    pub postings: Vec<(i64, i64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    New(i64),
    /// An entry with this idempotency key exists already; nothing was changed.
    Already(i64),
}

/// Posts an entry inside the caller's transaction. Fails with `InsufficientFunds` (and the caller must
/// roll back) when a debit would take an account below zero.
///
/// The entry is inserted first: its idempotency key's unique index finds an entry posted before (a retry)
/// in the same statement, and only then is it looked up. Each account's balance changes once (its net
/// over the entry), in one guarded update.
pub async fn post(txn: &DatabaseTransaction, entry: NewEntry, now_ms: i64) -> Result<Posted, LedgerError> {
    let ordered = ordered_postings(&entry.idempotency_key, &entry.postings)?;
    let inserted = journal_entries::Entity::insert(journal_entries::ActiveModel {
        idempotency_key: Set(entry.idempotency_key.clone()),
        kind: Set(entry.kind.to_string()),
        request_id: Set(entry.request_id),
        actor_id: Set(entry.actor_id),
        memo: Set(entry.memo),
        created_at_ms: Set(now_ms),
        ..Default::default()
    })
    .exec(txn)
    .await;
    let entry_id = match inserted {
        Ok(result) => result.last_insert_id,
        // Posted before, or by a concurrent writer whose transaction committed before our insert.
        Err(e) => match find_entry(txn, &entry.idempotency_key).await? {
            Some(existing) => return Ok(Posted::Already(existing)),
            None => return Err(e.into()),
        },
    };
    let mut net: BTreeMap<i64, i64> = BTreeMap::new();
    for &(account, amount) in &ordered {
        let change = net.entry(account).or_default();
        *change = change.checked_add(amount).ok_or_else(|| LedgerError::Invalid("balance overflow".into()))?;
    }
    add_to_balances(txn, &net, now_ms).await?;
    if !ordered.is_empty() {
        let rows = ordered.iter().map(|&(account_id, amount)| postings::ActiveModel {
            entry_id: Set(entry_id),
            account_id: Set(account_id),
            amount: Set(amount),
            created_at_ms: Set(now_ms),
            ..Default::default()
        });
        postings::Entity::insert_many(rows).exec_without_returning(txn).await?;
    }
    Ok(Posted::New(entry_id))
}

/// An entry's postings without zero amounts, ordered by account so that rows are locked in ascending id
/// order, credits before debits on one account. They are kept as given otherwise (a buyer paid by their
/// own key shows the debit and the credit). Fails unless they sum to zero.
fn ordered_postings(key: &str, postings: &[(i64, i64)]) -> Result<Vec<(i64, i64)>, LedgerError> {
    let sum: i128 = postings.iter().map(|&(_, amount)| i128::from(amount)).sum();
    if sum != 0 {
        return Err(LedgerError::Invalid(format!("entry {key} does not balance ({sum})")));
    }
    let mut ordered: Vec<(i64, i64)> = postings.iter().copied().filter(|&(_, amount)| amount != 0).collect();
    ordered.sort_by_key(|&(account, amount)| (account, std::cmp::Reverse(amount)));
    Ok(ordered)
}

async fn find_entry(c: &impl ConnectionTrait, key: &str) -> Result<Option<i64>, DbErr> {
    journal_entries::Entity::find()
        .select_only()
        .column(journal_entries::Column::Id)
        .filter(journal_entries::Column::IdempotencyKey.eq(key))
        .into_tuple::<i64>()
        .one(c)
        .await
}

// ---------------------------------------------------------------------------------------------------------
// Grants and escrows

/// Credits enter the system: the external account pays the user's wallet. Returns the wallet balance after.
pub async fn grant(
    db: &DatabaseConnection,
    user_id: i64,
    amount: i64,
    actor_id: Option<i64>,
    idempotency_key: &str,
    memo: Option<String>,
    now_ms: i64,
) -> Result<(Posted, i64), LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::Invalid("amount must be a positive number of credits".into()));
    }
    in_txn!(db, |txn| async {
        let external = external_account(&txn, now_ms).await?;
        let wallet = wallet_account(&txn, user_id, now_ms).await?;
        let entry = NewEntry {
            idempotency_key: format!("grant:{idempotency_key}"),
            kind: "grant",
            request_id: None,
            actor_id,
            memo: memo.clone(),
            postings: vec![(external, -amount), (wallet, amount)],
        };
        let posted = post(&txn, entry, now_ms).await?;
        let after = balance(&txn, wallet).await?;
        Ok::<_, LedgerError>((posted, after))
    })
}

#[derive(Clone, Debug, Default)]
pub struct EscrowScope {
    pub model: Option<String>,
    pub hosted_key_id: Option<i64>,
}

/// Moves `amount` from the buyer's wallet into a new escrow.
pub async fn create_escrow(
    db: &DatabaseConnection,
    buyer_id: i64,
    amount: i64,
    scope: EscrowScope,
    expires_at_ms: i64,
    now_ms: i64,
) -> Result<escrows::Model, LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::Invalid("amount must be a positive number of credits".into()));
    }
    if expires_at_ms <= now_ms {
        return Err(LedgerError::Invalid("the expiry must be in the future".into()));
    }
    in_txn!(db, |txn| async {
        let wallet = wallet_account(&txn, buyer_id, now_ms).await?;
        let escrow = escrows::ActiveModel {
            buyer_id: Set(buyer_id),
            account_id: Set(0),
            model: Set(scope.model.clone()),
            hosted_key_id: Set(scope.hosted_key_id),
            amount: Set(amount),
            status: Set(ESCROW_ACTIVE.to_string()),
            expires_at_ms: Set(expires_at_ms),
            created_at_ms: Set(now_ms),
            closed_at_ms: Set(None),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        let account = ensure_account(&txn, ESCROW, buyer_id, escrow.id, now_ms).await?;
        let mut active: escrows::ActiveModel = escrow.into();
        active.account_id = Set(account);
        let escrow = active.update(&txn).await?;
        let entry = NewEntry {
            idempotency_key: format!("escrow_fund:{}", escrow.id),
            kind: "escrow_fund",
            request_id: None,
            actor_id: Some(buyer_id),
            memo: None,
            postings: vec![(wallet, -amount), (account, amount)],
        };
        match post(&txn, entry, now_ms).await {
            Err(LedgerError::InsufficientFunds { .. }) => {
                Err(LedgerError::Conflict("the wallet does not hold enough credits for this escrow".into()))
            }
            other => other.map(|_| escrow),
        }
    })
}

/// Locks the escrow row (a write that changes nothing) so that closing it and returning credits to it
/// are serialised. Returns the escrow as it is now.
async fn lock_escrow(txn: &DatabaseTransaction, escrow_id: i64) -> Result<escrows::Model, LedgerError> {
    escrows::Entity::update_many()
        .col_expr(escrows::Column::Status, Expr::col(escrows::Column::Status).into())
        .filter(escrows::Column::Id.eq(escrow_id))
        .exec(txn)
        .await?;
    escrows::Entity::find_by_id(escrow_id).one(txn).await?.ok_or(LedgerError::NotFound("escrow"))
}

/// Ends an active escrow (`released` by the buyer or `expired`): what is left goes back to the wallet.
/// Credits a gateway still holds from it go back to the wallet when that hold closes.
pub async fn close_escrow(
    db: &DatabaseConnection,
    buyer_id: Option<i64>,
    escrow_id: i64,
    status: &'static str,
    now_ms: i64,
) -> Result<escrows::Model, LedgerError> {
    in_txn!(db, |txn| async {
        let escrow = lock_escrow(&txn, escrow_id).await?;
        if buyer_id.is_some_and(|b| b != escrow.buyer_id) {
            return Err(LedgerError::NotFound("escrow"));
        }
        if escrow.status != ESCROW_ACTIVE && escrow.status != ESCROW_EXHAUSTED {
            return Err(LedgerError::Conflict(format!("the escrow is already {}", escrow.status)));
        }
        let rest = balance_for_update(&txn, escrow.account_id).await?;
        let wallet = wallet_account(&txn, escrow.buyer_id, now_ms).await?;
        post(
            &txn,
            NewEntry {
                idempotency_key: format!("escrow_close:{escrow_id}"),
                kind: if status == ESCROW_EXPIRED { "escrow_expire" } else { "escrow_release" },
                request_id: None,
                actor_id: buyer_id,
                memo: None,
                postings: vec![(escrow.account_id, -rest), (wallet, rest)],
            },
            now_ms,
        )
        .await?;
        let mut active: escrows::ActiveModel = escrow.into();
        active.status = Set(status.to_string());
        active.closed_at_ms = Set(Some(now_ms));
        Ok::<_, LedgerError>(active.update(&txn).await?)
    })
}

/// Expires every active escrow past its expiry. Returns how many.
pub async fn expire_escrows(db: &DatabaseConnection, now_ms: i64) -> Result<usize, LedgerError> {
    let due: Vec<i64> = escrows::Entity::find()
        .select_only()
        .column(escrows::Column::Id)
        .filter(escrows::Column::Status.is_in([ESCROW_ACTIVE, ESCROW_EXHAUSTED]))
        .filter(escrows::Column::ExpiresAtMs.lte(now_ms))
        .into_tuple()
        .all(db)
        .await?;
    let mut n = 0;
    for id in due {
        match close_escrow(db, None, id, ESCROW_EXPIRED, now_ms).await {
            Ok(_) => n += 1,
            // Released or expired meanwhile by someone else.
            Err(LedgerError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub async fn find_escrow(c: &impl ConnectionTrait, escrow_id: i64) -> Result<Option<escrows::Model>, DbErr> {
    escrows::Entity::find_by_id(escrow_id).one(c).await
}

pub async fn list_escrows(c: &impl ConnectionTrait, buyer_id: i64) -> Result<Vec<escrows::Model>, DbErr> {
    escrows::Entity::find()
        .filter(escrows::Column::BuyerId.eq(buyer_id))
        .order_by_desc(escrows::Column::Id)
        .all(c)
        .await
}

/// Every escrow that can still pay (for the gateway's snapshot).
pub async fn list_active_escrows(c: &impl ConnectionTrait) -> Result<Vec<escrows::Model>, DbErr> {
    escrows::Entity::find()
        .filter(escrows::Column::Status.eq(ESCROW_ACTIVE))
        .order_by_asc(escrows::Column::Id)
        .all(c)
        .await
}

// ---------------------------------------------------------------------------------------------------------
// Holds

/// Where a hold draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldSource {
    pub buyer_id: i64,
    pub account_id: i64,
    pub escrow_id: Option<i64>,
}

/// Checks that an escrow source can still pay; `Ok(false)` when it cannot.
async fn source_usable(txn: &DatabaseTransaction, source: &HoldSource, now_ms: i64) -> Result<bool, LedgerError> {
    match source.escrow_id {
        None => Ok(true),
        Some(id) => {
            let escrow = lock_escrow(txn, id).await?;
            Ok(escrow.status == ESCROW_ACTIVE && escrow.expires_at_ms > now_ms && escrow.buyer_id == source.buyer_id)
        }
    }
}

/// Opens a hold of between `min` and `max` credits (as much as the source has, up to `max`). `Ok(None)`
/// when the source has less than `min` or cannot pay any more.
pub async fn open_hold(
    db: &DatabaseConnection,
    source: HoldSource,
    node_id: &str,
    min: i64,
    max: i64,
    now_ms: i64,
) -> Result<Option<holds::Model>, LedgerError> {
    if min <= 0 || max < min {
        return Err(LedgerError::Invalid(format!("bad hold bounds {min}..{max}")));
    }
    in_txn!(db, |txn| async {
        if !source_usable(&txn, &source, now_ms).await? {
            return Ok(None);
        }
        let available = balance_for_update(&txn, source.account_id).await?;
        let amount = available.min(max);
        if amount < min {
            return Ok(None);
        }
        let mut hold = holds::Model {
            id: 0,
            account_id: 0,
            source_account_id: source.account_id,
            buyer_id: source.buyer_id,
            escrow_id: source.escrow_id,
            node_id: node_id.to_string(),
            status: HOLD_OPEN.to_string(),
            amount,
            spent: 0,
            created_at_ms: now_ms,
            renewed_at_ms: now_ms,
            closed_at_ms: None,
        };
        // Inserted without reading the rows back (a round trip each on MySQL): the hold, its account (new,
        // as the hold is), then the hold's account id.
        let mut row: holds::ActiveModel = hold.clone().into();
        row.id = NotSet;
        hold.id = holds::Entity::insert(row.reset_all()).exec(&txn).await?.last_insert_id;
        hold.account_id = accounts::Entity::insert(accounts::ActiveModel {
            kind: Set(HOLD.to_string()),
            owner_id: Set(source.buyer_id),
            ref_id: Set(hold.id),
            balance: Set(0),
            created_at_ms: Set(now_ms),
            updated_at_ms: Set(now_ms),
            ..Default::default()
        })
        .exec(&txn)
        .await?
        .last_insert_id;
        holds::Entity::update_many()
            .col_expr(holds::Column::AccountId, Expr::value(hold.account_id))
            .filter(holds::Column::Id.eq(hold.id))
            .exec(&txn)
            .await?;
        let account = hold.account_id;
        post(
            &txn,
            NewEntry {
                idempotency_key: format!("hold_open:{}", hold.id),
                kind: "hold_open",
                request_id: None,
                actor_id: None,
                memo: None,
                postings: vec![(source.account_id, -amount), (account, amount)],
            },
            now_ms,
        )
        .await?;
        Ok::<_, LedgerError>(Some(hold))
    })
}

/// Moves between `min` and `max` more credits into an open hold. Returns what was added (0: the source
/// cannot give `min`, or the hold is closed).
pub async fn extend_hold(
    db: &DatabaseConnection,
    hold_id: i64,
    min: i64,
    max: i64,
    now_ms: i64,
) -> Result<i64, LedgerError> {
    if min <= 0 || max < min {
        return Err(LedgerError::Invalid(format!("bad hold bounds {min}..{max}")));
    }
    in_txn!(db, |txn| async {
        let hold = holds::Entity::find_by_id(hold_id).one(&txn).await?.ok_or(LedgerError::NotFound("hold"))?;
        let source =
            HoldSource { buyer_id: hold.buyer_id, account_id: hold.source_account_id, escrow_id: hold.escrow_id };
        if !source_usable(&txn, &source, now_ms).await? {
            return Ok(0);
        }
        // Locks the hold row, proves it is still open and reads its amount as of the lock.
        let Some(current) = holds::Entity::find_by_id(hold_id)
            .select_only()
            .column(holds::Column::Amount)
            .filter(holds::Column::Status.eq(HOLD_OPEN))
            .lock_exclusive()
            .into_tuple::<i64>()
            .one(&txn)
            .await?
        else {
            return Ok(0);
        };
        let available = balance_for_update(&txn, hold.source_account_id).await?;
        let amount = available.min(max);
        if amount < min {
            return Ok(0);
        }
        let total = current + amount;
        post(
            &txn,
            NewEntry {
                // The hold's total only grows, so it names each extension uniquely.
                idempotency_key: format!("hold_extend:{hold_id}:{total}"),
                kind: "hold_extend",
                request_id: None,
                actor_id: None,
                memo: None,
                postings: vec![(hold.source_account_id, -amount), (hold.account_id, amount)],
            },
            now_ms,
        )
        .await?;
        holds::Entity::update_many()
            .col_expr(holds::Column::Amount, Expr::value(total))
            .col_expr(holds::Column::RenewedAtMs, Expr::value(now_ms))
            .filter(holds::Column::Id.eq(hold_id))
            .exec(&txn)
            .await?;
        Ok::<_, LedgerError>(amount)
    })
}

/// Closes an open hold: what was not spent goes back to its escrow, or to the buyer's wallet when the
/// escrow can no longer pay. Returns the amount returned (0 also when the hold was closed already).
pub async fn close_hold(db: &DatabaseConnection, hold_id: i64, now_ms: i64) -> Result<i64, LedgerError> {
    let Some(hold) = holds::Entity::find_by_id(hold_id).one(db).await? else {
        return Err(LedgerError::NotFound("hold"));
    };
    in_txn!(db, |txn| async {
        let escrow = match hold.escrow_id {
            Some(id) => Some(lock_escrow(&txn, id).await?),
            None => None,
        };
        let closed = holds::Entity::update_many()
            .col_expr(holds::Column::Status, Expr::value(HOLD_CLOSED))
            .col_expr(holds::Column::ClosedAtMs, Expr::value(now_ms))
            .filter(holds::Column::Id.eq(hold_id))
            .filter(holds::Column::Status.eq(HOLD_OPEN))
            .exec(&txn)
            .await?;
        if closed.rows_affected != 1 {
            return Ok(0);
        }
        let rest = balance_for_update(&txn, hold.account_id).await?;
        let escrow_pays = escrow.as_ref().is_some_and(|e| e.status == ESCROW_ACTIVE && e.expires_at_ms > now_ms);
        let target = match &escrow {
            Some(_) if escrow_pays => hold.source_account_id,
            Some(_) => wallet_account(&txn, hold.buyer_id, now_ms).await?,
            None => hold.source_account_id,
        };
        post(
            &txn,
            NewEntry {
                idempotency_key: format!("hold_close:{hold_id}"),
                kind: "hold_close",
                request_id: None,
                actor_id: None,
                memo: None,
                postings: vec![(hold.account_id, -rest), (target, rest)],
            },
            now_ms,
        )
        .await?;
        if let Some(escrow) = escrow.filter(|_| escrow_pays) {
            mark_exhausted_if_empty(&txn, &escrow, now_ms).await?;
        }
        Ok::<_, LedgerError>(rest)
    })
}

/// An active escrow with nothing left and nothing held is `exhausted`.
async fn mark_exhausted_if_empty(
    txn: &DatabaseTransaction,
    escrow: &escrows::Model,
    now_ms: i64,
) -> Result<(), LedgerError> {
    if balance(txn, escrow.account_id).await? != 0 {
        return Ok(());
    }
    let open = holds::Entity::find()
        .filter(holds::Column::EscrowId.eq(escrow.id))
        .filter(holds::Column::Status.eq(HOLD_OPEN))
        .count(txn)
        .await?;
    if open == 0 {
        escrows::Entity::update_many()
            .col_expr(escrows::Column::Status, Expr::value(ESCROW_EXHAUSTED))
            .col_expr(escrows::Column::ClosedAtMs, Expr::value(now_ms))
            .filter(escrows::Column::Id.eq(escrow.id))
            .filter(escrows::Column::Status.eq(ESCROW_ACTIVE))
            .exec(txn)
            .await?;
    }
    Ok(())
}

/// Marks the node's holds as alive. Returns those of them that are no longer open (closed by another
/// node), which the node must stop using.
pub async fn renew_holds(c: &impl ConnectionTrait, hold_ids: &[i64], now_ms: i64) -> Result<Vec<i64>, DbErr> {
    if hold_ids.is_empty() {
        return Ok(Vec::new());
    }
    holds::Entity::update_many()
        .col_expr(holds::Column::RenewedAtMs, Expr::value(now_ms))
        .filter(holds::Column::Id.is_in(hold_ids.iter().copied()))
        .filter(holds::Column::Status.eq(HOLD_OPEN))
        .exec(c)
        .await?;
    holds::Entity::find()
        .select_only()
        .column(holds::Column::Id)
        .filter(holds::Column::Id.is_in(hold_ids.iter().copied()))
        .filter(holds::Column::Status.ne(HOLD_OPEN))
        .into_tuple::<i64>()
        .all(c)
        .await
}

/// Open holds not renewed since `before_ms`: their node died (or lost the database for that long).
pub async fn stale_holds(c: &impl ConnectionTrait, before_ms: i64) -> Result<Vec<holds::Model>, DbErr> {
    holds::Entity::find()
        .filter(holds::Column::Status.eq(HOLD_OPEN))
        .filter(holds::Column::RenewedAtMs.lt(before_ms))
        .order_by_asc(holds::Column::Id)
        .all(c)
        .await
}

/// Open holds of one node (at start-up, a node closes what an earlier run of itself left open).
pub async fn open_holds_of_node(c: &impl ConnectionTrait, node_id: &str) -> Result<Vec<holds::Model>, DbErr> {
    holds::Entity::find()
        .filter(holds::Column::Status.eq(HOLD_OPEN))
        .filter(holds::Column::NodeId.eq(node_id))
        .order_by_asc(holds::Column::Id)
        .all(c)
        .await
}

pub async fn find_hold(c: &impl ConnectionTrait, hold_id: i64) -> Result<Option<holds::Model>, DbErr> {
    holds::Entity::find_by_id(hold_id).one(c).await
}

/// Credits held (open holds) per source account of a buyer.
pub async fn held_by_source(c: &impl ConnectionTrait, buyer_id: i64) -> Result<BTreeMap<i64, i64>, DbErr> {
    let sql = format!(
        "SELECT h.source_account_id AS a, {} AS b FROM holds h JOIN accounts a ON a.id = h.account_id \
         WHERE h.buyer_id = ? AND h.status = 'open' GROUP BY h.source_account_id",
        super::funds::sum(c.get_database_backend(), "a.balance")
    );
    let rows =
        Row2::find_by_statement(Statement::from_sql_and_values(c.get_database_backend(), sql, [buyer_id.into()]))
            .all(c)
            .await?;
    Ok(rows.into_iter().map(|r| (r.a, r.b.unwrap_or(0))).collect())
}

// ---------------------------------------------------------------------------------------------------------
// Settlement

/// One request to settle from a hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub request_id: String,
    pub hold_id: i64,
    pub hold_account_id: i64,
    pub source_account_id: i64,
    pub cost: i64,
    /// The seller's wallet; None when a platform key served the request (the platform keeps it all).
    pub seller_account_id: Option<i64>,
    pub revenue_account_id: i64,
    pub fee_bps: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Paid by the buyer (from the hold, then from the source if the hold ran short).
    pub paid: i64,
    /// What the buyer's funds could not cover.
    pub unpaid: i64,
    pub seller: i64,
    pub platform: i64,
    /// This request was settled before; nothing changed now.
    pub duplicate: bool,
}

/// The seller's share of `paid` after the platform fee (rounded down; the platform gets the rest, so the
/// two always add up to `paid`).
pub fn split(paid: i64, fee_bps: u32, has_seller: bool) -> (i64, i64) {
    if !has_seller {
        return (0, paid);
    }
    let fee_bps = i128::from(fee_bps.min(10_000));
    let seller = (i128::from(paid) * (10_000 - fee_bps) / 10_000) as i64;
    (seller, paid - seller)
}

/// Settles one request inside the caller's transaction, idempotent by request id.
pub async fn settle(txn: &DatabaseTransaction, s: &Settlement, now_ms: i64) -> Result<Settled, LedgerError> {
    Ok(settle_batch(txn, std::slice::from_ref(s), now_ms).await?.pop().unwrap_or_default())
}

/// Ids per `IN (...)` list: below MariaDB's `in_predicate_conversion_threshold` (1,000 values), from which
/// it turns the list into a join with a table of values, a plan (and under `FOR UPDATE`, locks) that
/// depends on table statistics.
const IN_CHUNK: usize = 900;

/// Bound values per multi-row insert (rows: this over the columns), far below the placeholder limits of
/// SQLite (32766) and MySQL (65535): a batch of 2,000 settlements inserts its entries in one statement
/// and its postings in two.
const VALUES_PER_INSERT: usize = 16_000;

/// Rows per `CASE id WHEN ...` update: the database tries the arms one by one for each row, so a chunk
/// costs the square of its size (on MariaDB 2,000 accounts took 37 ms in one update, 9 ms in chunks of 250).
const CASE_CHUNK: usize = 250;

/// Settles many requests inside the caller's transaction, each idempotent by request id, in a number of
/// statements that hardly grows with the batch (a few per `CASE_CHUNK` settlements): on MySQL a round trip
/// costs far more than the rows it writes, and the usage writer settles every request. Each request is
/// paid as if settled alone, in the order given: from its hold, an overrun from the hold's source, and
/// what neither covers is unpaid. A request settled before, or repeated in the batch, is a duplicate and
/// moves nothing. Returns one `Settled` per settlement, in order.
///
/// Locks, as a single settlement takes them (module docs): the hold rows, then the holds' accounts in
/// ascending id order (to read what they can pay), an overrun's sources, then the accounts the postings
/// debit and, last, those they credit (sellers, revenue), each group in ascending id order with one guarded
/// update per account for the batch ([`settle_batch_debits`] leaves the credits to its caller).
pub async fn settle_batch(
    txn: &DatabaseTransaction,
    batch: &[Settlement],
    now_ms: i64,
) -> Result<Vec<Settled>, LedgerError> {
    let (settled, credits) = settle_batch_debits(txn, batch, now_ms).await?;
    credits.apply(txn, now_ms).await?;
    Ok(settled)
}

/// The credits of settlements (sellers' wallets, the platform's revenue) that [`settle_batch_debits`] has
/// posted but not yet added to the accounts' balances: the caller adds them with [`PendingCredits::apply`]
/// in the same transaction, as late as it can, since these rows are shared by every writer and stay
/// locked from then until the commit.
#[must_use = "the credits must be applied in the same transaction"]
#[derive(Debug, Default)]
pub struct PendingCredits(BTreeMap<i64, i64>);

impl PendingCredits {
    pub async fn apply(self, txn: &DatabaseTransaction, now_ms: i64) -> Result<(), LedgerError> {
        add_to_balances(txn, &self.0, now_ms).await
    }
}

/// [`settle_batch`] up to the credits: everything but adding the credits to their accounts' balances,
/// which is left to the caller (see [`PendingCredits`]). The debits (holds, and sources for overruns) are
/// added, so the buyer's side is locked and final when this returns.
pub async fn settle_batch_debits(
    txn: &DatabaseTransaction,
    batch: &[Settlement],
    now_ms: i64,
) -> Result<(Vec<Settled>, PendingCredits), LedgerError> {
    let mut out = vec![Settled::default(); batch.len()];
    let paying: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].cost > 0).collect();
    if paying.is_empty() {
        return Ok((out, PendingCredits::default()));
    }
    // The hold rows first, as `close_hold` and `extend_hold` lock them before the holds' accounts. Locked
    // before the look for earlier settlements: a concurrent settlement of the same request (through the
    // same hold) has committed by then, and READ COMMITTED shows its row.
    let hold_ids: Vec<i64> = paying.iter().map(|&i| batch[i].hold_id).collect::<BTreeSet<_>>().into_iter().collect();
    for chunk in hold_ids.chunks(IN_CHUNK) {
        holds::Entity::find()
            .select_only()
            .column(holds::Column::Id)
            .filter(holds::Column::Id.is_in(chunk.iter().copied()))
            .order_by_asc(holds::Column::Id)
            .lock_exclusive()
            .into_tuple::<i64>()
            .all(txn)
            .await?;
    }
    let known = settled_request_ids(txn, paying.iter().map(|&i| batch[i].request_id.as_str())).await?;
    let mut seen = HashSet::with_capacity(paying.len());
    let mut todo = Vec::with_capacity(paying.len());
    for i in paying {
        let id = batch[i].request_id.as_str();
        if known.contains(id) || !seen.insert(id) {
            out[i].duplicate = true;
        } else {
            todo.push(i);
        }
    }
    if todo.is_empty() {
        return Ok((out, PendingCredits::default()));
    }
    let mut in_holds = balances_for_update(txn, todo.iter().map(|&i| batch[i].hold_account_id).collect()).await?;
    let mut from_hold = vec![0; batch.len()];
    for &i in &todo {
        let s = &batch[i];
        let left = in_holds.get_mut(&s.hold_account_id).ok_or(LedgerError::NotFound("hold account"))?;
        from_hold[i] = s.cost.min((*left).max(0));
        *left -= from_hold[i];
    }
    // Only an overrun (a provider that ignored max_tokens) takes from the source.
    let short = todo.iter().filter(|&&i| from_hold[i] < batch[i].cost).map(|&i| batch[i].source_account_id).collect();
    let mut in_sources = balances_for_update(txn, short).await?;

    // Debits and credits per account, apart: the credits are added last (see `PendingCredits`), and the
    // entry shows both when one account is on both sides (a buyer who sells, paying an overrun).
    let (mut debits, mut credits): (BTreeMap<i64, i64>, BTreeMap<i64, i64>) = Default::default();
    let mut add = |account: i64, amount: i64| -> Result<(), LedgerError> {
        if amount == 0 {
            return Ok(());
        }
        let change = if amount < 0 { debits.entry(account) } else { credits.entry(account) }.or_default();
        *change = change.checked_add(amount).ok_or_else(|| LedgerError::Invalid("balance overflow".into()))?;
        Ok(())
    };
    let mut spent: BTreeMap<i64, i64> = BTreeMap::new();
    let mut overrun_holds = BTreeSet::new();
    for &i in &todo {
        let s = &batch[i];
        let from_source = if from_hold[i] < s.cost {
            let left = in_sources.get_mut(&s.source_account_id).ok_or(LedgerError::NotFound("source account"))?;
            let take = (s.cost - from_hold[i]).min((*left).max(0));
            *left -= take;
            take
        } else {
            0
        };
        let paid = from_hold[i] + from_source;
        let (seller, platform) = split(paid, s.fee_bps, s.seller_account_id.is_some());
        add(s.hold_account_id, -from_hold[i])?;
        add(s.source_account_id, -from_source)?;
        if let Some(account) = s.seller_account_id {
            add(account, seller)?;
        }
        add(s.revenue_account_id, platform)?;
        *spent.entry(s.hold_id).or_default() += from_hold[i];
        if from_source > 0 {
            overrun_holds.insert(s.hold_id);
        }
        out[i] = Settled { paid, unpaid: s.cost - paid, seller, platform, duplicate: false };
    }

    // One entry for the batch, named after its first request (each request is settled once, so no other
    // entry has that key); a batch of one is recorded as a per-request entry.
    let first = &batch[todo[0]].request_id;
    let entry_id = journal_entries::Entity::insert(journal_entries::ActiveModel {
        idempotency_key: Set(format!("settle:{first}")),
        kind: Set("settle".to_string()),
        request_id: Set((todo.len() == 1).then(|| first.clone())),
        actor_id: Set(None),
        memo: Set((todo.len() > 1).then(|| format!("{} requests", todo.len()))),
        created_at_ms: Set(now_ms),
        ..Default::default()
    })
    .exec(txn)
    .await?
    .last_insert_id;
    let entry_postings: Vec<postings::ActiveModel> = debits
        .iter()
        .chain(&credits)
        .map(|(&account_id, &amount)| postings::ActiveModel {
            entry_id: Set(entry_id),
            account_id: Set(account_id),
            amount: Set(amount),
            created_at_ms: Set(now_ms),
            ..Default::default()
        })
        .collect();
    if !entry_postings.is_empty() {
        postings::Entity::insert_many(entry_postings).exec_without_returning(txn).await?;
    }
    // Seven bound columns per settlement.
    for chunk in todo.chunks(VALUES_PER_INSERT / 7) {
        let rows = chunk.iter().map(|&i| {
            let (s, done) = (&batch[i], &out[i]);
            settlements::ActiveModel {
                request_id: Set(s.request_id.clone()),
                entry_id: Set(entry_id),
                paid: Set(done.paid),
                seller: Set(done.seller),
                platform: Set(done.platform),
                seller_account_id: Set(s.seller_account_id.filter(|_| done.seller > 0)),
                created_at_ms: Set(now_ms),
            }
        });
        settlements::Entity::insert_many(rows).exec_without_returning(txn).await?;
    }
    add_to_balances(txn, &debits, now_ms).await?;
    add_to_spent(txn, &spent, now_ms).await?;
    for hold_id in overrun_holds {
        // The overrun may have emptied an escrow whose holds are all closed.
        let escrow_id = holds::Entity::find_by_id(hold_id).one(txn).await?.and_then(|h| h.escrow_id);
        if let Some(escrow) = match escrow_id {
            Some(id) => escrows::Entity::find_by_id(id).one(txn).await?,
            None => None,
        } {
            mark_exhausted_if_empty(txn, &escrow, now_ms).await?;
        }
    }
    Ok((out, PendingCredits(credits)))
}

/// Which of these requests are settled already.
async fn settled_request_ids<'a>(
    c: &impl ConnectionTrait,
    request_ids: impl Iterator<Item = &'a str>,
) -> Result<HashSet<String>, DbErr> {
    let ids: Vec<&str> = request_ids.collect();
    let mut found = HashSet::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let rows: Vec<String> = settlements::Entity::find()
            .select_only()
            .column(settlements::Column::RequestId)
            .filter(settlements::Column::RequestId.is_in(chunk.iter().copied()))
            .into_tuple()
            .all(c)
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// The settlement of a request, if it was settled.
pub async fn find_settlement(c: &impl ConnectionTrait, request_id: &str) -> Result<Option<settlements::Model>, DbErr> {
    settlements::Entity::find_by_id(request_id.to_string()).one(c).await
}

/// The balances of these accounts, their rows locked until the transaction ends (`FOR UPDATE` on MySQL,
/// in ascending id order; an SQLite ledger transaction holds the write lock already).
async fn balances_for_update(
    txn: &DatabaseTransaction,
    account_ids: BTreeSet<i64>,
) -> Result<HashMap<i64, i64>, DbErr> {
    let ids: Vec<i64> = account_ids.into_iter().collect();
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(IN_CHUNK) {
        let rows: Vec<(i64, i64)> = accounts::Entity::find()
            .select_only()
            .column(accounts::Column::Id)
            .column(accounts::Column::Balance)
            .filter(accounts::Column::Id.is_in(chunk.iter().copied()))
            .order_by_asc(accounts::Column::Id)
            .lock_exclusive()
            .into_tuple()
            .all(txn)
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// Adds each account's net change, one guarded update per `CASE_CHUNK` accounts, rows in ascending id
/// order: a debit that would take an account (but the external one) below zero matches no row, and the
/// whole change fails with `InsufficientFunds`. (A settlement's debits were computed from balances locked
/// in its transaction, so there the guard only catches a bug.)
async fn add_to_balances(
    txn: &DatabaseTransaction,
    changes: &BTreeMap<i64, i64>,
    now_ms: i64,
) -> Result<(), LedgerError> {
    let changes: Vec<(i64, i64)> = changes.iter().filter(|(_, &n)| n != 0).map(|(&a, &n)| (a, n)).collect();
    for chunk in changes.chunks(CASE_CHUNK) {
        let (case, ids, mut values) = case_by_id(chunk);
        let sql = format!(
            "UPDATE accounts SET balance = balance + {case}, updated_at_ms = ? WHERE id IN ({ids}) \
             AND (balance + {case} >= 0 OR kind = '{EXTERNAL}')"
        );
        let case_values: Vec<Value> = values[..2 * chunk.len()].to_vec();
        values.insert(2 * chunk.len(), now_ms.into());
        values.extend(case_values);
        let result = txn.execute(Statement::from_sql_and_values(txn.get_database_backend(), sql, values)).await?;
        if result.rows_affected() != chunk.len() as u64 {
            let account_id = chunk.iter().find(|c| c.1 < 0).map_or(chunk[0].0, |c| c.0);
            return Err(LedgerError::InsufficientFunds { account_id });
        }
    }
    Ok(())
}

/// Adds what each hold spent and marks it alive, one update per `CASE_CHUNK` holds.
async fn add_to_spent(txn: &DatabaseTransaction, spent: &BTreeMap<i64, i64>, now_ms: i64) -> Result<(), DbErr> {
    let spent: Vec<(i64, i64)> = spent.iter().map(|(&h, &n)| (h, n)).collect();
    for chunk in spent.chunks(CASE_CHUNK) {
        let (case, ids, mut values) = case_by_id(chunk);
        values.insert(2 * chunk.len(), now_ms.into());
        let sql = format!("UPDATE holds SET spent = spent + {case}, renewed_at_ms = ? WHERE id IN ({ids})");
        txn.execute(Statement::from_sql_and_values(txn.get_database_backend(), sql, values)).await?;
    }
    Ok(())
}

/// For (id, n) pairs: `CASE id WHEN ? THEN ? ... END`, the `IN` list of the ids, and the values of both
/// in that order.
fn case_by_id(pairs: &[(i64, i64)]) -> (String, String, Vec<Value>) {
    let case = format!("CASE id {}END", "WHEN ? THEN ? ".repeat(pairs.len()));
    let ids = vec!["?"; pairs.len()].join(", ");
    let mut values: Vec<Value> = pairs.iter().flat_map(|&(id, n)| [Value::from(id), Value::from(n)]).collect();
    values.extend(pairs.iter().map(|&(id, _)| Value::from(id)));
    (case, ids, values)
}

/// Reverses a settled request: the seller and the platform give back what they received, the buyer's wallet
/// gets it. Fails with `InsufficientFunds` when the seller has spent it already.
pub async fn refund_request(
    db: &DatabaseConnection,
    request_id: &str,
    buyer_id: i64,
    actor_id: Option<i64>,
    memo: Option<String>,
    now_ms: i64,
) -> Result<(Posted, i64), LedgerError> {
    in_txn!(db, |txn| refund_request_in(&txn, request_id, buyer_id, actor_id, memo.clone(), now_ms))
}

/// [`refund_request`] inside the caller's transaction (a dispute commits its refunds together with its
/// status change). The amount is the settlement's, also when the refund was posted before
/// (`Posted::Already`: nothing moved now).
pub async fn refund_request_in(
    txn: &DatabaseTransaction,
    request_id: &str,
    buyer_id: i64,
    actor_id: Option<i64>,
    memo: Option<String>,
    now_ms: i64,
) -> Result<(Posted, i64), LedgerError> {
    let settled = find_settlement(txn, request_id).await?.ok_or(LedgerError::NotFound("settled request"))?;
    // What the seller and the platform received goes back to the buyer's wallet.
    let total = settled.seller + settled.platform;
    let mut reversal = vec![(wallet_account(txn, buyer_id, now_ms).await?, total)];
    if let Some(seller) = settled.seller_account_id {
        reversal.push((seller, -settled.seller));
    }
    if settled.platform != 0 {
        reversal.push((revenue_account(txn, now_ms).await?, -settled.platform));
    }
    let posted = post(
        txn,
        NewEntry {
            idempotency_key: format!("refund:{request_id}"),
            kind: "refund",
            request_id: Some(request_id.to_string()),
            actor_id,
            memo,
            postings: reversal,
        },
        now_ms,
    )
    .await?;
    Ok((posted, total))
}

// ---------------------------------------------------------------------------------------------------------
// Reading

/// One posting with its entry, for transaction listings.
#[derive(Clone, Debug, PartialEq, Eq, sea_orm::FromQueryResult, serde::Serialize, utoipa::ToSchema)]
pub struct PostingView {
    pub posting_id: i64,
    pub entry_id: i64,
    pub kind: String,
    pub request_id: Option<String>,
    pub memo: Option<String>,
    pub account_id: i64,
    pub account_kind: String,
    pub amount: i64,
    pub created_at_ms: i64,
}

/// The postings on the user's accounts of the given kinds, newest first, `limit` after the posting id
/// `before` (keyset pagination: stable while new postings arrive).
pub async fn postings_of(
    c: &impl ConnectionTrait,
    owner_id: i64,
    kinds: &[&str],
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<PostingView>, DbErr> {
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let placeholders = vec!["?"; kinds.len()].join(",");
    let mut values: Vec<sea_orm::Value> = vec![owner_id.into()];
    values.extend(kinds.iter().map(|k| sea_orm::Value::from(k.to_string())));
    let before = match before {
        Some(b) => {
            values.push(b.into());
            "AND p.id < ?"
        }
        None => "",
    };
    let sql = format!(
        "SELECT p.id AS posting_id, e.id AS entry_id, e.kind AS kind, e.request_id AS request_id, e.memo AS memo, \
         p.account_id AS account_id, a.kind AS account_kind, p.amount AS amount, p.created_at_ms AS created_at_ms \
         FROM accounts a JOIN postings p ON p.account_id = a.id JOIN journal_entries e ON e.id = p.entry_id \
         WHERE a.owner_id = ? AND a.kind IN ({placeholders}) {before} ORDER BY p.id DESC LIMIT {}",
        limit.min(1000)
    );
    PostingView::find_by_statement(Statement::from_sql_and_values(c.get_database_backend(), sql, values)).all(c).await
}

use sea_orm::FromQueryResult;

#[derive(Debug, FromQueryResult)]
struct Row2 {
    a: i64,
    b: Option<i64>,
}

/// A paid usage record and its settlement, as [`check`] finds it.
#[derive(Debug, FromQueryResult)]
struct Settledness {
    id: i64,
    cost: Option<i64>,
    /// What the record says was paid less what the settlement paid.
    short: Option<i64>,
    /// 1 when the record has a settlement.
    entries: i64,
}

/// The rows of `sql`, whose `columns` are all integers: MySQL returns `SUM()` as a DECIMAL, so they are
/// cast back to integers there.
async fn integer_rows<T: FromQueryResult>(
    c: &impl ConnectionTrait,
    sql: String,
    columns: &[&str],
) -> Result<Vec<T>, DbErr> {
    let backend = c.get_database_backend();
    let sql = match backend {
        DbBackend::MySql => {
            let cast: Vec<String> = columns.iter().map(|col| format!("CAST(q.{col} AS SIGNED) AS {col}")).collect();
            format!("SELECT {} FROM ({sql}) q", cast.join(", "))
        }
        _ => sql,
    };
    T::find_by_statement(Statement::from_string(backend, sql)).all(c).await
}

/// One violated invariant found by [`check`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Violation {
    #[schema(value_type = String)]
    pub rule: &'static str,
    pub detail: String,
}

/// Verifies the ledger's invariants (see `token-exchange ledger check`): every entry balances, every
/// balance is non-negative (but the external account's) and equals the sum of its postings, every billed
/// usage record has exactly one settlement of the right amount, and no hold has been open without a sign
/// of life for longer than `max_hold_idle_ms`.
pub async fn check(c: &impl ConnectionTrait, now_ms: i64, max_hold_idle_ms: i64) -> Result<Vec<Violation>, DbErr> {
    let rows = |sql: &str| integer_rows::<Row2>(c, sql.to_string(), &["a", "b"]);
    let mut found = Vec::new();

    for r in
        rows("SELECT entry_id AS a, SUM(amount) AS b FROM postings GROUP BY entry_id HAVING SUM(amount) <> 0").await?
    {
        found.push(Violation { rule: "entry_balances", detail: format!("entry {} sums to {}", r.a, r.b.unwrap_or(0)) });
    }
    for r in rows(
        "SELECT e.id AS a, NULL AS b FROM journal_entries e \
         LEFT JOIN (SELECT DISTINCT p.entry_id AS entry_id FROM postings p) s ON s.entry_id = e.id \
         WHERE s.entry_id IS NULL AND e.kind NOT IN ('escrow_release','escrow_expire','hold_close','settle','refund')",
    )
    .await?
    {
        found.push(Violation { rule: "entry_has_postings", detail: format!("entry {} moves nothing", r.a) });
    }
    for r in rows(
        "SELECT a.id AS a, a.balance - COALESCE(s.total, 0) AS b FROM accounts a LEFT JOIN \
         (SELECT p.account_id AS account_id, SUM(p.amount) AS total FROM postings p GROUP BY p.account_id) s \
         ON s.account_id = a.id WHERE a.balance <> COALESCE(s.total, 0)",
    )
    .await?
    {
        found.push(Violation {
            rule: "balance_matches_postings",
            detail: format!("account {} differs from its postings by {}", r.a, r.b.unwrap_or(0)),
        });
    }
    for r in rows("SELECT id AS a, balance AS b FROM accounts WHERE balance < 0 AND kind <> 'external'").await? {
        found.push(Violation {
            rule: "balance_non_negative",
            detail: format!("account {} is at {}", r.a, r.b.unwrap_or(0)),
        });
    }
    for r in rows("SELECT COUNT(*) AS a, SUM(balance) AS b FROM accounts").await? {
        if r.b.unwrap_or(0) != 0 {
            found.push(Violation {
                rule: "ledger_sums_to_zero",
                detail: format!("all balances sum to {}", r.b.unwrap_or(0)),
            });
        }
    }
    // A settle entry moves what its settlements say: its debits are what their buyers paid, its credit to
    // each account what they credit to it (sellers' shares to the sellers' wallets, the platform's to
    // revenue). Grouped in one pass each, never a subquery per row.
    for r in rows(
        "SELECT x.eid AS a, SUM(x.n) AS b FROM (SELECT p.entry_id AS eid, p.amount AS n FROM postings p \
         JOIN journal_entries e ON e.id = p.entry_id WHERE e.kind = 'settle' AND p.amount < 0 \
         UNION ALL SELECT s.entry_id, s.paid FROM settlements s) x GROUP BY x.eid HAVING SUM(x.n) <> 0",
    )
    .await?
    {
        found.push(Violation {
            rule: "settlement_matches_entry",
            detail: format!("entry {} debits {} more than its settlements paid", r.a, -r.b.unwrap_or(0)),
        });
    }
    for r in rows(
        "SELECT x.eid AS a, SUM(x.n) AS b FROM (SELECT p.entry_id AS eid, p.account_id AS acc, p.amount AS n \
         FROM postings p JOIN journal_entries e ON e.id = p.entry_id WHERE e.kind = 'settle' AND p.amount > 0 \
         UNION ALL SELECT s.entry_id, s.seller_account_id, -s.seller FROM settlements s WHERE s.seller <> 0 \
         UNION ALL SELECT s.entry_id, r.id, -s.platform FROM settlements s JOIN accounts r ON r.kind = 'revenue' \
         WHERE s.platform <> 0) x GROUP BY x.eid, x.acc HAVING SUM(x.n) <> 0",
    )
    .await?
    {
        found.push(Violation {
            rule: "settlement_matches_entry",
            detail: format!("entry {} credits an account {} more than its settlements", r.a, r.b.unwrap_or(0)),
        });
    }
    for r in rows(
        "SELECT MIN(s.entry_id) AS a, COUNT(*) AS b FROM settlements s \
         LEFT JOIN journal_entries e ON e.id = s.entry_id AND e.kind = 'settle' WHERE e.id IS NULL HAVING COUNT(*) > 0",
    )
    .await?
    {
        found.push(Violation {
            rule: "settlement_matches_entry",
            detail: format!("{} settlements name no settle entry (entry {}, ...)", r.b.unwrap_or(0), r.a),
        });
    }
    // Every paid usage record is settled, for what the record says was paid; every settlement has its
    // usage record.
    let settled = integer_rows::<Settledness>(
        c,
        "SELECT u.id AS id, u.cost_credits AS cost, \
         (u.cost_credits - u.unpaid_credits) - COALESCE(s.paid, 0) AS short, \
         CASE WHEN s.request_id IS NULL THEN 0 ELSE 1 END AS entries \
         FROM usage_records u LEFT JOIN settlements s ON s.request_id = u.request_id \
         WHERE u.cost_credits > 0 AND (s.request_id IS NULL OR s.paid <> u.cost_credits - u.unpaid_credits)"
            .to_string(),
        &["id", "cost", "short", "entries"],
    )
    .await?;
    for r in settled {
        if r.entries == 0 {
            found.push(Violation {
                rule: "usage_settled",
                detail: format!("usage record {} costs {} and has no settlement", r.id, r.cost.unwrap_or(0)),
            });
        }
        if r.short.unwrap_or(0) != 0 && r.entries > 0 {
            found.push(Violation {
                rule: "usage_settled",
                detail: format!("usage record {} is settled {} credits short", r.id, r.short.unwrap_or(0)),
            });
        }
    }
    for r in rows(
        "SELECT MIN(s.entry_id) AS a, COUNT(*) AS b FROM settlements s \
         LEFT JOIN usage_records u ON u.request_id = s.request_id WHERE u.id IS NULL HAVING COUNT(*) > 0",
    )
    .await?
    {
        found.push(Violation {
            rule: "usage_settled",
            detail: format!("{} settlements have no usage record (entry {}, ...)", r.b.unwrap_or(0), r.a),
        });
    }
    let stale = stale_holds(c, now_ms - max_hold_idle_ms).await?;
    for hold in stale {
        found.push(Violation {
            rule: "no_stale_hold",
            detail: format!(
                "hold {} (node {}) open without renewal since {}",
                hold.id, hold.node_id, hold.renewed_at_ms
            ),
        });
    }
    for r in rows(
        "SELECT h.id AS a, (h.amount - h.spent) - a.balance AS b FROM holds h JOIN accounts a ON a.id = h.account_id WHERE h.status = 'open'",
    )
    .await?
    {
        if r.b.unwrap_or(0) != 0 {
            found.push(Violation { rule: "hold_accounting", detail: format!("hold {} is off by {}", r.a, r.b.unwrap_or(0)) });
        }
    }
    for r in rows(
        "SELECT h.id AS a, a.balance AS b FROM holds h JOIN accounts a ON a.id = h.account_id WHERE h.status = 'closed' AND a.balance <> 0",
    )
    .await?
    {
        found.push(Violation { rule: "closed_hold_empty", detail: format!("closed hold {} still holds {}", r.a, r.b.unwrap_or(0)) });
    }
    Ok(found)
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;

/// `settle_batch` against settling the same requests one by one, each in its own transaction.
#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::db::testing::TestDb;

    const T0: i64 = 1_750_000_000_000;
    const BUYER: i64 = 1;
    const SELLERS: [i64; 2] = [50, 51];

    /// The same accounts, holds and escrow in a fresh database: a wallet hold, a small hold that overruns
    /// into the wallet, and a hold on an escrow that overruns into the escrow. Returns the settlements.
    async fn setup(db: &DatabaseConnection) -> Vec<Settlement> {
        grant(db, BUYER, 1_000, None, "g", None, T0).await.unwrap();
        let wallet = wallet_account(db, BUYER, T0).await.unwrap();
        let source = HoldSource { buyer_id: BUYER, account_id: wallet, escrow_id: None };
        let a = open_hold(db, source, "n", 100, 100, T0).await.unwrap().unwrap();
        let b = open_hold(db, source, "n", 50, 50, T0).await.unwrap().unwrap();
        let escrow = create_escrow(db, BUYER, 100, EscrowScope::default(), T0 + 1_000_000, T0).await.unwrap();
        let in_escrow = HoldSource { buyer_id: BUYER, account_id: escrow.account_id, escrow_id: Some(escrow.id) };
        let c = open_hold(db, in_escrow, "n", 60, 60, T0).await.unwrap().unwrap();
        let revenue = revenue_account(db, T0).await.unwrap();
        let sellers =
            [wallet_account(db, SELLERS[0], T0).await.unwrap(), wallet_account(db, SELLERS[1], T0).await.unwrap()];
        let s = |id: &str, h: &holds::Model, cost: i64, seller: Option<i64>| Settlement {
            request_id: id.to_string(),
            hold_id: h.id,
            hold_account_id: h.account_id,
            source_account_id: h.source_account_id,
            cost,
            seller_account_id: seller,
            revenue_account_id: revenue,
            fee_bps: 500,
        };
        vec![
            s("r1", &a, 30, Some(sellers[0])),
            s("r2", &a, 50, None),
            s("r3", &b, 21, Some(sellers[1])),
            s("r1", &a, 30, Some(sellers[0])),
            s("r4", &a, 40, Some(sellers[0])),
            s("r5", &b, 0, Some(sellers[0])),
            s("r6", &b, 45, Some(sellers[1])),
            s("r7", &c, 100, Some(sellers[1])),
        ]
    }

    /// Every account's balance and every hold's spent amount, in id order.
    async fn state(db: &DatabaseConnection) -> (Vec<(i64, i64)>, Vec<(i64, i64)>, Vec<String>) {
        let balances = accounts::Entity::find().order_by_asc(accounts::Column::Id).all(db).await.unwrap();
        let holds = holds::Entity::find().order_by_asc(holds::Column::Id).all(db).await.unwrap();
        let escrows = escrows::Entity::find().order_by_asc(escrows::Column::Id).all(db).await.unwrap();
        (
            balances.into_iter().map(|a| (a.id, a.balance)).collect(),
            holds.into_iter().map(|h| (h.id, h.spent)).collect(),
            escrows.into_iter().map(|e| e.status).collect(),
        )
    }

    #[tokio::test]
    async fn a_batch_settles_as_one_by_one_would() {
        for (batched, single) in
            [(TestDb::sqlite().await, TestDb::sqlite().await), (TestDb::mysql().await, TestDb::mysql().await)]
        {
            let l = batched.label;
            let settlements = setup(&batched.db).await;
            assert_eq!(setup(&single.db).await, settlements, "{l}: the same ids in both databases");
            let txn = begin(&batched.db).await.unwrap();
            let together = settle_batch(&txn, &settlements, T0 + 5).await.unwrap();
            txn.commit().await.unwrap();
            let mut alone = Vec::new();
            for s in &settlements {
                let txn = begin(&single.db).await.unwrap();
                alone.push(settle(&txn, s, T0 + 5).await.unwrap());
                txn.commit().await.unwrap();
            }
            assert_eq!(together, alone, "{l}");
            assert_eq!(state(&batched.db).await, state(&single.db).await, "{l}");
            // r1 once, r4 overran hold a (20 left) into the wallet, r6 took hold b's last 29 and 16 of the
            // wallet, r7 took hold c's 60 and the escrow's last 40.
            assert!(together[3].duplicate && !together[0].duplicate, "{l}");
            assert_eq!((together[4].paid, together[4].unpaid), (40, 0), "{l}");
            assert_eq!((together[6].paid, together[7].paid, together[7].unpaid), (45, 100, 0), "{l}");
            assert_eq!(together[5], Settled::default(), "{l}: nothing to pay");
            // Settled again, the whole batch is a duplicate and moves nothing.
            let before = state(&batched.db).await;
            let txn = begin(&batched.db).await.unwrap();
            let again = settle_batch(&txn, &settlements, T0 + 6).await.unwrap();
            txn.commit().await.unwrap();
            assert!(again.iter().zip(&settlements).all(|(s, r)| s.duplicate == (r.cost > 0)), "{l}: {again:?}");
            assert_eq!(state(&batched.db).await, before, "{l}");
            for db in [&batched.db, &single.db] {
                let violations = check(db, T0 + 10, 60_000).await.unwrap();
                assert!(violations.iter().all(|v| v.rule == "usage_settled"), "{l}: {violations:?}");
            }
            batched.cleanup().await;
            single.cleanup().await;
        }
    }
}
