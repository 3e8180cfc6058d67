//! Risk control end to end: the real gateway and the mock provider, whose balance the tests drain "outside"
//! the platform. A diluted key is flagged within one check and stops receiving traffic; honest traffic with
//! slow streams in flight is never flagged; a failing key is paused and resumed once it verifies again;
//! notifications reach a seller's webhook, signed; sellers see nothing of each other or of the reviews.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, Gateway, TestEnv};
use hmac::{Hmac, Mac};
use reqwest::Method;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{json, Value};
use sha2::Sha256;
use token_exchange::db::entities::{hosted_keys, key_balance_samples};

const MODEL: &str = "gpt-4o-mini";
const CHECK_INTERVAL_MS: &str = "1000";
const SETTLE_DELAY_MS: &str = "500";
/// The mock charges 1 and 2 micro-USD per prompt and completion token, the harness's price is 1 and 2
/// credits per token, and a USD is 1,000,000 credits: the provider's drop equals what the platform meters.
const PROMPT_MICROS: i64 = 1;
const COMPLETION_MICROS: i64 = 2;
/// 1,000 USD.
const ACCOUNT_MICROS: i64 = 1_000_000_000;

backend_tests!(
    a_drained_key_is_flagged_taken_out_and_restored_by_review,
    honest_traffic_with_streams_in_flight_is_never_flagged,
    a_failing_key_is_paused_and_resumed_once_it_verifies,
    notifications_reach_the_sellers_webhook_signed,
);

fn risk_env(min_excess: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TOKEX_RISK_CHECK_INTERVAL_MS", CHECK_INTERVAL_MS.to_string()),
        ("TOKEX_RISK_SETTLE_DELAY_MS", SETTLE_DELAY_MS.to_string()),
        ("TOKEX_RISK_DILUTION_MIN_EXCESS_CREDITS", min_excess.to_string()),
        ("TOKEX_RISK_CREDITS_PER_USD", "1000000".to_string()),
    ]
}

async fn start(env: &TestEnv, vars: &[(&'static str, String)]) -> Gateway {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.start_gateway_with(&vars).await
}

async fn mock_call(env: &TestEnv, method: Method, path: &str, body: Option<Value>) -> Value {
    let client = common::http_client();
    let mut request = client.request(method, format!("http://{}{path}", env.mock.addr));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Opens the key's provider account at the mock with the price parity above.
async fn open_account(env: &TestEnv, api_key: &str) {
    let body = json!({
        "micros": ACCOUNT_MICROS,
        "currency": "USD",
        "prompt_micros_per_token": PROMPT_MICROS,
        "completion_micros_per_token": COMPLETION_MICROS,
    });
    mock_call(env, Method::PUT, &format!("/_mock/balance/{api_key}"), Some(body)).await;
}

/// Someone else spends from the key at the provider.
async fn drain(env: &TestEnv, api_key: &str, micros: i64) {
    mock_call(env, Method::POST, &format!("/_mock/balance/{api_key}/drain"), Some(json!({ "micros": micros }))).await;
}

async fn key_row(env: &TestEnv, id: i64) -> hosted_keys::Model {
    let db = env.connect_db().await;
    let row = hosted_keys::Entity::find_by_id(id).one(&db).await.expect("read hosted_keys").expect("the key exists");
    let _ = db.close().await;
    row
}

/// The key's samples, oldest first.
async fn samples(env: &TestEnv, id: i64) -> Vec<key_balance_samples::Model> {
    let db = env.connect_db().await;
    let rows = key_balance_samples::Entity::find()
        .filter(key_balance_samples::Column::HostedKeyId.eq(id))
        .order_by_asc(key_balance_samples::Column::Id)
        .all(&db)
        .await
        .expect("read key_balance_samples");
    let _ = db.close().await;
    rows
}

async fn wait_status(env: &TestEnv, gateway: &Gateway, id: i64, status: &str, within: Duration) -> hosted_keys::Model {
    let deadline = Instant::now() + within;
    loop {
        let row = key_row(env, id).await;
        if row.status == status {
            return row;
        }
        assert!(
            Instant::now() < deadline,
            "key {id} is still {} ({}) after {within:?}, expected {status}; samples: {:#?}\nlog:\n{}",
            row.status,
            row.status_cause,
            samples(env, id).await,
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the key has `n` samples with a good reading (baseline or ok) in a row at the end.
async fn wait_good_samples(env: &TestEnv, id: i64, n: usize, within: Duration) -> Vec<key_balance_samples::Model> {
    let deadline = Instant::now() + within;
    loop {
        let all = samples(env, id).await;
        let good = all.iter().filter(|s| s.verdict == "baseline" || s.verdict == "ok").count();
        if good >= n {
            return all;
        }
        assert!(Instant::now() < deadline, "key {id} has fewer than {n} good samples after {within:?}: {all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn chat_ok(gateway: &Gateway, key: &str, max_tokens: u32, stream: bool) {
    let reply = gateway.chat(key, MODEL, max_tokens, stream).await;
    assert_eq!(reply.status, common::StatusCode::OK, "{}", reply.text());
}

async fn a_drained_key_is_flagged_taken_out_and_restored_by_review(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.create_user("other", &["seller"]).await;
    env.create_user_without_credits("ops", &["admin"]).await;
    let (honest_key, diluted_key) = ("sk-mock-honest-a", "sk-mock-diluted-b");
    let honest = env.add_seller_key("seller", honest_key, &[MODEL], 1_000_000_000).await;
    let diluted = env.add_seller_key("seller", diluted_key, &[MODEL], 1_000_000_000).await;
    env.execute_sql(&format!("UPDATE hosted_keys SET balance_api = 'deepseek' WHERE id = {diluted}")).await;
    open_account(&env, honest_key).await;
    open_account(&env, diluted_key).await;
    let gateway = start(&env, &risk_env("1000")).await;

    wait_good_samples(&env, diluted, 1, Duration::from_secs(20)).await;
    for i in 0..6 {
        chat_ok(&gateway, &buyer.key, 8, i % 2 == 0).await;
    }
    env.wait_usage_records(6).await;
    // Honest windows first: both keys keep being checked without a flag.
    wait_good_samples(&env, diluted, 3, Duration::from_secs(20)).await;

    // 0.5 USD spent elsewhere: 500,000 credits the platform never metered.
    drain(&env, diluted_key, 500_000).await;
    let drained_at = Instant::now();
    let row = wait_status(&env, &gateway, diluted, "flagged", Duration::from_secs(15)).await;
    // One check interval, the settle delay and the pool reload, with room for a slow machine.
    assert!(drained_at.elapsed() < Duration::from_secs(8), "flagged only after {:?}", drained_at.elapsed());
    assert_eq!((row.status_cause.as_str(), row.review.as_str()), ("dilution", "pending"));
    assert_eq!(key_row(&env, honest).await.status, "active", "the honest key is not flagged");
    let flagged_sample =
        samples(&env, diluted).await.into_iter().find(|s| s.verdict == "diluted").expect("a diluted sample");
    assert!(flagged_sample.excess_credits >= 400_000, "{flagged_sample:?}");

    // Out of rotation at once: every request now goes to the honest key.
    env.mock.clear().await;
    for i in 0..10 {
        chat_ok(&gateway, &buyer.key, 4, i % 2 == 1).await;
    }
    let counts = env.mock.counts().await;
    assert_eq!(counts.get(diluted_key), None, "the flagged key got traffic: {counts:?}");
    assert_eq!(counts.get(honest_key), Some(&10), "{counts:?}");

    // The owner is told, with the reason.
    let seller = gateway.login("seller").await;
    let notes = gateway.admin(Method::GET, "/api/v1/notifications", &seller, None).await.json();
    let note = notes["notifications"]
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|n| n["hosted_key_id"] == diluted && n["message"].as_str().is_some_and(|m| m.contains("flagged")))
        })
        .unwrap_or_else(|| panic!("no flag notification: {notes:#}"))
        .clone();
    assert!(note["message"].as_str().unwrap_or_default().contains("unexplained"), "{note}");
    let events =
        gateway.admin(Method::GET, &format!("/api/v1/seller/keys/{diluted}/events"), &seller, None).await.json();
    assert_eq!(events["events"][0]["to_status"], "flagged", "{events:#}");
    assert_eq!(events["events"][0]["actor_id"], Value::Null, "risk control is the actor: {events:#}");

    // Sellers see no reviews and no samples; another seller's key events are not found.
    let reply = gateway.admin(Method::GET, "/api/v1/admin/reviews", &seller, None).await;
    assert_eq!(reply.status, common::StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = gateway.admin(Method::GET, &format!("/api/v1/admin/keys/{diluted}/samples"), &seller, None).await;
    assert_eq!(reply.status, common::StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = gateway
        .admin(
            Method::POST,
            &format!("/api/v1/admin/keys/{diluted}/review"),
            &seller,
            Some(&json!({"action": "clear"})),
        )
        .await;
    assert_eq!(reply.status, common::StatusCode::FORBIDDEN, "{}", reply.text());
    let other = gateway.login("other").await;
    let reply = gateway.admin(Method::GET, &format!("/api/v1/seller/keys/{diluted}/events"), &other, None).await;
    assert_eq!(reply.status, common::StatusCode::NOT_FOUND, "{}", reply.text());

    // The admin's review list has it, with its owner, the reason and the samples.
    let admin = gateway.login("ops").await;
    let reviews = gateway.admin(Method::GET, "/api/v1/admin/reviews", &admin, None).await.json();
    let list = reviews["reviews"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1, "{reviews:#}");
    assert_eq!(list[0]["key"]["id"], diluted);
    assert_eq!(list[0]["owner_username"], "seller");
    assert!(list[0]["reason"].as_str().is_some_and(|r| r.contains("unexplained")), "{reviews:#}");
    assert_eq!(list[0]["samples"][0]["verdict"], "diluted", "{reviews:#}");
    assert!(list[0]["key"].get("api_key_enc").is_none(), "{reviews:#}");
    assert!(!reviews.to_string().contains(diluted_key), "the seller key leaked: {reviews:#}");
    let all =
        gateway.admin(Method::GET, &format!("/api/v1/admin/keys/{diluted}/samples?limit=500"), &admin, None).await;
    assert_eq!(all.status, common::StatusCode::OK, "{}", all.text());
    assert!(all.json()["samples"].as_array().is_some_and(|s| s.len() >= 4), "{}", all.text());
    let missing = gateway.admin(Method::GET, "/api/v1/admin/keys/999999/samples", &admin, None).await;
    assert_eq!(missing.status, common::StatusCode::NOT_FOUND);
    let not_flagged = gateway
        .admin(Method::POST, &format!("/api/v1/admin/keys/{honest}/review"), &admin, Some(&json!({"action": "clear"})))
        .await;
    assert_eq!(not_flagged.status, common::StatusCode::CONFLICT, "{}", not_flagged.text());
    let bad = gateway
        .admin(Method::POST, &format!("/api/v1/admin/keys/{diluted}/review"), &admin, Some(&json!({"action": "maybe"})))
        .await;
    assert_eq!(bad.status, common::StatusCode::BAD_REQUEST, "{}", bad.text());

    // Confirm keeps it out; clear puts it back in rotation, with a fresh baseline (not flagged again).
    let confirmed = gateway
        .admin(
            Method::POST,
            &format!("/api/v1/admin/keys/{diluted}/review"),
            &admin,
            Some(&json!({"action": "confirm", "note": "looked at the samples"})),
        )
        .await;
    assert_eq!(confirmed.status, common::StatusCode::OK, "{}", confirmed.text());
    assert_eq!(
        (confirmed.json()["status"].clone(), confirmed.json()["review"].clone()),
        (json!("flagged"), json!("confirmed"))
    );
    let cleared = gateway
        .admin(
            Method::POST,
            &format!("/api/v1/admin/keys/{diluted}/review"),
            &admin,
            Some(&json!({"action": "clear", "note": "refund agreed"})),
        )
        .await;
    assert_eq!(cleared.status, common::StatusCode::OK, "{}", cleared.text());
    assert_eq!(cleared.json()["status"], "active");
    env.mock.clear().await;
    for i in 0..30 {
        chat_ok(&gateway, &buyer.key, 4, i % 2 == 0).await;
    }
    let counts = env.mock.counts().await;
    assert!(counts.get(diluted_key).is_some_and(|n| *n > 0), "the cleared key is routed again: {counts:?}");
    let before = samples(&env, diluted).await.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while samples(&env, diluted).await.len() < before + 3 {
        assert!(Instant::now() < deadline, "no new checks after the clear");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = key_row(&env, diluted).await;
    assert_eq!((row.status.as_str(), row.review.as_str()), ("active", ""), "{:#?}", samples(&env, diluted).await);
    let events =
        gateway.admin(Method::GET, &format!("/api/v1/seller/keys/{diluted}/events"), &seller, None).await.json();
    assert_eq!(events["events"][0]["to_status"], "active", "{events:#}");
    assert!(events["events"][0]["reason"].as_str().is_some_and(|r| r.contains("refund agreed")), "{events:#}");
}

async fn honest_traffic_with_streams_in_flight_is_never_flagged(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    let (slow_key, fast_key) = ("sk-mock-slow-honest", "sk-mock-fast-honest");
    let slow = env.add_seller_key("seller", slow_key, &[MODEL], 1_000_000_000).await;
    let fast = env.add_seller_key("seller", fast_key, &[MODEL], 1_000_000_000).await;
    open_account(&env, slow_key).await;
    open_account(&env, fast_key).await;
    // Less than one request's cost: a request in flight that the check forgot would flag the key.
    let gateway = start(&env, &risk_env("20")).await;
    wait_good_samples(&env, slow, 1, Duration::from_secs(20)).await;

    // Four clients for about eight seconds: slow streams of ~3 s (charged at their start) across several
    // checks, and quick requests in between.
    let until = Instant::now() + Duration::from_secs(8);
    let mut clients = Vec::new();
    for client in 0..4u32 {
        let gateway_url = gateway.openai_base_url();
        let key = buyer.key.clone();
        clients.push(tokio::spawn(async move {
            let http = common::http_client();
            let mut sent = 0u32;
            while Instant::now() < until {
                let stream = (client + sent) % 2 == 0;
                let body = common::chat_body(MODEL, 30, stream);
                let response = http
                    .post(format!("{gateway_url}/chat/completions"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .expect("send a chat");
                assert_eq!(response.status(), common::StatusCode::OK);
                let _ = response.bytes().await.expect("read the answer");
                sent += 1;
            }
            sent
        }));
    }
    let mut sent = 0;
    for client in clients {
        sent += client.await.expect("a client");
    }
    env.wait_usage_records(sent as usize).await;
    // Two more windows after the traffic: they meter what finished late.
    let total = samples(&env, slow).await.len();
    wait_good_samples(&env, slow, total + 2, Duration::from_secs(20)).await;

    for id in [slow, fast] {
        let row = key_row(&env, id).await;
        let all = samples(&env, id).await;
        assert_eq!(row.status, "active", "key {id} was taken out: {all:#?}\nlog:\n{}", gateway.log());
        assert!(all.iter().all(|s| s.verdict != "diluted"), "{all:#?}");
        assert!(all.iter().filter(|s| s.metered_credits > 0).count() >= 2, "windows metered traffic: {all:#?}");
    }
    let slow_samples = samples(&env, slow).await;
    assert!(
        slow_samples.iter().any(|s| s.inflight_credits > 0),
        "a slow stream was in flight across a reading: {slow_samples:#?}"
    );
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("tokex_risk_checks_total{kind=\"balance\",result=\"ok\"}"), "{metrics}");
}

async fn a_failing_key_is_paused_and_resumed_once_it_verifies(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    // Chat answers 500; its model listing works, so it verifies.
    let failing = env.add_seller_key("seller", "sk-mock-fail500-x", &[MODEL], 1_000_000).await;
    let mut vars = risk_env("1000");
    vars.extend([
        ("TOKEX_RISK_FAILURE_MIN_ATTEMPTS", "3".to_string()),
        ("TOKEX_RISK_FAILURE_PAUSE_BPS", "5000".to_string()),
        ("TOKEX_RISK_REVERIFY_INTERVAL_MS", "3000".to_string()),
    ]);
    let gateway = start(&env, &vars).await;
    for _ in 0..4 {
        let reply = gateway.chat(&buyer.key, MODEL, 4, false).await;
        assert!(reply.status.is_server_error(), "{}", reply.text());
    }
    let row = wait_status(&env, &gateway, failing, "paused", Duration::from_secs(20)).await;
    assert_eq!(row.status_cause, "failures");
    // Paused by risk control, not by its seller: verified again, and resumed since it verifies.
    let row = wait_status(&env, &gateway, failing, "active", Duration::from_secs(20)).await;
    assert_eq!(row.status_cause, "");
    let seller = gateway.login("seller").await;
    let events =
        gateway.admin(Method::GET, &format!("/api/v1/seller/keys/{failing}/events"), &seller, None).await.json();
    let trail: Vec<(String, String)> = events["events"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|e| {
                    (
                        e["to_status"].as_str().unwrap_or_default().to_owned(),
                        e["reason"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(trail[0].0, "active", "{events:#}");
    assert!(trail[0].1.contains("verification"), "{events:#}");
    assert_eq!(trail[1].0, "paused", "{events:#}");
    assert!(trail[1].1.contains("attempts failed"), "{events:#}");
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("tokex_risk_transitions_total{status=\"paused\"}"), "{metrics}");
    assert!(metrics.contains("tokex_risk_checks_total{kind=\"verify\",result=\"ok\"}"), "{metrics}");
}

/// A webhook receiver: every POST is kept with its headers.
struct Receiver {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, bytes::Bytes)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
                let store = store.clone();
                async move {
                    store.lock().unwrap_or_else(|e| e.into_inner()).push((headers, body));
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
        let addr = listener.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen, task }
    }

    fn deliveries(&self) -> Vec<(axum::http::HeaderMap, bytes::Bytes)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn notifications_reach_the_sellers_webhook_signed(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.create_user("other", &["seller"]).await;
    // No balance API: the platform's own metering depletes it after one request.
    let key = env.add_seller_key("seller", "sk-mock-small", &[MODEL], 5).await;
    env.execute_sql(&format!("UPDATE hosted_keys SET balance_api = 'none' WHERE id = {key}")).await;
    let receiver = Receiver::start().await;
    let gateway = start(&env, &risk_env("1000")).await;
    let seller = gateway.login("seller").await;
    let other = gateway.login("other").await;
    let buyer_session = gateway.login("buyer").await;

    // Registration: validated, the secret shown once.
    let url = format!("http://{}/hook", receiver.addr);
    for bad in ["ftp://example.com/hook", "http://169.254.169.254/latest", "not a url"] {
        let reply = gateway.admin(Method::PUT, "/api/v1/seller/webhook", &seller, Some(&json!({ "url": bad }))).await;
        assert_eq!(reply.status, common::StatusCode::BAD_REQUEST, "{bad}: {}", reply.text());
    }
    let reply =
        gateway.admin(Method::PUT, "/api/v1/seller/webhook", &buyer_session, Some(&json!({ "url": url }))).await;
    assert_eq!(reply.status, common::StatusCode::FORBIDDEN, "buyers have no webhook: {}", reply.text());
    let created = gateway.admin(Method::PUT, "/api/v1/seller/webhook", &seller, Some(&json!({ "url": url }))).await;
    assert_eq!(created.status, common::StatusCode::OK, "{}", created.text());
    let secret = created.json()["secret"].as_str().expect("the secret, once").to_owned();
    assert!(secret.len() >= 32, "{secret}");
    let shown = gateway.admin(Method::GET, "/api/v1/seller/webhook", &seller, None).await;
    assert_eq!(shown.json()["url"], url.as_str());
    assert!(!shown.text().contains(&secret) && shown.json().get("secret").is_none(), "{}", shown.text());
    // Another seller sees no webhook and cannot remove this one.
    let reply = gateway.admin(Method::GET, "/api/v1/seller/webhook", &other, None).await;
    assert_eq!(reply.status, common::StatusCode::NOT_FOUND, "{}", reply.text());
    let reply = gateway.admin(Method::DELETE, "/api/v1/seller/webhook", &other, None).await;
    assert_eq!(reply.status, common::StatusCode::NOT_FOUND, "{}", reply.text());

    // One request uses up the declared 5 credits; the next check marks the key depleted and tells the owner.
    chat_ok(&gateway, &buyer.key, 8, false).await;
    wait_status(&env, &gateway, key, "depleted", Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (headers, body) = loop {
        if let Some(first) = receiver.deliveries().into_iter().next() {
            break first;
        }
        assert!(Instant::now() < deadline, "nothing delivered to the webhook; log:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let payload: Value = serde_json::from_slice(&body).expect("a JSON body");
    assert_eq!(payload["kind"], "key_status", "{payload}");
    assert_eq!(payload["hosted_key_id"], key, "{payload}");
    assert!(payload["message"].as_str().is_some_and(|m| m.contains("depleted")), "{payload}");
    assert!(payload["id"].as_i64().is_some() && payload["created_at_ms"].as_i64().is_some(), "{payload}");
    let timestamp = headers.get("x-tokex-timestamp").and_then(|v| v.to_str().ok()).expect("a timestamp").to_owned();
    let signature = headers.get("x-tokex-signature").and_then(|v| v.to_str().ok()).expect("a signature").to_owned();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("an HMAC key");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&body);
    assert_eq!(signature, format!("sha256={}", hex::encode(mac.finalize().into_bytes())));
    let age = common::now_ms() - timestamp.parse::<i64>().expect("a millisecond timestamp");
    assert!((0..60_000).contains(&age), "{timestamp}");

    // Delivered once, recorded on the webhook.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.deliveries().len(), 1, "delivered exactly once");
    let shown = gateway.admin(Method::GET, "/api/v1/seller/webhook", &seller, None).await.json();
    assert!(shown["last_delivery_at_ms"].as_i64().is_some(), "{shown:#}");
    assert_eq!((shown["last_error"].clone(), shown["pending"].clone()), (Value::Null, json!(0)), "{shown:#}");
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("tokex_webhook_deliveries_total{result=\"delivered\"} 1"), "{metrics}");

    let reply = gateway.admin(Method::DELETE, "/api/v1/seller/webhook", &seller, None).await;
    assert_eq!(reply.status, common::StatusCode::NO_CONTENT, "{}", reply.text());
    let reply = gateway.admin(Method::GET, "/api/v1/seller/webhook", &seller, None).await;
    assert_eq!(reply.status, common::StatusCode::NOT_FOUND, "{}", reply.text());
}
