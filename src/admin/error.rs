//! The admin API's one error shape, `{"error":{"code":"...","message":"..."}}`, for every failure:
//! domain errors, and axum's own rejections of malformed requests.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Request};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::accounts::AccountError;
use crate::disputes::DisputeError;
use crate::ledger::FundsError;

/// The schema of every error answer, `{"error":{"code":"...","message":"..."}}`, for the OpenAPI document;
/// [`ApiError`] writes this shape.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `not_found`, `invalid_request`, `unauthorized`, `forbidden`, `conflict`, ...
    pub code: String,
    /// For people; never contains secrets or internal detail.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(transparent)]
    Funds(#[from] FundsError),
    #[error(transparent)]
    Dispute(#[from] DisputeError),
    /// The body is not JSON at all.
    #[error("{message}")]
    MalformedJson { message: String },
    /// Valid JSON of the wrong shape: unknown or missing fields, wrong types.
    #[error("{message}")]
    InvalidBody { message: String },
    #[error("{message}")]
    InvalidPath { message: String },
    #[error("{message}")]
    InvalidQuery { message: String },
    #[error("expected a request body with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("the request body is too large")]
    PayloadTooLarge,
    #[error("no such endpoint")]
    RouteNotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Account(e) => e.status(),
            Self::Funds(e) => e.status(),
            Self::Dispute(e) => e.status(),
            Self::MalformedJson { .. }
            | Self::InvalidBody { .. }
            | Self::InvalidPath { .. }
            | Self::InvalidQuery { .. } => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Account(e) => e.code(),
            Self::Funds(e) => e.code(),
            Self::Dispute(e) => e.code(),
            Self::MalformedJson { .. } => "malformed_json",
            Self::InvalidBody { .. } | Self::InvalidPath { .. } | Self::InvalidQuery { .. } => "invalid_request",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let public = match &self {
            Self::Account(e) => e.message_is_public(),
            _ => !status.is_server_error(),
        };
        let message = if !public {
            // The detail (SQL, hashing, crypto) is for the operator's log, not for the client.
            tracing::error!(error = %self, code = self.code(), "admin API request failed");
            "internal server error; see the server log".to_string()
        } else {
            self.to_string()
        };
        let body = json!({ "error": { "code": self.code(), "message": message } });
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = redact_string_values(&rejection.body_text());
        match rejection {
            JsonRejection::JsonSyntaxError(_) => Self::MalformedJson { message },
            JsonRejection::JsonDataError(_) => Self::InvalidBody { message },
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::PayloadTooLarge
            }
            _ => Self::MalformedJson { message },
        }
    }
}

/// serde quotes a mistyped string value in its message (`invalid type: string "...", expected ...`);
/// that value may be a secret sent in the wrong field, so it is cut out before the message is returned.
fn redact_string_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find("string \"") {
        let open = start + "string \"".len();
        out.push_str(&rest[..open]);
        match rest[open..].find("\", ") {
            Some(len) => {
                out.push('…');
                rest = &rest[open + len..];
            }
            None => {
                out.push_str("…\"");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// `Json<T>` whose rejections answer in the API's error shape. Request types use
/// `#[serde(deny_unknown_fields)]`, so a misspelt field is a 400, not silently ignored.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = <Json<T> as FromRequest<S>>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// An optional body: a request without `Content-Type` has none (`Option<ApiJson<T>>`).
impl<T, S> OptionalFromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let value = <Json<T> as OptionalFromRequest<S>>::from_request(req, state).await?;
        Ok(value.map(|Json(value)| Self(value)))
    }
}

/// `Path<T>` whose rejections answer in the API's error shape.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_error(rejection)),
        }
    }
}

fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::InvalidPath { message: format!("invalid path parameter: {}", rejection.body_text()) }
}

/// `Query<T>` whose rejections answer in the API's error shape. Query types use
/// `#[serde(deny_unknown_fields)]` too.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_error(rejection)),
        }
    }
}

fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::InvalidQuery { message: redact_string_values(&rejection.body_text()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistyped_string_values_are_redacted() {
        let m = "Failed to deserialize: invalid type: string \"sk-secret\", expected i64 at line 1 column 30";
        let r = redact_string_values(m);
        assert!(!r.contains("sk-secret"), "{r}");
        assert!(r.contains("expected i64 at line 1"), "{r}");
        assert_eq!(redact_string_values("unknown field `x`"), "unknown field `x`");
        assert!(!redact_string_values("string \"abc").contains("abc"));
    }
}
