//! The router served on a real loopback port, driven with reqwest, on a throw-away SQLite database.

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
    _db: TestDb,
}

struct Reply {
    status: u16,
    json: Value,
    cache_control: Option<String>,
}

impl Api {
    async fn start() -> Self {
        let test_db = TestDb::sqlite().await;
        accounts::ensure_admin(&test_db.db, Some(ADMIN_PASSWORD)).await.unwrap();
        let refresh = RefreshHandle::default();
        let state = AdminState {
            db: test_db.db.clone(),
            keyring: Arc::new(Keyring::new([3u8; 32], vec![])),
            refresh: refresh.clone(),
            session_ttl_ms: 3_600_000,
            ledger: crate::config::LedgerConfig::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            refresh,
            bodies: Arc::default(),
            _db: test_db,
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
    ];
    for (method, path, token, body) in cases {
        assert_error(&api.call(method, path, Some(token), body).await, 403, "forbidden");
    }
    assert_error(&api.call(Method::GET, "/api/v1/seller/keys", None, None).await, 401, "unauthorized");
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
