//! The platform fallback pool: admin-managed platform keys per model with a priority.

use axum::Router;

use super::AdminState;

pub fn routes() -> Router<AdminState> {
    Router::new()
}
