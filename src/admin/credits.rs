//! Admin endpoints for money: granting credits, refunding requests, setting prices and users' payment
//! settings, checking the ledger; and the price list every logged-in user may read.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{AdminUser, Session};
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::AdminState;
use crate::ledger::{self, CheckReport, FundsError, Granted, PriceView, Refunded, Settings};

const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(grant))
        .routes(routes!(set_user_settings))
        .routes(routes!(refund))
        // A wildcard: model names may contain slashes (`meta-llama/llama-3-70b`); the document names it
        // `{model}` (see `super::document_wildcards`).
        .routes(routes!(set_price, delete_price))
        .routes(routes!(check))
        .routes(routes!(list_prices))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    amount: i64,
    #[serde(default)]
    memo: Option<String>,
    /// Also accepted as the `Idempotency-Key` header; a fresh key when neither is given.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    #[serde(default)]
    memo: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPrice {
    prompt_per_million: i64,
    completion_per_million: i64,
    #[serde(default)]
    max_output_tokens: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetUserSettings {
    wallet_pays: bool,
}

/// The body's key, else the header's; both given must agree.
fn grant_key(headers: &HeaderMap, body: Option<String>) -> Result<Option<String>, FundsError> {
    let header = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| FundsError::Invalid { message: "Idempotency-Key: printable ASCII only".into() })?
                .to_string(),
        ),
        None => None,
    };
    match (body, header) {
        (Some(body), Some(header)) if body != header => Err(FundsError::Invalid {
            message: "idempotency_key and the Idempotency-Key header differ; send one of them".into(),
        }),
        (body, header) => Ok(body.or(header)),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/users/{id}/credits",
    operation_id = "admin_credits_grant",
    tag = "ledger",
    params(("id" = i64, Path, description = "User id"), ("Idempotency-Key" = Option<String>, Header, description = "Same as the body's `idempotency_key`; both given must agree")),
    request_body = GrantRequest,
    responses(
        (status = 200, description = "Granted (or the earlier grant with this idempotency key: `duplicate`)", body = Granted),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 409, description = "The idempotency key was used for a different grant", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn grant(
    State(state): State<AdminState>,
    AdminUser(admin): AdminUser,
    ApiPath(user_id): ApiPath<i64>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<GrantRequest>,
) -> Result<Json<Granted>, ApiError> {
    let key = grant_key(&headers, req.idempotency_key)?;
    let granted =
        ledger::grant_credits(&state.db, user_id, req.amount, req.memo, key.as_deref(), Some(admin.id)).await?;
    if !granted.duplicate {
        state.refresh.request_and_wait().await;
    }
    Ok(Json(granted))
}

/// The body is optional: a bare `POST` refunds without a memo.
#[utoipa::path(
    post,
    path = "/api/v1/admin/requests/{request_id}/refund",
    operation_id = "admin_requests_refund",
    tag = "ledger",
    params(("request_id" = String, Path, description = "The gateway request id")),
    request_body(content = Option<RefundRequest>, description = "Optional: a bare POST refunds without a memo", content_type = "application/json"),
    responses(
        (status = 200, description = "Refunded (or refunded before: `duplicate`)", body = Refunded),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No settled request with this id", body = ErrorBody),
        (status = 409, description = "The seller no longer holds what the request earned", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn refund(
    State(state): State<AdminState>,
    AdminUser(admin): AdminUser,
    ApiPath(request_id): ApiPath<String>,
    req: Option<ApiJson<RefundRequest>>,
) -> Result<Json<Refunded>, ApiError> {
    let req = req.map(|ApiJson(r)| r).unwrap_or_default();
    let refunded = ledger::refund(&state.db, &request_id, req.memo, Some(admin.id)).await?;
    if !refunded.duplicate {
        state.refresh.request_and_wait().await;
    }
    Ok(Json(refunded))
}

#[utoipa::path(
    put,
    path = "/api/v1/admin/prices/{*model}",
    operation_id = "admin_prices_set",
    tag = "ledger",
    params(("model" = String, Path, description = "Model name; percent-encode slashes (`meta-llama%2Fllama-3-70b`)")),
    request_body = SetPrice,
    responses(
        (status = 200, description = "The price in effect", body = PriceView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn set_price(
    State(state): State<AdminState>,
    AdminUser(admin): AdminUser,
    ApiPath(model): ApiPath<String>,
    ApiJson(req): ApiJson<SetPrice>,
) -> Result<Json<PriceView>, ApiError> {
    let price = ledger::set_price(
        &state.db,
        &model,
        req.prompt_per_million,
        req.completion_per_million,
        req.max_output_tokens,
        Some(admin.id),
    )
    .await?;
    state.refresh.request_and_wait().await;
    Ok(Json(price))
}

#[utoipa::path(
    delete,
    path = "/api/v1/admin/prices/{*model}",
    operation_id = "admin_prices_delete",
    tag = "ledger",
    params(("model" = String, Path, description = "Model name; percent-encode slashes (`meta-llama%2Fllama-3-70b`)")),
    responses(
        (status = 204, description = "Deleted: the model is no longer served"),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No price for this model", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_price(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiPath(model): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    ledger::delete_price(&state.db, &model).await?;
    state.refresh.request_and_wait().await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/api/v1/prices",
    operation_id = "prices_list",
    tag = "ledger",
    responses(
        (status = 200, description = "Every model's price", body = Vec<PriceView>),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_prices(State(state): State<AdminState>, _session: Session) -> Result<Json<Vec<PriceView>>, ApiError> {
    Ok(Json(ledger::list_prices(&state.db).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/admin/ledger/check",
    operation_id = "admin_ledger_check",
    tag = "ledger",
    responses(
        (status = 200, description = "The ledger's invariants, and any violations", body = CheckReport),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn check(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
) -> Result<Json<CheckReport>, ApiError> {
    Ok(Json(ledger::check(&state.db, state.ledger.hold_stale_ms).await?))
}

#[utoipa::path(
    put,
    path = "/api/v1/admin/users/{id}/settings",
    operation_id = "admin_user_settings_set",
    tag = "ledger",
    params(("id" = i64, Path, description = "User id")),
    request_body = SetUserSettings,
    responses(
        (status = 200, description = "The user's settings", body = Settings),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn set_user_settings(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiPath(user_id): ApiPath<i64>,
    ApiJson(req): ApiJson<SetUserSettings>,
) -> Result<Json<Settings>, ApiError> {
    let settings = ledger::set_wallet_pays(&state.db, user_id, req.wallet_pays).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grant_key_comes_from_the_body_or_the_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(grant_key(&headers, None).unwrap(), None);
        assert_eq!(grant_key(&headers, Some("b".into())).unwrap().as_deref(), Some("b"));
        headers.insert(IDEMPOTENCY_KEY_HEADER, "h".parse().unwrap());
        assert_eq!(grant_key(&headers, None).unwrap().as_deref(), Some("h"));
        assert_eq!(grant_key(&headers, Some("h".into())).unwrap().as_deref(), Some("h"));
        assert!(matches!(grant_key(&headers, Some("b".into())), Err(FundsError::Invalid { .. })));
    }
}
