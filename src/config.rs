//! The one validated configuration type, built in three layers: built-in defaults, then the TOML file,
//! then `TOKEX_<SECTION>_<KEY>` environment variables. Only this module knows how settings are spelled.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variables that carry secrets or select the file; they are not `<SECTION>_<KEY>` settings.
const NON_SETTING_VARS: &[&str] = &[
    "TOKEX_CONFIG",
    "TOKEX_MASTER_KEY",
    "TOKEX_PREVIOUS_MASTER_KEYS",
    "TOKEX_ADMIN_PASSWORD",
    "TOKEX_SELLER_API_KEY",
    "TOKEX_NEW_USER_PASSWORD",
    "TOKEX_LOG",
];

pub const DEFAULT_CONFIG_PATH: &str = "conf/token-exchange.toml";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the embedded database and the generated master key.
    pub data_dir: PathBuf,
    pub gateway: GatewayConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub security: SecurityConfig,
    pub pool: PoolConfig,
    pub usage: UsageConfig,
    pub ledger: LedgerConfig,
    pub routing: RoutingConfig,
    pub risk: RiskConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: String,
    /// Pingora worker threads for the gateway service.
    pub threads: usize,
    /// Request bodies above this size are refused with 413 (the body is held in memory to be replayed on failover).
    pub max_body_bytes: usize,
    /// Seller keys tried per request before answering 502.
    pub max_attempts: usize,
    pub connect_timeout_ms: u64,
    /// Longest silence from the upstream before the attempt fails (slow streams stay alive while they send).
    pub read_timeout_ms: u64,
    pub write_timeout_ms: u64,
    /// Non-stream response bodies are parsed for usage up to this size; larger ones are estimated.
    pub max_metered_response_bytes: usize,
    /// Seconds a draining node keeps serving in-flight requests after SIGTERM.
    pub grace_period_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: String,
    pub session_ttl_hours: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://path` (created on first start) or `mysql://user:pass@host:port/db`.
    pub url: String,
    pub max_connections: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Empty: single node. Set it when several gateway nodes share one database, so that an admin change
    /// on one node refreshes the pool on all of them at once.
    pub url: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// File holding the base64 master key when `TOKEX_MASTER_KEY` is not set. Relative to `data_dir`.
    pub master_key_file: String,
    /// Internal networks seller base URLs may reach nonetheless (comma-separated addresses or CIDR
    /// networks, e.g. "127.0.0.0/8,::1" for a local mock). Empty: only public addresses.
    pub upstream_allow: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub refresh_interval_ms: u64,
    /// How often a refresh reads every key row; the refreshes in between read only the rows changed since
    /// the previous one. A deleted row is noticed at once either way (by the row count).
    pub full_refresh_interval_ms: u64,
    /// How often seller base URLs are resolved again (DNS is never resolved on the request path).
    pub dns_refresh_interval_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    /// Records per settlement transaction: a batch costs a few dozen round trips whatever its size, so
    /// larger batches settle more records per second (on MariaDB, 2,000 settle 1.2 times as many as 500 on
    /// an idle machine, 1.5 times while other work competes for the cores: bench/settlement/results.md).
    pub batch_size: usize,
    pub flush_interval_ms: u64,
    /// Records queued beyond this are counted as dropped rather than stalling the gateway.
    pub queue_capacity: usize,
    /// Writers settling in parallel, each for its share of the buyers (on its own database connection).
    pub writers: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// This node's name in the holds it opens; unique among running nodes, stable across restarts (a
    /// restarted node closes what its previous run left open). Empty: `<hostname>:<gateway port>`.
    pub node_id: String,
    /// The platform's share of each settled request, in basis points (500 = 5 %).
    pub platform_fee_bps: u32,
    /// A hold opened for a request takes this many times the request's worst case, so that the next
    /// requests are reserved in memory (up to 64 times more for a source whose holds run out fast).
    pub hold_block_factor: u32,
    /// An unused hold is closed after this long (its rest goes back to its source).
    pub hold_idle_ms: u64,
    /// Open holds are marked alive this often.
    pub hold_renew_ms: u64,
    /// A hold not renewed for this long belongs to a dead node and is closed by any node.
    pub hold_stale_ms: u64,
    /// Escrows expire after this many days unless the buyer sets another expiry.
    pub escrow_default_days: u32,
    /// How often expired escrows and stale holds are looked for.
    pub maintenance_interval_ms: u64,
}

/// How keys are chosen: health moving averages, rate-limit cooldowns and circuit breakers (per node).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Weight of the newest observation in the success-rate and TTFT moving averages, per mille.
    pub ewma_weight_permille: u32,
    /// A key whose time to first token averages this long keeps half of its selection weight.
    pub latency_reference_ms: u64,
    /// Consecutive failed requests on one key that open its circuit.
    pub circuit_failures: u32,
    /// How long an open circuit stays open before one probe request may try the key (doubles after a
    /// failed probe, up to `circuit_max_open_ms`).
    pub circuit_open_ms: u64,
    pub circuit_max_open_ms: u64,
    /// Cooldown after a 429 without a usable Retry-After.
    pub cooldown_default_ms: u64,
    /// Longest Retry-After honoured.
    pub cooldown_max_ms: u64,
}

/// Seller key verification and risk control: dilution, failure-rate and depletion checks, webhooks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RiskConfig {
    /// Run the scheduled checks on this node (several nodes share them: each check is claimed by one).
    pub enabled: bool,
    /// Verify a deposited key against its provider (list models) and refuse what does not work.
    pub verify_on_deposit: bool,
    /// Each key's balance/dilution and failure-rate check runs this often.
    pub check_interval_ms: u64,
    /// A key is flagged when its provider balance fell by more than our metered use plus this share of it,
    /// in basis points (1500 = 15 %).
    pub dilution_threshold_bps: u32,
    /// ...and by more than this many credits (provider rounding and reporting lag stay below it).
    pub dilution_min_excess_credits: i64,
    /// Failure share over a check window that pauses a key, in basis points.
    pub failure_pause_bps: u32,
    /// Attempts a window needs before its failure share counts.
    pub failure_min_attempts: u32,
    /// Keys paused by risk control (not by their seller) are verified again this often and resumed when
    /// they work.
    pub reverify_interval_ms: u64,
    /// Timeout of calls to provider APIs (verification, balance) and webhooks.
    pub provider_timeout_ms: u64,
    /// Provider balances are converted to credits at these rates.
    pub credits_per_usd: i64,
    pub credits_per_cny: i64,
    /// Attempts to deliver one notification to a webhook before giving up on it.
    pub webhook_max_attempts: u32,
    /// A balance window is judged this long after its reading, once the usage records of requests that
    /// finished before it are written.
    pub settle_delay_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            gateway: GatewayConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            security: SecurityConfig::default(),
            pool: PoolConfig::default(),
            usage: UsageConfig::default(),
            ledger: LedgerConfig::default(),
            routing: RoutingConfig::default(),
            risk: RiskConfig::default(),
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            ewma_weight_permille: 200,
            latency_reference_ms: 2_000,
            circuit_failures: 5,
            circuit_open_ms: 30_000,
            circuit_max_open_ms: 600_000,
            cooldown_default_ms: 10_000,
            cooldown_max_ms: 600_000,
        }
    }
}

impl Default for RiskConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            verify_on_deposit: true,
            check_interval_ms: 300_000,
            dilution_threshold_bps: 1_500,
            dilution_min_excess_credits: 10_000,
            failure_pause_bps: 8_000,
            failure_min_attempts: 20,
            reverify_interval_ms: 900_000,
            provider_timeout_ms: 10_000,
            credits_per_usd: 1_000_000,
            credits_per_cny: 140_000,
            webhook_max_attempts: 8,
            settle_delay_ms: 5_000,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            threads: 2,
            max_body_bytes: 16 * 1024 * 1024,
            max_attempts: 3,
            connect_timeout_ms: 5_000,
            read_timeout_ms: 600_000,
            write_timeout_ms: 30_000,
            max_metered_response_bytes: 8 * 1024 * 1024,
            grace_period_secs: 20,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8081".into(), session_ttl_hours: 24 }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9090".into() }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: "sqlite://data/token-exchange.db".into(), max_connections: 10 }
    }
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self { master_key_file: "master.key".into(), upstream_allow: String::new() }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self { refresh_interval_ms: 10_000, full_refresh_interval_ms: 60_000, dns_refresh_interval_ms: 60_000 }
    }
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self { batch_size: 2_000, flush_interval_ms: 200, queue_capacity: 100_000, writers: 2 }
    }
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            platform_fee_bps: 500,
            hold_block_factor: 20,
            hold_idle_ms: 30_000,
            hold_renew_ms: 60_000,
            hold_stale_ms: 300_000,
            escrow_default_days: 30,
            maintenance_interval_ms: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid setting {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

impl Config {
    /// Loads the configuration. An explicit path must exist; without one, `conf/token-exchange.toml` is
    /// used when present, so that `token-exchange serve` works from the repository with no arguments.
    pub fn load(explicit_path: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match explicit_path {
            Some(path) => Some(read_file(path)?),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => Some(read_file(Path::new(DEFAULT_CONFIG_PATH))?),
            None => None,
        };
        let vars: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("TOKEX_")).collect();
        Self::from_layers(file.as_ref().map(|(p, t)| (p.as_str(), t.as_str())), &vars)
    }

    /// Builds the configuration from a file's text (with its name, for errors) and `TOKEX_` variables.
    pub fn from_layers(file: Option<(&str, &str)>, vars: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let defaults = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Parse { path: "<defaults>".into(), message: e.to_string() })?;
        let mut merged = defaults.clone();
        if let Some((path, text)) = file {
            let parsed: toml::Value = text
                .parse::<toml::Table>()
                .map(toml::Value::Table)
                .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
            merge(&mut merged, parsed);
        }
        for (var, value) in vars {
            if NON_SETTING_VARS.contains(&var.as_str()) {
                continue;
            }
            apply_env(&defaults, &mut merged, var, value)?;
        }
        let config: Config = merged.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: file.map(|(p, _)| p).unwrap_or("<environment>").into(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (field, addr) in [
            ("gateway.listen", &self.gateway.listen),
            ("admin.listen", &self.admin.listen),
            ("metrics.listen", &self.metrics.listen),
        ] {
            addr.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                field,
                message: format!("{addr:?} is not an ip:port address ({e})"),
            })?;
        }
        let positive = [
            ("gateway.threads", self.gateway.threads as u64),
            ("gateway.max_body_bytes", self.gateway.max_body_bytes as u64),
            ("gateway.max_attempts", self.gateway.max_attempts as u64),
            ("gateway.connect_timeout_ms", self.gateway.connect_timeout_ms),
            ("gateway.read_timeout_ms", self.gateway.read_timeout_ms),
            ("gateway.write_timeout_ms", self.gateway.write_timeout_ms),
            ("database.max_connections", u64::from(self.database.max_connections)),
            ("pool.refresh_interval_ms", self.pool.refresh_interval_ms),
            ("pool.full_refresh_interval_ms", self.pool.full_refresh_interval_ms),
            ("pool.dns_refresh_interval_ms", self.pool.dns_refresh_interval_ms),
            ("usage.batch_size", self.usage.batch_size as u64),
            ("usage.flush_interval_ms", self.usage.flush_interval_ms),
            ("usage.writers", self.usage.writers as u64),
            ("usage.queue_capacity", self.usage.queue_capacity as u64),
            ("ledger.hold_block_factor", u64::from(self.ledger.hold_block_factor)),
            ("ledger.hold_idle_ms", self.ledger.hold_idle_ms),
            ("ledger.hold_renew_ms", self.ledger.hold_renew_ms),
            ("ledger.hold_stale_ms", self.ledger.hold_stale_ms),
            ("ledger.escrow_default_days", u64::from(self.ledger.escrow_default_days)),
            ("ledger.maintenance_interval_ms", self.ledger.maintenance_interval_ms),
            ("routing.ewma_weight_permille", u64::from(self.routing.ewma_weight_permille)),
            ("routing.latency_reference_ms", self.routing.latency_reference_ms),
            ("routing.circuit_failures", u64::from(self.routing.circuit_failures)),
            ("routing.circuit_open_ms", self.routing.circuit_open_ms),
            ("routing.circuit_max_open_ms", self.routing.circuit_max_open_ms),
            ("routing.cooldown_default_ms", self.routing.cooldown_default_ms),
            ("routing.cooldown_max_ms", self.routing.cooldown_max_ms),
            ("risk.check_interval_ms", self.risk.check_interval_ms),
            ("risk.failure_min_attempts", u64::from(self.risk.failure_min_attempts)),
            ("risk.reverify_interval_ms", self.risk.reverify_interval_ms),
            ("risk.provider_timeout_ms", self.risk.provider_timeout_ms),
            ("risk.credits_per_usd", u64::try_from(self.risk.credits_per_usd).unwrap_or(0)),
            ("risk.credits_per_cny", u64::try_from(self.risk.credits_per_cny).unwrap_or(0)),
            ("risk.webhook_max_attempts", u64::from(self.risk.webhook_max_attempts)),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid { field, message: "must be greater than 0".into() });
            }
        }
        if let Err(message) = crate::ssrf::UpstreamPolicy::parse(&self.security.upstream_allow) {
            return Err(ConfigError::Invalid { field: "security.upstream_allow", message });
        }
        if self.usage.writers >= self.database.max_connections as usize {
            // Each writer holds a connection for its batch: the pool refresher, hold top-ups and the admin
            // API need the others.
            return Err(ConfigError::Invalid {
                field: "usage.writers",
                message: format!("must be below database.max_connections ({})", self.database.max_connections),
            });
        }
        if self.ledger.node_id.len() > 64 {
            return Err(ConfigError::Invalid { field: "ledger.node_id", message: "at most 64 characters".into() });
        }
        if self.ledger.platform_fee_bps > 10_000 {
            return Err(ConfigError::Invalid {
                field: "ledger.platform_fee_bps",
                message: "must be at most 10000 (100 %)".into(),
            });
        }
        if self.routing.ewma_weight_permille > 1_000 {
            return Err(ConfigError::Invalid {
                field: "routing.ewma_weight_permille",
                message: "must be at most 1000".into(),
            });
        }
        if self.routing.circuit_max_open_ms < self.routing.circuit_open_ms {
            return Err(ConfigError::Invalid {
                field: "routing.circuit_max_open_ms",
                message: "must be at least routing.circuit_open_ms".into(),
            });
        }
        if self.risk.failure_pause_bps == 0 || self.risk.failure_pause_bps > 10_000 {
            return Err(ConfigError::Invalid {
                field: "risk.failure_pause_bps",
                message: "must be between 1 and 10000".into(),
            });
        }
        if self.risk.dilution_min_excess_credits < 0 {
            return Err(ConfigError::Invalid {
                field: "risk.dilution_min_excess_credits",
                message: "must not be negative".into(),
            });
        }
        if self.ledger.hold_stale_ms <= self.ledger.hold_renew_ms {
            return Err(ConfigError::Invalid {
                field: "ledger.hold_stale_ms",
                message: "must be longer than ledger.hold_renew_ms".into(),
            });
        }
        if !(self.database.url.starts_with("sqlite:") || self.database.url.starts_with("mysql://")) {
            return Err(ConfigError::Invalid {
                field: "database.url",
                message: "must start with sqlite: or mysql://".into(),
            });
        }
        if !self.redis.url.is_empty() && !self.redis.url.starts_with("redis://") {
            return Err(ConfigError::Invalid { field: "redis.url", message: "must start with redis://".into() });
        }
        Ok(())
    }

    pub fn is_embedded_database(&self) -> bool {
        self.database.url.starts_with("sqlite:")
    }

    /// Where seller base URLs may point (validated at load, so this cannot fail afterwards).
    pub fn upstream_policy(&self) -> crate::ssrf::UpstreamPolicy {
        crate::ssrf::UpstreamPolicy::parse(&self.security.upstream_allow).unwrap_or_default()
    }

    pub fn master_key_path(&self) -> PathBuf {
        self.data_dir.join(&self.security.master_key_file)
    }
}

fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: name.clone(), source })?;
    Ok((name, text))
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(base), toml::Value::Table(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// `TOKEX_GATEWAY_MAX_BODY_BYTES` → `[gateway] max_body_bytes`; `TOKEX_DATA_DIR` → top-level `data_dir`.
/// The defaults tell which names exist and what type each value has, so a typo is an error, not a no-op.
fn apply_env(defaults: &toml::Value, merged: &mut toml::Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let env_err = |message: String| ConfigError::Env { var: var.into(), message };
    let name = var.trim_start_matches("TOKEX_").to_ascii_lowercase();
    let (Some(defaults), Some(merged)) = (defaults.as_table(), merged.as_table_mut()) else {
        return Err(env_err("configuration is not a table".into()));
    };
    let (table_default, table_merged, key) = match defaults.get(&name) {
        Some(value) if !value.is_table() => (defaults, merged, name),
        _ => {
            let Some((section, key)) = name.split_once('_') else {
                return Err(env_err("unknown setting".into()));
            };
            match (defaults.get(section).and_then(|v| v.as_table()), merged.get_mut(section)) {
                (Some(d), Some(toml::Value::Table(m))) => (d, m, key.to_string()),
                _ => return Err(env_err("unknown setting".into())),
            }
        }
    };
    let Some(template) = table_default.get(&key) else {
        return Err(env_err("unknown setting".into()));
    };
    let value = match template {
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| env_err(format!("expected an integer, got {raw:?}")))?)
        }
        toml::Value::Boolean(_) => toml::Value::Boolean(
            raw.trim().parse().map_err(|_| env_err(format!("expected true or false, got {raw:?}")))?,
        ),
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        _ => return Err(env_err("this setting cannot be set from the environment".into())),
    };
    table_merged.insert(key, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn shipped_config_file_is_valid_and_documents_the_defaults() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/token-exchange.toml")).unwrap();
        let config = Config::from_layers(Some(("conf/token-exchange.toml", &text)), &BTreeMap::new()).unwrap();
        assert_eq!(config, Config::default(), "conf/token-exchange.toml must state exactly the built-in defaults");
        // Every setting is written out in the file, so the file is the complete reference.
        let file: toml::Table = text.parse().unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for (section, value) in defaults.as_table().unwrap() {
            match value.as_table() {
                Some(keys) => {
                    for key in keys.keys() {
                        assert!(
                            file.get(section).and_then(|s| s.get(key)).is_some(),
                            "{section}.{key} is not in the file"
                        );
                    }
                }
                None => assert!(file.contains_key(section), "{section} is not in the file"),
            }
        }
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        let file = "[gateway]\nlisten = \"127.0.0.1:7000\"\nmax_attempts = 5\n";
        let env = vars(&[
            ("TOKEX_GATEWAY_MAX_ATTEMPTS", "2"),
            ("TOKEX_DATABASE_URL", "mysql://root@127.0.0.1:3306/x"),
            ("TOKEX_DATA_DIR", "/tmp/d"),
            ("TOKEX_MASTER_KEY", "ignored-here"),
        ]);
        let config = Config::from_layers(Some(("f", file)), &env).unwrap();
        assert_eq!(config.gateway.listen, "127.0.0.1:7000");
        assert_eq!(config.gateway.max_attempts, 2);
        assert_eq!(config.database.url, "mysql://root@127.0.0.1:3306/x");
        assert_eq!(config.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(config.admin, AdminConfig::default());
    }

    #[test]
    fn mistakes_are_errors_not_silent_defaults() {
        let unknown_var = Config::from_layers(None, &vars(&[("TOKEX_GATEWAY_MAX_ATTEMPT", "2")]));
        assert!(matches!(unknown_var, Err(ConfigError::Env { .. })));
        let bad_int = Config::from_layers(None, &vars(&[("TOKEX_GATEWAY_MAX_ATTEMPTS", "two")]));
        assert!(matches!(bad_int, Err(ConfigError::Env { .. })));
        let unknown_key = Config::from_layers(Some(("f", "[gateway]\nlisten_addr = \"x\"\n")), &BTreeMap::new());
        assert!(matches!(unknown_key, Err(ConfigError::Parse { .. })));
        let bad_addr = Config::from_layers(None, &vars(&[("TOKEX_ADMIN_LISTEN", "localhost")]));
        assert!(matches!(bad_addr, Err(ConfigError::Invalid { field: "admin.listen", .. })));
        let zero = Config::from_layers(None, &vars(&[("TOKEX_GATEWAY_MAX_ATTEMPTS", "0")]));
        assert!(matches!(zero, Err(ConfigError::Invalid { .. })));
        let writers = vars(&[("TOKEX_USAGE_WRITERS", "4"), ("TOKEX_DATABASE_MAX_CONNECTIONS", "4")]);
        let too_many = Config::from_layers(None, &writers);
        assert!(matches!(too_many, Err(ConfigError::Invalid { field: "usage.writers", .. })));
    }
}
