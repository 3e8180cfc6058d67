//! The gateway's one error type: each variant knows its HTTP status and its OpenAI error `type`/`code`.
//! Messages never contain a key, a body or an upstream's error text.

use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    BadRequest { message: String, code: &'static str },
    #[error("Invalid API key. Use the key issued by token-exchange as 'Authorization: Bearer tkx-...'.")]
    InvalidKey,
    #[error("This API key has expired.")]
    ExpiredKey,
    #[error("This API key may not use model '{model}'.")]
    ModelNotAllowed { model: String },
    #[error("The model '{model}' does not exist or is not offered by any key in the pool.")]
    UnknownModel { model: String },
    #[error("Unknown path. This gateway serves /v1/chat/completions, /v1/embeddings and /v1/models.")]
    NotFound,
    #[error("Method not allowed on this path.")]
    MethodNotAllowed,
    #[error("Request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("No key in the pool can serve model '{model}' right now. Try again later.")]
    NoCapacity { model: String },
    #[error("The upstream provider failed after {attempts} attempt(s) (last: {last}).")]
    UpstreamFailed { attempts: u32, last: String },
    #[error("The model '{model}' has no price on this gateway and cannot be served.")]
    NotPriced { model: String },
    #[error("Insufficient credits: this request could cost up to {needed} credits and no escrow or wallet of yours that may pay for model '{model}' holds that much. Add credits or lower max_tokens.")]
    InsufficientFunds { needed: i64, model: String },
    #[error("The gateway cannot record payments right now. Try again later.")]
    BillingUnavailable,
    #[error("Internal gateway error.")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::InvalidKey | Self::ExpiredKey => 401,
            Self::ModelNotAllowed { .. } => 403,
            Self::UnknownModel { .. } | Self::NotPriced { .. } | Self::NotFound => 404,
            Self::InsufficientFunds { .. } => 402,
            Self::BillingUnavailable => 503,
            Self::MethodNotAllowed => 405,
            Self::PayloadTooLarge { .. } => 413,
            Self::NoCapacity { .. } => 503,
            Self::UpstreamFailed { .. } => 502,
            Self::Internal => 500,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. }
            | Self::ModelNotAllowed { .. }
            | Self::UnknownModel { .. }
            | Self::NotPriced { .. }
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::PayloadTooLarge { .. } => "invalid_request_error",
            Self::InvalidKey | Self::ExpiredKey => "authentication_error",
            Self::InsufficientFunds { .. } => "insufficient_quota",
            Self::NoCapacity { .. } | Self::UpstreamFailed { .. } | Self::BillingUnavailable | Self::Internal => {
                "server_error"
            }
        }
    }

    /// OpenAI's `error.code`; also the `error_kind` stored in usage records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::InvalidKey => "invalid_api_key",
            Self::ExpiredKey => "expired_api_key",
            Self::ModelNotAllowed { .. } => "model_not_allowed",
            Self::UnknownModel { .. } | Self::NotPriced { .. } => "model_not_found",
            Self::InsufficientFunds { .. } => "insufficient_quota",
            Self::BillingUnavailable => "billing_unavailable",
            Self::NotFound => "unknown_url",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "request_too_large",
            Self::NoCapacity { .. } => "no_capacity",
            Self::UpstreamFailed { .. } => "upstream_error",
            Self::Internal => "internal_error",
        }
    }

    pub fn body(&self) -> Bytes {
        crate::openai::error::error_body(&self.to_string(), self.kind(), Some(self.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_as_openai_json() {
        let e = GatewayError::UnknownModel { model: "x\"y".into() };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["message"].as_str().unwrap().contains("x\"y"));
        assert_eq!(e.status(), 404);
    }
}
