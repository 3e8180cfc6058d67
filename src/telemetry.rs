//! Logging set-up: `tracing` to stderr, filtered by `TOKEX_LOG` (default `info`). Pingora's `log` records
//! are bridged into the same output.

use std::io::IsTerminal;

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
