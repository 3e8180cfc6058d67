//! Seller webhooks: registration (URL checked, signing secret generated and shown once, stored encrypted)
//! and delivery of notifications from the outbox on `notifications`.
//!
//! Delivery is at least once: an attempt is claimed in the database before the POST (so a crash costs an
//! attempt, never a notification, and two nodes never send the same attempt), and the receiver can
//! deduplicate by the notification's `id`. Each body is signed:
//! `X-Tokex-Signature: sha256=<hex HMAC-SHA256(secret, "<X-Tokex-Timestamp>.<body>")>`, the timestamp in
//! Unix milliseconds. Per webhook, notifications go out oldest first; after a failure the webhook waits
//! (exponential backoff) before the same notification is tried again.

use hmac::{Hmac, Mac};
use sea_orm::{DatabaseConnection, DbErr, SqlErr};
use serde::Serialize;
use sha2::Sha256;

use crate::accounts::AccountError;
use crate::credentials;
use crate::crypto::{Keyring, Secret};
use crate::db::entities::notifications;
use crate::db::webhooks as queries;
use crate::metrics::METRICS;
use crate::provider::ProviderClient;

const MAX_URL_CHARS: usize = 512;
const SECRET_PREFIX: &str = "whsec_";
const SECRET_CHARS: usize = 40;
/// Notifications taken per webhook and round.
const BATCH: u64 = 20;
const BACKOFF_BASE_MS: i64 = 2_000;
const BACKOFF_MAX_MS: i64 = 3_600_000;

pub const TIMESTAMP_HEADER: &str = "X-Tokex-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Tokex-Signature";

/// The associated data that binds a webhook's sealed secret to its user.
pub fn secret_aad(user_id: i64) -> String {
    format!("webhooks:{user_id}")
}

/// What a seller sees of their webhook; never the secret.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct WebhookView {
    pub url: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The last delivery attempt, and its error (null when it succeeded).
    pub last_delivery_at_ms: Option<i64>,
    pub last_error: Option<String>,
    /// Notifications waiting for delivery.
    pub pending: u64,
}

fn view(hook: &queries::Model, pending: u64) -> WebhookView {
    WebhookView {
        url: hook.url.clone(),
        created_at_ms: hook.created_at_ms,
        updated_at_ms: hook.updated_at_ms,
        last_delivery_at_ms: hook.last_delivery_at_ms,
        last_error: hook.last_error.clone(),
        pending,
    }
}

fn invalid_url(message: impl Into<String>) -> AccountError {
    AccountError::Invalid { field: "url".into(), message: message.into() }
}

/// An absolute http(s) URL with a host and without credentials or fragment; returns it with its host and
/// port for the address check.
pub fn validate_url(raw: &str) -> Result<(String, String, u16), AccountError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > MAX_URL_CHARS {
        return Err(invalid_url(format!("1 to {MAX_URL_CHARS} characters")));
    }
    if raw.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(invalid_url("must not contain spaces or non-ASCII characters"));
    }
    if raw.contains('#') {
        return Err(invalid_url("must not have a fragment"));
    }
    let uri: http::Uri = raw.parse().map_err(|_| invalid_url("not a valid absolute URL"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(invalid_url("the scheme must be http or https")),
    };
    let authority = uri.authority().ok_or_else(|| invalid_url("must include a host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid_url("must not contain credentials"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || authority.as_str().ends_with(':') {
        return Err(invalid_url("must include a host (and a port, if a colon follows it)"));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok((raw.to_string(), host.to_string(), port))
}

/// Sets (or replaces) the user's webhook with a new signing secret, which is returned once: only its
/// ciphertext is stored. A URL that reaches an internal address is refused unless the operator allows it.
pub async fn set_webhook(
    db: &DatabaseConnection,
    keyring: &Keyring,
    policy: &crate::ssrf::UpstreamPolicy,
    user_id: i64,
    url: &str,
    max_attempts: u32,
) -> Result<(WebhookView, Secret), AccountError> {
    let (url, host, port) = validate_url(url)?;
    policy.resolve(&host, port).await.map_err(|e| invalid_url(e.to_string()))?;
    let secret = Secret::new(format!("{SECRET_PREFIX}{}", credentials::random_base62(SECRET_CHARS)));
    let sealed = keyring
        .try_encrypt(secret.expose(), &secret_aad(user_id))
        .map_err(|e| AccountError::Internal { message: e.to_string() })?;
    let now = crate::now_ms();
    let hook = match queries::upsert(db, user_id, &url, &sealed, now).await {
        // Two first registrations raced: the other one inserted; this one replaces it.
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            queries::upsert(db, user_id, &url, &sealed, now).await?
        }
        other => other?,
    };
    let pending = queries::pending_count(db, &hook, max_attempts).await?;
    Ok((view(&hook, pending), secret))
}

pub async fn get_webhook(
    db: &DatabaseConnection,
    user_id: i64,
    max_attempts: u32,
) -> Result<WebhookView, AccountError> {
    let hook = queries::find_for_user(db, user_id).await?.ok_or(AccountError::NotFound { what: "webhook" })?;
    let pending = queries::pending_count(db, &hook, max_attempts).await?;
    Ok(view(&hook, pending))
}

pub async fn delete_webhook(db: &DatabaseConnection, user_id: i64) -> Result<(), AccountError> {
    if queries::delete_for_user(db, user_id).await? {
        Ok(())
    } else {
        Err(AccountError::NotFound { what: "webhook" })
    }
}

/// Hex HMAC-SHA256 of `"<timestamp>.<body>"` under the secret.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// How long after attempt number `attempts` (1-based) the next one may start. Never shorter than a whole
/// attempt can take, so that another node never retries one still under way.
pub fn backoff_ms(attempts: i64, provider_timeout_ms: u64) -> i64 {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    let exponential = BACKOFF_BASE_MS.saturating_mul(1_i64 << exponent).min(BACKOFF_MAX_MS);
    let attempt_bound = i64::try_from(provider_timeout_ms).unwrap_or(i64::MAX).saturating_add(1_000);
    exponential.max(attempt_bound)
}

/// The JSON a webhook receives for one notification.
pub fn payload(n: &notifications::Model) -> Vec<u8> {
    let body = serde_json::json!({
        "id": n.id,
        "kind": n.kind,
        "hosted_key_id": n.hosted_key_id,
        "message": n.message,
        "created_at_ms": n.created_at_ms,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// What the webhook delivery needs.
pub struct Delivery<'a> {
    pub db: &'a DatabaseConnection,
    pub keyring: &'a Keyring,
    pub provider: &'a ProviderClient,
    pub max_attempts: u32,
    pub provider_timeout_ms: u64,
}

/// One delivery round over every webhook. Returns how many notifications were delivered.
pub async fn deliver_round(d: &Delivery<'_>) -> Result<u64, DbErr> {
    let mut delivered = 0;
    for hook in queries::list_all(d.db).await? {
        let now = crate::now_ms();
        // A failing webhook is not even queried until its shortest backoff has passed.
        let resting = hook.last_error.is_some()
            && hook.last_delivery_at_ms.is_some_and(|at| now < at.saturating_add(backoff_ms(1, d.provider_timeout_ms)));
        if resting {
            continue;
        }
        delivered += deliver_to(d, &hook).await?;
    }
    Ok(delivered)
}

async fn deliver_to(d: &Delivery<'_>, hook: &queries::Model) -> Result<u64, DbErr> {
    let pending = queries::pending(d.db, hook, d.max_attempts, BATCH).await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let secret = match d.keyring.decrypt(&hook.secret_enc, &secret_aad(hook.user_id)) {
        Ok(secret) => secret,
        Err(e) => {
            tracing::error!(webhook_id = hook.id, error = %e, "cannot decrypt a webhook secret");
            queries::record_failure(d.db, hook.id, "the signing secret cannot be decrypted", crate::now_ms()).await?;
            return Ok(0);
        }
    };
    let mut delivered = 0;
    for notification in pending {
        let now = crate::now_ms();
        if notification.delivery_attempts > 0 {
            let last = hook.last_delivery_at_ms.unwrap_or(0);
            if now < last.saturating_add(backoff_ms(notification.delivery_attempts, d.provider_timeout_ms)) {
                break;
            }
        }
        // Lost to another node, which now delivers this webhook's notifications in order.
        if !queries::claim_attempt(d.db, &notification, hook.id, now).await? {
            break;
        }
        let body = payload(&notification);
        let timestamp = crate::now_ms().to_string();
        let signature = format!("sha256={}", sign(secret.expose(), &timestamp, &body));
        let headers = [(TIMESTAMP_HEADER, timestamp), (SIGNATURE_HEADER, signature)];
        let error = match d.provider.post_json(&hook.url, &headers, body).await {
            Ok(status) if (200..300).contains(&status) => None,
            Ok(status) => Some(format!("the webhook answered {status}")),
            Err(e) => Some(e.to_string()),
        };
        match error {
            None => {
                queries::mark_delivered(d.db, notification.id, hook.id, crate::now_ms()).await?;
                METRICS.webhook_deliveries.with_label_values(&["delivered"]).inc();
                delivered += 1;
            }
            Some(error) => {
                queries::record_failure(d.db, hook.id, &error, crate::now_ms()).await?;
                let attempts = notification.delivery_attempts.saturating_add(1);
                let result = if attempts >= i64::from(d.max_attempts) { "abandoned" } else { "failed" };
                METRICS.webhook_deliveries.with_label_values(&[result]).inc();
                tracing::warn!(webhook_id = hook.id, notification_id = notification.id, attempts, %error, "webhook delivery failed");
                break;
            }
        }
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_validated() {
        let (url, host, port) = validate_url(" https://hooks.example.com/tokex?token=abc ").unwrap();
        assert_eq!(
            (url.as_str(), host.as_str(), port),
            ("https://hooks.example.com/tokex?token=abc", "hooks.example.com", 443)
        );
        assert_eq!(validate_url("http://127.0.0.1:9000/h").unwrap().1, "127.0.0.1");
        assert_eq!(validate_url("http://[::1]:9000/h").unwrap().1, "::1");
        assert_eq!(validate_url("http://example.com").unwrap().2, 80);
        for bad in [
            "",
            "example.com/hook",
            "ftp://example.com/hook",
            "https://user:pw@example.com/hook",
            "https://example.com/hook#x",
            "https://exa mple.com/",
            "https://:80/",
            "https://example.com:/",
            "https://exämple.com/",
        ] {
            assert!(validate_url(bad).is_err(), "{bad}");
        }
        assert!(validate_url(&format!("https://example.com/{}", "a".repeat(600))).is_err());
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_body() {
        // RFC 4231 test case 2 (key "Jefe") pins the HMAC itself.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(expected, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // "<timestamp>.<body>": the dot is part of the signed text.
        assert_eq!(sign("Jefe", "what do ya want for nothing?", b"").len(), 64);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?.");
        assert_eq!(sign("Jefe", "what do ya want for nothing?", b""), hex::encode(mac.finalize().into_bytes()));
        assert_ne!(sign("k", "1", b"{}"), sign("k", "2", b"{}"));
        assert_ne!(sign("k", "1", b"{}"), sign("k2", "1", b"{}"));
    }

    #[test]
    fn backoff_grows_and_outlasts_an_attempt() {
        assert_eq!(backoff_ms(1, 0), 2_000);
        assert_eq!(backoff_ms(2, 0), 4_000);
        assert_eq!(backoff_ms(4, 0), 16_000);
        assert_eq!(backoff_ms(100, 0), BACKOFF_MAX_MS);
        assert_eq!(backoff_ms(1, 10_000), 11_000, "never shorter than an attempt");
        assert_eq!(backoff_ms(0, 0), 2_000);
    }

    #[test]
    fn payloads_carry_the_notification() {
        let n = notifications::Model {
            id: 7,
            user_id: 3,
            kind: "key_status".into(),
            hosted_key_id: Some(9),
            message: "Key 9 is now flagged: x".into(),
            created_at_ms: 123,
            read_at_ms: None,
            delivered_at_ms: None,
            delivery_attempts: 0,
        };
        let body: serde_json::Value = serde_json::from_slice(&payload(&n)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"id": 7, "kind": "key_status", "hosted_key_id": 9, "message": "Key 9 is now flagged: x", "created_at_ms": 123})
        );
    }
}
