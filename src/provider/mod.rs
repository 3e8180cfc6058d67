//! Calls to seller keys' providers outside the request path: key verification (list models) and provider
//! balance readings, through one HTTP client that refuses internal addresses (`crate::ssrf`) and never
//! follows redirects. Also used for seller webhooks.
//!
//! INTERFACE SKELETON: the bodies below are placeholders until the provider client lands.

use std::sync::Arc;
use std::time::Duration;

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
    /// Parses a stored/API name: deepseek, openrouter, moonshot, siliconflow, openai_credit_grants, none.
    pub fn parse(name: &str) -> Option<Self> {
        let _ = name;
        None
    }

    pub fn as_str(self) -> &'static str {
        "none"
    }

    /// The adapter for a provider name when the key does not name one.
    pub fn for_provider(provider: &str) -> Self {
        let _ = provider;
        Self::None
    }

    /// The key's adapter: its `balance_api` column, else derived from its provider.
    pub fn of_key(balance_api: &str, provider: &str) -> Self {
        Self::parse(balance_api).unwrap_or_else(|| Self::for_provider(provider))
    }
}

/// The HTTP client for provider APIs and webhooks.
pub struct ProviderClient {
    _policy: Arc<crate::ssrf::UpstreamPolicy>,
    _timeout: Duration,
}

impl ProviderClient {
    pub fn new(policy: Arc<crate::ssrf::UpstreamPolicy>, timeout: Duration) -> Result<Self, ProviderError> {
        Ok(Self { _policy: policy, _timeout: timeout })
    }

    /// Lists the key's models at `<base_url>/models` and checks that every declared model is among them.
    pub async fn verify(&self, base_url: &str, api_key: &str, models: &[String]) -> Result<Verified, VerifyError> {
        let _ = (base_url, api_key, models);
        Err(VerifyError::Provider(ProviderError::Unsupported))
    }

    /// Reads the key's provider balance with the adapter `api`.
    pub async fn balance(&self, api: BalanceApi, base_url: &str, api_key: &str) -> Result<Balance, ProviderError> {
        let _ = (api, base_url, api_key);
        Err(ProviderError::Unsupported)
    }

    /// POSTs a JSON body (a webhook delivery) with extra headers; returns the status. Internal addresses
    /// are refused like seller base URLs; redirects are not followed.
    pub async fn post_json(&self, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Result<u16, ProviderError> {
        let _ = (url, headers, body);
        Err(ProviderError::Unsupported)
    }
}
