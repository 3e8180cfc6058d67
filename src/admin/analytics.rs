//! Reports, time series and CSV exports (docs/reports.md): the platform report for admins, each user's own
//! report, usage over time, and usage records and ledger postings as CSV. Buyers see only their requests,
//! sellers only what their keys served; the platform scope needs the admin role.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{AdminUser, Session};
use super::error::{ApiError, ApiQuery, ErrorBody};
use super::AdminState;
use crate::accounts::AccountError;
use crate::analytics::{
    self, AnalyticsError, ExportKind, Granularity, PlatformReport, ReportScope, SeriesRequest, TimeSeries, UserReport,
};

pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(analytics_platform))
        .routes(routes!(analytics_user))
        .routes(routes!(analytics_timeseries))
        .routes(routes!(export_usage_csv))
        .routes(routes!(export_transactions_csv))
}

impl From<AnalyticsError> for ApiError {
    fn from(e: AnalyticsError) -> Self {
        match e {
            // Every analytics input is a query parameter.
            AnalyticsError::Invalid { message } => ApiError::InvalidQuery { message },
            AnalyticsError::Forbidden { role } => AccountError::Forbidden { role }.into(),
            AnalyticsError::Db(e) => AccountError::Db(e).into(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PlatformQuery {
    /// Days of the `recent` window, 1 to 90 (default 7).
    #[serde(default)]
    days: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// Start (ms since the epoch; rounded down to the hour). Default: all time.
    #[serde(default)]
    from: Option<i64>,
    /// End (ms since the epoch, inclusive). Default: now.
    #[serde(default)]
    to: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    /// Bucket size (UTC hours or days).
    granularity: Granularity,
    /// Start (ms since the epoch; rounded down to the bucket). Default: `to` less 48 hours (hour) or 30
    /// days (day).
    #[serde(default)]
    from: Option<i64>,
    /// End (ms since the epoch, inclusive). Default: now.
    #[serde(default)]
    to: Option<i64>,
    /// Only this model.
    #[serde(default)]
    model: Option<String>,
    /// Default: platform for admins, else buyer for buyers, else seller.
    #[serde(default)]
    scope: Option<ReportScope>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// Rows created from this time on (ms since the epoch). Default: all.
    #[serde(default)]
    from: Option<i64>,
    /// Rows created up to this time, inclusive (ms since the epoch). Default: all.
    #[serde(default)]
    to: Option<i64>,
    /// Default: platform for admins, else buyer for buyers, else seller.
    #[serde(default)]
    scope: Option<ReportScope>,
}

#[utoipa::path(
    get,
    path = "/api/v1/analytics/platform",
    operation_id = "analytics_platform",
    tag = "analytics",
    params(PlatformQuery),
    responses(
        (status = 200, description = "Orders, recent volume, keys, usage per model, fallback share and disputes", body = PlatformReport),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn analytics_platform(
    State(state): State<AdminState>,
    _admin: AdminUser,
    ApiQuery(query): ApiQuery<PlatformQuery>,
) -> Result<Json<PlatformReport>, ApiError> {
    Ok(Json(analytics::platform_report(&state.db, query.days, crate::now_ms()).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/analytics/user",
    operation_id = "analytics_user",
    tag = "analytics",
    params(RangeQuery),
    responses(
        (status = 200, description = "The caller's buyer report and seller report (null for a role the caller lacks)", body = UserReport),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "Neither a buyer nor a seller", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn analytics_user(
    State(state): State<AdminState>,
    session: Session,
    ApiQuery(query): ApiQuery<RangeQuery>,
) -> Result<Json<UserReport>, ApiError> {
    let report = analytics::user_report(&state.db, &session.user, query.from, query.to, crate::now_ms()).await?;
    Ok(Json(report))
}

#[utoipa::path(
    get,
    path = "/api/v1/analytics/timeseries",
    operation_id = "analytics_timeseries",
    tag = "analytics",
    params(SeriesQuery),
    responses(
        (status = 200, description = "One point per bucket, empty buckets included", body = TimeSeries),
        (status = 400, description = "Invalid query (from after to, unknown granularity or scope, more than 2,000 buckets)", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "The scope needs a role the caller lacks", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn analytics_timeseries(
    State(state): State<AdminState>,
    session: Session,
    ApiQuery(query): ApiQuery<SeriesQuery>,
) -> Result<Json<TimeSeries>, ApiError> {
    let request = SeriesRequest {
        granularity: query.granularity,
        from: query.from,
        to: query.to,
        model: query.model,
        scope: query.scope,
    };
    Ok(Json(analytics::timeseries(&state.db, &session.user, request, crate::now_ms()).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/exports/usage.csv",
    operation_id = "export_usage_csv",
    tag = "analytics",
    params(ExportQuery),
    responses(
        (status = 200, description = "Usage records as CSV (RFC 4180, header row first), streamed", content_type = "text/csv", body = String),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "The scope needs a role the caller lacks", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn export_usage_csv(
    State(state): State<AdminState>,
    session: Session,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    export(state, session, query, ExportKind::Usage).await
}

#[utoipa::path(
    get,
    path = "/api/v1/exports/transactions.csv",
    operation_id = "export_transactions_csv",
    tag = "analytics",
    params(ExportQuery),
    responses(
        (status = 200, description = "Ledger postings as CSV (RFC 4180, header row first), streamed", content_type = "text/csv", body = String),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "The scope needs a role the caller lacks", body = ErrorBody),
        (status = 500, description = "Server error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn export_transactions_csv(
    State(state): State<AdminState>,
    session: Session,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    export(state, session, query, ExportKind::Transactions).await
}

async fn export(
    state: AdminState,
    session: Session,
    query: ExportQuery,
    kind: ExportKind,
) -> Result<Response, ApiError> {
    let stream = analytics::export(state.db.clone(), kind, &session.user, query.scope, query.from, query.to).await?;
    let disposition = format!("attachment; filename=\"{}\"", kind.file_name());
    let headers =
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()), (header::CONTENT_DISPOSITION, disposition)];
    Ok((headers, Body::from_stream(stream)).into_response())
}
