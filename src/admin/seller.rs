//! Seller endpoints: depositing provider keys into the pool (verified against the provider), capping,
//! pausing and resuming them, their status history, and the caller's notifications.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::SellerUser;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::views::SellerKeyView;
use super::AdminState;
use crate::accounts::{self, NewSellerKey, SellerKeyChanges};

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get, update))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(events))
        .routes(routes!(notifications))
        .routes(routes!(read_notification))
}

/// No `Debug`: it holds the seller's API key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSellerKey {
    #[serde(default)]
    name: Option<String>,
    provider: String,
    base_url: String,
    models: Vec<String>,
    api_key: String,
    declared_balance: i64,
    /// Requests at once per gateway node; 0 or absent = no cap.
    #[serde(default)]
    max_concurrency: i64,
    /// Credits per UTC day; 0 or absent = no cap.
    #[serde(default)]
    max_spend_per_day: i64,
    /// Provider balance adapter; absent or empty = derived from the provider.
    #[serde(default)]
    balance_api: Option<String>,
}

/// `PATCH /api/v1/seller/keys/{id}`: absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSellerKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    max_concurrency: Option<i64>,
    #[serde(default)]
    max_spend_per_day: Option<i64>,
    #[serde(default)]
    balance_api: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SellerKeyList {
    keys: Vec<SellerKeyView>,
}

/// Deposits a key. With `risk.verify_on_deposit` (the default) the key is verified against its provider
/// first: 400 names the field to fix, 503 means the provider could not answer now.
#[utoipa::path(
    post,
    path = "/api/v1/seller/keys",
    operation_id = "seller_keys_create",
    tag = "seller",
    request_body = CreateSellerKey,
    responses(
        (status = 201, description = "The deposited key", body = SellerKeyView),
        (status = 400, description = "Malformed or invalid request; with verification on, the field the provider refused", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
        (status = 503, description = "The provider could not answer; retry later", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiJson(req): ApiJson<CreateSellerKey>,
) -> Result<(StatusCode, Json<SellerKeyView>), ApiError> {
    let new = NewSellerKey {
        name: req.name.unwrap_or_default(),
        provider: req.provider,
        base_url: req.base_url,
        models: req.models,
        api_key: req.api_key,
        declared_balance: req.declared_balance,
        max_concurrency: req.max_concurrency,
        max_spend_per_day: req.max_spend_per_day,
        balance_api: req.balance_api.unwrap_or_default(),
    };
    let key = accounts::add_seller_key(
        &state.db,
        &state.keyring,
        &state.upstream_policy,
        &state.provider,
        state.risk.verify_on_deposit,
        user.id,
        new,
    )
    .await?;
    state.refresh.request_and_wait().await;
    Ok((StatusCode::CREATED, Json(SellerKeyView::new(&key, crate::now_ms()))))
}

/// Changes the key's name, caps or balance adapter; the gateway applies new caps once this answers.
#[utoipa::path(
    patch,
    path = "/api/v1/seller/keys/{id}",
    operation_id = "seller_keys_update",
    tag = "seller",
    params(("id" = i64, Path, description = "Seller key id")),
    request_body = UpdateSellerKey,
    responses(
        (status = 200, description = "The updated key", body = SellerKeyView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 404, description = "No such key of the caller's", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpdateSellerKey>,
) -> Result<Json<SellerKeyView>, ApiError> {
    let changes = SellerKeyChanges {
        name: req.name,
        max_concurrency: req.max_concurrency,
        max_spend_per_day: req.max_spend_per_day,
        balance_api: req.balance_api,
    };
    let key = accounts::update_seller_key(&state.db, user.id, id, changes).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(SellerKeyView::new(&key, crate::now_ms())))
}

#[utoipa::path(
    get,
    path = "/api/v1/seller/keys",
    operation_id = "seller_keys_list",
    tag = "seller",
    responses(
        (status = 200, description = "The caller's keys", body = SellerKeyList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<Json<SellerKeyList>, ApiError> {
    let keys = accounts::list_seller_keys(&state.db, user.id).await?;
    let now = crate::now_ms();
    Ok(Json(SellerKeyList { keys: keys.iter().map(|k| SellerKeyView::new(k, now)).collect() }))
}

#[utoipa::path(
    get,
    path = "/api/v1/seller/keys/{id}",
    operation_id = "seller_keys_get",
    tag = "seller",
    params(("id" = i64, Path, description = "Seller key id")),
    responses(
        (status = 200, description = "The key", body = SellerKeyView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 404, description = "No such key of the caller's", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<SellerKeyView>, ApiError> {
    let key = accounts::get_seller_key(&state.db, user.id, id).await?;
    Ok(Json(SellerKeyView::new(&key, crate::now_ms())))
}

#[utoipa::path(
    post,
    path = "/api/v1/seller/keys/{id}/pause",
    operation_id = "seller_keys_pause",
    tag = "seller",
    params(("id" = i64, Path, description = "Seller key id")),
    responses(
        (status = 200, description = "The paused key", body = SellerKeyView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 404, description = "No such key of the caller's", body = ErrorBody),
        (status = 409, description = "The key is in a status that cannot be paused", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn pause(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<SellerKeyView>, ApiError> {
    set_paused(state, user.id, id, true).await
}

#[utoipa::path(
    post,
    path = "/api/v1/seller/keys/{id}/resume",
    operation_id = "seller_keys_resume",
    tag = "seller",
    params(("id" = i64, Path, description = "Seller key id")),
    responses(
        (status = 200, description = "The resumed key", body = SellerKeyView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 404, description = "No such key of the caller's", body = ErrorBody),
        (status = 409, description = "The key is in a status that cannot be resumed (e.g. flagged)", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<SellerKeyView>, ApiError> {
    set_paused(state, user.id, id, false).await
}

async fn set_paused(state: AdminState, owner_id: i64, id: i64, paused: bool) -> Result<Json<SellerKeyView>, ApiError> {
    let key = accounts::set_seller_key_paused(&state.db, owner_id, id, paused).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(SellerKeyView::new(&key, crate::now_ms())))
}

#[derive(Serialize, ToSchema)]
pub struct KeyEventList {
    pub events: Vec<crate::db::key_events::KeyEvent>,
}

/// The key's status history: every change with its reason and who made it (null: the platform).
#[utoipa::path(
    get,
    path = "/api/v1/seller/keys/{id}/events",
    operation_id = "seller_keys_events",
    tag = "seller",
    params(("id" = i64, Path, description = "Seller key id")),
    responses(
        (status = 200, description = "The key's status history, oldest first", body = KeyEventList),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 404, description = "No such key of the caller's", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<KeyEventList>, ApiError> {
    Ok(Json(KeyEventList { events: accounts::seller_key_events(&state.db, user.id, id).await? }))
}

#[derive(Serialize, ToSchema)]
pub struct NotificationList {
    pub notifications: Vec<crate::db::key_events::Notification>,
}

/// The caller's notifications, newest first (the last 200).
#[utoipa::path(
    get,
    path = "/api/v1/notifications",
    operation_id = "notifications_list",
    tag = "notifications",
    responses(
        (status = 200, description = "The caller's notifications, newest first", body = NotificationList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn notifications(
    State(state): State<AdminState>,
    session: super::auth::Session,
) -> Result<Json<NotificationList>, ApiError> {
    let list = crate::db::key_events::notifications_of(&state.db, session.user.id, 200)
        .await
        .map_err(accounts::AccountError::from)?;
    Ok(Json(NotificationList { notifications: list }))
}

/// Marks one of the caller's notifications read (again: no change); another user's is not found.
#[utoipa::path(
    post,
    path = "/api/v1/notifications/{id}/read",
    operation_id = "notifications_read",
    tag = "notifications",
    params(("id" = i64, Path, description = "Notification id")),
    responses(
        (status = 204, description = "Marked read"),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 404, description = "No such notification of the caller's", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn read_notification(
    State(state): State<AdminState>,
    session: super::auth::Session,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let found = crate::db::key_events::mark_read(&state.db, session.user.id, id, crate::now_ms())
        .await
        .map_err(accounts::AccountError::from)?;
    if found {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(accounts::AccountError::NotFound { what: "notification" }.into())
    }
}
