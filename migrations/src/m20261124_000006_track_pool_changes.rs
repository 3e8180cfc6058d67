//! Incremental pool reloads: `hosted_keys.pool_changed_at_ms` is moved by every write of a column the
//! gateway's pool snapshot is built from, so that a reload reads only the rows changed since the previous
//! one (docs/routing.md). Existing rows start at their `updated_at_ms`.

use sea_orm_migration::prelude::*;

use crate::columns::{big, index};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000006_track_pool_changes"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum HostedKeys {
    Table,
    UpdatedAtMs,
    /// When a column the pool is built from last changed (ms).
    PoolChangedAtMs,
}

const INDEX: &str = "ix_hosted_keys_pool_changed";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(HostedKeys::Table)
                    .add_column(big(HostedKeys::PoolChangedAtMs).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::update()
                    .table(HostedKeys::Table)
                    .value(HostedKeys::PoolChangedAtMs, Expr::col(HostedKeys::UpdatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index(INDEX, HostedKeys::Table, &[HostedKeys::PoolChangedAtMs], false)).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name(INDEX).table(HostedKeys::Table).to_owned()).await?;
        manager
            .alter_table(Table::alter().table(HostedKeys::Table).drop_column(HostedKeys::PoolChangedAtMs).to_owned())
            .await
    }
}
