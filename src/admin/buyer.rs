//! Buyer endpoints: platform keys for calling the gateway.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::BuyerUser;
use super::error::{ApiError, ApiJson, ApiPath};
use super::views::{BuyerKeyView, CreatedBuyerKey};
use super::AdminState;
use crate::accounts;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBuyerKey {
    name: String,
    /// Omitted or null: any model.
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    expires_at_ms: Option<i64>,
}

#[derive(Serialize)]
pub struct BuyerKeyList {
    keys: Vec<BuyerKeyView>,
}

pub async fn create(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiJson(req): ApiJson<CreateBuyerKey>,
) -> Result<(StatusCode, Json<CreatedBuyerKey>), ApiError> {
    let (key, plaintext) =
        accounts::issue_buyer_key(&state.db, user.id, &req.name, req.models, req.expires_at_ms).await?;
    state.refresh.request_and_wait().await;
    let body = CreatedBuyerKey { key: plaintext.expose().to_string(), meta: BuyerKeyView::new(&key, crate::now_ms()) };
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn list(State(state): State<AdminState>, BuyerUser(user): BuyerUser) -> Result<Json<BuyerKeyList>, ApiError> {
    let now = crate::now_ms();
    let keys = accounts::list_buyer_keys(&state.db, user.id).await?;
    Ok(Json(BuyerKeyList { keys: keys.iter().map(|k| BuyerKeyView::new(k, now)).collect() }))
}

pub async fn revoke(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<BuyerKeyView>, ApiError> {
    let key = accounts::revoke_buyer_key(&state.db, user.id, id).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(BuyerKeyView::new(&key, crate::now_ms())))
}
