//! Reports: hourly usage rollups kept by the usage writer in the settlement transaction (so reports never
//! scan usage records), disputes, and the index escrow disputes read by.
//!
//! The rollups are backfilled from the usage records and settlements already in the database, so that
//! reports include the traffic from before the upgrade (docs/reports.md).

use sea_orm_migration::prelude::*;

use crate::columns::{big, big_null, create_table, id, index, varchar};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000005_reports"
    }
}

/// The buyer side: one row per hour, buyer key and model.
#[derive(DeriveIden, Clone, Copy)]
enum UsageRollupsBuyer {
    Table,
    Id,
    HourMs,
    BuyerId,
    BuyerKeyId,
    Model,
    Requests,
    FailedRequests,
    FallbackRequests,
    PromptTokens,
    CompletionTokens,
    CostCredits,
    PaidCredits,
    SellerCredits,
    PlatformCredits,
}

/// The seller side: one row per hour, hosted key and model (requests that reached no key are only on the
/// buyer side).
#[derive(DeriveIden, Clone, Copy)]
enum UsageRollupsSeller {
    Table,
    Id,
    HourMs,
    OwnerId,
    HostedKeyId,
    Model,
    Requests,
    FailedRequests,
    FallbackRequests,
    PromptTokens,
    CompletionTokens,
    CostCredits,
    PaidCredits,
    SellerCredits,
    PlatformCredits,
}

/// The platform side: one row per hour and model. The per-key tables hold about one row per request when
/// traffic is spread over many keys and models (1M requests over 30 days, 1,000 keys and 20 models make
/// ~950k rows); platform-wide reports read this one, which has at most 24 x models rows a day.
#[derive(DeriveIden, Clone, Copy)]
enum UsageRollupsPlatform {
    Table,
    Id,
    HourMs,
    Model,
    Requests,
    FailedRequests,
    FallbackRequests,
    PromptTokens,
    CompletionTokens,
    CostCredits,
    PaidCredits,
    SellerCredits,
    PlatformCredits,
}

#[derive(DeriveIden, Clone, Copy)]
enum Disputes {
    Table,
    Id,
    BuyerId,
    /// `request:<request id>` or `escrow:<escrow id>`.
    Target,
    /// `target` while the dispute is open, NULL once resolved: the unique index on it allows one open
    /// dispute per target (NULLs never collide, on SQLite and MySQL alike).
    OpenTarget,
    RequestId,
    EscrowId,
    Reason,
    /// open | refunded | rejected.
    Status,
    RefundedCredits,
    ResolutionNote,
    ResolvedBy,
    CreatedAtMs,
    ResolvedAtMs,
}

#[derive(DeriveIden, Clone, Copy)]
enum UsageRecords {
    Table,
    HoldId,
}

/// One row per usage record (`filter` picks which) with the figures the usage writer adds to the rollups:
/// `hour_ms`, the record's keys and counters, and what its `settle` entry moved: `paid` is what left the
/// buyer's hold or source (the entry's debits), `seller` what the seller's wallet received (a buyer who pays
/// their own key shows a debit and a credit on one wallet: only the credit is the seller's), `platform` what
/// the revenue account received. The usage writer takes the same figures from `settle()`'s result.
///
/// Joined per record and grouped by the record's id (index lookups: `journal_entries.request_id`,
/// `postings.entry_id`), not by joining a table of all settlements grouped by request id: on MariaDB that
/// materialisation made the backfill of a million records take six minutes instead of one. MIN() of a
/// record's own columns is the column (portable, whatever ONLY_FULL_GROUP_BY thinks).
fn per_record(filter: &str) -> String {
    format!(
        "SELECT MIN(u.created_at_ms - u.created_at_ms % 3600000) AS hour_ms, MIN(u.buyer_id) AS buyer_id, \
         MIN(u.buyer_key_id) AS buyer_key_id, MIN(u.hosted_key_id) AS hosted_key_id, MIN(u.model) AS model, \
         MIN(CASE WHEN u.status_code >= 400 THEN 1 ELSE 0 END) AS failed, \
         MIN(CASE WHEN u.fallback THEN 1 ELSE 0 END) AS fallback, MIN(u.prompt_tokens) AS prompt_tokens, \
         MIN(u.completion_tokens) AS completion_tokens, MIN(u.cost_credits) AS cost_credits, \
         SUM(CASE WHEN p.amount < 0 THEN -p.amount ELSE 0 END) AS paid, \
         SUM(CASE WHEN a.kind = 'wallet' AND p.amount > 0 THEN p.amount ELSE 0 END) AS seller, \
         SUM(CASE WHEN a.kind = 'revenue' THEN p.amount ELSE 0 END) AS platform \
         FROM usage_records u \
         LEFT JOIN journal_entries e ON e.request_id = u.request_id AND e.kind = 'settle' \
         LEFT JOIN postings p ON p.entry_id = e.id LEFT JOIN accounts a ON a.id = p.account_id \
         {filter} GROUP BY u.id"
    )
}

/// The counters of a group of `per_record` rows `r`.
const COUNTERS: &str = "COUNT(*), SUM(r.failed), SUM(r.fallback), SUM(r.prompt_tokens), \
    SUM(r.completion_tokens), SUM(r.cost_credits), SUM(r.paid), SUM(r.seller), SUM(r.platform)";

const COUNTER_COLUMNS: &str = "requests, failed_requests, fallback_requests, prompt_tokens, completion_tokens, \
    cost_credits, paid_credits, seller_credits, platform_credits";

/// Fills the rollups from the usage records and settlements written before this migration, with the
/// grouping of the usage writer (a buyer key belongs to one buyer and a hosted key to one owner, so MIN()
/// only names the group's one value; a key that no longer exists has owner 0, as in the writer). The
/// platform rollup is the buyer rollup summed over keys: every request is on the buyer side.
fn backfill() -> [String; 3] {
    [
        format!(
            "INSERT INTO usage_rollups_buyer (hour_ms, buyer_key_id, model, buyer_id, {COUNTER_COLUMNS}) \
             SELECT r.hour_ms, r.buyer_key_id, r.model, MIN(r.buyer_id), {COUNTERS} FROM ({}) r \
             GROUP BY r.hour_ms, r.buyer_key_id, r.model",
            per_record("")
        ),
        format!(
            "INSERT INTO usage_rollups_seller (hour_ms, hosted_key_id, model, owner_id, {COUNTER_COLUMNS}) \
             SELECT r.hour_ms, r.hosted_key_id, r.model, COALESCE(MIN(k.owner_id), 0), {COUNTERS} FROM ({}) r \
             LEFT JOIN hosted_keys k ON k.id = r.hosted_key_id GROUP BY r.hour_ms, r.hosted_key_id, r.model",
            per_record("WHERE u.hosted_key_id IS NOT NULL")
        ),
        format!(
            "INSERT INTO usage_rollups_platform (hour_ms, model, {COUNTER_COLUMNS}) \
             SELECT hour_ms, model, SUM(requests), SUM(failed_requests), SUM(fallback_requests), \
             SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_credits), SUM(paid_credits), \
             SUM(seller_credits), SUM(platform_credits) FROM usage_rollups_buyer GROUP BY hour_ms, model"
        ),
    ]
}

fn counter<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).big_integer().not_null().default(0).to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        use UsageRollupsBuyer as B;
        manager
            .create_table(
                create_table(backend, B::Table)
                    .col(id(B::Id))
                    .col(big(B::HourMs))
                    .col(big(B::BuyerId))
                    .col(big(B::BuyerKeyId))
                    .col(varchar(B::Model, 128))
                    .col(counter(B::Requests))
                    .col(counter(B::FailedRequests))
                    .col(counter(B::FallbackRequests))
                    .col(counter(B::PromptTokens))
                    .col(counter(B::CompletionTokens))
                    .col(counter(B::CostCredits))
                    .col(counter(B::PaidCredits))
                    .col(counter(B::SellerCredits))
                    .col(counter(B::PlatformCredits))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_rollups_buyer", B::Table, &[B::HourMs, B::BuyerKeyId, B::Model], true)).await?;
        manager.create_index(index("ix_rollups_buyer_buyer", B::Table, &[B::BuyerId, B::HourMs], false)).await?;

        use UsageRollupsSeller as S;
        manager
            .create_table(
                create_table(backend, S::Table)
                    .col(id(S::Id))
                    .col(big(S::HourMs))
                    .col(big(S::OwnerId))
                    .col(big(S::HostedKeyId))
                    .col(varchar(S::Model, 128))
                    .col(counter(S::Requests))
                    .col(counter(S::FailedRequests))
                    .col(counter(S::FallbackRequests))
                    .col(counter(S::PromptTokens))
                    .col(counter(S::CompletionTokens))
                    .col(counter(S::CostCredits))
                    .col(counter(S::PaidCredits))
                    .col(counter(S::SellerCredits))
                    .col(counter(S::PlatformCredits))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index("ux_rollups_seller", S::Table, &[S::HourMs, S::HostedKeyId, S::Model], true))
            .await?;
        manager.create_index(index("ix_rollups_seller_owner", S::Table, &[S::OwnerId, S::HourMs], false)).await?;
        manager.create_index(index("ix_rollups_seller_key", S::Table, &[S::HostedKeyId, S::HourMs], false)).await?;

        use UsageRollupsPlatform as P;
        manager
            .create_table(
                create_table(backend, P::Table)
                    .col(id(P::Id))
                    .col(big(P::HourMs))
                    .col(varchar(P::Model, 128))
                    .col(counter(P::Requests))
                    .col(counter(P::FailedRequests))
                    .col(counter(P::FallbackRequests))
                    .col(counter(P::PromptTokens))
                    .col(counter(P::CompletionTokens))
                    .col(counter(P::CostCredits))
                    .col(counter(P::PaidCredits))
                    .col(counter(P::SellerCredits))
                    .col(counter(P::PlatformCredits))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_rollups_platform", P::Table, &[P::HourMs, P::Model], true)).await?;

        use Disputes as D;
        manager
            .create_table(
                create_table(backend, D::Table)
                    .col(id(D::Id))
                    .col(big(D::BuyerId))
                    .col(varchar(D::Target, 80))
                    .col(ColumnDef::new(D::OpenTarget).string_len(80).null())
                    .col(ColumnDef::new(D::RequestId).string_len(64).null())
                    .col(big_null(D::EscrowId))
                    .col(varchar(D::Reason, 1000))
                    .col(varchar(D::Status, 16))
                    .col(counter(D::RefundedCredits))
                    .col(ColumnDef::new(D::ResolutionNote).string_len(1000).null())
                    .col(big_null(D::ResolvedBy))
                    .col(big(D::CreatedAtMs))
                    .col(big_null(D::ResolvedAtMs))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ux_disputes_open_target", D::Table, &[D::OpenTarget], true)).await?;
        manager.create_index(index("ix_disputes_buyer", D::Table, &[D::BuyerId, D::Id], false)).await?;
        manager.create_index(index("ix_disputes_status", D::Table, &[D::Status, D::Id], false)).await?;
        manager.create_index(index("ix_disputes_target", D::Table, &[D::Target], false)).await?;

        // Escrow disputes and escrow reports find an escrow's requests by hold. (usage_records by buyer and
        // by key, and journal_entries by time, are indexed since migrations 1 and 2.)
        manager
            .create_index(index("ix_usage_records_hold", UsageRecords::Table, &[UsageRecords::HoldId], false))
            .await?;

        let db = manager.get_connection();
        for sql in backfill() {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name("ix_usage_records_hold").table(UsageRecords::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(Disputes::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(UsageRollupsPlatform::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(UsageRollupsSeller::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(UsageRollupsBuyer::Table).to_owned()).await?;
        Ok(())
    }
}
