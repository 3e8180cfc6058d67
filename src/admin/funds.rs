//! Buyer and seller endpoints for money: the buyer's wallet, settings, escrows and transactions; the
//! seller's earnings and transactions.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::auth::{BuyerUser, SellerUser};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::AdminState;
use crate::ledger::{self, Earnings, EscrowView, Ledgers, NewEscrow, Settings, TransactionPage, WalletView};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSettings {
    wallet_pays: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEscrow {
    amount: i64,
    /// Omitted or null: any model.
    #[serde(default)]
    model: Option<String>,
    /// Pin the escrow to one seller key (which must serve `model` when both are given).
    #[serde(default)]
    hosted_key_id: Option<i64>,
    /// Default: `ledger.escrow_default_days`.
    #[serde(default)]
    expires_in_days: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// A `next_before` from the previous page.
    #[serde(default)]
    before: Option<i64>,
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Debug, serde::Serialize)]
pub struct EscrowList {
    escrows: Vec<EscrowView>,
}

pub async fn wallet(State(state): State<AdminState>, BuyerUser(user): BuyerUser) -> Result<Json<WalletView>, ApiError> {
    Ok(Json(ledger::wallet(&state.db, &user).await?))
}

pub async fn set_settings(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiJson(req): ApiJson<SetSettings>,
) -> Result<Json<Settings>, ApiError> {
    let settings = ledger::set_wallet_pays(&state.db, user.id, req.wallet_pays).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(settings))
}

pub async fn list_escrows(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
) -> Result<Json<EscrowList>, ApiError> {
    Ok(Json(EscrowList { escrows: ledger::list_escrows(&state.db, user.id).await? }))
}

pub async fn create_escrow(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiJson(req): ApiJson<CreateEscrow>,
) -> Result<(StatusCode, Json<EscrowView>), ApiError> {
    let new = NewEscrow {
        amount: req.amount,
        model: req.model,
        hosted_key_id: req.hosted_key_id,
        expires_in_days: req.expires_in_days,
    };
    let escrow = ledger::create_escrow(&state.db, user.id, new, state.ledger.escrow_default_days).await?;
    state.refresh.request_and_wait().await;
    Ok((StatusCode::CREATED, Json(escrow)))
}

pub async fn release_escrow(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<EscrowView>, ApiError> {
    let escrow = ledger::release_escrow(&state.db, user.id, id).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(escrow))
}

pub async fn buyer_transactions(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<TransactionPage>, ApiError> {
    Ok(Json(ledger::transactions(&state.db, user.id, Ledgers::All, page.before, page.limit).await?))
}

pub async fn earnings(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<Json<Earnings>, ApiError> {
    Ok(Json(ledger::earnings(&state.db, user.id).await?))
}

pub async fn seller_transactions(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<TransactionPage>, ApiError> {
    Ok(Json(ledger::transactions(&state.db, user.id, Ledgers::Wallet, page.before, page.limit).await?))
}
