//! Building a [`PoolSnapshot`] from database rows: decrypting seller keys, parsing base URLs and resolving
//! their hosts (in the background refresher, never on the request path).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use sea_orm::{DatabaseConnection, DbErr};

use super::{BuyerKey, FallbackRoute, ModelRoute, PoolSnapshot, SellerKey, StatusCounts, Upstream};
use crate::billing::{BuyerFunds, EscrowFunds, Price};
use crate::crypto::Keyring;
use crate::db::entities::{buyer_keys, hosted_keys};
use crate::health::{HealthAttacher, HealthRegistry};

/// What a load skipped, so that the refresher can log it once per key rather than per request.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// (key id, reason) of active keys that could not be routed.
    pub unroutable: Vec<(i64, String)>,
}

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
}

/// Loads every key from the database and builds a fresh snapshot, attaching each key's health from
/// `health` (and dropping the health of keys that left the pool).
///
/// Building (decrypting every key) is CPU work proportional to the pool: it runs on a blocking thread, so
/// that a pool of 100,000 keys does not occupy a runtime worker for the tasks queued behind it.
pub async fn load_snapshot(
    db: &DatabaseConnection,
    keyring: &Arc<Keyring>,
    resolver: &mut HostResolver,
    health: &Arc<HealthRegistry>,
    previous: Arc<PoolSnapshot>,
) -> Result<(PoolSnapshot, LoadReport), DbErr> {
    let now = crate::now_ms();
    let hosted = crate::db::hosted_keys::list_all(db).await?;
    let buyers = crate::db::buyer_keys::list_usable(db, now).await?;
    // Most keys of a large pool share a few base URLs: each distinct one is parsed once.
    let base_urls: HashSet<&str> =
        hosted.iter().filter(|k| k.status == "active").map(|k| k.base_url.as_str()).collect();
    let wanted: HashSet<(String, u16)> =
        base_urls.into_iter().filter_map(|url| parse_base_url(url).ok()).map(|u| (u.host, u.port)).collect();
    let resolved = resolver.resolve_all(wanted).await;
    let prices = crate::db::prices::list(db).await?;
    let funding = crate::db::funds::funding_rows(db).await?;
    let (keyring, health) = (keyring.clone(), health.clone());
    tokio::task::spawn_blocking(move || {
        let (mut snapshot, report) = build_snapshot(hosted, buyers, &keyring, &resolved, now, &health, &previous);
        snapshot.prices = build_prices(prices);
        snapshot.funds = build_funds(funding);
        (snapshot, report)
    })
    .await
    .map_err(|e| DbErr::Custom(format!("building the pool snapshot failed: {e}")))
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

/// Builds a snapshot from rows and already-resolved addresses. Pure apart from decryption and the
/// health registry, whose key set it replaces with the routable keys of this snapshot (each keeps the
/// health it had), so it is unit-testable and cheap to time for large pools. A key of `previous` whose row
/// and address are unchanged is reused as it is: a reload of a large, mostly unchanged pool decrypts and
/// allocates only what changed.
///
/// Active keys of the `seller` pool go into the weighted routes; active `platform` keys into the
/// fallback routes, sorted by (priority, id).
pub fn build_snapshot(
    hosted: Vec<hosted_keys::Model>,
    buyers: Vec<buyer_keys::Model>,
    keyring: &Keyring,
    resolved: &HashMap<(String, u16), SocketAddr>,
    now_ms: i64,
    health: &HealthRegistry,
    previous: &PoolSnapshot,
) -> (PoolSnapshot, LoadReport) {
    let mut report = LoadReport::default();
    let mut counts = StatusCounts::default();
    let mut known_models = HashSet::new();
    let mut by_model: HashMap<String, Vec<Arc<SellerKey>>> = HashMap::new();
    let mut fallback_by_model: HashMap<String, Vec<Arc<SellerKey>>> = HashMap::new();
    let mut attacher = health.attacher();
    let mut seller_keys = HashMap::with_capacity(previous.seller_keys.len());

    // Distinct base URLs, parsed and resolved once each.
    let mut addresses: HashMap<String, Option<SocketAddr>> = HashMap::new();
    for row in hosted {
        let models: Vec<&str> = row.models.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
        for model in &models {
            if !known_models.contains(*model) {
                known_models.insert(model.to_string());
            }
        }
        match row.status.as_str() {
            "active" => counts.active += 1,
            "paused" => counts.paused += 1,
            "depleted" => counts.depleted += 1,
            "flagged" => counts.flagged += 1,
            _ => {}
        }
        if row.status != "active" {
            continue;
        }
        if !addresses.contains_key(&row.base_url) {
            let addr = parse_base_url(&row.base_url).ok().and_then(|u| resolved.get(&(u.host, u.port)).copied());
            addresses.insert(row.base_url.clone(), addr);
        }
        let digest = row_digest(&row, addresses.get(&row.base_url).copied().flatten());
        let reused = previous.seller_keys.get(&row.id).filter(|k| k.row_digest == digest).map(|k| {
            attacher.attach(row.id);
            k.clone()
        });
        match reused.map_or_else(|| routable_key(&row, keyring, resolved, digest, &mut attacher).map(Arc::new), Ok) {
            Ok(key) => {
                seller_keys.insert(key.id, key.clone());
                let routes = if key.platform { &mut fallback_by_model } else { &mut by_model };
                for model in models {
                    match routes.get_mut(model) {
                        Some(keys) => keys.push(key.clone()),
                        None => {
                            routes.insert(model.to_string(), vec![key.clone()]);
                        }
                    }
                }
            }
            Err(reason) => {
                counts.unroutable += 1;
                report.unroutable.push((row.id, reason));
            }
        }
    }

    let buyers = buyers
        .into_iter()
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
        .collect();

    attacher.commit();
    let routes = by_model.into_iter().map(|(model, keys)| (model, ModelRoute::new(keys))).collect();
    let fallback = fallback_by_model.into_iter().map(|(model, keys)| (model, FallbackRoute::new(keys))).collect();
    let snapshot = PoolSnapshot {
        buyers,
        routes,
        fallback,
        known_models,
        status_counts: counts,
        prices: HashMap::new(),
        funds: HashMap::new(),
        loaded_at_ms: now_ms,
        seller_keys,
    };
    (snapshot, report)
}

/// Everything of the row (and its host's address) that goes into its [`SellerKey`].
fn row_digest(row: &hosted_keys::Model, addr: Option<SocketAddr>) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    (row.id, row.owner_id, &row.uid, &row.provider, &row.base_url, &row.api_key_enc, &row.pool).hash(&mut hasher);
    (row.remaining_balance, row.priority, row.max_concurrency, row.max_spend_per_day).hash(&mut hasher);
    (row.spent_today, row.spend_day, addr).hash(&mut hasher);
    hasher.finish()
}

fn routable_key(
    row: &hosted_keys::Model,
    keyring: &Keyring,
    resolved: &HashMap<(String, u16), SocketAddr>,
    row_digest: u64,
    attacher: &mut HealthAttacher<'_>,
) -> Result<SellerKey, String> {
    let url = parse_base_url(&row.base_url)?;
    let addr = *resolved.get(&(url.host.clone(), url.port)).ok_or("base_url host does not resolve")?;
    let secret = keyring
        .decrypt(&row.api_key_enc, &format!("hosted_keys:{}", row.uid))
        .map_err(|e| format!("cannot decrypt the stored key: {e}"))?;
    let mut authorization = HeaderValue::try_from(format!("Bearer {}", secret.expose()))
        .map_err(|_| "the stored key is not a valid header value".to_string())?;
    authorization.set_sensitive(true);
    let default_port = if url.tls { 443 } else { 80 };
    let authority = if url.port == default_port {
        bracket_ipv6(&url.host)
    } else {
        format!("{}:{}", bracket_ipv6(&url.host), url.port)
    };
    Ok(SellerKey {
        id: row.id,
        owner_id: row.owner_id,
        provider: row.provider.clone(),
        upstream: Upstream { addr, tls: url.tls, host: url.host, authority, base_path: url.base_path },
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
        row_digest,
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
        assert!(parse_base_url("ftp://x/v1").is_err());
        assert!(parse_base_url("not a url").is_err());
    }

    fn row(keyring: &Keyring, id: i64, pool: &str, priority: i64, status: &str, models: &str) -> hosted_keys::Model {
        let uid = format!("uid-{id}");
        hosted_keys::Model {
            id,
            uid: uid.clone(),
            owner_id: 1,
            name: "k".into(),
            provider: "openai".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: models.into(),
            api_key_enc: keyring.encrypt(&format!("sk-secret-{id}"), &format!("hosted_keys:{uid}")),
            key_hint: "sk-...".into(),
            status: status.into(),
            declared_balance: 1_000,
            remaining_balance: 1_000,
            failure_count: 0,
            success_count: 0,
            last_used_at_ms: None,
            last_failure_at_ms: None,
            created_at_ms: 0,
            pool: pool.into(),
            updated_at_ms: 0,
            priority,
            max_concurrency: 2,
            max_spend_per_day: 700,
            spent_today: 300,
            spend_day: 20_000,
            balance_api: String::new(),
            verified_at_ms: None,
            next_check_at_ms: 0,
            review: String::new(),
            status_cause: String::new(),
            checked_successes: 0,
            checked_failures: 0,
        }
    }

    #[test]
    fn platform_keys_form_the_fallback_pool_in_priority_order() {
        let keyring = Keyring::new([7u8; 32], vec![]);
        let resolved = HashMap::from([(("127.0.0.1".to_string(), 9), "127.0.0.1:9".parse().unwrap())]);
        let health = HealthRegistry::with_policy(crate::health::HealthPolicy::default());
        let rows = vec![
            row(&keyring, 1, "seller", 0, "active", "m1"),
            row(&keyring, 2, "platform", 5, "active", "m1,m2"),
            row(&keyring, 3, "platform", 1, "active", "m1"),
            row(&keyring, 4, "platform", 0, "paused", "m1"),
            row(&keyring, 5, "platform", 1, "active", "m1"),
        ];
        let (snapshot, report) =
            build_snapshot(rows.clone(), vec![], &keyring, &resolved, 1, &health, &PoolSnapshot::default());
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

        // A reload keeps each key's health; a key that left the pool loses it.
        let before = snapshot.key_for("m1", 3).unwrap().health.clone();
        before.add_charge(1);
        let fewer: Vec<_> = rows.into_iter().filter(|r| r.id != 5).collect();
        let (again, _) = build_snapshot(fewer, vec![], &keyring, &resolved, 2, &health, &PoolSnapshot::default());
        assert!(Arc::ptr_eq(&before, &again.key_for("m1", 3).unwrap().health));
        assert!(health.get(5).is_none() && health.get(4).is_none() && health.get(1).is_some());
    }

    #[test]
    fn a_reload_reuses_unchanged_keys_and_rebuilds_changed_ones() {
        let keyring = Keyring::new([7u8; 32], vec![]);
        let resolved = HashMap::from([(("127.0.0.1".to_string(), 9), "127.0.0.1:9".parse().unwrap())]);
        let health = HealthRegistry::with_policy(crate::health::HealthPolicy::default());
        let rows: Vec<_> = (1..=3).map(|id| row(&keyring, id, "seller", 0, "active", "m1")).collect();
        let (first, _) =
            build_snapshot(rows.clone(), vec![], &keyring, &resolved, 1, &health, &PoolSnapshot::default());
        let first = Arc::new(first);
        let mut changed = rows.clone();
        changed[1].remaining_balance += 1;
        changed[2].models = "m1,m2".into();
        let (second, _) = build_snapshot(changed, vec![], &keyring, &resolved, 2, &health, &first);
        let same = |id| Arc::ptr_eq(&first.seller_keys[&id], &second.seller_keys[&id]);
        assert!(same(1), "an unchanged row reuses its key");
        assert!(!same(2), "a new balance (weight) builds a new key");
        assert_eq!(second.seller_keys[&2].weight, first.seller_keys[&2].weight + 1);
        assert!(same(3), "models are routes, not part of the key");
        assert_eq!(second.key_for("m2", 3).map(|k| k.id), Some(3));
        assert!(Arc::ptr_eq(&first.seller_keys[&2].health, &second.seller_keys[&2].health), "health carries over");
        // A key whose host resolves elsewhere now is rebuilt too.
        let moved = HashMap::from([(("127.0.0.1".to_string(), 9), "127.0.0.2:9".parse().unwrap())]);
        let (third, _) = build_snapshot(rows, vec![], &keyring, &moved, 3, &health, &second);
        assert_eq!(third.seller_keys[&1].upstream.addr, "127.0.0.2:9".parse().unwrap());
    }
}
