//! Seller base URLs may not point the gateway at the platform's own network (SSRF): every spelling of an
//! internal address is refused at deposit, over REST and the CLI, unless `security.upstream_allow` admits
//! it; and a key whose host resolves inside is not routed.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use common::{Backend, StatusCode, TestEnv};
use reqwest::Method;
use serde_json::json;

const MODEL: &str = "gpt-4o-mini";

/// Base URLs that reach loopback, "this network", link-local (cloud metadata), private and CGNAT
/// addresses, in the spellings that fool text checks.
const INTERNAL: &[&str] = &[
    "http://127.0.0.1:9/v1",
    "http://127.1/v1",
    "http://0.0.0.0/v1",
    "http://[::1]:8080/v1",
    "http://[::ffff:127.0.0.1]/v1",
    "http://169.254.169.254/latest/meta-data",
    "http://[::ffff:169.254.169.254]/v1",
    "http://2130706433/v1",
    "http://0x7f.1/v1",
    "http://0177.0.0.1/v1",
    "http://localhost:1234/v1",
    "http://10.0.0.1/v1",
    "http://192.168.1.1/v1",
    "http://100.100.100.200/v1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_base_urls_are_refused_by_default() {
    common::run_with_timeout(async {
        let mut env = TestEnv::new(Backend::Sqlite).await;
        env.set_env("TOKEX_SECURITY_UPSTREAM_ALLOW", "");
        env.create_user("seller", &["seller"]).await;
        let gateway = env.start_gateway().await;
        let token = gateway.login("seller").await;
        for base_url in INTERNAL {
            let body = json!({
                "provider": "openai",
                "base_url": base_url,
                "models": [MODEL],
                "api_key": "sk-mock-ssrf-0000",
                "declared_balance": 1000,
            });
            let reply = gateway.admin(Method::POST, "/api/v1/seller/keys", &token, Some(&body)).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{base_url} was accepted: {}", reply.text());
            assert!(reply.text().contains("base_url"), "{base_url}: {}", reply.text());
        }
        // The CLI applies the same rule.
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
                    "http://169.254.169.254/v1",
                    "--models",
                    MODEL,
                ],
                &[("TOKEX_SELLER_API_KEY", "sk-mock-ssrf-1111")],
            )
            .await;
        assert!(!out.status.success(), "the CLI deposited a key for the metadata endpoint");
        assert!(String::from_utf8_lossy(&out.stderr).contains("base_url"), "{}", String::from_utf8_lossy(&out.stderr));
        let keys = gateway.admin(Method::GET, "/api/v1/seller/keys", &token, None).await;
        assert_eq!(keys.status, StatusCode::OK);
        assert!(!keys.text().contains("sk-mock-ssrf"), "{}", keys.text());
    })
    .await;
}

/// A key deposited while its network was allowed is not routed by a gateway that no longer allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_resolves_inside_is_not_routed() {
    common::run_with_timeout(async {
        let env = TestEnv::new(Backend::Sqlite).await;
        let buyer = env.seller_and_buyer().await;
        env.add_seller_key("seller", "sk-mock-inside-2222", &[MODEL], 1_000_000).await;
        let allowed = env.start_gateway().await;
        assert_eq!(allowed.chat(&buyer.key, MODEL, 2, false).await.status, StatusCode::OK);
        allowed.sigterm();

        let strict = env.start_gateway_with(&[("TOKEX_SECURITY_UPSTREAM_ALLOW", "")]).await;
        let counts_before = env.mock.counts().await;
        strict.chat(&buyer.key, MODEL, 2, false).await.assert_openai_error(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(env.mock.counts().await, counts_before, "the refused key was called");
    })
    .await;
}
