//! The admin REST API (axum): logins, buyer keys, seller keys, user management, and credits: grants,
//! refunds, prices, escrows, wallets and earnings (docs/ledger.md).
//!
//! Every error answers `{"error":{"code":"...","message":"..."}}` with its status, including malformed
//! requests. Authentication is a bearer session token from `/api/v1/auth/login`; each route needs one
//! role, and another user's object is reported as missing (404), never as forbidden, so that ids reveal
//! nothing. Changes that affect routing or buyer authentication reload the pool and answer only once the reload
//! is in place, so a revoked key is refused from the moment the revocation is confirmed.

mod auth;
mod buyer;
mod credits;
mod error;
mod fallback;
mod funds;
mod risk;
mod seller;
mod users;
mod views;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use sea_orm::DatabaseConnection;
use serde_json::{json, Value};

pub use error::ApiError;

use crate::crypto::Keyring;
use crate::pool::RefreshHandle;

/// Admin requests are small JSON documents; anything larger is a mistake or an attack.
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub db: DatabaseConnection,
    pub keyring: Arc<Keyring>,
    pub refresh: RefreshHandle,
    pub session_ttl_ms: i64,
    pub ledger: crate::config::LedgerConfig,
    /// Where seller base URLs may point.
    pub upstream_policy: Arc<crate::ssrf::UpstreamPolicy>,
    /// Provider API client (key verification, balance readings).
    pub provider: Arc<crate::provider::ProviderClient>,
    pub risk: crate::config::RiskConfig,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/auth/login", post(auth::login))
        .route("/api/v1/auth/logout", post(auth::logout))
        .route("/api/v1/me", get(auth::me))
        .route("/api/v1/buyer/keys", post(buyer::create).get(buyer::list))
        .route("/api/v1/buyer/keys/{id}", delete(buyer::revoke))
        .route("/api/v1/seller/keys", post(seller::create).get(seller::list))
        .route("/api/v1/seller/keys/{id}", get(seller::get))
        .route("/api/v1/seller/keys/{id}", axum::routing::patch(seller::update))
        .route("/api/v1/seller/keys/{id}/pause", post(seller::pause))
        .route("/api/v1/seller/keys/{id}/resume", post(seller::resume))
        .route("/api/v1/seller/keys/{id}/events", get(seller::events))
        .route("/api/v1/notifications", get(seller::notifications))
        .route("/api/v1/notifications/{id}/read", post(seller::read_notification))
        .route("/api/v1/admin/users", post(users::create_user).get(users::list_users))
        .route("/api/v1/admin/keys", get(users::list_keys))
        .route("/api/v1/admin/users/{id}/credits", post(credits::grant))
        .route("/api/v1/admin/users/{id}/settings", put(credits::set_user_settings))
        .route("/api/v1/admin/requests/{request_id}/refund", post(credits::refund))
        // A wildcard: model names may contain slashes (`meta-llama/llama-3-70b`).
        .route("/api/v1/admin/prices/{*model}", put(credits::set_price).delete(credits::delete_price))
        .route("/api/v1/admin/ledger/check", get(credits::check))
        .route("/api/v1/prices", get(credits::list_prices))
        .route("/api/v1/buyer/wallet", get(funds::wallet))
        .route("/api/v1/buyer/settings", put(funds::set_settings))
        .route("/api/v1/buyer/escrows", post(funds::create_escrow).get(funds::list_escrows))
        .route("/api/v1/buyer/escrows/{id}/release", post(funds::release_escrow))
        .route("/api/v1/buyer/transactions", get(funds::buyer_transactions))
        .route("/api/v1/seller/earnings", get(funds::earnings))
        .route("/api/v1/seller/transactions", get(funds::seller_transactions))
        .merge(risk::routes())
        .merge(fallback::routes())
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(no_store))
        .with_state(state)
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Responses carry session tokens and new keys; no cache or proxy may keep any of them.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
