//! sea-orm entities, one per table in docs/schema.md. They hold no logic; queries live in `crate::db::*`.

pub mod accounts;
pub mod buyer_keys;
pub mod disputes;
pub mod escrows;
pub mod holds;
pub mod hosted_keys;
pub mod journal_entries;
pub mod key_balance_samples;
pub mod key_events;
pub mod model_prices;
pub mod notifications;
pub mod postings;
pub mod sessions;
pub mod settlements;
pub mod usage_records;
pub mod usage_rollups_buyer;
pub mod usage_rollups_platform;
pub mod usage_rollups_seller;
pub mod users;
pub mod webhooks;
