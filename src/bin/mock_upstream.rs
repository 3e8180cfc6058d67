//! Mock OpenAI upstream for tests and demos.
//!
//! It speaks OpenAI's wire format and takes its behaviour from the tokens of the caller's API key
//! (`sk-mock-slow-nousage-abc`), so one gateway under test can hold healthy and broken seller keys
//! side by side. It is standalone on purpose: sharing code with the gateway would let a gateway bug
//! hide in the yardstick it is measured against.
//!
//! Key tokens (the `-`-separated parts of the key):
//! - `invalid`: every endpoint answers 401, `GET /v1/models` included (verification refuses the key).
//! - `fail400` … `fail503`, `hang`: chat and embeddings only, so that such keys still verify on deposit.
//! - `retry<N>`: an injected 429 carries `Retry-After: N` (default 1).
//! - `redirect`: every `/v1/*` answer is a `307` to another path.
//! - `nousage`, `slow`, `drop`, `split`, `crlf`: how chat answers are delivered.
//!
//! Provider balances: `PUT /_mock/balance/{api_key}` opens an account
//! (`{"micros","currency","prompt_micros_per_token","completion_micros_per_token"}`), `POST
//! /_mock/balance/{api_key}/drain {"micros"}` spends outside the platform, `GET /_mock/balance/{api_key}`
//! reads it. Every chat/embedding answer of a key with an account is charged prompt × prompt price +
//! completion × completion price before its first byte. The five provider balance APIs answer in their real
//! formats from the caller's key: `/user/balance` (DeepSeek), `/v1/credits` (OpenRouter),
//! `/v1/users/me/balance` (Moonshot), `/v1/user/info` (SiliconFlow), `/dashboard/billing/credit_grants`
//! (OpenAI); a key without an account reads a fixed 100 USD. Formats without a currency report the
//! account's amount as it is (Moonshot, SiliconFlow: meant for CNY accounts; OpenRouter, OpenAI: USD).
//!
//! `/_mock/requests` and `/_mock/counts` list chat, embeddings and other `/v1` calls; model listings and
//! balance readings (verification and risk checks, not traffic) are listed apart in `/_mock/probes`.
//! `--no-record` keeps neither list (both stay empty): the benchmark (`bench/run`) sends millions of
//! requests, and an ever-growing history behind one mutex would distort the yardstick.

use std::{
    collections::BTreeMap,
    future::IntoFuture,
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    extract::Path,
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
    Json, Router,
};
use base64::Engine;
use clap::Parser;
use futures::{stream, StreamExt};
use rand::{distributions::Alphanumeric, Rng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

/// Tests send multi-megabyte prompts; axum's default limit is 2 MiB.
const BODY_LIMIT: usize = 64 * 1024 * 1024;
const DEFAULT_COMPLETION_TOKENS: i64 = 8;
const MAX_COMPLETION_TOKENS: i64 = 4096;
const EMBEDDING_DIMENSIONS: usize = 8;
const SLOW_EVENT_DELAY: Duration = Duration::from_millis(100);
const HANG_FOR: Duration = Duration::from_secs(3600);
/// Content chunks a `drop` stream sends before it cuts the connection.
const DROP_AFTER_CONTENT_CHUNKS: usize = 2;
/// Long enough for hyper to flush what a `drop` stream sent before the connection is cut.
const DROP_FLUSH_DELAY: Duration = Duration::from_millis(20);
const SPLIT_MAX_FRAME: usize = 7;
/// Graceful shutdown waits for open responses; a slow stream may run for minutes, so it gets cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Every model a test deposits a mock key for must be here (verification checks the declared models
/// against this list); `gpt-9-unknown` must not be. The made-up names keep one test's keys apart from
/// another's within a gateway.
const MODELS: [&str; 19] = [
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-4.1",
    "o3-mini",
    "gpt-4o-audio-preview",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "broken-500-a",
    "broken-500-b",
    "broken-401-a",
    "broken-401-b",
    "late-model",
    "instant-model",
    "other-model",
    "m-plain",
    "m-split",
    "m-crlf0",
];
/// What a key without a balance account reads: 100 USD, forever.
const DEFAULT_BALANCE_MICROS: i64 = 100_000_000;
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
/// Above tokio's default of 1,024 (the kernel caps it at net.core.somaxconn): the benchmark's proxies open
/// thousands of upstream connections at once, and SYNs dropped by a full accept queue come back only a
/// second later, as connect timeouts of the proxy under test.
const LISTEN_BACKLOG: u32 = 16_384;

#[derive(Parser)]
#[command(about = "Mock OpenAI upstream whose behaviour is picked by tokens in the API key")]
struct Args {
    /// Port 0 picks a free port; the bound address is printed as `LISTENING <ip:port>`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Keep no history of requests and probes (`/_mock/requests`, `/_mock/counts` and `/_mock/probes`
    /// stay empty), for load tests.
    #[arg(long)]
    no_record: bool,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // Installed before announcing, so a test that signals right after `LISTENING` gets a clean exit.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        let _ = stop_tx.send(true);
    });

    let socket =
        if args.listen.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(args.listen)?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    let addr = listener.local_addr()?;
    // Without it Nagle would merge `split` frames again before a proxy could see them.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            eprintln!("mock-upstream: set_nodelay failed: {err}");
        }
    });
    let mock = Arc::new(Mock {
        requests: Mutex::default(),
        probes: Mutex::default(),
        accounts: Mutex::default(),
        record: !args.no_record,
        stop: stop_rx.clone(),
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "LISTENING {addr}")?;
        out.flush()?;
    }

    let server = axum::serve(listener, router(mock)).with_graceful_shutdown(stopped(stop_rx.clone()));
    tokio::select! {
        result = server.into_future() => result,
        () = async { stopped(stop_rx).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
    }
}

fn router(mock: Arc<Mock>) -> Router {
    Router::new()
        .route("/_mock/requests", get(list_requests).delete(clear_requests))
        .route("/_mock/counts", get(request_counts))
        .route("/_mock/probes", get(list_probes).delete(clear_probes))
        .route("/_mock/balance/{api_key}", get(read_account).put(open_account))
        .route("/_mock/balance/{api_key}/drain", post(drain_account))
        .fallback(openai_api)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(mock)
}

/// Resolves once shutdown is requested (or the signal task is gone, which means the same).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

struct Mock {
    requests: Mutex<Vec<RecordedRequest>>,
    probes: Mutex<Vec<Probe>>,
    accounts: Mutex<BTreeMap<String, Account>>,
    /// False with `--no-record`: `requests` and `probes` stay empty.
    record: bool,
    stop: watch::Receiver<bool>,
}

impl Mock {
    /// A handler that panicked while holding the lock must not break every later request.
    fn requests(&self) -> std::sync::MutexGuard<'_, Vec<RecordedRequest>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, Vec<Probe>> {
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Account>> {
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the key's provider account holds now (the fixed default without an account).
    fn balance_of(&self, api_key: &str) -> Account {
        self.accounts().get(api_key).cloned().unwrap_or_default()
    }

    /// Charges an answer to the key's account, if it has one, as a provider bills what it generates.
    fn charge(&self, api_key: &str, prompt_tokens: u64, completion_tokens: u64) {
        if let Some(account) = self.accounts().get_mut(api_key) {
            let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let cost = tokens(prompt_tokens)
                .saturating_mul(account.prompt_micros_per_token)
                .saturating_add(tokens(completion_tokens).saturating_mul(account.completion_micros_per_token));
            account.spend(cost);
        }
    }
}

/// A model listing or a balance reading: what verification and risk checks asked.
#[derive(Clone, Serialize)]
struct Probe {
    method: String,
    path: String,
    api_key: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Currency {
    #[serde(rename = "USD")]
    Usd,
    #[serde(rename = "CNY")]
    Cny,
}

impl Currency {
    fn code(self) -> &'static str {
        match self {
            Self::Usd => "USD",
            Self::Cny => "CNY",
        }
    }
}

/// A key's provider account, in millionths of its currency.
#[derive(Clone)]
struct Account {
    micros: i64,
    /// Spent since the account was opened (requests and drains): OpenRouter and OpenAI report it.
    used_micros: i64,
    currency: Currency,
    prompt_micros_per_token: i64,
    completion_micros_per_token: i64,
    /// False for the fixed default of keys without an account.
    open: bool,
}

impl Default for Account {
    fn default() -> Self {
        Self {
            micros: DEFAULT_BALANCE_MICROS,
            used_micros: 0,
            currency: Currency::Usd,
            prompt_micros_per_token: 0,
            completion_micros_per_token: 0,
            open: false,
        }
    }
}

impl Account {
    fn spend(&mut self, micros: i64) {
        self.micros = self.micros.saturating_sub(micros);
        self.used_micros = self.used_micros.saturating_add(micros);
    }

    fn view(&self) -> Value {
        json!({
            "micros": self.micros,
            "currency": self.currency.code(),
            "used_micros": self.used_micros,
            "prompt_micros_per_token": self.prompt_micros_per_token,
            "completion_micros_per_token": self.completion_micros_per_token,
            "account": self.open,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAccount {
    micros: i64,
    #[serde(default = "usd")]
    currency: Currency,
    #[serde(default)]
    prompt_micros_per_token: i64,
    #[serde(default)]
    completion_micros_per_token: i64,
}

fn usd() -> Currency {
    Currency::Usd
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Drain {
    micros: i64,
}

async fn read_account(State(mock): State<Arc<Mock>>, Path(api_key): Path<String>) -> Json<Value> {
    Json(mock.balance_of(&api_key).view())
}

/// Opens (or resets) the key's account.
async fn open_account(
    State(mock): State<Arc<Mock>>,
    Path(api_key): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: OpenAccount = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid_request(format!(
            "expected {{\"micros\": i64, \"currency\": \"USD\"|\"CNY\", \"prompt_micros_per_token\": i64, \
             \"completion_micros_per_token\": i64}}: {e}"
        ))
    })?;
    let account = Account {
        micros: request.micros,
        used_micros: 0,
        currency: request.currency,
        prompt_micros_per_token: request.prompt_micros_per_token,
        completion_micros_per_token: request.completion_micros_per_token,
        open: true,
    };
    let view = account.view();
    mock.accounts().insert(api_key, account);
    Ok(Json(view))
}

/// Spends from the account "outside" the platform (another client of the same provider key).
async fn drain_account(
    State(mock): State<Arc<Mock>>,
    Path(api_key): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: Drain = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_request(format!("expected {{\"micros\": i64}}: {e}")))?;
    let mut accounts = mock.accounts();
    let account = accounts.get_mut(&api_key).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "no account for this key; PUT one first", "invalid_request_error", None)
    })?;
    account.spend(request.micros);
    Ok(Json(account.view()))
}

async fn list_probes(State(mock): State<Arc<Mock>>) -> Json<Vec<Probe>> {
    Json(mock.probes().clone())
}

async fn clear_probes(State(mock): State<Arc<Mock>>) -> StatusCode {
    mock.probes().clear();
    StatusCode::NO_CONTENT
}

#[derive(Clone, Serialize)]
struct RecordedRequest {
    method: String,
    path: String,
    api_key: Option<String>,
    body_len: usize,
    body_sha256: String,
    model: Option<String>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    headers: BTreeMap<String, String>,
}

impl RecordedRequest {
    fn new(method: &Method, path: &str, headers: &HeaderMap, body: &[u8], json: Option<&Value>) -> Self {
        let mut header_values = BTreeMap::<String, String>::new();
        for (name, value) in headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            header_values
                .entry(name.as_str().to_owned())
                .and_modify(|joined| {
                    joined.push_str(", ");
                    joined.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        let field = |pointer: &str| json.and_then(|json| json.pointer(pointer));
        Self {
            method: method.to_string(),
            path: path.to_owned(),
            api_key: bearer_key(headers).map(str::to_owned),
            body_len: body.len(),
            body_sha256: hex::encode(Sha256::digest(body)),
            model: field("/model").and_then(Value::as_str).map(str::to_owned),
            stream: field("/stream").and_then(Value::as_bool),
            include_usage: field("/stream_options/include_usage").and_then(Value::as_bool),
            headers: header_values,
        }
    }
}

async fn list_requests(State(mock): State<Arc<Mock>>) -> Json<Vec<RecordedRequest>> {
    Json(mock.requests().clone())
}

async fn clear_requests(State(mock): State<Arc<Mock>>) -> StatusCode {
    mock.requests().clear();
    StatusCode::NO_CONTENT
}

async fn request_counts(State(mock): State<Arc<Mock>>) -> Json<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for key in mock.requests().iter().filter_map(|request| request.api_key.clone()) {
        *counts.entry(key).or_insert(0) += 1;
    }
    Json(counts)
}

async fn openai_api(
    State(mock): State<Arc<Mock>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let api_key = bearer_key(&headers);
    let endpoint = Endpoint::find(&method, path);
    if matches!(endpoint, Some(Endpoint::Models | Endpoint::Balance(_))) {
        if mock.record {
            mock.probes().push(Probe {
                method: method.to_string(),
                path: path.to_owned(),
                api_key: api_key.map(str::to_owned),
            });
        }
    } else if path.starts_with("/v1/") {
        if mock.record {
            let json = serde_json::from_slice::<Value>(&body).ok();
            // Recorded before acting, so tests also see requests that fail or hang.
            mock.requests().push(RecordedRequest::new(&method, path, &headers, &body, json.as_ref()));
        }
    } else {
        return ApiError::unknown_url(&method, path).into_response();
    }
    match answer(&mock, &method, path, endpoint, api_key, &body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn answer(
    mock: &Mock,
    method: &Method,
    path: &str,
    endpoint: Option<Endpoint>,
    api_key: Option<&str>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let behaviour = api_key.map(Behaviour::from_api_key).unwrap_or_default();
    if behaviour.redirect && path.starts_with("/v1/") {
        return Ok(redirect(path));
    }
    let endpoint = endpoint.ok_or_else(|| ApiError::unknown_url(method, path))?;
    let api_key = api_key.ok_or_else(ApiError::missing_api_key)?;
    if behaviour.invalid {
        return Err(ApiError::injected(StatusCode::UNAUTHORIZED, api_key, &behaviour));
    }
    // Listing models and reading the balance work for keys that fail later: they must pass verification.
    match endpoint {
        Endpoint::Models => return Ok(Json(models()).into_response()),
        Endpoint::Balance(format) => return Ok(format.answer(&mock.balance_of(api_key))),
        Endpoint::ChatCompletions | Endpoint::Embeddings => {}
    }
    if let Some(status) = behaviour.fail {
        return Err(ApiError::injected(status, api_key, &behaviour));
    }
    if behaviour.hang {
        let mut stop = mock.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(HANG_FOR) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
        return Err(ApiError::shutting_down());
    }
    let json = serde_json::from_slice::<Value>(body).ok();
    let prompt_tokens = body.len().div_ceil(4) as u64;
    let (response, completion_tokens) = match endpoint {
        Endpoint::ChatCompletions => chat_completion(json, prompt_tokens, &behaviour)?,
        _ => (embeddings(json, prompt_tokens, &behaviour)?, 0),
    };
    // Before the first byte: a provider has billed the answer by the time the client reads it.
    mock.charge(api_key, prompt_tokens, completion_tokens);
    Ok(response)
}

/// `307` to the same path under `/moved`: a provider that moved its API.
fn redirect(path: &str) -> Response {
    let location = format!("/moved{path}");
    let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ")?.trim();
    (!key.is_empty()).then_some(key)
}

#[derive(Clone, Copy)]
enum Endpoint {
    ChatCompletions,
    Embeddings,
    Models,
    Balance(BalanceFormat),
}

impl Endpoint {
    fn find(method: &Method, path: &str) -> Option<Self> {
        match (method.as_str(), path) {
            ("POST", "/v1/chat/completions") => Some(Self::ChatCompletions),
            ("POST", "/v1/embeddings") => Some(Self::Embeddings),
            ("GET", "/v1/models") => Some(Self::Models),
            ("GET", "/user/balance") => Some(Self::Balance(BalanceFormat::DeepSeek)),
            ("GET", "/v1/credits") => Some(Self::Balance(BalanceFormat::OpenRouter)),
            ("GET", "/v1/users/me/balance") => Some(Self::Balance(BalanceFormat::Moonshot)),
            ("GET", "/v1/user/info") => Some(Self::Balance(BalanceFormat::SiliconFlow)),
            ("GET", "/dashboard/billing/credit_grants") => Some(Self::Balance(BalanceFormat::OpenAi)),
            _ => None,
        }
    }
}

/// The real answer formats of the providers' balance APIs.
#[derive(Clone, Copy)]
enum BalanceFormat {
    DeepSeek,
    OpenRouter,
    Moonshot,
    SiliconFlow,
    OpenAi,
}

impl BalanceFormat {
    /// Amounts are written as exact decimals (never through a float), as providers send them.
    fn answer(self, account: &Account) -> Response {
        let balance = decimal(account.micros, 1);
        let body = match self {
            Self::DeepSeek => json!({
                "is_available": account.micros > 0,
                "balance_infos": [{
                    "currency": account.currency.code(),
                    "total_balance": decimal(account.micros, 2),
                    "granted_balance": "0.00",
                    "topped_up_balance": decimal(account.micros, 2),
                }],
            })
            .to_string(),
            Self::OpenRouter => format!(
                r#"{{"data":{{"total_credits":{},"total_usage":{}}}}}"#,
                decimal(account.micros.saturating_add(account.used_micros), 1),
                decimal(account.used_micros, 1)
            ),
            Self::Moonshot => format!(
                r#"{{"code":0,"data":{{"available_balance":{balance},"voucher_balance":0,"cash_balance":{balance}}},"scode":"0x0","status":true}}"#
            ),
            Self::SiliconFlow => json!({
                "code": 20000,
                "message": "OK",
                "status": true,
                "data": {
                    "id": "mock-user",
                    "name": "mock",
                    "image": "",
                    "email": "",
                    "isAdmin": false,
                    "balance": "0.00",
                    "status": "normal",
                    "introduction": "",
                    "role": "",
                    "chargeBalance": decimal(account.micros, 2),
                    "totalBalance": decimal(account.micros, 2),
                },
            })
            .to_string(),
            Self::OpenAi => format!(
                r#"{{"object":"credit_summary","total_granted":{},"total_used":{},"total_available":{balance}}}"#,
                decimal(account.micros.saturating_add(account.used_micros), 1),
                decimal(account.used_micros, 1)
            ),
        };
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// Millionths as a decimal with at least `min_fraction` fractional digits: `110.00`, `49.58894`.
fn decimal(micros: i64, min_fraction: usize) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let mut fraction = format!("{:06}", abs % 1_000_000);
    while fraction.len() > min_fraction && fraction.ends_with('0') {
        fraction.pop();
    }
    if fraction.is_empty() {
        format!("{sign}{}", abs / 1_000_000)
    } else {
        format!("{sign}{}.{fraction}", abs / 1_000_000)
    }
}

#[derive(Default)]
struct Behaviour {
    fail: Option<StatusCode>,
    invalid: bool,
    redirect: bool,
    retry_after: Option<u64>,
    nousage: bool,
    slow: bool,
    hang: bool,
    drop: bool,
    split: bool,
    crlf: bool,
}

impl Behaviour {
    fn from_api_key(api_key: &str) -> Self {
        let mut behaviour = Self::default();
        for token in api_key.split('-') {
            match token {
                "fail400" => behaviour.fail = Some(StatusCode::BAD_REQUEST),
                "fail401" => behaviour.fail = Some(StatusCode::UNAUTHORIZED),
                "fail403" => behaviour.fail = Some(StatusCode::FORBIDDEN),
                "fail429" => behaviour.fail = Some(StatusCode::TOO_MANY_REQUESTS),
                "fail500" => behaviour.fail = Some(StatusCode::INTERNAL_SERVER_ERROR),
                "fail502" => behaviour.fail = Some(StatusCode::BAD_GATEWAY),
                "fail503" => behaviour.fail = Some(StatusCode::SERVICE_UNAVAILABLE),
                "invalid" => behaviour.invalid = true,
                "redirect" => behaviour.redirect = true,
                "nousage" => behaviour.nousage = true,
                "slow" => behaviour.slow = true,
                "hang" => behaviour.hang = true,
                "drop" => behaviour.drop = true,
                "split" => behaviour.split = true,
                "crlf" => behaviour.crlf = true,
                _ => {
                    if let Some(secs) = token.strip_prefix("retry").and_then(|n| n.parse().ok()) {
                        behaviour.retry_after = Some(secs);
                    }
                }
            }
        }
        behaviour
    }
}

/// OpenAI's error body. `code` is null where OpenAI itself sends null.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    /// `Retry-After` of a 429.
    retry_after: u64,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str, code: Option<&'static str>) -> Self {
        Self { status, message: message.into(), kind, code, retry_after: DEFAULT_RETRY_AFTER_SECS }
    }

    fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, "invalid_request_error", None)
    }

    fn unknown_url(method: &Method, path: &str) -> Self {
        let message = format!("Invalid URL ({method} {path})");
        Self::new(StatusCode::NOT_FOUND, message, "invalid_request_error", None)
    }

    fn missing_api_key() -> Self {
        let message = "You didn't provide an API key. You need to provide your API key in an Authorization \
                       header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
                       field (with blank username) if you're accessing the API from your browser and are \
                       prompted for a username and password. You can obtain an API key from \
                       https://platform.openai.com/account/api-keys.";
        Self::new(StatusCode::UNAUTHORIZED, message, "invalid_request_error", None)
    }

    fn shutting_down() -> Self {
        let message = "The mock upstream is shutting down.";
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message, "server_error", Some("service_unavailable"))
    }

    fn injected(status: StatusCode, api_key: &str, behaviour: &Behaviour) -> Self {
        let (message, kind, code) = match status {
            StatusCode::UNAUTHORIZED => (
                format!(
                    "Incorrect API key provided: {}. You can find your API key at \
                     https://platform.openai.com/account/api-keys.",
                    mask_api_key(api_key)
                ),
                "invalid_request_error",
                "invalid_api_key",
            ),
            StatusCode::FORBIDDEN => (
                "Country, region, or territory not supported".to_owned(),
                "request_forbidden",
                "unsupported_country_region_territory",
            ),
            StatusCode::TOO_MANY_REQUESTS => (
                "Rate limit reached for requests. Please try again in 1s.".to_owned(),
                "requests",
                "rate_limit_exceeded",
            ),
            StatusCode::BAD_REQUEST => (
                "Invalid request (injected by the mock upstream).".to_owned(),
                "invalid_request_error",
                "invalid_value",
            ),
            StatusCode::SERVICE_UNAVAILABLE => {
                ("The server is overloaded or not ready yet.".to_owned(), "server_error", "service_unavailable")
            }
            StatusCode::BAD_GATEWAY => ("Bad gateway.".to_owned(), "server_error", "bad_gateway"),
            _ => (
                "The server had an error while processing your request. Sorry about that!".to_owned(),
                "server_error",
                "server_error",
            ),
        };
        let retry_after = behaviour.retry_after.unwrap_or(DEFAULT_RETRY_AFTER_SECS);
        Self { retry_after, ..Self::new(status, message, kind, Some(code)) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": { "message": self.message, "type": self.kind, "param": null, "code": self.code }
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
        }
        response
    }
}

/// OpenAI's style: `sk-mock-fail401-abc` → `sk-mo***abc`; short keys are hidden entirely.
fn mask_api_key(api_key: &str) -> String {
    let len = api_key.chars().count();
    if len < 10 {
        return "***".to_owned();
    }
    let head: String = api_key.chars().take(5).collect();
    let tail: String = api_key.chars().skip(len - 3).collect();
    format!("{head}***{tail}")
}

fn request_object(json: Option<Value>) -> Result<Map<String, Value>, ApiError> {
    match json {
        Some(Value::Object(object)) => Ok(object),
        _ => Err(ApiError::invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using \
             your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not \
             valid JSON.)",
        )),
    }
}

fn request_model(request: &Map<String, Value>) -> Result<String, ApiError> {
    match request.get("model") {
        Some(Value::String(model)) => Ok(model.clone()),
        _ => Err(ApiError::invalid_request("you must provide a model parameter")),
    }
}

fn optional_bool(request: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(ApiError::invalid_request(format!("Invalid type for '{name}': expected a boolean."))),
    }
}

fn completion_tokens(request: &Map<String, Value>) -> Result<u64, ApiError> {
    let limit = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .find_map(|name| request.get(name).filter(|value| !value.is_null()).map(|value| (name, value)));
    let tokens = match limit {
        None => DEFAULT_COMPLETION_TOKENS,
        Some((name, value)) => value
            .as_i64()
            .ok_or_else(|| ApiError::invalid_request(format!("Invalid type for '{name}': expected an integer.")))?,
    };
    Ok(tokens.clamp(1, MAX_COMPLETION_TOKENS).unsigned_abs())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

fn with_usage(mut body: Value, usage: Option<Value>) -> Value {
    if let (Some(object), Some(usage)) = (body.as_object_mut(), usage) {
        object.insert("usage".to_owned(), usage);
    }
    body
}

/// The answer and the completion tokens it generates (a `drop` stream generates only what it sends).
fn chat_completion(
    json: Option<Value>,
    prompt_tokens: u64,
    behaviour: &Behaviour,
) -> Result<(Response, u64), ApiError> {
    let request = request_object(json)?;
    let model = request_model(&request)?;
    let tokens = completion_tokens(&request)?;
    let stream = optional_bool(&request, "stream")?;
    let include_usage = request
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let random: String = rand::thread_rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
    let completion = Completion {
        id: format!("chatcmpl-{random}"),
        created: unix_now(),
        model,
        tokens,
        usage: (!behaviour.nousage).then(|| usage(prompt_tokens, tokens)),
    };
    if !stream {
        return Ok((Json(completion.message()).into_response(), tokens));
    }
    let mut events = completion.chunks(include_usage);
    let (ending, generated) = if behaviour.drop {
        let content_chunks =
            usize::try_from(tokens).map_or(DROP_AFTER_CONTENT_CHUNKS, |tokens| tokens.min(DROP_AFTER_CONTENT_CHUNKS));
        events.truncate(1 + content_chunks);
        (StreamEnd::Abort, content_chunks as u64)
    } else {
        (StreamEnd::Done, tokens)
    };
    Ok((sse_response(&events, ending, behaviour), generated))
}

struct Completion {
    id: String,
    created: u64,
    model: String,
    tokens: u64,
    usage: Option<Value>,
}

impl Completion {
    fn token_text(index: u64) -> String {
        format!("tok{index} ")
    }

    fn message(&self) -> Value {
        let content: String = (0..self.tokens).map(Self::token_text).collect();
        let body = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": content, "refusal": null, "annotations": [] },
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        });
        with_usage(body, self.usage.clone())
    }

    /// The role chunk, one chunk per token, the finish chunk, and the usage chunk when asked for.
    fn chunks(&self, include_usage: bool) -> Vec<Value> {
        let usage = self.usage.clone().filter(|_| include_usage);
        // OpenAI marks every chunk with `"usage": null` once usage was requested.
        let chunk = |choices: Value, usage: Option<Value>| {
            let body = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "service_tier": "default",
                "system_fingerprint": "fp_mock",
                "choices": choices,
            });
            with_usage(body, usage)
        };
        let choice = |delta: Value, finish_reason: Option<&str>| {
            let choices = json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }]);
            chunk(choices, usage.as_ref().map(|_| Value::Null))
        };
        let mut chunks = vec![choice(json!({ "role": "assistant", "content": "", "refusal": null }), None)];
        chunks.extend((0..self.tokens).map(|index| choice(json!({ "content": Self::token_text(index) }), None)));
        chunks.push(choice(json!({}), Some("stop")));
        if let Some(usage) = usage.clone() {
            chunks.push(chunk(json!([]), Some(usage)));
        }
        chunks
    }
}

#[derive(Clone, Copy)]
enum StreamEnd {
    Done,
    /// Cut the connection mid-body, as a crashing upstream would.
    Abort,
}

enum BeforeFrame {
    Nothing,
    YieldNow,
    Sleep(Duration),
}

fn sse_response(events: &[Value], end: StreamEnd, behaviour: &Behaviour) -> Response {
    let newline = if behaviour.crlf { "\r\n" } else { "\n" };
    // Real providers (OpenRouter) send comments; a parser that chokes on them must fail here first.
    let mut blocks = vec![format!(": mock keep-alive{newline}{newline}")];
    blocks.extend(events.iter().map(|event| format!("data: {event}{newline}{newline}")));
    if matches!(end, StreamEnd::Done) {
        blocks.push(format!("data: [DONE]{newline}{newline}"));
    }
    let frames = stream::iter(frames(&blocks, behaviour)).then(|(before, bytes)| async move {
        match before {
            BeforeFrame::Nothing => {}
            BeforeFrame::YieldNow => tokio::task::yield_now().await,
            BeforeFrame::Sleep(delay) => tokio::time::sleep(delay).await,
        }
        Ok::<_, std::io::Error>(bytes)
    });
    let body = match end {
        StreamEnd::Done => Body::from_stream(frames),
        StreamEnd::Abort => Body::from_stream(frames.chain(stream::once(async {
            // Erroring at once would make hyper discard its unsent buffer, head included.
            tokio::time::sleep(DROP_FLUSH_DELAY).await;
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "mock upstream dropped the stream"))
        }))),
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One frame per SSE block, or for `split` the same bytes cut into frames of 1..=7 bytes that
/// ignore block boundaries. `slow` sleeps before every frame in which a block starts.
fn frames(blocks: &[String], behaviour: &Behaviour) -> Vec<(BeforeFrame, Bytes)> {
    let mut block_starts = Vec::with_capacity(blocks.len());
    let mut all = Vec::new();
    for block in blocks {
        block_starts.push(all.len());
        all.extend_from_slice(block.as_bytes());
    }
    let all = Bytes::from(all);
    let mut frames = Vec::new();
    let mut start = 0;
    let mut next_block = 0;
    while start < all.len() {
        let len = if behaviour.split {
            frames.len() % SPLIT_MAX_FRAME + 1
        } else {
            blocks.get(next_block).map_or(all.len() - start, String::len)
        };
        let end = (start + len).min(all.len());
        let starts_block = block_starts.get(next_block).is_some_and(|&block_start| block_start < end);
        while block_starts.get(next_block).is_some_and(|&block_start| block_start < end) {
            next_block += 1;
        }
        let before = if behaviour.slow && starts_block {
            BeforeFrame::Sleep(SLOW_EVENT_DELAY)
        } else if behaviour.split {
            BeforeFrame::YieldNow
        } else {
            BeforeFrame::Nothing
        };
        frames.push((before, all.slice(start..end)));
        start = end;
    }
    frames
}

fn embeddings(json: Option<Value>, prompt_tokens: u64, behaviour: &Behaviour) -> Result<Response, ApiError> {
    let request = request_object(json)?;
    let model = request_model(&request)?;
    let inputs = embedding_inputs(request.get("input"))?;
    // The official Python SDK asks for base64 unless the caller picks a format.
    let base64 = match request.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(_) => return Err(ApiError::invalid_request("'encoding_format' must be 'float' or 'base64'.")),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding(input);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|value| value.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    let body = json!({ "object": "list", "data": data, "model": model });
    let usage = (!behaviour.nousage).then(|| json!({ "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens }));
    Ok(Json(with_usage(body, usage)).into_response())
}

/// The inputs to embed: a string, an array of strings, one token array, or an array of token arrays.
fn embedding_inputs(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let is_token_array = |value: &Value| value.as_array().is_some_and(|tokens| tokens.iter().all(Value::is_u64));
    let inputs = match input {
        Some(text @ Value::String(_)) => vec![text.clone()],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            vec![Value::Array(items.clone())]
        }
        Some(Value::Array(items))
            if !items.is_empty() && (items.iter().all(Value::is_string) || items.iter().all(is_token_array)) =>
        {
            items.clone()
        }
        _ => {
            return Err(ApiError::invalid_request(
                "'input' must be a string, an array of strings, or an array of token arrays.",
            ))
        }
    };
    Ok(inputs)
}

/// Deterministic per input, so tests can compare vectors across calls.
fn embedding(input: &Value) -> Vec<f32> {
    let digest = Sha256::digest(input.to_string().as_bytes());
    digest.iter().take(EMBEDDING_DIMENSIONS).map(|&byte| f32::from(byte) / 127.5 - 1.0).collect()
}

fn models() -> Value {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock" }))
        .collect();
    json!({ "object": "list", "data": data })
}
