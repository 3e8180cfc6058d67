//! A gateway node killed with SIGKILL under load (docs/ledger.md, "Crashes"): the holds it left open are
//! closed as stale by the restarted node, requests settled before the crash stay settled exactly once,
//! requests in flight cost nothing, and not a credit is created or lost.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_record_costs, chat_body, expected_books, http_client, Backend, BuyerKeyOptions, Earner, StatusCode, TestEnv,
};
use reqwest::Method;
use serde_json::json;

const MODEL: &str = "gpt-4o-mini";
const PROMPT_PRICE: i64 = 1_234_567;
const COMPLETION_PRICE: i64 = 3_456_789;
const GRANT: i64 = 50_000_000;
const ESCROW: i64 = 20_000_000;
const WORKERS: usize = 16;
/// Stale holds are recovered within a couple of seconds; renewals and sweeps run often enough for that.
const LEDGER_ENV: [(&str, &str); 4] = [
    ("TOKEX_LEDGER_HOLD_STALE_MS", "1500"),
    ("TOKEX_LEDGER_HOLD_RENEW_MS", "300"),
    ("TOKEX_LEDGER_MAINTENANCE_INTERVAL_MS", "300"),
    ("TOKEX_LEDGER_HOLD_IDLE_MS", "300"),
];

backend_tests!(
    a_crash_loses_no_settlement_and_leaks_no_credits,
    a_graceful_stop_settles_everything_and_closes_every_hold,
    #[ignore = "bug: streams cut at the end of the grace period get no usage record and are never billed"]
    streams_cut_by_a_graceful_stop_are_billed_for_what_was_delivered,
    a_restarted_node_returns_its_holds_at_start_up,
);

fn price_of(model: &str) -> (i64, i64) {
    assert_eq!(model, MODEL);
    (PROMPT_PRICE, COMPLETION_PRICE)
}

/// Requests in a loop until `stop`: slow streams (in flight for about a second) or instant non-stream
/// requests (which keep the usage writer busy). Errors (the node is killed under them) are counted, not
/// fatal.
async fn worker(url: String, key: String, stream: bool, stop: Arc<AtomicBool>) -> BTreeMap<String, usize> {
    let client = http_client();
    let mut seen = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        let body = chat_body(MODEL, if stream { 8 } else { 3 }, stream);
        let outcome = match client.post(&url).bearer_auth(&key).json(&body).send().await {
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Ok(_) => status.as_u16().to_string(),
                    Err(_) => format!("{status} cut"),
                }
            }
            Err(_) => "no answer".to_owned(),
        };
        *seen.entry(outcome).or_default() += 1;
    }
    seen
}

async fn a_crash_loses_no_settlement_and_leaks_no_credits(backend: Backend) {
    let env = TestEnv::new(backend).await;
    env.migrate().await;
    env.set_price(MODEL, PROMPT_PRICE, COMPLETION_PRICE).await;
    let seller = env.create_user_without_credits("seller", &["seller"]).await;
    // One buyer pays from the wallet, the other from an escrow only: stale holds must go back to either.
    let wallet_buyer = env.create_user_without_credits("wallet-buyer", &["buyer"]).await;
    let escrow_buyer = env.create_user_without_credits("escrow-buyer", &["buyer"]).await;
    env.grant("wallet-buyer", GRANT).await;
    env.grant("escrow-buyer", GRANT).await;
    let wallet_key = env.issue_buyer_key("wallet-buyer", BuyerKeyOptions::default()).await.key;
    let escrow_key = env.issue_buyer_key("escrow-buyer", BuyerKeyOptions::default()).await.key;
    env.add_seller_key("seller", "sk-mock-slow-crash-1111", &[MODEL], 1_000_000).await;

    let first = env.start_gateway_with(&LEDGER_ENV).await;
    let token = first.login("escrow-buyer").await;
    let reply = first.admin(Method::POST, "/api/v1/buyer/escrows", &token, Some(&json!({"amount": ESCROW}))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let escrow_id = reply.json()["id"].as_i64().unwrap();
    let reply = first.admin(Method::PUT, "/api/v1/buyer/settings", &token, Some(&json!({"wallet_pays": false}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // Load, until enough requests are settled; then the node dies with requests in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let url = first.url("/v1/chat/completions");
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let key = if i % 4 < 2 { wallet_key.clone() } else { escrow_key.clone() };
            tokio::spawn(worker(url.clone(), key, i % 2 == 0, stop.clone()))
        })
        .collect();
    env.wait_usage_records(100).await;
    tokio::time::sleep(Duration::from_millis(130)).await;
    first.process.signal("KILL");
    let mut first = first;
    let status = first.process.wait_exit(Duration::from_secs(10)).await.expect("the node dies at once");
    assert!(!status.success(), "killed: {status}");
    stop.store(true, Ordering::SeqCst);
    let mut seen = BTreeMap::<String, usize>::new();
    for worker in workers {
        for (outcome, n) in worker.await.unwrap() {
            *seen.entry(outcome).or_default() += n;
        }
    }
    let at_crash = env.ledger_snapshot().await;
    let records_at_crash = env.usage_records().await;
    let dead_nodes: BTreeSet<String> = at_crash.open_holds().iter().map(|h| h.node_id.clone()).collect();
    eprintln!(
        "at the crash: outcomes {seen:?}, {} usage records, open holds {:?}",
        records_at_crash.len(),
        at_crash.open_holds().iter().map(|h| (h.id, h.escrow_id, h.amount, h.spent)).collect::<Vec<_>>()
    );
    assert!(!dead_nodes.is_empty(), "the node died holding credits (else this test tests nothing)");
    assert!(seen.get("200").copied().unwrap_or(0) > 0, "{seen:?}");

    // The restarted node serves, and recovers the dead node's holds once they are stale.
    let second = env.start_gateway_with(&LEDGER_ENV).await;
    let restarted = Instant::now();
    for i in 0..8 {
        let key = if i % 2 == 0 { &wallet_key } else { &escrow_key };
        let reply = second.chat(key, MODEL, 3, i % 4 < 2).await;
        assert_eq!(reply.status, StatusCode::OK, "after the restart: {}", reply.text());
    }
    env.wait_usage_records(records_at_crash.len() + 8).await;
    let ledger = env.wait_holds_closed().await;
    eprintln!("stale holds closed {:?} after the restart", restarted.elapsed());
    let closed_by_recovery: Vec<_> = ledger.holds.iter().filter(|h| dead_nodes.contains(&h.node_id)).collect();
    assert!(closed_by_recovery.iter().all(|h| h.status == "closed"), "{closed_by_recovery:#?}");

    // Invariants.
    env.assert_ledger_ok(&LEDGER_ENV).await;
    let records = env.usage_records().await;
    assert_record_costs(&records, price_of);
    let settlements = ledger.settlements();
    for (request, entries) in &settlements {
        assert_eq!(entries.len(), 1, "request {request} is settled {} times", entries.len());
        let record = records.iter().find(|r| &r.request_id == request);
        assert!(record.is_some(), "settlement {request} has no usage record");
    }
    for record in records.iter().filter(|r| r.cost_credits > 0) {
        let entries = settlements.get(&record.request_id).unwrap_or_else(|| panic!("unsettled: {record:#?}"));
        assert_eq!(entries[0].paid, record.cost_credits - record.unpaid_credits, "{record:#?}");
    }
    let ids: BTreeSet<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "a request recorded twice");
    let books = expected_books(&records, |_| Earner::Seller(seller));
    ledger.assert_books(&[(wallet_buyer, GRANT), (escrow_buyer, GRANT)], &books);
    assert_eq!(ledger.external(), -2 * GRANT, "the external account is minus the grants");
    assert_eq!(ledger.total(), 0);
    // The escrow buyer paid from the escrow only; what the dead node held went back to the escrow.
    let escrow = ledger.escrows.iter().find(|e| e.id == escrow_id).unwrap();
    assert_eq!(escrow.status, "active");
    assert_eq!(ledger.wallet(escrow_buyer), GRANT - ESCROW, "the escrow buyer's wallet paid nothing");
    assert_eq!(ledger.escrowed(escrow_buyer), ESCROW - books.paid.get(&escrow_buyer).copied().unwrap_or(0));
    assert_eq!(ledger.wallet(wallet_buyer), GRANT - books.paid.get(&wallet_buyer).copied().unwrap_or(0));
    let recovered: Vec<_> = ledger.entries_of_kind("hold_close");
    assert_eq!(recovered.len(), ledger.holds.len(), "every hold is closed exactly once");
}

/// docs/ledger.md, "Crashes": a restarted node (same `ledger.node_id`) "closes what its previous run left
/// open before it serves". With the default `hold_stale_ms` (5 minutes) a buyer whose credits the dead node
/// held must be able to pay again as soon as the node is back, not only once the hold is stale.
async fn a_restarted_node_returns_its_holds_at_start_up(backend: Backend) {
    let env = TestEnv::new(backend).await;
    env.migrate().await;
    env.set_price(MODEL, PROMPT_PRICE, COMPLETION_PRICE).await;
    env.create_user_without_credits("seller", &["seller"]).await;
    let buyer_id = env.create_user_without_credits("buyer", &["buyer"]).await;
    // The buyer asks for usage, so the gateway forwards the body unchanged and its worst case is known here.
    let mut body = chat_body(MODEL, 20, true);
    body["stream_options"] = json!({"include_usage": true});
    let worst = common::worst_case(serde_json::to_vec(&body).unwrap().len(), 20, PROMPT_PRICE, COMPLETION_PRICE);
    // Less than two worst cases: while the dead node holds one, the wallet cannot pay for another.
    env.grant("buyer", 2 * worst - 1).await;
    let key = env.issue_buyer_key("buyer", BuyerKeyOptions::default()).await.key;
    env.add_seller_key("seller", "sk-mock-slow-restart-2222", &[MODEL], 1_000).await;
    let node = [("TOKEX_LEDGER_NODE_ID", "restarting-node"), ("TOKEX_LEDGER_HOLD_IDLE_MS", "300")];

    let mut first = env.start_gateway_with(&node).await;
    let url = first.url("/v1/chat/completions");
    let in_flight = {
        let (key, body) = (key.clone(), body.clone());
        tokio::spawn(async move { http_client().post(url).bearer_auth(key).json(&body).send().await.map(|_| ()) })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.mock.requests().await.is_empty() {
        assert!(Instant::now() < deadline, "the request did not reach the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.process.signal("KILL");
    first.process.wait_exit(Duration::from_secs(10)).await.expect("the node dies at once");
    let _ = in_flight.await;
    let held = env.ledger_snapshot().await;
    assert_eq!(held.open_holds().len(), 1, "{:#?}", held.holds);
    assert!(held.wallet(buyer_id) < worst, "the dead node holds what the next request needs: {:#?}", held.accounts);

    let second = env.start_gateway_with(&node).await;
    let after = env.ledger_snapshot().await;
    assert!(after.open_holds().is_empty(), "the restarted node returned its holds before serving: {:#?}", after.holds);
    let reply = second.post_json("/v1/chat/completions", Some(&key), &body).await;
    assert_eq!(reply.status, StatusCode::OK, "after the restart: {}", reply.text());
    let records = env.wait_exact_usage_records(1).await;
    let ledger = env.wait_holds_closed().await;
    assert_eq!(
        ledger.wallet(buyer_id),
        2 * worst - 1 - records[0].cost_credits,
        "the request in flight at the crash cost nothing"
    );
    env.assert_ledger_ok(&[]).await;
}

/// Starts slow streams of `max_tokens` tokens (about 100 ms per token) and returns once the upstream saw
/// `expect_upstream` requests in all.
async fn start_streams(
    env: &TestEnv,
    gateway: &common::Gateway,
    key: &str,
    n: usize,
    max_tokens: u32,
    expect_upstream: usize,
) -> Vec<tokio::task::JoinHandle<bool>> {
    let url = gateway.url("/v1/chat/completions");
    let streams = (0..n)
        .map(|_| {
            let (url, key) = (url.clone(), key.to_owned());
            tokio::spawn(async move {
                let body = chat_body(MODEL, max_tokens, true);
                match http_client().post(url).bearer_auth(key).json(&body).send().await {
                    Ok(response) => response.bytes().await.is_ok(),
                    Err(_) => false,
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.mock.requests().await.len() < expect_upstream {
        assert!(Instant::now() < deadline, "the streams did not reach the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    streams
}

struct Stopped {
    env: TestEnv,
    buyer_id: i64,
    seller: i64,
    /// Whether each stream was read to its end.
    completed: Vec<bool>,
}

/// One fast request, then `streams` slow streams of `max_tokens`, then SIGTERM (the harness's grace period
/// is 1 s); returns once the node exited.
async fn stop_with_streams_in_flight(backend: Backend, streams: usize, max_tokens: u32) -> Stopped {
    let env = TestEnv::new(backend).await;
    env.migrate().await;
    env.set_price(MODEL, PROMPT_PRICE, COMPLETION_PRICE).await;
    let seller = env.create_user_without_credits("seller", &["seller"]).await;
    let buyer_id = env.create_user_without_credits("buyer", &["buyer"]).await;
    env.grant("buyer", GRANT).await;
    let key = env.issue_buyer_key("buyer", BuyerKeyOptions::default()).await.key;
    env.add_seller_key("seller", "sk-mock-slow-graceful-3333", &[MODEL], 1_000).await;
    // Holds would stay open for minutes: only the shutdown closes them.
    let mut gateway = env.start_gateway_with(&[("TOKEX_LEDGER_HOLD_IDLE_MS", "600000")]).await;
    assert_eq!(gateway.chat(&key, MODEL, 3, false).await.status, StatusCode::OK);
    let handles = start_streams(&env, &gateway, &key, streams, max_tokens, streams + 1).await;
    gateway.sigterm();
    let status = gateway.process.wait_exit(Duration::from_secs(30)).await.expect("the node stops");
    assert!(status.success(), "a graceful stop exits 0: {status}");
    let mut completed = Vec::new();
    for handle in handles {
        completed.push(handle.await.unwrap());
    }
    drop(gateway);
    Stopped { env, buyer_id, seller, completed }
}

/// SIGTERM with short streams in flight: they finish within the grace period, every usage record is
/// written with its settlement, and the node closes its holds after them: nothing is left open.
async fn a_graceful_stop_settles_everything_and_closes_every_hold(backend: Backend) {
    let Stopped { env, buyer_id, seller, completed } = stop_with_streams_in_flight(backend, 4, 3).await;
    assert!(completed.iter().all(|&c| c), "streams of 0.6 s finish within the grace period: {completed:?}");
    let ledger = env.ledger_snapshot().await;
    assert!(ledger.open_holds().is_empty(), "a stopped node leaves no hold open: {:#?}", ledger.holds);
    let records = env.usage_records().await;
    assert_eq!(records.len(), 5, "every request has its record: {records:#?}");
    assert_record_costs(&records, price_of);
    ledger.assert_books(&[(buyer_id, GRANT)], &expected_books(&records, |_| Earner::Seller(seller)));
    assert_eq!(ledger.wallet(buyer_id), GRANT - records.iter().map(|r| r.cost_credits).sum::<i64>());
    env.assert_ledger_ok(&[]).await;
}

/// SIGTERM with long streams in flight: the grace period (1 s) ends while they still send, the node cuts
/// them. The buyers got part of the answers (and the sellers' upstream produced them), so, like any
/// response broken off after its first byte (docs/ledger.md, README "How requests are metered"), they must
/// be metered and settled for what was delivered, and written before the process exits (README: "the last
/// usage records are written before the process exits").
async fn streams_cut_by_a_graceful_stop_are_billed_for_what_was_delivered(backend: Backend) {
    let Stopped { env, buyer_id, seller, completed } = stop_with_streams_in_flight(backend, 4, 30).await;
    assert!(completed.iter().all(|&c| !c), "3 s streams cannot finish in a 1 s grace period: {completed:?}");
    let ledger = env.ledger_snapshot().await;
    assert!(ledger.open_holds().is_empty(), "a stopped node leaves no hold open: {:#?}", ledger.holds);
    let records = env.usage_records().await;
    assert_eq!(records.len(), 5, "the cut streams have no usage record (they were never billed): {records:#?}");
    let cut: Vec<_> = records.iter().filter(|r| r.completion_tokens < 30 && r.cost_credits > 0).collect();
    assert_eq!(cut.len(), 4, "{records:#?}");
    assert_record_costs(&records, price_of);
    ledger.assert_books(&[(buyer_id, GRANT)], &expected_books(&records, |_| Earner::Seller(seller)));
    env.assert_ledger_ok(&[]).await;
}
