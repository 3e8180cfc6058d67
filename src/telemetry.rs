//! Logging set-up: `tracing` to stderr, filtered by `TOKEX_LOG` (default `info`). Pingora's `log` records
//! are bridged into the same output, never below info (see below).

use std::io::IsTerminal;

pub fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("TOKEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Pingora logs whole request headers (the buyer's key) at trace level and response bodies at debug
    // level; whatever TOKEX_LOG asks for, its modules stay at info.
    for directive in ["pingora_core=info", "pingora_proxy=info", "pingora=info"] {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
