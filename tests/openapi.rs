//! The real `token-exchange serve` describes its admin API: `GET /api/v1/openapi.json` on the admin port
//! answers the OpenAPI 3.1 document without a session, and a client that knows only operationIds (as the
//! web console does) can log in and call through it. The document's agreement with the router, operation
//! by operation, is tested in-process in src/admin/tests.rs.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use common::{Backend, StatusCode, TestEnv, PASSWORD};
use reqwest::Method;
use serde_json::{json, Value};

/// The method and path of an operation, found by its id.
fn resolve(doc: &Value, operation_id: &str) -> (Method, String) {
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if op["operationId"] == operation_id {
                return (Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"), path.clone());
            }
        }
    }
    panic!("{operation_id} is not in the document");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_its_openapi_document() {
    common::run_with_timeout(serves_its_openapi_document(Backend::Sqlite)).await
}

async fn serves_its_openapi_document(backend: Backend) {
    let env = TestEnv::new(backend).await;
    env.create_user("seller", &["seller"]).await;
    let gateway = env.start_gateway().await;
    let client = common::http_client();

    let response = client.get(gateway.admin_url("/api/v1/openapi.json")).send().await.expect("GET openapi.json");
    let reply = common::read_reply(response).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let content_type = reply.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let doc = reply.json();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);
    assert_eq!(doc["info"]["title"], "token-exchange admin API");
    assert_eq!(doc, serde_json::to_value(token_exchange::admin::openapi()).expect("document"), "as built");

    // Log in and call `auth_me` knowing only the operation ids.
    let (method, path) = resolve(&doc, "auth_login");
    let login = client
        .request(method, gateway.admin_url(&path))
        .json(&json!({ "username": "seller", "password": PASSWORD }))
        .send()
        .await
        .expect("login");
    let login = common::read_reply(login).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text());
    let token = login.json()["token"].as_str().expect("token").to_owned();
    let (method, path) = resolve(&doc, "auth_me");
    let me = gateway.admin(method, &path, &token, None).await;
    assert_eq!((me.status, me.json()["username"].clone()), (StatusCode::OK, json!("seller")), "{}", me.text());
    let (method, path) = resolve(&doc, "seller_keys_list");
    let keys = gateway.admin(method, &path, &token, None).await;
    assert_eq!((keys.status, keys.json()["keys"].clone()), (StatusCode::OK, json!([])), "{}", keys.text());
}
