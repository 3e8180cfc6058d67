//! The platform fallback pool end to end, with the official OpenAI Python SDK as the buyer's client: a
//! request whose seller keys all fail is served by the platform's fallback keys, in priority order, without
//! the buyer noticing; the usage record and the metrics say so, and the platform earns the whole price.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use common::{mock_content, run_sdk, Backend, StatusCode, TestEnv};
use reqwest::Method;
use serde_json::{json, Value};

const MODEL: &str = "gpt-4o-mini";
/// Served only by the platform's fallback keys.
const FALLBACK_ONLY_MODEL: &str = "gpt-4.1-mini";
const SELLER_A: &str = "sk-mock-fail500-chain-a-0123456789";
const SELLER_B: &str = "sk-mock-fail503-chain-b-0123456789";
/// Priority 0: tried first among the fallback keys, and broken.
const FALLBACK_BROKEN: &str = "sk-mock-fail502-fallback-0-0123456789";
/// Priority 5: the one that answers.
const FALLBACK_GOOD: &str = "sk-mock-fallback-5-0123456789";
/// Priority 9: never needed.
const FALLBACK_SPARE: &str = "sk-mock-fallback-9-0123456789";

backend_tests!(failover_chain_seller_seller_fallback, fallback_keys_are_admin_managed);

async fn admin_token(env: &TestEnv, gateway: &common::Gateway) -> String {
    env.create_user_without_credits("ops", &["admin"]).await;
    gateway.login("ops").await
}

async fn add_fallback(
    env: &TestEnv,
    gateway: &common::Gateway,
    token: &str,
    api_key: &str,
    models: &[&str],
    priority: i64,
) -> Value {
    let body = json!({
        "name": format!("fallback {priority}"),
        "provider": "openai",
        "base_url": env.mock.base_url(),
        "models": models,
        "api_key": api_key,
        "priority": priority,
    });
    let reply = gateway.admin(Method::POST, "/api/v1/admin/fallback-keys", token, Some(&body)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let key = reply.json();
    assert!(!reply.text().contains(api_key), "the API key must never be returned: {}", reply.text());
    key
}

async fn failover_chain_seller_seller_fallback(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.create_user_without_credits("seller-b", &["seller"]).await;
    env.add_seller_key("seller", SELLER_A, &[MODEL], 1_000_000).await;
    env.add_seller_key("seller-b", SELLER_B, &[MODEL], 1_000_000).await;
    // Generous circuits: every request of this test must walk the whole chain.
    env.set_price(FALLBACK_ONLY_MODEL, common::TEST_PROMPT_PRICE, common::TEST_COMPLETION_PRICE).await;
    let gateway = env.start_gateway_with(&[("TOKEX_ROUTING_CIRCUIT_FAILURES", "100")]).await;
    let admin = admin_token(&env, &gateway).await;
    add_fallback(&env, &gateway, &admin, FALLBACK_BROKEN, &[MODEL], 0).await;
    let good = add_fallback(&env, &gateway, &admin, FALLBACK_GOOD, &[MODEL, FALLBACK_ONLY_MODEL], 5).await;
    add_fallback(&env, &gateway, &admin, FALLBACK_SPARE, &[MODEL, FALLBACK_ONLY_MODEL], 9).await;
    let good_id = good["id"].as_i64().unwrap();
    assert_eq!(good["priority"], 5);
    env.mock.clear().await;

    let chat = run_sdk(&gateway, &buyer.key, &["chat", "--model", MODEL, "--max-tokens", "4"]).await.json();
    assert_eq!(chat["content"], mock_content(4), "the buyer sees an ordinary answer: {chat}");
    let stream = run_sdk(&gateway, &buyer.key, &["stream", "--model", MODEL, "--max-tokens", "3", "--include-usage"])
        .await
        .json();
    assert_eq!(stream["content"], mock_content(3), "{stream}");
    let only =
        run_sdk(&gateway, &buyer.key, &["chat", "--model", FALLBACK_ONLY_MODEL, "--max-tokens", "2"]).await.json();
    assert_eq!(only["content"], mock_content(2), "{only}");
    let listed = run_sdk(&gateway, &buyer.key, &["models"]).await.json();
    assert!(listed.to_string().contains(FALLBACK_ONLY_MODEL), "a fallback-only model is listed: {listed}");

    // Each of the first two requests tried both sellers, then the fallback keys in priority order.
    let counts = env.mock.counts().await;
    assert_eq!(counts.get(SELLER_A), Some(&2), "{counts:?}");
    assert_eq!(counts.get(SELLER_B), Some(&2), "{counts:?}");
    assert_eq!(counts.get(FALLBACK_BROKEN), Some(&2), "{counts:?}");
    assert_eq!(counts.get(FALLBACK_GOOD), Some(&3), "{counts:?}");
    assert_eq!(counts.get(FALLBACK_SPARE), None, "a lower priority is not needed: {counts:?}");
    let order: Vec<String> = env
        .mock
        .requests()
        .await
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .take(4)
        .filter_map(|r| r.api_key.clone())
        .collect();
    assert_eq!(&order[2..], [FALLBACK_BROKEN, FALLBACK_GOOD], "sellers first, then fallback by priority: {order:?}");

    let records = env.wait_exact_usage_records(3).await;
    for record in &records {
        assert_eq!(record.hosted_key_id, Some(good_id), "{record:?}");
        assert!(record.fallback, "the record says the fallback pool served it: {record:?}");
        assert_eq!(record.status_code, 200);
        assert!(record.cost_credits > 0);
    }
    assert_eq!(records[0].attempts, 4, "seller, seller, broken fallback, good fallback: {:?}", records[0]);
    assert_eq!(records[2].attempts, 1, "a fallback-only model goes straight to the fallback pool");

    let metrics = gateway.metrics().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tokex_fallback_requests_total") && l.contains(MODEL))
        .unwrap_or_else(|| panic!("no fallback metric for {MODEL}:\n{metrics}"));
    assert!(line.ends_with(" 2"), "{line}");

    // The platform key earns the platform the whole price; the failing sellers earn nothing.
    let (code, report) = env.ledger_check().await;
    assert_eq!(code, 0, "{report}");
    for seller in ["seller", "seller-b"] {
        let token = gateway.login(seller).await;
        let earnings = gateway.admin(Method::GET, "/api/v1/seller/earnings", &token, None).await.json();
        assert_eq!(earnings["earned_total"], 0, "{seller}: {earnings}");
    }
}

async fn fallback_keys_are_admin_managed(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.set_price(MODEL, common::TEST_PROMPT_PRICE, common::TEST_COMPLETION_PRICE).await;
    let gateway = env.start_gateway().await;
    let admin = admin_token(&env, &gateway).await;

    // Not for sellers or buyers.
    let seller = gateway.login("seller").await;
    let reply = gateway.admin(Method::GET, "/api/v1/admin/fallback-keys", &seller, None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());

    // Validated and verified like a seller deposit.
    let bad = json!({"provider": "openai", "base_url": env.mock.base_url(), "models": [MODEL],
        "api_key": "sk-mock-x-0123456789", "priority": -1});
    let reply = gateway.admin(Method::POST, "/api/v1/admin/fallback-keys", &admin, Some(&bad)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(reply.text().contains("priority"), "{}", reply.text());
    let invalid = json!({"provider": "openai", "base_url": env.mock.base_url(), "models": [MODEL],
        "api_key": "sk-mock-invalid-0123456789", "priority": 1});
    let reply = gateway.admin(Method::POST, "/api/v1/admin/fallback-keys", &admin, Some(&invalid)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "an invalid key is refused: {}", reply.text());
    assert!(!reply.text().contains("sk-mock-invalid-0123456789"), "{}", reply.text());

    let first = add_fallback(&env, &gateway, &admin, "sk-mock-fb-first-0123456789", &[MODEL], 3).await;
    let second = add_fallback(&env, &gateway, &admin, "sk-mock-fb-second-0123456789", &[MODEL], 1).await;
    let (first_id, second_id) = (first["id"].as_i64().unwrap(), second["id"].as_i64().unwrap());
    let list = gateway.admin(Method::GET, "/api/v1/admin/fallback-keys", &admin, None).await.json();
    let ids: Vec<i64> = list["keys"].as_array().unwrap().iter().map(|k| k["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [second_id, first_id], "listed in the order they are tried: {list}");

    // The buyer's request goes to priority 1; pausing it moves traffic to priority 3 at once.
    let reply = gateway.chat(&buyer.key, MODEL, 2, false).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let path = format!("/api/v1/admin/fallback-keys/{second_id}");
    let paused = gateway.admin(Method::PATCH, &path, &admin, Some(&json!({"status": "paused"}))).await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text());
    assert_eq!(paused.json()["status"], "paused");
    let reply = gateway.chat(&buyer.key, MODEL, 2, false).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let records = env.wait_exact_usage_records(2).await;
    assert_eq!(records[0].hosted_key_id, Some(second_id));
    assert_eq!(records[1].hosted_key_id, Some(first_id));

    // Reprioritise and resume; an unknown id is not a fallback key; `flagged` is not an admin's to set.
    let path = format!("/api/v1/admin/fallback-keys/{first_id}");
    let moved = gateway.admin(Method::PATCH, &path, &admin, Some(&json!({"priority": 0, "status": "active"}))).await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.text());
    assert_eq!(moved.json()["priority"], 0);
    let reply = gateway.admin(Method::PATCH, "/api/v1/admin/fallback-keys/999999", &admin, Some(&json!({}))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    let missing = gateway.admin(Method::GET, "/api/v1/admin/fallback-keys/999999", &admin, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let reply = gateway.admin(Method::PATCH, &path, &admin, Some(&json!({"status": "flagged"}))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(!gateway.log().contains("sk-mock-fb-"), "no key in the gateway log");
}
