//! Admin endpoints: users and an overview of every pooled key.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::AdminUser;
use super::error::{ApiError, ApiJson};
use super::views::{SellerKeyView, UserView};
use super::AdminState;
use crate::accounts::{self, Role};

/// No `Debug`: it holds a password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    username: String,
    password: String,
    roles: Vec<Role>,
}

#[derive(Serialize)]
pub struct UserList {
    users: Vec<UserView>,
}

#[derive(Serialize)]
pub struct KeyList {
    keys: Vec<SellerKeyView>,
}

pub async fn create_user(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
    ApiJson(req): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let user = accounts::create_user(&state.db, &req.username, &req.password, &req.roles).await?;
    Ok((StatusCode::CREATED, Json(UserView::from(&user))))
}

pub async fn list_users(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
) -> Result<Json<UserList>, ApiError> {
    let users = accounts::list_users(&state.db).await?;
    Ok(Json(UserList { users: users.iter().map(UserView::from).collect() }))
}

pub async fn list_keys(
    State(state): State<AdminState>,
    AdminUser(_admin): AdminUser,
) -> Result<Json<KeyList>, ApiError> {
    let keys = accounts::list_all_keys(&state.db).await?;
    Ok(Json(KeyList { keys: keys.iter().map(SellerKeyView::from).collect() }))
}
