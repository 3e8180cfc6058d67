//! User and key management: the domain operations behind both the admin REST API and the CLI.
//!
//! Every input is validated here, once, so that the REST layer and the CLI cannot drift apart. Nothing
//! here logs or returns a secret (a seller's API key, a password) except the values made to be shown once
//! (a new buyer key, a generated admin password, a session token). Callers that change what the gateway
//! routes or accepts ask the pool to refresh afterwards (`pool::RefreshHandle::request`).

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use http::StatusCode;
use sea_orm::{DatabaseConnection, DbErr, SqlErr, TransactionTrait};
use serde::{Deserialize, Serialize};

use crate::credentials;
use crate::crypto::{self, Keyring, Secret};
use crate::db as queries;
use crate::db::entities::{buyer_keys, hosted_keys, users};
use crate::provider::{BalanceApi, ProviderClient, ProviderError, VerifyError};

pub const MIN_PASSWORD_CHARS: usize = 8;
/// Argon2 accepts anything, but hashing a megabyte per login attempt is a cheap denial of service.
pub const MAX_PASSWORD_CHARS: usize = 1024;
const MAX_NAME_CHARS: usize = 100;
const MAX_MODELS: usize = 64;
const MAX_MODEL_CHARS: usize = 128;
const MAX_API_KEY_CHARS: usize = 512;
const MAX_BASE_URL_CHARS: usize = 512;
const GENERATED_PASSWORD_CHARS: usize = 20;
const ADMIN_USERNAME: &str = "admin";

/// The one error of the account operations; it knows its HTTP status and a stable code for clients.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("{message}")]
    Conflict { message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("invalid credentials or session")]
    Unauthorized,
    #[error("this action needs the {role} role")]
    Forbidden { role: Role },
    /// The provider could not verify the key just now (overloaded, rate limiting, down): not the
    /// caller's fault, and worth retrying later.
    #[error("{message}")]
    ProviderUnavailable { message: String },
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// A failure that is not the caller's fault (hashing, encryption, a crashed worker thread).
    #[error("internal error: {message}")]
    Internal { message: String },
}

impl AccountError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::ProviderUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Db(_) | Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::Invalid { .. } => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::ProviderUnavailable { .. } => "provider_unavailable",
            Self::Db(_) => "database_error",
            Self::Internal { .. } => "internal_error",
        }
    }

    /// Server-side failures are logged with their detail; client errors are not worth a log line.
    pub fn is_server_error(&self) -> bool {
        self.status().is_server_error()
    }

    /// Whether the message may be shown to the client although the status is a 5xx: it says what the
    /// provider did and contains nothing of the server's internals.
    pub fn message_is_public(&self) -> bool {
        !self.is_server_error() || matches!(self, Self::ProviderUnavailable { .. })
    }

    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid { field: field.to_string(), message: message.into() }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::Internal { message: message.into() }
    }
}

fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Seller,
    Buyer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Seller, Role::Buyer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Seller => "seller",
            Self::Buyer => "buyer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AccountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| AccountError::invalid("roles", format!("unknown role {s:?} (admin, seller or buyer)")))
    }
}

/// The user's roles in canonical order; unknown names in the column are ignored.
pub fn roles_of(user: &users::Model) -> Vec<Role> {
    let mut roles: Vec<Role> = user.roles.split(',').filter_map(|r| r.parse().ok()).collect();
    roles.sort_unstable();
    roles.dedup();
    roles
}

pub fn has_role(user: &users::Model, role: Role) -> bool {
    roles_of(user).contains(&role)
}

/// Fails with `Forbidden` unless the user has the role.
pub fn require_role(user: &users::Model, role: Role) -> Result<(), AccountError> {
    if has_role(user, role) {
        Ok(())
    } else {
        Err(AccountError::Forbidden { role })
    }
}

fn roles_column(roles: &[Role]) -> String {
    let mut roles = roles.to_vec();
    roles.sort_unstable();
    roles.dedup();
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

/// Runs CPU-heavy work (argon2) off the async executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, AccountError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| AccountError::internal(format!("worker thread: {e}")))
}

// ---- users ----

fn validate_username(username: &str) -> Result<(), AccountError> {
    let ok_chars = username.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !(3..=64).contains(&username.len()) || !ok_chars {
        return Err(AccountError::invalid("username", "3 to 64 characters: letters, digits, '_', '.', '-'"));
    }
    Ok(())
}

fn validate_password(password: &str) -> Result<(), AccountError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(AccountError::invalid("password", format!("at least {MIN_PASSWORD_CHARS} characters")));
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(AccountError::invalid("password", format!("at most {MAX_PASSWORD_CHARS} characters")));
    }
    Ok(())
}

pub async fn create_user(
    db: &DatabaseConnection,
    username: &str,
    password: &str,
    roles: &[Role],
) -> Result<users::Model, AccountError> {
    validate_username(username)?;
    validate_password(password)?;
    if roles.is_empty() {
        return Err(AccountError::invalid("roles", "at least one of admin, seller, buyer"));
    }
    let password = password.to_string();
    let password_hash = blocking(move || credentials::hash_password(&password))
        .await?
        .map_err(|e| AccountError::internal(e.to_string()))?;
    let new = queries::users::NewUser {
        username,
        password_hash: &password_hash,
        roles: &roles_column(roles),
        now_ms: crate::now_ms(),
    };
    queries::users::insert(db, new).await.map_err(|e| {
        if is_unique_violation(&e) {
            AccountError::Conflict { message: format!("the username {username:?} is taken") }
        } else {
            AccountError::Db(e)
        }
    })
}

/// On a database without any user, creates `admin` (role admin) with the given password or a generated
/// one. Returns the generated password, for the caller to show once; None when users already exist or
/// the password was given.
pub async fn ensure_admin(
    db: &DatabaseConnection,
    password_from_env: Option<&str>,
) -> Result<Option<String>, AccountError> {
    if queries::users::count(db).await? > 0 {
        return Ok(None);
    }
    let (password, generated) = match password_from_env {
        Some(p) => (p.to_string(), false),
        None => (credentials::random_base62(GENERATED_PASSWORD_CHARS), true),
    };
    match create_user(db, ADMIN_USERNAME, &password, &[Role::Admin]).await {
        Ok(_) => Ok(generated.then_some(password)),
        // Another node sharing the database created it first.
        Err(AccountError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn find_user(db: &DatabaseConnection, username: &str) -> Result<users::Model, AccountError> {
    queries::users::find_by_username(db, username).await?.ok_or(AccountError::NotFound { what: "user" })
}

pub async fn list_users(db: &DatabaseConnection) -> Result<Vec<users::Model>, AccountError> {
    Ok(queries::users::list(db).await?)
}

// ---- sessions ----

/// Checks the password and opens a session. Unknown user, wrong password and disabled user are all the
/// same `Unauthorized`, and cost the same time.
pub async fn login(
    db: &DatabaseConnection,
    username: &str,
    password: &str,
    ttl_ms: i64,
) -> Result<(Secret, users::Model, i64), AccountError> {
    if password.chars().count() > MAX_PASSWORD_CHARS {
        return Err(AccountError::Unauthorized);
    }
    let user = queries::users::find_by_username(db, username).await?;
    let phc = user.as_ref().map_or_else(|| credentials::dummy_password_hash().to_string(), |u| u.password_hash.clone());
    let password = password.to_string();
    let matches = blocking(move || credentials::verify_password(&password, &phc)).await?;
    let user = match user {
        Some(user) if matches && !user.disabled => user,
        _ => return Err(AccountError::Unauthorized),
    };
    let now = crate::now_ms();
    let expires_at_ms = now.saturating_add(ttl_ms.max(1));
    let (token, token_hash) = credentials::generate_session_token();
    queries::sessions::insert(db, &token_hash, user.id, expires_at_ms, now).await?;
    // Expired sessions are useless; sweeping them here keeps the table small without a background job.
    if let Err(e) = queries::sessions::delete_expired(db, now).await {
        tracing::warn!(error = %e, "cannot delete expired sessions");
    }
    Ok((token, user, expires_at_ms))
}

/// The user behind a live session token; unknown, expired and disabled are all `Unauthorized`.
pub async fn authenticate_session(db: &DatabaseConnection, token: &str) -> Result<users::Model, AccountError> {
    if token.is_empty() || token.len() > 128 {
        return Err(AccountError::Unauthorized);
    }
    let hash = credentials::hash_session_token(token);
    let session = queries::sessions::find_live(db, &hash, crate::now_ms()).await?.ok_or(AccountError::Unauthorized)?;
    match queries::users::find_by_id(db, session.user_id).await? {
        Some(user) if !user.disabled => Ok(user),
        _ => Err(AccountError::Unauthorized),
    }
}

/// Ends the session; ending an unknown or already ended one is not an error.
pub async fn logout(db: &DatabaseConnection, token: &str) -> Result<(), AccountError> {
    queries::sessions::delete_by_token_hash(db, &credentials::hash_session_token(token)).await?;
    Ok(())
}

// ---- buyer keys ----

fn validate_name(field: &str, name: &str) -> Result<String, AccountError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(AccountError::invalid(field, format!("1 to {MAX_NAME_CHARS} characters")));
    }
    if name.chars().any(char::is_control) {
        return Err(AccountError::invalid(field, "must not contain control characters"));
    }
    Ok(name.to_string())
}

/// Validates model names and returns them deduplicated in their given order.
fn validate_models(models: &[String]) -> Result<Vec<String>, AccountError> {
    if models.is_empty() || models.len() > MAX_MODELS {
        return Err(AccountError::invalid("models", format!("1 to {MAX_MODELS} model names")));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(models.len());
    for model in models {
        let ok_chars =
            model.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'@' | b'-'));
        if model.is_empty() || model.len() > MAX_MODEL_CHARS || !ok_chars {
            return Err(AccountError::invalid(
                "models",
                format!("{model:?}: 1 to {MAX_MODEL_CHARS} characters of letters, digits and . _ : / @ -"),
            ));
        }
        if seen.insert(model.as_str()) {
            out.push(model.clone());
        }
    }
    Ok(out)
}

/// Issues a buyer key for the user. The plaintext is returned once and never stored.
pub async fn issue_buyer_key(
    db: &DatabaseConnection,
    user_id: i64,
    name: &str,
    models: Option<Vec<String>>,
    expires_at_ms: Option<i64>,
) -> Result<(buyer_keys::Model, Secret), AccountError> {
    let name = validate_name("name", name)?;
    let models = models.map(|m| validate_models(&m).map(|m| m.join(","))).transpose()?;
    let now = crate::now_ms();
    if expires_at_ms.is_some_and(|t| t <= now) {
        return Err(AccountError::invalid("expires_at_ms", "must be in the future (Unix epoch milliseconds)"));
    }
    match queries::users::find_by_id(db, user_id).await? {
        Some(user) if !user.disabled => {}
        _ => return Err(AccountError::NotFound { what: "user" }),
    }
    // A lookup-id collision (62^8 ids) is astronomically rare, but cheap to survive.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let generated = credentials::generate_buyer_key();
        let new = queries::buyer_keys::NewBuyerKey {
            user_id,
            name: name.clone(),
            lookup_id: generated.lookup_id,
            key_hash: generated.key_hash,
            models: models.clone(),
            expires_at_ms,
            now_ms: now,
        };
        match queries::buyer_keys::insert(db, new).await {
            Ok(row) => return Ok((row, generated.plaintext)),
            Err(e) if attempts < 3 && is_unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

pub async fn list_buyer_keys(db: &DatabaseConnection, user_id: i64) -> Result<Vec<buyer_keys::Model>, AccountError> {
    Ok(queries::buyer_keys::list_for_user(db, user_id).await?)
}

/// Revokes one of the user's keys (idempotent); another user's key is `NotFound`.
pub async fn revoke_buyer_key(
    db: &DatabaseConnection,
    user_id: i64,
    key_id: i64,
) -> Result<buyer_keys::Model, AccountError> {
    const NOT_FOUND: AccountError = AccountError::NotFound { what: "buyer key" };
    let key = queries::buyer_keys::find_for_user(db, user_id, key_id).await?.ok_or(NOT_FOUND)?;
    if key.revoked_at_ms.is_some() {
        return Ok(key);
    }
    queries::buyer_keys::revoke(db, user_id, key_id, crate::now_ms()).await?;
    queries::buyer_keys::find_for_user(db, user_id, key_id).await?.ok_or(NOT_FOUND)
}

// ---- seller keys ----

/// A seller key (or a platform fallback key) to deposit. `Debug` never shows the API key.
#[derive(Default)]
pub struct NewSellerKey {
    /// Empty: named after the provider.
    pub name: String,
    pub provider: String,
    pub base_url: String,
    pub models: Vec<String>,
    pub api_key: String,
    pub declared_balance: i64,
    /// Requests the key may serve at once, per gateway node; 0 = no cap.
    pub max_concurrency: i64,
    /// Credits the key may earn per UTC day; 0 = no cap.
    pub max_spend_per_day: i64,
    /// The provider balance adapter (`crate::provider::BalanceApi` names); empty = derived from the
    /// provider.
    pub balance_api: String,
}

impl fmt::Debug for NewSellerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewSellerKey")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field("models", &self.models)
            .field("declared_balance", &self.declared_balance)
            .field("max_concurrency", &self.max_concurrency)
            .field("max_spend_per_day", &self.max_spend_per_day)
            .field("balance_api", &self.balance_api)
            .finish_non_exhaustive()
    }
}

/// What a seller may change on a deposited key (`None`: unchanged).
#[derive(Clone, Debug, Default)]
pub struct SellerKeyChanges {
    pub name: Option<String>,
    pub max_concurrency: Option<i64>,
    pub max_spend_per_day: Option<i64>,
    /// Empty: derived from the provider again.
    pub balance_api: Option<String>,
}

/// Past this a cap is a typo, not a limit.
const MAX_CONCURRENCY_CAP: i64 = 100_000;
/// `hosted_keys.pool` of sellers' keys (`platform`: the fallback keys).
pub const SELLER_POOL: &str = "seller";
pub const PLATFORM_POOL: &str = "platform";

/// What caused a key's current status (`hosted_keys.status_cause`).
pub mod cause {
    pub const SELLER: &str = "seller";
    pub const ADMIN: &str = "admin";
    /// Active keys have none.
    pub const NONE: &str = "";
}

pub mod status {
    pub const ACTIVE: &str = "active";
    pub const PAUSED: &str = "paused";
    pub const DEPLETED: &str = "depleted";
    pub const FLAGGED: &str = "flagged";
}

fn validate_provider(provider: &str) -> Result<(), AccountError> {
    let ok_chars = provider.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if provider.is_empty() || provider.len() > 32 || !ok_chars {
        return Err(AccountError::invalid("provider", "1 to 32 characters: a-z, 0-9, '_', '-'"));
    }
    Ok(())
}

/// An absolute http(s) URL with a host, without credentials, query or fragment; returned without its
/// trailing slashes, so that `<base_url>/chat/completions` is always well formed.
pub fn normalize_base_url(raw: &str) -> Result<String, AccountError> {
    let invalid = |message: &str| AccountError::invalid("base_url", message);
    if raw.is_empty() || raw.len() > MAX_BASE_URL_CHARS {
        return Err(invalid("1 to 512 characters"));
    }
    if raw.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(invalid("must not contain spaces or non-ASCII characters"));
    }
    if raw.contains('?') || raw.contains('#') {
        return Err(invalid("must not have a query or a fragment"));
    }
    let uri: http::Uri = raw.parse().map_err(|_| invalid("not a valid absolute URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("the scheme must be http or https"));
    }
    let authority = uri.authority().ok_or_else(|| invalid("must include a host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("must not contain credentials; put the API key in api_key"));
    }
    if authority.host().is_empty() {
        return Err(invalid("must include a host"));
    }
    if authority.as_str().ends_with(':') {
        return Err(invalid("the port is empty"));
    }
    Ok(raw.trim_end_matches('/').to_string())
}

fn validate_api_key(api_key: &str) -> Result<(), AccountError> {
    // Messages here must never quote the key.
    if api_key.is_empty() || api_key.len() > MAX_API_KEY_CHARS {
        return Err(AccountError::invalid("api_key", format!("1 to {MAX_API_KEY_CHARS} characters")));
    }
    if !api_key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(AccountError::invalid("api_key", "only visible ASCII characters, no whitespace"));
    }
    Ok(())
}

/// The associated data that binds a stored ciphertext to its row.
pub fn hosted_key_aad(uid: &str) -> String {
    format!("hosted_keys:{uid}")
}

/// What a master-key rotation did.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct RotationReport {
    pub rotated: u64,
    pub already_current: u64,
    /// Keys whose ciphertext none of the configured master keys opens (ids only, never key material).
    pub undecryptable: Vec<i64>,
}

/// Re-encrypts every seller key that is not yet under the keyring's current master key. Run it after
/// setting a new `TOKEX_MASTER_KEY` with the old one in `TOKEX_PREVIOUS_MASTER_KEYS`; once it reports no
/// undecryptable keys, the old key can be retired. Safe to run again or concurrently.
pub async fn rotate_master_key(db: &DatabaseConnection, keyring: &Keyring) -> Result<RotationReport, AccountError> {
    let mut report = RotationReport::default();
    for key in queries::hosted_keys::list_all(db).await? {
        if !keyring.needs_rotation(&key.api_key_enc) {
            report.already_current += 1;
            continue;
        }
        match keyring.rotate(&key.api_key_enc, &hosted_key_aad(&key.uid)) {
            Ok(rotated) => {
                if queries::hosted_keys::replace_ciphertext(db, key.id, &key.api_key_enc, &rotated, crate::now_ms())
                    .await?
                {
                    report.rotated += 1;
                }
            }
            Err(_) => report.undecryptable.push(key.id),
        }
    }
    Ok(report)
}

/// Refuses a base URL that reaches an internal address (see `crate::ssrf`).
async fn check_upstream(policy: &crate::ssrf::UpstreamPolicy, base_url: &str) -> Result<(), AccountError> {
    let uri: http::Uri = base_url.parse().map_err(|_| AccountError::invalid("base_url", "is not a valid URL"))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    match policy.resolve(host, port).await {
        Err(e @ crate::ssrf::SsrfError::Forbidden { .. }) => Err(AccountError::invalid("base_url", e.to_string())),
        _ => Ok(()),
    }
}

fn validate_max_concurrency(cap: i64) -> Result<i64, AccountError> {
    if !(0..=MAX_CONCURRENCY_CAP).contains(&cap) {
        return Err(AccountError::invalid("max_concurrency", format!("0 (no cap) to {MAX_CONCURRENCY_CAP}")));
    }
    Ok(cap)
}

fn validate_max_spend_per_day(cap: i64) -> Result<i64, AccountError> {
    if cap < 0 {
        return Err(AccountError::invalid("max_spend_per_day", "credits per UTC day, 0 (no cap) or more"));
    }
    Ok(cap)
}

/// The stored form: empty (derive from the provider) or a known adapter name.
fn validate_balance_api(name: &str) -> Result<String, AccountError> {
    let name = name.trim();
    if name.is_empty() {
        return Ok(String::new());
    }
    match BalanceApi::parse(name) {
        Some(api) => Ok(api.as_str().to_string()),
        None => {
            let known: Vec<&str> = BalanceApi::ALL.iter().map(|a| a.as_str()).collect();
            Err(AccountError::invalid(
                "balance_api",
                format!("one of {} (empty: derived from the provider)", known.join(", ")),
            ))
        }
    }
}

/// Says which field to fix when verification refuses a key. The provider's own words are kept (they never
/// contain the key: the provider client scrubs it).
fn verification_error(error: VerifyError) -> AccountError {
    match error {
        VerifyError::InvalidKey(message) => {
            AccountError::invalid("api_key", format!("the provider rejected the API key: {message}"))
        }
        VerifyError::WrongBaseUrl(message) => AccountError::invalid("base_url", message),
        VerifyError::ModelsNotServed(missing) => AccountError::invalid(
            "models",
            format!(
                "the provider does not list {} for this key at <base_url>/models; declare only models the key \
                 can serve",
                missing.join(", ")
            ),
        ),
        VerifyError::Provider(e) => match e {
            ProviderError::Forbidden(message) => AccountError::invalid("base_url", message),
            ProviderError::Redirect(to) => AccountError::invalid(
                "base_url",
                format!("the provider answered with a redirect to {to}; redirects are not followed, use the final URL"),
            ),
            ProviderError::Unreachable(message) => {
                AccountError::invalid("base_url", format!("cannot reach the provider: {message}"))
            }
            e @ ProviderError::Status { .. } if e.is_transient() => {
                AccountError::ProviderUnavailable { message: format!("the provider is unavailable, retry later ({e})") }
            }
            ProviderError::Status { status: 402, message } => {
                AccountError::invalid("api_key", format!("the provider refused the key for payment (402): {message}"))
            }
            ProviderError::Status { status, message } => {
                AccountError::invalid("base_url", format!("GET <base_url>/models answered {status}: {message}"))
            }
            ProviderError::BadResponse(message) => {
                AccountError::invalid("base_url", format!("unexpected answer from the provider: {message}"))
            }
            e @ (ProviderError::Unsupported | ProviderError::InvalidRequest(_)) => {
                AccountError::internal(e.to_string())
            }
        },
    }
}

/// How a key enters the pool: a seller's deposit, or an admin's platform fallback key.
struct Deposit {
    owner_id: i64,
    pool: &'static str,
    priority: i64,
}

/// Validates and deposits a seller key, encrypted, with status active and its full declared balance, in
/// the seller pool. A base URL whose host resolves to an internal address is refused unless `policy`
/// allows it. With `verify` the key is first checked against its provider (`client`): an invalid key, a
/// wrong base URL or a model the key cannot serve is refused with the field to fix, and the key is
/// stored with `verified_at_ms`. Without it (providers without a models endpoint; operators only) an
/// unresolvable host is left to the pool, which does not route it.
pub async fn add_seller_key(
    db: &DatabaseConnection,
    keyring: &Keyring,
    policy: &crate::ssrf::UpstreamPolicy,
    client: &ProviderClient,
    verify: bool,
    owner_id: i64,
    new: NewSellerKey,
) -> Result<hosted_keys::Model, AccountError> {
    let deposit = Deposit { owner_id, pool: SELLER_POOL, priority: 0 };
    insert_key(db, keyring, policy, client, verify, deposit, new).await
}

/// [`add_seller_key`] for a platform fallback key: owned by the admin who adds it, in the platform pool,
/// tried in ascending `priority` (0 or more) when no seller key can serve.
#[allow(clippy::too_many_arguments)]
pub async fn add_platform_key(
    db: &DatabaseConnection,
    keyring: &Keyring,
    policy: &crate::ssrf::UpstreamPolicy,
    client: &ProviderClient,
    verify: bool,
    admin_id: i64,
    new: NewSellerKey,
    priority: i64,
) -> Result<hosted_keys::Model, AccountError> {
    if priority < 0 {
        return Err(AccountError::invalid("priority", "0 or more; lower is tried first"));
    }
    let deposit = Deposit { owner_id: admin_id, pool: PLATFORM_POOL, priority };
    insert_key(db, keyring, policy, client, verify, deposit, new).await
}

async fn insert_key(
    db: &DatabaseConnection,
    keyring: &Keyring,
    policy: &crate::ssrf::UpstreamPolicy,
    client: &ProviderClient,
    verify: bool,
    deposit: Deposit,
    new: NewSellerKey,
) -> Result<hosted_keys::Model, AccountError> {
    let owner_id = deposit.owner_id;
    validate_provider(&new.provider)?;
    let name = if new.name.trim().is_empty() { new.provider.clone() } else { validate_name("name", &new.name)? };
    let base_url = normalize_base_url(&new.base_url)?;
    check_upstream(policy, &base_url).await?;
    let models = validate_models(&new.models)?;
    validate_api_key(&new.api_key)?;
    if new.declared_balance < 0 {
        return Err(AccountError::invalid("declared_balance", "must not be negative"));
    }
    let max_concurrency = validate_max_concurrency(new.max_concurrency)?;
    let max_spend_per_day = validate_max_spend_per_day(new.max_spend_per_day)?;
    let balance_api = validate_balance_api(&new.balance_api)?;
    match queries::users::find_by_id(db, owner_id).await? {
        Some(user) if !user.disabled => {}
        _ => return Err(AccountError::NotFound { what: "user" }),
    }
    // Last, after everything that can be checked locally: it costs a provider round trip.
    let verified_at_ms = if verify {
        client.verify(&base_url, &new.api_key, &models).await.map_err(verification_error)?;
        Some(crate::now_ms())
    } else {
        None
    };
    let uid = uuid::Uuid::now_v7().to_string();
    let api_key_enc =
        keyring.try_encrypt(&new.api_key, &hosted_key_aad(&uid)).map_err(|e| AccountError::internal(e.to_string()))?;
    let row = queries::hosted_keys::NewHostedKey {
        uid,
        owner_id,
        name,
        provider: new.provider,
        base_url,
        models: models.join(","),
        api_key_enc,
        key_hint: crypto::mask_api_key(&new.api_key),
        status: status::ACTIVE.to_string(),
        declared_balance: new.declared_balance,
        now_ms: crate::now_ms(),
        pool: deposit.pool.into(),
        priority: deposit.priority,
        max_concurrency,
        max_spend_per_day,
        balance_api,
        verified_at_ms,
    };
    let txn = db.begin().await?;
    let key = queries::hosted_keys::insert(&txn, row).await?;
    let event = queries::key_events::NewEvent {
        hosted_key_id: key.id,
        owner_id,
        from_status: None,
        to_status: status::ACTIVE,
        reason: "deposited",
        actor_id: Some(owner_id),
        now_ms: key.created_at_ms,
    };
    queries::key_events::record(&txn, event).await?;
    txn.commit().await?;
    Ok(key)
}

/// The seller's own keys (platform keys an admin added are not theirs, even when the admin sells too).
pub async fn list_seller_keys(db: &DatabaseConnection, owner_id: i64) -> Result<Vec<hosted_keys::Model>, AccountError> {
    let mut keys = queries::hosted_keys::list_for_owner(db, owner_id).await?;
    keys.retain(|k| k.pool == SELLER_POOL);
    Ok(keys)
}

/// One of the owner's keys; another owner's key (or a platform key) is `NotFound`, exactly like a missing
/// one.
pub async fn get_seller_key(
    db: &DatabaseConnection,
    owner_id: i64,
    key_id: i64,
) -> Result<hosted_keys::Model, AccountError> {
    queries::hosted_keys::find_for_owner(db, owner_id, key_id)
        .await?
        .filter(|k| k.pool == SELLER_POOL)
        .ok_or(AccountError::NotFound { what: "seller key" })
}

/// Pauses (active → paused) or resumes (paused → active) a key. Asking for the state the key is already
/// in succeeds without a change, so retries are safe; a depleted or flagged key cannot be paused or
/// resumed by its seller, nor a key that risk control paused (it resumes by itself once re-verification
/// passes). The new status records its cause: `seller` when paused, none when active again.
pub async fn set_seller_key_paused(
    db: &DatabaseConnection,
    owner_id: i64,
    key_id: i64,
    paused: bool,
) -> Result<hosted_keys::Model, AccountError> {
    let (from, to) = if paused { (status::ACTIVE, status::PAUSED) } else { (status::PAUSED, status::ACTIVE) };
    let key = get_seller_key(db, owner_id, key_id).await?;
    if key.status == to {
        return Ok(key);
    }
    let action = if paused { "paused" } else { "resumed" };
    let conflict = |current: &str| AccountError::Conflict {
        message: format!("the key is {current}; only a key that is {from} can be {action}"),
    };
    if key.status != from {
        return Err(conflict(&key.status));
    }
    if !paused && !matches!(key.status_cause.as_str(), cause::SELLER | cause::NONE) {
        return Err(AccountError::Conflict {
            message: format!(
                "the key was paused by the platform ({}); it is resumed automatically once it verifies again",
                key.status_cause
            ),
        });
    }
    // Conditional on the status just read: a concurrent change (risk control flagging the key) wins. The
    // change and its history entry are one transaction.
    let now = crate::now_ms();
    let new_cause = if paused { cause::SELLER } else { cause::NONE };
    let change = queries::risk::Transition {
        key_id,
        owner_id,
        from,
        to,
        cause: new_cause,
        review: crate::db::risk::review::NONE,
        next_check_at_ms: None,
        only_causes: &[],
        reason: if paused { "paused by its seller" } else { "resumed by its seller" },
        actor_id: Some(owner_id),
        now_ms: now,
    };
    let txn = db.begin().await?;
    let changed = queries::risk::transition(&txn, &change).await?;
    txn.commit().await?;
    if !changed {
        let current = get_seller_key(db, owner_id, key_id).await?;
        if current.status == to {
            return Ok(current);
        }
        return Err(conflict(&current.status));
    }
    get_seller_key(db, owner_id, key_id).await
}

/// Changes a seller's key's name, caps and balance adapter (another seller's key is not found). Status,
/// URL, models and the API key itself are not editable: a different key is a new deposit.
pub async fn update_seller_key(
    db: &DatabaseConnection,
    owner_id: i64,
    key_id: i64,
    changes: SellerKeyChanges,
) -> Result<hosted_keys::Model, AccountError> {
    let name = changes.name.as_deref().map(|n| validate_name("name", n)).transpose()?;
    let max_concurrency = changes.max_concurrency.map(validate_max_concurrency).transpose()?;
    let max_spend_per_day = changes.max_spend_per_day.map(validate_max_spend_per_day).transpose()?;
    let balance_api = changes.balance_api.as_deref().map(validate_balance_api).transpose()?;
    get_seller_key(db, owner_id, key_id).await?;
    let nothing = name.is_none() && max_concurrency.is_none() && max_spend_per_day.is_none() && balance_api.is_none();
    if nothing {
        return get_seller_key(db, owner_id, key_id).await;
    }
    let update = queries::hosted_keys::SellerKeyUpdate {
        name: name.as_deref(),
        max_concurrency,
        max_spend_per_day,
        balance_api: balance_api.as_deref(),
    };
    queries::hosted_keys::update_seller(db, owner_id, key_id, &update, crate::now_ms()).await?;
    get_seller_key(db, owner_id, key_id).await
}

/// A seller's key's status history, newest first (another seller's key is not found).
pub async fn seller_key_events(
    db: &DatabaseConnection,
    owner_id: i64,
    key_id: i64,
) -> Result<Vec<queries::key_events::KeyEvent>, AccountError> {
    get_seller_key(db, owner_id, key_id).await?;
    Ok(queries::key_events::for_key(db, key_id, 500).await?)
}

pub async fn list_all_keys(db: &DatabaseConnection) -> Result<Vec<hosted_keys::Model>, AccountError> {
    Ok(queries::hosted_keys::list_all(db).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::TestDb;

    const SELLER_SECRET: &str = "sk-proj-SUPERSECRETVALUE1234567890wxyz";

    fn keyring() -> Keyring {
        Keyring::new([9u8; 32], vec![])
    }

    /// Never called by tests that pass `verify = false`; verification has its own tests (provider client,
    /// tests/seller_key_verify.rs).
    fn client() -> ProviderClient {
        ProviderClient::new(Default::default(), std::time::Duration::from_secs(1)).unwrap()
    }

    fn seller_key() -> NewSellerKey {
        NewSellerKey {
            name: "main".into(),
            provider: "openai".into(),
            base_url: "https://api.openai.com/v1/".into(),
            models: vec!["gpt-4o".into(), "gpt-4o-mini".into(), "gpt-4o".into()],
            api_key: SELLER_SECRET.into(),
            declared_balance: 5_000,
            ..Default::default()
        }
    }

    fn field_of(e: &AccountError) -> &str {
        match e {
            AccountError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn errors_know_their_status_and_code() {
        let cases = [
            (AccountError::NotFound { what: "x" }, 404, "not_found"),
            (AccountError::Conflict { message: "m".into() }, 409, "conflict"),
            (AccountError::invalid("f", "m"), 400, "invalid_request"),
            (AccountError::Unauthorized, 401, "unauthorized"),
            (AccountError::Forbidden { role: Role::Admin }, 403, "forbidden"),
            (AccountError::ProviderUnavailable { message: "m".into() }, 503, "provider_unavailable"),
            (AccountError::Db(DbErr::Custom("x".into())), 500, "database_error"),
            (AccountError::internal("x"), 500, "internal_error"),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status().as_u16(), e.code()), (status, code));
        }
    }

    #[test]
    fn roles_parse_and_render_canonically() {
        assert_eq!("seller".parse::<Role>().unwrap(), Role::Seller);
        assert!("root".parse::<Role>().is_err());
        assert_eq!(roles_column(&[Role::Buyer, Role::Admin, Role::Buyer]), "admin,buyer");
        let user = users::Model {
            id: 1,
            username: "u".into(),
            password_hash: String::new(),
            roles: "buyer,bogus,seller".into(),
            disabled: false,
            wallet_pays: true,
            created_at_ms: 0,
        };
        assert_eq!(roles_of(&user), [Role::Seller, Role::Buyer]);
        assert!(require_role(&user, Role::Admin).is_err());
        assert_eq!(serde_json::to_string(&Role::Admin).unwrap(), "\"admin\"");
    }

    #[test]
    fn base_urls_are_validated_and_normalized() {
        assert_eq!(normalize_base_url("https://api.openai.com/v1/").unwrap(), "https://api.openai.com/v1");
        assert_eq!(normalize_base_url("http://127.0.0.1:8000").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(normalize_base_url("http://[::1]:9/api//").unwrap(), "http://[::1]:9/api");
        for bad in [
            "",
            "api.openai.com/v1",
            "/v1",
            "ftp://host/v1",
            "https://user:pw@host/v1",
            "https://host/v1?x=1",
            "https://host/v1#frag",
            "https://ho st/v1",
            "https:///v1",
            "https://host:/v1",
            "https://hôst/v1",
        ] {
            assert!(normalize_base_url(bad).is_err(), "{bad}");
        }
        assert!(normalize_base_url(&format!("https://h/{}", "a".repeat(600))).is_err());
    }

    #[test]
    fn models_are_validated_and_deduplicated() {
        let ok = validate_models(&["gpt-4o".into(), "meta-llama/Llama-3:70b@v1".into(), "gpt-4o".into()]).unwrap();
        assert_eq!(ok, ["gpt-4o", "meta-llama/Llama-3:70b@v1"]);
        assert!(validate_models(&[]).is_err());
        assert!(validate_models(&["a,b".into()]).is_err());
        assert!(validate_models(&["a b".into()]).is_err());
        assert!(validate_models(&["x".repeat(129)]).is_err());
        assert!(validate_models(&(0..65).map(|i| format!("m{i}")).collect::<Vec<_>>()).is_err());
    }

    #[tokio::test]
    async fn users_are_validated_and_unique() {
        let t = TestDb::sqlite().await;
        let db = &t.db;
        let user = create_user(db, "seller.one", "password1", &[Role::Seller, Role::Buyer]).await.unwrap();
        assert_eq!(user.roles, "seller,buyer");
        assert!(user.password_hash.starts_with("$argon2id$"));
        let dup = create_user(db, "seller.one", "password1", &[Role::Buyer]).await.unwrap_err();
        assert_eq!(dup.status(), StatusCode::CONFLICT);
        assert_eq!(field_of(&create_user(db, "ab", "password1", &[Role::Buyer]).await.unwrap_err()), "username");
        assert_eq!(field_of(&create_user(db, "a b c", "password1", &[Role::Buyer]).await.unwrap_err()), "username");
        assert_eq!(field_of(&create_user(db, "abc", "short", &[Role::Buyer]).await.unwrap_err()), "password");
        assert_eq!(field_of(&create_user(db, "abc", "password1", &[]).await.unwrap_err()), "roles");
        assert_eq!(find_user(db, "seller.one").await.unwrap().id, user.id);
        assert!(matches!(find_user(db, "nobody").await, Err(AccountError::NotFound { .. })));
    }

    #[tokio::test]
    async fn the_first_admin_is_created_once() {
        let t = TestDb::sqlite().await;
        let db = &t.db;
        let password = ensure_admin(db, None).await.unwrap().unwrap();
        assert_eq!(password.len(), 20);
        assert!(password.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(ensure_admin(db, None).await.unwrap(), None);
        let (_, admin, _) = login(db, "admin", &password, 60_000).await.unwrap();
        assert_eq!(roles_of(&admin), [Role::Admin]);

        let t2 = TestDb::sqlite().await;
        assert_eq!(ensure_admin(&t2.db, Some("from-the-env")).await.unwrap(), None);
        login(&t2.db, "admin", "from-the-env", 60_000).await.unwrap();
        let t3 = TestDb::sqlite().await;
        assert!(ensure_admin(&t3.db, Some("short")).await.is_err());
    }

    #[tokio::test]
    async fn sessions_authenticate_until_logout_expiry_or_disable() {
        for t in TestDb::all().await {
            let db = &t.db;
            let user = create_user(db, "buyer1", "password1", &[Role::Buyer]).await.unwrap();
            assert!(matches!(login(db, "buyer1", "wrong-pass", 60_000).await, Err(AccountError::Unauthorized)));
            assert!(matches!(login(db, "nobody", "password1", 60_000).await, Err(AccountError::Unauthorized)));

            let (token, logged_in, expires) = login(db, "buyer1", "password1", 60_000).await.unwrap();
            assert_eq!(logged_in.id, user.id);
            assert!(expires > crate::now_ms());
            assert_eq!(authenticate_session(db, token.expose()).await.unwrap().id, user.id);
            assert!(matches!(authenticate_session(db, "tkxs-nope").await, Err(AccountError::Unauthorized)));
            logout(db, token.expose()).await.unwrap();
            assert!(matches!(authenticate_session(db, token.expose()).await, Err(AccountError::Unauthorized)));
            logout(db, token.expose()).await.unwrap();

            let (short, _, _) = login(db, "buyer1", "password1", 1).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert!(matches!(authenticate_session(db, short.expose()).await, Err(AccountError::Unauthorized)));

            let (token, _, _) = login(db, "buyer1", "password1", 60_000).await.unwrap();
            queries::users::set_disabled(db, user.id, true).await.unwrap();
            assert!(matches!(authenticate_session(db, token.expose()).await, Err(AccountError::Unauthorized)));
            assert!(matches!(login(db, "buyer1", "password1", 60_000).await, Err(AccountError::Unauthorized)));
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn buyer_keys_are_issued_listed_and_revoked_by_their_owner_only() {
        for t in TestDb::all().await {
            let db = &t.db;
            let alice = create_user(db, "alice", "password1", &[Role::Buyer]).await.unwrap();
            let bob = create_user(db, "bob", "password1", &[Role::Buyer]).await.unwrap();
            let (key, plaintext) =
                issue_buyer_key(db, alice.id, " laptop ", Some(vec!["gpt-4o".into()]), None).await.unwrap();
            assert_eq!(key.name, "laptop");
            assert_eq!(key.models.as_deref(), Some("gpt-4o"));
            let (lookup_id, hash) = credentials::parse_buyer_key(plaintext.expose()).unwrap();
            assert_eq!(lookup_id, key.lookup_id);
            assert!(credentials::verify_key_hash(&key.key_hash, &hash));
            assert!(!key.key_hash.contains(plaintext.expose()));

            let past = Some(crate::now_ms() - 1);
            assert_eq!(field_of(&issue_buyer_key(db, alice.id, "x", None, past).await.unwrap_err()), "expires_at_ms");
            assert_eq!(field_of(&issue_buyer_key(db, alice.id, "", None, None).await.unwrap_err()), "name");
            assert_eq!(field_of(&issue_buyer_key(db, alice.id, "x", Some(vec![]), None).await.unwrap_err()), "models");
            assert!(matches!(issue_buyer_key(db, 999, "x", None, None).await, Err(AccountError::NotFound { .. })));

            assert!(matches!(revoke_buyer_key(db, bob.id, key.id).await, Err(AccountError::NotFound { .. })));
            assert_eq!(queries::buyer_keys::list_usable(db, crate::now_ms()).await.unwrap().len(), 1);
            let revoked = revoke_buyer_key(db, alice.id, key.id).await.unwrap();
            assert!(revoked.revoked_at_ms.is_some());
            assert_eq!(revoke_buyer_key(db, alice.id, key.id).await.unwrap(), revoked, "idempotent");
            assert!(queries::buyer_keys::list_usable(db, crate::now_ms()).await.unwrap().is_empty());
            assert_eq!(list_buyer_keys(db, alice.id).await.unwrap().len(), 1);
            assert!(list_buyer_keys(db, bob.id).await.unwrap().is_empty());
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn seller_keys_are_encrypted_masked_and_owner_scoped() {
        for t in TestDb::all().await {
            let db = &t.db;
            let ring = keyring();
            let seller = create_user(db, "seller", "password1", &[Role::Seller]).await.unwrap();
            let other = create_user(db, "other", "password1", &[Role::Seller]).await.unwrap();
            let key = add_seller_key(db, &ring, &Default::default(), &client(), false, seller.id, seller_key())
                .await
                .unwrap();
            assert_eq!(key.base_url, "https://api.openai.com/v1");
            assert_eq!(key.models, "gpt-4o,gpt-4o-mini");
            assert_eq!(key.key_hint, "sk-...wxyz");
            assert_eq!((key.status.as_str(), key.declared_balance, key.remaining_balance), ("active", 5_000, 5_000));
            assert!(!key.api_key_enc.contains("SUPERSECRET"));
            let aad = hosted_key_aad(&key.uid);
            assert_eq!(ring.decrypt(&key.api_key_enc, &aad).unwrap().expose(), SELLER_SECRET);

            let unnamed = add_seller_key(
                db,
                &ring,
                &Default::default(),
                &client(),
                false,
                seller.id,
                NewSellerKey { name: " ".into(), ..seller_key() },
            )
            .await
            .unwrap();
            assert_eq!(unnamed.name, "openai");

            assert!(matches!(get_seller_key(db, other.id, key.id).await, Err(AccountError::NotFound { .. })));
            assert!(matches!(
                set_seller_key_paused(db, other.id, key.id, true).await,
                Err(AccountError::NotFound { .. })
            ));
            assert_eq!(set_seller_key_paused(db, seller.id, key.id, true).await.unwrap().status, "paused");
            assert_eq!(set_seller_key_paused(db, seller.id, key.id, true).await.unwrap().status, "paused");
            assert_eq!(set_seller_key_paused(db, seller.id, key.id, false).await.unwrap().status, "active");
            assert!(queries::hosted_keys::transition_status(db, seller.id, key.id, "active", "flagged", 1)
                .await
                .unwrap());
            let err = set_seller_key_paused(db, seller.id, key.id, true).await.unwrap_err();
            assert_eq!(err.status(), StatusCode::CONFLICT);
            assert!(err.to_string().contains("flagged"), "{err}");
            assert!(matches!(
                set_seller_key_paused(db, seller.id, key.id, false).await,
                Err(AccountError::Conflict { .. })
            ));

            assert_eq!(list_seller_keys(db, seller.id).await.unwrap().len(), 2);
            assert!(list_seller_keys(db, other.id).await.unwrap().is_empty());
            assert_eq!(list_all_keys(db).await.unwrap().len(), 2);
            assert_eq!(list_users(db).await.unwrap().len(), 2);
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn seller_key_validation_never_echoes_the_api_key() {
        let t = TestDb::sqlite().await;
        let db = &t.db;
        let ring = keyring();
        let seller = create_user(db, "seller", "password1", &[Role::Seller]).await.unwrap();
        let cases: Vec<(NewSellerKey, &str)> = vec![
            (NewSellerKey { provider: "OpenAI".into(), ..seller_key() }, "provider"),
            (NewSellerKey { provider: String::new(), ..seller_key() }, "provider"),
            (NewSellerKey { base_url: "https://u:p@h/v1".into(), ..seller_key() }, "base_url"),
            (NewSellerKey { models: vec![], ..seller_key() }, "models"),
            (NewSellerKey { api_key: format!("{SELLER_SECRET} tail"), ..seller_key() }, "api_key"),
            (NewSellerKey { api_key: format!("{SELLER_SECRET}\u{e9}"), ..seller_key() }, "api_key"),
            (NewSellerKey { api_key: "x".repeat(513), ..seller_key() }, "api_key"),
            (NewSellerKey { api_key: String::new(), ..seller_key() }, "api_key"),
            (NewSellerKey { declared_balance: -1, ..seller_key() }, "declared_balance"),
            (NewSellerKey { name: "x".repeat(101), ..seller_key() }, "name"),
            (NewSellerKey { max_concurrency: -1, ..seller_key() }, "max_concurrency"),
            (NewSellerKey { max_concurrency: 100_001, ..seller_key() }, "max_concurrency"),
            (NewSellerKey { max_spend_per_day: -5, ..seller_key() }, "max_spend_per_day"),
            (NewSellerKey { balance_api: "coinbase".into(), ..seller_key() }, "balance_api"),
        ];
        for (new, field) in cases {
            let debug = format!("{new:?}");
            assert!(!debug.contains("SUPERSECRET"));
            let err =
                add_seller_key(db, &ring, &Default::default(), &client(), false, seller.id, new).await.unwrap_err();
            assert_eq!(field_of(&err), field);
            assert!(!err.to_string().contains("SUPERSECRET"), "{err}");
        }
        assert!(matches!(
            add_seller_key(db, &ring, &Default::default(), &client(), false, 999, seller_key()).await,
            Err(AccountError::NotFound { .. })
        ));
        assert!(list_all_keys(db).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn caps_and_balance_api_are_stored_and_changed_by_the_owner_only() {
        for t in TestDb::all().await {
            let db = &t.db;
            let ring = keyring();
            let seller = create_user(db, "seller", "password1", &[Role::Seller]).await.unwrap();
            let other = create_user(db, "other", "password1", &[Role::Seller]).await.unwrap();
            let new = NewSellerKey {
                max_concurrency: 4,
                max_spend_per_day: 700,
                balance_api: " deepseek ".into(),
                ..seller_key()
            };
            let key = add_seller_key(db, &ring, &Default::default(), &client(), false, seller.id, new).await.unwrap();
            assert_eq!((key.max_concurrency, key.max_spend_per_day), (4, 700));
            assert_eq!((key.balance_api.as_str(), key.pool.as_str(), key.verified_at_ms), ("deepseek", "seller", None));

            let changes = SellerKeyChanges {
                name: Some(" renamed ".into()),
                max_concurrency: Some(0),
                max_spend_per_day: Some(50),
                balance_api: Some(String::new()),
            };
            let not_theirs = update_seller_key(db, other.id, key.id, changes.clone()).await.unwrap_err();
            assert!(matches!(not_theirs, AccountError::NotFound { .. }), "{not_theirs:?}");
            let changed = update_seller_key(db, seller.id, key.id, changes).await.unwrap();
            assert_eq!(changed.name, "renamed");
            assert_eq!((changed.max_concurrency, changed.max_spend_per_day), (0, 50));
            assert_eq!(changed.balance_api, "");
            let unchanged = update_seller_key(db, seller.id, key.id, SellerKeyChanges::default()).await.unwrap();
            assert_eq!(unchanged, changed);
            for (changes, field) in [
                (SellerKeyChanges { max_concurrency: Some(-1), ..Default::default() }, "max_concurrency"),
                (SellerKeyChanges { max_spend_per_day: Some(-1), ..Default::default() }, "max_spend_per_day"),
                (SellerKeyChanges { balance_api: Some("nope".into()), ..Default::default() }, "balance_api"),
                (SellerKeyChanges { name: Some(" ".into()), ..Default::default() }, "name"),
            ] {
                assert_eq!(field_of(&update_seller_key(db, seller.id, key.id, changes).await.unwrap_err()), field);
            }
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn pausing_records_its_cause_and_platform_pauses_are_not_the_sellers_to_lift() {
        let t = TestDb::sqlite().await;
        let db = &t.db;
        let ring = keyring();
        let seller = create_user(db, "seller", "password1", &[Role::Seller]).await.unwrap();
        let key =
            add_seller_key(db, &ring, &Default::default(), &client(), false, seller.id, seller_key()).await.unwrap();
        let paused = set_seller_key_paused(db, seller.id, key.id, true).await.unwrap();
        assert_eq!((paused.status.as_str(), paused.status_cause.as_str()), ("paused", "seller"));
        let resumed = set_seller_key_paused(db, seller.id, key.id, false).await.unwrap();
        assert_eq!((resumed.status.as_str(), resumed.status_cause.as_str()), ("active", ""));

        // Risk control pauses the key for its failures: the seller cannot lift that.
        assert!(queries::hosted_keys::transition_status_with_cause(
            db, seller.id, key.id, "active", "paused", "failures", 9
        )
        .await
        .unwrap());
        let err = set_seller_key_paused(db, seller.id, key.id, false).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::CONFLICT);
        assert!(err.to_string().contains("failures"), "{err}");
        // Pausing it again changes nothing, and does not make the pause the seller's.
        let still = set_seller_key_paused(db, seller.id, key.id, true).await.unwrap();
        assert_eq!((still.status.as_str(), still.status_cause.as_str()), ("paused", "failures"));
    }

    #[tokio::test]
    async fn platform_keys_are_the_admins_and_invisible_to_seller_endpoints() {
        let t = TestDb::sqlite().await;
        let db = &t.db;
        let ring = keyring();
        let admin = create_user(db, "ops", "password1", &[Role::Admin, Role::Seller]).await.unwrap();
        let key = add_platform_key(db, &ring, &Default::default(), &client(), false, admin.id, seller_key(), 7)
            .await
            .unwrap();
        assert_eq!((key.pool.as_str(), key.priority, key.owner_id), ("platform", 7, admin.id));
        assert!(list_seller_keys(db, admin.id).await.unwrap().is_empty());
        assert!(matches!(get_seller_key(db, admin.id, key.id).await, Err(AccountError::NotFound { .. })));
        assert!(matches!(set_seller_key_paused(db, admin.id, key.id, true).await, Err(AccountError::NotFound { .. })));
        let negative = add_platform_key(db, &ring, &Default::default(), &client(), false, admin.id, seller_key(), -1)
            .await
            .unwrap_err();
        assert_eq!(field_of(&negative), "priority");
    }

    #[test]
    fn verification_errors_name_the_field_to_fix() {
        let field = |e: VerifyError| match verification_error(e) {
            AccountError::Invalid { field, message } => (field, message),
            other => (other.code().to_string(), other.to_string()),
        };
        let status = |status: u16| VerifyError::Provider(ProviderError::Status { status, message: "m".into() });
        assert_eq!(field(VerifyError::InvalidKey("bad".into())).0, "api_key");
        assert_eq!(field(VerifyError::WrongBaseUrl("404".into())).0, "base_url");
        let (f, message) = field(VerifyError::ModelsNotServed(vec!["gpt-9-unknown".into(), "o9".into()]));
        assert_eq!(f, "models");
        assert!(message.contains("gpt-9-unknown, o9"), "{message}");
        let (f, message) = field(VerifyError::Provider(ProviderError::Redirect("https://x/v1".into())));
        assert_eq!(f, "base_url");
        assert!(message.contains("redirect"), "{message}");
        assert_eq!(field(VerifyError::Provider(ProviderError::Unreachable("refused".into()))).0, "base_url");
        assert_eq!(field(VerifyError::Provider(ProviderError::Forbidden("internal".into()))).0, "base_url");
        assert_eq!(field(VerifyError::Provider(ProviderError::BadResponse("x".into()))).0, "base_url");
        assert_eq!(field(status(402)).0, "api_key");
        assert_eq!(field(status(400)).0, "base_url");
        for transient in [429, 500, 502, 503] {
            let e = verification_error(status(transient));
            assert_eq!((e.status().as_u16(), e.code()), (503, "provider_unavailable"));
            assert!(e.to_string().contains("retry later"), "{e}");
            assert!(e.message_is_public());
        }
        assert!(!AccountError::internal("x").message_is_public());
        assert!(AccountError::invalid("f", "m").message_is_public());
    }
}
