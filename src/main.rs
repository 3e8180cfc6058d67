//! `token-exchange`: wires the command line to the library. It decides nothing itself.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use token_exchange::cli;
use token_exchange::config::Config;

#[derive(Parser)]
#[command(name = "token-exchange", version, about = "LLM API gateway and token marketplace")]
struct Args {
    /// Configuration file (default: conf/token-exchange.toml when present).
    #[arg(long, global = true, env = "TOKEX_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway, admin and metrics listeners.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage users.
    #[command(subcommand)]
    User(cli::UserCommand),
    /// Manage platform-issued buyer keys.
    #[command(subcommand, name = "buyer-key")]
    BuyerKey(cli::BuyerKeyCommand),
    /// Manage pooled seller keys.
    #[command(subcommand, name = "seller-key")]
    SellerKey(cli::SellerKeyCommand),
    /// Re-encrypt every seller key under TOKEX_MASTER_KEY (old keys in TOKEX_PREVIOUS_MASTER_KEYS).
    RotateMasterKey,
    /// Grant credits.
    #[command(subcommand)]
    Credits(cli::CreditsCommand),
    /// Manage model prices.
    #[command(subcommand)]
    Price(cli::PriceCommand),
    /// Inspect the credits ledger.
    #[command(subcommand)]
    Ledger(cli::LedgerCommand),
}

/// `ledger check`: 0 when sound, 1 on a violation, 2 when the check could not run.
fn check_exit_code(result: Result<bool, token_exchange::app::AppError>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    token_exchange::telemetry::init_logging();
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command {
        Command::Serve => token_exchange::app::serve(config),
        Command::Migrate => cli::migrate(&config),
        Command::User(cmd) => cli::user(&config, cmd),
        Command::BuyerKey(cmd) => cli::buyer_key(&config, cmd),
        Command::SellerKey(cmd) => cli::seller_key(&config, cmd),
        Command::RotateMasterKey => cli::rotate_master_key(&config),
        Command::Credits(cmd) => cli::credits(&config, cmd),
        Command::Price(cmd) => cli::price(&config, cmd),
        Command::Ledger(cmd) => return check_exit_code(cli::ledger(&config, cmd)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
