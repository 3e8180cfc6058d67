//! Metering of upstream responses while they pass through: the usage the upstream reports and the text
//! the buyer received (for local counting when no usage is reported).
//!
//! Event JSON is walked with `DeserializeSeed`s that append text straight into the meter's buffer: no
//! `serde_json::Value`, no per-event allocation, and fields of an unexpected shape are skipped, because
//! upstreams vary and metering must never fail a response.

use std::fmt;

use bytes::{Bytes, BytesMut};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::sse::SseParser;

/// Strip mode holds back at most this many bytes of an incomplete block.
pub const MAX_HELD: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Meters an SSE chat-completions stream while passing it through.
///
/// Pass-through mode returns every chunk as it came. Strip mode forwards only complete blocks (up to and
/// including a blank line), holds back the incomplete tail of a chunk until a later chunk completes it, and
/// drops usage-only events; keep-alive comments are forwarded as soon as their blank line arrives. A block
/// that grows past [`MAX_HELD`] is forwarded as it arrives instead (a usage-only event is far smaller), so
/// memory and latency stay bounded whatever the upstream sends.
pub struct StreamMeter {
    parser: SseParser,
    strip: bool,
    /// Strip mode: bytes of the block still incomplete at the end of the last chunk.
    held: Vec<u8>,
    max_held: usize,
    /// Strip mode: the head of the incomplete block was too long to hold and has been forwarded.
    head_forwarded: bool,
    /// Strip mode: the last block ended in a chunk-final CR, so an LF opening the next chunk belongs to it;
    /// whether that block was forwarded.
    ended_in_cr: Option<bool>,
    tally: Tally,
}

struct Tally {
    text: TextSink,
    usage: Option<Usage>,
    saw_done: bool,
    events_forwarded: u64,
}

impl StreamMeter {
    /// strip_usage_only_events: the gateway added include_usage itself, so the buyer must not see the extra
    /// usage-only event (choices == [] and usage non-null). text_limit: cap on the bytes of delivered text
    /// kept for local token counting.
    pub fn new(strip_usage_only_events: bool, text_limit: usize) -> Self {
        Self {
            parser: SseParser::new(),
            strip: strip_usage_only_events,
            held: Vec::new(),
            max_held: MAX_HELD,
            head_forwarded: false,
            ended_in_cr: None,
            tally: Tally { text: TextSink::new(text_limit), usage: None, saw_done: false, events_forwarded: 0 },
        }
    }

    /// Feed one upstream body chunk; returns the bytes to forward downstream now.
    pub fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        if chunk.is_empty() {
            return chunk;
        }
        if !self.strip {
            let mut feed = self.parser.feed(&chunk);
            while let Some(block) = feed.next_block() {
                if let Some(event) = block.event {
                    self.tally.observe(event.data, false);
                }
            }
            drop(feed);
            return chunk;
        }

        let mut start = 0;
        let mut out = Output::Nothing;
        if let Some(kept) = self.ended_in_cr.take() {
            if chunk[0] == b'\n' {
                if kept {
                    out.push(&chunk, 0, 1);
                }
                start = 1;
            }
        }
        let mut first_block = true;
        let mut feed = self.parser.feed(&chunk);
        while let Some(block) = feed.next_block() {
            let may_drop = !(first_block && self.head_forwarded);
            let keep = match block.event {
                Some(event) => self.tally.observe(event.data, may_drop),
                None => true,
            };
            if keep {
                if first_block && !self.held.is_empty() {
                    out.push_held(&chunk, &self.held, start, block.end);
                } else {
                    out.push(&chunk, start, block.end);
                }
            }
            if block.end == chunk.len() && chunk[block.end - 1] == b'\r' {
                self.ended_in_cr = Some(keep);
            }
            if first_block {
                self.held.clear();
                self.head_forwarded = false;
                first_block = false;
            }
            start = block.end;
        }
        drop(feed);

        if start < chunk.len() {
            if self.head_forwarded {
                out.push(&chunk, start, chunk.len());
            } else if self.held.len() + (chunk.len() - start) > self.max_held {
                if !self.held.is_empty() {
                    out.push_held(&chunk, &self.held, start, chunk.len());
                } else {
                    out.push(&chunk, start, chunk.len());
                }
                self.held.clear();
                self.head_forwarded = true;
            } else {
                self.held.extend_from_slice(&chunk[start..]);
            }
        }
        out.into_bytes(&chunk)
    }

    /// End of the upstream body: returns any held-back bytes (an unterminated trailing event) to forward as
    /// is. That event is metered like any other, and in strip mode dropped if it is usage-only.
    pub fn finish(&mut self) -> Bytes {
        let keep = match self.parser.finish() {
            Some(event) => self.tally.observe(event.data, self.strip && !self.head_forwarded),
            None => true,
        };
        self.ended_in_cr = None;
        self.head_forwarded = false;
        let held = std::mem::take(&mut self.held);
        if keep && !held.is_empty() {
            Bytes::from(held)
        } else {
            Bytes::new()
        }
    }

    /// Usage reported by the upstream (from any event with a non-null `usage` object; the last one wins).
    pub fn reported_usage(&self) -> Option<Usage> {
        self.tally.usage
    }

    /// Text delivered to the buyer so far: choices[].delta.content, delta.reasoning_content, and
    /// delta.tool_calls[].function.arguments, in order, capped at text_limit bytes.
    pub fn delivered_text(&self) -> &str {
        &self.tally.text.buf
    }

    /// Bytes of delivered text including any beyond text_limit, to scale a count of the capped text.
    pub fn delivered_text_bytes(&self) -> u64 {
        self.tally.text.total
    }

    pub fn saw_done(&self) -> bool {
        self.tally.saw_done
    }

    /// Number of data events forwarded (excluding [DONE]).
    pub fn events_forwarded(&self) -> u64 {
        self.tally.events_forwarded
    }
}

impl Tally {
    /// Meters one event; returns whether to forward it (false only for a usage-only event when `may_drop`).
    fn observe(&mut self, data: &[u8], may_drop: bool) -> bool {
        if data.trim_ascii() == b"[DONE]" {
            self.saw_done = true;
            return true;
        }
        let mark = self.text.mark();
        let mut de = serde_json::Deserializer::from_slice(data);
        let walked = Walker(Response { text: &mut self.text, choices: None, usage: None, path: Path::Delta })
            .deserialize(&mut de)
            .and_then(|summary| de.end().map(|()| (summary.choices, summary.usage)));
        match walked {
            Ok((choices, usage)) => {
                if usage.is_some() {
                    self.usage = usage;
                }
                if may_drop && choices == Some(0) && usage.is_some() {
                    return false;
                }
            }
            // Not JSON: forwarded untouched, but none of it counts.
            Err(_) => self.text.rollback(mark),
        }
        self.events_forwarded += 1;
        true
    }
}

/// Where the bytes to forward from one chunk are, built without copying while they are one run of it.
enum Output {
    Nothing,
    Run { start: usize, end: usize },
    Copied(BytesMut),
}

impl Output {
    fn push(&mut self, chunk: &[u8], start: usize, end: usize) {
        match self {
            Self::Nothing => *self = Self::Run { start, end },
            Self::Run { end: run_end, .. } if *run_end == start => *run_end = end,
            Self::Run { start: run_start, end: run_end } => {
                let mut copy = BytesMut::with_capacity(chunk.len());
                copy.extend_from_slice(&chunk[*run_start..*run_end]);
                copy.extend_from_slice(&chunk[start..end]);
                *self = Self::Copied(copy);
            }
            Self::Copied(copy) => copy.extend_from_slice(&chunk[start..end]),
        }
    }

    /// The first block of a chunk, whose head (`held`) arrived in earlier chunks.
    fn push_held(&mut self, chunk: &[u8], held: &[u8], start: usize, end: usize) {
        let mut copy = match std::mem::replace(self, Self::Nothing) {
            Self::Nothing => BytesMut::with_capacity(held.len() + end - start),
            Self::Run { start: run_start, end: run_end } => BytesMut::from(&chunk[run_start..run_end]),
            Self::Copied(copy) => copy,
        };
        copy.extend_from_slice(held);
        copy.extend_from_slice(&chunk[start..end]);
        *self = Self::Copied(copy);
    }

    fn into_bytes(self, chunk: &Bytes) -> Bytes {
        match self {
            Self::Nothing => Bytes::new(),
            Self::Run { start, end } => chunk.slice(start..end),
            Self::Copied(copy) => copy.freeze(),
        }
    }
}

/// Accumulates a non-streamed JSON response (bounded) and meters it at the end.
pub struct JsonMeter {
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct JsonOutcome {
    pub reported_usage: Option<Usage>,
    /// choices[].message.content, reasoning_content and tool_calls[].function.arguments, in order.
    pub text: String,
    /// The body exceeded the limit and was not parsed; `reported_usage` is None and `text` empty.
    pub overflowed: bool,
}

impl JsonMeter {
    pub fn new(limit: usize) -> Self {
        Self { buf: Vec::new(), limit, overflowed: false }
    }

    pub fn on_chunk(&mut self, chunk: &Bytes) {
        if self.overflowed {
            return;
        }
        if self.buf.len().saturating_add(chunk.len()) > self.limit {
            self.overflowed = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Parses what was accumulated. Usage missing `completion_tokens` (embeddings) counts it as 0. A body
    /// that is not valid JSON yields no usage, but the text read before the error is kept: it was delivered.
    pub fn finish(&mut self) -> JsonOutcome {
        let body = std::mem::take(&mut self.buf);
        if self.overflowed {
            return JsonOutcome { overflowed: true, ..JsonOutcome::default() };
        }
        let mut text = TextSink::new(usize::MAX);
        let mut de = serde_json::Deserializer::from_slice(&body);
        let walked = Walker(Response { text: &mut text, choices: None, usage: None, path: Path::Message })
            .deserialize(&mut de)
            .and_then(|summary| de.end().map(|()| summary.usage));
        JsonOutcome { reported_usage: walked.ok().flatten(), text: text.buf, overflowed: false }
    }
}

/// Text kept for counting, capped at a byte limit on a UTF-8 boundary.
struct TextSink {
    buf: String,
    limit: usize,
    /// All text bytes seen, including those past the cap.
    total: u64,
}

impl TextSink {
    fn new(limit: usize) -> Self {
        Self { buf: String::new(), limit, total: 0 }
    }

    fn push(&mut self, s: &str) {
        self.total += s.len() as u64;
        let room = self.limit.saturating_sub(self.buf.len());
        if s.len() <= room {
            self.buf.push_str(s);
            return;
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.buf.push_str(&s[..cut]);
    }

    /// Pushes the text of a JSON string's body as it appears in the JSON (already validated by the parser).
    fn push_escaped(&mut self, mut rest: &str) {
        while let Some(at) = rest.find('\\') {
            self.push(&rest[..at]);
            let escape = &rest[at + 1..];
            let (c, used) = match escape.as_bytes().first() {
                Some(b'n') => ('\n', 1),
                Some(b't') => ('\t', 1),
                Some(b'r') => ('\r', 1),
                Some(b'b') => ('\u{8}', 1),
                Some(b'f') => ('\u{c}', 1),
                Some(b'u') => unicode_escape(escape),
                Some(&other) if other.is_ascii() => (char::from(other), 1),
                _ => (char::REPLACEMENT_CHARACTER, 0),
            };
            self.push(c.encode_utf8(&mut [0; 4]));
            rest = &escape[used..];
        }
        self.push(rest);
    }

    fn mark(&self) -> (usize, u64) {
        (self.buf.len(), self.total)
    }

    fn rollback(&mut self, (len, total): (usize, u64)) {
        self.buf.truncate(len);
        self.total = total;
    }
}

// ---- JSON walking -------------------------------------------------------------------------------------

/// The character of a `\uXXXX` escape (`escape` starts at the `u`), joining a surrogate pair, and the bytes
/// it used. A lone surrogate reads as U+FFFD, as a lossy UTF-8 conversion would.
fn unicode_escape(escape: &str) -> (char, usize) {
    let unit = |s: &str| s.get(1..5).and_then(|hex| u16::from_str_radix(hex, 16).ok());
    let Some(first) = unit(escape) else {
        return (char::REPLACEMENT_CHARACTER, 1);
    };
    let low = escape.get(5..).filter(|s| s.starts_with("\\u")).and_then(|s| unit(&s[1..]));
    match (first, low) {
        (0xD800..=0xDBFF, Some(low @ 0xDC00..=0xDFFF)) => {
            let code = 0x10000 + ((u32::from(first) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
            (char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER), 11)
        }
        _ => (char::from_u32(u32::from(first)).unwrap_or(char::REPLACEMENT_CHARACTER), 5),
    }
}

/// A walk over one JSON value that keeps only what it wants. Values of another shape than expected are
/// skipped, not errors.
trait Walk<'de>: Sized {
    /// The object keys this walk handles in `field`; others are skipped.
    const FIELDS: &'static [&'static str] = &[];

    fn field<A: MapAccess<'de>>(&mut self, _index: usize, map: &mut A) -> Result<(), A::Error> {
        map.next_value::<IgnoredAny>().map(drop)
    }

    /// Consumes one array element; false once the array is exhausted.
    fn element<A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
        Ok(seq.next_element::<IgnoredAny>()?.is_some())
    }

    fn string(&mut self, _value: &str) {}

    fn array_start(&mut self) {}
}

struct Walker<W>(W);

impl<'de, W: Walk<'de>> DeserializeSeed<'de> for Walker<W> {
    type Value = W;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<W, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, W: Walk<'de>> Visitor<'de> for Walker<W> {
    type Value = W;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<W, A::Error> {
        while let Some(key) = map.next_key_seed(FieldIndex(W::FIELDS))? {
            match key {
                Some(index) => self.0.field(index, &mut map)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(self.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<W, A::Error> {
        self.0.array_start();
        while self.0.element(&mut seq)? {}
        Ok(self.0)
    }

    fn visit_str<E>(mut self, value: &str) -> Result<W, E> {
        self.0.string(value);
        Ok(self.0)
    }

    fn visit_bool<E>(self, _: bool) -> Result<W, E> {
        Ok(self.0)
    }

    fn visit_i64<E>(self, _: i64) -> Result<W, E> {
        Ok(self.0)
    }

    fn visit_u64<E>(self, _: u64) -> Result<W, E> {
        Ok(self.0)
    }

    fn visit_f64<E>(self, _: f64) -> Result<W, E> {
        Ok(self.0)
    }

    fn visit_unit<E>(self) -> Result<W, E> {
        Ok(self.0)
    }
}

/// Maps an object key to its index in a list of names without allocating, escaped keys included.
struct FieldIndex(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for FieldIndex {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<usize>, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl Visitor<'_> for FieldIndex {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, value: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == value))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Stream chunks: choices[].delta.
    Delta,
    /// Whole responses: choices[].message.
    Message,
}

/// A chat completion (chunk) or embeddings response.
struct Response<'t> {
    text: &'t mut TextSink,
    /// Number of choices when `choices` is an array.
    choices: Option<usize>,
    /// Set for a non-null `usage` object.
    usage: Option<Usage>,
    path: Path,
}

#[derive(Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl<'de> Walk<'de> for Response<'_> {
    const FIELDS: &'static [&'static str] = &["choices", "usage"];

    fn field<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        if index == 0 {
            let choices = map.next_value_seed(Walker(Choices { text: self.text, path: self.path, count: None }))?;
            self.choices = choices.count;
        } else {
            self.usage = map.next_value::<Option<UsageFields>>()?.map(|u| Usage {
                prompt_tokens: u.prompt_tokens.unwrap_or(0),
                completion_tokens: u.completion_tokens.unwrap_or(0),
            });
        }
        Ok(())
    }
}

struct Choices<'t> {
    text: &'t mut TextSink,
    path: Path,
    count: Option<usize>,
}

impl<'de> Walk<'de> for Choices<'_> {
    fn array_start(&mut self) {
        self.count = Some(0);
    }

    fn element<A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
        let more = seq.next_element_seed(Walker(Choice { text: self.text, path: self.path }))?.is_some();
        if more {
            self.count = self.count.map(|n| n + 1);
        }
        Ok(more)
    }
}

struct Choice<'t> {
    text: &'t mut TextSink,
    path: Path,
}

impl<'de> Walk<'de> for Choice<'_> {
    const FIELDS: &'static [&'static str] = &["delta", "message"];

    fn field<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        let wanted = match self.path {
            Path::Delta => 0,
            Path::Message => 1,
        };
        if index == wanted {
            map.next_value_seed(Walker(Message { text: self.text }))?;
        } else {
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// A `delta` or `message` object.
struct Message<'t> {
    text: &'t mut TextSink,
}

impl<'de> Walk<'de> for Message<'_> {
    const FIELDS: &'static [&'static str] = &["content", "reasoning_content", "tool_calls"];

    fn field<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        if index == 2 {
            map.next_value_seed(Walker(ToolCalls { text: self.text }))?;
        } else {
            map.next_value_seed(Text { text: self.text, parts: true })?;
        }
        Ok(())
    }
}

/// A string, or an array of `{"text": ..}` parts as some upstreams send; anything else adds nothing.
struct Content<'t> {
    text: &'t mut TextSink,
}

impl<'de> Walk<'de> for Content<'_> {
    const FIELDS: &'static [&'static str] = &["text"];

    fn field<A: MapAccess<'de>>(&mut self, _index: usize, map: &mut A) -> Result<(), A::Error> {
        map.next_value_seed(Text { text: self.text, parts: true })
    }

    fn element<A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
        Ok(seq.next_element_seed(Text { text: self.text, parts: true })?.is_some())
    }

    fn string(&mut self, value: &str) {
        self.text.push(value);
    }
}

struct ToolCalls<'t> {
    text: &'t mut TextSink,
}

impl<'de> Walk<'de> for ToolCalls<'_> {
    fn element<A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
        Ok(seq.next_element_seed(Walker(ToolCall { text: self.text }))?.is_some())
    }
}

/// One tool call (`function` object) or its `function` object (`arguments` string).
struct ToolCall<'t> {
    text: &'t mut TextSink,
}

impl<'de> Walk<'de> for ToolCall<'_> {
    const FIELDS: &'static [&'static str] = &["function", "arguments"];

    fn field<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        if index == 0 {
            map.next_value_seed(Walker(ToolCall { text: self.text }))?;
        } else {
            map.next_value_seed(Text { text: self.text, parts: false })?;
        }
        Ok(())
    }
}

/// A text value: a string goes into the sink, unescaped here from the raw JSON; with `parts`, an array or
/// object is walked as [`Content`]; anything else adds nothing. serde_json would unescape a string with
/// escapes (a newline, a quote: most real text) into a scratch buffer that each deserializer allocates
/// afresh, which for a stream means allocations for every event.
struct Text<'t> {
    text: &'t mut TextSink,
    parts: bool,
}

impl<'de> DeserializeSeed<'de> for Text<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let raw = <&'de RawValue>::deserialize(deserializer)?.get();
        if let Some(escaped) = raw.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            self.text.push_escaped(escaped);
        } else if self.parts && (raw.starts_with('[') || raw.starts_with('{')) {
            let mut de = serde_json::Deserializer::from_str(raw);
            Walker(Content { text: self.text }).deserialize(&mut de).map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::sse::tests::OPENAI_STREAM;

    const USAGE_EVENT: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",",
        "\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n",
    );
    const EXPECTED_TEXT: &str = "Hello, w\u{f6}rld \u{2713}\n\"q\"";
    const USAGE: Usage = Usage { prompt_tokens: 12, completion_tokens: 5 };

    fn run(meter: &mut StreamMeter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&meter.on_chunk(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&meter.finish());
        out
    }

    fn assert_metered(meter: &StreamMeter) {
        assert_eq!(meter.reported_usage(), Some(USAGE));
        assert_eq!(meter.delivered_text(), EXPECTED_TEXT);
        assert!(meter.saw_done());
    }

    #[test]
    fn escaped_text_is_unescaped_like_serde_json_does_and_lone_surrogates_are_replaced() {
        let raw = r#"a\"b\\c\/d\u00e9\ud83d\ude00\n\t\r\b\f"#;
        let mut sink = TextSink::new(usize::MAX);
        sink.push_escaped(raw);
        let expected: String = serde_json::from_str(&format!("\"{raw}\"")).unwrap();
        assert_eq!(sink.buf, expected);
        let mut sink = TextSink::new(usize::MAX);
        sink.push_escaped(r#"x\ud800y\udc00z\ud800\u0041"#);
        assert_eq!(sink.buf, "x\u{fffd}y\u{fffd}z\u{fffd}A");
        assert_eq!(sink.total, sink.buf.len() as u64);
    }

    #[test]
    fn strip_mode_removes_exactly_the_usage_event_at_every_split_point() {
        for stream in
            [OPENAI_STREAM.to_string(), OPENAI_STREAM.replace('\n', "\r\n"), OPENAI_STREAM.replace('\n', "\r")]
        {
            let eol = if stream.contains("\r\n") {
                "\r\n"
            } else if stream.contains('\r') {
                "\r"
            } else {
                "\n"
            };
            let usage_event = USAGE_EVENT.replace('\n', eol);
            let expected = stream.replace(&usage_event, "");
            assert_eq!(expected.len(), stream.len() - usage_event.len());
            let s = stream.as_bytes();
            for i in 0..=s.len() {
                let mut meter = StreamMeter::new(true, 1 << 20);
                let out = run(&mut meter, &[&s[..i], &s[i..]]);
                assert_eq!(String::from_utf8(out).unwrap(), expected, "split at {i}");
                assert_metered(&meter);
                assert_eq!(meter.events_forwarded(), 4, "split at {i}");
            }
            let mut meter = StreamMeter::new(true, 1 << 20);
            let bytes: Vec<&[u8]> = s.chunks(1).collect();
            assert_eq!(String::from_utf8(run(&mut meter, &bytes)).unwrap(), expected);
            assert_metered(&meter);
        }
    }

    #[test]
    fn strip_mode_drops_the_lf_of_a_crlf_split_after_a_dropped_event() {
        let stream = OPENAI_STREAM.replace('\n', "\r\n");
        let usage_event = USAGE_EVENT.replace('\n', "\r\n");
        let split = stream.find(&usage_event).unwrap() + usage_event.len() - 1;
        assert_eq!(&stream[split - 1..=split], "\r\n");
        let mut meter = StreamMeter::new(true, 1 << 20);
        let first = meter.on_chunk(Bytes::copy_from_slice(&stream.as_bytes()[..split]));
        let second = meter.on_chunk(Bytes::copy_from_slice(&stream.as_bytes()[split..]));
        assert_eq!(&second[..], b"data: [DONE]\r\n\r\n");
        assert_eq!([first, second].concat(), stream.replace(&usage_event, "").as_bytes());
    }

    #[test]
    fn pass_through_returns_the_same_allocation_at_every_split_point() {
        let s = Bytes::from_static(OPENAI_STREAM.as_bytes());
        for i in 0..=s.len() {
            let mut meter = StreamMeter::new(false, 1 << 20);
            let mut out = Vec::new();
            for part in [s.slice(..i), s.slice(i..)] {
                let forwarded = meter.on_chunk(part.clone());
                assert_eq!((forwarded.as_ptr(), forwarded.len()), (part.as_ptr(), part.len()));
                out.extend_from_slice(&forwarded);
            }
            assert!(meter.finish().is_empty());
            assert_eq!(out, OPENAI_STREAM.as_bytes());
            assert_metered(&meter);
            assert_eq!(meter.events_forwarded(), 5, "the usage event is forwarded too");
        }
    }

    #[test]
    fn strip_mode_is_zero_copy_for_chunks_of_complete_events() {
        let mut meter = StreamMeter::new(true, 1 << 20);
        let chunk = Bytes::from_static(b": ping\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        let out = meter.on_chunk(chunk.clone());
        assert_eq!((out.as_ptr(), out.len()), (chunk.as_ptr(), chunk.len()));

        let chunk = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"cho");
        let out = meter.on_chunk(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr(), "complete events are a slice, the tail is held");
        assert_eq!(out.len(), chunk.len() - b"data: {\"cho".len());
        assert_eq!(meter.delivered_text(), "ab");
    }

    #[test]
    fn strip_mode_forwards_keep_alives_at_once() {
        let mut meter = StreamMeter::new(true, 1 << 20);
        assert_eq!(&meter.on_chunk(Bytes::from_static(b"data: {\"choi"))[..], b"");
        assert_eq!(
            &meter.on_chunk(Bytes::from_static(b"ces\":[]}\n\n: ping\n\n"))[..],
            b"data: {\"choices\":[]}\n\n: ping\n\n"
        );
    }

    #[test]
    fn an_overlong_block_is_forwarded_as_it_arrives() {
        let big = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n", "x".repeat(300));
        let usage_only = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5}}\n\n";
        let stream = format!("{big}{usage_only}{big}data: [DONE]\n\n");
        let expected = format!("{big}{big}data: [DONE]\n\n");
        for chunk_size in [1, 7, 40, 64, 1000] {
            let mut meter = StreamMeter::new(true, 1 << 20);
            meter.max_held = 100;
            let mut out = Vec::new();
            let mut most_held = 0;
            for piece in stream.as_bytes().chunks(chunk_size) {
                out.extend_from_slice(&meter.on_chunk(Bytes::copy_from_slice(piece)));
                most_held = most_held.max(meter.held.len());
            }
            out.extend_from_slice(&meter.finish());
            assert_eq!(String::from_utf8(out).unwrap(), expected, "chunks of {chunk_size}");
            assert!(most_held <= 100, "chunks of {chunk_size}");
            assert_eq!(meter.delivered_text(), "x".repeat(600));
            assert_eq!((meter.reported_usage(), meter.events_forwarded()), (Some(USAGE), 2));
        }

        // A usage-only event too long to hold can no longer be dropped; it is forwarded and counted as such.
        let mut meter = StreamMeter::new(true, 1 << 20);
        meter.max_held = 20;
        let out = run(&mut meter, &[&usage_only.as_bytes()[..30], &usage_only.as_bytes()[30..]]);
        assert_eq!(out, usage_only.as_bytes());
        assert_eq!((meter.reported_usage(), meter.events_forwarded()), (Some(USAGE), 1));
    }

    #[test]
    fn unterminated_trailing_event_comes_from_finish() {
        let tail = b"data: {\"choices\":[{\"delta\":{\"content\":\"z\"}}]}\n";
        let mut meter = StreamMeter::new(true, 1 << 20);
        let mut input = OPENAI_STREAM.as_bytes().to_vec();
        input.extend_from_slice(tail);
        let first = meter.on_chunk(Bytes::from(input));
        assert!(!first.ends_with(tail));
        assert_eq!(&meter.finish()[..], tail);
        assert!(meter.delivered_text().ends_with('z'));
        assert!(meter.finish().is_empty());
    }

    #[test]
    fn unterminated_usage_only_event_is_dropped_in_strip_mode() {
        let tail = USAGE_EVENT.trim_end();
        let mut meter = StreamMeter::new(true, 1 << 20);
        assert!(meter.on_chunk(Bytes::copy_from_slice(tail.as_bytes())).is_empty());
        assert!(meter.finish().is_empty());
        assert_eq!(meter.reported_usage(), Some(USAGE));
    }

    #[test]
    fn non_json_data_is_forwarded_and_ignored() {
        let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"counted\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"not\"}}]\n\n\
            data: <html>oops</html>\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":\"x\"}}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"twice\"}}]} {}\n\n";
        for strip in [false, true] {
            let mut meter = StreamMeter::new(strip, 1 << 20);
            let out = run(&mut meter, &[input]);
            assert_eq!(out, input);
            assert_eq!(meter.delivered_text(), "counted");
            assert_eq!(meter.reported_usage(), None);
            assert_eq!(meter.events_forwarded(), 5);
        }
    }

    #[test]
    fn reasoning_and_tool_call_arguments_are_delivered_text() {
        let input = concat!(
            "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"think \"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"type\":\"function\",",
            "\"function\":{\"name\":\"get\",\"arguments\":\"{\\\"a\\\":\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,",
            "\"function\":{\"arguments\":\"1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":null,\"role\":\"assistant\"}},",
            "{\"index\":1,\"delta\":{\"content\":[{\"type\":\"text\",\"text\":\"!\"}]}}]}\n\n",
        );
        let mut meter = StreamMeter::new(false, 1 << 20);
        run(&mut meter, &[input.as_bytes()]);
        assert_eq!(meter.delivered_text(), "think {\"a\":1}!");
        assert!(!meter.saw_done());
    }

    #[test]
    fn last_reported_usage_wins() {
        let input = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n\
            data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n\
            data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":3}}\n\n";
        let mut meter = StreamMeter::new(true, 1 << 20);
        let out = run(&mut meter, &[input]);
        assert!(out.starts_with(b"data: {\"choices\":[{"), "usage-only event dropped");
        assert_eq!(meter.reported_usage(), Some(Usage { prompt_tokens: 3, completion_tokens: 0 }));
    }

    #[test]
    fn text_is_capped_on_a_char_boundary() {
        let mut meter = StreamMeter::new(false, 4);
        run(&mut meter, &[b"data: {\"choices\":[{\"delta\":{\"content\":\"ab\xc3\xa9\xc3\xa9\"}}]}\n\n"]);
        assert_eq!(meter.delivered_text(), "ab\u{e9}");
        assert_eq!(meter.delivered_text_bytes(), 6);
    }

    #[test]
    fn steady_state_allocates_nothing_in_pass_through() {
        // Each chunk is complete events; the parser's buffers stay empty and the text grows only by content.
        let mut meter = StreamMeter::new(false, 1 << 20);
        let chunk = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n");
        for _ in 0..100 {
            meter.on_chunk(chunk.clone());
        }
        assert_eq!((meter.held.capacity(), meter.parser.buffer_capacity()), (0, 0));
    }

    #[test]
    fn json_meter_reads_usage_and_message_text() {
        let body = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",
            "content":"Hi \u00e9","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},
            "finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#;
        let mut meter = JsonMeter::new(1 << 20);
        let (a, b) = body.split_at(40);
        meter.on_chunk(&Bytes::copy_from_slice(a));
        meter.on_chunk(&Bytes::copy_from_slice(b));
        let outcome = meter.finish();
        assert_eq!(outcome.reported_usage, Some(Usage { prompt_tokens: 9, completion_tokens: 4 }));
        assert_eq!(outcome.text, "Hi \u{e9}{}");
        assert!(!outcome.overflowed);
    }

    #[test]
    fn json_meter_embeddings_usage_has_no_completion() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-2e-3]}],
            "model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let mut meter = JsonMeter::new(1 << 20);
        meter.on_chunk(&Bytes::from_static(body));
        let outcome = meter.finish();
        assert_eq!(outcome.reported_usage, Some(Usage { prompt_tokens: 8, completion_tokens: 0 }));
        assert_eq!(outcome.text, "");
    }

    #[test]
    fn json_meter_overflow_and_garbage() {
        let mut meter = JsonMeter::new(10);
        meter.on_chunk(&Bytes::from_static(b"{\"usage\":"));
        meter.on_chunk(&Bytes::from_static(b"{\"prompt_tokens\":1}}"));
        assert_eq!(meter.finish(), JsonOutcome { overflowed: true, ..JsonOutcome::default() });

        let mut meter = JsonMeter::new(100);
        meter.on_chunk(&Bytes::from_static(b"<html>502</html>"));
        assert_eq!(meter.finish(), JsonOutcome::default());

        let mut meter = JsonMeter::new(100);
        meter.on_chunk(&Bytes::from_static(b"{\"usage\":null,\"choices\":null}"));
        assert_eq!(meter.finish(), JsonOutcome::default());
    }

    mod random {
        use super::*;
        use crate::openai::sse::tests::random::{cut, pieces};
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Kind {
            Content(String),
            /// The JSON split over two data lines.
            SplitContent(String),
            UsageOnly(u64, u64),
            Comment(String),
            Garbage(String),
            Done,
        }

        fn kind() -> impl Strategy<Value = Kind> {
            prop_oneof![
                4 => "(?s).{0,8}".prop_map(Kind::Content),
                1 => "(?s).{0,8}".prop_map(Kind::SplitContent),
                1 => (0..1000u64, 0..1000u64).prop_map(|(p, c)| Kind::UsageOnly(p, c)),
                1 => "[^\r\n]{0,8}".prop_map(Kind::Comment),
                1 => "[^\r\n]{0,8}".prop_map(Kind::Garbage),
                1 => Just(Kind::Done),
            ]
        }

        fn render(kind: &Kind, eol: &str) -> String {
            let lines = match kind {
                Kind::Content(t) => {
                    let t = serde_json::to_string(t).unwrap();
                    vec![format!(
                        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{t}}}}}],\"usage\":null}}"
                    )]
                }
                Kind::SplitContent(t) => {
                    let t = serde_json::to_string(t).unwrap();
                    vec!["data: {\"choices\":[{\"delta\":".to_string(), format!("data: {{\"content\":{t}}}}}]}}")]
                }
                Kind::UsageOnly(p, c) => {
                    vec![format!(
                        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}"
                    )]
                }
                Kind::Comment(t) => vec![format!(":{t}")],
                Kind::Garbage(t) => vec![format!("data: <{t}")],
                Kind::Done => vec!["data: [DONE]".to_string()],
            };
            let mut out = String::new();
            for line in lines {
                out.push_str(&line);
                out.push_str(eol);
            }
            out.push_str(eol);
            out
        }

        proptest! {
            #[test]
            fn strip_mode_forwards_all_but_usage_only_events_at_any_chunking(
                kinds in prop::collection::vec(kind(), 0..10),
                eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
                picks in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
                unterminated in any::<bool>(),
            ) {
                let mut stream = String::new();
                let mut expected_out = String::new();
                let mut text = String::new();
                let mut usage = None;
                let mut forwarded = 0;
                for kind in &kinds {
                    let block = render(kind, eol);
                    stream.push_str(&block);
                    match kind {
                        Kind::UsageOnly(p, c) => {
                            usage = Some(Usage { prompt_tokens: *p, completion_tokens: *c });
                            continue;
                        }
                        Kind::Content(t) | Kind::SplitContent(t) => {
                            text.push_str(t);
                            forwarded += 1;
                        }
                        Kind::Garbage(_) => forwarded += 1,
                        Kind::Comment(_) | Kind::Done => {}
                    }
                    expected_out.push_str(&block);
                }
                if unterminated {
                    let tail = "data: {\"choices\":[{\"delta\":{\"content\":\"end\"}}]}";
                    stream.push_str(tail);
                    expected_out.push_str(tail);
                    text.push_str("end");
                    forwarded += 1;
                }
                let cuts = cut(stream.len(), &picks);
                let chunks = pieces(stream.as_bytes(), &cuts);

                let mut meter = StreamMeter::new(true, 1 << 20);
                let out = run(&mut meter, &chunks);
                prop_assert_eq!(String::from_utf8(out).unwrap(), expected_out);
                prop_assert_eq!(meter.delivered_text(), text.as_str());
                prop_assert_eq!(meter.reported_usage(), usage);
                prop_assert_eq!(meter.events_forwarded(), forwarded);
                prop_assert_eq!(meter.saw_done(), kinds.iter().any(|k| matches!(k, Kind::Done)));

                let mut passing = StreamMeter::new(false, 1 << 20);
                let out = run(&mut passing, &chunks);
                prop_assert_eq!(out, stream.as_bytes());
                prop_assert_eq!(passing.delivered_text(), text.as_str());
                prop_assert_eq!(passing.reported_usage(), usage);
            }
        }
    }
}
