//! Queries over `webhooks` (placeholder until the risk-control change lands).
