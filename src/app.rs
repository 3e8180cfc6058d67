//! Wiring: configuration → database → key pool → the three listeners, and an orderly shutdown.
//!
//! Pingora runs the gateway service on its own runtimes. Everything that talks to the database (the pool
//! refresher, the usage writer, the admin API) and the metrics listener run on one separate application
//! runtime, so that they outlive the gateway: after Pingora has drained in-flight requests on SIGTERM, the
//! usage writer still flushes the last records before the process exits.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use crate::config::Config;
use crate::crypto::{self, Keyring};
use crate::health::HealthRegistry;
use crate::pool::{self, RefreshHandle, Refresher, RefresherConfig};
use crate::proxy::{Gateway, GatewaySettings};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("{0}")]
    Accounts(#[from] crate::accounts::AccountError),
    #[error("ledger: {0}")]
    Ledger(#[from] crate::db::ledger::LedgerError),
    #[error("{0}")]
    Funds(#[from] crate::ledger::FundsError),
}

/// A multi-thread runtime for the application side (database, admin, metrics).
pub fn app_runtime() -> Result<tokio::runtime::Runtime, AppError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tokex-app")
        .enable_all()
        .build()
        .map_err(|e| AppError::Runtime(e.to_string()))
}

/// Connects and applies migrations: every entry point that touches the database goes through here.
///
/// The migrations run on a connection of their own that is closed before the pool opens: an SQLite
/// connection that loaded the schema before a migration changed it can prepare a statement against the
/// old schema (e.g. an upsert whose unique index it does not know yet fails with "ON CONFLICT clause does
/// not match any PRIMARY KEY or UNIQUE constraint").
pub async fn open_database(config: &Config) -> Result<DatabaseConnection, AppError> {
    let url = &config.database.url;
    if crate::db::is_in_memory(url) {
        // One connection that must stay open: it is the database.
        let db = crate::db::connect(url, 1).await?;
        crate::db::migrate(&db).await?;
        return Ok(db);
    }
    let migrator = crate::db::connect(url, 1).await?;
    crate::db::migrate(&migrator).await?;
    migrator.close().await?;
    Ok(crate::db::connect(url, config.database.max_connections).await?)
}

/// The master key comes from `TOKEX_MASTER_KEY`, else from the key file. Only on the embedded default is a
/// missing key generated (with a warning); a shared MySQL database must never get a node-local key.
pub fn load_keyring(config: &Config) -> Result<Keyring, AppError> {
    let previous = match std::env::var("TOKEX_PREVIOUS_MASTER_KEYS") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|k| {
                crypto::parse_master_key(k).map_err(|e| AppError::MasterKey(format!("TOKEX_PREVIOUS_MASTER_KEYS: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Err(_) => Vec::new(),
    };
    if let Ok(value) = std::env::var("TOKEX_MASTER_KEY") {
        let key = crypto::parse_master_key(value.trim())
            .map_err(|e| AppError::MasterKey(format!("TOKEX_MASTER_KEY: {e}")))?;
        return Ok(Keyring::new(key, previous));
    }
    let path = config.master_key_path();
    if path.exists() {
        let text =
            std::fs::read_to_string(&path).map_err(|e| AppError::MasterKey(format!("{}: {e}", path.display())))?;
        let key = crypto::parse_master_key(text.trim())
            .map_err(|e| AppError::MasterKey(format!("{}: {e}", path.display())))?;
        return Ok(Keyring::new(key, previous));
    }
    if !config.is_embedded_database() {
        return Err(AppError::MasterKey(format!(
            "no master key: set TOKEX_MASTER_KEY (base64 of 32 bytes) or create {} — every node sharing this database needs the same key",
            path.display()
        )));
    }
    let key = crypto::generate_master_key();
    write_key_file(&path, &base64::engine::general_purpose::STANDARD.encode(key))?;
    tracing::warn!(
        path = %path.display(),
        "generated a new master key for the embedded database; back it up — seller keys cannot be decrypted without it"
    );
    Ok(Keyring::new(key, previous))
}

fn write_key_file(path: &Path, contents: &str) -> Result<(), AppError> {
    use std::io::Write;
    let err = |e: std::io::Error| AppError::MasterKey(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.write_all(b"\n").map_err(err)
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, AppError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| AppError::Listen { addr: addr.into(), source })
}

/// `token-exchange serve`: runs until SIGTERM (graceful) or SIGINT (fast).
pub fn serve(config: Config) -> Result<(), AppError> {
    let rt = app_runtime()?;
    // Build the tokenizer tables now, not inside the first request that needs a local count.
    rt.spawn_blocking(crate::openai::tokens::warm_up);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let (gateway, background, funds, usage_sink) = rt.block_on(async {
        let db = open_database(&config).await?;
        let keyring = Arc::new(load_keyring(&config)?);
        if let Some(password) =
            crate::accounts::ensure_admin(&db, std::env::var("TOKEX_ADMIN_PASSWORD").ok().as_deref()).await?
        {
            // Shown once, on the terminal of whoever started the first node; never logged.
            eprintln!("\n  Created the admin user. Username: admin  Password: {password}\n  (set TOKEX_ADMIN_PASSWORD to choose it)\n");
        }

        let shared_pool = pool::empty_shared_pool();
        // One per node, for the node's lifetime: every snapshot's keys share their health through it.
        let health = Arc::new(HealthRegistry::new(&config.routing));
        let mut refresher = Refresher::new(
            db.clone(),
            keyring.clone(),
            shared_pool.clone(),
            Duration::from_millis(config.pool.dns_refresh_interval_ms),
            config.upstream_policy(),
            health.clone(),
            Duration::from_millis(config.pool.full_refresh_interval_ms),
        );
        // The gateway never serves from an empty pool: the first load happens before any listener opens.
        refresher.refresh().await?;

        let (usage_sink, usage_writers) = crate::usage::channel(
            db.clone(),
            config.usage.queue_capacity,
            config.usage.batch_size,
            Duration::from_millis(config.usage.flush_interval_ms),
            config.ledger.platform_fee_bps,
            config.usage.writers,
        );
        let funds = crate::billing::Funds::new(
            db.clone(),
            tokio::runtime::Handle::current(),
            crate::billing::FundsSettings {
                node_id: node_id(&config),
                block_factor: config.ledger.hold_block_factor,
                idle: Duration::from_millis(config.ledger.hold_idle_ms),
            },
        );
        tracing::info!(node_id = funds.node_id(), "ledger node id");
        close_previous_holds(&db, funds.node_id()).await?;
        let refresh = RefreshHandle::default();

        let upstream_policy = Arc::new(config.upstream_policy());
        let provider = Arc::new(
            crate::provider::ProviderClient::new(
                upstream_policy.clone(),
                Duration::from_millis(config.risk.provider_timeout_ms),
            )
            .map_err(|e| AppError::Runtime(format!("provider client: {e}")))?,
        );
        let admin_listener = bind(&config.admin.listen).await?;
        let metrics_listener = bind(&config.metrics.listen).await?;
        let admin_state = crate::admin::AdminState {
            db: db.clone(),
            keyring: keyring.clone(),
            refresh: refresh.clone(),
            session_ttl_ms: i64::try_from(config.admin.session_ttl_hours).unwrap_or(24).saturating_mul(3_600_000),
            ledger: config.ledger.clone(),
            upstream_policy: upstream_policy.clone(),
            provider: provider.clone(),
            risk: config.risk.clone(),
        };

        let mut background: Vec<_> =
            usage_writers.into_iter().map(|writer| tokio::spawn(writer.run(shutdown_rx.clone()))).collect();
        background.extend([
            tokio::spawn(refresher.run(
                refresh.clone(),
                RefresherConfig {
                    interval: Duration::from_millis(config.pool.refresh_interval_ms),
                    redis_url: config.redis.url.clone(),
                },
                shutdown_rx.clone(),
            )),
            tokio::spawn(serve_admin_when_ready(
                admin_listener,
                crate::admin::router(admin_state),
                config.gateway.listen.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(serve_http(metrics_listener, metrics_router(), shutdown_rx.clone())),
            tokio::spawn(crate::risk::run(
                crate::risk::RiskContext {
                    db: db.clone(),
                    keyring: keyring.clone(),
                    config: config.risk.clone(),
                    provider: provider.clone(),
                    refresh: refresh.clone(),
                    inflight: {
                        let health = health.clone();
                        Arc::new(move |key_id| health.inflight_credits(key_id))
                    },
                },
                shutdown_rx.clone(),
            )),
            tokio::spawn(health.clone().run_gauge(shutdown_rx.clone())),
            tokio::spawn(crate::billing::maintenance(
                db.clone(),
                funds.clone(),
                usage_sink.clone(),
                refresh.clone(),
                config.ledger.clone(),
                shutdown_rx.clone(),
            )),
        ]);
        let gateway = Gateway::new(
            shared_pool,
            usage_sink.clone(),
            funds.clone(),
            health,
            GatewaySettings::from_config(&config.gateway),
        );
        Ok::<_, AppError>((gateway, background, funds, usage_sink))
    })?;

    let server_conf = ServerConf {
        threads: config.gateway.threads,
        grace_period_seconds: Some(config.gateway.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(5),
        // Work stealing: with one single-threaded runtime per thread, ~2 % of requests failed to take a
        // pooled upstream connection back ("failed to acquire reusable stream": the connection's idle
        // watch still ran on the other thread) and opened a new one, which made the non-stream p99 at one
        // connection +1.4 ms over the bare proxy; stealing runtimes have none of those failures and +0.5 to
        // +0.8 ms (bench, issue 6). Throughput: non-stream the same, stream 9 % lower in one A/B round
        // (this machine's noise is ±20 %).
        work_stealing: true,
        // Every pass of the retry loop is one attempt of a direct call (src/proxy/call.rs): each key may
        // be tried twice (a stale pooled connection), seller keys then fallback keys, plus the pass that
        // finds no key left.
        max_retries: (config.gateway.max_attempts * 4 + 1).max(16),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "gateway");
    proxy.add_tcp(&config.gateway.listen);
    server.add_service(proxy);
    tracing::info!(
        gateway = %config.gateway.listen,
        admin = %config.admin.listen,
        metrics = %config.metrics.listen,
        "token-exchange is serving"
    );
    // Blocks until a shutdown signal; returns after in-flight gateway requests drained.
    server.run(RunArgs::default());

    tracing::info!("gateway stopped; flushing usage records");
    // No request runs any more: every hold can be closed once the settlements queued before are written.
    if !usage_sink.close_holds(funds.retire_all()) {
        tracing::warn!("the usage queue is full; open holds are left to the stale-hold recovery");
    }
    drop(usage_sink);
    let _ = shutdown_tx.send(true);
    rt.block_on(async {
        for task in background {
            if tokio::time::timeout(Duration::from_secs(15), task).await.is_err() {
                tracing::error!("a background task did not stop in time");
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// This node's name in the holds it opens (`ledger.node_id`, else `<hostname>:<gateway port>`): two running
/// nodes cannot listen on one host and port, and a restarted node finds its previous run's holds.
fn node_id(config: &Config) -> String {
    if !config.ledger.node_id.is_empty() {
        return config.ledger.node_id.clone();
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')).take(48).collect();
    let port = config.gateway.listen.rsplit(':').next().unwrap_or("0");
    format!("{host}:{port}")
}

/// Returns what an earlier run of this node still held (a crash or SIGKILL leaves holds open); the
/// requests it had in flight were never settled, so their reservations go back to the buyers.
async fn close_previous_holds(db: &sea_orm::DatabaseConnection, node_id: &str) -> Result<(), AppError> {
    let previous = crate::db::ledger::open_holds_of_node(db, node_id).await?;
    for hold in previous {
        let returned = crate::db::ledger::close_hold(db, hold.id, crate::now_ms()).await?;
        tracing::info!(hold_id = hold.id, returned, "returned a hold left open by this node's previous run");
    }
    Ok(())
}

/// `/healthz` on the admin port is what load balancers and orchestrators poll, so it must not answer
/// before the gateway port does. The admin socket is bound early (a port conflict fails the start), but
/// it serves only once the gateway listener, which Pingora opens on its own runtime, accepts connections.
async fn serve_admin_when_ready(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    gateway_addr: String,
    shutdown: watch::Receiver<bool>,
) {
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(&gateway_addr).await.is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            tracing::error!(gateway = %gateway_addr, "the gateway port does not accept connections; serving the admin API anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve_http(listener, router, shutdown).await;
}

async fn serve_http(listener: tokio::net::TcpListener, router: axum::Router, mut shutdown: watch::Receiver<bool>) {
    let stop = async move {
        while shutdown.changed().await.is_ok() {
            if *shutdown.borrow() {
                return;
            }
        }
    };
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop).await {
        tracing::error!(error = %e, "HTTP listener failed");
    }
}

fn metrics_router() -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::render())
        }),
    )
}
