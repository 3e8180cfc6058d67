//! Buyer endpoints: platform keys for calling the gateway.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::BuyerUser;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::views::{BuyerKeyView, CreatedBuyerKey};
use super::AdminState;
use crate::accounts;

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(create, list)).routes(routes!(revoke))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBuyerKey {
    name: String,
    /// Omitted or null: any model.
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    expires_at_ms: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct BuyerKeyList {
    keys: Vec<BuyerKeyView>,
}

/// Issues a platform key for calling the gateway; the key itself is in this answer only.
#[utoipa::path(
    post,
    path = "/api/v1/buyer/keys",
    operation_id = "buyer_keys_create",
    tag = "buyer",
    request_body = CreateBuyerKey,
    responses(
        (status = 201, description = "The new key, shown once", body = CreatedBuyerKey),
        (status = 400, description = "Malformed or invalid body", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
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

/// The caller's keys, without the keys themselves.
#[utoipa::path(
    get,
    path = "/api/v1/buyer/keys",
    operation_id = "buyer_keys_list",
    tag = "buyer",
    responses(
        (status = 200, description = "The caller's keys", body = BuyerKeyList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AdminState>, BuyerUser(user): BuyerUser) -> Result<Json<BuyerKeyList>, ApiError> {
    let now = crate::now_ms();
    let keys = accounts::list_buyer_keys(&state.db, user.id).await?;
    Ok(Json(BuyerKeyList { keys: keys.iter().map(|k| BuyerKeyView::new(k, now)).collect() }))
}

/// Revokes one of the caller's keys; the gateway refuses it from the moment this answers.
#[utoipa::path(
    delete,
    path = "/api/v1/buyer/keys/{id}",
    operation_id = "buyer_keys_revoke",
    tag = "buyer",
    params(("id" = i64, Path, description = "Buyer key id")),
    responses(
        (status = 200, description = "The revoked key", body = BuyerKeyView),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not a buyer", body = ErrorBody),
        (status = 404, description = "No such key of the caller's", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<BuyerKeyView>, ApiError> {
    let key = accounts::revoke_buyer_key(&state.db, user.id, id).await?;
    state.refresh.request_and_wait().await;
    Ok(Json(BuyerKeyView::new(&key, crate::now_ms())))
}
