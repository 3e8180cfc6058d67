//! The gateway process over its life: ready means ready, keys added while it runs become routable,
//! and SIGTERM loses no usage record.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, BuyerKeyOptions, Readiness, StatusCode, TestEnv, TEST_COMPLETION_PRICE, TEST_PROMPT_PRICE};
use futures::StreamExt;
use reqwest::Method;
use serde_json::json;

const MODEL: &str = "gpt-4o-mini";

backend_tests!(
    healthz_ok_means_the_gateway_port_serves,
    keys_added_while_serving_become_routable,
    sigterm_flushes_usage_records,
);

/// A load balancer sends traffic once `/healthz` answers 200, so by then the gateway port must serve.
/// Several fresh starts, each probed the moment `/healthz` first answers.
async fn healthz_ok_means_the_gateway_port_serves(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-ready-aaaa", &[MODEL], 1_000_000).await;
    for start in 0..3 {
        let gateway = env.start_gateway_ready(&[], Readiness::Healthz).await;
        let response = gateway.client.get(gateway.url("/v1/models")).bearer_auth(&buyer_key.key).send().await;
        match response {
            Ok(response) => assert_eq!(response.status(), StatusCode::OK, "start {start}"),
            Err(error) => panic!("start {start}: /healthz said ready, but the gateway port failed: {error:?}"),
        }
    }
}

/// CLI changes reach a running gateway on the next pool refresh; admin API changes at once.
async fn keys_added_while_serving_become_routable(backend: Backend) {
    const REFRESH_MS: u64 = 300;
    let env = TestEnv::new(backend).await;
    let first_buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-early-bbbb", &[MODEL], 1_000_000).await;
    let refresh = REFRESH_MS.to_string();
    let gateway = env.start_gateway_with(&[("TOKEX_POOL_REFRESH_INTERVAL_MS", &refresh)]).await;
    let chat = |key: String, model: &'static str| {
        let gateway = &gateway;
        async move { gateway.chat(&key, model, 2, false).await.status }
    };
    assert_eq!(chat(first_buyer_key.key.clone(), "late-model").await, StatusCode::NOT_FOUND);

    // CLI: a new seller key and a new buyer key, picked up by the background refresh.
    env.add_seller_key("seller", "sk-mock-late-cccc", &["late-model"], 1_000_000).await;
    let late_buyer_key = env.issue_buyer_key("buyer", BuyerKeyOptions::default()).await;
    let deadline = Instant::now() + Duration::from_millis(REFRESH_MS * 10 + 2_000);
    loop {
        let seller_side = chat(first_buyer_key.key.clone(), "late-model").await;
        let buyer_side = chat(late_buyer_key.key.clone(), MODEL).await;
        if seller_side == StatusCode::OK && buyer_side == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CLI-added keys not routable within {} ms of a {REFRESH_MS} ms refresh: seller key → {seller_side}, \
             buyer key → {buyer_side}",
            REFRESH_MS * 10 + 2_000
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Admin API: routable at once, no waiting for a refresh (its price is set beforehand; the key's
    // addition reloads prices too).
    env.set_price("instant-model", TEST_PROMPT_PRICE, TEST_COMPLETION_PRICE).await;
    let token = gateway.login("seller").await;
    let new_key = json!({
        "provider": "openai",
        "base_url": env.mock.base_url(),
        "models": ["instant-model"],
        "api_key": "sk-mock-instant-dddd",
        "declared_balance": 1_000_000,
    });
    let reply = gateway.admin(Method::POST, "/api/v1/seller/keys", &token, Some(&new_key)).await;
    assert!(reply.status.is_success(), "add a seller key over REST: {} {}", reply.status, reply.text());
    assert!(!reply.text().contains("sk-mock-instant-dddd"), "the REST answer echoes the seller key: {}", reply.text());
    assert_eq!(
        chat(first_buyer_key.key.clone(), "instant-model").await,
        StatusCode::OK,
        "a seller key added over REST must be routable as soon as the POST has answered"
    );
    let counts = env.mock.counts().await;
    assert_eq!(counts.get("sk-mock-instant-dddd"), Some(&1), "{counts:?}");
}

/// SIGTERM right after the responses: every request is still recorded before the process exits.
async fn sigterm_flushes_usage_records(backend: Backend) {
    const REQUESTS: usize = 25;
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-term-eeee", &[MODEL], 1_000_000).await;
    // A long flush interval: without the flush on shutdown these records would still be queued.
    let env_overrides = [("TOKEX_USAGE_FLUSH_INTERVAL_MS", "60000"), ("TOKEX_GATEWAY_GRACE_PERIOD_SECS", "1")];
    let mut gateway = env.start_gateway_with(&env_overrides).await;

    let statuses: Vec<StatusCode> = futures::stream::iter(0..REQUESTS)
        .map(|i| {
            let gateway = &gateway;
            let key = &buyer_key.key;
            async move { gateway.chat(key, MODEL, 2, i % 2 == 0).await.status }
        })
        .buffer_unordered(5)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    gateway.sigterm();
    let status = gateway.process.wait_exit(Duration::from_secs(30)).await;
    let status = status.unwrap_or_else(|| panic!("the gateway did not exit within 30 s of SIGTERM"));
    assert!(status.success(), "exit status after SIGTERM: {status}");

    let records = env.usage_records().await;
    assert_eq!(records.len(), REQUESTS, "usage records after SIGTERM: {records:#?}");
    assert!(records.iter().all(|r| r.status_code == 200 && r.completion_tokens == 2), "{records:#?}");
}
