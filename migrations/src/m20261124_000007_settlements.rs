//! Settlements in batches: the usage writer posts one `settle` journal entry per batch, with one posting per
//! account (summed over the batch's requests), instead of an entry and three or four postings per request.
//! What each request paid, and to whom, is kept in `settlements`, one narrow row per settled request keyed
//! by its request id: that key makes settling idempotent, and refunds, disputes, seller reports and
//! `ledger check` read the per-request amounts from it (docs/ledger.md).
//!
//! The per-request `settle` entries written before are backfilled into `settlements` (each is its own
//! entry). Rolling back refuses once an entry settles several requests: the schema before this migration
//! has no place for a request's share of such an entry.

use sea_orm_migration::prelude::*;

use crate::columns::{big, big_null, create_table, varchar};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000007_settlements"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Settlements {
    Table,
    /// The settled request (`usage_records.request_id`).
    RequestId,
    /// The `settle` journal entry that moved the credits (shared by the requests of one batch).
    EntryId,
    /// Paid by the buyer (from the hold, and from the hold's source for an overrun).
    Paid,
    /// Credited to the seller's wallet (`seller_account_id`); 0 for a platform key.
    Seller,
    /// Credited to the platform's revenue account.
    Platform,
    SellerAccountId,
    CreatedAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        manager
            .create_table(
                create_table(backend, Settlements::Table)
                    .col(varchar(Settlements::RequestId, 40).primary_key())
                    .col(big(Settlements::EntryId))
                    .col(big(Settlements::Paid))
                    .col(big(Settlements::Seller))
                    .col(big(Settlements::Platform))
                    .col(big_null(Settlements::SellerAccountId))
                    .col(big(Settlements::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        // Each earlier `settle` entry settled one request: its debits are what the buyer paid, its credit
        // to the revenue account the platform's share, its credit to a wallet the seller's.
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO settlements (request_id, entry_id, paid, seller, platform, seller_account_id, \
                 created_at_ms) \
                 SELECT e.request_id, e.id, \
                 COALESCE(SUM(CASE WHEN p.amount < 0 THEN -p.amount ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN p.amount > 0 AND a.kind = 'wallet' THEN p.amount ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN p.amount > 0 AND a.kind = 'revenue' THEN p.amount ELSE 0 END), 0), \
                 MAX(CASE WHEN p.amount > 0 AND a.kind = 'wallet' THEN p.account_id END), e.created_at_ms \
                 FROM journal_entries e LEFT JOIN postings p ON p.entry_id = e.id \
                 LEFT JOIN accounts a ON a.id = p.account_id \
                 WHERE e.kind = 'settle' AND e.request_id IS NOT NULL \
                 GROUP BY e.id, e.request_id, e.created_at_ms",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        let shared = db
            .query_one(sea_orm_migration::sea_orm::Statement::from_string(
                backend,
                "SELECT COUNT(*) AS n FROM journal_entries WHERE kind = 'settle' AND request_id IS NULL",
            ))
            .await?
            .map(|row| row.try_get::<i64>("", "n"))
            .transpose()?
            .unwrap_or(0);
        if shared > 0 {
            return Err(DbErr::Migration(format!(
                "cannot roll back m20261124_000007_settlements: {shared} settle entries settle several requests \
                 each, and the schema before it keeps one entry per request"
            )));
        }
        manager.drop_table(Table::drop().table(Settlements::Table).to_owned()).await
    }
}
