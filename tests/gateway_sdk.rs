//! The official OpenAI Python SDK as the client: what a buyer's code sees, and the usage record the
//! gateway writes for it, must both match the mock upstream's formulas exactly
//! (completion tokens = max_tokens, prompt tokens = ceil(upstream body bytes / 4)).

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use common::{mock_content, mock_prompt_tokens, run_sdk, Backend, BuyerKeyOptions, TestEnv};
use serde_json::{json, Value};

const SELLER_KEY: &str = "sk-mock-sdk-0123456789abcdef";
const MODEL: &str = "gpt-4o-mini";
const EMBEDDING_MODEL: &str = "text-embedding-3-small";

backend_tests!(
    sdk_chat_non_stream,
    sdk_stream_with_include_usage,
    sdk_stream_without_include_usage,
    sdk_embeddings,
    sdk_models_lists_allowed_servable_models,
    sdk_errors_map_to_sdk_exceptions,
);

async fn setup(backend: Backend) -> (TestEnv, i64, common::BuyerKey) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    let hosted = env.add_seller_key("seller", SELLER_KEY, &[MODEL, EMBEDDING_MODEL], 1_000_000).await;
    (env, hosted, buyer_key)
}

async fn sdk_chat_non_stream(backend: Backend) {
    let (env, hosted, buyer_key) = setup(backend).await;
    let gateway = env.start_gateway().await;

    let result = run_sdk(&gateway, &buyer_key.key, &["chat", "--model", MODEL, "--max-tokens", "5"]).await.json();

    let upstream = env.mock.requests().await;
    assert_eq!(upstream.len(), 1, "one upstream request: {upstream:#?}");
    assert_eq!(upstream[0].stream, None, "a non-stream request stays non-stream upstream");
    let prompt_tokens = mock_prompt_tokens(upstream[0].body_len);
    assert_eq!(result["content"], mock_content(5));
    assert_eq!(result["finish_reason"], "stop");
    assert_eq!(
        result["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5})
    );

    let records = env.wait_exact_usage_records(1).await;
    let record = &records[0];
    assert_eq!(record.hosted_key_id, Some(hosted));
    assert_eq!(record.buyer_key_id, buyer_key.id);
    assert_eq!(record.model, MODEL);
    assert!(record.endpoint.contains("chat"), "endpoint {:?}", record.endpoint);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (prompt_tokens, 5));
    assert!(!record.estimated, "usage came from the upstream: {record:?}");
    assert_eq!(record.status_code, 200);
    assert_eq!(record.attempts, 1);
    assert!(!record.client_disconnected);
    assert_eq!(record.error_kind, None);
    assert!(record.request_bytes > 0 && record.response_bytes > 0, "{record:?}");
}

/// The buyer asked for usage: the SDK sees exactly one usage chunk with the upstream's numbers.
async fn sdk_stream_with_include_usage(backend: Backend) {
    let (env, hosted, buyer_key) = setup(backend).await;
    let gateway = env.start_gateway().await;

    let args = ["stream", "--model", MODEL, "--max-tokens", "6", "--include-usage"];
    let result = run_sdk(&gateway, &buyer_key.key, &args).await.json();

    let upstream = env.mock.requests().await;
    assert_eq!(upstream.len(), 1, "{upstream:#?}");
    assert_eq!((upstream[0].stream, upstream[0].include_usage), (Some(true), Some(true)));
    let prompt_tokens = mock_prompt_tokens(upstream[0].body_len);
    assert_eq!(result["content"], mock_content(6));
    assert_eq!(result["content_chunks"], 6);
    assert_eq!(result["finish_reason"], "stop");
    assert_eq!(result["usage_chunks"], 1, "{result}");
    assert_eq!(
        result["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6})
    );

    let records = env.wait_exact_usage_records(1).await;
    let record = &records[0];
    assert_eq!(record.hosted_key_id, Some(hosted));
    assert_eq!((record.prompt_tokens, record.completion_tokens), (prompt_tokens, 6));
    assert!(!record.estimated, "{record:?}");
    assert_eq!((record.status_code, record.attempts), (200, 1));
    assert!(!record.client_disconnected);
    assert!(record.ttft_ms.is_some(), "a stream has a time to first token: {record:?}");
}

/// The buyer did not ask for usage: the gateway asks upstream anyway (to meter), but the SDK must not
/// see the usage-only chunk.
async fn sdk_stream_without_include_usage(backend: Backend) {
    let (env, hosted, buyer_key) = setup(backend).await;
    let gateway = env.start_gateway().await;

    let result = run_sdk(&gateway, &buyer_key.key, &["stream", "--model", MODEL, "--max-tokens", "4"]).await.json();

    let upstream = env.mock.requests().await;
    assert_eq!(upstream.len(), 1, "{upstream:#?}");
    assert_eq!(upstream[0].include_usage, Some(true), "the gateway must ask upstream for usage");
    let prompt_tokens = mock_prompt_tokens(upstream[0].body_len);
    assert_eq!(result["content"], mock_content(4));
    assert_eq!(result["usage_chunks"], 0, "the usage chunk leaked to a client that did not ask: {result}");
    assert_eq!(result["usage"], Value::Null);
    assert_eq!(result["finish_reason"], "stop");

    let records = env.wait_exact_usage_records(1).await;
    let record = &records[0];
    assert_eq!(record.hosted_key_id, Some(hosted));
    assert_eq!((record.prompt_tokens, record.completion_tokens), (prompt_tokens, 4));
    assert!(!record.estimated, "{record:?}");
    assert_eq!((record.status_code, record.attempts), (200, 1));
}

async fn sdk_embeddings(backend: Backend) {
    let (env, hosted, buyer_key) = setup(backend).await;
    let gateway = env.start_gateway().await;

    let args = ["embeddings", "--model", EMBEDDING_MODEL, "--input", "hello", "world"];
    let result = run_sdk(&gateway, &buyer_key.key, &args).await.json();

    let upstream = env.mock.requests().await;
    assert_eq!(upstream.len(), 1, "{upstream:#?}");
    assert_eq!(upstream[0].path, "/v1/embeddings");
    let prompt_tokens = mock_prompt_tokens(upstream[0].body_len);
    assert_eq!(result["count"], 2);
    assert_eq!(result["dimensions"], json!([8, 8]));
    assert_eq!(result["usage"], json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}));

    let records = env.wait_exact_usage_records(1).await;
    let record = &records[0];
    assert_eq!(record.hosted_key_id, Some(hosted));
    assert_eq!(record.model, EMBEDDING_MODEL);
    assert!(record.endpoint.contains("embed"), "endpoint {:?}", record.endpoint);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (prompt_tokens, 0));
    assert!(!record.estimated, "{record:?}");
    assert_eq!((record.status_code, record.attempts), (200, 1));
}

/// `/v1/models` lists a model only when the key may use it and some active key serves it.
async fn sdk_models_lists_allowed_servable_models(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let unrestricted = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-models-a-1111", &["gpt-4o-mini", "gpt-4o"], 1_000_000).await;
    env.add_seller_key("seller", "sk-mock-models-b-2222", &["gpt-4.1-mini"], 1_000_000).await;
    let paused = env.add_seller_key("seller", "sk-mock-models-c-3333", &["o3-mini"], 1_000_000).await;
    let allowed: &[&str] = &["gpt-4o-mini", "gpt-4.1-mini", "o3-mini", "not-offered-anywhere"];
    let restricted =
        env.issue_buyer_key("buyer", BuyerKeyOptions { models: Some(allowed), ..Default::default() }).await;
    let gateway = env.start_gateway().await;

    let before = run_sdk(&gateway, &unrestricted.key, &["models"]).await.json();
    assert_eq!(before["ids"], json!(["gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "o3-mini"]));

    // Pausing through the admin API takes effect at once.
    let token = gateway.login("seller").await;
    let reply =
        gateway.admin(reqwest::Method::POST, &format!("/api/v1/seller/keys/{paused}/pause"), &token, None).await;
    assert!(reply.status.is_success(), "pause: {} {}", reply.status, reply.text());

    let all = run_sdk(&gateway, &unrestricted.key, &["models"]).await.json();
    assert_eq!(all["ids"], json!(["gpt-4.1-mini", "gpt-4o", "gpt-4o-mini"]));
    let limited = run_sdk(&gateway, &restricted.key, &["models"]).await.json();
    assert_eq!(limited["ids"], json!(["gpt-4.1-mini", "gpt-4o-mini"]));
    assert!(env.mock.requests().await.is_empty(), "listing models must not call the upstream");
}

async fn sdk_errors_map_to_sdk_exceptions(backend: Backend) {
    let (env, _hosted, buyer_key) = setup(backend).await;
    let gateway = env.start_gateway().await;

    let unknown_key = "tkx-0000000000000000000000000000000000000000";
    let error = run_sdk(&gateway, unknown_key, &["--expect-error", "chat", "--model", MODEL]).await.json();
    assert_eq!(error["error"]["class"], "AuthenticationError", "{error}");
    assert_eq!(error["error"]["status"], 401);

    let error = run_sdk(&gateway, &buyer_key.key, &["--expect-error", "chat", "--model", "no-such-model"]).await.json();
    assert_eq!(error["error"]["class"], "NotFoundError", "{error}");
    assert_eq!(error["error"]["status"], 404);
    assert_eq!(error["error"]["body"]["type"], "invalid_request_error", "{error}");

    let error =
        run_sdk(&gateway, &buyer_key.key, &["--expect-error", "stream", "--model", "no-such-model"]).await.json();
    assert_eq!(error["error"]["class"], "NotFoundError", "{error}");

    let output = serde_json::to_string(&error).unwrap_or_default();
    assert!(!output.contains(SELLER_KEY));
    assert!(env.mock.requests().await.is_empty(), "refused requests must not reach the upstream");
}
