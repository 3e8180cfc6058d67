//! Session authentication: the extractors that turn `Authorization: Bearer <token>` into a user with the
//! route's role, and the login, logout and `me` endpoints.

use axum::extract::{FromRequestParts, State};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ErrorBody};
use super::views::UserView;
use super::AdminState;
use crate::accounts::{self, AccountError, Role};
use crate::crypto::Secret;
use crate::db::entities::users;

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(login)).routes(routes!(logout)).routes(routes!(me))
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn authenticate(parts: &Parts, state: &AdminState) -> Result<(users::Model, Secret), ApiError> {
    let token = bearer_token(&parts.headers).ok_or(AccountError::Unauthorized)?;
    let user = accounts::authenticate_session(&state.db, token).await?;
    Ok((user, Secret::new(token.to_string())))
}

/// Any logged-in user, with the token they presented (for logout).
pub struct Session {
    pub user: users::Model,
    pub token: Secret,
}

impl FromRequestParts<AdminState> for Session {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Self::Rejection> {
        let (user, token) = authenticate(parts, state).await?;
        Ok(Self { user, token })
    }
}

/// Extractors for a logged-in user with one role. They run before the body is read, so a caller without
/// the role gets 401/403 whatever the body.
macro_rules! role_extractor {
    ($name:ident, $role:expr) => {
        pub struct $name(pub users::Model);

        impl FromRequestParts<AdminState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Self::Rejection> {
                let (user, _) = authenticate(parts, state).await?;
                accounts::require_role(&user, $role)?;
                Ok(Self(user))
            }
        }
    };
}

role_extractor!(AdminUser, Role::Admin);
role_extractor!(SellerUser, Role::Seller);
role_extractor!(BuyerUser, Role::Buyer);

/// No `Debug`: it holds a password.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    password: String,
}

#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    /// The session token: send it as `Authorization: Bearer <token>`.
    token: String,
    expires_at_ms: i64,
    user: UserView,
}

/// Opens a session. A wrong username or password and a disabled user all answer 401 alike.
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    operation_id = "auth_login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "A new session", body = LoginResponse),
        (status = 400, description = "Malformed or invalid body", body = ErrorBody),
        (status = 401, description = "Invalid credentials", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AdminState>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let (token, user, expires_at_ms) =
        accounts::login(&state.db, &req.username, &req.password, state.session_ttl_ms).await?;
    Ok(Json(LoginResponse { token: token.expose().to_string(), expires_at_ms, user: UserView::from(&user) }))
}

/// Ends the session whose token is presented.
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    operation_id = "auth_logout",
    tag = "auth",
    responses(
        (status = 204, description = "The session is closed"),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn logout(State(state): State<AdminState>, session: Session) -> Result<StatusCode, ApiError> {
    accounts::logout(&state.db, session.token.expose()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The logged-in user.
#[utoipa::path(
    get,
    path = "/api/v1/me",
    operation_id = "auth_me",
    tag = "auth",
    responses(
        (status = 200, description = "The caller", body = UserView),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn me(session: Session) -> Json<UserView> {
    Json(UserView::from(&session.user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        for (value, expected) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ] {
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer_token(&headers), expected, "{value}");
        }
    }
}
