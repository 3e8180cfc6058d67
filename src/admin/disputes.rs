//! Disputes (docs/reports.md, "Disputes"): a buyer disputes one of their requests or escrows; an admin
//! lists disputes and resolves them by refunding through the ledger or by rejecting them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{AdminUser, BuyerUser};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::AdminState;
use crate::disputes::{self, DisputePage, DisputeStatus, DisputeView, OpenDispute, Outcome};

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(buyer_disputes_create, buyer_disputes_list))
        .routes(routes!(admin_disputes_list))
        .routes(routes!(admin_disputes_resolve))
}

/// Exactly one of `request_id` and `escrow_id`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDispute {
    /// A request of the caller's (the `x-tokex-request-id` of its response).
    #[serde(default)]
    request_id: Option<String>,
    /// An escrow of the caller's.
    #[serde(default)]
    escrow_id: Option<i64>,
    /// 1 to 1000 characters after trimming.
    reason: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveDispute {
    outcome: Outcome,
    /// Up to 1000 characters, shown to the buyer.
    #[serde(default)]
    note: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BuyerListQuery {
    /// A `next_before` from the previous page.
    #[serde(default)]
    before: Option<i64>,
    /// 1 to 500, default 100.
    #[serde(default)]
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AdminListQuery {
    /// Only disputes in this status; all when omitted.
    #[serde(default)]
    status: Option<DisputeStatus>,
    /// A `next_before` from the previous page.
    #[serde(default)]
    before: Option<i64>,
    /// 1 to 500, default 100.
    #[serde(default)]
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// Disputes one of the caller's requests (settled, with a cost) or escrows (that paid for requests).
#[utoipa::path(
    post,
    path = "/api/v1/buyer/disputes",
    operation_id = "buyer_disputes_create",
    tag = "disputes",
    request_body = CreateDispute,
    responses(
        (status = 201, description = "The dispute, open", body = DisputeView),
        (status = 400, description = "Invalid body: not exactly one target, or a bad reason", body = crate::admin::ErrorBody),
        (status = 401, description = "Not logged in", body = crate::admin::ErrorBody),
        (status = 403, description = "Not a buyer", body = crate::admin::ErrorBody),
        (status = 404, description = "No such request or escrow of the caller's", body = crate::admin::ErrorBody),
        (status = 409, description = "`not_disputable` (nothing paid, or refunded already) or `dispute_open`", body = crate::admin::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn buyer_disputes_create(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiJson(req): ApiJson<CreateDispute>,
) -> Result<(StatusCode, Json<DisputeView>), ApiError> {
    let req = OpenDispute { request_id: req.request_id, escrow_id: req.escrow_id, reason: req.reason };
    let dispute = disputes::open(&state.db, user.id, req).await?;
    Ok((StatusCode::CREATED, Json(dispute)))
}

/// The caller's disputes, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/buyer/disputes",
    operation_id = "buyer_disputes_list",
    tag = "disputes",
    params(BuyerListQuery),
    responses(
        (status = 200, description = "One page of the caller's disputes", body = DisputePage),
        (status = 400, description = "Invalid query", body = crate::admin::ErrorBody),
        (status = 401, description = "Not logged in", body = crate::admin::ErrorBody),
        (status = 403, description = "Not a buyer", body = crate::admin::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn buyer_disputes_list(
    State(state): State<AdminState>,
    BuyerUser(user): BuyerUser,
    ApiQuery(query): ApiQuery<BuyerListQuery>,
) -> Result<Json<DisputePage>, ApiError> {
    Ok(Json(disputes::list_for_buyer(&state.db, user.id, query.before, query.limit).await?))
}

/// Every buyer's disputes, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/admin/disputes",
    operation_id = "admin_disputes_list",
    tag = "disputes",
    params(AdminListQuery),
    responses(
        (status = 200, description = "One page of disputes", body = DisputePage),
        (status = 400, description = "Invalid query", body = crate::admin::ErrorBody),
        (status = 401, description = "Not logged in", body = crate::admin::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::admin::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn admin_disputes_list(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiQuery(query): ApiQuery<AdminListQuery>,
) -> Result<Json<DisputePage>, ApiError> {
    Ok(Json(disputes::list(&state.db, query.status, query.before, query.limit).await?))
}

/// Resolves an open dispute. `refund` reverses the request's settlement, or that of every request the
/// escrow paid for that is not refunded yet (at most 10,000); the credits go to the buyer's wallet. The
/// status change and the refunds commit together: a seller who spent the credits already fails it (409
/// `insufficient_funds`) and the dispute stays open.
#[utoipa::path(
    post,
    path = "/api/v1/admin/disputes/{id}/resolve",
    operation_id = "admin_disputes_resolve",
    tag = "disputes",
    params(("id" = i64, Path, description = "The dispute's id")),
    request_body = ResolveDispute,
    responses(
        (status = 200, description = "The dispute, resolved", body = DisputeView),
        (status = 400, description = "Invalid body", body = crate::admin::ErrorBody),
        (status = 401, description = "Not logged in", body = crate::admin::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::admin::ErrorBody),
        (status = 404, description = "No such dispute", body = crate::admin::ErrorBody),
        (status = 409, description = "`dispute_resolved` (resolved already) or `insufficient_funds` (a seller spent the credits)", body = crate::admin::ErrorBody),
        (status = 422, description = "`dispute_too_large`: the escrow paid for more than 10,000 requests not refunded yet", body = crate::admin::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn admin_disputes_resolve(
    State(state): State<AdminState>,
    AdminUser(admin): AdminUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<ResolveDispute>,
) -> Result<Json<DisputeView>, ApiError> {
    let dispute = disputes::resolve(&state.db, id, req.outcome, req.note, admin.id).await?;
    if dispute.refunded_credits > 0 {
        // The gateways' snapshot of wallets.
        state.refresh.request_and_wait().await;
    }
    Ok(Json(dispute))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// The four operations are in the document under the contract's ids, with bearer security and the
    /// error schema on their error answers.
    #[test]
    fn the_operations_are_documented() {
        let doc = serde_json::to_value(super::super::openapi()).unwrap();
        let cases = [
            ("/api/v1/buyer/disputes", "post", "buyer_disputes_create", "201", "409"),
            ("/api/v1/buyer/disputes", "get", "buyer_disputes_list", "200", "403"),
            ("/api/v1/admin/disputes", "get", "admin_disputes_list", "200", "403"),
            ("/api/v1/admin/disputes/{id}/resolve", "post", "admin_disputes_resolve", "200", "422"),
        ];
        for (path, method, id, ok, error) in cases {
            let op = &doc["paths"][path][method];
            assert_eq!(op["operationId"], id, "{path} {method}: {op}");
            assert_eq!(op["security"], serde_json::json!([{ "bearer": [] }]), "{id}");
            let ok = &op["responses"][ok]["content"]["application/json"]["schema"]["$ref"];
            assert!(ok.as_str().is_some_and(|r| r.starts_with("#/components/schemas/Dispute")), "{id}: {ok}");
            let error = &op["responses"][error]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(error, "#/components/schemas/ErrorBody", "{id}");
        }
        let schemas = &doc["components"]["schemas"];
        for name in ["DisputeView", "DisputePage", "CreateDispute", "ResolveDispute", "Outcome", "DisputeStatus"] {
            assert!(schemas.get(name).is_some_and(Value::is_object), "{name} is not in the document");
        }
        let params =
            doc["paths"]["/api/v1/admin/disputes"]["get"]["parameters"].as_array().cloned().unwrap_or_default();
        let names: Vec<&str> = params.iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["status", "before", "limit"]);
    }
}
