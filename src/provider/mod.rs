//! Calls to seller keys' providers outside the request path: key verification (list models) and provider
//! balance readings, through one HTTP client that refuses internal addresses (`crate::ssrf`) and never
//! follows redirects. Also used for seller webhooks.
//!
//! Every connection goes to an address the SSRF policy checked: host names are resolved by
//! [`PolicyResolver`] (which refuses a name with any internal address and hands the connector only the
//! checked one), IP literals, which the connector never resolves, are checked before the request is
//! sent, and proxies from the environment are ignored (a proxy would connect on our behalf, unchecked).
//! Nothing here puts the API key into an error: provider messages are cut short and scrubbed of it.

mod balance;
mod decimal;
mod json;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;

pub use balance::{DeepSeek, Moonshot, OpenAiCreditGrants, OpenRouter, SiliconFlow};

use crate::ssrf::{SsrfError, UpstreamPolicy};

/// A models list or balance answer larger than this is not one (OpenRouter's full list is ~1 MB).
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Provider messages quoted in errors are cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 200;

/// Why a provider call failed. Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The URL reaches an internal address (SSRF policy) or is not a usable http(s) URL.
    #[error("{0}")]
    Forbidden(String),
    /// The provider answered with a redirect (never followed).
    #[error("the provider answered with a redirect to {0}; use the final URL as base_url")]
    Redirect(String),
    #[error("cannot reach the provider: {0}")]
    Unreachable(String),
    #[error("the provider answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("unexpected answer from the provider: {0}")]
    BadResponse(String),
    /// The provider has no balance API (the adapter `none`).
    #[error("the provider has no balance API")]
    Unsupported,
    /// The caller's request cannot be sent as given (e.g. a header name that is not one).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ProviderError {
    /// Worth trying again later: the provider is overloaded, rate limiting or briefly down.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::Unreachable(_) => true,
            _ => false,
        }
    }
}

/// Why a key failed verification; each says which field to fix.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the provider rejected the API key ({0})")]
    InvalidKey(String),
    #[error("base_url does not lead to an OpenAI-compatible API: {0}")]
    WrongBaseUrl(String),
    #[error("the key cannot serve these models: {}", .0.join(", "))]
    ModelsNotServed(Vec<String>),
    #[error("{0}")]
    Provider(#[from] ProviderError),
}

/// What verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Every model the provider listed for the key.
    pub listed: Vec<String>,
}

/// Which balance API a provider has (one adapter each, behind [`BalanceAdapter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalanceApi {
    /// `GET /user/balance`
    DeepSeek,
    /// `GET /api/v1/credits`
    OpenRouter,
    /// `GET /v1/users/me/balance`
    Moonshot,
    /// `GET /v1/user/info`
    SiliconFlow,
    /// `GET /dashboard/billing/credit_grants`
    OpenAiCreditGrants,
    /// No balance API: only failure and depletion checks apply.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Currency {
    Usd,
    Cny,
}

impl Currency {
    /// `USD` or `CNY` (any case).
    pub fn parse(code: &str) -> Option<Self> {
        match code.trim().to_ascii_uppercase().as_str() {
            "USD" => Some(Self::Usd),
            "CNY" => Some(Self::Cny),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Usd => "USD",
            Self::Cny => "CNY",
        }
    }
}

/// A provider-reported balance in millionths of its currency unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    pub micros: i64,
    pub currency: Currency,
}

/// One provider's balance API: where to ask and how to read the answer.
pub trait BalanceAdapter: Send + Sync {
    /// The URL to GET for a key with this base URL.
    fn url(&self, base_url: &str) -> Result<String, ProviderError>;
    /// Reads the balance out of the response body.
    fn parse(&self, body: &[u8]) -> Result<Balance, ProviderError>;
}

impl BalanceApi {
    pub const ALL: [Self; 6] =
        [Self::DeepSeek, Self::OpenRouter, Self::Moonshot, Self::SiliconFlow, Self::OpenAiCreditGrants, Self::None];

    /// Parses a stored/API name: deepseek, openrouter, moonshot, siliconflow, openai_credit_grants, none.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|api| api.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeepSeek => "deepseek",
            Self::OpenRouter => "openrouter",
            Self::Moonshot => "moonshot",
            Self::SiliconFlow => "siliconflow",
            Self::OpenAiCreditGrants => "openai_credit_grants",
            Self::None => "none",
        }
    }

    /// The adapter for a provider name when the key does not name one.
    pub fn for_provider(provider: &str) -> Self {
        match provider {
            "deepseek" => Self::DeepSeek,
            "openrouter" => Self::OpenRouter,
            "moonshot" => Self::Moonshot,
            "siliconflow" => Self::SiliconFlow,
            "openai" => Self::OpenAiCreditGrants,
            _ => Self::None,
        }
    }

    /// The key's adapter: its `balance_api` column, else derived from its provider.
    pub fn of_key(balance_api: &str, provider: &str) -> Self {
        Self::parse(balance_api).unwrap_or_else(|| Self::for_provider(provider))
    }

    /// The adapter reading a key with this base URL (the base URL decides the currency of some
    /// providers); None for `none`.
    pub fn adapter(self, base_url: &str) -> Option<Box<dyn BalanceAdapter>> {
        Some(match self {
            Self::DeepSeek => Box::new(DeepSeek),
            Self::OpenRouter => Box::new(OpenRouter),
            Self::Moonshot => Box::new(Moonshot { currency: balance::currency_by_host(base_url, ".ai") }),
            Self::SiliconFlow => Box::new(SiliconFlow { currency: balance::currency_by_host(base_url, ".com") }),
            Self::OpenAiCreditGrants => Box::new(OpenAiCreditGrants),
            Self::None => return None,
        })
    }
}

/// Resolves host names for the provider client through the SSRF policy: a name with any internal address
/// fails to resolve, and the connector gets only the address that was checked.
struct PolicyResolver {
    policy: Arc<UpstreamPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the connector puts in the URL's port.
            let addr = policy.resolve(&host, 0).await?;
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once(addr));
            Ok(addrs)
        })
    }
}

/// A response read in full (bounded).
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

/// The HTTP client for provider APIs and webhooks.
pub struct ProviderClient {
    http: reqwest::Client,
    policy: Arc<UpstreamPolicy>,
    timeout: Duration,
}

impl ProviderClient {
    pub fn new(policy: Arc<UpstreamPolicy>, timeout: Duration) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver { policy: policy.clone() }))
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("token-exchange/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::InvalidRequest(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { http, policy, timeout })
    }

    /// Lists the key's models at `<base_url>/models` and checks that every declared model is among them.
    pub async fn verify(&self, base_url: &str, api_key: &str, models: &[String]) -> Result<Verified, VerifyError> {
        let url = format!("{}/models", base_url.trim_end_matches('/'));
        let answer = self.send(self.http.get(&url).header(AUTHORIZATION, bearer(api_key)?), &url, api_key).await?;
        let status = answer.status.as_u16();
        match status {
            200..=299 => {}
            401 | 403 => return Err(VerifyError::InvalidKey(provider_message(&answer, api_key))),
            404 | 405 => {
                return Err(VerifyError::WrongBaseUrl(format!(
                    "GET <base_url>/models answered {status}; base_url must include the API's version path, \
                     e.g. https://api.openai.com/v1"
                )))
            }
            _ => return Err(ProviderError::Status { status, message: provider_message(&answer, api_key) }.into()),
        }
        let listed = listed_models(&answer.body).ok_or_else(|| {
            VerifyError::WrongBaseUrl(
                "GET <base_url>/models did not answer an OpenAI models list (JSON with a `data` array)".into(),
            )
        })?;
        let missing: Vec<String> = models.iter().filter(|m| !listed.contains(m)).cloned().collect();
        if !missing.is_empty() {
            return Err(VerifyError::ModelsNotServed(missing));
        }
        Ok(Verified { listed })
    }

    /// Reads the key's provider balance with the adapter `api`.
    pub async fn balance(&self, api: BalanceApi, base_url: &str, api_key: &str) -> Result<Balance, ProviderError> {
        let adapter = api.adapter(base_url).ok_or(ProviderError::Unsupported)?;
        let url = adapter.url(base_url)?;
        let answer = self.send(self.http.get(&url).header(AUTHORIZATION, bearer(api_key)?), &url, api_key).await?;
        if !answer.status.is_success() {
            let status = answer.status.as_u16();
            return Err(ProviderError::Status { status, message: provider_message(&answer, api_key) });
        }
        adapter.parse(&answer.body)
    }

    /// POSTs a JSON body (a webhook delivery) with extra headers; returns the status. Internal addresses
    /// are refused like seller base URLs; redirects are not followed.
    pub async fn post_json(&self, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Result<u16, ProviderError> {
        let mut request = self.http.post(url).header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ProviderError::InvalidRequest(format!("{name:?} is not a header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| ProviderError::InvalidRequest(format!("the value of {name} is not a header value")))?;
            request = request.header(name, value);
        }
        let answer = self.send(request.body(body), url, "").await?;
        Ok(answer.status.as_u16())
    }

    /// Sends a request to `url` (checked against the SSRF policy first) and reads the answer, bounded. A
    /// 3xx is `Redirect`. `secret` is scrubbed from every error message.
    async fn send(&self, request: reqwest::RequestBuilder, url: &str, secret: &str) -> Result<Answer, ProviderError> {
        self.check_url(url)?;
        let mut response = request.send().await.map_err(|e| self.transport_error(&e, secret))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("(no Location)");
            return Err(ProviderError::Redirect(scrub(location, secret)));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport_error(&e, secret))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ProviderError::BadResponse(format!("the answer is larger than {MAX_BODY_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body })
    }

    /// An http(s) URL with a host; an IP literal must pass the policy here, because the connector
    /// connects to literals without asking the resolver.
    fn check_url(&self, url: &str) -> Result<(), ProviderError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| ProviderError::Forbidden("not a valid URL".into()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ProviderError::Forbidden("the scheme must be http or https".into()));
        }
        // The URL parser has already turned `127.1`, `2130706433` and `0x7f.1` into dotted IPv4.
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ProviderError::Forbidden("the URL has no host".into()))?;
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            self.policy.check(host, ip).map_err(|e| ProviderError::Forbidden(e.to_string()))?;
        }
        Ok(())
    }

    fn transport_error(&self, error: &reqwest::Error, secret: &str) -> ProviderError {
        // The resolver's refusal travels inside the connect error.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if let Some(ssrf) = e.downcast_ref::<SsrfError>() {
                return match ssrf {
                    SsrfError::Forbidden { .. } => ProviderError::Forbidden(ssrf.to_string()),
                    SsrfError::Unresolvable(_) => ProviderError::Unreachable(ssrf.to_string()),
                };
            }
            source = e.source();
        }
        if error.is_timeout() {
            return ProviderError::Unreachable(format!("no answer within {} ms", self.timeout.as_millis()));
        }
        ProviderError::Unreachable(scrub(&innermost(error), secret))
    }
}

fn bearer(api_key: &str) -> Result<HeaderValue, ProviderError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {api_key}"))
        .map_err(|_| ProviderError::InvalidRequest("the API key is not a valid header value".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The ids of an OpenAI models list, or None when the body is not one.
fn listed_models(body: &[u8]) -> Option<Vec<String>> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let data = doc.get("data")?.as_array()?;
    Some(data.iter().filter_map(|m| m.get("id").and_then(serde_json::Value::as_str)).map(String::from).collect())
}

/// The provider's own error message (OpenAI's `error.message`, or a `message`/`msg` field), else the
/// HTTP reason; cut short and without the key.
fn provider_message(answer: &Answer, secret: &str) -> String {
    let doc: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
    let message = doc.as_ref().and_then(|doc| {
        [doc.pointer("/error/message"), doc.get("error"), doc.get("message"), doc.get("msg")]
            .into_iter()
            .flatten()
            .find_map(serde_json::Value::as_str)
            .map(str::to_owned)
    });
    let message = message.unwrap_or_else(|| answer.status.canonical_reason().unwrap_or("no reason given").to_owned());
    scrub(&message, secret)
}

/// Cuts `text` short and removes `secret` (and any control characters) from it.
fn scrub(text: &str, secret: &str) -> String {
    let text = if secret.is_empty() { text.to_owned() } else { text.replace(secret, "***") };
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(MAX_MESSAGE_CHARS).collect();
    if text.chars().count() > MAX_MESSAGE_CHARS {
        out.push('…');
    }
    out
}

/// The most specific message of an error chain (reqwest's own says only "error sending request").
fn innermost(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        message = e.to_string();
        source = e.source();
    }
    message
}

#[cfg(test)]
mod tests;
