//! The admin REST API (axum): logins, buyer keys, seller keys, user management, and credits: grants,
//! refunds, prices, escrows, wallets and earnings (docs/ledger.md).
//!
//! Every error answers `{"error":{"code":"...","message":"..."}}` with its status, including malformed
//! requests. Authentication is a bearer session token from `/api/v1/auth/login`; each route needs one
//! role, and another user's object is reported as missing (404), never as forbidden, so that ids reveal
//! nothing. Changes that affect routing or buyer authentication reload the pool and answer only once the reload
//! is in place, so a revoked key is refused from the moment the revocation is confirmed.
//!
//! The API describes itself: every handler carries `#[utoipa::path]` and is registered with
//! `utoipa_axum::routes!`, and the resulting OpenAPI 3.1 document is served at [`OPENAPI_PATH`]
//! (docs/openapi.md).

mod analytics;
mod auth;
mod buyer;
mod console;
mod credits;
mod disputes;
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
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sea_orm::DatabaseConnection;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody, ErrorDetail};

use crate::crypto::Keyring;
use crate::pool::RefreshHandle;

/// Admin requests are small JSON documents; anything larger is a mistake or an attack.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Where the OpenAPI document of this API is served (not itself part of the document).
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

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

/// The document's root: what the handlers' `#[utoipa::path]` annotations do not say.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "token-exchange admin API", description = "Logins, keys, credits, analytics and disputes."),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// `bearer`: the session token from `auth_login`, sent as `Authorization: Bearer <token>`.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// Every documented route. Each module registers its handlers with `routes!`, which takes the path and
/// method from the handler's `#[utoipa::path]`: the router and the document come from the same
/// registrations, so they cannot disagree.
fn api_router() -> OpenApiRouter<AdminState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .merge(auth::routes())
        .merge(buyer::routes())
        .merge(seller::routes())
        .merge(users::routes())
        .merge(credits::routes())
        .merge(funds::routes())
        .merge(risk::routes())
        .merge(fallback::routes())
        .merge(analytics::routes())
        .merge(disputes::routes())
}

/// The OpenAPI document of the admin API, as served at [`OPENAPI_PATH`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, doc) = api_router().split_for_parts();
    document_wildcards(doc)
}

/// Axum's catch-all segments (`{*model}`) are not OpenAPI: the document names them as plain parameters
/// (`{model}`). Clients percent-encode a slash in the value (`meta-llama%2Fllama-3`); the catch-all also
/// accepts it raw.
fn document_wildcards(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let paths = std::mem::take(&mut doc.paths.paths);
    doc.paths.paths = paths.into_iter().map(|(path, item)| (path.replace("{*", "{"), item)).collect();
    doc
}

pub fn router(state: AdminState) -> Router {
    let (api, doc) = api_router().split_for_parts();
    let doc = Arc::new(document_wildcards(doc));
    api.route(OPENAPI_PATH, get(move || serve_openapi(Arc::clone(&doc))))
        .merge(console::routes())
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(no_store))
        .with_state(state)
}

async fn serve_openapi(doc: Arc<utoipa::openapi::OpenApi>) -> Response {
    Json(doc.as_ref()).into_response()
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    /// Always `ok`: the admin API answers.
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

/// Liveness of the admin API; no session needed.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    responses((status = 200, description = "The admin API answers", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Responses carry session tokens and new keys; no cache or proxy may keep any of them.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
