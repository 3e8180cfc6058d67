//! Every refusal the gateway makes: the status, OpenAI's error shape, no seller key text in the body,
//! and a usage record exactly for the requests that passed authentication.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::Duration;

use common::Backend;
use common::{chat_body, now_ms, BuyerKeyOptions, Gateway, Reply, StatusCode, TestEnv};
use reqwest::Method;
use serde_json::{json, Value};

const MAX_BODY: usize = 64 * 1024;
const GOOD_KEY: &str = "sk-mock-secret-7f3a9c2e5b1d4086";
const PAUSED_KEY: &str = "sk-mock-paused-4e8b1f6a9d2c7035";
/// Models whose every key fails, each with two keys of its own: a key that failed once may be benched by
/// the gateway, so every 502 request uses keys that were never tried before.
const BROKEN: [(&str, bool, [&str; 2]); 4] = [
    ("broken-500-a", false, ["sk-mock-fail500-a1b2c3d4e5f60718", "sk-mock-fail500-b2c3d4e5f6071829"]),
    ("broken-500-b", true, ["sk-mock-fail500-c3d4e5f60718293a", "sk-mock-fail500-d4e5f60718293a4b"]),
    ("broken-401-a", false, ["sk-mock-fail401-e5f60718293a4b5c", "sk-mock-fail401-f60718293a4b5c6d"]),
    ("broken-401-b", true, ["sk-mock-fail401-0718293a4b5c6d7e", "sk-mock-fail401-18293a4b5c6d7e8f"]),
];

backend_tests!(error_responses, expired_and_revoked_keys_are_refused);

fn all_seller_keys() -> Vec<&'static str> {
    let mut keys = vec![GOOD_KEY, PAUSED_KEY];
    keys.extend(BROKEN.iter().flat_map(|(_, _, keys)| *keys));
    keys
}

/// The error shape, the status, a JSON content type, and no seller key (nor its secret tail) anywhere.
fn assert_refusal(what: &str, reply: &Reply, status: StatusCode) -> Value {
    let content_type = reply.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("application/json"), "{what}: content-type {content_type:?}");
    let error = reply.assert_openai_error(status);
    let text = reply.text();
    for key in all_seller_keys() {
        let tail = &key[key.len() - 12..];
        assert!(!text.contains(key) && !text.contains(tail), "{what}: the body leaks seller key text: {text}");
    }
    error
}

async fn pause(gateway: &Gateway, seller_token: &str, hosted_key_id: i64) {
    let reply =
        gateway.admin(Method::POST, &format!("/api/v1/seller/keys/{hosted_key_id}/pause"), seller_token, None).await;
    assert!(reply.status.is_success(), "pause key {hosted_key_id}: {} {}", reply.status, reply.text());
}

async fn error_responses(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", GOOD_KEY, &["gpt-4o-mini", "gpt-4.1-mini"], 1_000_000).await;
    let paused = env.add_seller_key("seller", PAUSED_KEY, &["gpt-4o"], 1_000_000).await;
    for (model, _, keys) in BROKEN {
        for key in keys {
            env.add_seller_key("seller", key, &[model], 1_000_000).await;
        }
    }
    let only_mini: &[&str] = &["gpt-4o-mini"];
    let restricted =
        env.issue_buyer_key("buyer", BuyerKeyOptions { models: Some(only_mini), ..Default::default() }).await;
    let max_body = MAX_BODY.to_string();
    let gateway = env.start_gateway_with(&[("TOKEX_GATEWAY_MAX_BODY_BYTES", &max_body)]).await;
    let seller_token = gateway.login("seller").await;
    pause(&gateway, &seller_token, paused).await;
    let key = Some(buyer_key.key.as_str());
    let chat = "/v1/chat/completions";
    // Status of every request that passed authentication, in order: each must leave a usage record.
    let mut authenticated = Vec::new();

    // 400: malformed JSON, a body that is no object, a missing model.
    let reply = gateway.post_raw(chat, key, r#"{"model": "gpt-4o-mini", "messages": ["#).await;
    assert_refusal("malformed JSON", &reply, StatusCode::BAD_REQUEST);
    authenticated.push(400);
    let reply = gateway.post_raw(chat, key, "[1, 2, 3]").await;
    assert_refusal("JSON array body", &reply, StatusCode::BAD_REQUEST);
    authenticated.push(400);
    let reply = gateway.post_json(chat, key, &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    let error = assert_refusal("missing model", &reply, StatusCode::BAD_REQUEST);
    assert_eq!(error["type"], "invalid_request_error");
    authenticated.push(400);

    // 401: no key, a key of the wrong form, an unknown key of the right form.
    for (what, bad_key) in [
        ("no Authorization", None),
        ("not a platform key", Some(GOOD_KEY)),
        ("unknown key", Some("tkx-000000000000000000000000000000000000000000")),
    ] {
        let reply = gateway.post_json(chat, bad_key, &chat_body("gpt-4o-mini", 2, false)).await;
        assert_refusal(what, &reply, StatusCode::UNAUTHORIZED);
    }
    let reply = gateway.get("/v1/models", Some("tkx-nope")).await;
    assert_refusal("models with unknown key", &reply, StatusCode::UNAUTHORIZED);

    // 403: a model outside the key's allow-list (served by the pool, so only the allow-list refuses).
    let reply = gateway.post_json(chat, Some(&restricted.key), &chat_body("gpt-4.1-mini", 2, false)).await;
    let error = assert_refusal("model not allowed", &reply, StatusCode::FORBIDDEN);
    assert!(error["message"].as_str().unwrap_or_default().contains("gpt-4.1-mini"), "{error}");
    authenticated.push(403);
    let reply = gateway.post_json(chat, Some(&restricted.key), &chat_body("gpt-4o-mini", 2, false)).await;
    assert_eq!(reply.status, StatusCode::OK, "the allowed model works: {}", reply.text());
    authenticated.push(200);

    // 404: a model nobody offers, for stream and non-stream requests.
    for stream in [false, true] {
        let reply = gateway.post_json(chat, key, &chat_body("no-such-model", 2, stream)).await;
        assert_refusal("unknown model", &reply, StatusCode::NOT_FOUND);
        authenticated.push(404);
    }

    // 413 over the limit; just under it is served.
    let padding = |len: usize| "x".repeat(len);
    let mut big = chat_body("gpt-4o-mini", 2, false);
    big["messages"][0]["content"] = json!(padding(MAX_BODY + 1024));
    let reply = gateway.post_json(chat, key, &big).await;
    assert_refusal("body too large", &reply, StatusCode::PAYLOAD_TOO_LARGE);
    authenticated.push(413);
    big["messages"][0]["content"] = json!(padding(MAX_BODY - 1024));
    let reply = gateway.post_json(chat, key, &big).await;
    assert_eq!(reply.status, StatusCode::OK, "a body under the limit: {}", reply.text());
    authenticated.push(200);

    // 503: the model exists, but its only key is paused.
    let reply = gateway.post_json(chat, key, &chat_body("gpt-4o", 2, false)).await;
    assert_refusal("only key paused", &reply, StatusCode::SERVICE_UNAVAILABLE);
    authenticated.push(503);

    // 502: every key fails (500s, and 401s whose upstream message names the key).
    env.mock.clear().await;
    for (model, stream, keys) in BROKEN {
        let reply = gateway.post_json(chat, key, &chat_body(model, 2, stream)).await;
        assert_refusal(model, &reply, StatusCode::BAD_GATEWAY);
        authenticated.push(502);
        let counts = env.mock.counts().await;
        for failing in keys {
            assert!(counts.get(failing).is_some_and(|n| *n >= 1), "{model}: key {failing} never tried: {counts:?}");
        }
    }
    let upstream = env.mock.requests().await;
    assert!(upstream.len() <= 4 * 3, "more upstream attempts than max_attempts allows: {}", upstream.len());

    let records = env.wait_exact_usage_records(authenticated.len()).await;
    let recorded: Vec<i64> = records.iter().map(|r| i64::from(r.status_code)).collect();
    assert_eq!(recorded, authenticated, "usage record statuses, in request order");
    for record in &records {
        assert!(record.buyer_key_id == buyer_key.id || record.buyer_key_id == restricted.id, "{record:?}");
        if record.status_code == 200 {
            assert_eq!(record.error_kind, None, "{record:?}");
        } else {
            assert!(record.error_kind.is_some(), "a refused request names its error kind: {record:?}");
            assert_eq!(
                (record.prompt_tokens, record.completion_tokens),
                (0, 0),
                "a refused request costs nothing: {record:?}"
            );
        }
        if record.status_code == 502 {
            assert!((2..=3).contains(&record.attempts), "both keys were tried, within max_attempts: {record:?}");
        }
    }
    // Nothing refused before routing reached the upstream; the 502s account for all upstream calls.
    let expected_upstream: i64 = records.iter().filter(|r| r.status_code == 502).map(|r| i64::from(r.attempts)).sum();
    assert_eq!(upstream.len() as i64, expected_upstream, "upstream calls vs attempts in the 502 records");
}

/// Expiry and revocation act on a running gateway: the key works, then it does not.
async fn expired_and_revoked_keys_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    env.seller_and_buyer().await;
    env.add_seller_key("seller", GOOD_KEY, &["gpt-4o-mini"], 1_000_000).await;
    let past = (now_ms() - 1_000).to_string();
    let output = env.cli_output(&["buyer-key", "issue", "--username", "buyer", "--expires-at-ms", &past], &[]).await;
    let already_expired = output
        .status
        .success()
        .then(|| serde_json::from_slice::<Value>(output.stdout.trim_ascii()).ok())
        .flatten()
        .and_then(|issued| issued["key"].as_str().map(str::to_owned));
    let gateway = env.start_gateway().await;
    let token = gateway.login("buyer").await;
    let body = chat_body("gpt-4o-mini", 2, false);
    let chat = "/v1/chat/completions";

    // Keys made through the admin API are routable at once.
    let expires_at_ms = now_ms() + 2_500;
    let reply = gateway
        .admin(
            Method::POST,
            "/api/v1/buyer/keys",
            &token,
            Some(&json!({"name": "short-lived", "expires_at_ms": expires_at_ms})),
        )
        .await;
    assert!(reply.status.is_success(), "issue an expiring key: {} {}", reply.status, reply.text());
    let expiring = reply.json()["key"].as_str().unwrap_or_else(|| panic!("no key in {}", reply.text())).to_owned();
    let reply = gateway.admin(Method::POST, "/api/v1/buyer/keys", &token, Some(&json!({"name": "to-revoke"}))).await;
    assert!(reply.status.is_success(), "issue a key: {} {}", reply.status, reply.text());
    let issued = reply.json();
    let revoked = issued["key"].as_str().unwrap_or_default().to_owned();
    let revoked_id = issued["id"].as_i64().unwrap_or_else(|| panic!("no id in {issued}"));

    assert_eq!(gateway.post_json(chat, Some(&expiring), &body).await.status, StatusCode::OK, "before expiry");
    assert_eq!(gateway.post_json(chat, Some(&revoked), &body).await.status, StatusCode::OK, "before revocation");

    let reply = gateway.admin(Method::DELETE, &format!("/api/v1/buyer/keys/{revoked_id}"), &token, None).await;
    assert!(reply.status.is_success(), "revoke: {} {}", reply.status, reply.text());
    let reply = gateway.post_json(chat, Some(&revoked), &body).await;
    assert_refusal("revoked key", &reply, StatusCode::UNAUTHORIZED);

    let wait = expires_at_ms - now_ms() + 200;
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let reply = gateway.post_json(chat, Some(&expiring), &body).await;
    assert_refusal("expired key", &reply, StatusCode::UNAUTHORIZED);
    let reply = gateway.get("/v1/models", Some(&expiring)).await;
    assert_refusal("models with an expired key", &reply, StatusCode::UNAUTHORIZED);

    // A key issued by the CLI already expired (if the CLI accepts that at all) is refused.
    if let Some(key) = already_expired {
        let reply = gateway.post_json(chat, Some(&key), &body).await;
        assert_refusal("key expired before the gateway started", &reply, StatusCode::UNAUTHORIZED);
    }

    let records = env.wait_exact_usage_records(2).await;
    assert!(records.iter().all(|r| r.status_code == 200), "refused keys leave no records: {records:#?}");
}
