//! Disputes end to end (docs/reports.md, "Disputes"): a buyer disputes real paid requests and escrows
//! through the admin REST API of a running gateway, an admin refunds or rejects, and the books (the buyer's
//! wallet, the seller's earnings, the platform's revenue) and `token-exchange ledger check` must agree.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use common::{expected_seller_share, Backend, BuyerKey, BuyerKeyOptions, Gateway, Reply, StatusCode, TestEnv};
use reqwest::Method;
use serde_json::{json, Value};

const MODEL: &str = "gpt-4o-mini";
const PROMPT_PRICE: i64 = 1_234_567;
const COMPLETION_PRICE: i64 = 3_456_789;
const GRANT: i64 = 5_000_000;
/// Idle holds close quickly, so that the books are final soon after the last request.
const FAST_HOLDS: [(&str, &str); 1] = [("TOKEX_LEDGER_HOLD_IDLE_MS", "300")];

backend_tests!(
    a_disputed_request_is_refunded_once,
    a_rejected_dispute_moves_nothing_and_the_request_may_be_disputed_again,
    an_escrow_dispute_refunds_every_request_the_escrow_paid,
    disputes_are_the_buyers_own_and_resolved_by_admins_only,
);

struct Setup {
    env: TestEnv,
    gateway: Gateway,
    buyer_id: i64,
    seller_id: i64,
    buyer: BuyerKey,
    /// A buyer without credits: every request is refused (402) and costs nothing.
    broke: BuyerKey,
    /// Session tokens.
    buyer_token: String,
    admin_token: String,
}

/// A seller with one key, a buyer granted exactly `GRANT` credits, another buyer, a buyer without credits,
/// an admin, and a gateway.
async fn setup(backend: Backend) -> Setup {
    let env = TestEnv::new(backend).await;
    env.migrate().await;
    env.set_price(MODEL, PROMPT_PRICE, COMPLETION_PRICE).await;
    let seller_id = env.create_user_without_credits("seller", &["seller"]).await;
    let buyer_id = env.create_user_without_credits("buyer", &["buyer"]).await;
    assert_eq!(env.grant("buyer", GRANT).await, GRANT);
    env.create_user("other", &["buyer"]).await;
    env.create_user_without_credits("boss", &["admin"]).await;
    let buyer = env.issue_buyer_key("buyer", BuyerKeyOptions::default()).await;
    env.create_user_without_credits("broke", &["buyer"]).await;
    let broke = env.issue_buyer_key("broke", BuyerKeyOptions::default()).await;
    env.add_seller_key("seller", "sk-mock-disputes-1111", &[MODEL], 1_000_000).await;
    let gateway = env.start_gateway_with(&FAST_HOLDS).await;
    let buyer_token = gateway.login("buyer").await;
    let admin_token = gateway.login("boss").await;
    Setup { env, gateway, buyer_id, seller_id, buyer, broke, buyer_token, admin_token }
}

/// A paid chat completion; returns its request id.
async fn paid_request(gateway: &Gateway, key: &str, max_tokens: u32) -> String {
    let reply = gateway.chat(key, MODEL, max_tokens, false).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    request_id(&reply)
}

fn request_id(reply: &Reply) -> String {
    reply
        .headers
        .get("x-tokex-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no x-tokex-request-id: {reply:?}"))
        .to_owned()
}

/// Waits for `n` usage records and for every hold to close; returns each request's cost.
async fn costs(env: &TestEnv, n: usize) -> std::collections::BTreeMap<String, i64> {
    let records = env.wait_exact_usage_records(n).await;
    env.wait_holds_closed().await;
    records.into_iter().map(|r| (r.request_id, r.cost_credits)).collect()
}

async fn call(gateway: &Gateway, method: Method, path: &str, token: &str, body: Option<Value>) -> Reply {
    gateway.admin(method, path, token, body.as_ref()).await
}

/// Asserts the status and the API's error shape with `code`.
fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

fn ok(reply: &Reply, status: StatusCode) -> Value {
    assert_eq!(reply.status, status, "{}", reply.text());
    reply.json()
}

async fn dispute(gateway: &Gateway, token: &str, body: Value) -> Reply {
    call(gateway, Method::POST, "/api/v1/buyer/disputes", token, Some(body)).await
}

async fn resolve(gateway: &Gateway, token: &str, id: i64, body: Value) -> Reply {
    call(gateway, Method::POST, &format!("/api/v1/admin/disputes/{id}/resolve"), token, Some(body)).await
}

// --- tests ----------------------------------------------------------------------------------------

/// The buyer disputes one of two paid requests; the admin refunds it: the buyer's wallet is back up by its
/// cost, the seller's earnings and the platform's revenue down by their shares, and the ledger is sound.
/// A second resolution, and a dispute of the refunded request, are refused.
async fn a_disputed_request_is_refunded_once(backend: Backend) {
    let Setup { env, gateway, buyer_id, seller_id, buyer, buyer_token, admin_token, .. } = setup(backend).await;
    let kept = paid_request(&gateway, &buyer.key, 3).await;
    let disputed = paid_request(&gateway, &buyer.key, 9).await;
    let costs = costs(&env, 2).await;
    let (kept_cost, cost) = (costs[&kept], costs[&disputed]);
    assert!(kept_cost > 0 && cost > 0, "{costs:?}");

    let created = ok(
        &dispute(&gateway, &buyer_token, json!({"request_id": disputed, "reason": "  the answer was cut off  "})).await,
        StatusCode::CREATED,
    );
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["buyer_id"], buyer_id, "{created}");
    assert_eq!(created["target_kind"], "request", "{created}");
    assert_eq!(created["request_id"], disputed.as_str(), "{created}");
    assert_eq!(created["escrow_id"], Value::Null, "paid from the wallet: {created}");
    assert_eq!(created["reason"], "the answer was cut off", "{created}");
    assert_eq!((created["status"].as_str(), created["refunded_credits"].as_i64()), (Some("open"), Some(0)));
    assert_eq!((&created["resolved_by"], &created["resolved_at_ms"]), (&Value::Null, &Value::Null), "{created}");

    let again = dispute(&gateway, &buyer_token, json!({"request_id": disputed, "reason": "still cut off"})).await;
    assert_error(&again, StatusCode::CONFLICT, "dispute_open");
    let mine = ok(&call(&gateway, Method::GET, "/api/v1/buyer/disputes", &buyer_token, None).await, StatusCode::OK);
    assert_eq!(mine["disputes"], json!([created]), "{mine}");
    let open = ok(
        &call(&gateway, Method::GET, "/api/v1/admin/disputes?status=open", &admin_token, None).await,
        StatusCode::OK,
    );
    assert_eq!(open["disputes"], json!([created]), "{open}");

    let resolved = ok(
        &resolve(&gateway, &admin_token, id, json!({"outcome": "refund", "note": "confirmed with the seller"})).await,
        StatusCode::OK,
    );
    assert_eq!((resolved["status"].as_str(), resolved["refunded_credits"].as_i64()), (Some("refunded"), Some(cost)));
    assert_eq!(resolved["resolution_note"], "confirmed with the seller", "{resolved}");
    assert!(resolved["resolved_by"].as_i64().is_some() && resolved["resolved_at_ms"].as_i64().is_some(), "{resolved}");

    let ledger = env.ledger_snapshot().await;
    assert_eq!(ledger.wallet(buyer_id), GRANT - kept_cost, "the disputed request costs nothing now");
    assert_eq!(ledger.wallet(seller_id), expected_seller_share(kept_cost), "the seller gave back its share");
    assert_eq!(ledger.revenue(), kept_cost - expected_seller_share(kept_cost));
    let refunds = ledger.entries_of_kind("refund");
    assert_eq!(refunds.len(), 1, "{refunds:#?}");
    assert_eq!(refunds[0].request_id.as_deref(), Some(disputed.as_str()));
    assert_eq!(refunds[0].memo.as_deref(), Some(format!("dispute {id}").as_str()));
    env.assert_ledger_ok(&[]).await;
    let wallet = ok(&call(&gateway, Method::GET, "/api/v1/buyer/wallet", &buyer_token, None).await, StatusCode::OK);
    assert_eq!(wallet["balance"].as_i64(), Some(GRANT - kept_cost), "{wallet}");
    let seller_token = gateway.login("seller").await;
    let earnings =
        ok(&call(&gateway, Method::GET, "/api/v1/seller/earnings", &seller_token, None).await, StatusCode::OK);
    assert_eq!(earnings["balance"].as_i64(), Some(expected_seller_share(kept_cost)), "{earnings}");

    let twice = resolve(&gateway, &admin_token, id, json!({"outcome": "refund"})).await;
    assert_error(&twice, StatusCode::CONFLICT, "dispute_resolved");
    let refunded_again = dispute(&gateway, &buyer_token, json!({"request_id": disputed, "reason": "again"})).await;
    assert_error(&refunded_again, StatusCode::CONFLICT, "not_disputable");
    let listed = ok(
        &call(&gateway, Method::GET, "/api/v1/admin/disputes?status=refunded", &admin_token, None).await,
        StatusCode::OK,
    );
    assert_eq!(listed["disputes"], json!([resolved]), "{listed}");
    let open = ok(
        &call(&gateway, Method::GET, "/api/v1/admin/disputes?status=open", &admin_token, None).await,
        StatusCode::OK,
    );
    assert_eq!(open["disputes"], json!([]), "{open}");
    assert_eq!(env.ledger_snapshot().await.entries_of_kind("refund").len(), 1);
}

/// A rejected dispute moves no credit; it is listed with its note, and the request may be disputed again.
async fn a_rejected_dispute_moves_nothing_and_the_request_may_be_disputed_again(backend: Backend) {
    let Setup { env, gateway, buyer_id, seller_id, buyer, buyer_token, admin_token, .. } = setup(backend).await;
    let request = paid_request(&gateway, &buyer.key, 5).await;
    let cost = costs(&env, 1).await[&request];

    let first = ok(
        &dispute(&gateway, &buyer_token, json!({"request_id": request, "reason": "wrong language"})).await,
        StatusCode::CREATED,
    );
    let first_id = first["id"].as_i64().unwrap();
    let rejected = ok(
        &resolve(&gateway, &admin_token, first_id, json!({"outcome": "reject", "note": "the answer is fine"})).await,
        StatusCode::OK,
    );
    assert_eq!((rejected["status"].as_str(), rejected["refunded_credits"].as_i64()), (Some("rejected"), Some(0)));
    assert_eq!(rejected["resolution_note"], "the answer is fine");
    let ledger = env.ledger_snapshot().await;
    assert!(ledger.entries_of_kind("refund").is_empty());
    assert_eq!(ledger.wallet(buyer_id), GRANT - cost);
    assert_eq!(ledger.wallet(seller_id), expected_seller_share(cost));
    let refund_now = resolve(&gateway, &admin_token, first_id, json!({"outcome": "refund"})).await;
    assert_error(&refund_now, StatusCode::CONFLICT, "dispute_resolved");

    let second = ok(
        &dispute(&gateway, &buyer_token, json!({"request_id": request, "reason": "it really was the wrong language"}))
            .await,
        StatusCode::CREATED,
    );
    let mine = ok(&call(&gateway, Method::GET, "/api/v1/buyer/disputes", &buyer_token, None).await, StatusCode::OK);
    assert_eq!(mine["disputes"], json!([second, rejected]), "newest first: {mine}");
    let page =
        ok(&call(&gateway, Method::GET, "/api/v1/buyer/disputes?limit=1", &buyer_token, None).await, StatusCode::OK);
    assert_eq!(page["disputes"], json!([second]), "{page}");
    let next = page["next_before"].as_i64().expect("a next page");
    let page = ok(
        &call(&gateway, Method::GET, &format!("/api/v1/buyer/disputes?limit=1&before={next}"), &buyer_token, None)
            .await,
        StatusCode::OK,
    );
    assert_eq!((&page["disputes"], &page["next_before"]), (&json!([rejected]), &Value::Null), "{page}");
    env.assert_ledger_ok(&[]).await;
}

/// An escrow dispute refunds every request the escrow paid for that is not refunded yet, to the buyer's
/// wallet, in one resolution; a request dispute of a request the escrow paid names the escrow, and once the
/// escrow's refund covered it, its own refund adds nothing.
async fn an_escrow_dispute_refunds_every_request_the_escrow_paid(backend: Backend) {
    let Setup { env, gateway, buyer_id, seller_id, buyer, buyer_token, admin_token, .. } = setup(backend).await;
    let escrowed = 1_000_000;
    let escrow = ok(
        &call(&gateway, Method::POST, "/api/v1/buyer/escrows", &buyer_token, Some(json!({"amount": escrowed}))).await,
        StatusCode::CREATED,
    );
    let escrow_id = escrow["id"].as_i64().unwrap();
    let nothing_spent = dispute(&gateway, &buyer_token, json!({"escrow_id": escrow_id, "reason": "too early"})).await;
    assert_error(&nothing_spent, StatusCode::CONFLICT, "not_disputable");

    let mut requests = Vec::new();
    for max_tokens in [2, 4, 6] {
        requests.push(paid_request(&gateway, &buyer.key, max_tokens).await);
    }
    let costs = costs(&env, 3).await;
    let spent: i64 = requests.iter().map(|r| costs[r]).sum();
    let ledger = env.ledger_snapshot().await;
    assert_eq!(ledger.escrowed(buyer_id), escrowed - spent, "the escrow paid for all three");

    let request_dispute = ok(
        &dispute(&gateway, &buyer_token, json!({"request_id": requests[0], "reason": "empty answer"})).await,
        StatusCode::CREATED,
    );
    assert_eq!(request_dispute["escrow_id"], escrow_id, "{request_dispute}");
    let escrow_dispute = ok(
        &dispute(&gateway, &buyer_token, json!({"escrow_id": escrow_id, "reason": "the key served another model"}))
            .await,
        StatusCode::CREATED,
    );
    assert_eq!((escrow_dispute["target_kind"].as_str(), &escrow_dispute["request_id"]), (Some("escrow"), &Value::Null));
    let twice = dispute(&gateway, &buyer_token, json!({"escrow_id": escrow_id, "reason": "again"})).await;
    assert_error(&twice, StatusCode::CONFLICT, "dispute_open");

    let resolved = ok(
        &resolve(&gateway, &admin_token, escrow_dispute["id"].as_i64().unwrap(), json!({"outcome": "refund"})).await,
        StatusCode::OK,
    );
    assert_eq!((resolved["status"].as_str(), resolved["refunded_credits"].as_i64()), (Some("refunded"), Some(spent)));
    let ledger = env.ledger_snapshot().await;
    assert_eq!(ledger.entries_of_kind("refund").len(), 3);
    assert_eq!(ledger.wallet(buyer_id), GRANT - escrowed + spent, "the refunds went to the wallet");
    assert_eq!(ledger.escrowed(buyer_id), escrowed - spent, "not back into the escrow");
    assert_eq!(ledger.buyer_funds(buyer_id), GRANT, "the buyer has everything back");
    assert_eq!((ledger.wallet(seller_id), ledger.revenue()), (0, 0));
    env.assert_ledger_ok(&[]).await;

    let covered = ok(
        &resolve(&gateway, &admin_token, request_dispute["id"].as_i64().unwrap(), json!({"outcome": "refund"})).await,
        StatusCode::OK,
    );
    assert_eq!((covered["status"].as_str(), covered["refunded_credits"].as_i64()), (Some("refunded"), Some(0)));
    assert_eq!(env.ledger_snapshot().await.entries_of_kind("refund").len(), 3);
    let all_refunded = dispute(&gateway, &buyer_token, json!({"escrow_id": escrow_id, "reason": "again"})).await;
    assert_error(&all_refunded, StatusCode::CONFLICT, "not_disputable");
    env.assert_ledger_ok(&[]).await;
}

/// Another buyer's request or escrow is not found; only admins list all disputes and resolve them; bad
/// bodies and queries are 400 in the API's error shape; a request that cost nothing cannot be disputed.
async fn disputes_are_the_buyers_own_and_resolved_by_admins_only(backend: Backend) {
    let Setup { env, gateway, buyer, broke, buyer_token, admin_token, .. } = setup(backend).await;
    let request = paid_request(&gateway, &buyer.key, 3).await;
    let escrow = ok(
        &call(&gateway, Method::POST, "/api/v1/buyer/escrows", &buyer_token, Some(json!({"amount": 1000}))).await,
        StatusCode::CREATED,
    );
    let escrow_id = escrow["id"].as_i64().unwrap();
    let refused = gateway.chat(&broke.key, MODEL, 3, false).await;
    assert_eq!(refused.status, StatusCode::PAYMENT_REQUIRED, "{}", refused.text());
    let free = request_id(&refused);
    costs(&env, 2).await;

    let other = gateway.login("other").await;
    for body in [
        json!({"request_id": request, "reason": "mine now"}),
        json!({"escrow_id": escrow_id, "reason": "mine now"}),
        json!({"request_id": "no-such-request", "reason": "x"}),
        json!({"request_id": "x".repeat(41), "reason": "x"}),
        json!({"escrow_id": 987_654, "reason": "x"}),
    ] {
        assert_error(&dispute(&gateway, &other, body).await, StatusCode::NOT_FOUND, "not_found");
    }
    let broke_token = gateway.login("broke").await;
    let nothing_paid = dispute(&gateway, &broke_token, json!({"request_id": free, "reason": "refused"})).await;
    assert_error(&nothing_paid, StatusCode::CONFLICT, "not_disputable");

    for body in [
        json!({"request_id": request, "escrow_id": escrow_id, "reason": "both"}),
        json!({"reason": "neither"}),
        json!({"request_id": request, "reason": "   "}),
        json!({"request_id": request, "reason": "x".repeat(1001)}),
        json!({"request_id": request, "reason": "bell \u{7}"}),
        json!({"request_id": request}),
        json!({"request_id": request, "reason": "ok", "amount": 5}),
        json!({"escrow_id": "one", "reason": "ok"}),
    ] {
        let reply = dispute(&gateway, &buyer_token, body.clone()).await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let longest = "é".repeat(1000);
    let created = ok(
        &dispute(&gateway, &buyer_token, json!({"request_id": request, "reason": longest})).await,
        StatusCode::CREATED,
    );
    let id = created["id"].as_i64().unwrap();

    // Roles: a buyer or a seller may not resolve or list all; nobody without a session may do anything.
    let seller = gateway.login("seller").await;
    for token in [&buyer_token, &seller] {
        assert_error(
            &resolve(&gateway, token, id, json!({"outcome": "refund"})).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
        let all = call(&gateway, Method::GET, "/api/v1/admin/disputes", token, None).await;
        assert_error(&all, StatusCode::FORBIDDEN, "forbidden");
    }
    let sellers_own = call(&gateway, Method::GET, "/api/v1/buyer/disputes", &seller, None).await;
    assert_error(&sellers_own, StatusCode::FORBIDDEN, "forbidden");
    let anonymous = call(&gateway, Method::GET, "/api/v1/buyer/disputes", "not-a-session", None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{}", anonymous.text());
    let theirs = ok(&call(&gateway, Method::GET, "/api/v1/buyer/disputes", &other, None).await, StatusCode::OK);
    assert_eq!(theirs["disputes"], json!([]), "another buyer's disputes are not listed: {theirs}");

    for (path, body) in [
        (format!("/api/v1/admin/disputes/{id}/resolve"), json!({"outcome": "maybe"})),
        (format!("/api/v1/admin/disputes/{id}/resolve"), json!({"outcome": "reject", "note": "x".repeat(1001)})),
        ("/api/v1/admin/disputes/abc/resolve".to_owned(), json!({"outcome": "reject"})),
    ] {
        let reply = call(&gateway, Method::POST, &path, &admin_token, Some(body)).await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    }
    for query in ["status=closed", "limit=0", "limit=501", "colour=red"] {
        let reply = call(&gateway, Method::GET, &format!("/api/v1/admin/disputes?{query}"), &admin_token, None).await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let missing = resolve(&gateway, &admin_token, 987_654, json!({"outcome": "reject"})).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "not_found");
    let all = ok(&call(&gateway, Method::GET, "/api/v1/admin/disputes", &admin_token, None).await, StatusCode::OK);
    assert_eq!(all["disputes"], json!([created]), "{all}");
    assert!(env.ledger_snapshot().await.entries_of_kind("refund").is_empty());
}
