//! Wire-level checks of the `mock-upstream` binary that the gateway's tests and demos stand on.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One mock per test on its own port, killed when the test ends however it ends.
struct MockUpstream {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl MockUpstream {
    fn spawn() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mock-upstream");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read LISTENING line");
        let addr = line.trim().strip_prefix("LISTENING ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Self { base: format!("http://{addr}"), child, http: reqwest::Client::new() }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, api_key: &str, body: &Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(api_key).json(body).send().await.expect("send")
    }

    async fn chat(&self, api_key: &str, body: &Value) -> reqwest::Response {
        self.post("/v1/chat/completions", api_key, body).await
    }

    async fn get_json(&self, path: &str) -> Value {
        self.http.get(self.url(path)).send().await.expect("send").json().await.expect("json")
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prompt_tokens(body: &Value) -> u64 {
    (serde_json::to_vec(body).expect("serialize").len() as u64).div_ceil(4)
}

fn stream_request(max_tokens: u64, include_usage: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{ "role": "user", "content": "hello" }],
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": { "include_usage": include_usage },
    })
}

/// The `data:` payloads of an LF-delimited SSE body, checking that every event ends with a blank line
/// and skipping comments.
fn sse_payloads(body: &str) -> Vec<String> {
    let blocks: Vec<&str> = body.split("\n\n").collect();
    assert_eq!(blocks.last(), Some(&""), "body must end with a blank line: {body:?}");
    let mut payloads = Vec::new();
    for block in &blocks[..blocks.len() - 1] {
        for line in block.split('\n') {
            if line.starts_with(':') {
                continue;
            }
            let payload = line.strip_prefix("data: ").unwrap_or_else(|| panic!("unexpected line {line:?}"));
            payloads.push(payload.to_owned());
        }
    }
    payloads
}

/// Chunks without the per-response `id` and `created`, which differ between two requests.
fn comparable(payloads: &[String]) -> Vec<Value> {
    payloads
        .iter()
        .map(|payload| match serde_json::from_str::<Value>(payload) {
            Ok(Value::Object(mut chunk)) => {
                chunk.remove("id");
                chunk.remove("created");
                Value::Object(chunk)
            }
            _ => Value::String(payload.clone()),
        })
        .collect()
}

async fn body_text(response: reqwest::Response) -> String {
    response.text().await.expect("body")
}

#[tokio::test]
async fn non_stream_completion_has_openai_shape_and_usage() {
    let mock = MockUpstream::spawn();
    let request = json!({ "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 3 });
    let response = mock.chat("sk-mock-abc", &request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.expect("json");

    assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().expect("created") > 1_700_000_000);
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["service_tier"], "default");
    assert_eq!(body["system_fingerprint"], "fp_mock");
    assert_eq!(
        body["choices"],
        json!([{
            "index": 0,
            "message": { "role": "assistant", "content": "tok0 tok1 tok2 ", "refusal": null, "annotations": [] },
            "logprobs": null,
            "finish_reason": "stop",
        }])
    );
    let prompt = prompt_tokens(&request);
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": 3,
            "total_tokens": prompt + 3,
            "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
            },
        })
    );

    let default_length: Value = mock.chat("sk-mock-abc", &json!({ "model": "m" })).await.json().await.expect("json");
    assert_eq!(default_length["usage"]["completion_tokens"], 8);
    let preferred = json!({ "model": "m", "max_completion_tokens": 2, "max_tokens": 5 });
    let preferred: Value = mock.chat("sk-mock-abc", &preferred).await.json().await.expect("json");
    assert_eq!(preferred["choices"][0]["message"]["content"], "tok0 tok1 ");
    let clamped: Value =
        mock.chat("sk-mock-abc", &json!({ "model": "m", "max_tokens": 0 })).await.json().await.expect("json");
    assert_eq!(clamped["usage"]["completion_tokens"], 1);
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_usage_chunk_and_done() {
    let mock = MockUpstream::spawn();
    let request = stream_request(3, true);
    let response = mock.chat("sk-mock-abc", &request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream; charset=utf-8");
    assert!(response.headers().get("content-length").is_none());
    let body = body_text(response).await;
    assert!(body.starts_with(": mock keep-alive\n\ndata: "), "{body:?}");

    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|payload| serde_json::from_str(payload).expect("chunk json"))
        .collect();
    // role, 3 tokens, finish, usage
    assert_eq!(chunks.len(), 6);
    let id = chunks[0]["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini");
        assert_eq!(chunk["service_tier"], "default");
        assert_eq!(chunk["system_fingerprint"], "fp_mock");
    }
    let choice = |index: usize| &chunks[index]["choices"][0];
    assert_eq!(choice(0)["delta"], json!({ "role": "assistant", "content": "", "refusal": null }));
    for token in 0..3 {
        assert_eq!(choice(token + 1)["delta"], json!({ "content": format!("tok{token} ") }));
        assert_eq!(choice(token + 1)["finish_reason"], Value::Null);
        assert_eq!(choice(token + 1)["logprobs"], Value::Null);
    }
    assert_eq!(choice(4)["delta"], json!({}));
    assert_eq!(choice(4)["finish_reason"], "stop");
    for chunk in &chunks[..5] {
        assert_eq!(chunk.get("usage"), Some(&Value::Null));
    }
    let usage_chunk = &chunks[5];
    assert_eq!(usage_chunk["choices"], json!([]));
    let prompt = prompt_tokens(&request);
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], prompt);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
    assert_eq!(usage_chunk["usage"]["total_tokens"], prompt + 3);
    assert_eq!(usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage() {
    let mock = MockUpstream::spawn();
    let body = body_text(mock.chat("sk-mock-abc", &stream_request(2, false)).await).await;
    let payloads = sse_payloads(&body);
    // role, 2 tokens, finish, [DONE]
    assert_eq!(payloads.len(), 5);
    assert_eq!(payloads[4], "[DONE]");
    for payload in &payloads[..4] {
        let chunk: Value = serde_json::from_str(payload).expect("chunk json");
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().map(Vec::len), Some(1));
    }
}

#[tokio::test]
async fn nousage_never_reports_usage() {
    let mock = MockUpstream::spawn();
    let plain: Value = mock.chat("sk-mock-nousage-abc", &json!({ "model": "m" })).await.json().await.expect("json");
    assert!(plain.get("usage").is_none());
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");

    let body = body_text(mock.chat("sk-mock-nousage-abc", &stream_request(2, true)).await).await;
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.len(), 5);
    for payload in &payloads[..4] {
        assert!(serde_json::from_str::<Value>(payload).expect("chunk json").get("usage").is_none());
    }

    let embedding = json!({ "model": "text-embedding-3-small", "input": "x" });
    let embedding: Value =
        mock.post("/v1/embeddings", "sk-mock-nousage-abc", &embedding).await.json().await.expect("json");
    assert!(embedding.get("usage").is_none());
}

#[tokio::test]
async fn failures_use_openai_error_bodies() {
    let mock = MockUpstream::spawn();
    let request = json!({ "model": "m" });

    let limited = mock.chat("sk-mock-fail429-abc", &request).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["param"], Value::Null);
    assert!(body["error"]["message"].is_string());

    let unauthorized = mock.chat("sk-mock-fail401-abc", &request).await;
    assert_eq!(unauthorized.status(), 401);
    let body: Value = unauthorized.json().await.expect("json");
    assert_eq!(
        body["error"],
        json!({
            "message": "Incorrect API key provided: sk-mo***abc. You can find your API key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key",
        })
    );

    for status in [400, 403, 500, 502, 503] {
        let response = mock.chat(&format!("sk-mock-fail{status}-abc"), &request).await;
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.expect("json");
        assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string(), "{body}");
        assert!(body["error"]["code"].is_string(), "{body}");
    }

    let anonymous = mock.http.post(mock.url("/v1/chat/completions")).json(&request).send().await.expect("send");
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.json::<Value>().await.expect("json")["error"]["message"].is_string());

    let no_model = mock.chat("sk-mock-abc", &json!({ "messages": [] })).await;
    assert_eq!(no_model.status(), 400);
    assert_eq!(no_model.json::<Value>().await.expect("json")["error"]["type"], "invalid_request_error");
    let not_json = mock
        .http
        .post(mock.url("/v1/chat/completions"))
        .bearer_auth("sk-mock-abc")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(not_json.status(), 400);
    let bad_limit = mock.chat("sk-mock-abc", &json!({ "model": "m", "max_tokens": "many" })).await;
    assert_eq!(bad_limit.status(), 400);

    assert_eq!(mock.chat("sk-mock-abc", &json!({})).await.status(), 400);
    let unknown = mock.post("/v1/nope", "sk-mock-abc", &request).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.json::<Value>().await.expect("json")["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn crlf_stream_uses_crlf_line_endings() {
    let mock = MockUpstream::spawn();
    let crlf = body_text(mock.chat("sk-mock-crlf-abc", &stream_request(3, true)).await).await;
    assert!(crlf.ends_with("data: [DONE]\r\n\r\n"), "{crlf:?}");
    assert_eq!(crlf.matches('\n').count(), crlf.matches("\r\n").count(), "every LF is part of a CRLF");
    let normal = body_text(mock.chat("sk-mock-abc", &stream_request(3, true)).await).await;
    assert_eq!(comparable(&sse_payloads(&crlf.replace("\r\n", "\n"))), comparable(&sse_payloads(&normal)));
}

#[tokio::test]
async fn split_stream_carries_the_same_events_in_tiny_frames() {
    let mock = MockUpstream::spawn();
    let response = mock.chat("sk-mock-split-abc", &stream_request(4, true)).await;
    assert_eq!(response.status(), 200);
    let mut frames = response.bytes_stream();
    let (mut bytes, mut reads) = (Vec::new(), 0);
    while let Some(frame) = frames.next().await {
        bytes.extend_from_slice(&frame.expect("frame"));
        reads += 1;
    }
    let split = String::from_utf8(bytes).expect("utf-8");
    // Frames are at most 7 bytes, though the client may read several at once.
    assert!(reads > 10, "only {reads} reads for {} bytes", split.len());
    let normal = body_text(mock.chat("sk-mock-abc", &stream_request(4, true)).await).await;
    assert_eq!(split.len(), normal.len());
    assert_eq!(comparable(&sse_payloads(&split)), comparable(&sse_payloads(&normal)));
}

#[tokio::test]
async fn slow_stream_waits_before_every_event() {
    let mock = MockUpstream::spawn();
    let started = Instant::now();
    let body = body_text(mock.chat("sk-mock-slow-abc", &stream_request(1, false)).await).await;
    // comment, role, 1 token, finish, [DONE]
    assert!(started.elapsed() >= Duration::from_millis(500), "{:?}", started.elapsed());
    assert_eq!(sse_payloads(&body).len(), 4);
}

#[tokio::test]
async fn drop_cuts_the_stream_before_done() {
    let mock = MockUpstream::spawn();
    let response = mock.chat("sk-mock-drop-abc", &stream_request(5, true)).await;
    assert_eq!(response.status(), 200);
    let mut frames = response.bytes_stream();
    let (mut bytes, mut errored) = (Vec::new(), false);
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(frame) => bytes.extend_from_slice(&frame),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    let received = String::from_utf8_lossy(&bytes);
    assert!(errored, "the chunked body must be cut, not ended: {received:?}");
    assert!(!received.contains("[DONE]"));
    assert!(received.contains("tok1 ") && !received.contains("tok2 "), "{received:?}");
}

#[tokio::test]
async fn records_requests_with_body_hash_and_counts() {
    let mock = MockUpstream::spawn();
    let request = json!({
        "model": "gpt-4o",
        "messages": [{ "role": "user", "content": "x".repeat(3 * 1024 * 1024) }],
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let sent = serde_json::to_vec(&request).expect("serialize");
    let response = mock
        .http
        .post(mock.url("/v1/chat/completions"))
        .bearer_auth("sk-mock-big")
        .header("content-type", "application/json")
        .header("x-trace", "t1")
        .body(sent.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let usage_chunk = sse_payloads(&body_text(response).await)
        .iter()
        .rev()
        .nth(1)
        .map(|payload| serde_json::from_str::<Value>(payload).expect("json"))
        .expect("usage chunk");
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], (sent.len() as u64).div_ceil(4));

    assert_eq!(mock.chat("sk-mock-fail500-x", &json!({ "model": "m" })).await.status(), 500);
    let hung = mock
        .http
        .post(mock.url("/v1/embeddings"))
        .bearer_auth("sk-mock-hang-x")
        .json(&json!({ "model": "e", "input": "x" }))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.is_err(), "hang must not answer");
    // Model listings are verification, not traffic: listed apart.
    assert_eq!(
        mock.http.get(mock.url("/v1/models")).bearer_auth("sk-mock-big").send().await.expect("send").status(),
        200
    );
    let unknown = mock.post("/v1/nope", "sk-mock-big", &json!({})).await;
    assert_eq!(unknown.status(), 404);

    let recorded = mock.get_json("/_mock/requests").await;
    let recorded = recorded.as_array().expect("array");
    assert_eq!(recorded.len(), 4);
    let big = &recorded[0];
    assert_eq!(big["method"], "POST");
    assert_eq!(big["path"], "/v1/chat/completions");
    assert_eq!(big["api_key"], "sk-mock-big");
    assert_eq!(big["body_len"], sent.len());
    assert_eq!(big["body_sha256"], hex::encode(Sha256::digest(&sent)));
    assert_eq!(big["model"], "gpt-4o");
    assert_eq!(big["stream"], true);
    assert_eq!(big["include_usage"], true);
    assert_eq!(big["headers"]["x-trace"], "t1");
    assert_eq!(big["headers"]["authorization"], "Bearer sk-mock-big");
    assert_eq!(recorded[1]["api_key"], "sk-mock-fail500-x");
    assert_eq!(recorded[1]["stream"], Value::Null);
    assert_eq!(recorded[2]["path"], "/v1/embeddings");
    assert_eq!(recorded[2]["include_usage"], Value::Null);
    assert_eq!(recorded[3]["path"], "/v1/nope");
    assert_eq!(recorded[3]["model"], Value::Null);
    assert_eq!(
        mock.get_json("/_mock/probes").await,
        json!([{ "method": "GET", "path": "/v1/models", "api_key": "sk-mock-big" }])
    );

    assert_eq!(
        mock.get_json("/_mock/counts").await,
        json!({ "sk-mock-big": 2, "sk-mock-fail500-x": 1, "sk-mock-hang-x": 1 })
    );
    let cleared = mock.http.delete(mock.url("/_mock/requests")).send().await.expect("send");
    assert!(cleared.status().is_success());
    assert_eq!(mock.get_json("/_mock/requests").await, json!([]));
    assert_eq!(mock.get_json("/_mock/counts").await, json!({}));
}

#[tokio::test]
async fn embeddings_accept_every_input_shape() {
    let mock = MockUpstream::spawn();
    let cases =
        [(json!("one"), 1), (json!(["one", "two", "three"]), 3), (json!([1, 2, 3]), 1), (json!([[1, 2], [3]]), 2)];
    for (input, expected) in cases {
        let request = json!({ "model": "text-embedding-3-small", "input": input });
        let response = mock.post("/v1/embeddings", "sk-mock-abc", &request).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "text-embedding-3-small");
        let data = body["data"].as_array().expect("data");
        assert_eq!(data.len(), expected);
        for (index, item) in data.iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], index);
            assert_eq!(item["embedding"].as_array().map(Vec::len), Some(8));
        }
        let prompt = prompt_tokens(&request);
        assert_eq!(body["usage"], json!({ "prompt_tokens": prompt, "total_tokens": prompt }));
    }

    let as_base64 = json!({ "model": "e", "input": "one", "encoding_format": "base64" });
    let body: Value = mock.post("/v1/embeddings", "sk-mock-abc", &as_base64).await.json().await.expect("json");
    let encoded = body["data"][0]["embedding"].as_str().expect("base64 string");
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64");
    assert_eq!(decoded.len(), 8 * 4);

    for input in [json!(42), json!([]), json!([1, "a"])] {
        let request = json!({ "model": "e", "input": input });
        assert_eq!(mock.post("/v1/embeddings", "sk-mock-abc", &request).await.status(), 400);
    }
    let failing = json!({ "model": "e", "input": "x" });
    assert_eq!(mock.post("/v1/embeddings", "sk-mock-fail503-abc", &failing).await.status(), 503);
}

#[tokio::test]
async fn models_list_and_auth() {
    let mock = MockUpstream::spawn();
    let anonymous = mock.http.get(mock.url("/v1/models")).send().await.expect("send");
    assert_eq!(anonymous.status(), 401);
    let models: Value = mock
        .http
        .get(mock.url("/v1/models"))
        .bearer_auth("sk-mock-abc")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(
        models["data"][0],
        json!({ "id": "gpt-4o-mini", "object": "model", "created": 1_700_000_000, "owned_by": "mock" })
    );
}

#[tokio::test]
async fn sigterm_exits_cleanly_even_with_a_hanging_request() {
    let mut mock = MockUpstream::spawn();
    let hung = tokio::spawn({
        let (http, url) = (mock.http.clone(), mock.url("/v1/chat/completions"));
        async move { http.post(url).bearer_auth("sk-mock-hang").json(&json!({ "model": "m" })).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Command::new("kill").args(["-TERM", &mock.child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = mock.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "mock did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    let answer = hung.await.expect("join").expect("hung request is answered at shutdown");
    assert_eq!(answer.status(), 503);
}

/// Millionths as the mock writes JSON numbers: at least one fractional digit, no trailing zeros.
fn decimal_text(micros: i64) -> String {
    let fraction = format!("{:06}", micros % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    format!("{}.{}", micros / 1_000_000, if fraction.is_empty() { "0" } else { fraction })
}

async fn list_models(mock: &MockUpstream, api_key: &str) -> reqwest::Response {
    mock.http.get(mock.url("/v1/models")).bearer_auth(api_key).send().await.expect("send")
}

#[tokio::test]
async fn models_list_every_test_model_and_only_invalid_keys_are_refused() {
    let mock = MockUpstream::spawn();
    let models: Value = list_models(&mock, "sk-mock-abc").await.json().await.expect("json");
    let ids: Vec<&str> = models["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    for model in ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o3-mini", "gpt-4o-audio-preview", "text-embedding-3-small"]
    {
        assert!(ids.contains(&model), "{model} is not listed: {ids:?}");
    }
    assert!(!ids.contains(&"gpt-9-unknown"), "the unservable model is listed");

    // Keys deposited to fail later must still verify.
    for key in
        ["sk-mock-fail401-a", "sk-mock-fail429-retry2-a", "sk-mock-fail500-a", "sk-mock-hang-a", "sk-mock-drop-a"]
    {
        assert_eq!(list_models(&mock, key).await.status(), 200, "{key}");
    }
    let invalid = list_models(&mock, "sk-mock-invalid-0123456789").await;
    assert_eq!(invalid.status(), 401);
    let body: Value = invalid.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(!body.to_string().contains("sk-mock-invalid-0123456789"), "{body}");
    // `invalid` only as a whole token.
    assert_eq!(list_models(&mock, "sk-mock-invalidity-1").await.status(), 200);
    let chat = mock.chat("sk-mock-invalid-0123456789", &json!({ "model": "gpt-4o-mini" })).await;
    assert_eq!(chat.status(), 401);
}

#[tokio::test]
async fn redirect_keys_get_307_on_every_v1_path() {
    let mock = MockUpstream::spawn();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let key = "sk-mock-redirect-0123";
    let models = http.get(mock.url("/v1/models")).bearer_auth(key).send().await.expect("send");
    assert_eq!(models.status(), 307);
    assert_eq!(models.headers()["location"], "/moved/v1/models");
    let chat = http
        .post(mock.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({ "model": "gpt-4o-mini" }))
        .send()
        .await
        .expect("send");
    assert_eq!(chat.status(), 307);
    assert_eq!(chat.headers()["location"], "/moved/v1/chat/completions");
    let credits = http.get(mock.url("/v1/credits")).bearer_auth(key).send().await.expect("send");
    assert_eq!(credits.status(), 307);
}

#[tokio::test]
async fn retry_token_sets_retry_after() {
    let mock = MockUpstream::spawn();
    let limited = mock.chat("sk-mock-fail429-retry7-abc", &json!({ "model": "m" })).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    let embedding = json!({ "model": "text-embedding-3-small", "input": "x" });
    let limited = mock.post("/v1/embeddings", "sk-mock-retry0-fail429-abc", &embedding).await;
    assert_eq!(limited.headers()["retry-after"], "0");
    let default = mock.chat("sk-mock-fail429-retryx-abc", &json!({ "model": "m" })).await;
    assert_eq!(default.headers()["retry-after"], "1");
}

impl MockUpstream {
    async fn get_with_key(&self, path: &str, api_key: &str) -> reqwest::Response {
        self.http.get(self.url(path)).bearer_auth(api_key).send().await.expect("send")
    }

    async fn balance_body(&self, path: &str, api_key: &str) -> String {
        let response = self.get_with_key(path, api_key).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        response.text().await.expect("body")
    }

    async fn put_account(&self, api_key: &str, body: &Value) -> reqwest::Response {
        self.http.put(self.url(&format!("/_mock/balance/{api_key}"))).json(body).send().await.expect("send")
    }
}

#[tokio::test]
async fn balance_endpoints_answer_in_each_providers_format() {
    let mock = MockUpstream::spawn();
    // No account: a fixed 100 USD.
    let key = "sk-mock-plain-1";
    assert_eq!(
        mock.balance_body("/dashboard/billing/credit_grants", key).await,
        r#"{"object":"credit_summary","total_granted":100.0,"total_used":0.0,"total_available":100.0}"#
    );
    assert_eq!(mock.balance_body("/v1/credits", key).await, r#"{"data":{"total_credits":100.0,"total_usage":0.0}}"#);
    let deepseek: Value = serde_json::from_str(&mock.balance_body("/user/balance", key).await).expect("json");
    assert_eq!(
        deepseek,
        json!({"is_available": true, "balance_infos": [{"currency": "USD", "total_balance": "100.00",
            "granted_balance": "0.00", "topped_up_balance": "100.00"}]})
    );

    let cny = "sk-mock-cny-2";
    let opened = mock.put_account(cny, &json!({ "micros": 49_588_940, "currency": "CNY" })).await;
    assert_eq!(opened.status(), 200);
    assert_eq!(
        mock.balance_body("/v1/users/me/balance", cny).await,
        r#"{"code":0,"data":{"available_balance":49.58894,"voucher_balance":0,"cash_balance":49.58894},"scode":"0x0","status":true}"#
    );
    let silicon: Value = serde_json::from_str(&mock.balance_body("/v1/user/info", cny).await).expect("json");
    assert_eq!((silicon["code"].clone(), silicon["status"].clone()), (json!(20000), json!(true)));
    assert_eq!(silicon["data"]["totalBalance"], "49.58894");
    let deepseek: Value = serde_json::from_str(&mock.balance_body("/user/balance", cny).await).expect("json");
    assert_eq!(deepseek["balance_infos"][0]["currency"], "CNY");
    assert_eq!(deepseek["balance_infos"][0]["total_balance"], "49.58894");

    // The probes are listed apart from the traffic.
    assert_eq!(mock.get_json("/_mock/requests").await, json!([]));
    assert_eq!(mock.get_json("/_mock/probes").await.as_array().map(Vec::len), Some(6));
    let cleared = mock.http.delete(mock.url("/_mock/probes")).send().await.expect("send");
    assert_eq!(cleared.status(), 204);
    assert_eq!(mock.get_json("/_mock/probes").await, json!([]));

    let anonymous = mock.http.get(mock.url("/user/balance")).send().await.expect("send");
    assert_eq!(anonymous.status(), 401);
    assert_eq!(mock.get_with_key("/v1/credits", "sk-mock-invalid-3").await.status(), 401);
}

#[tokio::test]
async fn accounts_are_charged_for_answers_and_drained_from_outside() {
    let mock = MockUpstream::spawn();
    let key = "sk-mock-metered-1";
    let account = json!({
        "micros": 10_000_000,
        "currency": "USD",
        "prompt_micros_per_token": 3,
        "completion_micros_per_token": 7,
    });
    assert_eq!(mock.put_account(key, &account).await.status(), 200);

    let request = json!({ "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 5 });
    let before_first_read = mock.chat(key, &request).await;
    assert_eq!(before_first_read.status(), 200);
    // Charged when the answer started, before its body was read.
    let charged = 10_000_000 - (prompt_tokens(&request) as i64 * 3 + 5 * 7);
    let state = mock.get_json(&format!("/_mock/balance/{key}")).await;
    assert_eq!((state["micros"].clone(), state["currency"].clone()), (json!(charged), json!("USD")));
    assert_eq!(state["account"], true);
    drop(before_first_read);

    // A stream is charged at its start too, and an embedding for its prompt only.
    let stream = stream_request(2, true);
    let response = mock.chat(key, &stream).await;
    let charged = charged - (prompt_tokens(&stream) as i64 * 3 + 2 * 7);
    assert_eq!(mock.get_json(&format!("/_mock/balance/{key}")).await["micros"], charged);
    body_text(response).await;
    let embedding = json!({ "model": "text-embedding-3-small", "input": "x" });
    assert_eq!(mock.post("/v1/embeddings", key, &embedding).await.status(), 200);
    let charged = charged - prompt_tokens(&embedding) as i64 * 3;
    assert_eq!(mock.get_json(&format!("/_mock/balance/{key}")).await["micros"], charged);

    // Failures cost nothing.
    let failing = "sk-mock-fail500-metered-2";
    mock.put_account(failing, &account).await;
    mock.chat(failing, &request).await;
    assert_eq!(mock.get_json(&format!("/_mock/balance/{failing}")).await["micros"], 10_000_000);

    // Spending outside the platform.
    let drained = mock
        .http
        .post(mock.url(&format!("/_mock/balance/{key}/drain")))
        .json(&json!({ "micros": 4_000_000 }))
        .send()
        .await
        .expect("send");
    assert_eq!(drained.status(), 200);
    let charged = charged - 4_000_000;
    assert_eq!(drained.json::<Value>().await.expect("json")["micros"], charged);
    let used = 10_000_000 - charged;
    let credits = mock.balance_body("/v1/credits", key).await;
    let expected = format!(r#""total_credits":10.0,"total_usage":{}"#, decimal_text(used));
    assert!(credits.contains(&expected), "{credits} should contain {expected}");

    // The default account never changes, and cannot be drained.
    let plain = "sk-mock-plain-3";
    mock.chat(plain, &request).await;
    assert_eq!(
        mock.get_json(&format!("/_mock/balance/{plain}")).await,
        json!({
            "micros": 100_000_000, "currency": "USD", "used_micros": 0, "prompt_micros_per_token": 0,
            "completion_micros_per_token": 0, "account": false,
        })
    );
    let no_account = mock
        .http
        .post(mock.url(&format!("/_mock/balance/{plain}/drain")))
        .json(&json!({ "micros": 1 }))
        .send()
        .await
        .expect("send");
    assert_eq!(no_account.status(), 404);
    for bad in [json!({}), json!({ "micros": 1, "currency": "EUR" }), json!({ "micros": "1" })] {
        assert_eq!(mock.put_account(plain, &bad).await.status(), 400, "{bad}");
    }
}

/// The gateway's own balance adapters read the mock's five formats: the two sides agree on the wire.
#[tokio::test]
async fn the_provider_client_reads_every_mock_balance_format() {
    use token_exchange::provider::{BalanceApi, Currency, ProviderClient};
    let mock = MockUpstream::spawn();
    let policy = token_exchange::ssrf::UpstreamPolicy::parse("127.0.0.0/8").expect("policy");
    let client = ProviderClient::new(std::sync::Arc::new(policy), Duration::from_secs(5)).expect("client");
    let base_url = format!("{}/v1", mock.base);
    let key = "sk-mock-adapters-1";
    mock.put_account(key, &json!({ "micros": 12_345_678, "currency": "CNY" })).await;
    for api in [BalanceApi::DeepSeek, BalanceApi::Moonshot, BalanceApi::SiliconFlow] {
        let balance = client.balance(api, &base_url, key).await.expect("balance");
        assert_eq!((balance.micros, balance.currency), (12_345_678, Currency::Cny), "{api:?}");
    }
    let usd = "sk-mock-adapters-2";
    mock.put_account(usd, &json!({ "micros": 5_000_001, "currency": "USD" })).await;
    mock.http
        .post(mock.url(&format!("/_mock/balance/{usd}/drain")))
        .json(&json!({ "micros": 1_000_000 }))
        .send()
        .await
        .expect("send");
    for api in [BalanceApi::OpenRouter, BalanceApi::OpenAiCreditGrants, BalanceApi::DeepSeek] {
        let balance = client.balance(api, &base_url, usd).await.expect("balance");
        assert_eq!((balance.micros, balance.currency), (4_000_001, Currency::Usd), "{api:?}");
    }
    let verified = client.verify(&base_url, usd, &["gpt-4o-mini".to_string()]).await.expect("verify");
    assert!(verified.listed.contains(&"o3-mini".to_string()));
}
