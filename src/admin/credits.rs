//! Admin endpoints for money: granting credits, refunding requests, setting prices and users' payment
//! settings, checking the ledger; and the price list every logged-in user may read.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;

use super::auth::{AdminUser, Session};
use super::error::{ApiError, ApiJson, ApiPath};
use super::AdminState;
use crate::ledger::{self, CheckReport, FundsError, Granted, PriceView, Refunded, Settings};

const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    amount: i64,
    #[serde(default)]
    memo: Option<String>,
    /// Also accepted as the `Idempotency-Key` header; a fresh key when neither is given.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    #[serde(default)]
    memo: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPrice {
    prompt_per_million: i64,
    completion_per_million: i64,
    #[serde(default)]
    max_output_tokens: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSettings {
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

pub async fn delete_price(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiPath(model): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    ledger::delete_price(&state.db, &model).await?;
    state.refresh.request_and_wait().await;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_prices(State(state): State<AdminState>, _session: Session) -> Result<Json<Vec<PriceView>>, ApiError> {
    Ok(Json(ledger::list_prices(&state.db).await?))
}

pub async fn check(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
) -> Result<Json<CheckReport>, ApiError> {
    Ok(Json(ledger::check(&state.db, state.ledger.hold_stale_ms).await?))
}

pub async fn set_user_settings(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiPath(user_id): ApiPath<i64>,
    ApiJson(req): ApiJson<SetSettings>,
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
