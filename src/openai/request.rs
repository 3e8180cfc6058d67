//! Inspection of a buyer's request body: validate it in one borrowed pass, learn what routing and metering
//! need, and make the few edits the gateway requires as byte splices, so that everything else reaches the
//! upstream byte for byte.
//!
//! Edits: the path model replaces or adds `model`; a chat stream gets `stream_options.include_usage: true`
//! so the upstream reports usage. When nothing changes, the body is the caller's `Bytes`, not a copy.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use memchr::{memchr, memchr2};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
}

impl Endpoint {
    /// Appended to a provider's base URL (which ends in `/v1` or its equivalent).
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    /// Whether the response has completion tokens (embeddings have none).
    pub fn has_completion(self) -> bool {
        matches!(self, Self::ChatCompletions)
    }

    /// The name used in usage records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat.completions",
            Self::Embeddings => "embeddings",
        }
    }
}

pub struct InspectedRequest {
    pub model: String,
    pub stream: bool,
    /// The buyer asked for the usage chunk themselves (stream_options.include_usage == true).
    pub client_wants_usage: bool,
    /// The larger of max_completion_tokens and max_tokens (chat only): a provider may honour either.
    pub max_tokens: Option<u64>,
    /// Completions asked for (`n`, chat only; 1 when absent).
    pub choices: u64,
    /// Image and audio parts in the body: their prompt tokens are not bounded by their bytes.
    pub media_parts: u64,
    /// The body to send upstream: the original `Bytes` (same allocation) when unchanged.
    pub body: Bytes,
}

/// Bodies can be megabytes of private prompt: show their size only.
impl fmt::Debug for InspectedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InspectedRequest")
            .field("model", &self.model)
            .field("stream", &self.stream)
            .field("client_wants_usage", &self.client_wants_usage)
            .field("max_tokens", &self.max_tokens)
            .field("choices", &self.choices)
            .field("media_parts", &self.media_parts)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Why a body is refused (HTTP 400). Messages name fields, never echo body content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("The request body is empty. Send a JSON object.")]
    EmptyBody,
    #[error("We could not parse the JSON body of your request (line {line}, column {column}).")]
    InvalidJson { line: usize, column: usize },
    #[error("The request body must be a JSON object.")]
    NotAnObject,
    /// Refused because the gateway and the upstream could read different values (first vs last wins).
    #[error("Duplicate field '{field}' in the request body.")]
    DuplicateField { field: &'static str },
    #[error("You must provide a model parameter.")]
    MissingModel,
    #[error("Invalid value for 'model': it must not be empty.")]
    EmptyModel,
    #[error("Invalid type for 'model': expected a string.")]
    InvalidModel,
    #[error("Invalid type for 'stream': expected a boolean.")]
    InvalidStream,
    #[error("Invalid type for '{field}': expected {expected}.")]
    InvalidStreamOptions { field: &'static str, expected: &'static str },
    #[error("Invalid type for '{field}': expected a non-negative integer.")]
    InvalidMaxTokens { field: &'static str },
    #[error("Invalid value for 'model': at most {MAX_MODEL_CHARS} characters.")]
    ModelTooLong,
    #[error("Invalid value for 'n': expected an integer from 1 to {MAX_CHOICES}.")]
    InvalidChoices,
}

/// Longer model names are refused: no provider has them, and they would only bloat usage records.
pub const MAX_MODEL_CHARS: usize = 128;
/// The most completions one chat request may ask for (OpenAI's own limit).
pub const MAX_CHOICES: u64 = 128;

impl RequestError {
    /// OpenAI's `error.code` for this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyBody | Self::InvalidJson { .. } | Self::NotAnObject => "invalid_json",
            Self::DuplicateField { .. } => "duplicate_parameter",
            Self::MissingModel => "missing_required_parameter",
            Self::EmptyModel | Self::ModelTooLong | Self::InvalidChoices => "invalid_value",
            Self::InvalidModel
            | Self::InvalidStream
            | Self::InvalidStreamOptions { .. }
            | Self::InvalidMaxTokens { .. } => "invalid_type",
        }
    }

    /// The position only: serde_json's own message can quote the offending value.
    fn invalid_json(e: &serde_json::Error) -> Self {
        Self::InvalidJson { line: e.line(), column: e.column() }
    }
}

pub fn inspect(endpoint: Endpoint, body: Bytes, path_model: Option<&str>) -> Result<InspectedRequest, RequestError> {
    let Some(open) = body.iter().position(|b| !is_json_ws(*b)) else {
        return Err(RequestError::EmptyBody);
    };
    if body[open] != b'{' {
        return Err(match serde_json::from_slice::<IgnoredAny>(&body) {
            Ok(_) => RequestError::NotAnObject,
            Err(e) => RequestError::invalid_json(&e),
        });
    }
    let peek: Peek<'_> = serde_json::from_slice(&body).map_err(|e| RequestError::invalid_json(&e))?;
    if let Some(field) = peek.duplicate {
        return Err(RequestError::DuplicateField { field });
    }

    let mut edits = Edits::new(open);
    let model = match path_model {
        Some("") => return Err(RequestError::EmptyModel),
        Some(path_model) => {
            match &peek.model {
                Loose::Str(m) if m == path_model => {}
                Loose::Absent => edits.insert_member(b"\"model\":", json_string(path_model)),
                _ => {
                    let span = member_value(&body, open, "model").ok_or(SCAN_FAILED)?;
                    edits.replace(span, json_string(path_model));
                }
            }
            path_model.to_owned()
        }
        None => match &peek.model {
            Loose::Str(m) if m.is_empty() => return Err(RequestError::EmptyModel),
            Loose::Str(m) => m.clone().into_owned(),
            Loose::Absent | Loose::Null => return Err(RequestError::MissingModel),
            _ => return Err(RequestError::InvalidModel),
        },
    };

    if model.chars().count() > MAX_MODEL_CHARS {
        return Err(RequestError::ModelTooLong);
    }

    let (mut stream, mut client_wants_usage, mut max_tokens, mut choices) = (false, false, None, 1);
    if endpoint == Endpoint::ChatCompletions {
        stream = match peek.stream {
            Loose::Absent | Loose::Null => false,
            Loose::Bool(b) => b,
            _ => return Err(RequestError::InvalidStream),
        };
        let completion = non_negative(&peek.max_completion_tokens, "max_completion_tokens")?;
        let legacy = non_negative(&peek.max_tokens, "max_tokens")?;
        max_tokens = completion.max(legacy);
        choices = match peek.n {
            Loose::Absent | Loose::Null => 1,
            Loose::UInt(n @ 1..=MAX_CHOICES) => n,
            _ => return Err(RequestError::InvalidChoices),
        };
        if stream {
            client_wants_usage = ask_for_usage(&body, open, &peek.stream_options, &mut edits)?;
        }
    }

    let media_parts = count_media_parts(&body);
    let body = edits.apply(body);
    Ok(InspectedRequest { model, stream, client_wants_usage, max_tokens, choices, media_parts, body })
}

/// Counts the strings `"image_url"`, `"input_audio"` and `"input_image"`: each media part names them as its
/// type and as its key, and the text may contain them too, so this is an upper bound (never fewer than
/// the parts, which is what matters for a reservation).
fn count_media_parts(body: &[u8]) -> u64 {
    [&b"\"image_url\""[..], b"\"input_audio\"", b"\"input_image\""]
        .iter()
        .map(|needle| memchr::memmem::find_iter(body, needle).count() as u64)
        .sum()
}

/// Makes the upstream send its usage event; returns whether the buyer asked for it already.
fn ask_for_usage(body: &[u8], open: usize, options: &StreamOptions, edits: &mut Edits) -> Result<bool, RequestError> {
    const OBJECT: &[u8] = br#"{"include_usage":true}"#;
    let wrong_include_usage =
        RequestError::InvalidStreamOptions { field: "stream_options.include_usage", expected: "a boolean" };
    match options {
        StreamOptions::Absent => edits.insert_member(b"\"stream_options\":", Cow::Borrowed(OBJECT)),
        StreamOptions::Null => {
            let span = member_value(body, open, "stream_options").ok_or(SCAN_FAILED)?;
            edits.replace(span, Cow::Borrowed(OBJECT));
        }
        StreamOptions::Object { include_usage: Loose::Bool(true) } => return Ok(true),
        StreamOptions::Object { include_usage: Loose::Absent } => {
            let span = member_value(body, open, "stream_options").ok_or(SCAN_FAILED)?;
            let inner_open = span.start;
            let empty = body.get(skip_ws(body, inner_open + 1)) == Some(&b'}');
            let member: &'static [u8] = if empty { b"\"include_usage\":true" } else { b"\"include_usage\":true," };
            edits.replace(inner_open + 1..inner_open + 1, Cow::Borrowed(member));
        }
        StreamOptions::Object { include_usage: Loose::Bool(false) | Loose::Null } => {
            let outer = member_value(body, open, "stream_options").ok_or(SCAN_FAILED)?;
            let span = member_value(body, outer.start, "include_usage").ok_or(SCAN_FAILED)?;
            edits.replace(span, Cow::Borrowed(b"true"));
        }
        StreamOptions::Object { .. } => return Err(wrong_include_usage),
        StreamOptions::Duplicate => return Err(RequestError::DuplicateField { field: "stream_options.include_usage" }),
        StreamOptions::Other => {
            return Err(RequestError::InvalidStreamOptions { field: "stream_options", expected: "an object" })
        }
    }
    Ok(false)
}

fn non_negative(value: &Loose, field: &'static str) -> Result<Option<u64>, RequestError> {
    match value {
        Loose::Absent | Loose::Null => Ok(None),
        Loose::UInt(n) => Ok(Some(*n)),
        _ => Err(RequestError::InvalidMaxTokens { field }),
    }
}

fn json_string(s: &str) -> Cow<'static, [u8]> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes()),
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out.push(b'"');
    Cow::Owned(out)
}

/// The scanner runs only on bodies serde_json has just accepted, so it cannot fail; if it ever did, refusing
/// the request beats sending a body we could not edit.
const SCAN_FAILED: RequestError = RequestError::InvalidJson { line: 0, column: 0 };

// ---- byte edits ---------------------------------------------------------------------------------------

/// Splices into the body; members added to the top-level object go right after its `{`.
struct Edits {
    open: usize,
    inserted: Vec<u8>,
    replaced: Vec<(Range<usize>, Cow<'static, [u8]>)>,
}

impl Edits {
    fn new(open: usize) -> Self {
        Self { open, inserted: Vec::new(), replaced: Vec::new() }
    }

    fn insert_member(&mut self, key: &[u8], value: Cow<'static, [u8]>) {
        self.inserted.extend_from_slice(key);
        self.inserted.extend_from_slice(&value);
        self.inserted.push(b',');
    }

    fn replace(&mut self, span: Range<usize>, with: Cow<'static, [u8]>) {
        self.replaced.push((span, with));
    }

    fn apply(mut self, body: Bytes) -> Bytes {
        if self.inserted.is_empty() && self.replaced.is_empty() {
            return body;
        }
        if !self.inserted.is_empty() {
            if body.get(skip_ws(&body, self.open + 1)) == Some(&b'}') {
                self.inserted.pop();
            }
            let at = self.open + 1;
            self.replaced.push((at..at, Cow::Owned(std::mem::take(&mut self.inserted))));
        }
        self.replaced.sort_by_key(|(span, _)| (span.start, span.end));
        let added: usize = self.replaced.iter().map(|(_, with)| with.len()).sum();
        let mut out = Vec::with_capacity(body.len() + added);
        let mut copied = 0;
        for (span, with) in &self.replaced {
            out.extend_from_slice(&body[copied..span.start]);
            out.extend_from_slice(with);
            copied = span.end;
        }
        out.extend_from_slice(&body[copied..]);
        Bytes::from(out)
    }
}

// ---- scanning valid JSON ------------------------------------------------------------------------------

fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while json.get(i).is_some_and(|b| is_json_ws(*b)) {
        i += 1;
    }
    i
}

/// The span of `key`'s value in the object whose `{` is at `open`. Duplicate keys were refused earlier.
fn member_value(json: &[u8], open: usize, key: &str) -> Option<Range<usize>> {
    let mut i = skip_ws(json, open + 1);
    if json.get(i) == Some(&b'}') {
        return None;
    }
    loop {
        let key_end = skip_string(json, i)?;
        let raw = json.get(i + 1..key_end - 1)?;
        let is_key = if memchr(b'\\', raw).is_none() {
            raw == key.as_bytes()
        } else {
            serde_json::from_slice::<Cow<'_, str>>(&json[i..key_end]).is_ok_and(|k| k == key)
        };
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        let value = skip_ws(json, i + 1);
        let value_end = skip_value(json, value)?;
        if is_key {
            return Some(value..value_end);
        }
        i = skip_ws(json, value_end);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            _ => return None,
        }
    }
}

/// Past the string starting at `i`.
fn skip_string(json: &[u8], i: usize) -> Option<usize> {
    if json.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        let k = j + memchr2(b'"', b'\\', json.get(j..)?)?;
        if json[k] == b'\\' {
            j = k + 2;
        } else {
            return Some(k + 1);
        }
    }
}

/// Past the value starting at `i`.
fn skip_value(json: &[u8], i: usize) -> Option<usize> {
    match json.get(i)? {
        b'"' => skip_string(json, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match json.get(j)? {
                    b'"' => {
                        j = skip_string(json, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let len = json[i..].iter().position(|b| matches!(b, b',' | b'}' | b']') || is_json_ws(*b));
            Some(i + len.unwrap_or(json.len() - i))
        }
    }
}

// ---- the borrowed peek --------------------------------------------------------------------------------

/// The fields the gateway reads; every other field is skipped (`IgnoredAny`) while the whole document is
/// still validated. Wrong types are recorded, not raised, so errors can name the field without serde's
/// messages, which quote values.
#[derive(Default)]
struct Peek<'a> {
    model: Loose<'a>,
    stream: Loose<'a>,
    stream_options: StreamOptions,
    max_tokens: Loose<'a>,
    max_completion_tokens: Loose<'a>,
    n: Loose<'a>,
    duplicate: Option<&'static str>,
}

const PEEK_FIELDS: &[&str] = &["model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n"];

impl<'de> Deserialize<'de> for Peek<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PeekVisitor)
    }
}

struct PeekVisitor;

impl<'de> Visitor<'de> for PeekVisitor {
    type Value = Peek<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Peek<'de>, A::Error> {
        let mut peek = Peek::default();
        let mut seen = [false; PEEK_FIELDS.len()];
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let Some(index) = PEEK_FIELDS.iter().position(|f| *f == key.0) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if std::mem::replace(&mut seen[index], true) {
                peek.duplicate = peek.duplicate.or(Some(PEEK_FIELDS[index]));
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match index {
                0 => peek.model = map.next_value()?,
                1 => peek.stream = map.next_value()?,
                2 => peek.stream_options = map.next_value()?,
                3 => peek.max_tokens = map.next_value()?,
                4 => peek.max_completion_tokens = map.next_value()?,
                _ => peek.n = map.next_value()?,
            }
        }
        Ok(peek)
    }
}

/// An object key, borrowed unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(v.to_owned())))
    }
}

/// A field's value, kept only as far as its type; composite values are skipped.
#[derive(Debug, Default, PartialEq)]
enum Loose<'a> {
    #[default]
    Absent,
    Null,
    Bool(bool),
    UInt(u64),
    Str(Cow<'a, str>),
    /// A negative or fractional number, an array or an object.
    Other,
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Loose<'de>, E> {
        Ok(Loose::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Loose<'de>, E> {
        Ok(Loose::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Loose<'de>, E> {
        Ok(Loose::UInt(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Loose<'de>, E> {
        Ok(u64::try_from(v).map_or(Loose::Other, Loose::UInt))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Loose<'de>, E> {
        Ok(Loose::Other)
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Loose<'de>, E> {
        Ok(Loose::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Loose<'de>, E> {
        Ok(Loose::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }
}

#[derive(Debug, Default, PartialEq)]
enum StreamOptions {
    #[default]
    Absent,
    Null,
    Object {
        include_usage: Loose<'static>,
    },
    /// `include_usage` given twice.
    Duplicate,
    Other,
}

impl<'de> Deserialize<'de> for StreamOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StreamOptionsVisitor)
    }
}

struct StreamOptionsVisitor;

impl<'de> Visitor<'de> for StreamOptionsVisitor {
    type Value = StreamOptions;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StreamOptions, A::Error> {
        let mut include_usage = Loose::Absent;
        let mut duplicate = false;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if key.0 != "include_usage" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value = match map.next_value::<Loose<'de>>()? {
                // Only the type matters here; dropping the text keeps the result free of the body's lifetime.
                Loose::Str(_) => Loose::Other,
                Loose::Absent => Loose::Absent,
                Loose::Null => Loose::Null,
                Loose::Bool(b) => Loose::Bool(b),
                Loose::UInt(n) => Loose::UInt(n),
                Loose::Other => Loose::Other,
            };
            duplicate |= include_usage != Loose::Absent;
            include_usage = value;
        }
        Ok(if duplicate { StreamOptions::Duplicate } else { StreamOptions::Object { include_usage } })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StreamOptions, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(StreamOptions::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn chat(body: &str) -> Result<InspectedRequest, RequestError> {
        inspect(Endpoint::ChatCompletions, Bytes::copy_from_slice(body.as_bytes()), None)
    }

    fn parsed(r: &InspectedRequest) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    const SPLICE: &str = r#""stream_options":{"include_usage":true},"#;

    #[test]
    fn unchanged_body_is_the_same_allocation() {
        for (endpoint, body) in [
            (Endpoint::ChatCompletions, r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#),
            (Endpoint::ChatCompletions, r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#),
            (Endpoint::ChatCompletions, r#"{"model":"gpt-4o","stream":false,"stream_options":null}"#),
            (Endpoint::Embeddings, r#"{"model":"text-embedding-3-small","input":"x","stream":true}"#),
        ] {
            let bytes = Bytes::copy_from_slice(body.as_bytes());
            let r = inspect(endpoint, bytes.clone(), None).unwrap();
            assert_eq!((r.body.as_ptr(), r.body.len()), (bytes.as_ptr(), bytes.len()), "{body}");
        }
    }

    #[test]
    fn reads_model_stream_and_max_tokens() {
        let r = chat(r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":50}"#)
            .unwrap();
        assert_eq!((r.model.as_str(), r.stream, r.client_wants_usage, r.max_tokens), ("gpt-4o", true, true, Some(50)));
        let r = chat(r#"{"model":"m","max_tokens":50,"max_completion_tokens":70,"stream":null}"#).unwrap();
        assert_eq!((r.stream, r.client_wants_usage, r.max_tokens), (false, false, Some(70)));
        let r = chat(r#"{"model":"m","max_tokens":null}"#).unwrap();
        assert_eq!(r.max_tokens, None);
        let r = chat(r#"{"model":"m\u00e9\"x"}"#).unwrap();
        assert_eq!(r.model, "m\u{e9}\"x");
    }

    /// What bounds the cost of a request: a provider may honour either limit, `n` multiplies the completion,
    /// and media parts are not bounded by their bytes.
    #[test]
    fn reads_what_bounds_the_cost() {
        let r = chat(r#"{"model":"m","max_completion_tokens":1,"max_tokens":100000}"#).unwrap();
        assert_eq!(r.max_tokens, Some(100_000));
        let r = chat(r#"{"model":"m","n":3}"#).unwrap();
        assert_eq!((r.choices, r.max_tokens), (3, None));
        assert_eq!(chat(r#"{"model":"m"}"#).unwrap().choices, 1);
        for bad in [r#"{"model":"m","n":0}"#, r#"{"model":"m","n":129}"#, r#"{"model":"m","n":"2"}"#] {
            assert_eq!(chat(bad).unwrap_err(), RequestError::InvalidChoices, "{bad}");
        }
        let body = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}},
            {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}},{"type":"text","text":"hi"}]}]}"#;
        // Each part names its type and its key: counted twice, an upper bound that stays safe.
        assert_eq!(chat(body).unwrap().media_parts, 4);
        let long = format!(r#"{{"model":"{}"}}"#, "x".repeat(MAX_MODEL_CHARS + 1));
        assert_eq!(chat(&long).unwrap_err(), RequestError::ModelTooLong);
        assert!(chat(&format!(r#"{{"model":"{}"}}"#, "x".repeat(MAX_MODEL_CHARS))).is_ok());
    }

    #[test]
    fn stream_without_options_gets_include_usage_spliced_in() {
        let cases = [
            r#"{"model":"gpt-4o","stream":true}"#,
            "  \r\n\t{\"model\":\"gpt-4o\",\"stream\":true}\n",
            r#"{ "messages": [{"role":"user","content":"h\u00e9llo \"w\" ✓ 你好"}], "model": "gpt-4o", "stream": true,
                "tools": [{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{}}}}],
                "temperature": 0.7000000000000001, "seed": 12345678901234567890, "logit_bias": {"50256": -100} }"#,
        ];
        for body in cases {
            let r = chat(body).unwrap();
            let open = body.find('{').unwrap() + 1;
            let expected = format!("{}{SPLICE}{}", &body[..open], &body[open..]);
            assert_eq!(std::str::from_utf8(&r.body).unwrap(), expected, "all else byte for byte");
            let v = parsed(&r);
            assert_eq!(v["stream_options"], json!({"include_usage": true}));
            let mut original: Value = serde_json::from_str(body).unwrap();
            original["stream_options"] = json!({"include_usage": true});
            assert_eq!(v, original);
            assert!(r.stream && !r.client_wants_usage);
        }
    }

    #[test]
    fn stream_options_without_include_usage_true_are_fixed_in_place() {
        let cases = [
            (
                r#"{"model":"m","stream":true,"stream_options":null}"#,
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{ }}"#,
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true }}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"x":[1,{"y":"}"}]}}"#,
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"x":[1,{"y":"}"}]}}"#,
            ),
            (
                r#"{"stream_options" : { "x":1, "include_usage" : false }, "model":"m","stream":true}"#,
                r#"{"stream_options" : { "x":1, "include_usage" : true }, "model":"m","stream":true}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":null}}"#,
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
        ];
        for (body, expected) in cases {
            let r = chat(body).unwrap();
            assert_eq!(std::str::from_utf8(&r.body).unwrap(), expected);
            assert!(!r.client_wants_usage);
        }
    }

    #[test]
    fn embeddings_never_get_stream_options() {
        let body = r#"{"model":"text-embedding-3-small","input":["a"],"stream":true,"max_tokens":"x"}"#;
        let r = inspect(Endpoint::Embeddings, Bytes::copy_from_slice(body.as_bytes()), None).unwrap();
        assert_eq!((r.stream, r.client_wants_usage, r.max_tokens), (false, false, None));
        assert_eq!(&r.body[..], body.as_bytes());
    }

    #[test]
    fn path_model_wins() {
        let path = |body: &str| {
            inspect(Endpoint::ChatCompletions, Bytes::copy_from_slice(body.as_bytes()), Some("meta/llama \"3\""))
                .unwrap()
        };
        let same = r#"{"model":"meta/llama \"3\"","messages":[]}"#;
        let bytes = Bytes::copy_from_slice(same.as_bytes());
        let r = inspect(Endpoint::ChatCompletions, bytes.clone(), Some("meta/llama \"3\"")).unwrap();
        assert_eq!(r.body.as_ptr(), bytes.as_ptr());

        let r = path(r#"{"messages":[],"model":"gpt-4o-mini","n":1}"#);
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), r#"{"messages":[],"model":"meta/llama \"3\"","n":1}"#);
        assert_eq!(r.model, "meta/llama \"3\"");

        let r = path(r#"{"messages":[]}"#);
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), r#"{"model":"meta/llama \"3\"","messages":[]}"#);

        let r = path(r#" { } "#);
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), r#" {"model":"meta/llama \"3\"" } "#);

        let r = path(r#"{"stream":true,"model":null}"#);
        assert_eq!(
            std::str::from_utf8(&r.body).unwrap(),
            r#"{"stream_options":{"include_usage":true},"stream":true,"model":"meta/llama \"3\""}"#
        );

        let r = path(r#"{"stream":true}"#);
        let v = parsed(&r);
        assert_eq!(v, json!({"model": "meta/llama \"3\"", "stream": true, "stream_options": {"include_usage": true}}));

        let r = path(r#"{"model":{"nested":"x"},"mod\u0065l2":1}"#);
        assert_eq!(parsed(&r), json!({"model": "meta/llama \"3\"", "model2": 1}));

        let r = path(r#"{"mod\u0065l":"other"}"#);
        assert_eq!(parsed(&r), json!({"model": "meta/llama \"3\""}));

        let err = inspect(Endpoint::Embeddings, Bytes::from_static(b"{}"), Some("")).unwrap_err();
        assert_eq!(err, RequestError::EmptyModel);
    }

    #[test]
    fn each_error_has_its_variant_and_never_echoes_the_body() {
        let secret = "sk-SECRET-do-not-echo";
        let cases = [
            ("   ".to_string(), RequestError::EmptyBody),
            (format!("{{\"model\":\"{secret}\""), RequestError::InvalidJson { line: 1, column: 32 }),
            (format!("{{\"model\":\"{secret}\"}} trailing"), RequestError::InvalidJson { line: 1, column: 35 }),
            (format!("[\"{secret}\"]"), RequestError::NotAnObject),
            (format!("\"{secret}\""), RequestError::NotAnObject),
            (format!("{{\"model\":\"a\",\"model\":\"{secret}\"}}"), RequestError::DuplicateField { field: "model" }),
            (format!("{{\"messages\":\"{secret}\"}}"), RequestError::MissingModel),
            ("{\"model\":null}".to_string(), RequestError::MissingModel),
            ("{\"model\":\"\"}".to_string(), RequestError::EmptyModel),
            ("{\"model\":[\"gpt-4o\"]}".to_string(), RequestError::InvalidModel),
            (format!("{{\"model\":\"m\",\"stream\":\"{secret}\"}}"), RequestError::InvalidStream),
            (
                format!("{{\"model\":\"m\",\"stream\":true,\"stream_options\":\"{secret}\"}}"),
                RequestError::InvalidStreamOptions { field: "stream_options", expected: "an object" },
            ),
            (
                format!("{{\"model\":\"m\",\"stream\":true,\"stream_options\":{{\"include_usage\":\"{secret}\"}}}}"),
                RequestError::InvalidStreamOptions { field: "stream_options.include_usage", expected: "a boolean" },
            ),
            (
                "{\"model\":\"m\",\"stream\":true,\"stream_options\":{\"include_usage\":true,\"include_usage\":false}}"
                    .to_string(),
                RequestError::DuplicateField { field: "stream_options.include_usage" },
            ),
            (
                format!("{{\"model\":\"m\",\"max_tokens\":\"{secret}\"}}"),
                RequestError::InvalidMaxTokens { field: "max_tokens" },
            ),
            (
                "{\"model\":\"m\",\"max_completion_tokens\":-1}".to_string(),
                RequestError::InvalidMaxTokens { field: "max_completion_tokens" },
            ),
            (
                "{\"model\":\"m\",\"max_tokens\":1.5}".to_string(),
                RequestError::InvalidMaxTokens { field: "max_tokens" },
            ),
        ];
        for (body, expected) in cases {
            let err = chat(&body).unwrap_err();
            assert_eq!(err, expected, "{body}");
            let message = err.to_string();
            assert!(!message.contains("SECRET"), "{message}");
            assert!(!err.code().is_empty());
        }
        assert_eq!(RequestError::MissingModel.code(), "missing_required_parameter");
        assert_eq!(RequestError::InvalidStream.code(), "invalid_type");
    }

    #[test]
    fn five_megabyte_body() {
        let content = "lorem ipsum \\\"dolor\\\" sit amet, ".repeat(5 * 1024 * 1024 / 32);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"{content}"}}],"model":"gpt-4o","stream":true,"max_tokens":9}}"#
        );
        assert!(body.len() > 5 * 1024 * 1024);
        let r = chat(&body).unwrap();
        assert_eq!(r.body.len(), body.len() + SPLICE.len());
        assert_eq!(&r.body[SPLICE.len() + 1..], &body.as_bytes()[1..]);
        assert_eq!(parsed(&r)["stream_options"]["include_usage"], true);
        assert_eq!(r.max_tokens, Some(9));

        let r = inspect(Endpoint::ChatCompletions, Bytes::from(body.clone()), Some("other")).unwrap();
        assert_eq!(r.body.len(), body.len() + SPLICE.len() - "gpt-4o".len() + "other".len());
        assert_eq!(parsed(&r)["model"], "other");
    }

    #[test]
    fn scanner_finds_values_in_tricky_objects() {
        let json = br#"{ "a\"b" : "x,}\"\\" , "n":-1.5e3,"arr":[{"]":"["}],"t":true, "model" : "m" }"#;
        let span = member_value(json, 0, "model").unwrap();
        assert_eq!(&json[span], b"\"m\"");
        let span = member_value(json, 0, "n").unwrap();
        assert_eq!(&json[span], b"-1.5e3");
        let span = member_value(json, 0, "arr").unwrap();
        assert_eq!(&json[span], br#"[{"]":"["}]"#);
        assert_eq!(member_value(json, 0, "missing"), None);
        assert_eq!(member_value(b"{}", 0, "a"), None);
    }
}
