//! Proxying proper: bodies arrive upstream intact, streams are metered exactly whatever their framing,
//! disconnects are metered, failover and weighted key choice work, and records survive SIGTERM.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::capture::{CaptureUpstream, CAPTURE_COMPLETION_TOKENS};
use common::{
    chat_body, http_client, mock_content, mock_prompt_tokens, sse_content, sse_events, Backend, StatusCode, TestEnv,
};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

const MODEL: &str = "gpt-4o-mini";
const FIVE_MB: usize = 5 * 1024 * 1024;

backend_tests!(
    large_prompt_non_stream_arrives_byte_for_byte,
    large_prompt_stream_is_rewritten_field_for_field,
    split_and_crlf_streams_meter_like_plain_ones,
    client_disconnect_mid_stream_is_metered,
    failover_past_fail500_key,
    failover_past_fail429_key,
    large_bodies_fail_over_too,
    traffic_follows_remaining_balance,
    buyer_authorization_never_reaches_upstream,
    proxy_path_routes_by_model_in_path,
    metrics_appear_after_traffic,
);

/// A chat request whose one message is `prompt_bytes` of text.
fn big_chat_body(prompt_bytes: usize, stream: bool) -> Value {
    let prompt: String = "The quick brown fox jumps over the lazy dog. ".chars().cycle().take(prompt_bytes).collect();
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": 3,
        "temperature": 0.25,
        "top_p": 0.5,
        "user": "buyer-end-user-42",
        "metadata": {"trace": "x\u{e9}\u{1f600}", "nested": {"list": [1, 2.5, null, true]}},
        "stream": stream,
    })
}

async fn large_prompt_non_stream_arrives_byte_for_byte(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-big-1234abcd", &[MODEL], 1_000_000_000).await;
    let gateway = env.start_gateway().await;

    let body = serde_json::to_vec(&big_chat_body(FIVE_MB, false)).expect("serialize");
    let reply = gateway.post_raw("/v1/chat/completions", Some(&buyer_key.key), body.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], mock_content(3));

    let upstream = env.mock.requests().await;
    assert_eq!(upstream.len(), 1, "one upstream request");
    assert_eq!(upstream[0].body_len, body.len(), "upstream body length");
    assert_eq!(upstream[0].body_sha256, hex::encode(Sha256::digest(&body)), "upstream body differs");

    let records = env.wait_exact_usage_records(1).await;
    assert_eq!(records[0].prompt_tokens, mock_prompt_tokens(body.len()));
    assert_eq!(records[0].completion_tokens, 3);
    assert!(!records[0].estimated);
    assert_eq!(records[0].request_bytes, body.len() as i64, "request_bytes is the client's body size");
}

async fn large_prompt_stream_is_rewritten_field_for_field(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    let capture = CaptureUpstream::start().await;
    env.add_seller_key_at("seller", &capture.base_url(), "sk-capture-5678efgh", &[MODEL], 1_000_000_000).await;
    let gateway = env.start_gateway().await;

    let original = big_chat_body(FIVE_MB, true);
    let reply = gateway.post_json("/v1/chat/completions", Some(&buyer_key.key), &original).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let events = sse_events(&reply.text());
    assert_eq!(sse_content(&events), "a b c");
    assert!(events.iter().all(|event| event.get("usage").is_none_or(Value::is_null)), "usage leaked: {events:?}");

    let captured = capture.captured();
    assert_eq!(captured.len(), 1, "one upstream request");
    let sent = &captured[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    let declared_length = sent.headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    assert_eq!(declared_length, Some(sent.body.len()), "Content-Length must match the rewritten body");
    let upstream: Map<String, Value> = serde_json::from_slice(&sent.body).expect("the upstream body is a JSON object");
    assert_eq!(upstream.get("stream_options").and_then(|o| o.get("include_usage")), Some(&json!(true)));
    let Value::Object(original) = original else { unreachable!() };
    for (field, value) in &original {
        assert!(upstream.get(field) == Some(value), "field {field:?} changed on the way upstream");
    }
    let extra: Vec<&String> =
        upstream.keys().filter(|k| !original.contains_key(*k) && *k != "stream_options").collect();
    assert!(extra.is_empty(), "fields added upstream: {extra:?}");

    let records = env.wait_exact_usage_records(1).await;
    assert_eq!(records[0].prompt_tokens, mock_prompt_tokens(sent.body.len()));
    assert_eq!(records[0].completion_tokens, CAPTURE_COMPLETION_TOKENS as i64);
    assert!(!records[0].estimated);
}

/// The same requests against a plain key, a `split` key (SSE cut into 1–7 byte frames) and a `crlf` key
/// must give the client the same content and the same usage records. Each key serves its own model
/// (names of equal length, so the request bodies have equal size).
async fn split_and_crlf_streams_meter_like_plain_ones(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    let plain = env.add_seller_key("seller", "sk-mock-plain-aaaa", &["m-plain"], 1_000_000).await;
    let split = env.add_seller_key("seller", "sk-mock-split-bbbb", &["m-split"], 1_000_000).await;
    let crlf = env.add_seller_key("seller", "sk-mock-crlf-cccc", &["m-crlf0"], 1_000_000).await;
    let gateway = env.start_gateway().await;

    let mut expected_records = 0;
    for include_usage in [false, true] {
        let mut seen = Vec::new();
        for model in ["m-plain", "m-split", "m-crlf0"] {
            let mut body = chat_body(model, 7, true);
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let reply = gateway.post_json("/v1/chat/completions", Some(&buyer_key.key), &body).await;
            assert_eq!(reply.status, StatusCode::OK, "{model}: {}", reply.text());
            let events = sse_events(&reply.text());
            assert_eq!(sse_content(&events), mock_content(7), "{model}: content");
            let usage: Vec<&Value> = events.iter().filter_map(|e| e.get("usage").filter(|u| !u.is_null())).collect();
            if include_usage {
                assert_eq!(usage.len(), 1, "{model}: one usage chunk");
                assert_eq!(usage[0]["completion_tokens"], 7, "{model}");
            } else {
                assert!(usage.is_empty(), "{model}: usage chunk passed to a client that did not ask");
            }
            seen.push(usage.first().map(|u| u["prompt_tokens"].clone()));
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "prompt tokens differ between framings: {seen:?}");
        expected_records += 3;
    }

    let records = env.wait_exact_usage_records(expected_records).await;
    let upstream = env.mock.requests().await;
    assert_eq!(upstream.len(), expected_records);
    for (record, sent) in records.iter().zip(&upstream) {
        assert!([Some(plain), Some(split), Some(crlf)].contains(&record.hosted_key_id), "{record:?}");
        assert_eq!(record.completion_tokens, 7, "{record:?}");
        assert_eq!(record.prompt_tokens, mock_prompt_tokens(sent.body_len), "{record:?}");
        assert!(!record.estimated, "{record:?}");
        assert_eq!((record.status_code, record.attempts), (200, 1));
    }
}

/// A client that goes away mid-stream is still billed for what it received.
async fn client_disconnect_mid_stream_is_metered(backend: Backend) {
    const RECEIVE: usize = 5;
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    let hosted = env.add_seller_key("seller", "sk-mock-slow-dddd", &[MODEL], 1_000_000).await;
    let gateway = env.start_gateway().await;

    // 60 events at 100 ms each: the stream would run for six seconds.
    let client = http_client();
    let response = client
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(&buyer_key.key)
        .json(&chat_body(MODEL, 60, true))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut content_chunks = 0;
    while content_chunks < RECEIVE {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream stalled")
            .expect("the stream ended early")
            .expect("read the stream");
        text.push_str(&String::from_utf8_lossy(&chunk));
        let complete = text.rfind("\n\n").map_or("", |end| &text[..end + 2]);
        content_chunks = sse_events(complete)
            .iter()
            .filter(|event| {
                event.pointer("/choices/0/delta/content").and_then(Value::as_str).is_some_and(|c| !c.is_empty())
            })
            .count();
    }
    drop(stream);
    drop(client);

    let records = env.wait_usage_records(1).await;
    let record = &records[0];
    assert_eq!(record.hosted_key_id, Some(hosted));
    assert!(record.client_disconnected, "{record:?}");
    assert!(record.estimated, "the usage chunk never arrived, so the count is an estimate: {record:?}");
    assert!(record.prompt_tokens > 0, "{record:?}");
    // The rule: without a usage chunk, the completion is the tokenizer's count of the text delivered. The
    // gateway may have passed on a chunk or two more than this client read before it closed.
    let complete = text.rfind("\n\n").map_or("", |end| &text[..end + 2]);
    let received: String = sse_events(complete)
        .iter()
        .filter_map(|event| event.pointer("/choices/0/delta/content").and_then(Value::as_str))
        .collect();
    let in_flight: String = (content_chunks..content_chunks + 3).map(|i| format!("tok{i} ")).collect();
    let at_least = token_exchange::openai::tokens::count_text(MODEL, &received) as i64;
    let at_most = token_exchange::openai::tokens::count_text(MODEL, &format!("{received}{in_flight}")) as i64;
    assert!(
        (at_least..=at_most).contains(&record.completion_tokens),
        "received {received:?}, billed {} completion tokens, expected {at_least}..={at_most}: {record:?}",
        record.completion_tokens
    );
    // The gateway must also have stopped reading: the mock would have needed six seconds.
    assert!(record.latency_ms < 5_000, "{record:?}");
}

/// Bodies up to 64 KiB go through Pingora's own proxy flow, larger ones through one subrequest per attempt
/// (src/proxy/call.rs): `prompt_bytes` 0 sends small bodies, more sends bodies of about that size.
async fn failover_past_failing_key(backend: Backend, failing_key: &str, prompt_bytes: usize) {
    const REQUESTS: usize = 20;
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    let bad = env.add_seller_key("seller", failing_key, &[MODEL], 1_000_000).await;
    let good = env.add_seller_key("seller", "sk-mock-good-eeee", &[MODEL], 1_000_000).await;
    let gateway = env.start_gateway().await;

    for i in 0..REQUESTS {
        let stream = i % 2 == 1;
        let (reply, tokens) = if prompt_bytes == 0 {
            (gateway.chat(&buyer_key.key, MODEL, 2, stream).await, 2)
        } else {
            let body = big_chat_body(prompt_bytes, stream);
            (gateway.post_json("/v1/chat/completions", Some(&buyer_key.key), &body).await, 3)
        };
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
        let content = if stream {
            sse_content(&sse_events(&reply.text()))
        } else {
            reply.json()["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_owned()
        };
        assert_eq!(content, mock_content(tokens), "request {i}");
    }

    let counts = env.mock.counts().await;
    let tried_bad = counts.get(failing_key).copied().unwrap_or(0);
    assert!(tried_bad >= 1, "the failing key was never tried: {counts:?}");
    assert_eq!(counts.get("sk-mock-good-eeee").copied(), Some(REQUESTS as u64), "{counts:?}");

    let records = env.wait_exact_usage_records(REQUESTS).await;
    for record in &records {
        assert_eq!(record.status_code, 200, "{record:?}");
        assert_eq!(record.hosted_key_id, Some(good), "the record names the key that served: {record:?}");
        assert_ne!(record.hosted_key_id, Some(bad));
        assert!((1..=2).contains(&record.attempts), "{record:?}");
        assert!(!record.estimated);
    }
    let failed_over = records.iter().filter(|r| r.attempts == 2).count() as u64;
    assert_eq!(failed_over, tried_bad, "records with attempts = 2 vs upstream calls to the failing key");
}

async fn failover_past_fail500_key(backend: Backend) {
    failover_past_failing_key(backend, "sk-mock-fail500-ffff", 0).await;
}

async fn failover_past_fail429_key(backend: Backend) {
    failover_past_failing_key(backend, "sk-mock-fail429-gggg", 0).await;
}

async fn large_bodies_fail_over_too(backend: Backend) {
    failover_past_failing_key(backend, "sk-mock-fail500-hhhh", 100 * 1024).await;
}

/// Two keys whose balances stand 1:3 get traffic 1:3. Balances are large so that the traffic itself
/// does not move the ratio.
async fn traffic_follows_remaining_balance(backend: Backend) {
    const REQUESTS: usize = 400;
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-light-hhhh", &[MODEL], 1_000_000_000).await;
    env.add_seller_key("seller", "sk-mock-heavy-iiii", &[MODEL], 3_000_000_000).await;
    let gateway = env.start_gateway().await;

    let statuses: Vec<StatusCode> = futures::stream::iter(0..REQUESTS)
        .map(|_| async { gateway.chat(&buyer_key.key, MODEL, 1, false).await.status })
        .buffer_unordered(8)
        .collect()
        .await;
    let failures: BTreeMap<u16, usize> =
        statuses.iter().filter(|s| **s != StatusCode::OK).fold(BTreeMap::new(), |mut m, s| {
            *m.entry(s.as_u16()).or_default() += 1;
            m
        });
    assert!(failures.is_empty(), "failed requests by status: {failures:?}");

    let counts = env.mock.counts().await;
    let light = counts.get("sk-mock-light-hhhh").copied().unwrap_or(0) as f64;
    let heavy = counts.get("sk-mock-heavy-iiii").copied().unwrap_or(0) as f64;
    assert_eq!(light + heavy, REQUESTS as f64, "{counts:?}");
    // Binomial(400, 1/4): mean 100, sigma 8.66; six sigma either side cannot flake.
    let (mean, sigma) = (REQUESTS as f64 * 0.25, (REQUESTS as f64 * 0.25 * 0.75).sqrt());
    assert!(
        (light - mean).abs() <= 6.0 * sigma,
        "light key got {light} of {REQUESTS}, expected {mean} ± {:.0}",
        6.0 * sigma
    );
    env.wait_usage_records(REQUESTS).await;
}

async fn buyer_authorization_never_reaches_upstream(backend: Backend) {
    const SELLER_KEY: &str = "sk-mock-auth-jjjj";
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", SELLER_KEY, &[MODEL, "text-embedding-3-small"], 1_000_000).await;
    let gateway = env.start_gateway().await;

    assert_eq!(gateway.chat(&buyer_key.key, MODEL, 2, false).await.status, StatusCode::OK);
    assert_eq!(gateway.chat(&buyer_key.key, MODEL, 2, true).await.status, StatusCode::OK);
    let embedding = json!({"model": "text-embedding-3-small", "input": "hi"});
    assert_eq!(gateway.post_json("/v1/embeddings", Some(&buyer_key.key), &embedding).await.status, StatusCode::OK);

    let upstream = env.mock.requests().await;
    assert_eq!(upstream.len(), 3);
    let buyer_secret = buyer_key.key.trim_start_matches("tkx-");
    for request in &upstream {
        assert_eq!(request.api_key.as_deref(), Some(SELLER_KEY), "{request:?}");
        assert_eq!(request.headers.get("authorization").map(String::as_str), Some(&*format!("Bearer {SELLER_KEY}")));
        for (name, value) in &request.headers {
            assert!(
                !value.contains("tkx-") && !value.contains(buyer_secret),
                "header {name} carries the buyer key upstream"
            );
        }
    }
}

async fn proxy_path_routes_by_model_in_path(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-path-kkkk", &[MODEL, "text-embedding-3-small"], 1_000_000).await;
    let gateway = env.start_gateway().await;
    let path = format!("/api/v1/proxy/{MODEL}/chat/completions");

    let reply = gateway.post_json(&path, Some(&buyer_key.key), &chat_body(MODEL, 3, false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], mock_content(3));

    let reply = gateway.post_json(&path, Some(&buyer_key.key), &chat_body(MODEL, 3, true)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(sse_content(&sse_events(&reply.text())), mock_content(3));

    // The path names the model, so the body need not.
    let without_model = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let reply = gateway.post_json(&path, Some(&buyer_key.key), &without_model).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let embedding = json!({"model": "text-embedding-3-small", "input": "hi"});
    let reply =
        gateway.post_json("/api/v1/proxy/text-embedding-3-small/embeddings", Some(&buyer_key.key), &embedding).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let upstream = env.mock.requests().await;
    let seen: Vec<(&str, Option<&str>)> = upstream.iter().map(|r| (r.path.as_str(), r.model.as_deref())).collect();
    assert_eq!(
        seen,
        [
            ("/v1/chat/completions", Some(MODEL)),
            ("/v1/chat/completions", Some(MODEL)),
            ("/v1/chat/completions", Some(MODEL)),
            ("/v1/embeddings", Some("text-embedding-3-small")),
        ]
    );
    let records = env.wait_exact_usage_records(4).await;
    assert!(
        records.iter().all(|r| r.status_code == 200 && (r.model == MODEL || r.model == "text-embedding-3-small")),
        "{records:#?}"
    );
}

async fn metrics_appear_after_traffic(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer_key = env.seller_and_buyer().await;
    env.add_seller_key("seller", "sk-mock-metrics-llll", &[MODEL], 1_000_000).await;
    let gateway = env.start_gateway().await;

    assert_eq!(gateway.chat(&buyer_key.key, MODEL, 2, false).await.status, StatusCode::OK);
    assert_eq!(gateway.chat(&buyer_key.key, MODEL, 2, true).await.status, StatusCode::OK);
    assert_eq!(gateway.chat(&buyer_key.key, "no-such-model", 2, false).await.status, StatusCode::NOT_FOUND);
    env.wait_usage_records(3).await;

    let metrics = gateway.metrics().await;
    let samples: Vec<(&str, f64)> = metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name, value.parse().ok()?))
        })
        .collect();
    assert!(samples.iter().all(|(name, _)| name.starts_with("tokex_")), "metric without the tokex_ prefix:\n{metrics}");
    let counted = samples.iter().filter(|(name, value)| name.starts_with("tokex_") && *value > 0.0).count();
    assert!(counted >= 3, "expected several non-zero tokex_ samples after traffic:\n{metrics}");
    // Counters carry labels (model, status): add up each metric's series.
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for (name, value) in &samples {
        *totals.entry(name.split('{').next().unwrap_or(name)).or_default() += value;
    }
    assert!(
        totals.iter().any(|(name, total)| name.contains("requests") && name.ends_with("_total") && *total >= 3.0),
        "no request counter counted the three requests:\n{metrics}"
    );
    assert!(!metrics.contains("sk-mock-metrics-llll"), "a seller key leaked into the metrics");
}
