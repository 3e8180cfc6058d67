//! Master-key rotation: `rotate-master-key` re-encrypts every seller key under the new key, after which
//! the gateway runs with the new key alone; a wrong key is refused without revealing any key material.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use base64::Engine;
use common::{Backend, StatusCode, TestEnv};

const MODEL: &str = "gpt-4o-mini";
const SELLER_KEY: &str = "sk-mock-rotate-secret-7777";

backend_tests!(rotation_moves_every_key_to_the_new_master_key);

fn master_key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

async fn rotate(env: &TestEnv, current: &str, previous: &str) -> std::process::Output {
    env.cli_output(&["rotate-master-key"], &[("TOKEX_MASTER_KEY", current), ("TOKEX_PREVIOUS_MASTER_KEYS", previous)])
        .await
}

async fn rotation_moves_every_key_to_the_new_master_key(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let (old, new, wrong) = (master_key(1), master_key(2), master_key(3));
    env.set_env("TOKEX_MASTER_KEY", old.clone());
    let buyer = env.seller_and_buyer().await;
    env.add_seller_key("seller", SELLER_KEY, &[MODEL], 1_000).await;
    env.add_seller_key("seller", "sk-mock-rotate-other-8888", &["other-model"], 1_000).await;

    let first = rotate(&env, &new, &old).await;
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&first.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["report"]["rotated"], 2, "{report}");
    assert_eq!(report["report"]["already_current"], 0, "{report}");

    // Idempotent: nothing left to do.
    let again = rotate(&env, &new, &old).await;
    let report: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&again.stdout).trim()).unwrap();
    assert_eq!(report["report"]["rotated"], 0, "{report}");
    assert_eq!(report["report"]["already_current"], 2, "{report}");

    // The gateway now works with the new key alone: the seller key still reaches the provider intact.
    env.set_env("TOKEX_MASTER_KEY", new.clone());
    let gateway = env.start_gateway().await;
    assert_eq!(gateway.chat(&buyer.key, MODEL, 2, false).await.status, StatusCode::OK);
    let requests = env.mock.requests().await;
    assert_eq!(requests.last().and_then(|r| r.api_key.clone()).as_deref(), Some(SELLER_KEY));
    drop(gateway);

    // A master key that opens nothing fails loudly, names the key ids, and prints no key material.
    let refused = rotate(&env, &wrong, "").await;
    assert!(!refused.status.success());
    let all_output =
        format!("{}{}", String::from_utf8_lossy(&refused.stdout), String::from_utf8_lossy(&refused.stderr));
    assert!(all_output.contains("could not be decrypted"), "{all_output}");
    assert!(!all_output.contains("rotate-secret") && !all_output.contains("rotate-other"), "{all_output}");
}
