//! Admin endpoints: users and an overview of every pooled key.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::AdminUser;
use super::error::{ApiError, ApiJson, ErrorBody};
use super::views::{SellerKeyView, UserView};
use super::AdminState;
use crate::accounts::{self, Role};

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(create_user, list_users)).routes(routes!(list_keys))
}

/// No `Debug`: it holds a password.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    username: String,
    password: String,
    roles: Vec<Role>,
}

#[derive(Serialize, ToSchema)]
pub struct UserList {
    users: Vec<UserView>,
}

#[derive(Serialize, ToSchema)]
pub struct AdminKeyList {
    keys: Vec<SellerKeyView>,
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/users",
    operation_id = "admin_users_create",
    tag = "admin",
    request_body = CreateUser,
    responses(
        (status = 201, description = "The new user", body = UserView),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "The username is taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_user(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiJson(req): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let user = accounts::create_user(&state.db, &req.username, &req.password, &req.roles).await?;
    Ok((StatusCode::CREATED, Json(UserView::from(&user))))
}

#[utoipa::path(
    get,
    path = "/api/v1/admin/users",
    operation_id = "admin_users_list",
    tag = "admin",
    responses(
        (status = 200, description = "Every user", body = UserList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_users(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
) -> Result<Json<UserList>, ApiError> {
    let users = accounts::list_users(&state.db).await?;
    Ok(Json(UserList { users: users.iter().map(UserView::from).collect() }))
}

#[utoipa::path(
    get,
    path = "/api/v1/admin/keys",
    operation_id = "admin_keys_list",
    tag = "admin",
    responses(
        (status = 200, description = "Every pooled key, seller and platform", body = AdminKeyList),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_keys(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
) -> Result<Json<AdminKeyList>, ApiError> {
    let keys = accounts::list_all_keys(&state.db).await?;
    Ok(Json(AdminKeyList { keys: keys.iter().map(SellerKeyView::from).collect() }))
}
