//! Admin review of flagged keys (admin role) and the seller's webhook (seller role).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::{AdminUser, SellerUser};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::AdminState;
use crate::db::risk::Sample;
use crate::risk::review::{self, PendingReview, ReviewAction, ReviewedKey};
use crate::risk::webhooks::{self, WebhookView};

const DEFAULT_SAMPLES: u64 = 100;
const MAX_SAMPLES: u64 = 1_000;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/v1/admin/reviews", get(list_reviews))
        .route("/api/v1/admin/keys/{id}/samples", get(key_samples))
        .route("/api/v1/admin/keys/{id}/review", post(review_key))
        .route("/api/v1/seller/webhook", put(set_webhook).get(get_webhook).delete(delete_webhook))
}

#[derive(Serialize)]
pub struct ReviewList {
    reviews: Vec<PendingReview>,
}

/// Flagged keys waiting for review, with their owner, the reason and their latest balance samples.
pub async fn list_reviews(State(state): State<AdminState>, _admin: AdminUser) -> Result<Json<ReviewList>, ApiError> {
    Ok(Json(ReviewList { reviews: review::pending_reviews(&state.db).await? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplesQuery {
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Serialize)]
pub struct SampleList {
    samples: Vec<Sample>,
}

/// A key's provider balance samples, newest first (`?limit=`, at most 1000).
pub async fn key_samples(
    State(state): State<AdminState>,
    _admin: AdminUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<SamplesQuery>,
) -> Result<Json<SampleList>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_SAMPLES).clamp(1, MAX_SAMPLES);
    Ok(Json(SampleList { samples: review::key_samples(&state.db, id, limit).await? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewRequest {
    action: ReviewAction,
    #[serde(default)]
    note: Option<String>,
}

/// Confirms (the key stays flagged) or clears (the key is routed again) a flagged key.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    url: String,
}

/// The webhook as set, with its signing secret: shown only in this answer.
#[derive(Serialize)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    webhook: WebhookView,
    secret: String,
}

/// Sets the caller's webhook (or replaces its URL, with a new secret).
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

pub async fn get_webhook(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(webhooks::get_webhook(&state.db, user.id, state.risk.webhook_max_attempts).await?))
}

pub async fn delete_webhook(
    State(state): State<AdminState>,
    SellerUser(user): SellerUser,
) -> Result<StatusCode, ApiError> {
    webhooks::delete_webhook(&state.db, user.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
