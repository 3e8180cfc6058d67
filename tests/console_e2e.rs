//! The web console in a real browser (docs/console.md): a buyer, a seller and an admin with data behind them
//! (paid traffic through the gateway, a flagged key, a dispute), the real `token-exchange serve`, and
//! tests/console/e2e.mjs driving Debian's Chromium through playwright-core: each role signs in and does one
//! real task, checked in the page and through the API, with a screenshot of every view in
//! `target/console-screenshots/`.
//!
//! The console may call the API only by operationId through the OpenAPI document: every operationId in its
//! source must be in the live document, and no API path may be written in it. The console's own files are
//! served with their content types and a strict Content-Security-Policy.
//!
//! A missing browser or node_modules is a failure naming the setup command, never a skip.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Backend, BuyerKeyOptions, Gateway, StatusCode, TestEnv, PASSWORD};
use reqwest::Method;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const SETUP: &str = "run `scripts/setup.sh` (or `make setup`): it installs Debian's chromium and runs \
                     `npm ci --no-audit --no-fund` in tests/console";
const NODE_TIMEOUT: Duration = Duration::from_secs(150);
const MODEL: &str = "gpt-4o-mini";
const OTHER_MODEL: &str = "gpt-4o";

fn console_dir() -> PathBuf {
    common::repo_root().join("tests/console")
}

fn console_sources() -> PathBuf {
    common::repo_root().join("src/admin/console")
}

/// `target/console-screenshots`, wherever the target directory is.
fn screenshot_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("console-screenshots")
}

/// Fails (never skips) when the browser test cannot run, with the command that fixes it.
fn assert_prerequisites() {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: {SETUP}");
    let playwright = console_dir().join("node_modules/playwright-core/package.json");
    assert!(playwright.exists(), "{} is missing: {SETUP}", playwright.display());
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(node.is_ok_and(|out| out.status.success()), "`node` cannot be run: install Node.js 20 and {SETUP}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_for_each_role_in_a_real_browser() {
    assert_prerequisites();
    common::run_with_timeout(console_test()).await;
}

async fn console_test() {
    let env = TestEnv::new(Backend::Sqlite).await;
    env.create_user_without_credits("ops", &["admin"]).await;
    // The seller also buys: a user with two roles has two tabs.
    let seller_id = env.create_user("seller", &["seller", "buyer"]).await;
    env.create_user("buyer", &["buyer"]).await;
    let main_key = env.add_seller_key("seller", "sk-mock-console-main", &[MODEL, OTHER_MODEL], 50_000_000).await;
    let spare_key = env.add_seller_key("seller", "sk-mock-console-spare", &[MODEL], 20_000_000).await;
    let buyer_key = env.issue_buyer_key("buyer", BuyerKeyOptions { name: Some("laptop"), ..Default::default() }).await;
    let gateway = env.start_gateway().await;

    let seller = gateway.login("seller").await;
    for (id, name) in [(main_key, "main"), (spare_key, "spare")] {
        let body = json!({ "name": name });
        let reply = gateway.admin(Method::PATCH, &format!("/api/v1/seller/keys/{id}"), &seller, Some(&body)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    check_static_files(&gateway).await;
    check_operation_ids(&gateway).await;

    // An order: the buyer's escrow pays for the traffic below (escrows pay before the wallet).
    let buyer = gateway.login("buyer").await;
    let escrow =
        gateway.admin(Method::POST, "/api/v1/buyer/escrows", &buyer, Some(&json!({ "amount": 2_500_000 }))).await;
    assert_eq!(escrow.status, StatusCode::CREATED, "{}", escrow.text());

    // Paid traffic on two models, spread over both keys.
    let requests = 9;
    for i in 0..requests {
        let model = if i % 3 == 2 { OTHER_MODEL } else { MODEL };
        let reply = gateway.chat(&buyer_key.key, model, 20 + 15 * i, i % 2 == 0).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let records = env.wait_usage_records(requests as usize).await;
    let disputed = records.iter().find(|r| r.cost_credits > 0).expect("a paid request");

    let body = json!({ "request_id": disputed.request_id, "reason": "The answer was cut off." });
    let dispute = gateway.admin(Method::POST, "/api/v1/buyer/disputes", &buyer, Some(&body)).await;
    assert_eq!(dispute.status, StatusCode::CREATED, "open a dispute: {}", dispute.text());
    let dispute_id = dispute.json()["id"].as_i64().expect("a dispute id");

    flag_for_review(&env, seller_id, spare_key).await;

    let screenshots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&screenshots);
    let output = run_e2e(&gateway, &screenshots, dispute_id, spare_key).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tests/console/e2e.mjs failed ({}); screenshots in {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status,
        screenshots.display()
    );
    eprintln!("{stdout}");

    // What the browser did, seen from the API.
    let admin = gateway.login("ops").await;
    let refunded = gateway.admin(Method::GET, "/api/v1/admin/disputes?status=refunded", &admin, None).await.json();
    assert!(
        refunded["disputes"].as_array().is_some_and(|list| list.iter().any(|d| d["id"] == dispute_id)),
        "the dispute is not refunded: {refunded:#}"
    );
    for id in [main_key, spare_key] {
        let key = gateway.admin(Method::GET, &format!("/api/v1/seller/keys/{id}"), &seller, None).await.json();
        assert_eq!(key["status"], "active", "key {id} after pause, resume and review: {key:#}");
    }
    let keys = gateway.admin(Method::GET, "/api/v1/buyer/keys", &buyer, None).await.json();
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(2), "the console's new key: {keys:#}");
    env.assert_ledger_ok(&[]).await;
    for name in ["00-login", "10-buyer-overview", "21-seller-key-paused", "30-admin-report", "33-admin-disputes-open"] {
        let png = screenshots.join(format!("{name}.png"));
        assert!(std::fs::metadata(&png).is_ok_and(|m| m.len() > 5_000), "no screenshot {}", png.display());
    }
}

/// A flag as risk control leaves it (docs/risk.md): the key flagged for dilution and pending review, the
/// event with its reason, a balance sample, and the owner's notification.
async fn flag_for_review(env: &TestEnv, owner_id: i64, key_id: i64) {
    let now = common::now_ms();
    env.execute_sql(&format!(
        "UPDATE hosted_keys SET status = 'flagged', status_cause = 'dilution', review = 'pending', \
         updated_at_ms = {now} WHERE id = {key_id}"
    ))
    .await;
    let reason = "provider balance dropped 612,000 credits more than metered";
    env.execute_sql(&format!(
        "INSERT INTO key_events (hosted_key_id, owner_id, from_status, to_status, reason, actor_id, created_at_ms) \
         VALUES ({key_id}, {owner_id}, 'active', 'flagged', '{reason}', NULL, {now})"
    ))
    .await;
    env.execute_sql(&format!(
        "INSERT INTO key_balance_samples (hosted_key_id, taken_at_ms, balance_credits, metered_credits, \
         inflight_credits, excess_credits, verdict) VALUES ({key_id}, {now}, 18790000, 1210, 0, 612000, 'diluted')"
    ))
    .await;
    env.execute_sql(&format!(
        "INSERT INTO notifications (user_id, kind, hosted_key_id, message, created_at_ms, read_at_ms, \
         delivered_at_ms, delivery_attempts) VALUES ({owner_id}, 'key_status', {key_id}, \
         'Key #{key_id} was flagged: {reason}. It is out of routing until an admin reviews it.', {now}, NULL, NULL, 0)"
    ))
    .await;
}

async fn run_e2e(gateway: &Gateway, screenshots: &Path, dispute_id: i64, flagged_key: i64) -> std::process::Output {
    let mut command = tokio::process::Command::new("node");
    command
        .arg(console_dir().join("e2e.mjs"))
        .current_dir(console_dir())
        .env("CONSOLE_URL", gateway.admin_url(""))
        .env("GATEWAY_URL", gateway.url(""))
        .env("BUYER_USER", "buyer")
        .env("SELLER_USER", "seller")
        .env("ADMIN_USER", "ops")
        .env("PASSWORD", PASSWORD)
        .env("DISPUTE_ID", dispute_id.to_string())
        .env("FLAGGED_KEY_ID", flagged_key.to_string())
        .env("SCREENSHOT_DIR", screenshots)
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(NODE_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("tests/console/e2e.mjs took longer than {NODE_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("run node tests/console/e2e.mjs: {e}; {SETUP}"))
}

/// `/` leads to the console; its files come with their types, the CSP and no-store; unknown files are 404.
async fn check_static_files(gateway: &Gateway) {
    let client = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for path in ["/", "/console"] {
        let reply = client.get(gateway.admin_url(path)).send().await.unwrap();
        assert!(reply.status().is_redirection(), "{path}: {}", reply.status());
        assert_eq!(reply.headers()["location"], "/console/", "{path}");
    }
    for (path, content_type) in [
        ("/console/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/api.js", "text/javascript; charset=utf-8"),
        ("/console/app.css", "text/css; charset=utf-8"),
        ("/console/favicon.svg", "image/svg+xml"),
    ] {
        let reply = client.get(gateway.admin_url(path)).send().await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "{path}");
        let headers = reply.headers();
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-"), "{path}: {csp}");
    }
    let missing = client.get(gateway.admin_url("/console/missing.js")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

fn identifier(text: &str) -> String {
    text.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

/// Every operationId the console's modules name: `api.call('<id>'`, `api.has('<id>'`, `api.download('<id>'` and
/// the `needs: [...]` lists of its views. A call without a literal id would escape the check, so there must be none.
fn console_operations() -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(console_sources()).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        files += 1;
        let without_spec = source.replace("'/api/v1/openapi.json'", "");
        assert!(!without_spec.contains("/api/v1/"), "{} hard-codes an API path", path.display());
        if path.extension().is_none_or(|e| e != "js") {
            continue;
        }
        for marker in ["api.call(", "api.has(", "api.download("] {
            for (at, _) in source.match_indices(marker) {
                let rest = source[at + marker.len()..].trim_start();
                let id = rest.strip_prefix('\'').map(identifier).unwrap_or_default();
                assert!(!id.is_empty(), "{}: {marker} without a literal operationId", path.display());
                used.insert(id);
            }
        }
        for (at, _) in source.match_indices("needs: [") {
            let list = &source[at + "needs: [".len()..];
            let list = &list[..list.find(']').unwrap()];
            used.extend(list.split(',').map(|item| identifier(item.trim().trim_start_matches('\''))));
        }
    }
    assert!(files >= 5, "the console's sources are not in {}", console_sources().display());
    used
}

async fn check_operation_ids(gateway: &Gateway) {
    let reply = gateway.client.get(gateway.admin_url("/api/v1/openapi.json")).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let doc: Value = reply.json().await.unwrap();
    let offered: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("paths in the document")
        .values()
        .flat_map(|item| item.as_object().into_iter().flat_map(|ops| ops.values()))
        .filter_map(|op| op["operationId"].as_str().map(String::from))
        .collect();
    let used = console_operations();
    for expected in ["auth_login", "auth_me", "buyer_keys_create", "seller_keys_pause", "analytics_timeseries"] {
        assert!(used.contains(expected), "the scan of the console's sources missed {expected}: {used:?}");
    }
    let missing: Vec<&String> = used.difference(&offered).collect();
    assert!(missing.is_empty(), "the console calls operations that /api/v1/openapi.json lacks: {missing:?}");
}
