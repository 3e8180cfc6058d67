//! The web console: a single-page app of plain HTML, CSS and ES modules (no build step), embedded in the
//! binary and served on the admin port under `/console/`. It talks to the server only through the admin
//! API, calling operations by their OpenAPI operationId as `/api/v1/openapi.json` resolves them
//! (docs/console.md).
//!
//! Every console response carries a strict Content-Security-Policy: scripts and styles from this origin
//! only, no inline code, no framing; the console builds the page from data with DOM text nodes, so API
//! data can never become markup.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::AdminState;

/// `/` and `/console` lead here.
const HOME: &str = "/console/";

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset { name: $name, content_type: $content_type, body: include_bytes!(concat!("console/", $name)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the console. A module that imports a file missing here fails the unit test below.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("chart.js", JS),
    asset!("usage.js", JS),
    asset!("buyer.js", JS),
    asset!("seller.js", JS),
    asset!("admin.js", JS),
];

pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(to_console))
        .route("/console", get(to_console))
        .route("/console/", get(index))
        .route("/console/{asset}", get(asset))
}

async fn to_console() -> Redirect {
    Redirect::to(HOME)
}

async fn index() -> Response {
    serve("index.html")
}

async fn asset(Path(name): Path<String>) -> Response {
    serve(&name)
}

fn serve(name: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::RouteNotFound.into_response();
    };
    let mut response = (StatusCode::OK, asset.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(asset: &Asset) -> &str {
        std::str::from_utf8(asset.body).unwrap()
    }

    #[test]
    fn assets_are_served_with_their_type_and_the_security_headers() {
        for asset in ASSETS {
            let response = serve(asset.name);
            assert_eq!(response.status(), StatusCode::OK, "{}", asset.name);
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], asset.content_type);
            let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        for missing in ["", "nope.js", "../console.rs", "index.htm"] {
            let response = serve(missing);
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
        }
    }

    /// Every relative module import and every `src`/`href` in the console names an embedded file.
    #[test]
    fn every_referenced_file_is_embedded() {
        let names: Vec<&str> = ASSETS.iter().map(|a| a.name).collect();
        let mut referenced = Vec::new();
        for asset in ASSETS {
            let source = text(asset);
            for marker in ["from './", "src=\"", "href=\""] {
                for (at, _) in source.match_indices(marker) {
                    let rest = &source[at + marker.len()..];
                    let end = rest.find(['\'', '"']).unwrap();
                    let target = &rest[..end];
                    if !target.is_empty() && !target.starts_with('#') && !target.starts_with("${") {
                        referenced.push((asset.name, target.trim_start_matches("./")));
                    }
                }
            }
        }
        assert!(referenced.len() >= ASSETS.len(), "{referenced:?}");
        for (from, target) in referenced {
            assert!(names.contains(&target), "{from} refers to {target}, which is not in ASSETS");
        }
    }

    /// The console finds API paths in the OpenAPI document; only the document's own URL is written down.
    #[test]
    fn no_api_path_is_hard_coded() {
        for asset in ASSETS {
            let source = text(asset).replace("'/api/v1/openapi.json'", "");
            assert!(!source.contains("/api/v1/"), "{} hard-codes an API path", asset.name);
        }
        let api = ASSETS.iter().find(|a| a.name == "api.js").unwrap();
        assert_eq!(text(api).matches("/api/v1/openapi.json").count(), 1);
    }

    fn identifier(text: &str) -> String {
        text.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
    }

    /// The operationIds the console calls: every `api.call('<id>'`, `api.has('<id>'` and `api.download('<id>'` in its
    /// modules. A call whose
    /// id is not a literal would escape this check, so there must be none.
    fn used_operations() -> std::collections::BTreeSet<String> {
        let mut used = std::collections::BTreeSet::new();
        for asset in ASSETS.iter().filter(|a| a.content_type == JS) {
            let source = text(asset);
            // Every call goes through an `api.` receiver written out, so that the scan below sees it.
            for method in [".call(", ".download("] {
                let all = source.matches(method).count();
                assert_eq!(
                    all,
                    source.matches(&format!("api{method}")).count(),
                    "{}: {method} not on `api`",
                    asset.name
                );
            }
            for marker in ["api.call(", "api.has(", "api.download("] {
                for (at, _) in source.match_indices(marker) {
                    let rest = source[at + marker.len()..].trim_start();
                    let id = rest.strip_prefix('\'').map(identifier).unwrap_or_default();
                    let context: String = rest.chars().take(40).collect();
                    assert!(!id.is_empty(), "{}: {marker} without a literal operationId: {context}", asset.name);
                    used.insert(id);
                }
            }
            // What a view needs (`needs: ['a', 'b']`) before it is drawn.
            for (at, _) in source.match_indices("needs: [") {
                let list = &source[at + "needs: [".len()..];
                let list = &list[..list.find(']').unwrap()];
                used.extend(list.split(',').map(|item| identifier(item.trim().trim_start_matches('\''))));
            }
        }
        used
    }

    #[test]
    fn every_operation_the_console_calls_is_in_the_document() {
        let used = used_operations();
        assert!(used.contains("auth_login") && used.contains("analytics_timeseries") && used.len() > 30, "{used:?}");
        let doc = serde_json::to_value(super::super::openapi()).unwrap();
        let mut offered = std::collections::BTreeSet::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                if let Some(id) = op["operationId"].as_str() {
                    offered.insert(id.to_string());
                }
            }
        }
        let missing: Vec<_> = used.difference(&offered).collect();
        assert!(missing.is_empty(), "the console calls operations the API does not document: {missing:?}");
    }

    #[test]
    fn data_never_becomes_markup() {
        for asset in ASSETS.iter().filter(|a| a.content_type == JS) {
            let source = text(asset);
            for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"] {
                assert!(!source.contains(sink), "{} uses {sink}", asset.name);
            }
        }
    }
}
