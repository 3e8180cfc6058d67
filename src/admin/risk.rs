//! Admin review of flagged keys and seller webhooks (routes land with the risk-control change).

use axum::Router;

use super::AdminState;

pub fn routes() -> Router<AdminState> {
    Router::new()
}
