//! Credits, prices and escrows (docs/ledger.md): the operations behind both the admin REST API and the CLI.
//!
//! Every input is validated here, once, so that the REST layer and the CLI cannot drift apart; the money
//! itself moves only through `db::ledger`. Callers that change what the gateway's snapshot holds (prices,
//! wallets, escrows, `wallet_pays`) ask the pool to refresh afterwards.

use std::collections::{BTreeMap, BTreeSet};

use http::StatusCode;
use sea_orm::{DatabaseConnection, DbErr};
use serde::Serialize;

use crate::accounts::status as key_status;
use crate::db::entities::users;
use crate::db::ledger::{self as core, EscrowScope, LedgerError, Posted, PostingView, Violation};
use crate::db::prices;

/// The largest amount of credits one grant or escrow may move: far above any real top-up, far below where
/// sums of many of them could overflow an `i64`.
pub const MAX_CREDITS: i64 = 1_000_000_000_000_000;
/// The largest price per million tokens.
pub const MAX_PRICE_PER_MILLION: i64 = 1_000_000_000_000;
pub const MAX_OUTPUT_TOKENS: i64 = 10_000_000;
pub const DEFAULT_MAX_OUTPUT_TOKENS: i64 = 4096;
pub const MAX_ESCROW_DAYS: u32 = 3650;
pub const MAX_TRANSACTIONS_PAGE: u64 = 200;
pub const DEFAULT_TRANSACTIONS_PAGE: u64 = 50;
const MAX_MODEL_CHARS: usize = 128;
const MAX_MEMO_CHARS: usize = 255;
/// `journal_entries.idempotency_key` holds 100 characters, `grant:` included.
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 80;
/// `usage_records.request_id` holds 40 characters.
const MAX_REQUEST_ID_CHARS: usize = 40;
const DAY_MS: i64 = 86_400_000;

/// The one error of these operations; it knows its HTTP status and a stable code for clients.
#[derive(Debug, thiserror::Error)]
pub enum FundsError {
    #[error("{message}")]
    Invalid { message: String },
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("{message}")]
    InsufficientFunds { message: String },
    #[error("{message}")]
    EscrowClosed { message: String },
    /// The idempotency key was used before for a different operation.
    #[error("{message}")]
    IdempotencyKeyReused { message: String },
    #[error("{message}")]
    Conflict { message: String },
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

impl FundsError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::InsufficientFunds { .. }
            | Self::EscrowClosed { .. }
            | Self::IdempotencyKeyReused { .. }
            | Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_request",
            Self::NotFound { .. } => "not_found",
            Self::InsufficientFunds { .. } => "insufficient_funds",
            Self::EscrowClosed { .. } => "escrow_closed",
            Self::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            Self::Conflict { .. } => "conflict",
            Self::Db(_) => "database_error",
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid { message: message.into() }
    }
}

/// The generic mapping; operations that know what a conflict means map it themselves first.
impl From<LedgerError> for FundsError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Db(e) => Self::Db(e),
            LedgerError::InsufficientFunds { .. } => {
                Self::InsufficientFunds { message: "not enough credits for this operation".into() }
            }
            LedgerError::NotFound(what) => Self::NotFound { what },
            LedgerError::Conflict(message) => Self::Conflict { message },
            LedgerError::Invalid(message) => Self::Invalid { message },
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Validation

fn credits(field: &str, amount: i64) -> Result<i64, FundsError> {
    if amount <= 0 {
        return Err(FundsError::invalid(format!("{field}: must be a positive number of credits")));
    }
    if amount > MAX_CREDITS {
        return Err(FundsError::invalid(format!("{field}: at most {MAX_CREDITS} credits")));
    }
    Ok(amount)
}

fn memo(memo: Option<String>) -> Result<Option<String>, FundsError> {
    let Some(memo) = memo.map(|m| m.trim().to_string()).filter(|m| !m.is_empty()) else {
        return Ok(None);
    };
    if memo.chars().count() > MAX_MEMO_CHARS {
        return Err(FundsError::invalid(format!("memo: at most {MAX_MEMO_CHARS} characters")));
    }
    if memo.chars().any(char::is_control) {
        return Err(FundsError::invalid("memo: control characters are not allowed"));
    }
    Ok(Some(memo))
}

/// A model name as stored in prices and escrows.
pub fn model_name(model: &str) -> Result<String, FundsError> {
    let n = model.chars().count();
    if n == 0 || n > MAX_MODEL_CHARS {
        return Err(FundsError::invalid(format!("model: 1 to {MAX_MODEL_CHARS} characters")));
    }
    if model.trim() != model || model.chars().any(char::is_control) {
        return Err(FundsError::invalid("model: no surrounding spaces or control characters"));
    }
    Ok(model.to_string())
}

/// A caller's idempotency key: printable ASCII, no spaces.
pub fn idempotency_key(key: &str) -> Result<String, FundsError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_CHARS || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FundsError::invalid(format!(
            "idempotency_key: 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters without spaces"
        )));
    }
    Ok(key.to_string())
}

// ---------------------------------------------------------------------------------------------------------
// Grants and refunds

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Granted {
    pub entry_id: i64,
    pub user_id: i64,
    pub amount: i64,
    /// The wallet balance now.
    pub balance: i64,
    /// The key was used before for this very grant: nothing was granted now.
    pub duplicate: bool,
}

/// Grants credits to a user's wallet, once per idempotency key (a fresh key when None).
pub async fn grant_credits(
    db: &DatabaseConnection,
    user_id: i64,
    amount: i64,
    memo_text: Option<String>,
    key: Option<&str>,
    actor_id: Option<i64>,
) -> Result<Granted, FundsError> {
    let amount = credits("amount", amount)?;
    let memo_text = memo(memo_text)?;
    let key = match key {
        Some(key) => idempotency_key(key)?,
        None => uuid::Uuid::now_v7().to_string(),
    };
    if crate::db::users::find_by_id(db, user_id).await?.is_none() {
        return Err(FundsError::NotFound { what: "user" });
    }
    let now = crate::now_ms();
    let (posted, balance) = core::grant(db, user_id, amount, actor_id, &key, memo_text, now).await?;
    let (entry_id, duplicate) = match posted {
        Posted::New(id) => (id, false),
        Posted::Already(id) => {
            if !crate::db::funds::grant_credits_wallet(db, id, user_id, amount).await? {
                return Err(FundsError::IdempotencyKeyReused {
                    message: "this idempotency key was used for a different grant".into(),
                });
            }
            (id, true)
        }
    };
    Ok(Granted { entry_id, user_id, amount, balance, duplicate })
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Refunded {
    pub request_id: String,
    /// Credits returned to the buyer's wallet.
    pub refunded: i64,
    pub duplicate: bool,
}

/// Reverses a settled request: the seller and the platform give back what they got, the buyer's wallet
/// gets it.
pub async fn refund(
    db: &DatabaseConnection,
    request_id: &str,
    memo_text: Option<String>,
    actor_id: Option<i64>,
) -> Result<Refunded, FundsError> {
    const NOT_FOUND: FundsError = FundsError::NotFound { what: "settled request" };
    if request_id.is_empty() || request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(NOT_FOUND);
    }
    let memo_text = memo(memo_text)?;
    let Some(record) = crate::db::funds::usage_record(db, request_id).await? else {
        return Err(NOT_FOUND);
    };
    let now = crate::now_ms();
    match core::refund_request(db, request_id, record.buyer_id, actor_id, memo_text, now).await {
        Ok((posted, refunded)) => Ok(Refunded {
            request_id: request_id.to_string(),
            refunded,
            duplicate: matches!(posted, Posted::Already(_)),
        }),
        Err(LedgerError::NotFound(_)) => Err(NOT_FOUND),
        Err(LedgerError::InsufficientFunds { .. }) => Err(FundsError::InsufficientFunds {
            message: "the seller's wallet no longer holds what this request earned; it cannot be refunded".into(),
        }),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Prices

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PriceView {
    pub model: String,
    pub prompt_per_million: i64,
    pub completion_per_million: i64,
    pub max_output_tokens: i64,
}

impl From<prices::Model> for PriceView {
    fn from(p: prices::Model) -> Self {
        Self {
            model: p.model,
            prompt_per_million: p.prompt_per_million,
            completion_per_million: p.completion_per_million,
            max_output_tokens: p.max_output_tokens,
        }
    }
}

pub async fn list_prices(db: &DatabaseConnection) -> Result<Vec<PriceView>, FundsError> {
    Ok(prices::list(db).await?.into_iter().map(PriceView::from).collect())
}

/// Sets a model's price (insert or replace).
pub async fn set_price(
    db: &DatabaseConnection,
    model: &str,
    prompt_per_million: i64,
    completion_per_million: i64,
    max_output_tokens: Option<i64>,
    actor_id: Option<i64>,
) -> Result<PriceView, FundsError> {
    let model = model_name(model)?;
    for (field, rate) in
        [("prompt_per_million", prompt_per_million), ("completion_per_million", completion_per_million)]
    {
        if !(0..=MAX_PRICE_PER_MILLION).contains(&rate) {
            return Err(FundsError::invalid(format!("{field}: 0 to {MAX_PRICE_PER_MILLION} credits")));
        }
    }
    let max_output_tokens = max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
    if !(1..=MAX_OUTPUT_TOKENS).contains(&max_output_tokens) {
        return Err(FundsError::invalid(format!("max_output_tokens: 1 to {MAX_OUTPUT_TOKENS}")));
    }
    let now = crate::now_ms();
    prices::upsert(db, &model, prompt_per_million, completion_per_million, max_output_tokens, actor_id, now).await?;
    let stored = prices::find(db, &model).await?.ok_or(FundsError::NotFound { what: "price" })?;
    Ok(stored.into())
}

/// Removes a model's price: the gateway stops serving the model.
pub async fn delete_price(db: &DatabaseConnection, model: &str) -> Result<(), FundsError> {
    if prices::delete(db, model).await? {
        Ok(())
    } else {
        Err(FundsError::NotFound { what: "price" })
    }
}

// ---------------------------------------------------------------------------------------------------------
// The ledger check

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CheckReport {
    pub ok: bool,
    pub violations: Vec<Violation>,
}

pub async fn check(db: &DatabaseConnection, hold_stale_ms: u64) -> Result<CheckReport, FundsError> {
    let stale = i64::try_from(hold_stale_ms).unwrap_or(i64::MAX);
    let violations = core::check(db, crate::now_ms(), stale).await?;
    Ok(CheckReport { ok: violations.is_empty(), violations })
}

// ---------------------------------------------------------------------------------------------------------
// Settings and wallets

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Settings {
    pub user_id: i64,
    /// Plain wallet credits may pay for requests (otherwise only escrows do).
    pub wallet_pays: bool,
}

pub async fn set_wallet_pays(db: &DatabaseConnection, user_id: i64, wallet_pays: bool) -> Result<Settings, FundsError> {
    if crate::db::users::find_by_id(db, user_id).await?.is_none() {
        return Err(FundsError::NotFound { what: "user" });
    }
    crate::db::funds::set_wallet_pays(db, user_id, wallet_pays).await?;
    Ok(Settings { user_id, wallet_pays })
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WalletView {
    /// Spendable credits in the wallet.
    pub balance: i64,
    /// Credits gateways hold for requests in flight that go back to the wallet when unspent: held from the
    /// wallet, and held from escrows that have closed since.
    pub held: i64,
    /// What the active escrows have left, including what gateways hold from them.
    pub escrowed: i64,
    pub wallet_pays: bool,
}

pub async fn wallet(db: &DatabaseConnection, user: &users::Model) -> Result<WalletView, FundsError> {
    let wallet_account = core::find_wallet(db, user.id).await?;
    let balance = match wallet_account {
        Some(id) => core::balance(db, id).await?,
        None => 0,
    };
    let held_by_source = core::held_by_source(db, user.id).await?;
    let mut held = wallet_account.and_then(|id| held_by_source.get(&id).copied()).unwrap_or(0);
    let mut escrowed = 0;
    for escrow in crate::db::funds::escrows_with_balance(db, user.id, true).await? {
        let from_escrow = held_by_source.get(&escrow.account_id).copied().unwrap_or(0);
        if escrow.status == core::ESCROW_ACTIVE {
            escrowed += escrow.balance + from_escrow;
        } else {
            held += from_escrow;
        }
    }
    Ok(WalletView { balance, held, escrowed, wallet_pays: user.wallet_pays })
}

// ---------------------------------------------------------------------------------------------------------
// Escrows

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EscrowView {
    pub id: i64,
    /// None: any model.
    pub model: Option<String>,
    /// Pinned to this seller key.
    pub hosted_key_id: Option<i64>,
    /// The amount funded.
    pub amount: i64,
    /// What is left to spend.
    pub balance: i64,
    /// What gateways hold from it for requests in flight.
    pub held: i64,
    /// active | exhausted | released | expired
    pub status: String,
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    pub closed_at_ms: Option<i64>,
}

impl EscrowView {
    fn new(e: &crate::db::funds::EscrowRow, held_by_source: &BTreeMap<i64, i64>) -> Self {
        Self {
            id: e.id,
            model: e.model.clone(),
            hosted_key_id: e.hosted_key_id,
            amount: e.amount,
            balance: e.balance,
            held: held_by_source.get(&e.account_id).copied().unwrap_or(0),
            status: e.status.clone(),
            expires_at_ms: e.expires_at_ms,
            created_at_ms: e.created_at_ms,
            closed_at_ms: e.closed_at_ms,
        }
    }
}

/// The buyer's escrows, newest first.
pub async fn list_escrows(db: &DatabaseConnection, buyer_id: i64) -> Result<Vec<EscrowView>, FundsError> {
    let held = core::held_by_source(db, buyer_id).await?;
    Ok(crate::db::funds::escrows_with_balance(db, buyer_id, false)
        .await?
        .iter()
        .map(|e| EscrowView::new(e, &held))
        .collect())
}

async fn escrow_view(db: &DatabaseConnection, buyer_id: i64, escrow_id: i64) -> Result<EscrowView, FundsError> {
    let row = crate::db::funds::escrow_with_balance(db, buyer_id, escrow_id)
        .await?
        .ok_or(FundsError::NotFound { what: "escrow" })?;
    let held = core::held_by_source(db, buyer_id).await?;
    Ok(EscrowView::new(&row, &held))
}

#[derive(Clone, Debug, Default)]
pub struct NewEscrow {
    pub amount: i64,
    pub model: Option<String>,
    pub hosted_key_id: Option<i64>,
    pub expires_in_days: Option<u32>,
}

/// Moves credits from the buyer's wallet into a new escrow. A pinned key must exist, be in the pool (active
/// or paused) and serve the escrow's model when one is given.
pub async fn create_escrow(
    db: &DatabaseConnection,
    buyer_id: i64,
    new: NewEscrow,
    default_days: u32,
) -> Result<EscrowView, FundsError> {
    let amount = credits("amount", new.amount)?;
    let model = new.model.as_deref().map(model_name).transpose()?;
    let days = new.expires_in_days.unwrap_or(default_days);
    if !(1..=MAX_ESCROW_DAYS).contains(&days) {
        return Err(FundsError::invalid(format!("expires_in_days: 1 to {MAX_ESCROW_DAYS}")));
    }
    if let Some(key_id) = new.hosted_key_id {
        let key = crate::db::funds::hosted_key(db, key_id).await?.ok_or(FundsError::NotFound { what: "seller key" })?;
        let in_pool = key.status == key_status::ACTIVE || key.status == key_status::PAUSED;
        let serves = model.as_deref().is_none_or(|m| key.models.split(',').any(|k| k.trim() == m));
        if !in_pool || !serves {
            return Err(FundsError::NotFound { what: "seller key" });
        }
    }
    let now = crate::now_ms();
    let expires_at_ms = now.saturating_add(i64::from(days) * DAY_MS);
    let scope = EscrowScope { model, hosted_key_id: new.hosted_key_id };
    let escrow = match core::create_escrow(db, buyer_id, amount, scope, expires_at_ms, now).await {
        Ok(escrow) => escrow,
        Err(LedgerError::Conflict(message)) => return Err(FundsError::InsufficientFunds { message }),
        Err(e) => return Err(e.into()),
    };
    escrow_view(db, buyer_id, escrow.id).await
}

/// The buyer ends an escrow: what is left goes back to the wallet now, what gateways hold from it when
/// their holds close.
pub async fn release_escrow(db: &DatabaseConnection, buyer_id: i64, escrow_id: i64) -> Result<EscrowView, FundsError> {
    let now = crate::now_ms();
    match core::close_escrow(db, Some(buyer_id), escrow_id, core::ESCROW_RELEASED, now).await {
        Ok(_) => {}
        Err(LedgerError::Conflict(message)) => return Err(FundsError::EscrowClosed { message }),
        Err(LedgerError::NotFound(_)) => return Err(FundsError::NotFound { what: "escrow" }),
        Err(e) => return Err(e.into()),
    }
    escrow_view(db, buyer_id, escrow_id).await
}

// ---------------------------------------------------------------------------------------------------------
// Transactions and earnings

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TransactionPage {
    /// Newest first.
    pub data: Vec<PostingView>,
    /// Pass as `before` for the next page; None on the last page.
    pub next_before: Option<i64>,
}

/// Which of a user's accounts a listing covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ledgers {
    /// Wallet, escrows and holds (a buyer's view).
    All,
    /// The wallet only (a seller's view: earnings land there).
    Wallet,
}

pub fn page_limit(limit: Option<u64>) -> Result<u64, FundsError> {
    let limit = limit.unwrap_or(DEFAULT_TRANSACTIONS_PAGE);
    if !(1..=MAX_TRANSACTIONS_PAGE).contains(&limit) {
        return Err(FundsError::invalid(format!("limit: 1 to {MAX_TRANSACTIONS_PAGE}")));
    }
    Ok(limit)
}

pub async fn transactions(
    db: &DatabaseConnection,
    user_id: i64,
    ledgers: Ledgers,
    before: Option<i64>,
    limit: Option<u64>,
) -> Result<TransactionPage, FundsError> {
    let limit = page_limit(limit)?;
    if before.is_some_and(|b| b <= 0) {
        return Err(FundsError::invalid("before: a posting id from next_before"));
    }
    let kinds: &[&str] = match ledgers {
        Ledgers::All => &[core::WALLET, core::ESCROW, core::HOLD],
        Ledgers::Wallet => &[core::WALLET],
    };
    // One more than asked tells whether another page follows.
    let mut data = core::postings_of(db, user_id, kinds, before, limit + 1).await?;
    let next_before = if data.len() as u64 > limit {
        data.truncate(limit as usize);
        data.last().map(|p| p.posting_id)
    } else {
        None
    };
    Ok(TransactionPage { data, next_before })
}

pub use crate::db::funds::KeyEarnings;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Earnings {
    /// The wallet balance (earnings land there).
    pub balance: i64,
    /// Everything settled to the seller, refunds deducted.
    pub earned_total: i64,
    /// Per key, those with earnings first (by key id), then the seller's other keys at zero.
    pub by_key: Vec<KeyEarnings>,
}

pub async fn earnings(db: &DatabaseConnection, seller_id: i64) -> Result<Earnings, FundsError> {
    let (balance, earned_total, mut by_key) = match core::find_wallet(db, seller_id).await? {
        Some(wallet) => (
            core::balance(db, wallet).await?,
            crate::db::funds::earned_total(db, wallet).await?,
            crate::db::funds::earnings_by_key(db, wallet).await?,
        ),
        None => (0, 0, Vec::new()),
    };
    let listed: BTreeSet<i64> = by_key.iter().filter_map(|k| k.hosted_key_id).collect();
    for key in crate::db::hosted_keys::list_for_owner(db, seller_id).await? {
        if !listed.contains(&key.id) {
            by_key.push(KeyEarnings { hosted_key_id: Some(key.id), name: Some(key.name), requests: 0, earned: 0 });
        }
    }
    Ok(Earnings { balance, earned_total, by_key })
}
