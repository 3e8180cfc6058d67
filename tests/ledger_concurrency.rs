//! Concurrent requests against a balance that covers only a few of them (docs/ledger.md, "Holds"): each
//! request reserves its worst case before it is proxied, so no burst can spend more than the buyer has;
//! the requests that cannot be covered get 402 `insufficient_quota` without an upstream call, no balance
//! ever goes below zero, and the books balance to the credit afterwards.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_record_costs, chat_body, expected_books, expected_cost, http_client, worst_case, Backend, BuyerKeyOptions,
    Earner, Gateway, StatusCode, TestEnv, UsageRecord,
};
use serde_json::Value;

const MODEL: &str = "gpt-4o-mini";
const PROMPT_PRICE: i64 = 1_000_003;
const COMPLETION_PRICE: i64 = 2_000_007;
const REQUESTS: usize = 50;
/// Each slow stream sends `MAX_TOKENS` + 3 events 100 ms apart, so all requests are in flight together.
const MAX_TOKENS: i64 = 30;
const FAST_HOLDS: [(&str, &str); 1] = [("TOKEX_LEDGER_HOLD_IDLE_MS", "300")];

backend_tests!(
    concurrent_slow_streams_cannot_overdraw_a_buyer,
    a_burst_of_mixed_requests_spends_at_most_the_balance,
    two_nodes_cannot_overdraw_a_buyer,
);

fn price_of(model: &str) -> (i64, i64) {
    assert_eq!(model, MODEL);
    (PROMPT_PRICE, COMPLETION_PRICE)
}

/// One request's outcome as the buyer saw it.
#[derive(Debug)]
struct Outcome {
    status: StatusCode,
    body: String,
    request_id: Option<String>,
    started: Instant,
    finished: Instant,
}

async fn send(gateway: &Gateway, key: &str, body: Vec<u8>) -> Outcome {
    let started = Instant::now();
    let response = http_client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send a request");
    let status = response.status();
    let request_id = response.headers().get("x-tokex-request-id").and_then(|v| v.to_str().ok()).map(String::from);
    let body = response.text().await.expect("read a response");
    Outcome { status, body, request_id, started, finished: Instant::now() }
}

/// Polls the lowest balance of any account but the external one until `stop` (and once more after it).
/// Returns once the watcher is connected and has taken its first sample.
async fn watch_balances(env: &TestEnv, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(i64, usize)> {
    use sea_orm::{ConnectionTrait, Statement};
    let db = sea_orm::Database::connect(&env.db.url).await.expect("connect");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(async move {
        let (mut lowest, mut samples) = (i64::MAX, 0);
        let mut ready = Some(ready_tx);
        loop {
            let last = stop.load(Ordering::SeqCst);
            let sql = "SELECT balance FROM accounts WHERE kind <> 'external'";
            let rows = db.query_all(Statement::from_string(db.get_database_backend(), sql)).await.expect("sample");
            for row in rows {
                lowest = lowest.min(row.try_get::<i64>("", "balance").expect("balance"));
            }
            samples += 1;
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            if last {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = db.close().await;
        (lowest, samples)
    });
    ready_rx.await.expect("the watcher took its first sample");
    handle
}

/// A chat request; a stream asks for usage itself, so that the gateway forwards the body unchanged and its
/// length (the prompt bound of the worst case) is known here.
fn request_body(stream: bool) -> Vec<u8> {
    let mut body = chat_body(MODEL, MAX_TOKENS as u32, stream);
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    serde_json::to_vec(&body).unwrap()
}

struct Setup {
    env: TestEnv,
    buyer_id: i64,
    seller_id: i64,
    key: String,
}

async fn setup(backend: Backend, grant: i64, seller_api_key: &str) -> Setup {
    let env = TestEnv::new(backend).await;
    env.migrate().await;
    env.set_price(MODEL, PROMPT_PRICE, COMPLETION_PRICE).await;
    let seller_id = env.create_user_without_credits("seller", &["seller"]).await;
    let buyer_id = env.create_user_without_credits("buyer", &["buyer"]).await;
    assert_eq!(env.grant("buyer", grant).await, grant);
    let key = env.issue_buyer_key("buyer", BuyerKeyOptions::default()).await.key;
    env.add_seller_key("seller", seller_api_key, &[MODEL], 1_000_000).await;
    Setup { env, buyer_id, seller_id, key }
}

/// Everything after the burst: 402s carry `insufficient_quota` and reached no upstream, every request has
/// its usage record, the records cost what their tokens say, the books balance and `ledger check` passes.
/// Returns the records of the requests that were served.
async fn check_outcome(s: &Setup, outcomes: &[Outcome], grant: i64) -> Vec<UsageRecord> {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == StatusCode::OK).collect();
    for outcome in outcomes.iter().filter(|o| o.status != StatusCode::OK) {
        assert_eq!(outcome.status, StatusCode::PAYMENT_REQUIRED, "{outcome:#?}");
        let body: Value = serde_json::from_str(&outcome.body).expect("an OpenAI error body");
        assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
        assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    }
    assert!(!ok.is_empty(), "at least one request must be served: {outcomes:#?}");
    let upstream_calls: u64 = s.env.mock.counts().await.values().sum();
    assert_eq!(upstream_calls, ok.len() as u64, "only the served requests may reach the upstream");

    let records = s.env.wait_exact_usage_records(outcomes.len()).await;
    let ledger = s.env.wait_holds_closed().await;
    assert_record_costs(&records, price_of);
    for outcome in outcomes {
        let id = outcome.request_id.as_deref().expect("every answer names its request");
        let record = records.iter().find(|r| r.request_id == id).expect("a usage record per request");
        assert_eq!(record.status_code, outcome.status.as_u16() as i32, "{record:#?}");
    }
    let served: Vec<UsageRecord> = records.iter().filter(|r| r.status_code == 200).cloned().collect();
    let spent: i64 = served.iter().map(|r| r.cost_credits).sum();
    assert!(spent <= grant, "spent {spent} of a balance of {grant}");
    let settlements = ledger.settlements();
    assert_eq!(settlements.len(), served.len(), "one settlement per served request");
    for record in &served {
        assert_eq!(settlements[&record.request_id].len(), 1);
        assert_eq!(settlements[&record.request_id][0].paid, record.cost_credits);
    }
    ledger.assert_books(&[(s.buyer_id, grant)], &expected_books(&records, |_| Earner::Seller(s.seller_id)));
    assert_eq!(ledger.wallet(s.buyer_id), grant - spent, "the wallet is back to the grant minus what was spent");
    s.env.assert_ledger_ok(&[]).await;
    served
}

/// 50 slow streams at once against 3.5 worst cases: while all are in flight, at most 3 can be covered.
async fn concurrent_slow_streams_cannot_overdraw_a_buyer(backend: Backend) {
    let body = request_body(true);
    let worst = worst_case(body.len(), MAX_TOKENS, PROMPT_PRICE, COMPLETION_PRICE);
    let grant = worst * 7 / 2;
    let s = setup(backend, grant, "sk-mock-slow-concurrency-1111").await;
    let gateway = s.env.start_gateway_with(&FAST_HOLDS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_balances(&s.env, stop.clone()).await;
    let outcomes: Vec<Outcome> =
        futures::future::join_all((0..REQUESTS).map(|_| send(&gateway, &s.key, body.clone()))).await;
    stop.store(true, Ordering::SeqCst);
    let (lowest, samples) = watcher.await.unwrap();
    assert!(samples > 0 && lowest >= 0, "a balance went to {lowest} during the burst ({samples} samples)");

    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == StatusCode::OK).collect();
    let covered_at_once = (grant / worst) as usize;
    // While every request was refused before the first served one ended, all were in flight together.
    let first_done = ok.iter().map(|o| o.finished).min();
    let all_concurrent = outcomes
        .iter()
        .filter(|o| o.status != StatusCode::OK)
        .all(|o| first_done.is_some_and(|first| o.finished < first));
    if all_concurrent {
        assert!(ok.len() <= covered_at_once, "{} served at once; the balance covers {covered_at_once}", ok.len());
    } else {
        eprintln!("note: some requests were refused after a served one ended; checking the total bound only");
    }
    let upstream = s.env.mock.requests().await;
    assert!(upstream.iter().all(|r| r.body_len == body.len()), "the body went upstream unchanged: {upstream:#?}");
    let served = check_outcome(&s, &outcomes, grant).await;
    for record in &served {
        assert_eq!(record.completion_tokens, MAX_TOKENS, "{record:#?}");
    }
    // However the requests interleaved, what was served fits the balance.
    let cheapest = served.iter().map(|r| r.cost_credits).min().unwrap();
    assert!(served.len() as i64 * cheapest <= grant);
    eprintln!(
        "{} of {REQUESTS} served (worst case {worst}, balance {grant}, cost each {cheapest}); started within {:?}",
        served.len(),
        outcomes.iter().map(|o| o.started).max().unwrap() - outcomes.iter().map(|o| o.started).min().unwrap()
    );
}

/// Fast stream and non-stream requests: served ones end and give their unspent reservation back while
/// others still arrive, so more than 3.5 worst cases' worth of requests can be served, but never more than
/// the balance pays for.
async fn a_burst_of_mixed_requests_spends_at_most_the_balance(backend: Backend) {
    let bodies: Vec<Vec<u8>> = (0..REQUESTS).map(|i| request_body(i % 2 == 0)).collect();
    let worst = bodies.iter().map(|b| worst_case(b.len(), MAX_TOKENS, PROMPT_PRICE, COMPLETION_PRICE)).max().unwrap();
    let grant = worst * 7 / 2;
    let s = setup(backend, grant, "sk-mock-concurrency-2222").await;
    let gateway = s.env.start_gateway_with(&FAST_HOLDS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_balances(&s.env, stop.clone()).await;
    let outcomes: Vec<Outcome> = futures::future::join_all(bodies.into_iter().map(|b| send(&gateway, &s.key, b))).await;
    stop.store(true, Ordering::SeqCst);
    let (lowest, samples) = watcher.await.unwrap();
    assert!(samples > 0 && lowest >= 0, "a balance went to {lowest} during the burst ({samples} samples)");

    let served = check_outcome(&s, &outcomes, grant).await;
    let cheapest = expected_cost(1, MAX_TOKENS, PROMPT_PRICE, COMPLETION_PRICE);
    assert!(served.len() as i64 * cheapest <= grant, "{} served", served.len());
    eprintln!("{} of {REQUESTS} served (worst case {worst}, balance {grant})", served.len());
}

/// Two gateway nodes on one database, 25 slow streams each: every node reserves from a hold of its own,
/// and the holds together never hold more than the wallet had, so the two nodes together serve no more
/// than the balance covers.
async fn two_nodes_cannot_overdraw_a_buyer(backend: Backend) {
    let body = request_body(true);
    let worst = worst_case(body.len(), MAX_TOKENS, PROMPT_PRICE, COMPLETION_PRICE);
    let grant = worst * 7 / 2;
    let s = setup(backend, grant, "sk-mock-slow-concurrency-3333").await;
    let node_a = s.env.start_gateway_with(&FAST_HOLDS).await;
    let node_b = s.env.start_gateway_with(&FAST_HOLDS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_balances(&s.env, stop.clone()).await;
    let requests = (0..REQUESTS).map(|i| {
        let node = if i % 2 == 0 { &node_a } else { &node_b };
        send(node, &s.key, body.clone())
    });
    let outcomes: Vec<Outcome> = futures::future::join_all(requests).await;
    stop.store(true, Ordering::SeqCst);
    let (lowest, samples) = watcher.await.unwrap();
    assert!(samples > 0 && lowest >= 0, "a balance went to {lowest} during the burst ({samples} samples)");

    let ok = outcomes.iter().filter(|o| o.status == StatusCode::OK).count();
    let first_done = outcomes.iter().filter(|o| o.status == StatusCode::OK).map(|o| o.finished).min();
    let all_concurrent = outcomes
        .iter()
        .filter(|o| o.status != StatusCode::OK)
        .all(|o| first_done.is_some_and(|first| o.finished < first));
    let covered_at_once = (grant / worst) as usize;
    if all_concurrent {
        assert!(ok <= covered_at_once, "{ok} served by two nodes at once; the balance covers {covered_at_once}");
    }
    let ledger = s.env.ledger_snapshot().await;
    let nodes: std::collections::BTreeSet<&str> = ledger.holds.iter().map(|h| h.node_id.as_str()).collect();
    eprintln!("{ok} of {REQUESTS} served by two nodes (holds by {nodes:?})");
    check_outcome(&s, &outcomes, grant).await;
}
