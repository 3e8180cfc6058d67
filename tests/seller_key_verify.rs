//! Seller keys are verified against their provider on deposit (REST and CLI): an invalid key, a wrong base
//! URL, a model the key cannot serve and a redirecting provider are refused with the field to fix; a
//! provider that cannot answer now is a 503 to retry; `--skip-verify` lets an operator deposit anyway.
//! Sellers cap their keys (create, PATCH, views) and never reach another seller's key. No API key ever
//! appears in a response or in the gateway's log.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use common::{Backend, Gateway, Reply, StatusCode, TestEnv};
use reqwest::Method;
use serde_json::{json, Value};

const MODEL: &str = "gpt-4o-mini";
const VALID: &str = "sk-mock-verify-valid-0123456789";
const INVALID: &str = "sk-mock-invalid-verify-0123456789";
const REDIRECTING: &str = "sk-mock-redirect-verify-0123456789";
/// Fails every chat later, but lists its models: it must verify.
const FAILS_LATER: &str = "sk-mock-fail500-verify-0123456789";

backend_tests!(verified_deposit_caps_and_owner_scope);

fn key_body(base_url: &str, api_key: &str, models: &[&str]) -> Value {
    json!({
        "name": "main",
        "provider": "openai",
        "base_url": base_url,
        "models": models,
        "api_key": api_key,
        "declared_balance": 1_000_000,
    })
}

/// Asserts a 400 that names `field` (`{"error":{"code":"invalid_request","message":"<field>: ..."}}`)
/// and returns the message.
fn assert_invalid(reply: &Reply, field: &str) -> String {
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "expected 400 on {field}: {}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.starts_with(&format!("{field}: ")), "expected the field {field}: {message}");
    message
}

fn assert_no_secret(text: &str) {
    for secret in [VALID, INVALID, REDIRECTING, FAILS_LATER, "0123456789"] {
        assert!(!text.contains(secret), "a key leaked ({secret}): {text}");
    }
}

async fn seller_keys(gateway: &Gateway, token: &str) -> Vec<Value> {
    let reply = gateway.admin(Method::GET, "/api/v1/seller/keys", token, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_no_secret(&reply.text());
    reply.json()["keys"].as_array().cloned().unwrap_or_default()
}

/// The REST deposit: each mistake is refused on its field, nothing is stored, a valid key is stored verified;
/// caps are set on create and changed with PATCH; another seller gets 404 everywhere.
async fn verified_deposit_caps_and_owner_scope(backend: Backend) {
    let env = TestEnv::new(backend).await;
    env.create_user("seller", &["seller"]).await;
    env.create_user("rival", &["seller"]).await;
    let gateway = env.start_gateway().await;
    let token = gateway.login("seller").await;
    let rival = gateway.login("rival").await;
    let base_url = env.mock.base_url();
    let post = |body: Value| {
        let (gateway, token) = (&gateway, &token);
        async move { gateway.admin(Method::POST, "/api/v1/seller/keys", token, Some(&body)).await }
    };

    let invalid = post(key_body(&base_url, INVALID, &[MODEL])).await;
    let message = assert_invalid(&invalid, "api_key");
    assert!(message.contains("rejected"), "{message}");

    // The mock's API lives under /v1: anything else is not an OpenAI-compatible API.
    let root = base_url.trim_end_matches("/v1").to_owned();
    for wrong in [format!("{root}/v2"), root.clone(), format!("{base_url}/chat")] {
        let reply = post(key_body(&wrong, VALID, &[MODEL])).await;
        let message = assert_invalid(&reply, "base_url");
        assert!(message.contains("/models"), "{wrong}: {message}");
    }

    let unservable = post(key_body(&base_url, VALID, &[MODEL, "gpt-9-unknown"])).await;
    let message = assert_invalid(&unservable, "models");
    assert!(message.contains("gpt-9-unknown") && !message.contains(MODEL), "{message}");

    // The SSRF table's "a redirect" case: never followed, refused on base_url.
    let redirected = post(key_body(&base_url, REDIRECTING, &[MODEL])).await;
    let message = assert_invalid(&redirected, "base_url");
    assert!(message.contains("redirect") && message.contains("/moved/v1/models"), "{message}");

    assert!(seller_keys(&gateway, &token).await.is_empty(), "a refused key was stored");

    let mut body = key_body(&base_url, VALID, &[MODEL, "gpt-4o"]);
    body["max_concurrency"] = json!(3);
    body["max_spend_per_day"] = json!(5_000);
    body["balance_api"] = json!("openrouter");
    let before = common::now_ms();
    let created = post(body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert_no_secret(&created.text());
    let key = created.json();
    assert!(key["verified_at_ms"].as_i64().is_some_and(|t| t >= before), "{key}");
    assert_eq!((key["max_concurrency"].clone(), key["max_spend_per_day"].clone()), (json!(3), json!(5_000)));
    assert_eq!((key["balance_api"].clone(), key["spent_today"].clone()), (json!("openrouter"), json!(0)));
    assert_eq!(
        (key["status"].clone(), key["status_cause"].clone(), key["review"].clone()),
        (json!("active"), json!(""), json!(""))
    );
    let id = key["id"].as_i64().unwrap();

    // A key that fails every request later still verifies: only listing models counts.
    let later = post(key_body(&base_url, FAILS_LATER, &[MODEL])).await;
    assert_eq!(later.status, StatusCode::CREATED, "{}", later.text());

    let path = format!("/api/v1/seller/keys/{id}");
    let patch = json!({ "name": "capped", "max_concurrency": 0, "max_spend_per_day": 42, "balance_api": "" });
    let patched = gateway.admin(Method::PATCH, &path, &token, Some(&patch)).await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    let patched = patched.json();
    assert_eq!((patched["name"].clone(), patched["max_concurrency"].clone()), (json!("capped"), json!(0)));
    // Back to the adapter derived from the provider (openai: credit grants).
    assert_eq!(
        (patched["max_spend_per_day"].clone(), patched["balance_api"].clone()),
        (json!(42), json!("openai_credit_grants"))
    );
    let partial = gateway.admin(Method::PATCH, &path, &token, Some(&json!({ "max_concurrency": 9 }))).await;
    assert_eq!(
        (partial.json()["max_concurrency"].clone(), partial.json()["max_spend_per_day"].clone()),
        (json!(9), json!(42))
    );
    for (bad, field) in [
        (json!({ "max_concurrency": -1 }), "max_concurrency"),
        (json!({ "max_spend_per_day": -1 }), "max_spend_per_day"),
        (json!({ "balance_api": "paypal" }), "balance_api"),
        (json!({ "name": "" }), "name"),
    ] {
        assert_invalid(&gateway.admin(Method::PATCH, &path, &token, Some(&bad)).await, field);
    }
    let unknown_field = gateway.admin(Method::PATCH, &path, &token, Some(&json!({ "status": "active" }))).await;
    assert_eq!(unknown_field.status, StatusCode::BAD_REQUEST, "{}", unknown_field.text());
    let listed = seller_keys(&gateway, &token).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["max_spend_per_day"], 42);

    // Another seller's key is missing to them, whatever they try.
    for (method, suffix, body) in [
        (Method::GET, "", None),
        (Method::PATCH, "", Some(json!({ "max_concurrency": 1 }))),
        (Method::POST, "/pause", None),
        (Method::POST, "/resume", None),
        (Method::GET, "/events", None),
    ] {
        let reply = gateway.admin(method.clone(), &format!("{path}{suffix}"), &rival, body.as_ref()).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {suffix}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "not_found");
    }
    assert!(seller_keys(&gateway, &rival).await.is_empty());
    let own = gateway.admin(Method::GET, &path, &token, None).await.json();
    assert_eq!(
        (own["name"].clone(), own["max_concurrency"].clone()),
        (json!("capped"), json!(9)),
        "the rival changed it"
    );

    // Pausing records its cause; resuming clears it.
    let paused = gateway.admin(Method::POST, &format!("{path}/pause"), &token, None).await.json();
    assert_eq!((paused["status"].clone(), paused["status_cause"].clone()), (json!("paused"), json!("seller")));
    let resumed = gateway.admin(Method::POST, &format!("{path}/resume"), &token, None).await.json();
    assert_eq!((resumed["status"].clone(), resumed["status_cause"].clone()), (json!("active"), json!("")));

    assert_no_secret(&gateway.log());
}

/// The CLI applies the same verification, says which field to fix on stderr, and `--skip-verify` deposits
/// a key that verification would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_verifies_and_can_skip_verification() {
    common::run_with_timeout(async {
        let env = TestEnv::new(Backend::Sqlite).await;
        env.create_user("seller", &["seller"]).await;
        let base_url = env.mock.base_url();
        let add = |api_key: &'static str, base_url: String, models: &'static str, extra: &'static [&'static str]| {
            let env = &env;
            async move {
                let mut args = vec![
                    "seller-key",
                    "add",
                    "--username",
                    "seller",
                    "--provider",
                    "openai",
                    "--base-url",
                    &base_url,
                    "--models",
                    models,
                ];
                args.extend_from_slice(extra);
                env.cli_output(&args, &[("TOKEX_SELLER_API_KEY", api_key)]).await
            }
        };
        let refused = |out: &std::process::Output, field: &str, needle: &str| {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!out.status.success(), "the CLI deposited it; stdout {}", String::from_utf8_lossy(&out.stdout));
            assert!(stderr.contains(&format!("{field}: ")) && stderr.contains(needle), "{stderr}");
            assert_no_secret(&stderr);
            assert_no_secret(&String::from_utf8_lossy(&out.stdout));
        };

        refused(&add(INVALID, base_url.clone(), MODEL, &[]).await, "api_key", "rejected");
        let root = base_url.trim_end_matches("/v1").to_owned();
        refused(&add(VALID, format!("{root}/v2"), MODEL, &[]).await, "base_url", "/models");
        refused(&add(VALID, base_url.clone(), "gpt-4o-mini,gpt-9-unknown", &[]).await, "models", "gpt-9-unknown");
        refused(&add(REDIRECTING, base_url.clone(), MODEL, &[]).await, "base_url", "redirect");

        let ok = add(VALID, base_url.clone(), MODEL, &["--max-concurrency", "2", "--max-spend-per-day", "77"]).await;
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        let printed: Value = serde_json::from_slice(&ok.stdout).expect("one JSON line");
        assert!(printed["verified_at_ms"].as_i64().is_some(), "{printed}");
        assert_no_secret(&printed.to_string());

        // An operator vouches for a provider without a models endpoint.
        let skipped = add(INVALID, format!("{root}/v2"), MODEL, &["--skip-verify", "--balance-api", "none"]).await;
        assert!(skipped.status.success(), "{}", String::from_utf8_lossy(&skipped.stderr));
        let printed: Value = serde_json::from_slice(&skipped.stdout).expect("one JSON line");
        assert_eq!(printed["verified_at_ms"], Value::Null, "{printed}");
        refused(&add(VALID, base_url.clone(), MODEL, &["--balance-api", "paypal"]).await, "balance_api", "deepseek");
        refused(&add(VALID, base_url.clone(), MODEL, &["--max-concurrency=-1"]).await, "max_concurrency", "0");

        // Verification off in the configuration: nothing to verify, as with --skip-verify.
        let out = env
            .cli_output(
                &[
                    "seller-key",
                    "add",
                    "--username",
                    "seller",
                    "--provider",
                    "openai",
                    "--base-url",
                    &base_url,
                    "--models",
                    "gpt-9-unknown",
                ],
                &[("TOKEX_SELLER_API_KEY", VALID), ("TOKEX_RISK_VERIFY_ON_DEPOSIT", "false")],
            )
            .await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let gateway = env.start_gateway().await;
        let token = gateway.login("seller").await;
        let keys = seller_keys(&gateway, &token).await;
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!((keys[0]["max_concurrency"].clone(), keys[0]["max_spend_per_day"].clone()), (json!(2), json!(77)));
        assert_eq!((keys[1]["balance_api"].clone(), keys[1]["verified_at_ms"].clone()), (json!("none"), Value::Null));
    })
    .await;
}

/// A provider that is down or rate limiting is not the seller's mistake: 503, retry later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_provider_is_a_503_to_retry() {
    common::run_with_timeout(async {
        use axum::http::StatusCode as AxumStatus;
        let app = axum::Router::new()
            .route(
                "/busy/v1/models",
                axum::routing::get(|| async {
                    (AxumStatus::SERVICE_UNAVAILABLE, r#"{"error":{"message":"overloaded"}}"#)
                }),
            )
            .route("/limited/v1/models", axum::routing::get(|| async { AxumStatus::TOO_MANY_REQUESTS }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });

        let env = TestEnv::new(Backend::Sqlite).await;
        env.create_user("seller", &["seller"]).await;
        let gateway = env.start_gateway().await;
        let token = gateway.login("seller").await;
        for prefix in ["busy", "limited"] {
            let body = key_body(&format!("http://{addr}/{prefix}/v1"), VALID, &[MODEL]);
            let reply = gateway.admin(Method::POST, "/api/v1/seller/keys", &token, Some(&body)).await;
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{prefix}: {}", reply.text());
            assert_eq!(reply.json()["error"]["code"], "provider_unavailable", "{}", reply.text());
            assert_no_secret(&reply.text());
        }
        let out = env
            .cli_output(
                &[
                    "seller-key",
                    "add",
                    "--username",
                    "seller",
                    "--provider",
                    "openai",
                    "--base-url",
                    &format!("http://{addr}/busy/v1"),
                    "--models",
                    MODEL,
                ],
                &[("TOKEX_SELLER_API_KEY", VALID)],
            )
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("retry later") && stderr.contains("overloaded"), "{stderr}");
        assert!(seller_keys(&gateway, &token).await.is_empty());
        assert_no_secret(&gateway.log());
        server.abort();
    })
    .await;
}
