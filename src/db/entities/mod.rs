//! sea-orm entities, one per table in docs/schema.md. They hold no logic; queries live in `crate::db::*`.

pub mod buyer_keys;
pub mod hosted_keys;
pub mod sessions;
pub mod usage_records;
pub mod users;
