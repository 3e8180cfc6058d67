//! Which gateway operation a request asks for, from its method and path alone.

use crate::openai::request::Endpoint;

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/models`
    Models,
    /// An LLM call; `path_model` is set for the original plan's `/api/v1/proxy/{model}/...` paths.
    Call {
        endpoint: Endpoint,
        path_model: Option<String>,
    },
    MethodNotAllowed,
    NotFound,
}

pub fn classify(method: &http::Method, path: &str) -> Route {
    let call = |endpoint, path_model| {
        if method == http::Method::POST {
            Route::Call { endpoint, path_model }
        } else {
            Route::MethodNotAllowed
        }
    };
    match path {
        "/v1/models" => {
            if method == http::Method::GET {
                Route::Models
            } else {
                Route::MethodNotAllowed
            }
        }
        "/v1/chat/completions" => call(Endpoint::ChatCompletions, None),
        "/v1/embeddings" => call(Endpoint::Embeddings, None),
        _ => match proxy_path(path) {
            Some((model, endpoint)) => call(endpoint, Some(model)),
            None => Route::NotFound,
        },
    }
}

/// `/api/v1/proxy/{model}/chat/completions` and `/api/v1/proxy/{model}/embeddings`. Model names may
/// contain `/` (`meta-llama/llama-3-70b`), so the endpoint is matched from the end.
fn proxy_path(path: &str) -> Option<(String, Endpoint)> {
    let rest = path.strip_prefix("/api/v1/proxy/")?;
    let (model, endpoint) = if let Some(m) = rest.strip_suffix("/chat/completions") {
        (m, Endpoint::ChatCompletions)
    } else if let Some(m) = rest.strip_suffix("/embeddings") {
        (m, Endpoint::Embeddings)
    } else {
        return None;
    };
    let model = percent_decode(model)?;
    (!model.is_empty()).then_some((model, endpoint))
}

fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn classifies_openai_and_plan_paths() {
        assert_eq!(classify(&Method::GET, "/v1/models"), Route::Models);
        assert_eq!(
            classify(&Method::POST, "/v1/chat/completions"),
            Route::Call { endpoint: Endpoint::ChatCompletions, path_model: None }
        );
        assert_eq!(
            classify(&Method::POST, "/v1/embeddings"),
            Route::Call { endpoint: Endpoint::Embeddings, path_model: None }
        );
        assert_eq!(
            classify(&Method::POST, "/api/v1/proxy/gpt-4o-mini/chat/completions"),
            Route::Call { endpoint: Endpoint::ChatCompletions, path_model: Some("gpt-4o-mini".into()) }
        );
        assert_eq!(
            classify(&Method::POST, "/api/v1/proxy/meta-llama/llama-3%2E1/embeddings"),
            Route::Call { endpoint: Endpoint::Embeddings, path_model: Some("meta-llama/llama-3.1".into()) }
        );
        assert_eq!(classify(&Method::GET, "/v1/chat/completions"), Route::MethodNotAllowed);
        assert_eq!(classify(&Method::POST, "/v1/models"), Route::MethodNotAllowed);
        assert_eq!(classify(&Method::POST, "/api/v1/proxy//chat/completions"), Route::NotFound);
        assert_eq!(classify(&Method::POST, "/api/v1/proxy/x/completions"), Route::NotFound);
        assert_eq!(classify(&Method::POST, "/api/v1/proxy/%zz/embeddings"), Route::NotFound);
        assert_eq!(classify(&Method::GET, "/"), Route::NotFound);
    }
}
