//! Buyer and seller endpoints for money: the buyer's wallet, settings, escrows and transactions; the
//! seller's earnings and transactions.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{BuyerUser, SellerUser};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::AdminState;
use crate::ledger::{self, Earnings, EscrowView, Ledgers, NewEscrow, Settings, TransactionPage, WalletView};

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(wallet))
        .routes(routes!(set_settings))
        .routes(routes!(create_escrow, list_escrows))
        .routes(routes!(release_escrow))
        .routes(routes!(buyer_transactions))
        .routes(routes!(earnings))
        .routes(routes!(seller_transactions))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSettings {
    wallet_pays: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// A `next_before` from the previous page.
    #[serde(default)]
    before: Option<i64>,
    /// Postings per page: 1 to 200, default 50.
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct EscrowList {
    escrows: Vec<EscrowView>,
}

#[utoipa::path(
    get,
    path = "/api/v1/buyer/wallet",
    operation_id = "buyer_wallet",
    tag = "buyer",
    responses(
        (status = 200, description = "The caller's wallet: balance, held and escrowed credits", body = WalletView),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn wallet(State(state): State<AdminState>, BuyerUser(user): BuyerUser) -> Result<Json<WalletView>, ApiError> {
    Ok(Json(ledger::wallet(&state.db, &user).await?))
}

#[utoipa::path(
    put,
    path = "/api/v1/buyer/settings",
    operation_id = "buyer_settings_set",
    tag = "buyer",
    request_body = SetSettings,
    responses(
        (status = 200, description = "The caller's settings", body = Settings),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn set_settings(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiJson(req): ApiJson<SetSettings>,
) -> Result<Json<Settings>, ApiError> {
    let settings = ledger::set_wallet_pays(&state.db, user.id, req.wallet_pays).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(settings))
}

#[utoipa::path(
    get,
    path = "/api/v1/buyer/escrows",
    operation_id = "buyer_escrows_list",
    tag = "buyer",
    responses(
        (status = 200, description = "The caller's escrows", body = EscrowList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_escrows(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
) -> Result<Json<EscrowList>, ApiError> {
    Ok(Json(EscrowList { escrows: ledger::list_escrows(&state.db, user.id).await? }))
}

#[utoipa::path(
    post,
    path = "/api/v1/buyer/escrows",
    operation_id = "buyer_escrows_create",
    tag = "buyer",
    request_body = CreateEscrow,
    responses(
        (status = 201, description = "The new escrow", body = EscrowView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 404, description = "No such seller key serving the model", body = ErrorBody),
        (status = 409, description = "Not enough credits in the wallet", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
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

#[utoipa::path(
    post,
    path = "/api/v1/buyer/escrows/{id}/release",
    operation_id = "buyer_escrows_release",
    tag = "buyer",
    params(("id" = i64, Path, description = "Escrow id")),
    responses(
        (status = 200, description = "The released escrow; its balance is back in the wallet", body = EscrowView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 404, description = "No such escrow of the caller's", body = ErrorBody),
        (status = 409, description = "The escrow is already closed", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn release_escrow(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<EscrowView>, ApiError> {
    let escrow = ledger::release_escrow(&state.db, user.id, id).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(escrow))
}

#[utoipa::path(
    get,
    path = "/api/v1/buyer/transactions",
    operation_id = "buyer_transactions",
    tag = "buyer",
    params(PageQuery),
    responses(
        (status = 200, description = "Postings on the caller's wallet, escrows and holds, newest first", body = TransactionPage),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn buyer_transactions(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<TransactionPage>, ApiError> {
    Ok(Json(ledger::transactions(&state.db, user.id, Ledgers::All, page.before, page.limit).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/seller/earnings",
    operation_id = "seller_earnings",
    tag = "seller",
    responses(
        (status = 200, description = "The caller's earnings, in total and per key", body = Earnings),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn earnings(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<Json<Earnings>, ApiError> {
    Ok(Json(ledger::earnings(&state.db, user.id).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/seller/transactions",
    operation_id = "seller_transactions",
    tag = "seller",
    params(PageQuery),
    responses(
        (status = 200, description = "Postings on the caller's wallet, newest first", body = TransactionPage),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn seller_transactions(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<TransactionPage>, ApiError> {
    Ok(Json(ledger::transactions(&state.db, user.id, Ledgers::Wallet, page.before, page.limit).await?))
}
