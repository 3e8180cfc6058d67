//! The router served on a real loopback port, driven with reqwest, on a throw-away SQLite database.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use super::*;
use crate::accounts;
use crate::db::testing::TestDb;

const SELLER_SECRET: &str = "sk-proj-TOPSECRETSELLERKEY0123456789wxyz";
const ADMIN_PASSWORD: &str = "admin-password";

struct Api {
    base: String,
    client: reqwest::Client,
    refresh: RefreshHandle,
    /// Every response body, to prove that secrets never leave the server.
    bodies: Arc<Mutex<Vec<String>>>,
    db: TestDb,
}

struct Reply {
    status: u16,
    json: Value,
    cache_control: Option<String>,
}

impl Api {
    async fn start() -> Self {
        Self::start_on(TestDb::sqlite().await).await
    }

    async fn start_on(test_db: TestDb) -> Self {
        accounts::ensure_admin(&test_db.db, Some(ADMIN_PASSWORD)).await.unwrap();
        let refresh = RefreshHandle::default();
        let state = AdminState {
            db: test_db.db.clone(),
            keyring: Arc::new(Keyring::new([3u8; 32], vec![])),
            refresh: refresh.clone(),
            session_ttl_ms: 3_600_000,
            ledger: crate::config::LedgerConfig::default(),
            upstream_policy: Default::default(),
            provider: Arc::new(
                crate::provider::ProviderClient::new(Default::default(), std::time::Duration::from_secs(5)).unwrap(),
            ),
            // These tests deposit keys at providers this machine cannot reach.
            risk: crate::config::RiskConfig { verify_on_deposit: false, ..Default::default() },
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            refresh,
            bodies: Arc::default(),
            db: test_db,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let cache_control = response.headers().get("cache-control").and_then(|v| v.to_str().ok()).map(String::from);
        let text = response.text().await.unwrap();
        self.bodies.lock().unwrap().push(text.clone());
        let json = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        Reply { status, json, cache_control }
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    async fn raw(&self, path: &str, token: &str, content_type: &str, body: &'static str) -> Reply {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body);
        self.send(request).await
    }

    async fn login(&self, username: &str, password: &str) -> String {
        let reply = self
            .call(Method::POST, "/api/v1/auth/login", None, Some(json!({"username": username, "password": password})))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        reply.json["token"].as_str().unwrap().to_string()
    }

    async fn create_user(&self, admin: &str, username: &str, roles: &[&str]) -> String {
        let body = json!({"username": username, "password": "password1", "roles": roles});
        let reply = self.call(Method::POST, "/api/v1/admin/users", Some(admin), Some(body)).await;
        assert_eq!(reply.status, 201, "{}", reply.json);
        self.login(username, "password1").await
    }

    /// A new user's session token and id.
    async fn create_user_with_id(&self, admin: &str, username: &str, roles: &[&str]) -> (String, i64) {
        let body = json!({"username": username, "password": "password1", "roles": roles});
        let reply = self.call(Method::POST, "/api/v1/admin/users", Some(admin), Some(body)).await;
        assert_eq!(reply.status, 201, "{}", reply.json);
        let id = reply.json["id"].as_i64().unwrap();
        (self.login(username, "password1").await, id)
    }

    async fn refresh_was_requested(&self) -> bool {
        tokio::time::timeout(Duration::from_millis(500), self.refresh.requested()).await.is_ok()
    }

    fn assert_no_secret_left_the_server(&self) {
        for body in self.bodies.lock().unwrap().iter() {
            for forbidden in [SELLER_SECRET, "TOPSECRET", "api_key_enc", "password_hash", "key_hash", "v1."] {
                assert!(!body.contains(forbidden), "{forbidden:?} in {body}");
            }
        }
    }
}

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.json);
    assert_eq!(reply.json["error"]["code"], code, "{}", reply.json);
    assert!(reply.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", reply.json);
}

fn seller_key_body() -> Value {
    json!({
        "name": "main",
        "provider": "openai",
        "base_url": "https://api.openai.com/v1/",
        "models": ["gpt-4o", "gpt-4o-mini"],
        "api_key": SELLER_SECRET,
        "declared_balance": 10_000
    })
}

#[tokio::test]
async fn health_login_and_me() {
    let api = Api::start().await;
    let health = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((health.status, health.json.clone()), (200, json!({"status": "ok"})));

    let wrong = api
        .call(Method::POST, "/api/v1/auth/login", None, Some(json!({"username": "admin", "password": "nope-nope"})))
        .await;
    assert_error(&wrong, 401, "unauthorized");

    let reply = api
        .call(Method::POST, "/api/v1/auth/login", None, Some(json!({"username": "admin", "password": ADMIN_PASSWORD})))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.cache_control.as_deref(), Some("no-store"));
    assert_eq!(reply.json["user"]["username"], "admin");
    assert_eq!(reply.json["user"]["roles"], json!(["admin"]));
    assert!(reply.json["expires_at_ms"].as_i64().unwrap() > crate::now_ms());
    let token = reply.json["token"].as_str().unwrap();

    let me = api.call(Method::GET, "/api/v1/me", Some(token), None).await;
    assert_eq!((me.status, me.json["username"].clone()), (200, json!("admin")));

    assert_error(&api.call(Method::GET, "/api/v1/me", None, None).await, 401, "unauthorized");
    assert_error(&api.call(Method::GET, "/api/v1/me", Some("tkxs-forged"), None).await, 401, "unauthorized");
    let basic = api.client.get(format!("{}/api/v1/me", api.base)).basic_auth("admin", Some(ADMIN_PASSWORD));
    assert_error(&api.send(basic).await, 401, "unauthorized");

    let logout = api.call(Method::POST, "/api/v1/auth/logout", Some(token), None).await;
    assert_eq!(logout.status, 204);
    assert_error(&api.call(Method::GET, "/api/v1/me", Some(token), None).await, 401, "unauthorized");
    api.assert_no_secret_left_the_server();
}

#[tokio::test]
async fn buyers_issue_list_and_revoke_their_own_keys() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let alice = api.create_user(&admin, "alice", &["buyer"]).await;
    let bob = api.create_user(&admin, "bob", &["buyer"]).await;

    let body = json!({"name": "laptop", "models": ["gpt-4o"]});
    let created = api.call(Method::POST, "/api/v1/buyer/keys", Some(&alice), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.json);
    assert!(api.refresh_was_requested().await);
    let key = created.json["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("tkx-") && key.len() == 52);
    let id = created.json["id"].as_i64().unwrap();
    assert_eq!(created.json["models"], json!(["gpt-4o"]));
    assert_eq!(created.json["status"], "active");
    let prefix = created.json["prefix"].as_str().unwrap().to_string();
    assert_eq!(prefix, format!("{}…", &key[..12]));

    let listed = api.call(Method::GET, "/api/v1/buyer/keys", Some(&alice), None).await;
    assert_eq!(listed.status, 200);
    let keys = listed.json["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["prefix"], prefix.as_str());
    assert!(keys[0].get("key").is_none());
    let listed_text = listed.json.to_string();
    assert!(!listed_text.contains(&key[12..]));

    let any_model = api.call(Method::POST, "/api/v1/buyer/keys", Some(&alice), Some(json!({"name": "ci"}))).await;
    assert_eq!((any_model.status, any_model.json["models"].clone()), (201, Value::Null));

    let others = api.call(Method::DELETE, &format!("/api/v1/buyer/keys/{id}"), Some(&bob), None).await;
    assert_error(&others, 404, "not_found");
    let bobs = api.call(Method::GET, "/api/v1/buyer/keys", Some(&bob), None).await;
    assert_eq!(bobs.json["keys"], json!([]));

    let revoked = api.call(Method::DELETE, &format!("/api/v1/buyer/keys/{id}"), Some(&alice), None).await;
    assert_eq!(revoked.status, 200);
    assert_eq!(revoked.json["status"], "revoked");
    assert!(revoked.json["revoked_at_ms"].as_i64().is_some());
    assert!(api.refresh_was_requested().await);

    let bad_id = api.call(Method::DELETE, "/api/v1/buyer/keys/abc", Some(&alice), None).await;
    assert_error(&bad_id, 400, "invalid_request");
    let past = json!({"name": "old", "expires_at_ms": 1});
    assert_error(&api.call(Method::POST, "/api/v1/buyer/keys", Some(&alice), Some(past)).await, 400, "invalid_request");
    api.assert_no_secret_left_the_server();
}

#[tokio::test]
async fn sellers_manage_only_their_own_keys() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let seller = api.create_user(&admin, "seller1", &["seller"]).await;
    let rival = api.create_user(&admin, "seller2", &["seller"]).await;

    let created = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(seller_key_body())).await;
    assert_eq!(created.status, 201, "{}", created.json);
    assert!(api.refresh_was_requested().await);
    let key = &created.json;
    assert_eq!(key["key_hint"], "sk-...wxyz");
    assert_eq!(key["base_url"], "https://api.openai.com/v1");
    assert_eq!(key["models"], json!(["gpt-4o", "gpt-4o-mini"]));
    assert_eq!(key["status"], "active");
    assert_eq!((key["declared_balance"].as_i64(), key["remaining_balance"].as_i64()), (Some(10_000), Some(10_000)));
    assert!(key.get("api_key").is_none());
    let id = key["id"].as_i64().unwrap();

    let mut unnamed = seller_key_body();
    unnamed.as_object_mut().unwrap().remove("name");
    let unnamed = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(unnamed)).await;
    assert_eq!((unnamed.status, unnamed.json["name"].clone()), (201, json!("openai")));

    let mut invalid = seller_key_body();
    invalid["base_url"] = json!("ftp://example.com");
    let invalid = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(invalid)).await;
    assert_error(&invalid, 400, "invalid_request");

    let list = api.call(Method::GET, "/api/v1/seller/keys", Some(&seller), None).await;
    assert_eq!(list.json["keys"].as_array().unwrap().len(), 2);
    let rival_list = api.call(Method::GET, "/api/v1/seller/keys", Some(&rival), None).await;
    assert_eq!(rival_list.json["keys"], json!([]));

    let path = format!("/api/v1/seller/keys/{id}");
    assert_eq!(api.call(Method::GET, &path, Some(&seller), None).await.json["id"], id);
    assert_error(&api.call(Method::GET, &path, Some(&rival), None).await, 404, "not_found");
    assert_error(&api.call(Method::GET, "/api/v1/seller/keys/99999", Some(&seller), None).await, 404, "not_found");
    let rival_pause = api.call(Method::POST, &format!("{path}/pause"), Some(&rival), None).await;
    assert_error(&rival_pause, 404, "not_found");

    let paused = api.call(Method::POST, &format!("{path}/pause"), Some(&seller), None).await;
    assert_eq!((paused.status, paused.json["status"].clone()), (200, json!("paused")));
    assert!(api.refresh_was_requested().await);
    let resumed = api.call(Method::POST, &format!("{path}/resume"), Some(&seller), None).await;
    assert_eq!((resumed.status, resumed.json["status"].clone()), (200, json!("active")));

    let all = api.call(Method::GET, "/api/v1/admin/keys", Some(&admin), None).await;
    assert_eq!(all.status, 200);
    let all = all.json["keys"].as_array().unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|k| k["key_hint"] == "sk-...wxyz" && k["status"] == "active" && k["owner_id"].is_i64()));
    api.assert_no_secret_left_the_server();
}

#[tokio::test]
async fn admins_manage_users() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let body = json!({"username": "both", "password": "password1", "roles": ["seller", "buyer"]});
    let created = api.call(Method::POST, "/api/v1/admin/users", Some(&admin), Some(body.clone())).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.json["roles"], json!(["seller", "buyer"]));
    assert_error(&api.call(Method::POST, "/api/v1/admin/users", Some(&admin), Some(body)).await, 409, "conflict");

    let bad_role = json!({"username": "x1x", "password": "password1", "roles": ["root"]});
    assert_error(
        &api.call(Method::POST, "/api/v1/admin/users", Some(&admin), Some(bad_role)).await,
        400,
        "invalid_request",
    );
    let short = json!({"username": "x1x", "password": "short", "roles": ["buyer"]});
    assert_error(
        &api.call(Method::POST, "/api/v1/admin/users", Some(&admin), Some(short)).await,
        400,
        "invalid_request",
    );

    let users = api.call(Method::GET, "/api/v1/admin/users", Some(&admin), None).await;
    let names: Vec<&str> =
        users.json["users"].as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "both"]);
    api.assert_no_secret_left_the_server();
}

#[tokio::test]
async fn roles_are_enforced_per_route() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let buyer = api.create_user(&admin, "buyer", &["buyer"]).await;
    let seller = api.create_user(&admin, "seller", &["seller"]).await;

    let cases = [
        (Method::POST, "/api/v1/seller/keys", &buyer, Some(seller_key_body())),
        (Method::GET, "/api/v1/seller/keys", &buyer, None),
        (Method::POST, "/api/v1/buyer/keys", &seller, Some(json!({"name": "x"}))),
        (Method::GET, "/api/v1/admin/users", &seller, None),
        (Method::GET, "/api/v1/admin/keys", &buyer, None),
        (Method::GET, "/api/v1/buyer/keys", &admin, None),
        // The role check comes before the body is read.
        (Method::POST, "/api/v1/admin/users", &buyer, Some(json!({"bogus": true}))),
        (Method::POST, "/api/v1/admin/users/1/credits", &buyer, Some(json!({"amount": 5}))),
        (Method::POST, "/api/v1/admin/users/1/credits", &seller, Some(json!({"amount": 5}))),
        (Method::PUT, "/api/v1/admin/users/1/settings", &buyer, Some(json!({"wallet_pays": false}))),
        (Method::POST, "/api/v1/admin/requests/r1/refund", &seller, None),
        (Method::PUT, "/api/v1/admin/prices/gpt-4o", &seller, Some(price_body())),
        (Method::DELETE, "/api/v1/admin/prices/gpt-4o", &buyer, None),
        (Method::GET, "/api/v1/admin/ledger/check", &buyer, None),
        (Method::GET, "/api/v1/buyer/wallet", &seller, None),
        (Method::PUT, "/api/v1/buyer/settings", &admin, Some(json!({"wallet_pays": false}))),
        (Method::GET, "/api/v1/buyer/escrows", &seller, None),
        (Method::POST, "/api/v1/buyer/escrows", &admin, Some(json!({"amount": 1}))),
        (Method::POST, "/api/v1/buyer/escrows/1/release", &seller, None),
        (Method::GET, "/api/v1/buyer/transactions", &seller, None),
        (Method::GET, "/api/v1/seller/earnings", &buyer, None),
        (Method::GET, "/api/v1/seller/transactions", &admin, None),
    ];
    for (method, path, token, body) in cases {
        assert_error(&api.call(method, path, Some(token), body).await, 403, "forbidden");
    }
    assert_error(&api.call(Method::GET, "/api/v1/seller/keys", None, None).await, 401, "unauthorized");
    assert_error(&api.call(Method::GET, "/api/v1/prices", None, None).await, 401, "unauthorized");
    api.assert_no_secret_left_the_server();
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let seller = api.create_user(&admin, "seller", &["seller"]).await;

    let mut extra = seller_key_body();
    extra["secret_field"] = json!(1);
    let reply = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(extra)).await;
    assert_error(&reply, 400, "invalid_request");
    assert!(reply.json["error"]["message"].as_str().unwrap().contains("secret_field"));

    let mut missing = seller_key_body();
    missing.as_object_mut().unwrap().remove("models");
    assert_error(
        &api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(missing)).await,
        400,
        "invalid_request",
    );

    // A secret sent in a field of the wrong type must not be echoed by the deserializer's message.
    let mut mistyped = seller_key_body();
    mistyped["declared_balance"] = json!(SELLER_SECRET);
    assert_error(
        &api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(mistyped)).await,
        400,
        "invalid_request",
    );

    let malformed = api.raw("/api/v1/seller/keys", &seller, "application/json", "{\"provider\": ").await;
    assert_error(&malformed, 400, "malformed_json");
    let not_json = api.raw("/api/v1/seller/keys", &seller, "text/plain", "{}").await;
    assert_error(&not_json, 415, "unsupported_media_type");
    let login_garbage = api.raw("/api/v1/auth/login", "", "application/json", "{\"username\": \"admin\",").await;
    assert_error(&login_garbage, 400, "malformed_json");

    let huge = api
        .client
        .post(format!("{}/api/v1/seller/keys", api.base))
        .bearer_auth(&seller)
        .header("content-type", "application/json")
        .body(format!("{{\"name\": \"{}\"}}", "x".repeat(100_000)));
    assert_error(&api.send(huge).await, 413, "payload_too_large");

    assert_error(&api.call(Method::GET, "/api/v1/nothing-here", Some(&admin), None).await, 404, "not_found");
    assert_error(&api.call(Method::PUT, "/api/v1/seller/keys", Some(&seller), None).await, 405, "method_not_allowed");
    api.assert_no_secret_left_the_server();
}

// ---------------------------------------------------------------------------------------------------------
// Credits, prices, escrows and earnings (docs/ledger.md)

fn price_body() -> Value {
    json!({"prompt_per_million": 2500, "completion_per_million": 10_000})
}

impl Api {
    fn conn(&self) -> &sea_orm::DatabaseConnection {
        &self.db.db
    }

    async fn grant(&self, admin: &str, user_id: i64, amount: i64) -> Reply {
        let path = format!("/api/v1/admin/users/{user_id}/credits");
        self.call(Method::POST, &path, Some(admin), Some(json!({"amount": amount}))).await
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        let reply = self.call(Method::GET, path, Some(token), None).await;
        assert_eq!(reply.status, 200, "{}: {path}: {}", self.db.label, reply.json);
        reply
    }
}

/// A request the gateway served and settled: a hold on the buyer's wallet, the usage record and its
/// settlement in one transaction (as the usage writer does), then the hold closed.
async fn settle_request(api: &Api, buyer_id: i64, seller_id: i64, hosted_key_id: i64, request_id: &str, cost: i64) {
    use crate::db::entities::usage_records;
    use crate::db::ledger::{self as core, HoldSource, Settlement};
    use sea_orm::{ActiveModelTrait, ActiveValue::Set};

    let db = api.conn();
    let now = crate::now_ms();
    let wallet = core::wallet_account(db, buyer_id, now).await.unwrap();
    let source = HoldSource { buyer_id, account_id: wallet, escrow_id: None };
    let hold = core::open_hold(db, source, "test-node", cost, cost, now).await.unwrap().unwrap();
    let txn = core::begin(db).await.unwrap();
    usage_records::ActiveModel {
        request_id: Set(request_id.to_string()),
        buyer_id: Set(buyer_id),
        buyer_key_id: Set(1),
        hosted_key_id: Set(Some(hosted_key_id)),
        model: Set("gpt-4o".to_string()),
        endpoint: Set("chat".to_string()),
        prompt_tokens: Set(10),
        completion_tokens: Set(5),
        estimated: Set(false),
        status_code: Set(200),
        attempts: Set(1),
        latency_ms: Set(5),
        ttft_ms: Set(None),
        request_bytes: Set(100),
        response_bytes: Set(100),
        client_disconnected: Set(false),
        error_kind: Set(None),
        created_at_ms: Set(now),
        cost_credits: Set(cost),
        unpaid_credits: Set(0),
        hold_id: Set(Some(hold.id)),
        ..Default::default()
    }
    .insert(&txn)
    .await
    .unwrap();
    let settlement = Settlement {
        request_id: request_id.to_string(),
        hold_id: hold.id,
        hold_account_id: hold.account_id,
        source_account_id: wallet,
        cost,
        seller_account_id: Some(core::wallet_account(&txn, seller_id, now).await.unwrap()),
        revenue_account_id: core::revenue_account(&txn, now).await.unwrap(),
        fee_bps: 500,
    };
    let settled = core::settle(&txn, &settlement, now).await.unwrap();
    assert_eq!(settled.paid, cost);
    txn.commit().await.unwrap();
    core::close_hold(db, hold.id, now).await.unwrap();
}

async fn assert_ledger_ok(api: &Api, admin: &str) {
    let check = api.get("/api/v1/admin/ledger/check", admin).await;
    assert_eq!(check.json, json!({"ok": true, "violations": []}), "{}", api.db.label);
}

#[tokio::test]
async fn admins_grant_credits_once_per_idempotency_key() {
    for test_db in TestDb::all().await {
        let api = Api::start_on(test_db).await;
        let label = api.db.label;
        let admin = api.login("admin", ADMIN_PASSWORD).await;
        let (bob, bob_id) = api.create_user_with_id(&admin, "bob", &["buyer"]).await;
        let path = format!("/api/v1/admin/users/{bob_id}/credits");

        let first = api.grant(&admin, bob_id, 1000).await;
        assert_eq!(first.status, 200, "{label}: {}", first.json);
        assert_eq!(first.json["user_id"], bob_id);
        assert_eq!((first.json["amount"].as_i64(), first.json["balance"].as_i64()), (Some(1000), Some(1000)));
        assert_eq!(first.json["duplicate"], false);
        assert!(first.json["entry_id"].as_i64().is_some());
        assert!(api.refresh_was_requested().await);
        // Without a key every grant is a new one.
        assert_eq!(api.grant(&admin, bob_id, 1000).await.json["balance"], 2000);

        let keyed = json!({"amount": 500, "memo": "welcome", "idempotency_key": "topup-1"});
        let once = api.call(Method::POST, &path, Some(&admin), Some(keyed.clone())).await;
        assert_eq!(
            (once.status, once.json["balance"].as_i64(), once.json["duplicate"].clone()),
            (200, Some(2500), json!(false))
        );
        assert!(api.refresh_was_requested().await);
        let twice = api.call(Method::POST, &path, Some(&admin), Some(keyed)).await;
        assert_eq!(
            (twice.status, twice.json["balance"].as_i64(), twice.json["duplicate"].clone()),
            (200, Some(2500), json!(true))
        );
        assert_eq!(twice.json["entry_id"], once.json["entry_id"]);
        assert!(!api.refresh_was_requested().await, "{label}: a duplicate grant changes nothing");
        let reused = json!({"amount": 501, "idempotency_key": "topup-1"});
        assert_error(&api.call(Method::POST, &path, Some(&admin), Some(reused)).await, 409, "idempotency_key_reused");

        // The Idempotency-Key header works like the body field.
        let with_header = || {
            api.client
                .post(format!("{}{path}", api.base))
                .bearer_auth(&admin)
                .header("Idempotency-Key", "topup-2")
                .json(&json!({"amount": 7}))
        };
        let h1 = api.send(with_header()).await;
        let h2 = api.send(with_header()).await;
        assert_eq!((h1.json["duplicate"].clone(), h1.json["balance"].as_i64()), (json!(false), Some(2507)), "{label}");
        assert_eq!((h2.json["duplicate"].clone(), h2.json["balance"].as_i64()), (json!(true), Some(2507)), "{label}");
        let both = api
            .client
            .post(format!("{}{path}", api.base))
            .bearer_auth(&admin)
            .header("Idempotency-Key", "a")
            .json(&json!({"amount": 7, "idempotency_key": "b"}));
        assert_error(&api.send(both).await, 400, "invalid_request");

        for amount in [json!(0), json!(-5), json!(2_000_000_000_000_000_i64), json!(1.5), json!("10")] {
            let reply = api.call(Method::POST, &path, Some(&admin), Some(json!({"amount": amount}))).await;
            assert_error(&reply, 400, "invalid_request");
        }
        let long_key = json!({"amount": 1, "idempotency_key": "k".repeat(81)});
        assert_error(&api.call(Method::POST, &path, Some(&admin), Some(long_key)).await, 400, "invalid_request");
        let unknown = json!({"amount": 1, "note": "x"});
        assert_error(&api.call(Method::POST, &path, Some(&admin), Some(unknown)).await, 400, "invalid_request");
        assert_error(&api.grant(&admin, 99_999, 5).await, 404, "not_found");

        let wallet = api.get("/api/v1/buyer/wallet", &bob).await;
        assert_eq!(wallet.json, json!({"balance": 2507, "held": 0, "escrowed": 0, "wallet_pays": true}), "{label}");
        assert_ledger_ok(&api, &admin).await;
        api.assert_no_secret_left_the_server();
    }
}

#[tokio::test]
async fn admins_set_and_delete_prices_that_everyone_can_read() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let buyer = api.create_user(&admin, "buyer", &["buyer"]).await;
    let seller = api.create_user(&admin, "seller", &["seller"]).await;

    let set = api.call(Method::PUT, "/api/v1/admin/prices/gpt-4o", Some(&admin), Some(price_body())).await;
    assert_eq!(set.status, 200, "{}", set.json);
    let expected = json!({"model": "gpt-4o", "prompt_per_million": 2500, "completion_per_million": 10_000, "max_output_tokens": 4096});
    assert_eq!(set.json, expected);
    assert!(api.refresh_was_requested().await);

    // Replacing a price; a model name with a slash, raw or percent-encoded.
    let body = json!({"prompt_per_million": 0, "completion_per_million": 0, "max_output_tokens": 10_000_000});
    let free = api.call(Method::PUT, "/api/v1/admin/prices/meta-llama/llama-3-70b", Some(&admin), Some(body)).await;
    assert_eq!((free.status, free.json["model"].clone()), (200, json!("meta-llama/llama-3-70b")));
    let body = json!({"prompt_per_million": 150, "completion_per_million": 600, "max_output_tokens": 16_000});
    let encoded = api.call(Method::PUT, "/api/v1/admin/prices/org%2Fmodel", Some(&admin), Some(body.clone())).await;
    assert_eq!((encoded.status, encoded.json["model"].clone()), (200, json!("org/model")));
    let replaced = api.call(Method::PUT, "/api/v1/admin/prices/org/model", Some(&admin), Some(body)).await;
    assert_eq!(replaced.json["max_output_tokens"], 16_000);

    for token in [&buyer, &seller, &admin] {
        let listed = api.get("/api/v1/prices", token).await;
        let models: Vec<&str> = listed.json.as_array().unwrap().iter().map(|p| p["model"].as_str().unwrap()).collect();
        assert_eq!(models, ["gpt-4o", "meta-llama/llama-3-70b", "org/model"]);
        assert_eq!(listed.json[0], expected);
    }

    let long_model = format!("/api/v1/admin/prices/{}", "m".repeat(129));
    let bad = [
        ("/api/v1/admin/prices/gpt-4o", json!({"prompt_per_million": -1, "completion_per_million": 1})),
        ("/api/v1/admin/prices/gpt-4o", json!({"prompt_per_million": 1, "completion_per_million": -1})),
        (
            "/api/v1/admin/prices/gpt-4o",
            json!({"prompt_per_million": 1, "completion_per_million": 1, "max_output_tokens": 0}),
        ),
        (
            "/api/v1/admin/prices/gpt-4o",
            json!({"prompt_per_million": 1, "completion_per_million": 1, "max_output_tokens": 10_000_001}),
        ),
        ("/api/v1/admin/prices/gpt-4o", json!({"prompt_per_million": 1})),
        (
            "/api/v1/admin/prices/gpt-4o",
            json!({"prompt_per_million": 1, "completion_per_million": 1, "currency": "usd"}),
        ),
        ("/api/v1/admin/prices/%20gpt", price_body()),
        (long_model.as_str(), price_body()),
    ];
    for (path, body) in bad {
        assert_error(&api.call(Method::PUT, path, Some(&admin), Some(body)).await, 400, "invalid_request");
    }
    assert_eq!(api.get("/api/v1/prices", &buyer).await.json[0], expected, "a refused change changes nothing");

    let deleted = api.call(Method::DELETE, "/api/v1/admin/prices/meta-llama/llama-3-70b", Some(&admin), None).await;
    assert_eq!(deleted.status, 204);
    assert!(api.refresh_was_requested().await);
    let again = api.call(Method::DELETE, "/api/v1/admin/prices/meta-llama/llama-3-70b", Some(&admin), None).await;
    assert_error(&again, 404, "not_found");
    assert_eq!(api.get("/api/v1/prices", &seller).await.json.as_array().unwrap().len(), 2);
    api.assert_no_secret_left_the_server();
}

#[tokio::test]
async fn buyers_fund_and_release_their_own_escrows() {
    for test_db in TestDb::all().await {
        let api = Api::start_on(test_db).await;
        let label = api.db.label;
        let admin = api.login("admin", ADMIN_PASSWORD).await;
        let (bob, bob_id) = api.create_user_with_id(&admin, "bob", &["buyer"]).await;
        let carol = api.create_user(&admin, "carol", &["buyer"]).await;
        let seller = api.create_user(&admin, "seller", &["seller"]).await;
        let key = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(seller_key_body())).await;
        let key_id = key.json["id"].as_i64().unwrap();
        assert_eq!(api.grant(&admin, bob_id, 1000).await.status, 200);

        let before = crate::now_ms();
        let any = api.call(Method::POST, "/api/v1/buyer/escrows", Some(&bob), Some(json!({"amount": 300}))).await;
        assert_eq!(any.status, 201, "{label}: {}", any.json);
        assert!(api.refresh_was_requested().await);
        let e = &any.json;
        assert_eq!((e["amount"].as_i64(), e["balance"].as_i64(), e["held"].as_i64()), (Some(300), Some(300), Some(0)));
        assert_eq!(
            (e["status"].clone(), e["model"].clone(), e["hosted_key_id"].clone()),
            (json!("active"), Value::Null, Value::Null)
        );
        let expires = e["expires_at_ms"].as_i64().unwrap();
        assert!((before + 30 * 86_400_000..=crate::now_ms() + 30 * 86_400_000).contains(&expires), "{label}: {e}");
        assert_eq!(e["closed_at_ms"], Value::Null);
        let any_id = e["id"].as_i64().unwrap();

        let pinned = json!({"amount": 200, "model": "gpt-4o", "hosted_key_id": key_id, "expires_in_days": 1});
        let pinned = api.call(Method::POST, "/api/v1/buyer/escrows", Some(&bob), Some(pinned)).await;
        assert_eq!(pinned.status, 201, "{label}: {}", pinned.json);
        assert_eq!(
            (pinned.json["model"].clone(), pinned.json["hosted_key_id"].as_i64()),
            (json!("gpt-4o"), Some(key_id))
        );

        let wallet = api.get("/api/v1/buyer/wallet", &bob).await;
        assert_eq!(wallet.json, json!({"balance": 500, "held": 0, "escrowed": 500, "wallet_pays": true}), "{label}");

        let too_much = api.call(Method::POST, "/api/v1/buyer/escrows", Some(&bob), Some(json!({"amount": 501}))).await;
        assert_error(&too_much, 409, "insufficient_funds");
        let empty = api.call(Method::POST, "/api/v1/buyer/escrows", Some(&carol), Some(json!({"amount": 1}))).await;
        assert_error(&empty, 409, "insufficient_funds");
        for body in [
            json!({"amount": 0}),
            json!({"amount": -1}),
            json!({"amount": 1, "expires_in_days": 0}),
            json!({"amount": 1, "expires_in_days": 3651}),
            json!({"amount": 1, "model": ""}),
            json!({"amount": 1, "model": "m".repeat(129)}),
            json!({"amount": 1, "pinned": true}),
        ] {
            let reply = api.call(Method::POST, "/api/v1/buyer/escrows", Some(&bob), Some(body.clone())).await;
            assert_error(&reply, 400, "invalid_request");
        }
        for body in [
            json!({"amount": 1, "hosted_key_id": 99_999}),
            json!({"amount": 1, "hosted_key_id": key_id, "model": "claude-3"}),
        ] {
            let reply = api.call(Method::POST, "/api/v1/buyer/escrows", Some(&bob), Some(body)).await;
            assert_error(&reply, 404, "not_found");
        }

        let listed = api.get("/api/v1/buyer/escrows", &bob).await;
        let ids: Vec<i64> =
            listed.json["escrows"].as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()).collect();
        assert_eq!(ids, [pinned.json["id"].as_i64().unwrap(), any_id], "{label}: newest first");
        assert_eq!(api.get("/api/v1/buyer/escrows", &carol).await.json["escrows"], json!([]));

        let release = format!("/api/v1/buyer/escrows/{any_id}/release");
        assert_error(&api.call(Method::POST, &release, Some(&carol), None).await, 404, "not_found");
        assert_error(
            &api.call(Method::POST, "/api/v1/buyer/escrows/99999/release", Some(&bob), None).await,
            404,
            "not_found",
        );
        let released = api.call(Method::POST, &release, Some(&bob), None).await;
        assert_eq!(released.status, 200, "{label}: {}", released.json);
        assert!(api.refresh_was_requested().await);
        assert_eq!((released.json["status"].clone(), released.json["balance"].as_i64()), (json!("released"), Some(0)));
        assert!(released.json["closed_at_ms"].as_i64().is_some());
        assert_error(&api.call(Method::POST, &release, Some(&bob), None).await, 409, "escrow_closed");

        let wallet = api.get("/api/v1/buyer/wallet", &bob).await;
        assert_eq!(
            (wallet.json["balance"].as_i64(), wallet.json["escrowed"].as_i64()),
            (Some(800), Some(200)),
            "{label}"
        );
        assert_ledger_ok(&api, &admin).await;
        api.assert_no_secret_left_the_server();
    }
}

#[tokio::test]
async fn wallet_pays_is_set_by_the_buyer_or_an_admin() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let (bob, bob_id) = api.create_user_with_id(&admin, "bob", &["buyer"]).await;

    let off = api.call(Method::PUT, "/api/v1/buyer/settings", Some(&bob), Some(json!({"wallet_pays": false}))).await;
    assert_eq!((off.status, off.json.clone()), (200, json!({"user_id": bob_id, "wallet_pays": false})));
    assert!(api.refresh_was_requested().await);
    assert_eq!(api.get("/api/v1/buyer/wallet", &bob).await.json["wallet_pays"], false);

    let path = format!("/api/v1/admin/users/{bob_id}/settings");
    let on = api.call(Method::PUT, &path, Some(&admin), Some(json!({"wallet_pays": true}))).await;
    assert_eq!((on.status, on.json.clone()), (200, json!({"user_id": bob_id, "wallet_pays": true})));
    assert!(api.refresh_was_requested().await);
    assert_eq!(api.get("/api/v1/buyer/wallet", &bob).await.json["wallet_pays"], true);

    let missing =
        api.call(Method::PUT, "/api/v1/admin/users/99999/settings", Some(&admin), Some(json!({"wallet_pays": true})));
    assert_error(&missing.await, 404, "not_found");
    for body in [json!({}), json!({"wallet_pays": "no"}), json!({"wallet_pays": true, "x": 1})] {
        let reply = api.call(Method::PUT, "/api/v1/buyer/settings", Some(&bob), Some(body)).await;
        assert_error(&reply, 400, "invalid_request");
    }
}

#[tokio::test]
async fn settled_requests_show_as_earnings_and_can_be_refunded() {
    for test_db in TestDb::all().await {
        let api = Api::start_on(test_db).await;
        let label = api.db.label;
        let admin = api.login("admin", ADMIN_PASSWORD).await;
        let (bob, bob_id) = api.create_user_with_id(&admin, "bob", &["buyer"]).await;
        // Also a buyer: it can move its earnings into an escrow, out of a refund's reach.
        let (seller, seller_id) = api.create_user_with_id(&admin, "seller", &["seller", "buyer"]).await;
        let (rival, _) = api.create_user_with_id(&admin, "rival", &["seller"]).await;
        let main_key = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(seller_key_body())).await;
        let main_id = main_key.json["id"].as_i64().unwrap();
        let mut spare = seller_key_body();
        spare["name"] = json!("spare");
        let spare_id = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(spare)).await.json["id"]
            .as_i64()
            .unwrap();

        let empty = api.get("/api/v1/seller/earnings", &seller).await;
        assert_eq!(empty.json["earned_total"], 0, "{label}");
        assert_eq!(empty.json["by_key"].as_array().unwrap().len(), 2);

        assert_eq!(api.grant(&admin, bob_id, 10_000).await.status, 200);
        settle_request(&api, bob_id, seller_id, main_id, "req-1", 100).await;
        settle_request(&api, bob_id, seller_id, main_id, "req-2", 200).await;
        settle_request(&api, bob_id, seller_id, main_id, "req-3", 1000).await;
        // Seller shares after the 5 % fee: 95 + 190 + 950.
        let earnings = api.get("/api/v1/seller/earnings", &seller).await;
        assert_eq!(
            earnings.json,
            json!({
                "balance": 1235,
                "earned_total": 1235,
                "by_key": [
                    {"hosted_key_id": main_id, "name": "main", "requests": 3, "earned": 1235},
                    {"hosted_key_id": spare_id, "name": "spare", "requests": 0, "earned": 0},
                ]
            }),
            "{label}"
        );
        let rivals = api.get("/api/v1/seller/earnings", &rival).await;
        assert_eq!(rivals.json, json!({"balance": 0, "earned_total": 0, "by_key": []}), "{label}");
        assert_ledger_ok(&api, &admin).await;

        let refunded = api
            .call(
                Method::POST,
                "/api/v1/admin/requests/req-2/refund",
                Some(&admin),
                Some(json!({"memo": "bad answer"})),
            )
            .await;
        assert_eq!(refunded.status, 200, "{label}: {}", refunded.json);
        assert_eq!(refunded.json, json!({"request_id": "req-2", "refunded": 200, "duplicate": false}));
        assert!(api.refresh_was_requested().await);
        // A bare POST (no body) works too, and a second refund changes nothing.
        let again = api.call(Method::POST, "/api/v1/admin/requests/req-2/refund", Some(&admin), None).await;
        assert_eq!(again.json, json!({"request_id": "req-2", "refunded": 200, "duplicate": true}), "{label}");
        assert_eq!(api.get("/api/v1/buyer/wallet", &bob).await.json["balance"], 10_000 - 1300 + 200, "{label}");
        let earnings = api.get("/api/v1/seller/earnings", &seller).await;
        assert_eq!(
            (earnings.json["balance"].as_i64(), earnings.json["earned_total"].as_i64()),
            (Some(1045), Some(1045))
        );
        assert_eq!(earnings.json["by_key"][0]["earned"], 1045, "{label}");

        let unknown = api.call(Method::POST, "/api/v1/admin/requests/no-such-request/refund", Some(&admin), None).await;
        assert_error(&unknown, 404, "not_found");
        let unknown_field = json!({"memo": "x", "amount": 5});
        let reply =
            api.call(Method::POST, "/api/v1/admin/requests/req-1/refund", Some(&admin), Some(unknown_field)).await;
        assert_error(&reply, 400, "invalid_request");

        // The seller moves its earnings away: the wallet can no longer cover a reversal.
        let escrow =
            api.call(Method::POST, "/api/v1/buyer/escrows", Some(&seller), Some(json!({"amount": 1045}))).await;
        assert_eq!(escrow.status, 201, "{label}: {}", escrow.json);
        let uncovered = api.call(Method::POST, "/api/v1/admin/requests/req-3/refund", Some(&admin), None).await;
        assert_error(&uncovered, 409, "insufficient_funds");
        assert_eq!(api.get("/api/v1/buyer/wallet", &bob).await.json["balance"], 10_000 - 1300 + 200, "{label}");
        assert_ledger_ok(&api, &admin).await;
        api.assert_no_secret_left_the_server();
    }
}

#[tokio::test]
async fn transactions_are_paged_newest_first() {
    for test_db in TestDb::all().await {
        let api = Api::start_on(test_db).await;
        let label = api.db.label;
        let admin = api.login("admin", ADMIN_PASSWORD).await;
        let (bob, bob_id) = api.create_user_with_id(&admin, "bob", &["buyer"]).await;
        let (carol, _) = api.create_user_with_id(&admin, "carol", &["buyer"]).await;
        let (seller, seller_id) = api.create_user_with_id(&admin, "seller", &["seller"]).await;
        let key_id = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(seller_key_body())).await.json
            ["id"]
            .as_i64()
            .unwrap();
        for amount in 1..=5 {
            assert_eq!(api.grant(&admin, bob_id, amount * 100).await.status, 200);
        }
        // An escrow: two postings of bob's (wallet −, escrow +).
        let escrow = api.call(Method::POST, "/api/v1/buyer/escrows", Some(&bob), Some(json!({"amount": 50}))).await;
        assert_eq!(escrow.status, 201);

        let mut seen = Vec::new();
        let mut path = "/api/v1/buyer/transactions?limit=3".to_string();
        loop {
            let page = api.get(&path, &bob).await;
            let data = page.json["data"].as_array().unwrap().clone();
            assert!(data.len() <= 3);
            seen.extend(data);
            match page.json["next_before"].as_i64() {
                Some(before) => path = format!("/api/v1/buyer/transactions?limit=3&before={before}"),
                None => break,
            }
        }
        assert_eq!(seen.len(), 7, "{label}: {seen:?}");
        let ids: Vec<i64> = seen.iter().map(|p| p["posting_id"].as_i64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "{label}: newest first, no repeats: {ids:?}");
        let kinds: Vec<&str> = seen.iter().map(|p| p["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["escrow_fund", "escrow_fund", "grant", "grant", "grant", "grant", "grant"], "{label}");
        assert_eq!((seen[2]["amount"].as_i64(), seen[2]["account_kind"].as_str()), (Some(500), Some("wallet")));

        let exact = api.get("/api/v1/buyer/transactions?limit=7", &bob).await;
        assert_eq!(exact.json["data"].as_array().unwrap().len(), 7);
        assert_eq!(exact.json["next_before"], Value::Null, "{label}: no empty last page");
        let default = api.get("/api/v1/buyer/transactions", &bob).await;
        assert_eq!(default.json["data"].as_array().unwrap().len(), 7);
        assert_eq!(api.get("/api/v1/buyer/transactions", &carol).await.json, json!({"data": [], "next_before": null}));

        for query in ["limit=0", "limit=201", "limit=x", "before=0", "before=-3", "page=2"] {
            let reply = api.call(Method::GET, &format!("/api/v1/buyer/transactions?{query}"), Some(&bob), None).await;
            assert_error(&reply, 400, "invalid_request");
        }

        // A seller sees its wallet's postings only.
        assert_eq!(
            api.get("/api/v1/seller/transactions", &seller).await.json,
            json!({"data": [], "next_before": null})
        );
        settle_request(&api, bob_id, seller_id, key_id, "req-1", 1000).await;
        let sales = api.get("/api/v1/seller/transactions?limit=200", &seller).await;
        let data = sales.json["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "{label}: {data:?}");
        assert_eq!((data[0]["kind"].as_str(), data[0]["amount"].as_i64()), (Some("settle"), Some(950)));
        assert_eq!(data[0]["request_id"], "req-1");
        assert_ledger_ok(&api, &admin).await;
    }
}

#[tokio::test]
async fn the_ledger_check_reports_violations() {
    use sea_orm::ConnectionTrait;
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let (_, bob_id) = api.create_user_with_id(&admin, "bob", &["buyer"]).await;
    assert_eq!(api.grant(&admin, bob_id, 100).await.status, 200);
    assert_ledger_ok(&api, &admin).await;
    let db = api.conn();
    let sql = "UPDATE accounts SET balance = balance + 1 WHERE kind = 'wallet'";
    db.execute(sea_orm::Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
    let check = api.get("/api/v1/admin/ledger/check", &admin).await;
    assert_eq!(check.json["ok"], false);
    let rules: Vec<&str> =
        check.json["violations"].as_array().unwrap().iter().map(|v| v["rule"].as_str().unwrap()).collect();
    assert!(rules.contains(&"balance_matches_postings"), "{rules:?}");
    assert!(check.json["violations"][0]["detail"].as_str().is_some());
}

#[tokio::test]
async fn the_ledger_check_runs_on_mariadb() {
    let api = Api::start_on(TestDb::mysql().await).await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let (_, bob_id) = api.create_user_with_id(&admin, "bob", &["buyer"]).await;
    assert_eq!(api.grant(&admin, bob_id, 100).await.status, 200);
    let check = api.get("/api/v1/admin/ledger/check", &admin).await;
    assert_eq!(check.json, json!({"ok": true, "violations": []}));
}

/// Every status change is in the key's history with its reason and actor; only the owner sees it; a
/// change the owner did not make reaches them as a notification.
#[tokio::test]
async fn key_events_and_notifications_belong_to_the_owner() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let seller = api.create_user(&admin, "seller1", &["seller"]).await;
    let rival = api.create_user(&admin, "seller2", &["seller"]).await;
    let created = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(seller_key_body())).await;
    let id = created.json["id"].as_i64().unwrap();
    for action in ["pause", "resume"] {
        let reply = api.call(Method::POST, &format!("/api/v1/seller/keys/{id}/{action}"), Some(&seller), None).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
    }
    let events = api.get(&format!("/api/v1/seller/keys/{id}/events"), &seller).await;
    assert_eq!(events.status, 200, "{}", events.json);
    let steps: Vec<(Value, Value, Value)> = events.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["from_status"].clone(), e["to_status"].clone(), e["reason"].clone()))
        .collect();
    assert_eq!(
        steps,
        vec![
            (json!("paused"), json!("active"), json!("resumed by its seller")),
            (json!("active"), json!("paused"), json!("paused by its seller")),
            (Value::Null, json!("active"), json!("deposited")),
        ]
    );
    // Another seller can neither read the key's events nor pause it.
    let theirs = api.call(Method::GET, &format!("/api/v1/seller/keys/{id}/events"), Some(&rival), None).await;
    assert_error(&theirs, 404, "not_found");
    let paused = api.call(Method::POST, &format!("/api/v1/seller/keys/{id}/pause"), Some(&rival), None).await;
    assert_error(&paused, 404, "not_found");

    // The owner's own changes make no notification; the platform's do.
    assert_eq!(api.get("/api/v1/notifications", &seller).await.json["notifications"], json!([]));
    let owner_id = accounts::find_user(&api.db.db, "seller1").await.unwrap().id;
    let event = crate::db::key_events::NewEvent {
        hosted_key_id: id,
        owner_id,
        from_status: Some("active"),
        to_status: "flagged",
        reason: "dilution: balance fell 40% more than metered use",
        actor_id: None,
        now_ms: 5,
    };
    crate::db::key_events::record(&api.db.db, event).await.unwrap();
    let notes = api.get("/api/v1/notifications", &seller).await;
    let note = &notes.json["notifications"][0];
    assert_eq!((note["kind"].clone(), note["hosted_key_id"].as_i64()), (json!("key_status"), Some(id)));
    assert!(note["message"].as_str().unwrap().contains("flagged"), "{note}");
    assert_eq!(api.get("/api/v1/notifications", &rival).await.json["notifications"], json!([]));
    let note_id = note["id"].as_i64().unwrap();
    let read = api.call(Method::POST, &format!("/api/v1/notifications/{note_id}/read"), Some(&rival), None).await;
    assert_error(&read, 404, "not_found");
    let read = api.call(Method::POST, &format!("/api/v1/notifications/{note_id}/read"), Some(&seller), None).await;
    assert_eq!(read.status, 204);
    assert!(api.get("/api/v1/notifications", &seller).await.json["notifications"][0]["read_at_ms"].as_i64().is_some());
}

// ---- The OpenAPI document (GET /api/v1/openapi.json) against the router ----

/// Every operation of the admin API as the console calls it (issue 5 contract): id, method, path.
const CONTRACT_OPERATIONS: &[(&str, &str, &str)] = &[
    ("healthz", "get", "/healthz"),
    ("auth_login", "post", "/api/v1/auth/login"),
    ("auth_logout", "post", "/api/v1/auth/logout"),
    ("auth_me", "get", "/api/v1/me"),
    ("buyer_keys_create", "post", "/api/v1/buyer/keys"),
    ("buyer_keys_list", "get", "/api/v1/buyer/keys"),
    ("buyer_keys_revoke", "delete", "/api/v1/buyer/keys/{id}"),
    ("seller_keys_create", "post", "/api/v1/seller/keys"),
    ("seller_keys_list", "get", "/api/v1/seller/keys"),
    ("seller_keys_get", "get", "/api/v1/seller/keys/{id}"),
    ("seller_keys_update", "patch", "/api/v1/seller/keys/{id}"),
    ("seller_keys_pause", "post", "/api/v1/seller/keys/{id}/pause"),
    ("seller_keys_resume", "post", "/api/v1/seller/keys/{id}/resume"),
    ("seller_keys_events", "get", "/api/v1/seller/keys/{id}/events"),
    ("notifications_list", "get", "/api/v1/notifications"),
    ("notifications_read", "post", "/api/v1/notifications/{id}/read"),
    ("admin_users_create", "post", "/api/v1/admin/users"),
    ("admin_users_list", "get", "/api/v1/admin/users"),
    ("admin_keys_list", "get", "/api/v1/admin/keys"),
    ("admin_credits_grant", "post", "/api/v1/admin/users/{id}/credits"),
    ("admin_user_settings_set", "put", "/api/v1/admin/users/{id}/settings"),
    ("admin_requests_refund", "post", "/api/v1/admin/requests/{request_id}/refund"),
    ("admin_prices_set", "put", "/api/v1/admin/prices/{model}"),
    ("admin_prices_delete", "delete", "/api/v1/admin/prices/{model}"),
    ("admin_ledger_check", "get", "/api/v1/admin/ledger/check"),
    ("prices_list", "get", "/api/v1/prices"),
    ("buyer_wallet", "get", "/api/v1/buyer/wallet"),
    ("buyer_settings_set", "put", "/api/v1/buyer/settings"),
    ("buyer_escrows_create", "post", "/api/v1/buyer/escrows"),
    ("buyer_escrows_list", "get", "/api/v1/buyer/escrows"),
    ("buyer_escrows_release", "post", "/api/v1/buyer/escrows/{id}/release"),
    ("buyer_transactions", "get", "/api/v1/buyer/transactions"),
    ("seller_earnings", "get", "/api/v1/seller/earnings"),
    ("seller_transactions", "get", "/api/v1/seller/transactions"),
    ("admin_reviews_list", "get", "/api/v1/admin/reviews"),
    ("admin_key_samples", "get", "/api/v1/admin/keys/{id}/samples"),
    ("admin_key_review", "post", "/api/v1/admin/keys/{id}/review"),
    ("seller_webhook_set", "put", "/api/v1/seller/webhook"),
    ("seller_webhook_get", "get", "/api/v1/seller/webhook"),
    ("seller_webhook_delete", "delete", "/api/v1/seller/webhook"),
    ("admin_fallback_keys_create", "post", "/api/v1/admin/fallback-keys"),
    ("admin_fallback_keys_list", "get", "/api/v1/admin/fallback-keys"),
    ("admin_fallback_keys_get", "get", "/api/v1/admin/fallback-keys/{id}"),
    ("admin_fallback_keys_update", "patch", "/api/v1/admin/fallback-keys/{id}"),
    ("analytics_platform", "get", "/api/v1/analytics/platform"),
    ("analytics_user", "get", "/api/v1/analytics/user"),
    ("analytics_timeseries", "get", "/api/v1/analytics/timeseries"),
    ("export_usage_csv", "get", "/api/v1/exports/usage.csv"),
    ("export_transactions_csv", "get", "/api/v1/exports/transactions.csv"),
    ("buyer_disputes_create", "post", "/api/v1/buyer/disputes"),
    ("buyer_disputes_list", "get", "/api/v1/buyer/disputes"),
    ("admin_disputes_list", "get", "/api/v1/admin/disputes"),
    ("admin_disputes_resolve", "post", "/api/v1/admin/disputes/{id}/resolve"),
];

const HTTP_METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// One documented operation: method, path template, and its object in the document.
struct Operation {
    method: String,
    path: String,
    op: Value,
}

impl Operation {
    fn id(&self) -> &str {
        self.op["operationId"].as_str().unwrap_or_default()
    }

    fn is_secured(&self) -> bool {
        self.op["security"].as_array().is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()))
    }

    fn declares(&self, status: u16) -> bool {
        self.op["responses"].get(status.to_string()).is_some()
    }

    /// The path with every parameter replaced by a value of its type: integers by 1, strings by a value
    /// with a percent-encoded slash (model names contain slashes).
    fn concrete_path(&self) -> String {
        let mut path = self.path.clone();
        for param in self.op["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "path") {
            let name = param["name"].as_str().unwrap();
            let value = if param["schema"]["type"] == "integer" { "1" } else { "org%2Fdummy" };
            path = path.replace(&format!("{{{name}}}"), value);
        }
        assert!(!path.contains('{'), "{} {}: undeclared path parameter", self.method, self.path);
        path
    }
}

impl Api {
    async fn openapi(&self) -> Value {
        let reply = self.call(Method::GET, OPENAPI_PATH, None, None).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        assert_eq!(reply.cache_control.as_deref(), Some("no-store"));
        reply.json
    }
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(HTTP_METHODS.contains(&method.as_str()), "{method} {path}");
            out.push(Operation { method: method.clone(), path: path.clone(), op: op.clone() });
        }
    }
    out
}

/// The properties and required properties of a schema, following `$ref` and `allOf`.
fn schema_fields(doc: &Value, schema: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.strip_prefix("#/components/schemas/").unwrap();
        return schema_fields(doc, &doc["components"]["schemas"][name]);
    }
    let mut properties: BTreeSet<String> =
        schema["properties"].as_object().into_iter().flatten().map(|(k, _)| k.clone()).collect();
    let mut required: BTreeSet<String> =
        schema["required"].as_array().into_iter().flatten().map(|r| r.as_str().unwrap().to_string()).collect();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        let (p, r) = schema_fields(doc, part);
        properties.extend(p);
        required.extend(r);
    }
    (properties, required)
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                out.push(reference.clone());
            }
            map.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

fn find_operation(doc: &Value, id: &str) -> Operation {
    operations(doc).into_iter().find(|o| o.id() == id).unwrap_or_else(|| panic!("{id} is not in the document"))
}

#[tokio::test]
async fn the_openapi_document_lists_every_operation_once() {
    let api = Api::start().await;
    let doc = api.openapi().await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);
    assert_eq!(doc["info"]["title"], "token-exchange admin API");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["components"]["securitySchemes"]["bearer"], json!({"type": "http", "scheme": "bearer"}));
    assert_eq!(doc, serde_json::to_value(openapi()).unwrap(), "served as built");

    let ops = operations(&doc);
    let mut seen = BTreeSet::new();
    for op in &ops {
        assert!(!op.id().is_empty(), "{} {} has no operationId", op.method, op.path);
        assert!(seen.insert(op.id().to_string()), "operationId {} is used twice", op.id());
        assert!(op.op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{} has no tag", op.id());
        for (status, response) in op.op["responses"].as_object().unwrap() {
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &response["content"]["application/json"]["schema"];
                assert_eq!(schema["$ref"], "#/components/schemas/ErrorBody", "{} {status}", op.id());
            }
        }
    }
    let missing: Vec<&str> = CONTRACT_OPERATIONS
        .iter()
        .filter(|(id, method, path)| !ops.iter().any(|o| o.id() == *id && o.method == *method && o.path == *path))
        .map(|(id, _, _)| *id)
        .collect();
    assert!(missing.is_empty(), "contract operations missing from the document (or at another path): {missing:?}");
    assert!(!doc["paths"].as_object().unwrap().keys().any(|p| p.contains('*')), "wildcards are documented as {{name}}");
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    for reference in refs {
        let name = reference.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{reference}"));
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling reference {reference}");
    }
    let (fields, required) = schema_fields(&doc, &json!({"$ref": "#/components/schemas/ErrorBody"}));
    assert_eq!((fields.len(), required.len()), (1, 1));
    let (fields, _) = schema_fields(&doc, &doc["components"]["schemas"]["ErrorBody"]["properties"]["error"]);
    assert_eq!(fields, BTreeSet::from(["code".to_string(), "message".to_string()]));
}

/// Document → router: every documented operation is routed (never the router's own 404 or 405).
/// Router → document: on a documented path, every method the document does not name is refused with 405.
/// Sessions: an operation answers 401 without a token exactly when it declares the bearer scheme.
#[tokio::test]
async fn the_document_and_the_router_agree() {
    let api = Api::start().await;
    let doc = api.openapi().await;
    let ops = operations(&doc);
    assert!(ops.len() >= 45, "{}", ops.len());
    for op in &ops {
        let path = op.concrete_path();
        let method = Method::from_bytes(op.method.to_uppercase().as_bytes()).unwrap();
        let reply = api.call(method, &path, None, None).await;
        let what = format!("{} {path} ({}): {} {}", op.method, op.id(), reply.status, reply.json);
        let route_not_found = reply.status == 404 && reply.json["error"]["message"] == "no such endpoint";
        assert!(!route_not_found && reply.status != 405, "documented but not routed: {what}");
        assert!(op.declares(reply.status), "answered a status it does not declare: {what}");
        if op.is_secured() {
            assert_eq!(reply.status, 401, "declares bearer but answers without a session: {what}");
        } else {
            assert_ne!(reply.status, 401, "needs a session but does not declare bearer: {what}");
        }
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        let template = Operation {
            method: String::new(),
            path: path.clone(),
            op: item.as_object().unwrap().values().next().unwrap().clone(),
        };
        let concrete = template.concrete_path();
        for method in HTTP_METHODS.iter().filter(|m| item.get(**m).is_none()) {
            let reply =
                api.call(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(), &concrete, None, None).await;
            assert_error(&reply, 405, "method_not_allowed");
        }
    }
    // Not documented, not routed: the document is the whole API.
    let reply = api.call(Method::GET, "/api/v1/no-such-endpoint", None, None).await;
    assert_error(&reply, 404, "not_found");
}

#[tokio::test]
async fn the_documented_price_path_takes_percent_encoded_model_names() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let doc = api.openapi().await;
    let set = find_operation(&doc, "admin_prices_set");
    let path = set.path.replace("{model}", "meta-llama%2Fllama-3");
    let reply = api.call(Method::PUT, &path, Some(&admin), Some(price_body())).await;
    assert_eq!((reply.status, reply.json["model"].clone()), (200, json!("meta-llama/llama-3")), "{}", reply.json);
    let raw = api.call(Method::PUT, "/api/v1/admin/prices/meta-llama/llama-3", Some(&admin), Some(price_body())).await;
    assert_eq!((raw.status, raw.json["model"].clone()), (200, json!("meta-llama/llama-3")), "the raw form still works");
    let delete = find_operation(&doc, "admin_prices_delete");
    let reply =
        api.call(Method::DELETE, &delete.path.replace("{model}", "meta-llama%2Fllama-3"), Some(&admin), None).await;
    assert_eq!(reply.status, 204, "{}", reply.json);
    assert_eq!(api.get("/api/v1/prices", &admin).await.json, json!([]));
}

/// For a few operations: the fields the document gives the request body are exactly those the handler
/// accepts (all of them at once succeed, one more is refused), a field is required in the document
/// exactly when leaving it out is refused, and the answer has every field its documented schema requires.
#[tokio::test]
async fn documented_request_bodies_are_what_the_handlers_accept() {
    let api = Api::start().await;
    let admin = api.login("admin", ADMIN_PASSWORD).await;
    let (buyer, buyer_id) = api.create_user_with_id(&admin, "buyer", &["buyer"]).await;
    let seller = api.create_user(&admin, "seller", &["seller"]).await;
    assert_eq!(api.grant(&admin, buyer_id, 10_000).await.status, 200);
    let key = api.call(Method::POST, "/api/v1/seller/keys", Some(&seller), Some(seller_key_body())).await;
    assert_eq!(key.status, 201, "{}", key.json);
    let key_id = key.json["id"].as_i64().unwrap();
    let doc = api.openapi().await;

    let cases = [
        ("auth_login", None, json!({"username": "admin", "password": ADMIN_PASSWORD})),
        (
            "buyer_keys_create",
            Some(&buyer),
            json!({"name": "ci", "models": ["gpt-4o"], "expires_at_ms": crate::now_ms() + 3_600_000}),
        ),
        (
            "buyer_escrows_create",
            Some(&buyer),
            json!({"amount": 10, "model": "gpt-4o", "hosted_key_id": key_id, "expires_in_days": 3}),
        ),
        ("seller_keys_create", Some(&seller), {
            let mut body = seller_key_body();
            let extra = json!({"max_concurrency": 2, "max_spend_per_day": 100, "balance_api": "none"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            body
        }),
    ];
    for (id, token, full) in cases {
        let op = find_operation(&doc, id);
        let method = Method::from_bytes(op.method.to_uppercase().as_bytes()).unwrap();
        let schema = &op.op["requestBody"]["content"]["application/json"]["schema"];
        let (fields, required) = schema_fields(&doc, schema);
        let sent: BTreeSet<String> = full.as_object().unwrap().keys().cloned().collect();
        assert_eq!(fields, sent, "{id}: the documented fields are the ones this test sends");
        assert_eq!(op.op["requestBody"]["required"], json!(true), "{id}");

        let reply = api.call(method.clone(), &op.path, token.map(String::as_str), Some(full.clone())).await;
        assert!(reply.status < 300, "{id} with every documented field: {} {}", reply.status, reply.json);
        let success = op.op["responses"][reply.status.to_string()]["content"]["application/json"]["schema"].clone();
        let (answer_fields, answer_required) = schema_fields(&doc, &success);
        let answered: BTreeSet<String> = reply.json.as_object().unwrap().keys().cloned().collect();
        assert!(answer_required.is_subset(&answered), "{id}: {answer_required:?} not all in {answered:?}");
        assert!(answered.is_subset(&answer_fields), "{id}: undocumented fields in {answered:?}");

        let mut extra = full.clone();
        extra["undocumented"] = json!(1);
        let reply = api.call(method.clone(), &op.path, token.map(String::as_str), Some(extra)).await;
        assert_error(&reply, 400, "invalid_request");

        for field in &fields {
            let mut body = full.clone();
            body.as_object_mut().unwrap().remove(field);
            let reply = api.call(method.clone(), &op.path, token.map(String::as_str), Some(body)).await;
            if required.contains(field) {
                assert_error(&reply, 400, "invalid_request");
            } else {
                assert!(reply.status < 300, "{id} without the optional {field}: {} {}", reply.status, reply.json);
            }
        }
    }
}
