//! Header hygiene in both directions: the buyer's credentials, cookies and hop-by-hop headers never reach
//! the provider, and the provider's account headers (organisation, rate-limit state, cookies) never reach
//! the buyer.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::response::IntoResponse;
use common::{Backend, TestEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL: &str = "gpt-4o-mini";

backend_tests!(headers_do_not_cross_between_buyer_and_seller);

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

const ACCOUNT_HEADERS: [(&str, &str); 7] = [
    ("content-type", "application/json"),
    ("openai-organization", "seller-org-123"),
    ("openai-project", "proj_seller"),
    ("x-ratelimit-remaining-tokens", "149000"),
    ("anthropic-organization-id", "seller-anthropic-org"),
    ("set-cookie", "__cf_bm=seller-cookie; path=/"),
    ("x-request-id", "req_upstream_1"),
];

async fn answer(
    axum::extract::State(seen): axum::extract::State<Seen>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> axum::response::Response {
    if method == axum::http::Method::GET {
        // Risk control reads the key's provider balance: not the proxied request under test.
        return axum::http::StatusCode::NOT_FOUND.into_response();
    }
    seen.lock().unwrap().push(headers);
    let body = r#"{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
    (ACCOUNT_HEADERS, body).into_response()
}

/// An OpenAI-like upstream that answers with the account headers a real provider sends.
async fn start_chatty_upstream() -> (String, Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let router = axum::Router::new().fallback(answer).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{addr}/v1"), seen, server)
}

async fn headers_do_not_cross_between_buyer_and_seller(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    let (base_url, seen, _server) = start_chatty_upstream().await;
    env.add_seller_key_at("seller", &base_url, "sk-seller-secret-1234", &[MODEL], 1_000).await;
    let gateway = env.start_gateway().await;

    // A raw request, so that hop-by-hop headers go out exactly as written.
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nCookie: buyer-session=abc\r\n\
         X-Api-Key: buyer-other-key\r\nOpenAI-Organization: buyer-org\r\nTE: trailers\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\r\n{}",
        buyer.key,
        body.len(),
        body
    );
    let mut stream = tokio::net::TcpStream::connect(gateway.gateway_addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("the gateway answered and closed")
        .unwrap();
    let response = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");

    // Upstream side: the seller's key, none of the buyer's headers.
    let upstream = seen.lock().unwrap().clone();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    let h = &upstream[0];
    assert_eq!(h.get("authorization").unwrap(), "Bearer sk-seller-secret-1234");
    for name in ["cookie", "x-api-key", "openai-organization", "te", "upgrade", "http2-settings"] {
        assert!(h.get(name).is_none(), "{name} reached the provider: {h:?}");
    }
    let text = format!("{h:?}").to_ascii_lowercase();
    assert!(!text.contains("tkx-") && !text.contains("buyer-org") && !text.contains("h2c"), "{text}");

    // Buyer side: the response and our request id, none of the seller's account headers.
    let head = response.split("\r\n\r\n").next().unwrap();
    for leaked in ["seller-org-123", "proj_seller", "149000", "seller-anthropic-org", "seller-cookie", "sk-seller"] {
        assert!(!head.contains(leaked), "{leaked} reached the buyer:\n{head}");
    }
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("x-tokex-request-id:"), "{head}");
}
