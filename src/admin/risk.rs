//! Admin review of flagged keys (admin role) and the seller's webhook (seller role).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{AdminUser, SellerUser};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::AdminState;
use crate::db::risk::Sample;
use crate::risk::review::{self, PendingReview, ReviewAction, ReviewedKey};
use crate::risk::webhooks::{self, WebhookView};

const DEFAULT_SAMPLES: u64 = 100;
const MAX_SAMPLES: u64 = 1_000;

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(list_reviews))
        .routes(routes!(key_samples))
        .routes(routes!(review_key))
        .routes(routes!(set_webhook, get_webhook, delete_webhook))
}

#[derive(Serialize, ToSchema)]
pub struct ReviewList {
    reviews: Vec<PendingReview>,
}

/// Flagged keys waiting for review, with their owner, the reason and their latest balance samples.
#[utoipa::path(
    get,
    path = "/api/v1/admin/reviews",
    operation_id = "admin_reviews_list",
    tag = "risk",
    responses(
        (status = 200, description = "Flagged keys waiting for review", body = ReviewList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_reviews(State(state): State<AdminState>, _admin: AdminUser) -> Result<Json<ReviewList>, ApiError> {
    Ok(Json(ReviewList { reviews: review::pending_reviews(&state.db).await? }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SamplesQuery {
    /// Samples to return: at most 1000, default 100.
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct SampleList {
    samples: Vec<Sample>,
}

/// A key's provider balance samples, newest first (`?limit=`, at most 1000).
#[utoipa::path(
    get,
    path = "/api/v1/admin/keys/{id}/samples",
    operation_id = "admin_key_samples",
    tag = "risk",
    params(("id" = i64, Path, description = "Seller key id"), SamplesQuery),
    responses(
        (status = 200, description = "The key's balance samples, newest first", body = SampleList),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn key_samples(
    State(state): State<AdminState>,
    _admin: AdminUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<SamplesQuery>,
) -> Result<Json<SampleList>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_SAMPLES).clamp(1, MAX_SAMPLES);
    Ok(Json(SampleList { samples: review::key_samples(&state.db, id, limit).await? }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewRequest {
    action: ReviewAction,
    #[serde(default)]
    note: Option<String>,
}

/// Confirms (the key stays flagged) or clears (the key is routed again) a flagged key.
#[utoipa::path(
    post,
    path = "/api/v1/admin/keys/{id}/review",
    operation_id = "admin_key_review",
    tag = "risk",
    params(("id" = i64, Path, description = "Seller key id")),
    request_body = ReviewRequest,
    responses(
        (status = 200, description = "The reviewed key", body = ReviewedKey),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 409, description = "The key is not flagged", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn review_key(
    State(state): State<AdminState>,
    AdminUser(admin): AdminUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<ReviewRequest>,
) -> Result<Json<ReviewedKey>, ApiError> {
    let key = review::review_key(&state.db, admin.id, id, req.action, req.note.as_deref()).await?;
    if req.action == ReviewAction::Clear {
        state.refresh.request_and_wait().await;
    }
    Ok(Json(ReviewedKey::from(&key)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    url: String,
}

/// The webhook as set, with its signing secret: shown only in this answer.
#[derive(Serialize, ToSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    webhook: WebhookView,
    secret: String,
}

/// Sets the caller's webhook (or replaces its URL, with a new secret).
#[utoipa::path(
    put,
    path = "/api/v1/seller/webhook",
    operation_id = "seller_webhook_set",
    tag = "risk",
    request_body = WebhookRequest,
    responses(
        (status = 200, description = "The webhook with its signing secret, shown only here", body = CreatedWebhook),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn set_webhook(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
    ApiJson(req): ApiJson<WebhookRequest>,
) -> Result<Json<CreatedWebhook>, ApiError> {
    let (webhook, secret) = webhooks::set_webhook(
        &state.db,
        &state.keyring,
        &state.upstream_policy,
        user.id,
        &req.url,
        state.risk.webhook_max_attempts,
    )
    .await?;
    Ok(Json(CreatedWebhook { webhook, secret: secret.expose().to_string() }))
}

#[utoipa::path(
    get,
    path = "/api/v1/seller/webhook",
    operation_id = "seller_webhook_get",
    tag = "risk",
    responses(
        (status = 200, description = "The caller's webhook, without its secret", body = WebhookView),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 404, description = "No webhook set", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_webhook(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(webhooks::get_webhook(&state.db, user.id, state.risk.webhook_max_attempts).await?))
}

#[utoipa::path(
    delete,
    path = "/api/v1/seller/webhook",
    operation_id = "seller_webhook_delete",
    tag = "risk",
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a seller", body = ErrorBody),
        (status = 404, description = "No webhook set", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_webhook(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<StatusCode, ApiError> {
    webhooks::delete_webhook(&state.db, user.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
