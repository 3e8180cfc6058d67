//! Queries behind the buyer's and seller's views of their money (wallet summaries, escrows with balances,
//! earnings per key), aggregated by the database.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter,
    QuerySelect, Statement, Value,
};

use super::entities::{accounts, hosted_keys, postings, usage_records, users};

/// `SUM` over BIGINT is DECIMAL on MySQL, which does not decode as an integer.
pub(crate) fn sum(backend: DbBackend, expr: &str) -> String {
    match backend {
        DbBackend::MySql => format!("CAST(COALESCE(SUM({expr}), 0) AS SIGNED)"),
        _ => format!("CAST(COALESCE(SUM({expr}), 0) AS INTEGER)"),
    }
}

fn statement(c: &impl ConnectionTrait, sql: String, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(c.get_database_backend(), sql, values)
}

/// Whether grant entry `entry_id` credited `amount` to the user's wallet (a retried grant, not a key
/// reused for another grant).
pub async fn grant_credits_wallet(
    c: &impl ConnectionTrait,
    entry_id: i64,
    user_id: i64,
    amount: i64,
) -> Result<bool, DbErr> {
    let Some(wallet) = super::ledger::find_wallet(c, user_id).await? else { return Ok(false) };
    let n = postings::Entity::find()
        .filter(postings::Column::EntryId.eq(entry_id))
        .filter(postings::Column::AccountId.eq(wallet))
        .filter(postings::Column::Amount.eq(amount))
        .count(c)
        .await?;
    Ok(n == 1)
}

pub async fn usage_record(c: &impl ConnectionTrait, request_id: &str) -> Result<Option<usage_records::Model>, DbErr> {
    usage_records::Entity::find().filter(usage_records::Column::RequestId.eq(request_id)).one(c).await
}

pub async fn set_wallet_pays(c: &impl ConnectionTrait, user_id: i64, wallet_pays: bool) -> Result<(), DbErr> {
    users::Entity::update_many()
        .col_expr(users::Column::WalletPays, Expr::value(wallet_pays))
        .filter(users::Column::Id.eq(user_id))
        .exec(c)
        .await?;
    Ok(())
}

pub async fn hosted_key(c: &impl ConnectionTrait, key_id: i64) -> Result<Option<hosted_keys::Model>, DbErr> {
    hosted_keys::Entity::find_by_id(key_id).one(c).await
}

/// An escrow with its account's balance.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct EscrowRow {
    pub id: i64,
    pub buyer_id: i64,
    pub account_id: i64,
    pub model: Option<String>,
    pub hosted_key_id: Option<i64>,
    pub amount: i64,
    pub status: String,
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    pub closed_at_ms: Option<i64>,
    pub balance: i64,
}

const ESCROW_ROW: &str = "SELECT e.id AS id, e.buyer_id AS buyer_id, e.account_id AS account_id, e.model AS model, \
    e.hosted_key_id AS hosted_key_id, e.amount AS amount, e.status AS status, e.expires_at_ms AS expires_at_ms, \
    e.created_at_ms AS created_at_ms, e.closed_at_ms AS closed_at_ms, a.balance AS balance \
    FROM escrows e JOIN accounts a ON a.id = e.account_id";

/// The buyer's escrows with their balances, newest first; `only_live` keeps only those that are active
/// or still have open holds (what a wallet summary needs).
pub async fn escrows_with_balance(
    c: &impl ConnectionTrait,
    buyer_id: i64,
    only_live: bool,
) -> Result<Vec<EscrowRow>, DbErr> {
    let live = if only_live {
        " AND (e.status = 'active' OR EXISTS (SELECT 1 FROM holds h WHERE h.source_account_id = e.account_id \
         AND h.status = 'open'))"
    } else {
        ""
    };
    let sql = format!("{ESCROW_ROW} WHERE e.buyer_id = ?{live} ORDER BY e.id DESC");
    EscrowRow::find_by_statement(statement(c, sql, vec![buyer_id.into()])).all(c).await
}

/// One of the buyer's escrows; another buyer's is None, like a missing one.
pub async fn escrow_with_balance(
    c: &impl ConnectionTrait,
    buyer_id: i64,
    escrow_id: i64,
) -> Result<Option<EscrowRow>, DbErr> {
    let sql = format!("{ESCROW_ROW} WHERE e.id = ? AND e.buyer_id = ?");
    EscrowRow::find_by_statement(statement(c, sql, vec![escrow_id.into(), buyer_id.into()])).one(c).await
}

#[derive(Debug, FromQueryResult)]
struct Total {
    total: i64,
}

/// What settlements paid into the wallet, minus what refunds took back.
pub async fn earned_total(c: &impl ConnectionTrait, wallet: i64) -> Result<i64, DbErr> {
    let sql = format!(
        "SELECT {} AS total FROM postings p JOIN journal_entries e ON e.id = p.entry_id \
         WHERE p.account_id = ? AND e.kind IN ('settle', 'refund')",
        sum(c.get_database_backend(), "p.amount")
    );
    let row = Total::find_by_statement(statement(c, sql, vec![wallet.into()])).one(c).await?;
    Ok(row.map_or(0, |r| r.total))
}

#[derive(Debug, FromQueryResult)]
struct KeyRow {
    hosted_key_id: Option<i64>,
    name: Option<String>,
    requests: i64,
    earned: i64,
}

/// Settled requests and earnings (refunds deducted) per seller key, aggregated by the database: the
/// settlements that credited the wallet (settle entries are per batch, settlements per request), reached
/// through the seller's keys' usage records (indexed), less the refunds' postings on the wallet.
pub async fn earnings_by_key(c: &impl ConnectionTrait, wallet: i64) -> Result<Vec<KeyEarnings>, DbErr> {
    let backend = c.get_database_backend();
    let sql = format!(
        "SELECT x.kid AS hosted_key_id, h.name AS name, {} AS requests, {} AS earned FROM \
         (SELECT u.hosted_key_id AS kid, 1 AS n, s.seller AS amount FROM hosted_keys k \
         JOIN usage_records u ON u.hosted_key_id = k.id JOIN settlements s ON s.request_id = u.request_id \
         WHERE k.owner_id = (SELECT a.owner_id FROM accounts a WHERE a.id = ?) \
         AND s.seller_account_id = ? AND s.seller > 0 \
         UNION ALL SELECT u.hosted_key_id, 0, p.amount FROM postings p JOIN journal_entries e ON e.id = p.entry_id \
         JOIN usage_records u ON u.request_id = e.request_id WHERE p.account_id = ? AND e.kind = 'refund') x \
         LEFT JOIN hosted_keys h ON h.id = x.kid GROUP BY x.kid, h.name ORDER BY x.kid",
        sum(backend, "x.n"),
        sum(backend, "x.amount"),
    );
    let rows =
        KeyRow::find_by_statement(statement(c, sql, vec![wallet.into(), wallet.into(), wallet.into()])).all(c).await?;
    Ok(rows
        .into_iter()
        .map(|r| KeyEarnings { hosted_key_id: r.hosted_key_id, name: r.name, requests: r.requests, earned: r.earned })
        .collect())
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct KeyEarnings {
    pub hosted_key_id: Option<i64>,
    pub name: Option<String>,
    /// Requests settled to the seller through this key.
    pub requests: i64,
    /// Credits earned through this key, refunds deducted.
    pub earned: i64,
}

/// Everything the gateway needs to know who can pay: (user, wallet_pays) for every user, (owner, account,
/// balance) for every wallet, and the active escrows with their balances.
pub struct FundingRows {
    pub wallet_pays: Vec<(i64, bool)>,
    pub wallets: Vec<(i64, i64, i64)>,
    pub escrows: Vec<EscrowRow>,
}

pub async fn funding_rows(c: &impl ConnectionTrait) -> Result<FundingRows, DbErr> {
    let wallet_pays = users::Entity::find()
        .select_only()
        .column(users::Column::Id)
        .column(users::Column::WalletPays)
        .into_tuple::<(i64, bool)>()
        .all(c)
        .await?;
    let wallets = accounts::Entity::find()
        .select_only()
        .column(accounts::Column::OwnerId)
        .column(accounts::Column::Id)
        .column(accounts::Column::Balance)
        .filter(accounts::Column::Kind.eq(super::ledger::WALLET))
        .into_tuple::<(i64, i64, i64)>()
        .all(c)
        .await?;
    let sql = format!("{ESCROW_ROW} WHERE e.status = 'active' ORDER BY e.expires_at_ms, e.id");
    let escrows = EscrowRow::find_by_statement(statement(c, sql, Vec::new())).all(c).await?;
    Ok(FundingRows { wallet_pays, wallets, escrows })
}
