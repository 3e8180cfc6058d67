//! The platform fallback pool: platform-owned provider keys per model, tried in ascending priority when no
//! seller key can serve a request (docs/routing.md). Admin only. They are verified like seller keys, earn
//! the platform the whole price, follow the same health tracking, and are never deleted (usage records
//! refer to them): an admin pauses one to retire it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::AdminUser;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::views::SellerKeyView;
use super::AdminState;
use crate::accounts::{self, status, AccountError, NewSellerKey};
use crate::db::hosted_keys;

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(list, create)).routes(routes!(update, get_one))
}

/// No `Debug`: it holds the provider API key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFallbackKey {
    #[serde(default)]
    name: Option<String>,
    provider: String,
    base_url: String,
    models: Vec<String>,
    api_key: String,
    /// Lower is tried first.
    #[serde(default)]
    priority: i64,
    /// What the platform put on the key, in credits (0: unknown).
    #[serde(default)]
    declared_balance: i64,
    #[serde(default)]
    balance_api: Option<String>,
    #[serde(default)]
    max_concurrency: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateFallbackKey {
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    name: Option<String>,
    /// `active` or `paused`.
    #[serde(default)]
    status: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct FallbackKeyView {
    #[serde(flatten)]
    key: SellerKeyView,
    priority: i64,
}

impl From<&hosted_keys::Model> for FallbackKeyView {
    fn from(k: &hosted_keys::Model) -> Self {
        Self { key: SellerKeyView::from(k), priority: k.priority }
    }
}

#[derive(Serialize, ToSchema)]
pub struct FallbackKeyList {
    /// In the order they are tried.
    keys: Vec<FallbackKeyView>,
}

const MAX_PRIORITY: i64 = 1_000_000;

fn invalid(field: &str, message: impl Into<String>) -> AccountError {
    AccountError::Invalid { field: field.to_string(), message: message.into() }
}

fn check_priority(priority: i64) -> Result<(), AccountError> {
    if !(0..=MAX_PRIORITY).contains(&priority) {
        return Err(invalid("priority", format!("0 to {MAX_PRIORITY}; lower is tried first")));
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/fallback-keys",
    operation_id = "admin_fallback_keys_create",
    tag = "fallback",
    request_body = CreateFallbackKey,
    responses(
        (status = 201, description = "The new fallback key", body = FallbackKeyView),
        (status = 400, description = "Malformed or invalid request; with verification on, the field the provider refused", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
        (status = 503, description = "The provider could not answer; retry later", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AdminState>,
    AdminUser(admin): AdminUser,
    ApiJson(req): ApiJson<CreateFallbackKey>,
) -> Result<(StatusCode, Json<FallbackKeyView>), ApiError> {
    check_priority(req.priority)?;
    let new = NewSellerKey {
        name: req.name.unwrap_or_default(),
        provider: req.provider,
        base_url: req.base_url,
        models: req.models,
        api_key: req.api_key,
        declared_balance: req.declared_balance,
        max_concurrency: req.max_concurrency,
        max_spend_per_day: 0,
        balance_api: req.balance_api.unwrap_or_default(),
    };
    let key = accounts::add_platform_key(
        &state.db,
        &state.keyring,
        &state.upstream_policy,
        &state.provider,
        state.risk.verify_on_deposit,
        admin.id,
        new,
        req.priority,
    )
    .await?;
    state.refresh.request_and_wait().await;
    Ok((StatusCode::CREATED, Json(FallbackKeyView::from(&key))))
}

#[utoipa::path(
    get,
    path = "/api/v1/admin/fallback-keys",
    operation_id = "admin_fallback_keys_list",
    tag = "fallback",
    responses(
        (status = 200, description = "The fallback keys, in the order they are tried", body = FallbackKeyList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
) -> Result<Json<FallbackKeyList>, ApiError> {
    let keys = hosted_keys::list_platform(&state.db).await.map_err(AccountError::from)?;
    Ok(Json(FallbackKeyList { keys: keys.iter().map(FallbackKeyView::from).collect() }))
}

async fn find_platform(state: &AdminState, id: i64) -> Result<hosted_keys::Model, ApiError> {
    match hosted_keys::find(&state.db, id).await.map_err(AccountError::from)? {
        Some(key) if key.pool == "platform" => Ok(key),
        _ => Err(AccountError::NotFound { what: "fallback key" }.into()),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/admin/fallback-keys/{id}",
    operation_id = "admin_fallback_keys_get",
    tag = "fallback",
    params(("id" = i64, Path, description = "Fallback key id")),
    responses(
        (status = 200, description = "The fallback key", body = FallbackKeyView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such fallback key", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_one(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<FallbackKeyView>, ApiError> {
    Ok(Json(FallbackKeyView::from(&find_platform(&state, id).await?)))
}

/// Changes priority and name, and pauses or resumes the key. A key that risk control flagged or found depleted
/// cannot be resumed here (409); its review goes through the flagged-key review.
#[utoipa::path(
    patch,
    path = "/api/v1/admin/fallback-keys/{id}",
    operation_id = "admin_fallback_keys_update",
    tag = "fallback",
    params(("id" = i64, Path, description = "Fallback key id")),
    request_body = UpdateFallbackKey,
    responses(
        (status = 200, description = "The updated fallback key", body = FallbackKeyView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such fallback key", body = ErrorBody),
        (status = 409, description = "The key cannot change to that status (flagged or depleted, or changed meanwhile)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AdminState>,
    AdminUser(admin): AdminUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpdateFallbackKey>,
) -> Result<Json<FallbackKeyView>, ApiError> {
    let key = find_platform(&state, id).await?;
    if let Some(priority) = req.priority {
        check_priority(priority)?;
    }
    let name = match req.name.as_deref() {
        Some(name) if name.trim().is_empty() || name.chars().count() > 100 => {
            return Err(invalid("name", "1 to 100 characters").into());
        }
        other => other.map(str::trim),
    };
    let target = match req.status.as_deref() {
        None => None,
        Some(s @ (status::ACTIVE | status::PAUSED)) => Some(s),
        Some(_) => return Err(invalid("status", "active or paused").into()),
    };
    let now = crate::now_ms();
    let db = &state.db;
    if req.priority.is_some() || name.is_some() {
        hosted_keys::update_platform(db, id, req.priority, name, now).await.map_err(AccountError::from)?;
    }
    if let Some(to) = target.filter(|to| *to != key.status) {
        let from = if to == status::ACTIVE { status::PAUSED } else { status::ACTIVE };
        if key.status != from {
            return Err(AccountError::Conflict {
                message: format!("the key is {}; only a key that is {from} can become {to}", key.status),
            }
            .into());
        }
        let cause = if to == status::PAUSED { "admin" } else { "" };
        let change = crate::db::risk::Transition {
            key_id: id,
            owner_id: key.owner_id,
            from,
            to,
            cause,
            review: crate::db::risk::review::NONE,
            next_check_at_ms: None,
            only_causes: &[],
            reason: if to == status::PAUSED { "paused by an admin" } else { "resumed by an admin" },
            actor_id: Some(admin.id),
            now_ms: now,
        };
        let txn = sea_orm::TransactionTrait::begin(db).await.map_err(AccountError::from)?;
        let changed = crate::db::risk::transition(&txn, &change).await.map_err(AccountError::from)?;
        txn.commit().await.map_err(AccountError::from)?;
        if !changed {
            return Err(AccountError::Conflict { message: "the key changed status meanwhile; try again".into() }.into());
        }
    }
    state.refresh.request_and_wait().await;
    Ok(Json(FallbackKeyView::from(&find_platform(&state, id).await?)))
}
