//! OpenAI's error envelope, the one shape every gateway error is answered in.

use bytes::Bytes;
use serde::Serialize;

#[derive(Serialize)]
struct Envelope<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// Used only if serialising the envelope ever failed, so that a client still receives valid JSON.
const FALLBACK: &[u8] =
    br#"{"error":{"message":"Internal gateway error.","type":"server_error","param":null,"code":"internal_error"}}"#;

/// `{"error":{"message":..,"type":..,"param":null,"code":..}}`, JSON-escaped.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    let envelope = Envelope { error: Detail { message, kind, param: None, code } };
    match serde_json::to_vec(&envelope) {
        Ok(body) => Bytes::from(body),
        Err(_) => Bytes::from_static(FALLBACK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn renders_the_openai_shape() {
        let body = error_body("bad \"thing\"\n<tab>\t", "invalid_request_error", Some("invalid_type"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"error": {"message": "bad \"thing\"\n<tab>\t", "type": "invalid_request_error",
                             "param": null, "code": "invalid_type"}})
        );
    }

    #[test]
    fn code_may_be_null() {
        let v: Value = serde_json::from_slice(&error_body("m", "server_error", None)).unwrap();
        assert_eq!(v["error"]["code"], Value::Null);
        assert_eq!(v["error"]["param"], Value::Null);
    }

    #[test]
    fn fallback_is_valid_json() {
        let v: Value = serde_json::from_slice(FALLBACK).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
    }
}
