//! Building a [`PoolSnapshot`] from database rows: decrypting seller keys, parsing base URLs and resolving
//! their hosts (in the background refresher, never on the request path).
//!
//! A reload is full (every key row) or incremental (only the rows whose `pool_changed_at_ms` moved since
//! the previous load, laid over the previous snapshot's rows). Either way a row whose columns and upstream
//! are unchanged keeps its entry as it is: a reload decrypts and allocates only what changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use sea_orm::{DatabaseConnection, DbErr};

use super::{BuyerKey, FallbackRoute, ModelRoute, PoolSnapshot, SellerKey, StatusCounts, Upstream};
use crate::billing::{BuyerFunds, EscrowFunds, Price};
use crate::crypto::Keyring;
use crate::db::entities::buyer_keys;
use crate::db::hosted_keys::PoolRow;
use crate::health::{HealthAttacher, HealthRegistry};

/// Which rows a reload reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Every key row: catches deleted rows and anything an incremental reload could miss.
    Full,
    /// The rows whose pool columns changed at or after this time (ms), over the previous snapshot.
    ChangedSince(i64),
}

/// What a load did and skipped, so that the refresher can log it once per key rather than per request.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// (key id, reason) of active keys that could not be routed, among the rows this load built.
    pub unroutable: Vec<(i64, String)>,
    /// Whether every row was read (an incremental reload turns full when it finds rows deleted or an
    /// upstream address changed).
    pub full: bool,
    /// Key rows read from the database.
    pub rows_read: usize,
    /// Reading the database (and resolving hosts), then building the snapshot.
    pub read: Duration,
    pub build: Duration,
}

/// An upstream per distinct base URL of an active key, or why keys on it cannot be routed.
pub type Upstreams = HashMap<String, Result<Arc<Upstream>, String>>;

/// A parsed seller base URL, before resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseUrl {
    tls: bool,
    host: String,
    port: u16,
    base_path: String,
}

fn parse_base_url(raw: &str) -> Result<BaseUrl, String> {
    let uri: http::Uri = raw.parse().map_err(|_| "base_url is not a valid URL".to_string())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("base_url must be http or https".into()),
    };
    let host = uri.host().ok_or("base_url has no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(BaseUrl { tls, host, port, base_path })
}

impl BaseUrl {
    fn upstream(self, addr: SocketAddr) -> Upstream {
        let default_port = if self.tls { 443 } else { 80 };
        let authority = if self.port == default_port {
            bracket_ipv6(&self.host)
        } else {
            format!("{}:{}", bracket_ipv6(&self.host), self.port)
        };
        Upstream { addr, tls: self.tls, host: self.host, authority, base_path: self.base_path }
    }
}

/// Caches host resolutions between refreshes; entries older than the TTL are resolved again, and a failed
/// re-resolution keeps the last good address rather than dropping a working key.
pub struct HostResolver {
    ttl: Duration,
    cache: HashMap<(String, u16), (SocketAddr, Instant)>,
    /// Addresses a seller's key may reach; checked on every resolution, so a DNS answer that turns
    /// internal after the deposit makes the key unroutable.
    policy: crate::ssrf::UpstreamPolicy,
}

impl HostResolver {
    pub fn new(ttl: Duration, policy: crate::ssrf::UpstreamPolicy) -> Self {
        Self { ttl, cache: HashMap::new(), policy }
    }

    async fn resolve_all(&mut self, wanted: HashSet<(String, u16)>) -> HashMap<(String, u16), SocketAddr> {
        let mut out = HashMap::with_capacity(wanted.len());
        for (host, port) in wanted {
            let cached = self.cache.get(&(host.clone(), port)).copied();
            let fresh = cached.filter(|(_, at)| at.elapsed() < self.ttl).map(|(addr, _)| addr);
            let addr = match fresh {
                Some(addr) => Some(addr),
                None => match self.policy.resolve(&host, port).await {
                    Ok(addr) => {
                        self.cache.insert((host.clone(), port), (addr, Instant::now()));
                        Some(addr)
                    }
                    Err(e @ crate::ssrf::SsrfError::Forbidden { .. }) => {
                        // Never the last good address: the host now points inside.
                        tracing::warn!(error = %e, "a seller base URL is refused");
                        self.cache.remove(&(host.clone(), port));
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot resolve seller base URL host");
                        cached.map(|(addr, _)| addr)
                    }
                },
            };
            if let Some(addr) = addr {
                out.insert((host, port), addr);
            }
        }
        out
    }

    /// Parses and resolves each base URL once. An upstream equal to one of `previous` is that very `Arc`,
    /// so keys built on it stay reusable.
    async fn upstreams<'a>(&mut self, base_urls: impl IntoIterator<Item = &'a str>, previous: &Upstreams) -> Upstreams {
        let parsed: Vec<(&str, Result<BaseUrl, String>)> =
            base_urls.into_iter().map(|url| (url, parse_base_url(url))).collect();
        let wanted = parsed.iter().filter_map(|(_, u)| u.as_ref().ok()).map(|u| (u.host.clone(), u.port)).collect();
        let resolved = self.resolve_all(wanted).await;
        parsed
            .into_iter()
            .map(|(url, parsed)| {
                let upstream = parsed.and_then(|u| {
                    let addr = *resolved.get(&(u.host.clone(), u.port)).ok_or("base_url host does not resolve")?;
                    let upstream = u.upstream(addr);
                    Ok(match previous.get(url) {
                        Some(Ok(same)) if **same == upstream => same.clone(),
                        _ => Arc::new(upstream),
                    })
                });
                (url.to_string(), upstream)
            })
            .collect()
    }
}

/// Loads the key rows that `reload` asks for and builds a fresh snapshot over `previous`, attaching each
/// key's health from `health` (and dropping the health of keys that left the pool).
///
/// An incremental reload turns full when the table holds another number of keys than the snapshot would
/// (a row was deleted) or when the address of a base URL in use changed (its keys must be rebuilt).
///
/// Building (decrypting the keys that changed, the routes) is CPU work proportional to the pool: it runs
/// on a blocking thread, so that a pool of 100,000 keys does not occupy a runtime worker for the tasks
/// queued behind it.
pub async fn load_snapshot(
    db: &DatabaseConnection,
    keyring: &Arc<Keyring>,
    resolver: &mut HostResolver,
    health: &Arc<HealthRegistry>,
    previous: Arc<PoolSnapshot>,
    reload: Reload,
) -> Result<(PoolSnapshot, LoadReport), DbErr> {
    let now = crate::now_ms();
    let started = Instant::now();
    let incremental = match reload {
        Reload::ChangedSince(since) if previous.loaded_at_ms != 0 => {
            changed_rows(db, resolver, &previous, since).await?
        }
        _ => None,
    };
    let (rows, upstreams, complete) = match incremental {
        Some((rows, upstreams)) => (rows, upstreams, false),
        None => {
            let rows = crate::db::hosted_keys::pool_rows(db).await?;
            let base_urls: HashSet<&str> = active(&rows).map(|r| r.base_url.as_str()).collect();
            let upstreams = resolver.upstreams(base_urls, &previous.upstreams).await;
            (rows, upstreams, true)
        }
    };
    let buyers = crate::db::buyer_keys::list_usable(db, now).await?;
    let prices = crate::db::prices::list(db).await?;
    let funding = crate::db::funds::funding_rows(db).await?;
    let (keyring, health) = (keyring.clone(), health.clone());
    let read = started.elapsed();
    tokio::task::spawn_blocking(move || {
        let building = Instant::now();
        let rows = KeyRows { rows, complete };
        let (mut snapshot, mut report) = build_snapshot(rows, buyers, &keyring, upstreams, now, &health, &previous);
        snapshot.prices = build_prices(prices);
        snapshot.funds = build_funds(funding);
        (report.read, report.build) = (read, building.elapsed());
        (snapshot, report)
    })
    .await
    .map_err(|e| DbErr::Custom(format!("building the pool snapshot failed: {e}")))
}

/// The rows changed since `since` and the upstreams of the snapshot they make, or None when the reload
/// must be full.
async fn changed_rows(
    db: &DatabaseConnection,
    resolver: &mut HostResolver,
    previous: &PoolSnapshot,
    since: i64,
) -> Result<Option<(Vec<PoolRow>, Upstreams)>, DbErr> {
    let rows = crate::db::hosted_keys::pool_rows_changed_since(db, since).await?;
    let total = crate::db::hosted_keys::count(db).await?;
    let added = rows.iter().filter(|r| !previous.entries.contains_key(&r.id)).count();
    // A deleted row never shows up as changed; the count tells. (A row added between the two queries
    // makes them disagree too: a needless full reload, never a missed change.)
    if i64::try_from(previous.entries.len() + added).ok() != Some(total) {
        return Ok(None);
    }
    let base_urls: HashSet<&str> =
        previous.upstreams.keys().map(String::as_str).chain(active(&rows).map(|r| r.base_url.as_str())).collect();
    let upstreams = resolver.upstreams(base_urls, &previous.upstreams).await;
    // Keys on a base URL whose address changed are among the unchanged rows: only a full reload rebuilds
    // them.
    let moved = previous.upstreams.iter().any(|(url, before)| match (before, upstreams.get(url)) {
        (Ok(before), Some(Ok(now))) => !Arc::ptr_eq(before, now),
        (Err(_), Some(Err(_))) => false,
        _ => true,
    });
    Ok((!moved).then_some((rows, upstreams)))
}

fn active(rows: &[PoolRow]) -> impl Iterator<Item = &PoolRow> {
    rows.iter().filter(|r| r.status == "active")
}

fn build_prices(rows: Vec<crate::db::prices::Model>) -> HashMap<String, Price> {
    rows.into_iter()
        .map(|row| {
            let price = Price {
                prompt_per_million: u64::try_from(row.prompt_per_million).unwrap_or(0),
                completion_per_million: u64::try_from(row.completion_per_million).unwrap_or(0),
                max_output_tokens: u64::try_from(row.max_output_tokens).unwrap_or(0),
            };
            (row.model, price)
        })
        .collect()
}

fn build_funds(rows: crate::db::funds::FundingRows) -> HashMap<i64, BuyerFunds> {
    let mut funds: HashMap<i64, BuyerFunds> = HashMap::with_capacity(rows.wallet_pays.len());
    for (user_id, wallet_pays) in rows.wallet_pays {
        funds.entry(user_id).or_default().wallet_pays = wallet_pays;
    }
    for (owner_id, account_id, balance) in rows.wallets {
        funds.entry(owner_id).or_default().wallet = Some((account_id, balance));
    }
    // Rows come soonest expiry first.
    for e in rows.escrows {
        funds.entry(e.buyer_id).or_default().escrows.push(EscrowFunds {
            escrow_id: e.id,
            account_id: e.account_id,
            balance: e.balance,
            model: e.model,
            hosted_key_id: e.hosted_key_id,
            expires_at_ms: e.expires_at_ms,
        });
    }
    funds
}

/// One key row as a snapshot holds it, routable or not: what the next reload starts from.
#[derive(Debug)]
pub struct PoolEntry {
    id: i64,
    status: String,
    /// Comma-separated, as stored.
    models: String,
    /// Of the row's columns but the models (see [`row_digest`]).
    digest: u64,
    /// Active keys: the routable key, or why it cannot be routed.
    key: Option<Result<Arc<SellerKey>, String>>,
}

impl PoolEntry {
    fn models(&self) -> impl Iterator<Item = &str> {
        self.models.split(',').map(str::trim).filter(|m| !m.is_empty())
    }

    /// The row is unchanged and, if the key is routable, so is its upstream (unroutable keys are built
    /// again: they are few, and a reload reports them).
    fn reusable(&self, digest: u64, upstream: Option<&Result<Arc<Upstream>, String>>) -> bool {
        self.digest == digest
            && match (&self.key, upstream) {
                (None, _) => true,
                (Some(Ok(key)), Some(Ok(upstream))) => Arc::ptr_eq(&key.upstream, upstream),
                _ => false,
            }
    }

    /// The routable key, if the row is an active, routable key.
    pub fn key(&self) -> Option<&Arc<SellerKey>> {
        self.key.as_ref().and_then(|k| k.as_ref().ok())
    }
}

/// Key rows for [`build_snapshot`]: every row (`complete`), or the changed rows to lay over the previous
/// snapshot's.
pub struct KeyRows {
    pub rows: Vec<PoolRow>,
    pub complete: bool,
}

/// Builds a snapshot from rows and the upstreams of their base URLs. Pure apart from decryption and the
/// health registry, whose key set it replaces with the routable keys of this snapshot (each keeps the
/// health it had), so it is unit-testable and cheap to time for large pools. An entry of `previous` whose
/// row and upstream are unchanged is reused as it is.
///
/// Active keys of the `seller` pool go into the weighted routes; active `platform` keys into the
/// fallback routes, sorted by (priority, id).
pub fn build_snapshot(
    rows: KeyRows,
    buyers: Vec<buyer_keys::Model>,
    keyring: &Keyring,
    upstreams: Upstreams,
    now_ms: i64,
    health: &HealthRegistry,
    previous: &PoolSnapshot,
) -> (PoolSnapshot, LoadReport) {
    let mut report = LoadReport { full: rows.complete, rows_read: rows.rows.len(), ..LoadReport::default() };
    let mut attacher = health.attacher();
    let mut entries = if rows.complete { BTreeMap::new() } else { previous.entries.clone() };
    for row in rows.rows {
        let digest = row_digest(&row);
        let upstream = upstreams.get(&row.base_url);
        let entry = match previous.entries.get(&row.id) {
            Some(entry) if entry.reusable(digest, upstream) && entry.models == row.models => entry.clone(),
            // Models are routes, not part of the key: the key is kept.
            Some(entry) if entry.reusable(digest, upstream) => Arc::new(PoolEntry {
                id: entry.id,
                status: row.status,
                models: row.models,
                digest,
                key: entry.key.clone(),
            }),
            _ => Arc::new(new_entry(row, digest, upstream, keyring, &mut attacher, &mut report)),
        };
        entries.insert(entry.id, entry);
    }
    let mut snapshot = derive(entries, &mut attacher);
    attacher.commit();
    snapshot.buyers = build_buyers(buyers);
    snapshot.upstreams = upstreams;
    snapshot.loaded_at_ms = now_ms;
    (snapshot, report)
}

fn new_entry(
    row: PoolRow,
    digest: u64,
    upstream: Option<&Result<Arc<Upstream>, String>>,
    keyring: &Keyring,
    attacher: &mut HealthAttacher<'_>,
    report: &mut LoadReport,
) -> PoolEntry {
    let key = (row.status == "active").then(|| {
        let upstream = upstream.cloned().unwrap_or_else(|| Err("base_url was not resolved".into()));
        let key = upstream.and_then(|upstream| routable_key(&row, upstream, keyring, attacher));
        if let Err(reason) = &key {
            report.unroutable.push((row.id, reason.clone()));
        }
        key.map(Arc::new)
    });
    PoolEntry { id: row.id, status: row.status, models: row.models, digest, key }
}

/// Routes, known models and counts of a complete set of entries, in id order (so that routes are built
/// the same way from the same rows).
fn derive(entries: BTreeMap<i64, Arc<PoolEntry>>, attacher: &mut HealthAttacher<'_>) -> PoolSnapshot {
    let mut counts = StatusCounts::default();
    let mut known_models: HashSet<String> = HashSet::new();
    let mut by_model: HashMap<&str, Vec<Arc<SellerKey>>> = HashMap::new();
    let mut fallback_by_model: HashMap<&str, Vec<Arc<SellerKey>>> = HashMap::new();
    for entry in entries.values() {
        for model in entry.models() {
            if !known_models.contains(model) {
                known_models.insert(model.to_string());
            }
        }
        match entry.status.as_str() {
            "active" => counts.active += 1,
            "paused" => counts.paused += 1,
            "depleted" => counts.depleted += 1,
            "flagged" => counts.flagged += 1,
            _ => {}
        }
        match &entry.key {
            Some(Ok(key)) => {
                attacher.attach(key.id);
                let routes = if key.platform { &mut fallback_by_model } else { &mut by_model };
                for model in entry.models() {
                    routes.entry(model).or_default().push(key.clone());
                }
            }
            Some(Err(_)) => counts.unroutable += 1,
            None => {}
        }
    }
    let routes = by_model.into_iter().map(|(model, keys)| (model.to_string(), ModelRoute::new(keys))).collect();
    let fallback =
        fallback_by_model.into_iter().map(|(model, keys)| (model.to_string(), FallbackRoute::new(keys))).collect();
    PoolSnapshot { routes, fallback, known_models, status_counts: counts, entries, ..PoolSnapshot::default() }
}

fn build_buyers(rows: Vec<buyer_keys::Model>) -> HashMap<String, BuyerKey> {
    rows.into_iter()
        .filter_map(|row| {
            let mut key_hash = [0u8; 32];
            // A malformed stored hash can never match; skip it rather than fail the whole load.
            hex::decode_to_slice(&row.key_hash, &mut key_hash).ok()?;
            let allowed_models = row.models.as_deref().map(|m| {
                m.split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect::<HashSet<_>>()
            });
            Some((
                row.lookup_id,
                BuyerKey {
                    id: row.id,
                    user_id: row.user_id,
                    key_hash,
                    allowed_models,
                    expires_at_ms: row.expires_at_ms,
                },
            ))
        })
        .collect()
}

/// Every column of the row that goes into its key or decides whether it has one: all but the models (the
/// upstream is compared apart, by identity).
fn row_digest(row: &PoolRow) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    (row.id, &row.uid, row.owner_id, &row.provider, &row.base_url, &row.api_key_enc, &row.status, &row.pool)
        .hash(&mut hasher);
    (row.remaining_balance, row.priority, row.max_concurrency, row.max_spend_per_day, row.spent_today, row.spend_day)
        .hash(&mut hasher);
    hasher.finish()
}

fn routable_key(
    row: &PoolRow,
    upstream: Arc<Upstream>,
    keyring: &Keyring,
    attacher: &mut HealthAttacher<'_>,
) -> Result<SellerKey, String> {
    let secret = keyring
        .decrypt(&row.api_key_enc, &crate::accounts::hosted_key_aad(&row.uid))
        .map_err(|e| format!("cannot decrypt the stored key: {e}"))?;
    let mut authorization = HeaderValue::try_from(format!("Bearer {}", secret.expose()))
        .map_err(|_| "the stored key is not a valid header value".to_string())?;
    authorization.set_sensitive(true);
    Ok(SellerKey {
        id: row.id,
        owner_id: row.owner_id,
        provider: row.provider.clone(),
        upstream,
        authorization,
        // Weight grows linearly with the remaining balance; a key with nothing left still gets a minimal share
        // until risk control marks it depleted.
        weight: u64::try_from(row.remaining_balance).unwrap_or(0).max(1),
        platform: row.pool == "platform",
        priority: row.priority,
        max_concurrency: u32::try_from(row.max_concurrency.max(0)).unwrap_or(u32::MAX),
        max_spend_per_day: row.max_spend_per_day.max(0),
        spent_today: row.spent_today,
        spend_day: row.spend_day,
        health: attacher.attach(row.id),
    })
}

fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse_with_defaults() {
        let u = parse_base_url("https://api.openai.com/v1/").unwrap();
        assert_eq!(u, BaseUrl { tls: true, host: "api.openai.com".into(), port: 443, base_path: "/v1".into() });
        let u = parse_base_url("http://127.0.0.1:8000").unwrap();
        assert_eq!(u, BaseUrl { tls: false, host: "127.0.0.1".into(), port: 8000, base_path: String::new() });
        let u = parse_base_url("http://[::1]:9/api/v1").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.base_path, "/api/v1");
        assert_eq!(u.upstream("[::1]:9".parse().unwrap()).authority, "[::1]:9");
        assert!(parse_base_url("ftp://x/v1").is_err());
        assert!(parse_base_url("not a url").is_err());
    }

    const BASE_URL: &str = "http://127.0.0.1:9/v1";

    fn row(keyring: &Keyring, id: i64, pool: &str, priority: i64, status: &str, models: &str) -> PoolRow {
        let uid = format!("uid-{id}");
        PoolRow {
            id,
            uid: uid.clone(),
            owner_id: 1,
            provider: "openai".into(),
            base_url: BASE_URL.into(),
            models: models.into(),
            api_key_enc: keyring.encrypt(&format!("sk-secret-{id}"), &crate::accounts::hosted_key_aad(&uid)),
            status: status.into(),
            pool: pool.into(),
            remaining_balance: 1_000,
            priority,
            max_concurrency: 2,
            max_spend_per_day: 700,
            spent_today: 300,
            spend_day: 20_000,
        }
    }

    fn upstreams(addr: &str) -> Upstreams {
        let upstream = parse_base_url(BASE_URL).unwrap().upstream(addr.parse().unwrap());
        HashMap::from([(BASE_URL.to_string(), Ok(Arc::new(upstream)))])
    }

    fn all(rows: Vec<PoolRow>) -> KeyRows {
        KeyRows { rows, complete: true }
    }

    #[test]
    fn platform_keys_form_the_fallback_pool_in_priority_order() {
        let keyring = Keyring::new([7u8; 32], vec![]);
        let health = HealthRegistry::with_policy(crate::health::HealthPolicy::default());
        let rows = vec![
            row(&keyring, 1, "seller", 0, "active", "m1"),
            row(&keyring, 2, "platform", 5, "active", "m1,m2"),
            row(&keyring, 3, "platform", 1, "active", "m1"),
            row(&keyring, 4, "platform", 0, "paused", "m1"),
            row(&keyring, 5, "platform", 1, "active", "m1"),
        ];
        let up = upstreams("127.0.0.1:9");
        let (snapshot, report) =
            build_snapshot(all(rows.clone()), vec![], &keyring, up.clone(), 1, &health, &PoolSnapshot::default());
        assert!(report.unroutable.is_empty(), "{:?}", report.unroutable);
        let sellers: Vec<i64> = snapshot.route("m1").unwrap().keys().iter().map(|k| k.id).collect();
        assert_eq!(sellers, [1], "platform keys are not seller routes");
        let fallback: Vec<i64> = snapshot.fallback("m1").unwrap().keys().iter().map(|k| k.id).collect();
        assert_eq!(fallback, [3, 5, 2], "priority, then id; paused keys left out");
        assert!(snapshot.route("m2").is_none() && snapshot.serves("m2"), "served by the fallback pool only");
        assert!(snapshot.known_models.contains("m2"));
        assert_eq!(snapshot.key_for("m2", 2).map(|k| k.id), Some(2));
        assert_eq!(snapshot.key_for("m2", 1).map(|k| k.id), None);
        let key = snapshot.key_for("m1", 2).unwrap();
        assert!(key.platform);
        assert_eq!((key.priority, key.max_concurrency, key.max_spend_per_day), (5, 2, 700));
        assert_eq!((key.spent_today, key.spend_day), (300, 20_000));
        assert_eq!(key.authorization.to_str().unwrap(), "Bearer sk-secret-2");
        assert_eq!((key.upstream.authority.as_str(), key.upstream.base_path.as_str()), ("127.0.0.1:9", "/v1"));

        // A reload keeps each key's health; a key that left the pool loses it.
        let before = snapshot.key_for("m1", 3).unwrap().health.clone();
        before.add_charge(1);
        let fewer: Vec<_> = rows.into_iter().filter(|r| r.id != 5).collect();
        let (again, _) = build_snapshot(all(fewer), vec![], &keyring, up, 2, &health, &PoolSnapshot::default());
        assert!(Arc::ptr_eq(&before, &again.key_for("m1", 3).unwrap().health));
        assert!(health.get(5).is_none() && health.get(4).is_none() && health.get(1).is_some());
    }

    #[test]
    fn a_reload_reuses_unchanged_keys_and_rebuilds_changed_ones() {
        let keyring = Keyring::new([7u8; 32], vec![]);
        let health = HealthRegistry::with_policy(crate::health::HealthPolicy::default());
        let rows: Vec<_> = (1..=3).map(|id| row(&keyring, id, "seller", 0, "active", "m1")).collect();
        let up = upstreams("127.0.0.1:9");
        let (first, _) =
            build_snapshot(all(rows.clone()), vec![], &keyring, up.clone(), 1, &health, &PoolSnapshot::default());
        let mut changed = rows.clone();
        changed[1].remaining_balance += 1;
        changed[2].models = "m1,m2".into();
        let (second, _) = build_snapshot(all(changed), vec![], &keyring, up, 2, &health, &first);
        let key = |s: &PoolSnapshot, id| s.seller_key(id).unwrap().clone();
        let same = |id| Arc::ptr_eq(&key(&first, id), &key(&second, id));
        assert!(same(1), "an unchanged row reuses its key");
        assert!(!same(2), "a new balance (weight) builds a new key");
        assert_eq!(key(&second, 2).weight, key(&first, 2).weight + 1);
        assert!(same(3), "models are routes, not part of the key");
        assert_eq!(second.key_for("m2", 3).map(|k| k.id), Some(3));
        assert!(Arc::ptr_eq(&key(&first, 2).health, &key(&second, 2).health), "health carries over");
        // A key whose host resolves elsewhere now is rebuilt too.
        let (third, _) = build_snapshot(all(rows), vec![], &keyring, upstreams("127.0.0.2:9"), 3, &health, &second);
        assert_eq!(key(&third, 1).upstream.addr, "127.0.0.2:9".parse().unwrap());
    }

    #[test]
    fn an_incremental_reload_lays_the_changed_rows_over_the_previous_snapshot() {
        let keyring = Keyring::new([7u8; 32], vec![]);
        let health = HealthRegistry::with_policy(crate::health::HealthPolicy::default());
        let rows: Vec<_> = (1..=4).map(|id| row(&keyring, id, "seller", 0, "active", "m1")).collect();
        let up = upstreams("127.0.0.1:9");
        let (first, _) =
            build_snapshot(all(rows.clone()), vec![], &keyring, up.clone(), 1, &health, &PoolSnapshot::default());
        let kept = first.seller_key(1).unwrap().clone();
        kept.health.add_charge(5);

        let mut paused = rows[1].clone();
        paused.status = "paused".into();
        let mut repriced = rows[2].clone();
        repriced.remaining_balance = 9_000;
        let added = row(&keyring, 7, "seller", 0, "active", "m1,m3");
        let changes = KeyRows { rows: vec![paused, repriced, added], complete: false };
        let (second, report) = build_snapshot(changes, vec![], &keyring, up, 2, &health, &first);
        assert!(!report.full && report.rows_read == 3);
        let ids: Vec<i64> = second.route("m1").unwrap().keys().iter().map(|k| k.id).collect();
        assert_eq!(ids, [1, 3, 4, 7], "the paused key left, the new one joined, in id order");
        assert_eq!(second.seller_key(3).unwrap().weight, 9_000);
        assert!(Arc::ptr_eq(&kept, second.seller_key(1).unwrap()), "untouched rows keep their key");
        assert_eq!(second.seller_key(1).unwrap().health.charged(), 5, "and their health");
        assert!(second.serves("m3") && second.known_models.contains("m3"));
        assert_eq!((second.status_counts.active, second.status_counts.paused), (4, 1));
        assert!(health.get(2).is_none() && health.get(7).is_some());
    }
}
