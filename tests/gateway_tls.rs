//! HTTPS upstreams: the gateway speaks TLS to a seller's base URL, sends the host as SNI, verifies the
//! certificate (a private CA is trusted through the standard `SSL_CERT_FILE`), and refuses an upstream
//! whose certificate it cannot verify.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, StatusCode, TestEnv};
use tokio::io::{AsyncBufReadExt, BufReader};

const MODEL: &str = "gpt-4o-mini";
const SELLER_KEY: &str = "sk-mock-tls-9999";

backend_tests!(https_upstreams_are_verified_and_get_sni);

/// A self-signed certificate for `localhost`, made with the `openssl` command.
fn make_certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("upstream-cert.pem"), dir.join("upstream-key.pem"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl could not make a test certificate");
    (cert.display().to_string(), key.display().to_string())
}

/// Starts the TLS relay in front of the mock; returns its port, the SNI names it saw, and the process.
async fn start_tls_relay(
    cert: &str,
    key: &str,
    upstream: &str,
) -> (u16, Arc<Mutex<Vec<String>>>, tokio::process::Child) {
    let script = common::repo_root().join("tests/python/tls_proxy.py");
    let mut child = tokio::process::Command::new(common::python())
        .arg(script)
        .args([cert, key, upstream])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the TLS relay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.expect("relay start").unwrap();
    let port: u16 = first
        .as_deref()
        .and_then(|l| l.strip_prefix("LISTENING "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("relay printed {first:?}"));
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = names.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(name) = line.strip_prefix("SNI ") {
                seen.lock().unwrap().push(name.to_string());
            }
        }
    });
    (port, names, child)
}

async fn https_upstreams_are_verified_and_get_sni(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let buyer = env.seller_and_buyer().await;
    let (cert, key) = make_certificate(env.dir());
    let mock = env.mock.base_url();
    let mock_addr = mock.trim_start_matches("http://").trim_end_matches("/v1");
    let (port, sni, _relay) = start_tls_relay(&cert, &key, mock_addr).await;
    let hosted =
        env.add_seller_key_at("seller", &format!("https://localhost:{port}/v1"), SELLER_KEY, &[MODEL], 1_000).await;

    // Trusted through SSL_CERT_FILE: stream and non-stream both work, metered as usual.
    let gateway = env.start_gateway_with(&[("SSL_CERT_FILE", cert.as_str())]).await;
    for stream in [false, true] {
        let reply = gateway.chat(&buyer.key, MODEL, 4, stream).await;
        assert_eq!(reply.status, StatusCode::OK, "stream={stream}: {}\n{}", reply.text(), gateway.log());
    }
    let records = env.wait_exact_usage_records(2).await;
    assert!(records.iter().all(|r| r.hosted_key_id == Some(hosted) && r.completion_tokens == 4), "{records:#?}");
    let requests = env.mock.requests().await;
    assert!(requests.iter().all(|r| r.api_key.as_deref() == Some(SELLER_KEY)), "{requests:?}");
    assert!(
        requests.iter().all(|r| r.headers.get("host").map(String::as_str) == Some(&format!("localhost:{port}"))),
        "{requests:?}"
    );
    assert!(sni.lock().unwrap().iter().any(|name| name == "localhost"), "SNI seen: {:?}", sni.lock().unwrap());
    drop(gateway);

    // Not trusted: the certificate is refused, the request fails without reaching the mock.
    env.mock.clear().await;
    let untrusting = env.start_gateway().await;
    let reply = untrusting.chat(&buyer.key, MODEL, 4, false).await;
    reply.assert_openai_error(StatusCode::BAD_GATEWAY);
    assert!(env.mock.requests().await.is_empty(), "an unverified upstream got the request");
}
