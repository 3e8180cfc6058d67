//! Admin commands for newcomers and scripts: the same operations as the admin REST API, without it.
//! Each prints one JSON line on stdout; secrets shown once (a new buyer key) appear only there.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::accounts::{self, NewSellerKey, Role};
use crate::app::{app_runtime, load_keyring, open_database, AppError};
use crate::config::Config;
use crate::ledger::{self, FundsError};
use crate::provider::ProviderClient;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user.
    Create {
        #[arg(long)]
        username: String,
        #[arg(long, env = "TOKEX_NEW_USER_PASSWORD", hide_env_values = true)]
        password: String,
        /// Comma-separated roles: admin, seller, buyer.
        #[arg(long, value_delimiter = ',', default_value = "buyer")]
        roles: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum BuyerKeyCommand {
    /// Issue a new buyer key (printed once).
    Issue {
        #[arg(long)]
        username: String,
        #[arg(long, default_value = "default")]
        name: String,
        /// Comma-separated allow-list of models (default: any model).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Expiry as Unix epoch milliseconds.
        #[arg(long)]
        expires_at_ms: Option<i64>,
    },
}

#[derive(Subcommand)]
pub enum SellerKeyCommand {
    /// Deposit a seller key into the pool. The key is verified against its provider first (its models
    /// listed at <base-url>/models, every declared model among them) unless risk.verify_on_deposit is off
    /// or --skip-verify is given.
    Add(SellerKeyAdd),
}

#[derive(Args)]
pub struct SellerKeyAdd {
    #[arg(long)]
    username: String,
    #[arg(long, default_value = "")]
    name: String,
    /// Provider name, e.g. openai, deepseek, openrouter.
    #[arg(long)]
    provider: String,
    /// OpenAI-compatible base URL including the version path, e.g. https://api.openai.com/v1
    #[arg(long)]
    base_url: String,
    /// Comma-separated models this key serves.
    #[arg(long, value_delimiter = ',', required = true)]
    models: Vec<String>,
    /// The provider API key (prefer the environment variable: command lines are visible to other users).
    #[arg(long, env = "TOKEX_SELLER_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Balance the seller declares for this key, in credits.
    #[arg(long, default_value_t = 0)]
    declared_balance: i64,
    /// Requests the key may serve at once, per gateway node (0: no cap).
    #[arg(long, default_value_t = 0)]
    max_concurrency: i64,
    /// Credits the key may earn per UTC day (0: no cap).
    #[arg(long, default_value_t = 0)]
    max_spend_per_day: i64,
    /// Provider balance API used by the dilution check: deepseek, openrouter, moonshot, siliconflow,
    /// openai_credit_grants or none (default: derived from --provider).
    #[arg(long, default_value = "")]
    balance_api: String,
    /// Deposit without verifying the key against its provider (GET <base-url>/models). For operators
    /// whose provider has no models endpoint: the key, base URL and models are then taken on trust, and a
    /// broken key is found only by the gateway's failure checks. Ignored (nothing to skip) when
    /// risk.verify_on_deposit is off.
    #[arg(long)]
    skip_verify: bool,
}

#[derive(Subcommand)]
pub enum CreditsCommand {
    /// Grant credits to a user's wallet.
    ///
    /// A running gateway sees the new balance at its next periodic pool refresh (pool.refresh_interval_ms,
    /// 10 s by default); grants through the admin REST API apply at once.
    Grant {
        #[arg(long)]
        username: String,
        /// Credits to add (a positive integer).
        #[arg(long)]
        amount: i64,
        #[arg(long)]
        memo: Option<String>,
        /// Makes the grant safe to retry: a second grant with the same key changes nothing (default: a fresh
        /// key, so every run grants).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum PriceCommand {
    /// Set a model's price (a model without a price is not served).
    ///
    /// A running gateway applies it at its next periodic pool refresh (pool.refresh_interval_ms, 10 s by
    /// default); prices set through the admin REST API apply at once.
    Set {
        #[arg(long)]
        model: String,
        /// Credits per million prompt tokens.
        #[arg(long)]
        prompt: i64,
        /// Credits per million completion tokens.
        #[arg(long)]
        completion: i64,
        /// Completion tokens assumed for a request that sets no max_tokens.
        #[arg(long, default_value_t = ledger::DEFAULT_MAX_OUTPUT_TOKENS)]
        max_output_tokens: i64,
    },
    /// List every model's price.
    List,
}

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Verify the ledger's invariants (docs/ledger.md). Exit status: 0 when every invariant holds, 1 when
    /// any is violated (each one is printed), 2 when the check could not run.
    Check,
}

pub fn migrate(config: &Config) -> Result<(), AppError> {
    app_runtime()?.block_on(async {
        open_database(config).await?;
        emit(&json!({"migrated": true}));
        Ok(())
    })
}

pub fn user(config: &Config, command: UserCommand) -> Result<(), AppError> {
    let UserCommand::Create { username, password, roles } = command;
    let roles = roles.iter().map(|r| r.parse::<Role>()).collect::<Result<Vec<_>, _>>()?;
    app_runtime()?.block_on(async {
        let db = open_database(config).await?;
        let user = accounts::create_user(&db, &username, &password, &roles).await?;
        emit(&json!({"id": user.id, "username": user.username, "roles": accounts::roles_of(&user)}));
        Ok(())
    })
}

pub fn buyer_key(config: &Config, command: BuyerKeyCommand) -> Result<(), AppError> {
    let BuyerKeyCommand::Issue { username, name, models, expires_at_ms } = command;
    app_runtime()?.block_on(async {
        let db = open_database(config).await?;
        let user = accounts::find_user(&db, &username).await?;
        let (key, plaintext) = accounts::issue_buyer_key(&db, user.id, &name, models, expires_at_ms).await?;
        emit(&json!({"id": key.id, "key": plaintext.expose()}));
        Ok(())
    })
}

pub fn seller_key(config: &Config, command: SellerKeyCommand) -> Result<(), AppError> {
    let SellerKeyCommand::Add(add) = command;
    app_runtime()?.block_on(async {
        let db = open_database(config).await?;
        let keyring = load_keyring(config)?;
        let user = accounts::find_user(&db, &add.username).await?;
        let policy = config.upstream_policy();
        let client =
            ProviderClient::new(Arc::new(policy.clone()), Duration::from_millis(config.risk.provider_timeout_ms))
                .map_err(|e| AppError::Runtime(format!("provider client: {e}")))?;
        let verify = config.risk.verify_on_deposit && !add.skip_verify;
        let key = accounts::add_seller_key(
            &db,
            &keyring,
            &policy,
            &client,
            verify,
            user.id,
            NewSellerKey {
                name: add.name,
                provider: add.provider,
                base_url: add.base_url,
                models: add.models,
                api_key: add.api_key,
                declared_balance: add.declared_balance,
                max_concurrency: add.max_concurrency,
                max_spend_per_day: add.max_spend_per_day,
                balance_api: add.balance_api,
            },
        )
        .await?;
        emit(&json!({"id": key.id, "key_hint": key.key_hint, "verified_at_ms": key.verified_at_ms}));
        Ok(())
    })
}

pub fn rotate_master_key(config: &Config) -> Result<(), AppError> {
    app_runtime()?.block_on(async {
        let db = open_database(config).await?;
        let keyring = load_keyring(config)?;
        let report = accounts::rotate_master_key(&db, &keyring).await?;
        emit(&json!({"current_kid": keyring.current_kid(), "report": report}));
        if report.undecryptable.is_empty() {
            Ok(())
        } else {
            Err(AppError::MasterKey(format!(
                "{} seller key(s) could not be decrypted with the configured master keys: ids {:?}",
                report.undecryptable.len(),
                report.undecryptable
            )))
        }
    })
}

pub fn credits(config: &Config, command: CreditsCommand) -> Result<(), AppError> {
    let CreditsCommand::Grant { username, amount, memo, idempotency_key } = command;
    app_runtime()?.block_on(async {
        let db = open_database(config).await?;
        let user = accounts::find_user(&db, &username).await?;
        let granted = ledger::grant_credits(&db, user.id, amount, memo, idempotency_key.as_deref(), None)
            .await
            .map_err(funds_error)?;
        emit(&json!({
            "entry_id": granted.entry_id,
            "user_id": granted.user_id,
            "amount": granted.amount,
            "balance": granted.balance,
            "duplicate": granted.duplicate,
        }));
        Ok(())
    })
}

pub fn price(config: &Config, command: PriceCommand) -> Result<(), AppError> {
    app_runtime()?.block_on(async {
        let db = open_database(config).await?;
        match command {
            PriceCommand::Set { model, prompt, completion, max_output_tokens } => {
                let price = ledger::set_price(&db, &model, prompt, completion, Some(max_output_tokens), None)
                    .await
                    .map_err(funds_error)?;
                emit(&json!(price));
            }
            PriceCommand::List => emit(&json!(ledger::list_prices(&db).await.map_err(funds_error)?)),
        }
        Ok(())
    })
}

/// `Ok(true)` when the ledger is sound, `Ok(false)` when a violation was found (and printed).
pub fn ledger(config: &Config, command: LedgerCommand) -> Result<bool, AppError> {
    let LedgerCommand::Check = command;
    app_runtime()?.block_on(async {
        let db = open_database(config).await?;
        let report = ledger::check(&db, config.ledger.hold_stale_ms).await.map_err(funds_error)?;
        emit(&json!(report));
        Ok(report.ok)
    })
}

/// The CLI reports errors by their message; the kinds matter only to the REST API's status codes.
fn funds_error(e: FundsError) -> AppError {
    match e {
        FundsError::Db(e) => AppError::Db(e),
        other => AppError::Funds(other),
    }
}

/// Standard output is this command's interface: one JSON document per command.
#[allow(clippy::print_stdout)]
fn emit(value: &serde_json::Value) {
    println!("{value}");
}
