//! The history of every seller key's status changes, and the notifications their owners receive.

use sea_orm_migration::prelude::*;

use crate::columns::{big, big_null, create_table, id, index, varchar};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000003_key_events"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum KeyEvents {
    Table,
    Id,
    HostedKeyId,
    OwnerId,
    FromStatus,
    ToStatus,
    Reason,
    ActorId,
    CreatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum Notifications {
    Table,
    Id,
    UserId,
    Kind,
    HostedKeyId,
    Message,
    CreatedAtMs,
    ReadAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        manager
            .create_table(
                create_table(backend, KeyEvents::Table)
                    .col(id(KeyEvents::Id))
                    .col(big(KeyEvents::HostedKeyId))
                    .col(big(KeyEvents::OwnerId))
                    .col(ColumnDef::new(KeyEvents::FromStatus).string_len(16).null())
                    .col(varchar(KeyEvents::ToStatus, 16))
                    .col(varchar(KeyEvents::Reason, 255))
                    .col(big_null(KeyEvents::ActorId))
                    .col(big(KeyEvents::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index("ix_key_events_key", KeyEvents::Table, &[KeyEvents::HostedKeyId, KeyEvents::Id], false))
            .await?;
        manager
            .create_table(
                create_table(backend, Notifications::Table)
                    .col(id(Notifications::Id))
                    .col(big(Notifications::UserId))
                    .col(varchar(Notifications::Kind, 32))
                    .col(big_null(Notifications::HostedKeyId))
                    .col(varchar(Notifications::Message, 500))
                    .col(big(Notifications::CreatedAtMs))
                    .col(big_null(Notifications::ReadAtMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_notifications_user",
                Notifications::Table,
                &[Notifications::UserId, Notifications::Id],
                false,
            ))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Notifications::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(KeyEvents::Table).to_owned()).await?;
        Ok(())
    }
}
