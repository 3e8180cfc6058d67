//! Seller endpoints: depositing provider keys into the pool (verified against the provider), capping,
//! pausing and resuming them, their status history, and the caller's notifications.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::SellerUser;
use super::error::{ApiError, ApiJson, ApiPath};
use super::views::SellerKeyView;
use super::AdminState;
use crate::accounts::{self, NewSellerKey, SellerKeyChanges};

/// No `Debug`: it holds the seller's API key.
#[derive(Deserialize)]
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
#[derive(Deserialize)]
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

#[derive(Serialize)]
pub struct SellerKeyList {
    keys: Vec<SellerKeyView>,
}

/// Deposits a key. With `risk.verify_on_deposit` (the default) the key is verified against its provider
/// first: 400 names the field to fix, 503 means the provider could not answer now.
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

pub async fn list(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<Json<SellerKeyList>, ApiError> {
    let keys = accounts::list_seller_keys(&state.db, user.id).await?;
    let now = crate::now_ms();
    Ok(Json(SellerKeyList { keys: keys.iter().map(|k| SellerKeyView::new(k, now)).collect() }))
}

pub async fn get(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<SellerKeyView>, ApiError> {
    let key = accounts::get_seller_key(&state.db, user.id, id).await?;
    Ok(Json(SellerKeyView::new(&key, crate::now_ms())))
}

pub async fn pause(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<SellerKeyView>, ApiError> {
    set_paused(state, user.id, id, true).await
}

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

#[derive(Serialize)]
pub struct KeyEventList {
    pub events: Vec<crate::db::key_events::KeyEvent>,
}

/// The key's status history: every change with its reason and who made it (null: the platform).
pub async fn events(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<KeyEventList>, ApiError> {
    Ok(Json(KeyEventList { events: accounts::seller_key_events(&state.db, user.id, id).await? }))
}

#[derive(Serialize)]
pub struct NotificationList {
    pub notifications: Vec<crate::db::key_events::Notification>,
}

/// The caller's notifications, newest first (the last 200).
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
