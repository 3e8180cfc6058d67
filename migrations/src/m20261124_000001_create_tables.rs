//! The initial schema (docs/schema.md). Ids, times (epoch ms) and money are BIGINT everywhere so that
//! SQLite and MySQL/MariaDB store and compare them identically; no TEXT column is indexed because MySQL
//! cannot index TEXT without a prefix length.

use sea_orm_migration::prelude::*;

use crate::columns::{big, big_null, boolean, create_table, id, index, varchar};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000001_create_tables"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Users {
    Table,
    Id,
    Username,
    PasswordHash,
    Roles,
    Disabled,
    CreatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum Sessions {
    Table,
    Id,
    TokenHash,
    UserId,
    ExpiresAtMs,
    CreatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum BuyerKeys {
    Table,
    Id,
    UserId,
    Name,
    LookupId,
    KeyHash,
    Models,
    ExpiresAtMs,
    RevokedAtMs,
    CreatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum HostedKeys {
    Table,
    Id,
    Uid,
    OwnerId,
    Name,
    Provider,
    BaseUrl,
    Models,
    ApiKeyEnc,
    KeyHint,
    Status,
    DeclaredBalance,
    RemainingBalance,
    FailureCount,
    SuccessCount,
    LastUsedAtMs,
    LastFailureAtMs,
    CreatedAtMs,
    UpdatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum UsageRecords {
    Table,
    Id,
    RequestId,
    BuyerId,
    BuyerKeyId,
    HostedKeyId,
    Model,
    Endpoint,
    PromptTokens,
    CompletionTokens,
    Estimated,
    StatusCode,
    Attempts,
    LatencyMs,
    TtftMs,
    RequestBytes,
    ResponseBytes,
    ClientDisconnected,
    ErrorKind,
    CreatedAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();

        manager
            .create_table(
                create_table(backend, Users::Table)
                    .col(id(Users::Id))
                    .col(varchar(Users::Username, 64))
                    .col(varchar(Users::PasswordHash, 255))
                    .col(varchar(Users::Roles, 64))
                    .col(boolean(Users::Disabled).default(false))
                    .col(big(Users::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_users_username", Users::Table, &[Users::Username], true)).await?;

        manager
            .create_table(
                create_table(backend, Sessions::Table)
                    .col(id(Sessions::Id))
                    .col(ColumnDef::new(Sessions::TokenHash).char_len(64).not_null())
                    .col(big(Sessions::UserId))
                    .col(big(Sessions::ExpiresAtMs))
                    .col(big(Sessions::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_sessions_token_hash", Sessions::Table, &[Sessions::TokenHash], true)).await?;
        manager.create_index(index("ix_sessions_user_id", Sessions::Table, &[Sessions::UserId], false)).await?;

        manager
            .create_table(
                create_table(backend, BuyerKeys::Table)
                    .col(id(BuyerKeys::Id))
                    .col(big(BuyerKeys::UserId))
                    .col(varchar(BuyerKeys::Name, 100))
                    .col(varchar(BuyerKeys::LookupId, 16))
                    .col(ColumnDef::new(BuyerKeys::KeyHash).char_len(64).not_null())
                    .col(ColumnDef::new(BuyerKeys::Models).text().null())
                    .col(big_null(BuyerKeys::ExpiresAtMs))
                    .col(big_null(BuyerKeys::RevokedAtMs))
                    .col(big(BuyerKeys::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_buyer_keys_lookup_id", BuyerKeys::Table, &[BuyerKeys::LookupId], true)).await?;
        manager.create_index(index("ix_buyer_keys_user_id", BuyerKeys::Table, &[BuyerKeys::UserId], false)).await?;

        manager
            .create_table(
                create_table(backend, HostedKeys::Table)
                    .col(id(HostedKeys::Id))
                    .col(varchar(HostedKeys::Uid, 36))
                    .col(big(HostedKeys::OwnerId))
                    .col(varchar(HostedKeys::Name, 100))
                    .col(varchar(HostedKeys::Provider, 32))
                    .col(varchar(HostedKeys::BaseUrl, 512))
                    .col(ColumnDef::new(HostedKeys::Models).text().not_null())
                    .col(ColumnDef::new(HostedKeys::ApiKeyEnc).text().not_null())
                    .col(varchar(HostedKeys::KeyHint, 32))
                    .col(varchar(HostedKeys::Status, 16))
                    .col(big(HostedKeys::DeclaredBalance))
                    .col(big(HostedKeys::RemainingBalance))
                    .col(big(HostedKeys::FailureCount).default(0))
                    .col(big(HostedKeys::SuccessCount).default(0))
                    .col(big_null(HostedKeys::LastUsedAtMs))
                    .col(big_null(HostedKeys::LastFailureAtMs))
                    .col(big(HostedKeys::CreatedAtMs))
                    .col(big(HostedKeys::UpdatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_hosted_keys_uid", HostedKeys::Table, &[HostedKeys::Uid], true)).await?;
        manager
            .create_index(index("ix_hosted_keys_owner_id", HostedKeys::Table, &[HostedKeys::OwnerId], false))
            .await?;
        manager.create_index(index("ix_hosted_keys_status", HostedKeys::Table, &[HostedKeys::Status], false)).await?;

        manager
            .create_table(
                create_table(backend, UsageRecords::Table)
                    .col(id(UsageRecords::Id))
                    .col(varchar(UsageRecords::RequestId, 40))
                    .col(big(UsageRecords::BuyerId))
                    .col(big(UsageRecords::BuyerKeyId))
                    .col(big_null(UsageRecords::HostedKeyId))
                    .col(varchar(UsageRecords::Model, 128))
                    .col(varchar(UsageRecords::Endpoint, 32))
                    .col(big(UsageRecords::PromptTokens))
                    .col(big(UsageRecords::CompletionTokens))
                    .col(boolean(UsageRecords::Estimated))
                    .col(ColumnDef::new(UsageRecords::StatusCode).integer().not_null())
                    .col(ColumnDef::new(UsageRecords::Attempts).integer().not_null())
                    .col(big(UsageRecords::LatencyMs))
                    .col(big_null(UsageRecords::TtftMs))
                    .col(big(UsageRecords::RequestBytes))
                    .col(big(UsageRecords::ResponseBytes))
                    .col(boolean(UsageRecords::ClientDisconnected))
                    .col(ColumnDef::new(UsageRecords::ErrorKind).string_len(32).null())
                    .col(big(UsageRecords::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index("ux_usage_records_request_id", UsageRecords::Table, &[UsageRecords::RequestId], true))
            .await?;
        manager
            .create_index(index(
                "ix_usage_records_buyer_created",
                UsageRecords::Table,
                &[UsageRecords::BuyerId, UsageRecords::CreatedAtMs],
                false,
            ))
            .await?;
        manager
            .create_index(index(
                "ix_usage_records_hosted_key_created",
                UsageRecords::Table,
                &[UsageRecords::HostedKeyId, UsageRecords::CreatedAtMs],
                false,
            ))
            .await?;
        manager
            .create_index(index("ix_usage_records_created", UsageRecords::Table, &[UsageRecords::CreatedAtMs], false))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Dropping a table drops its indexes on both backends.
        manager.drop_table(Table::drop().table(UsageRecords::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(HostedKeys::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(BuyerKeys::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(Sessions::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(Users::Table).to_owned()).await?;
        Ok(())
    }
}
