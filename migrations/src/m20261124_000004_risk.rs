//! Seller key lifecycle and risk control: routing caps and fallback priority on `hosted_keys`, the
//! provider balance samples the dilution check compares, per-seller webhooks with a delivery outbox on
//! `notifications`, and the fallback flag on usage records.

use sea_orm_migration::prelude::*;

use crate::columns::{big, big_null, boolean, create_table, id, index, varchar};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000004_risk"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum HostedKeys {
    Table,
    /// Platform (fallback) keys are tried in ascending priority.
    Priority,
    /// Seller caps; 0 = no cap.
    MaxConcurrency,
    MaxSpendPerDay,
    /// Credits settled on the key on `spend_day` (days since the Unix epoch, UTC).
    SpentToday,
    SpendDay,
    /// Provider balance adapter; empty = derived from the provider name, `none` = no balance API.
    BalanceApi,
    VerifiedAtMs,
    /// The next risk check is due; a node claims a key's check by moving this forward.
    NextCheckAtMs,
    /// Admin review of a flagged key: '' | pending | confirmed.
    Review,
    /// What put the key in its current status: seller | admin | failures | verification | dilution | balance.
    StatusCause,
    /// The key's success/failure counts at its last risk check (the failure-rate window starts there).
    CheckedSuccesses,
    CheckedFailures,
}

#[derive(DeriveIden, Clone, Copy)]
enum UsageRecords {
    Table,
    Fallback,
}

#[derive(DeriveIden, Clone, Copy)]
enum Notifications {
    Table,
    DeliveredAtMs,
    DeliveryAttempts,
}

#[derive(DeriveIden, Clone, Copy)]
enum KeyBalanceSamples {
    Table,
    Id,
    HostedKeyId,
    TakenAtMs,
    /// Provider-reported balance, converted to credits.
    BalanceCredits,
    /// What the platform metered on the key since the previous sample (credits, paid and unpaid).
    MeteredCredits,
    /// Allowance for requests in flight at the sample.
    InflightCredits,
    /// Drop in balance beyond metered use and the threshold (0 when none).
    ExcessCredits,
    /// baseline | ok | diluted | skipped
    Verdict,
}

#[derive(DeriveIden, Clone, Copy)]
enum Webhooks {
    Table,
    Id,
    UserId,
    Url,
    /// Versioned ciphertext of the HMAC signing secret.
    SecretEnc,
    CreatedAtMs,
    UpdatedAtMs,
    LastDeliveryAtMs,
    LastError,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let hosted_columns = [
            big(HostedKeys::Priority).default(0).to_owned(),
            big(HostedKeys::MaxConcurrency).default(0).to_owned(),
            big(HostedKeys::MaxSpendPerDay).default(0).to_owned(),
            big(HostedKeys::SpentToday).default(0).to_owned(),
            big(HostedKeys::SpendDay).default(0).to_owned(),
            varchar(HostedKeys::BalanceApi, 32).default("").to_owned(),
            big_null(HostedKeys::VerifiedAtMs),
            big(HostedKeys::NextCheckAtMs).default(0).to_owned(),
            varchar(HostedKeys::Review, 16).default("").to_owned(),
            varchar(HostedKeys::StatusCause, 16).default("").to_owned(),
            big(HostedKeys::CheckedSuccesses).default(0).to_owned(),
            big(HostedKeys::CheckedFailures).default(0).to_owned(),
        ];
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for mut column in hosted_columns {
            manager.alter_table(Table::alter().table(HostedKeys::Table).add_column(&mut column).to_owned()).await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(UsageRecords::Table)
                    .add_column(boolean(UsageRecords::Fallback).default(false))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Notifications::Table)
                    .add_column(big_null(Notifications::DeliveredAtMs))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Notifications::Table)
                    .add_column(big(Notifications::DeliveryAttempts).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                create_table(backend, KeyBalanceSamples::Table)
                    .col(id(KeyBalanceSamples::Id))
                    .col(big(KeyBalanceSamples::HostedKeyId))
                    .col(big(KeyBalanceSamples::TakenAtMs))
                    .col(big(KeyBalanceSamples::BalanceCredits))
                    .col(big(KeyBalanceSamples::MeteredCredits))
                    .col(big(KeyBalanceSamples::InflightCredits))
                    .col(big(KeyBalanceSamples::ExcessCredits))
                    .col(varchar(KeyBalanceSamples::Verdict, 16))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_key_balance_samples_key",
                KeyBalanceSamples::Table,
                &[KeyBalanceSamples::HostedKeyId, KeyBalanceSamples::Id],
                false,
            ))
            .await?;
        manager
            .create_table(
                create_table(backend, Webhooks::Table)
                    .col(id(Webhooks::Id))
                    .col(big(Webhooks::UserId))
                    .col(varchar(Webhooks::Url, 512))
                    .col(ColumnDef::new(Webhooks::SecretEnc).text().not_null())
                    .col(big(Webhooks::CreatedAtMs))
                    .col(big(Webhooks::UpdatedAtMs))
                    .col(big_null(Webhooks::LastDeliveryAtMs))
                    .col(ColumnDef::new(Webhooks::LastError).string_len(255).null())
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_webhooks_user", Webhooks::Table, &[Webhooks::UserId], true)).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Webhooks::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(KeyBalanceSamples::Table).to_owned()).await?;
        for column in [Notifications::DeliveryAttempts, Notifications::DeliveredAtMs] {
            manager.alter_table(Table::alter().table(Notifications::Table).drop_column(column).to_owned()).await?;
        }
        manager
            .alter_table(Table::alter().table(UsageRecords::Table).drop_column(UsageRecords::Fallback).to_owned())
            .await?;
        for column in [
            HostedKeys::CheckedFailures,
            HostedKeys::CheckedSuccesses,
            HostedKeys::StatusCause,
            HostedKeys::Review,
            HostedKeys::NextCheckAtMs,
            HostedKeys::VerifiedAtMs,
            HostedKeys::BalanceApi,
            HostedKeys::SpendDay,
            HostedKeys::SpentToday,
            HostedKeys::MaxSpendPerDay,
            HostedKeys::MaxConcurrency,
            HostedKeys::Priority,
        ] {
            manager.alter_table(Table::alter().table(HostedKeys::Table).drop_column(column).to_owned()).await?;
        }
        Ok(())
    }
}
