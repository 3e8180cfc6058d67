//! The provider client against stub providers on loopback (allowed by policy where a test needs it).

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use super::*;

const KEY: &str = "sk-test-SECRETSECRETSECRET-1234";

fn loopback() -> Arc<UpstreamPolicy> {
    Arc::new(UpstreamPolicy::parse("127.0.0.0/8,::1").unwrap())
}

fn client(policy: Arc<UpstreamPolicy>) -> ProviderClient {
    ProviderClient::new(policy, Duration::from_millis(1_500)).unwrap()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {KEY}"))
}

/// A provider: `/v1/models` lists two models for KEY (401 otherwise, quoting the key as a careless
/// provider might), `/v1/credits` answers OpenRouter's format, `/moved/*` redirects, `/html/models` is not
/// JSON, `/nodata/models` has no `data`, `/busy/models` is 503, `/slow/models` never answers in time,
/// `/huge/models` is too large.
async fn stub() -> SocketAddr {
    let models = |headers: HeaderMap| async move {
        if !authorized(&headers) {
            let body =
                format!(r#"{{"error":{{"message":"Incorrect API key provided: {KEY}","code":"invalid_api_key"}}}}"#);
            return (StatusCode::UNAUTHORIZED, body).into_response();
        }
        let body =
            r#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model"},{"id":"gpt-4o","object":"model"}]}"#;
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    };
    let credits = |headers: HeaderMap| async move {
        if !authorized(&headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        r#"{"data":{"total_credits":100.5,"total_usage":25.75}}"#.into_response()
    };
    let moved =
        || async { (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, "https://elsewhere.example/v1/models")]) };
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/credits", get(credits))
        .route("/moved/models", get(moved))
        .route("/moved/credits", get(moved))
        .route("/html/models", get(|| async { "<html>hello</html>" }))
        .route("/nodata/models", get(|| async { r#"{"object":"list"}"# }))
        .route(
            "/busy/models",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, r#"{"error":{"message":"overloaded"}}"#) }),
        )
        .route("/teapot/models", get(|| async { StatusCode::IM_A_TEAPOT }))
        .route(
            "/slow/models",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "{}"
            }),
        )
        .route("/huge/models", get(|| async { vec![b' '; MAX_BODY_BYTES + 1] }))
        .route(
            "/hook",
            post(|body: String| async move {
                if body == "{}" {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::BAD_REQUEST
                }
            }),
        )
        .route("/hook-moved", post(moved));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn models(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn assert_no_key(e: &dyn std::fmt::Display) {
    assert!(!e.to_string().contains("SECRETSECRET"), "the key leaked: {e}");
}

#[tokio::test]
async fn verify_lists_models_and_says_what_is_wrong() {
    let addr = stub().await;
    let c = client(loopback());
    let base = format!("http://{addr}/v1");

    let ok = c.verify(&base, KEY, &models(&["gpt-4o"])).await.unwrap();
    assert_eq!(ok.listed, ["gpt-4o-mini", "gpt-4o"]);
    assert!(c.verify(&format!("{base}/"), KEY, &models(&["gpt-4o-mini", "gpt-4o"])).await.is_ok());

    match c.verify(&base, KEY, &models(&["gpt-4o", "gpt-9-unknown", "o1"])).await {
        Err(VerifyError::ModelsNotServed(missing)) => assert_eq!(missing, ["gpt-9-unknown", "o1"]),
        other => panic!("{other:?}"),
    }
    let wrong_key = "sk-test-SECRETSECRETSECRET-9999";
    match c.verify(&base, wrong_key, &models(&["gpt-4o"])).await {
        Err(e @ VerifyError::InvalidKey(_)) => {
            assert!(!e.to_string().contains(wrong_key), "{e}");
            assert!(e.to_string().contains("Incorrect API key"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    for path in ["", "/v2", "/html", "/nodata"] {
        let result = c.verify(&format!("http://{addr}{path}"), KEY, &models(&["gpt-4o"])).await;
        assert!(matches!(result, Err(VerifyError::WrongBaseUrl(_))), "{path}: {result:?}");
    }
    match c.verify(&format!("http://{addr}/moved"), KEY, &models(&["gpt-4o"])).await {
        Err(VerifyError::Provider(ProviderError::Redirect(to))) => {
            assert_eq!(to, "https://elsewhere.example/v1/models")
        }
        other => panic!("{other:?}"),
    }
    match c.verify(&format!("http://{addr}/busy"), KEY, &models(&["gpt-4o"])).await {
        Err(VerifyError::Provider(e @ ProviderError::Status { status: 503, .. })) => {
            assert!(e.is_transient());
            assert!(e.to_string().contains("overloaded"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let teapot = c.verify(&format!("http://{addr}/teapot"), KEY, &models(&["gpt-4o"])).await;
    assert!(matches!(teapot, Err(VerifyError::Provider(ProviderError::Status { status: 418, .. }))), "{teapot:?}");
    let huge = c.verify(&format!("http://{addr}/huge"), KEY, &models(&["gpt-4o"])).await;
    assert!(matches!(huge, Err(VerifyError::Provider(ProviderError::BadResponse(_)))), "{huge:?}");
}

#[tokio::test]
async fn unreachable_and_slow_providers_fail_in_time() {
    let addr = stub().await;
    let c = client(loopback());
    let started = std::time::Instant::now();
    match c.verify(&format!("http://{addr}/slow"), KEY, &models(&["gpt-4o"])).await {
        Err(VerifyError::Provider(ProviderError::Unreachable(message))) => assert!(message.contains("1500 ms")),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let refused = c.verify(&format!("http://{closed}/v1"), KEY, &models(&["m"])).await;
    match refused {
        Err(VerifyError::Provider(e @ ProviderError::Unreachable(_))) => assert_no_key(&e),
        other => panic!("{other:?}"),
    }
    let unresolvable = c.verify("http://no-such-host.invalid/v1", KEY, &models(&["m"])).await;
    assert!(matches!(unresolvable, Err(VerifyError::Provider(ProviderError::Unreachable(_)))), "{unresolvable:?}");
}

#[tokio::test]
async fn internal_addresses_are_refused_on_every_request() {
    let addr = stub().await;
    let strict = client(Arc::new(UpstreamPolicy::default()));
    let port = addr.port();
    for base in [
        format!("http://127.0.0.1:{port}/v1"),
        format!("http://127.1:{port}/v1"),
        format!("http://2130706433:{port}/v1"),
        format!("http://0x7f.1:{port}/v1"),
        format!("http://[::ffff:127.0.0.1]:{port}/v1"),
        format!("http://localhost:{port}/v1"),
        "http://169.254.169.254/latest".to_string(),
        "http://[::1]:9/v1".to_string(),
        "http://0.0.0.0:9/v1".to_string(),
    ] {
        match strict.verify(&base, KEY, &models(&["gpt-4o"])).await {
            Err(VerifyError::Provider(ProviderError::Forbidden(message))) => {
                assert!(message.contains("public addresses"), "{base}: {message}")
            }
            other => panic!("{base}: {other:?}"),
        }
        let balance = strict.balance(BalanceApi::OpenRouter, &base, KEY).await;
        assert!(matches!(balance, Err(ProviderError::Forbidden(_))), "{base}: {balance:?}");
        let hook = strict.post_json(&format!("{base}/hook"), &[], b"{}".to_vec()).await;
        assert!(matches!(hook, Err(ProviderError::Forbidden(_))), "{base}: {hook:?}");
    }
    for bad in ["ftp://example.com/v1", "not a url", "file:///etc/passwd"] {
        let result = strict.verify(bad, KEY, &models(&["m"])).await;
        assert!(matches!(result, Err(VerifyError::Provider(ProviderError::Forbidden(_)))), "{bad}: {result:?}");
    }
}

#[tokio::test]
async fn balance_reads_through_the_adapter() {
    let addr = stub().await;
    let c = client(loopback());
    let base = format!("http://{addr}/v1");
    assert_eq!(
        c.balance(BalanceApi::OpenRouter, &base, KEY).await.unwrap(),
        Balance { micros: 74_750_000, currency: Currency::Usd }
    );
    let unauthorized = c.balance(BalanceApi::OpenRouter, &base, "sk-other").await;
    assert!(matches!(unauthorized, Err(ProviderError::Status { status: 401, .. })), "{unauthorized:?}");
    let moved = c.balance(BalanceApi::OpenRouter, &format!("http://{addr}/moved"), KEY).await;
    assert!(matches!(moved, Err(ProviderError::Redirect(_))), "{moved:?}");
    // The stub has no Moonshot endpoint: its 404 is a status error, not a balance.
    let missing = c.balance(BalanceApi::Moonshot, &base, KEY).await;
    assert!(matches!(missing, Err(ProviderError::Status { status: 404, .. })), "{missing:?}");
    assert!(matches!(c.balance(BalanceApi::None, &base, KEY).await, Err(ProviderError::Unsupported)));
}

#[tokio::test]
async fn webhooks_post_json_and_never_follow_redirects() {
    let addr = stub().await;
    let c = client(loopback());
    let headers = [("x-tokex-signature", "sha256=abc".to_string())];
    assert_eq!(c.post_json(&format!("http://{addr}/hook"), &headers, b"{}".to_vec()).await.unwrap(), 202);
    assert_eq!(c.post_json(&format!("http://{addr}/hook"), &[], b"[]".to_vec()).await.unwrap(), 400);
    let moved = c.post_json(&format!("http://{addr}/hook-moved"), &[], b"{}".to_vec()).await;
    assert!(matches!(moved, Err(ProviderError::Redirect(_))), "{moved:?}");
    let bad_header = c.post_json(&format!("http://{addr}/hook"), &[("bad header", String::new())], vec![]).await;
    assert!(matches!(bad_header, Err(ProviderError::InvalidRequest(_))), "{bad_header:?}");
}

#[test]
fn balance_api_names_round_trip_and_derive_from_providers() {
    for api in BalanceApi::ALL {
        assert_eq!(BalanceApi::parse(api.as_str()), Some(api));
    }
    assert_eq!(BalanceApi::parse(""), None);
    assert_eq!(BalanceApi::parse("DeepSeek"), None);
    let derived = [
        ("deepseek", BalanceApi::DeepSeek),
        ("openrouter", BalanceApi::OpenRouter),
        ("moonshot", BalanceApi::Moonshot),
        ("siliconflow", BalanceApi::SiliconFlow),
        ("openai", BalanceApi::OpenAiCreditGrants),
        ("anthropic", BalanceApi::None),
        ("", BalanceApi::None),
    ];
    for (provider, api) in derived {
        assert_eq!(BalanceApi::for_provider(provider), api, "{provider}");
    }
    assert_eq!(BalanceApi::of_key("", "deepseek"), BalanceApi::DeepSeek);
    assert_eq!(BalanceApi::of_key("none", "deepseek"), BalanceApi::None);
    assert_eq!(BalanceApi::of_key("moonshot", "openai"), BalanceApi::Moonshot);
    assert_eq!(Currency::parse("cny"), Some(Currency::Cny));
    assert_eq!(Currency::parse("EUR"), None);
    assert_eq!(Currency::Usd.as_str(), "USD");
}

#[test]
fn scrub_cuts_and_hides_the_secret() {
    assert_eq!(scrub("key sk-abc is bad", "sk-abc"), "key *** is bad");
    assert_eq!(scrub("line\nbreak", ""), "linebreak");
    let long = "x".repeat(500);
    assert_eq!(scrub(&long, "").chars().count(), MAX_MESSAGE_CHARS + 1);
}
