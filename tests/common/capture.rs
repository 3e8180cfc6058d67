//! An upstream that keeps the full request bodies it receives, for tests that must compare what the
//! gateway sent upstream field by field (the mock upstream keeps only a digest). It answers like OpenAI:
//! a chat completion with usage, streamed as SSE when `stream` is true.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

/// Completion tokens the capture upstream answers with.
pub const CAPTURE_COMPLETION_TOKENS: u64 = 3;

#[derive(Clone, Debug)]
pub struct Captured {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct CaptureUpstream {
    pub addr: SocketAddr,
    captured: Arc<Mutex<Vec<Captured>>>,
    server: tokio::task::JoinHandle<()>,
}

impl CaptureUpstream {
    pub async fn start() -> Self {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let router =
            Router::new().fallback(answer).layer(DefaultBodyLimit::max(64 * 1024 * 1024)).with_state(captured.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the capture upstream");
        let addr = listener.local_addr().expect("capture upstream address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, captured, server }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn captured(&self) -> Vec<Captured> {
        self.captured.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for CaptureUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(
    State(captured): State<Arc<Mutex<Vec<Captured>>>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == axum::http::Method::GET {
        // Risk control reads the key's provider balance: not an LLM request, not captured.
        return (StatusCode::NOT_FOUND, "no balance API here").into_response();
    }
    captured.lock().unwrap_or_else(|e| e.into_inner()).push(Captured {
        path: uri.path().to_owned(),
        headers,
        body: body.clone(),
    });
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": {"message": "bad json", "type": "invalid_request_error", "param": null, "code": null}}),
            ),
        )
            .into_response();
    };
    let model = request["model"].as_str().unwrap_or("unknown").to_owned();
    let prompt_tokens = body.len().div_ceil(4) as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": CAPTURE_COMPLETION_TOKENS,
        "total_tokens": prompt_tokens + CAPTURE_COMPLETION_TOKENS,
    });
    if request["stream"].as_bool() != Some(true) {
        return axum::Json(json!({
            "id": "chatcmpl-capture",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b c"}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let include_usage = request.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-capture",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for word in ["a ", "b ", "c"] {
        events.push(chunk(json!({"content": word}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(json!({
            "id": "chatcmpl-capture",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [],
            "usage": usage,
        }));
    }
    let mut sse: String = events.iter().map(|event| format!("data: {event}\n\n")).collect();
    sse.push_str("data: [DONE]\n\n");
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(sse))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
