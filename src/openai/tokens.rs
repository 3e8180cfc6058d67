//! Local token counting, used only when an upstream reports no usage.
//!
//! OpenAI models get their own tokenizer (`o200k_base` for the GPT-4o generation and later, `cl100k_base`
//! before it). Other vendors' models are counted with `cl100k_base` as an approximation: their tokenizers
//! are not public or not shipped, and their counts are usually within a few tens of percent of it.
//!
//! Counting is CPU work proportional to the text (megabytes take a noticeable fraction of a second): run it
//! off the proxy's event loop when texts can be large, and call [`warm_up`] at start-up, since building a
//! tokenizer's tables the first time takes a while.

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::de::IgnoredAny;
use serde::Deserialize;
use tiktoken_rs::CoreBPE;

use super::request::Endpoint;

/// OpenAI's chat format: each message costs 3 tokens of framing, a `name` 1 more, and the reply is primed
/// with 3 (the OpenAI cookbook's count for current models).
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

/// Model name prefixes served by `o200k_base`.
const O200K_PREFIXES: &[&str] = &["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    O200k,
    Cl100k,
}

fn encoding_for(model: &str) -> Encoding {
    // Routed names such as `openai/gpt-4o` carry a vendor prefix.
    let name = model.rsplit('/').next().unwrap_or(model);
    let is_o200k = O200K_PREFIXES
        .iter()
        .any(|prefix| name.get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix)));
    if is_o200k {
        Encoding::O200k
    } else {
        Encoding::Cl100k
    }
}

fn bpe(encoding: Encoding) -> &'static CoreBPE {
    match encoding {
        Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
        Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
    }
}

/// Builds both tokenizers now rather than on the first request that needs one.
pub fn warm_up() {
    count_text("gpt-4o", "warm up");
    count_text("gpt-4", "warm up");
}

/// Tokens in `text` for `model`'s tokenizer (see the module docs for other vendors).
pub fn count_text(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let encoding = encoding_for(model);
    // tiktoken-rs unwraps internally (tokenizer construction, regex backtracking limits on pathological
    // input); a count must never take the gateway down with it.
    match catch_unwind(AssertUnwindSafe(|| bpe(encoding).encode_ordinary(text).len())) {
        Ok(n) => n as u64,
        Err(_) => {
            tracing::warn!(?encoding, bytes = text.len(), "tokenizer failed; estimating tokens from bytes");
            (text.len() as u64).div_ceil(4)
        }
    }
}

/// Estimated prompt tokens of a request body; 0 when the body is not what the endpoint expects.
///
/// Chat: the cookbook rule over `messages` (role, string content or the `text` of `type: "text"` parts,
/// name). Images, audio, tool definitions and tool calls are not counted, so this is a lower bound for
/// requests that use them. Embeddings: `input` as a string, strings, or token-id arrays (one token per id).
pub fn estimate_prompt(endpoint: Endpoint, model: &str, body: &[u8]) -> u64 {
    match endpoint {
        Endpoint::ChatCompletions => serde_json::from_slice::<ChatBody<'_>>(body)
            .map(|chat| {
                let messages: u64 = chat.messages.iter().map(|m| message_tokens(model, m)).sum();
                messages + REPLY_PRIMING
            })
            .unwrap_or(0),
        Endpoint::Embeddings => serde_json::from_slice::<EmbeddingsBody<'_>>(body)
            .map(|embeddings| match embeddings.input {
                Input::One(text) => count_text(model, &text),
                Input::Many(texts) => texts.iter().map(|t| count_text(model, t)).sum(),
                Input::Batches(batches) => batches.iter().map(|ids| ids.len() as u64).sum(),
                Input::Ids(ids) => ids.len() as u64,
            })
            .unwrap_or(0),
    }
}

fn message_tokens(model: &str, message: &ChatMessage<'_>) -> u64 {
    let mut tokens = TOKENS_PER_MESSAGE;
    if let Some(role) = &message.role {
        tokens += count_text(model, role);
    }
    match &message.content {
        Some(Content::Text(text)) => tokens += count_text(model, text),
        Some(Content::Parts(parts)) => {
            tokens += parts
                .iter()
                .filter(|p| p.kind.as_deref() == Some("text"))
                .filter_map(|p| p.text.as_deref())
                .map(|text| count_text(model, text))
                .sum::<u64>();
        }
        Some(Content::Other(_)) | None => {}
    }
    if let Some(name) = &message.name {
        tokens += count_text(model, name) + TOKENS_PER_NAME;
    }
    tokens
}

#[derive(Deserialize)]
struct ChatBody<'a> {
    #[serde(borrow)]
    messages: Vec<ChatMessage<'a>>,
}

#[derive(Deserialize)]
struct ChatMessage<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Content<'a>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
    /// A shape we do not count; it must not make the whole body unreadable.
    Other(IgnoredAny),
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct EmbeddingsBody<'a> {
    #[serde(borrow)]
    input: Input<'a>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
    Batches(Vec<Vec<IgnoredAny>>),
    Ids(Vec<IgnoredAny>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_tokenizer_by_model() {
        for model in
            ["gpt-4o", "gpt-4o-mini", "GPT-4.1-nano", "gpt-5", "o1-preview", "o3-mini", "o4-mini", "openai/gpt-4o"]
        {
            assert_eq!(encoding_for(model), Encoding::O200k, "{model}");
        }
        for model in ["gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "claude-3-5-sonnet", "meta-llama/llama-3-70b", "", "o"] {
            assert_eq!(encoding_for(model), Encoding::Cl100k, "{model}");
        }
    }

    #[test]
    fn counts_simple_text() {
        assert_eq!(count_text("gpt-4o", ""), 0);
        let hello = count_text("gpt-4o", "Hello, world!");
        assert!((2..=6).contains(&hello), "{hello}");
        assert_eq!(count_text("gpt-4", "Hello, world!"), 4);
        assert!(count_text("claude-3-opus", "Bonjour, le monde ✓ 你好") > 0);
        assert!(count_text("gpt-4o", &"word ".repeat(1000)) >= 1000);
    }

    #[test]
    fn chat_prompt_follows_the_cookbook() {
        let body = br#"{"model":"gpt-4","messages":[
            {"role":"system","content":"You are a helpful assistant."},
            {"role":"user","name":"alice","content":[{"type":"text","text":"Hello!"},
                                                     {"type":"image_url","image_url":{"url":"data:..."}}]},
            {"role":"assistant","content":null,"tool_calls":[]}
        ]}"#;
        let count = |s: &str| count_text("gpt-4", s);
        let expected = 3 * 3
            + count("system")
            + count("You are a helpful assistant.")
            + count("user")
            + count("alice")
            + 1
            + count("Hello!")
            + count("assistant")
            + 3;
        assert_eq!(estimate_prompt(Endpoint::ChatCompletions, "gpt-4", body), expected);
        assert!(expected > 20);
    }

    #[test]
    fn embeddings_prompt() {
        let e = |body: &[u8]| estimate_prompt(Endpoint::Embeddings, "text-embedding-3-small", body);
        let one = e(br#"{"input":"The food was delicious"}"#);
        assert_eq!(one, count_text("text-embedding-3-small", "The food was delicious"));
        assert!(one > 0);
        assert_eq!(e(br#"{"input":["The food was delicious","The food was delicious"]}"#), 2 * one);
        assert_eq!(e(br#"{"input":[1,2,3]}"#), 3);
        assert_eq!(e(br#"{"input":[[1,2],[3]]}"#), 3);
        assert_eq!(e(br#"{"input":[]}"#), 0);
    }

    #[test]
    fn malformed_bodies_estimate_zero() {
        for body in [&b""[..], b"not json", b"[]", br#"{"messages":"x"}"#, br#"{"input":{"a":1}}"#] {
            assert_eq!(estimate_prompt(Endpoint::ChatCompletions, "gpt-4o", body), 0);
            assert_eq!(estimate_prompt(Endpoint::Embeddings, "gpt-4o", body), 0);
        }
    }
}
