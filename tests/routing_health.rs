//! Routing quality end to end: a rate-limited key cools down for its Retry-After and comes back, a failing
//! key's circuit opens and is probed, per-node concurrency and daily spend caps move traffic to other keys,
//! and the platform's fallback keys serve when no seller key can.
//!
//! Behaviour that only involves the gateway's memory runs on SQLite alone; what reads or writes the
//! database (usage records' `fallback`, `spent_today`) runs on both backends.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{chat_body, http_client, Backend, BuyerKeyOptions, Earner, Gateway, StatusCode, TestEnv};
use sea_orm::EntityTrait;
use serde_json::json;
use token_exchange::db::entities::hosted_keys;

const MODEL: &str = "gpt-4o-mini";
/// Balances far apart: the heavy key is the first pick of nearly every request unless it is unavailable.
const HEAVY: i64 = 1_000_000_000_000;
const LIGHT: i64 = 1_000;
/// Risk checks would read balances and judge failure rates of these keys; this file is about routing.
const NO_RISK: (&str, &str) = ("TOKEX_RISK_ENABLED", "false");

/// Tests whose subject is the gateway's memory alone: SQLite only, to keep CI time down.
macro_rules! sqlite_tests {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::common::run_with_timeout(super::$name($crate::common::Backend::Sqlite)).await
            }
        }
    )+};
}

sqlite_tests!(
    a_rate_limited_key_cools_down_for_its_retry_after_and_comes_back,
    a_long_retry_after_is_clamped_and_a_pool_in_cooldown_answers_503,
    a_failing_key_opens_its_circuit_and_half_open_probes_back_off,
    a_successful_probe_closes_the_circuit,
    connection_errors_count_towards_the_circuit,
    a_key_at_its_concurrency_cap_sends_the_next_request_elsewhere,
);
backend_tests!(fallback_keys_serve_when_no_seller_key_can, daily_spend_caps_move_traffic_to_other_keys);

// --- helpers --------------------------------------------------------------------------------------

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn count(env: &TestEnv, api_key: &str) -> u64 {
    env.mock.counts().await.get(api_key).copied().unwrap_or(0)
}

/// One non-stream chat request that must succeed.
async fn ok_chat(gateway: &Gateway, buyer: &str) {
    let reply = gateway.chat(buyer, MODEL, 2, false).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

async fn set_key(env: &TestEnv, key_id: i64, assignments: &str) {
    env.execute_sql(&format!("UPDATE hosted_keys SET {assignments} WHERE id = {key_id}")).await;
}

/// Polls the metrics until `check` holds (gauges are recounted periodically).
async fn wait_metrics(gateway: &Gateway, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gateway.metrics().await;
        if check(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within 5 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that fails (500) while `failing` is set and answers chat completions otherwise; its model
/// listing always works, so that its key passes verification.
struct FlakyUpstream {
    base_url: String,
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyUpstream {
    async fn start() -> Self {
        use axum::routing::{get, post};
        let failing = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU64::new(0));
        let (fail, counted) = (failing.clone(), calls.clone());
        let chat = move || {
            let (fail, counted) = (fail.clone(), counted.clone());
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                if fail.load(Ordering::SeqCst) {
                    let error =
                        json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}});
                    return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, axum::Json(error));
                }
                let completion = json!({
                    "id": "chatcmpl-flaky", "object": "chat.completion", "created": 1_700_000_000, "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                });
                (axum::http::StatusCode::OK, axum::Json(completion))
            }
        };
        let models = || async {
            axum::Json(
                json!({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "x"}]}),
            )
        };
        let app = axum::Router::new().route("/v1/models", get(models)).route("/v1/chat/completions", post(chat));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the flaky upstream");
        let base_url = format!("http://{}/v1", listener.local_addr().expect("its address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base_url, failing, calls, task }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// --- rate limits ----------------------------------------------------------------------------------

/// The mock answers `retry5` keys' 429s with `Retry-After: 5`.
async fn a_rate_limited_key_cools_down_for_its_retry_after_and_comes_back(backend: Backend) {
    const LIMITED: &str = "sk-mock-fail429-retry5-0123456789";
    const GOOD: &str = "sk-mock-good-0123456789";
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.add_seller_key("seller", LIMITED, &[MODEL], HEAVY).await;
    let good = env.add_seller_key("seller", GOOD, &[MODEL], LIGHT).await;
    // Two failures in a row would open a circuit: 429s must never count as failures.
    let gateway = env.start_gateway_with(&[NO_RISK, ("TOKEX_ROUTING_CIRCUIT_FAILURES", "2")]).await;

    let first = Instant::now();
    ok_chat(&gateway, &buyer.key).await;
    assert_eq!(count(&env, LIMITED).await, 1, "the heavy key is tried first");
    for _ in 0..5 {
        ok_chat(&gateway, &buyer.key).await;
    }
    assert_eq!(count(&env, LIMITED).await, 1, "no traffic during the cooldown");
    wait_metrics(&gateway, "one key benched", |m| metric(m, "tokex_keys_unavailable", &[]) == Some(1.0)).await;
    assert!(first.elapsed() < Duration::from_millis(4_000), "the checks above took too long for this test");

    // Back after its Retry-After: tried first again (and rate-limited again).
    tokio::time::sleep(Duration::from_millis(5_300).saturating_sub(first.elapsed())).await;
    ok_chat(&gateway, &buyer.key).await;
    assert_eq!(count(&env, LIMITED).await, 2, "the key came back after its Retry-After");
    ok_chat(&gateway, &buyer.key).await;
    assert_eq!(count(&env, LIMITED).await, 2);

    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "tokex_key_cooldowns_total", &[MODEL]), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "tokex_circuit_transitions_total", &["open"]), None, "{metrics}");
    let records = env.wait_exact_usage_records(8).await;
    assert!(records.iter().all(|r| r.status_code == 200 && r.hosted_key_id == Some(good)), "{records:#?}");
    let attempts: Vec<i32> = records.iter().map(|r| r.attempts).collect();
    assert_eq!(attempts, [2, 1, 1, 1, 1, 1, 2, 1], "only requests that met the rate-limited key failed over");
}

async fn a_long_retry_after_is_clamped_and_a_pool_in_cooldown_answers_503(backend: Backend) {
    const LIMITED: &str = "sk-mock-fail429-retry3600-0123456789";
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.add_seller_key("seller", LIMITED, &[MODEL], HEAVY).await;
    let gateway = env.start_gateway_with(&[NO_RISK, ("TOKEX_ROUTING_COOLDOWN_MAX_MS", "1500")]).await;

    let reply = gateway.chat(&buyer.key, MODEL, 2, false).await;
    let error = reply.assert_openai_error(StatusCode::BAD_GATEWAY);
    assert_eq!(error["code"], "upstream_error");
    // The only key cools down: nothing is tried, the buyer is told to come back later.
    let reply = gateway.chat(&buyer.key, MODEL, 2, false).await;
    let error = reply.assert_openai_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["code"], "no_capacity");
    assert_eq!(count(&env, LIMITED).await, 1);
    // An hour's Retry-After is clamped to routing.cooldown_max_ms.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    gateway.chat(&buyer.key, MODEL, 2, false).await.assert_openai_error(StatusCode::BAD_GATEWAY);
    assert_eq!(count(&env, LIMITED).await, 2, "a single 429 must not take the key out for long");

    let records = env.wait_exact_usage_records(3).await;
    let statuses: Vec<i32> = records.iter().map(|r| r.status_code).collect();
    assert_eq!(statuses, [502, 503, 502]);
    assert_eq!(records[1].attempts, 0, "{:?}", records[1]);
}

// --- circuits -------------------------------------------------------------------------------------

async fn a_failing_key_opens_its_circuit_and_half_open_probes_back_off(backend: Backend) {
    const BROKEN: &str = "sk-mock-fail500-0123456789";
    const GOOD: &str = "sk-mock-good-0123456789";
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.add_seller_key("seller", BROKEN, &[MODEL], HEAVY).await;
    env.add_seller_key("seller", GOOD, &[MODEL], LIGHT).await;
    let gateway = env
        .start_gateway_with(&[
            NO_RISK,
            ("TOKEX_ROUTING_CIRCUIT_FAILURES", "3"),
            ("TOKEX_ROUTING_CIRCUIT_OPEN_MS", "1500"),
            ("TOKEX_ROUTING_CIRCUIT_MAX_OPEN_MS", "10000"),
        ])
        .await;

    // Three requests in a row meet the failing key (each fails over to the good one); then it is out.
    for _ in 0..3 {
        ok_chat(&gateway, &buyer.key).await;
    }
    let opened = Instant::now();
    assert_eq!(count(&env, BROKEN).await, 3);
    for _ in 0..4 {
        ok_chat(&gateway, &buyer.key).await;
    }
    assert_eq!(count(&env, BROKEN).await, 3, "an open circuit gets no traffic");
    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "tokex_circuit_transitions_total", &["state=\"open\""]), Some(1.0), "{metrics}");

    // After circuit_open_ms one request probes it; the probe fails and the circuit opens for twice as long.
    tokio::time::sleep(Duration::from_millis(1_800).saturating_sub(opened.elapsed())).await;
    let probed = Instant::now();
    ok_chat(&gateway, &buyer.key).await;
    ok_chat(&gateway, &buyer.key).await;
    assert_eq!(count(&env, BROKEN).await, 4, "exactly one probe");
    tokio::time::sleep(Duration::from_millis(2_200).saturating_sub(probed.elapsed())).await;
    ok_chat(&gateway, &buyer.key).await;
    assert_eq!(count(&env, BROKEN).await, 4, "open for 3 s after the failed probe, not 1.5 s");
    tokio::time::sleep(Duration::from_millis(3_400).saturating_sub(probed.elapsed())).await;
    ok_chat(&gateway, &buyer.key).await;
    assert_eq!(count(&env, BROKEN).await, 5, "probed again after the doubled wait");

    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "tokex_circuit_transitions_total", &["state=\"open\""]), Some(3.0), "{metrics}");
    assert_eq!(metric(&metrics, "tokex_circuit_transitions_total", &["state=\"half_open\""]), Some(2.0));
    assert_eq!(metric(&metrics, "tokex_circuit_transitions_total", &["state=\"closed\""]), None);
    let records = env.wait_exact_usage_records(11).await;
    assert!(records.iter().all(|r| r.status_code == 200), "{records:#?}");
    let attempts: Vec<i32> = records.iter().map(|r| r.attempts).collect();
    assert_eq!(attempts, [2, 2, 2, 1, 1, 1, 1, 2, 1, 1, 2], "only requests that met the failing key failed over");
}

async fn a_successful_probe_closes_the_circuit(backend: Backend) {
    const GOOD: &str = "sk-mock-good-0123456789";
    let flaky = FlakyUpstream::start().await;
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    let flaky_key = env.add_seller_key_at("seller", &flaky.base_url, "sk-flaky-0123456789", &[MODEL], HEAVY).await;
    let good = env.add_seller_key("seller", GOOD, &[MODEL], LIGHT).await;
    let gateway = env
        .start_gateway_with(&[
            NO_RISK,
            ("TOKEX_ROUTING_CIRCUIT_FAILURES", "2"),
            ("TOKEX_ROUTING_CIRCUIT_OPEN_MS", "1500"),
        ])
        .await;

    for _ in 0..4 {
        ok_chat(&gateway, &buyer.key).await;
    }
    assert_eq!(flaky.calls(), 2, "open after two failures");
    let opened = Instant::now();
    flaky.failing.store(false, Ordering::SeqCst);
    ok_chat(&gateway, &buyer.key).await;
    assert_eq!(flaky.calls(), 2, "still open: it recovered, but nobody knows yet");

    tokio::time::sleep(Duration::from_millis(1_800).saturating_sub(opened.elapsed())).await;
    for _ in 0..5 {
        ok_chat(&gateway, &buyer.key).await;
    }
    assert_eq!(flaky.calls(), 7, "the probe succeeded and the heavy key takes the traffic again");
    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "tokex_circuit_transitions_total", &["state=\"closed\""]), Some(1.0), "{metrics}");

    let records = env.wait_exact_usage_records(10).await;
    let served: Vec<i64> = records.iter().map(|r| r.hosted_key_id.unwrap()).collect();
    assert_eq!(served[..5], [good; 5]);
    assert_eq!(served[5..], [flaky_key; 5]);
    assert_eq!(records[5].attempts, 1, "the probe served the request itself");
}

async fn connection_errors_count_towards_the_circuit(backend: Backend) {
    const GOOD: &str = "sk-mock-good-0123456789";
    let mut env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    // Nothing listens there, so the key cannot be verified on deposit.
    env.set_env("TOKEX_RISK_VERIFY_ON_DEPOSIT", "false");
    let dead_url = format!("http://127.0.0.1:{}/v1", common::free_port());
    env.add_seller_key_at("seller", &dead_url, "sk-dead-0123456789", &[MODEL], HEAVY).await;
    let good = env.add_seller_key("seller", GOOD, &[MODEL], LIGHT).await;
    let gateway = env.start_gateway_with(&[NO_RISK, ("TOKEX_ROUTING_CIRCUIT_FAILURES", "2")]).await;

    for _ in 0..5 {
        ok_chat(&gateway, &buyer.key).await;
    }
    let records = env.wait_exact_usage_records(5).await;
    assert!(records.iter().all(|r| r.hosted_key_id == Some(good)), "{records:#?}");
    let attempts: Vec<i32> = records.iter().map(|r| r.attempts).collect();
    assert_eq!(attempts, [2, 2, 1, 1, 1], "two refused connections open the circuit");
    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "tokex_failovers_total", &["reason=\"connect\""]), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "tokex_circuit_transitions_total", &["state=\"open\""]), Some(1.0), "{metrics}");
}

// --- caps -----------------------------------------------------------------------------------------

/// `slow` streams send one event every 100 ms, so a request stays in flight for over a second.
async fn a_key_at_its_concurrency_cap_sends_the_next_request_elsewhere(backend: Backend) {
    const CAPPED: &str = "sk-mock-slow-capped-0123456789";
    const OTHER: &str = "sk-mock-slow-other-0123456789";
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    let capped = env.add_seller_key("seller", CAPPED, &[MODEL], HEAVY).await;
    let other = env.add_seller_key("seller", OTHER, &[MODEL], LIGHT).await;
    set_key(&env, capped, "max_concurrency = 1").await;
    let gateway = env.start_gateway_with(&[NO_RISK]).await;

    let url = gateway.url("/v1/chat/completions");
    let key = buyer.key.clone();
    let long = tokio::spawn(async move {
        let response = http_client().post(url).bearer_auth(key).json(&chat_body(MODEL, 12, true)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&env, CAPPED).await == 0 {
        assert!(Instant::now() < deadline, "the first stream never reached the capped key");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = gateway.chat(&buyer.key, MODEL, 1, true).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text());
    assert_eq!((count(&env, CAPPED).await, count(&env, OTHER).await), (1, 1), "the capped key was busy");
    assert!(!long.await.unwrap().is_empty());
    // The slot is free again.
    let third = gateway.chat(&buyer.key, MODEL, 1, true).await;
    assert_eq!(third.status, StatusCode::OK);
    assert_eq!(count(&env, CAPPED).await, 2);

    let records = env.wait_exact_usage_records(3).await;
    let mut served: Vec<i64> = records.iter().map(|r| r.hosted_key_id.unwrap()).collect();
    served.sort_unstable();
    let mut expected = vec![capped, capped, other];
    expected.sort_unstable();
    assert_eq!(served, expected);
    assert!(records.iter().all(|r| r.attempts == 1), "a busy key is skipped, not tried: {records:#?}");
}

async fn daily_spend_caps_move_traffic_to_other_keys(backend: Backend) {
    const CAPPED: &str = "sk-mock-capped-0123456789";
    const SPENT: &str = "sk-mock-spent-0123456789";
    const OTHER: &str = "sk-mock-other-0123456789";
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    let capped = env.add_seller_key("seller", CAPPED, &[MODEL], HEAVY).await;
    let spent = env.add_seller_key("seller", SPENT, &[MODEL], HEAVY).await;
    let other = env.add_seller_key("seller", OTHER, &[MODEL], LIGHT).await;
    let today = common::now_ms().div_euclid(86_400_000);
    // Reached its cap today already (as the usage writer records it); yesterday's spend does not count.
    set_key(&env, spent, &format!("max_spend_per_day = 500, spent_today = 500, spend_day = {today}")).await;
    set_key(&env, capped, &format!("max_spend_per_day = 1, spent_today = 999999, spend_day = {}", today - 1)).await;
    let gateway = env.start_gateway_with(&[NO_RISK, ("TOKEX_POOL_REFRESH_INTERVAL_MS", "200")]).await;

    // Any request costs more than one credit: the capped key serves one, then its cap is reached.
    for _ in 0..4 {
        ok_chat(&gateway, &buyer.key).await;
    }
    assert_eq!((count(&env, CAPPED).await, count(&env, SPENT).await, count(&env, OTHER).await), (1, 0, 3));
    // After the usage is written and the pool reloaded, the database's spent_today says so.
    env.wait_usage_records(4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let db = env.connect_db().await;
    let row = hosted_keys::Entity::find_by_id(capped).one(&db).await.unwrap().expect("the capped key");
    let _ = db.close().await;
    assert_eq!(row.spend_day, today);
    assert!(row.spent_today > 1, "{row:?}");
    for _ in 0..3 {
        ok_chat(&gateway, &buyer.key).await;
    }
    assert_eq!(count(&env, CAPPED).await, 1, "still capped after the reload");
    assert_eq!(count(&env, OTHER).await, 6);
    let records = env.wait_exact_usage_records(7).await;
    assert!(records.iter().all(|r| r.attempts == 1 && r.status_code == 200), "{records:#?}");
    let served: Vec<i64> = records.iter().map(|r| r.hosted_key_id.unwrap()).collect();
    assert_eq!(served, [capped, other, other, other, other, other, other]);
}

// --- the fallback pool ----------------------------------------------------------------------------

async fn fallback_keys_serve_when_no_seller_key_can(backend: Backend) {
    const BROKEN: &str = "sk-mock-fail500-seller-0123456789";
    const HEALTHY: &str = "sk-mock-healthy-seller-0123456789";
    const FIRST: &str = "sk-mock-platform-first-0123456789";
    const SECOND: &str = "sk-mock-platform-second-0123456789";
    const ONLY_FALLBACK: &str = "gpt-4o";
    const SELLER_SERVED: &str = "gpt-4.1-mini";
    let env = TestEnv::new(backend).await;
    let seller = env.create_user("seller", &["seller"]).await;
    let buyer_id = env.create_user("buyer", &["buyer"]).await;
    let buyer = env.issue_buyer_key("buyer", BuyerKeyOptions::default()).await;
    let broken = env.add_seller_key("seller", BROKEN, &[MODEL], HEAVY).await;
    let healthy = env.add_seller_key("seller", HEALTHY, &[SELLER_SERVED], LIGHT).await;
    let second = env.add_seller_key("seller", SECOND, &[MODEL, ONLY_FALLBACK, SELLER_SERVED], 0).await;
    let first = env.add_seller_key("seller", FIRST, &[MODEL], 0).await;
    set_key(&env, second, "pool = 'platform', priority = 7").await;
    set_key(&env, first, "pool = 'platform', priority = 3").await;
    let gateway = env.start_gateway_with(&[NO_RISK]).await;

    // The seller key fails: the fallback key with the lowest priority serves.
    ok_chat(&gateway, &buyer.key).await;
    // A model only fallback keys serve is listed and served.
    let listed = gateway.get("/v1/models", Some(&buyer.key)).await.json();
    let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&ONLY_FALLBACK), "{listed}");
    let reply = gateway.chat(&buyer.key, ONLY_FALLBACK, 2, true).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A healthy seller key is preferred to the fallback pool.
    let reply = gateway.chat(&buyer.key, SELLER_SERVED, 2, false).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let counts = env.mock.counts().await;
    assert_eq!(counts.get(BROKEN), Some(&1), "{counts:?}");
    assert_eq!(counts.get(FIRST), Some(&1), "{counts:?}");
    assert_eq!(counts.get(SECOND), Some(&1), "{counts:?}");
    assert_eq!(counts.get(HEALTHY), Some(&1), "{counts:?}");

    let records = env.wait_exact_usage_records(3).await;
    let summary: Vec<(Option<i64>, bool, i32)> =
        records.iter().map(|r| (r.hosted_key_id, r.fallback, r.attempts)).collect();
    assert_eq!(summary, [(Some(first), true, 2), (Some(second), true, 1), (Some(healthy), false, 1)], "{records:#?}");
    assert!(records.iter().all(|r| r.status_code == 200 && r.cost_credits > 0));

    let metrics = gateway.metrics().await;
    let fallback = |model: &str| metric(&metrics, "tokex_fallback_requests_total", &[&format!("model=\"{model}\"")]);
    assert_eq!((fallback(MODEL), fallback(ONLY_FALLBACK), fallback(SELLER_SERVED)), (Some(1.0), Some(1.0), None));

    // The platform earns the whole price of what its keys served; the seller only its share of the rest.
    let earner = |key: i64| if key == first || key == second { Earner::Platform } else { Earner::Seller(seller) };
    let expected = common::expected_books(&records, earner);
    assert_eq!(expected.earned.get(&seller).copied(), Some(common::expected_seller_share(records[2].cost_credits)));
    env.ledger_snapshot().await.assert_books(&[(buyer_id, common::BUYER_GRANT)], &expected);
    let (code, report) = env.ledger_check().await;
    assert_eq!(code, 0, "{report}");
    let _ = broken;
}
