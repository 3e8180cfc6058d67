//! Several gateway nodes on one MariaDB and one Redis: an admin change made through one node reaches the
//! key pool of every node at once (Redis pub/sub), not only on the next periodic refresh.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, Gateway, StatusCode, TestEnv, TEST_COMPLETION_PRICE, TEST_PROMPT_PRICE};
use reqwest::Method;
use serde_json::json;

const MODEL: &str = "gpt-4o-mini";
/// Far longer than the test: only the Redis notification can explain a change seen in time.
const SLOW_REFRESH_MS: &str = "600000";
const PROPAGATION_LIMIT: Duration = Duration::from_secs(5);

async fn wait_for_status(node: &Gateway, key: &str, model: &str, want: StatusCode) -> Duration {
    let start = Instant::now();
    loop {
        let got = node.chat(key, model, 2, false).await.status;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PROPAGATION_LIMIT,
            "node did not see the change within {PROPAGATION_LIMIT:?}: {model} still answers {got}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_on_one_node_reach_the_others_through_redis() {
    common::run_with_timeout(async {
        let env = TestEnv::new(Backend::MariaDb).await;
        let buyer = env.seller_and_buyer().await;
        let first_key = env.add_seller_key("seller", "sk-mock-nodeA-1111", &[MODEL], 1_000).await;
        // Priced beforehand: a price alone does not make a model servable.
        env.set_price("late-model", TEST_PROMPT_PRICE, TEST_COMPLETION_PRICE).await;
        let node_env =
            [("TOKEX_REDIS_URL", "redis://127.0.0.1:6379"), ("TOKEX_POOL_REFRESH_INTERVAL_MS", SLOW_REFRESH_MS)];
        let node_a = env.start_gateway_with(&node_env).await;
        let node_b = env.start_gateway_with(&node_env).await;

        for node in [&node_a, &node_b] {
            assert_eq!(node.chat(&buyer.key, MODEL, 2, false).await.status, StatusCode::OK);
            node.chat(&buyer.key, "late-model", 2, false).await.assert_openai_error(StatusCode::NOT_FOUND);
        }

        // A seller deposits a key through node A's admin API; node B routes it without a restart.
        let token = node_a.login("seller").await;
        let body = json!({
            "provider": "openai",
            "base_url": env.mock.base_url(),
            "models": ["late-model"],
            "api_key": "sk-mock-late-2222",
            "declared_balance": 10,
        });
        let created = node_a.admin(Method::POST, "/api/v1/seller/keys", &token, Some(&body)).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
        let seen_after = wait_for_status(&node_b, &buyer.key, "late-model", StatusCode::OK).await;
        eprintln!("node B routed the new key {seen_after:?} after node A accepted it");

        // Pausing the only key of a model on node A takes it out of rotation on node B too.
        let paused = node_a.admin(Method::POST, &format!("/api/v1/seller/keys/{first_key}/pause"), &token, None).await;
        assert_eq!(paused.status, StatusCode::OK, "{}", paused.text());
        wait_for_status(&node_b, &buyer.key, MODEL, StatusCode::SERVICE_UNAVAILABLE).await;

        // Both nodes write usage into the one shared database.
        let counts = env.mock.counts().await;
        assert_eq!(counts.get("sk-mock-late-2222").copied().unwrap_or(0), 1, "{counts:?}");
        let start = Instant::now();
        loop {
            let records = env.usage_records().await;
            if records.iter().any(|r| r.model == "late-model" && r.status_code == 200) {
                break;
            }
            assert!(start.elapsed() < common::USAGE_WAIT, "no usage record of the late-model call: {records:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}
