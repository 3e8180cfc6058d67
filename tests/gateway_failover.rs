//! Failover: a key that cannot answer (connection refused, no answer within the read timeout) is
//! replaced by another before the buyer sees a byte; a response that breaks after its first byte is
//! never retried (the buyer already has part of it) and is still metered.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use common::{chat_body, free_port, http_client, Backend, StatusCode, TestEnv};
use futures::StreamExt;

const MODEL: &str = "gpt-4o-mini";
const REQUESTS: usize = 12;

backend_tests!(
    connection_refused_fails_over,
    upstream_silence_fails_over_after_the_read_timeout,
    a_response_cut_after_its_first_byte_is_not_retried,
);

/// The dead key carries nearly all the weight, so almost every request tries it first.
async fn connection_refused_fails_over(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    let dead_url = format!("http://127.0.0.1:{}/v1", free_port());
    let dead = env.add_seller_key_at("seller", &dead_url, "sk-mock-dead-1111", &[MODEL], 1_000_000_000).await;
    let good = env.add_seller_key("seller", "sk-mock-good-2222", &[MODEL], 1).await;
    // Every request must try the dead key first: keep its circuit closed.
    let gateway = env.start_gateway_with(&[("TOKEX_ROUTING_CIRCUIT_FAILURES", "100")]).await;

    for i in 0..REQUESTS {
        let reply = gateway.chat(&buyer.key, MODEL, 3, i % 2 == 0).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
    }
    let records = env.wait_exact_usage_records(REQUESTS).await;
    assert!(records.iter().all(|r| r.hosted_key_id == Some(good) && r.status_code == 200), "{records:#?}");
    let retried = records.iter().filter(|r| r.attempts == 2).count();
    assert!(retried >= REQUESTS - 2, "the heavy dead key should have been tried first nearly always: {records:#?}");
    let metrics = gateway.metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("tokex_failovers_total") && l.contains("reason=\"connect\"")),
        "{metrics}"
    );
    let _ = dead;
}

async fn upstream_silence_fails_over_after_the_read_timeout(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-hang-3333", &[MODEL], 1_000_000_000).await;
    let good = env.add_seller_key("seller", "sk-mock-good-4444", &[MODEL], 1).await;
    let gateway = env.start_gateway_with(&[("TOKEX_GATEWAY_READ_TIMEOUT_MS", "300")]).await;

    for i in 0..4 {
        let reply = gateway.chat(&buyer.key, MODEL, 3, i % 2 == 0).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
    }
    let records = env.wait_exact_usage_records(4).await;
    assert!(records.iter().all(|r| r.hosted_key_id == Some(good)), "{records:#?}");
    assert!(records.iter().any(|r| r.attempts == 2), "{records:#?}");
    let metrics = gateway.metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("tokex_failovers_total") && l.contains("reason=\"timeout\"")),
        "{metrics}"
    );
}

/// `drop` sends the role chunk and two content chunks, then cuts the connection.
async fn a_response_cut_after_its_first_byte_is_not_retried(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    // The only key: a retry could only go to the same key, and must not happen at all.
    let cut = env.add_seller_key("seller", "sk-mock-drop-5555", &[MODEL], 1_000).await;
    let gateway = env.start_gateway().await;

    let response = http_client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(&buyer.key)
        .json(&chat_body(MODEL, 20, true))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    let mut broken = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&body);
    assert!(broken || !text.contains("[DONE]"), "the buyer must see that the stream broke off: {text}");
    assert!(text.contains("tok1 "), "what arrived before the cut is passed on: {text}");

    let records = env.wait_exact_usage_records(1).await;
    let record = &records[0];
    assert_eq!(record.hosted_key_id, Some(cut));
    assert_eq!(record.attempts, 1, "{record:?}");
    assert_eq!(record.error_kind.as_deref(), Some("upstream_interrupted"), "{record:?}");
    assert!(record.estimated && record.completion_tokens > 0 && record.prompt_tokens > 0, "{record:?}");
    let counts = env.mock.counts().await;
    assert_eq!(counts.get("sk-mock-drop-5555").copied(), Some(1), "no retry after the first byte: {counts:?}");
}
