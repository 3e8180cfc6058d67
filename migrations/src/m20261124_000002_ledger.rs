//! The credits ledger (docs/ledger.md): accounts, journal entries and their postings, escrows, the
//! gateway's holds, per-model prices; plus the columns the gateway needs to bill a request.

use sea_orm_migration::prelude::*;

use crate::columns::{big, big_null, boolean, create_table, id, index, varchar};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000002_ledger"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Accounts {
    Table,
    Id,
    Kind,
    OwnerId,
    RefId,
    Balance,
    CreatedAtMs,
    UpdatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum JournalEntries {
    Table,
    Id,
    IdempotencyKey,
    Kind,
    RequestId,
    ActorId,
    Memo,
    CreatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum Postings {
    Table,
    Id,
    EntryId,
    AccountId,
    Amount,
    CreatedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum Escrows {
    Table,
    Id,
    BuyerId,
    AccountId,
    Model,
    HostedKeyId,
    Amount,
    Status,
    ExpiresAtMs,
    CreatedAtMs,
    ClosedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum Holds {
    Table,
    Id,
    AccountId,
    SourceAccountId,
    BuyerId,
    EscrowId,
    NodeId,
    Status,
    Amount,
    Spent,
    CreatedAtMs,
    RenewedAtMs,
    ClosedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum ModelPrices {
    Table,
    Id,
    Model,
    PromptPerMillion,
    CompletionPerMillion,
    MaxOutputTokens,
    UpdatedAtMs,
    UpdatedBy,
}

#[derive(DeriveIden, Clone, Copy)]
enum Users {
    Table,
    WalletPays,
}

#[derive(DeriveIden, Clone, Copy)]
enum UsageRecords {
    Table,
    CostCredits,
    UnpaidCredits,
    HoldId,
}

#[derive(DeriveIden, Clone, Copy)]
enum HostedKeys {
    Table,
    Pool,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();

        // Only the external account (where granted credits come from) may go below zero.
        manager
            .create_table(
                create_table(backend, Accounts::Table)
                    .col(id(Accounts::Id))
                    .col(varchar(Accounts::Kind, 16))
                    .col(big(Accounts::OwnerId))
                    .col(big(Accounts::RefId))
                    .col(big(Accounts::Balance).default(0))
                    .col(big(Accounts::CreatedAtMs))
                    .col(big(Accounts::UpdatedAtMs))
                    .check(Expr::col(Accounts::Kind).eq("external").or(Expr::col(Accounts::Balance).gte(0)))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ux_accounts_kind_owner_ref",
                Accounts::Table,
                &[Accounts::Kind, Accounts::OwnerId, Accounts::RefId],
                true,
            ))
            .await?;

        manager
            .create_table(
                create_table(backend, JournalEntries::Table)
                    .col(id(JournalEntries::Id))
                    .col(varchar(JournalEntries::IdempotencyKey, 100))
                    .col(varchar(JournalEntries::Kind, 24))
                    .col(ColumnDef::new(JournalEntries::RequestId).string_len(40).null())
                    .col(big_null(JournalEntries::ActorId))
                    .col(ColumnDef::new(JournalEntries::Memo).string_len(255).null())
                    .col(big(JournalEntries::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ux_journal_entries_idempotency_key",
                JournalEntries::Table,
                &[JournalEntries::IdempotencyKey],
                true,
            ))
            .await?;
        manager
            .create_index(index(
                "ix_journal_entries_request_id",
                JournalEntries::Table,
                &[JournalEntries::RequestId],
                false,
            ))
            .await?;
        manager
            .create_index(index(
                "ix_journal_entries_created",
                JournalEntries::Table,
                &[JournalEntries::CreatedAtMs],
                false,
            ))
            .await?;

        manager
            .create_table(
                create_table(backend, Postings::Table)
                    .col(id(Postings::Id))
                    .col(big(Postings::EntryId))
                    .col(big(Postings::AccountId))
                    .col(big(Postings::Amount))
                    .col(big(Postings::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ix_postings_entry", Postings::Table, &[Postings::EntryId], false)).await?;
        manager
            .create_index(index("ix_postings_account", Postings::Table, &[Postings::AccountId, Postings::Id], false))
            .await?;

        manager
            .create_table(
                create_table(backend, Escrows::Table)
                    .col(id(Escrows::Id))
                    .col(big(Escrows::BuyerId))
                    .col(big(Escrows::AccountId))
                    .col(ColumnDef::new(Escrows::Model).string_len(128).null())
                    .col(big_null(Escrows::HostedKeyId))
                    .col(big(Escrows::Amount))
                    .col(varchar(Escrows::Status, 16))
                    .col(big(Escrows::ExpiresAtMs))
                    .col(big(Escrows::CreatedAtMs))
                    .col(big_null(Escrows::ClosedAtMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index("ix_escrows_buyer_status", Escrows::Table, &[Escrows::BuyerId, Escrows::Status], false))
            .await?;
        manager
            .create_index(index(
                "ix_escrows_status_expires",
                Escrows::Table,
                &[Escrows::Status, Escrows::ExpiresAtMs],
                false,
            ))
            .await?;

        manager
            .create_table(
                create_table(backend, Holds::Table)
                    .col(id(Holds::Id))
                    .col(big(Holds::AccountId))
                    .col(big(Holds::SourceAccountId))
                    .col(big(Holds::BuyerId))
                    .col(big_null(Holds::EscrowId))
                    .col(varchar(Holds::NodeId, 64))
                    .col(varchar(Holds::Status, 16))
                    .col(big(Holds::Amount))
                    .col(big(Holds::Spent).default(0))
                    .col(big(Holds::CreatedAtMs))
                    .col(big(Holds::RenewedAtMs))
                    .col(big_null(Holds::ClosedAtMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index("ix_holds_status_renewed", Holds::Table, &[Holds::Status, Holds::RenewedAtMs], false))
            .await?;
        manager
            .create_index(index(
                "ix_holds_source_status",
                Holds::Table,
                &[Holds::SourceAccountId, Holds::Status],
                false,
            ))
            .await?;

        manager
            .create_table(
                create_table(backend, ModelPrices::Table)
                    .col(id(ModelPrices::Id))
                    .col(varchar(ModelPrices::Model, 128))
                    .col(big(ModelPrices::PromptPerMillion))
                    .col(big(ModelPrices::CompletionPerMillion))
                    .col(big(ModelPrices::MaxOutputTokens))
                    .col(big(ModelPrices::UpdatedAtMs))
                    .col(big_null(ModelPrices::UpdatedBy))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_model_prices_model", ModelPrices::Table, &[ModelPrices::Model], true)).await?;

        // SQLite alters one column per statement.
        manager
            .alter_table(
                Table::alter().table(Users::Table).add_column(boolean(Users::WalletPays).default(true)).to_owned(),
            )
            .await?;
        for column in [UsageRecords::CostCredits, UsageRecords::UnpaidCredits] {
            manager
                .alter_table(Table::alter().table(UsageRecords::Table).add_column(big(column).default(0)).to_owned())
                .await?;
        }
        manager
            .alter_table(
                Table::alter().table(UsageRecords::Table).add_column(big_null(UsageRecords::HoldId)).to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(HostedKeys::Table)
                    .add_column(varchar(HostedKeys::Pool, 16).default("seller"))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(HostedKeys::Table).drop_column(HostedKeys::Pool).to_owned()).await?;
        for column in [UsageRecords::HoldId, UsageRecords::UnpaidCredits, UsageRecords::CostCredits] {
            manager.alter_table(Table::alter().table(UsageRecords::Table).drop_column(column).to_owned()).await?;
        }
        manager.alter_table(Table::alter().table(Users::Table).drop_column(Users::WalletPays).to_owned()).await?;
        for table in [
            ModelPrices::Table.into_iden(),
            Holds::Table.into_iden(),
            Escrows::Table.into_iden(),
            Postings::Table.into_iden(),
            JournalEntries::Table.into_iden(),
            Accounts::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
