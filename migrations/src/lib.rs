//! Schema migrations for token-exchange. The application runs them at start-up through [`Migrator`];
//! `cargo run -p migration -- <command>` drives them by hand (see `sea_orm_migration::cli`).

pub use sea_orm_migration::prelude::*;

mod columns;
mod m20261124_000001_create_tables;
mod m20261124_000002_ledger;
mod m20261124_000003_key_events;
mod m20261124_000004_risk;
mod m20261124_000005_reports;
mod m20261124_000006_track_pool_changes;
mod m20261124_000007_settlements;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_create_tables::Migration),
            Box::new(m20261124_000002_ledger::Migration),
            Box::new(m20261124_000003_key_events::Migration),
            Box::new(m20261124_000004_risk::Migration),
            Box::new(m20261124_000005_reports::Migration),
            Box::new(m20261124_000006_track_pool_changes::Migration),
            Box::new(m20261124_000007_settlements::Migration),
        ]
    }
}
