//! Queries of risk control (placeholder until the risk-control change lands).
