//! Per-node health of every key: success and time-to-first-token moving averages, rate-limit cooldowns,
//! circuit breakers, in-flight counts. INTERFACE SKELETON: lands with the routing-quality change.
