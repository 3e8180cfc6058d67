//! Incremental Server-Sent Events parsing (the WHATWG event-stream algorithm) over byte chunks that may be
//! split anywhere, even inside a CRLF or a UTF-8 sequence.
//!
//! The parser reports every *block* (the bytes up to and including a blank line) with the offset in the
//! current chunk where it ends, so a caller can cut events out of the byte stream without re-encoding it.
//! Blocks without a `data` line (comments, keep-alives) are reported too, with no event: the spec does not
//! dispatch them, but a caller that edits the stream must still know where they end.
//!
//! ```text
//! let mut feed = parser.feed(&chunk);
//! while let Some(block) = feed.next_block() { /* block.end, block.event */ }
//! ```

use memchr::{memchr, memchr2};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The incremental parser. Reuse one per stream; its buffers keep their capacity between events.
#[derive(Debug, Default)]
pub struct SseParser {
    /// A line that started in an earlier chunk and has not ended yet.
    line: Vec<u8>,
    /// The last chunk ended in CR: an LF opening the next chunk completes that CRLF, not an empty line.
    pending_lf: bool,
    /// At least one line was processed (a BOM is only skipped before the first).
    started: bool,
    /// Joined data lines, used when the event's data cannot be borrowed from the current chunk.
    data: Vec<u8>,
    data_at: DataAt,
    event_type: String,
    last_event_id: String,
    retry: Option<u64>,
    /// A blank line was reported; the event buffers are cleared lazily so the event could borrow them.
    reset_due: bool,
}

/// Where the data of the event under construction lives.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum DataAt {
    #[default]
    Nothing,
    /// One data line, entirely inside the current chunk: borrowed, never copied.
    Chunk { start: usize, end: usize },
    /// In `SseParser::data`.
    Buffer,
}

/// Everything up to and including one blank line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block<'a> {
    /// Offset in the current chunk just past the block's terminating blank line. When that blank line ends
    /// in a CR that is the chunk's last byte, an LF opening the next chunk also belongs to this block.
    pub end: usize,
    /// The event this block dispatches; `None` when the block has no `data` line.
    pub event: Option<SseEvent<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `data` lines joined with `\n`, without a trailing newline.
    pub data: &'a [u8],
    /// The `event` field; `None` when absent or empty (a plain "message").
    pub event_type: Option<&'a str>,
    /// The last event ID set on the stream so far (it persists across events, as in the spec).
    pub id: Option<&'a str>,
}

impl SseEvent<'_> {
    /// OpenAI's end-of-stream sentinel, `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data.trim_ascii() == b"[DONE]"
    }
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `chunk`. Drain the feed with [`Feed::next_block`] until it returns `None`; by then the
    /// incomplete tail is stored for the next chunk. (Dropping a feed early drains it, discarding its events.)
    pub fn feed<'p, 'c>(&'p mut self, chunk: &'c [u8]) -> Feed<'p, 'c> {
        Feed { parser: self, chunk, pos: 0 }
    }

    /// End of the stream. Returns the unterminated last event, if it has data.
    ///
    /// The spec discards such an event; we return it because its bytes did reach the client and some
    /// upstreams end the stream without the final blank line. The parser is ready for a new stream after.
    pub fn finish(&mut self) -> Option<SseEvent<'_>> {
        if self.reset_due {
            self.reset_event();
        }
        self.pending_lf = false;
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, None, &[]);
            self.line = line;
            self.line.clear();
        }
        self.started = false;
        self.reset_due = true;
        match self.data_at {
            DataAt::Buffer => Some(SseEvent {
                data: &self.data,
                event_type: non_empty(&self.event_type),
                id: non_empty(&self.last_event_id),
            }),
            // `Chunk` cannot outlive a feed (draining converts it); nothing to report either way.
            DataAt::Chunk { .. } | DataAt::Nothing => None,
        }
    }

    /// The last valid `retry` field, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    fn reset_event(&mut self) {
        self.data.clear();
        self.data_at = DataAt::Nothing;
        self.event_type.clear();
        self.reset_due = false;
    }

    /// Handles one line without its terminator; `at` is its offset in `chunk` when it lies entirely inside
    /// it. Returns true for a blank line.
    fn process_line(&mut self, line: &[u8], at: Option<usize>, chunk: &[u8]) -> bool {
        let (line, at) = match (self.started, line.strip_prefix(BOM)) {
            (false, Some(rest)) => (rest, at.map(|a| a + BOM.len())),
            _ => (line, at),
        };
        self.started = true;
        if line.is_empty() {
            return true;
        }
        if line[0] == b':' {
            return false;
        }
        let (name, value_start) = match memchr(b':', line) {
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (&line[..colon], colon + 2),
            Some(colon) => (&line[..colon], colon + 1),
            None => (line, line.len()),
        };
        let value = &line[value_start..];
        match name {
            b"data" => self.push_data(value, at.map(|a| (a + value_start, a + line.len())), chunk),
            b"event" => {
                self.event_type.clear();
                self.event_type.push_str(&String::from_utf8_lossy(value));
            }
            b"id" if memchr(0, value).is_none() => {
                self.last_event_id.clear();
                self.last_event_id.push_str(&String::from_utf8_lossy(value));
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                // Digits only, so the parse fails only on overflow, which the spec leaves unspecified.
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    self.retry = Some(ms);
                }
            }
            _ => {}
        }
        false
    }

    fn push_data(&mut self, value: &[u8], in_chunk: Option<(usize, usize)>, chunk: &[u8]) {
        match (self.data_at, in_chunk) {
            (DataAt::Nothing, Some((start, end))) => self.data_at = DataAt::Chunk { start, end },
            (DataAt::Nothing, None) => {
                self.data.clear();
                self.data.extend_from_slice(value);
                self.data_at = DataAt::Buffer;
            }
            (DataAt::Chunk { start, end }, _) => {
                self.data.clear();
                self.data.extend_from_slice(chunk.get(start..end).unwrap_or_default());
                self.data.push(b'\n');
                self.data.extend_from_slice(value);
                self.data_at = DataAt::Buffer;
            }
            (DataAt::Buffer, _) => {
                self.data.push(b'\n');
                self.data.extend_from_slice(value);
            }
        }
    }

    /// The chunk is about to go away: copy borrowed data into our own buffer.
    fn detach(&mut self, chunk: &[u8]) {
        if let DataAt::Chunk { start, end } = self.data_at {
            self.data.clear();
            self.data.extend_from_slice(chunk.get(start..end).unwrap_or_default());
            self.data_at = DataAt::Buffer;
        }
    }

    fn current_event<'a>(&'a self, chunk: &'a [u8]) -> Option<SseEvent<'a>> {
        let data = match self.data_at {
            DataAt::Nothing => return None,
            DataAt::Chunk { start, end } => chunk.get(start..end).unwrap_or_default(),
            DataAt::Buffer => &self.data,
        };
        Some(SseEvent { data, event_type: non_empty(&self.event_type), id: non_empty(&self.last_event_id) })
    }
}

#[cfg(test)]
impl SseParser {
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.line.capacity() + self.data.capacity()
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// One chunk being parsed; see [`SseParser::feed`].
pub struct Feed<'p, 'c> {
    parser: &'p mut SseParser,
    chunk: &'c [u8],
    pos: usize,
}

impl Feed<'_, '_> {
    /// The next complete block in the chunk, or `None` once the rest of the chunk is an incomplete block
    /// (kept by the parser for the next chunk).
    pub fn next_block(&mut self) -> Option<Block<'_>> {
        let chunk = self.chunk;
        let parser = &mut *self.parser;
        if parser.reset_due {
            parser.reset_event();
        }
        loop {
            let Some(rest) = chunk.get(self.pos..).filter(|rest| !rest.is_empty()) else {
                parser.detach(chunk);
                return None;
            };
            if std::mem::take(&mut parser.pending_lf) && rest[0] == b'\n' {
                self.pos += 1;
                continue;
            }
            let Some(offset) = memchr2(b'\n', b'\r', rest) else {
                parser.line.extend_from_slice(rest);
                self.pos = chunk.len();
                continue;
            };
            let line_start = self.pos;
            let line_end = line_start + offset;
            let mut next = line_end + 1;
            if chunk[line_end] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => parser.pending_lf = true,
                }
            }
            self.pos = next;
            let blank = if parser.line.is_empty() {
                parser.process_line(&chunk[line_start..line_end], Some(line_start), chunk)
            } else {
                let mut line = std::mem::take(&mut parser.line);
                line.extend_from_slice(&chunk[line_start..line_end]);
                let blank = parser.process_line(&line, None, chunk);
                line.clear();
                parser.line = line;
                blank
            };
            if blank {
                parser.reset_due = true;
                return Some(Block { end: next, event: parser.current_event(chunk) });
            }
        }
    }
}

impl Drop for Feed<'_, '_> {
    fn drop(&mut self) {
        while self.next_block().is_some() {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An owned copy of an event, for comparing parses.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Owned {
        pub data: String,
        pub event_type: Option<String>,
        pub id: Option<String>,
    }

    impl From<SseEvent<'_>> for Owned {
        fn from(e: SseEvent<'_>) -> Self {
            Self {
                data: String::from_utf8(e.data.to_vec()).unwrap(),
                event_type: e.event_type.map(str::to_owned),
                id: e.id.map(str::to_owned),
            }
        }
    }

    /// Feeds `chunks` in order; returns the events and, for each chunk, the block end offsets.
    pub(crate) fn parse_chunks(chunks: &[&[u8]]) -> (Vec<Owned>, Vec<Vec<usize>>) {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        let mut ends = Vec::new();
        for chunk in chunks {
            let mut feed = parser.feed(chunk);
            let mut chunk_ends = Vec::new();
            while let Some(block) = feed.next_block() {
                chunk_ends.push(block.end);
                events.extend(block.event.map(Owned::from));
            }
            ends.push(chunk_ends);
        }
        events.extend(parser.finish().map(Owned::from));
        (events, ends)
    }

    pub(crate) fn parse_all(s: &[u8]) -> Vec<Owned> {
        parse_chunks(&[s]).0
    }

    fn data_of(events: &[Owned]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    /// Every way of cutting `s` in two, and byte by byte, parses like the whole.
    fn assert_split_invariant(s: &[u8]) -> Vec<Owned> {
        let whole = parse_all(s);
        for i in 0..=s.len() {
            let (events, _) = parse_chunks(&[&s[..i], &s[i..]]);
            assert_eq!(events, whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(parse_chunks(&bytes).0, whole, "byte by byte");
        whole
    }

    pub(crate) const OPENAI_STREAM: &str = concat!(
        ": OPENROUTER PROCESSING\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",",
        "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],",
        "\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",",
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        ": keep-alive inside an event\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",",
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\", w\u{f6}rld \u{2713}\\n\\\"q\\\"\"},",
        "\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",",
        "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",",
        "\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn openai_stream_at_every_split_point() {
        let events = assert_split_invariant(OPENAI_STREAM.as_bytes());
        assert_eq!(events.len(), 6);
        assert!(events[1].data.contains("\"Hello\""));
        assert!(events[4].data.contains("\"usage\":{\"prompt_tokens\":12"));
        assert_eq!(events[5].data, "[DONE]");
    }

    #[test]
    fn crlf_stream_at_every_split_point() {
        let crlf = OPENAI_STREAM.replace('\n', "\r\n");
        let events = assert_split_invariant(crlf.as_bytes());
        assert_eq!(events, parse_all(OPENAI_STREAM.as_bytes()));
    }

    #[test]
    fn cr_only_stream_at_every_split_point() {
        let cr = OPENAI_STREAM.replace('\n', "\r");
        assert_eq!(assert_split_invariant(cr.as_bytes()), parse_all(OPENAI_STREAM.as_bytes()));
    }

    #[test]
    fn crlf_split_between_cr_and_lf_is_one_line_ending() {
        // Were the LF taken for a second, empty line, "data: b" would end an event of its own.
        let (events, ends) = parse_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(data_of(&events), ["a\nb"]);
        assert_eq!(ends, [vec![], vec![], vec![2], vec![]]);

        let (events, ends) = parse_chunks(&[b"data: a\r\n\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(data_of(&events), ["a", "b"]);
        assert_eq!(ends, [vec![10], vec![12]]);
    }

    #[test]
    fn block_ends_are_offsets_in_the_current_chunk() {
        let (_, ends) = parse_chunks(&[b": c\n\ndata: 1\n\nda", b"ta: 2\n\n", b"\n"]);
        assert_eq!(ends, [vec![5, 14], vec![7], vec![1]]);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let s = b"data: first\ndata:second\ndata:  third\ndata\ndata:\n\n";
        let events = assert_split_invariant(s);
        assert_eq!(data_of(&events), ["first\nsecond\n third\n\n"]);
    }

    #[test]
    fn blocks_without_data_are_not_events() {
        let s = b": comment\n\nevent: ping\n\nid: 7\n\n\n\ndata: x\n\n";
        let (events, ends) = parse_chunks(&[s]);
        assert_eq!(data_of(&events), ["x"]);
        assert_eq!(events[0].event_type, None, "the event type resets at each blank line");
        assert_eq!(events[0].id.as_deref(), Some("7"), "the last event id persists");
        assert_eq!(ends[0].len(), 6);
    }

    #[test]
    fn empty_data_line_is_an_event_with_empty_data() {
        assert_eq!(data_of(&parse_all(b"data\n\ndata:\n\n")), ["", ""]);
    }

    #[test]
    fn unknown_and_named_fields() {
        let s = b"event: delta\nid: abc\nretry: 1500\nfoo: bar\nbare\ndata: x\n\nretry: 1x\ndata: y\n\n";
        let mut parser = SseParser::new();
        let mut feed = parser.feed(s);
        let first = feed.next_block().unwrap().event.unwrap();
        assert_eq!((first.data, first.event_type, first.id), (&b"x"[..], Some("delta"), Some("abc")));
        let second = feed.next_block().unwrap().event.unwrap();
        assert_eq!((second.data, second.event_type, second.id), (&b"y"[..], None, Some("abc")));
        assert!(feed.next_block().is_none());
        drop(feed);
        assert_eq!(parser.retry(), Some(1500));
    }

    #[test]
    fn done_is_a_normal_event() {
        let events = parse_all(b"data: [DONE]\n\n");
        assert_eq!(data_of(&events), ["[DONE]"]);
        let mut parser = SseParser::new();
        let mut feed = parser.feed(b"data: [DONE]\r\n\r\n");
        assert!(feed.next_block().unwrap().event.unwrap().is_done());
    }

    #[test]
    fn leading_bom_is_skipped_once() {
        let s = b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n";
        let events = assert_split_invariant(s);
        assert_eq!(data_of(&events), ["a"], "a second BOM makes an unknown field name");
    }

    #[test]
    fn unterminated_last_event_comes_from_finish() {
        let mut parser = SseParser::new();
        let mut feed = parser.feed(b"data: a\n\ndata: b\ndata: c");
        assert_eq!(feed.next_block().unwrap().event.unwrap().data, b"a");
        assert!(feed.next_block().is_none());
        drop(feed);
        assert_eq!(parser.finish().unwrap().data, b"b\nc");
        assert!(parser.finish().is_none());
    }

    #[test]
    fn single_line_data_is_borrowed_from_the_chunk() {
        let chunk = b"data: {\"a\":1}\n\n".to_vec();
        let mut parser = SseParser::new();
        let mut feed = parser.feed(&chunk);
        let event = feed.next_block().unwrap().event.unwrap();
        assert_eq!(event.data.as_ptr(), chunk[6..].as_ptr());
    }

    #[test]
    fn buffers_are_reused_across_events() {
        let mut parser = SseParser::new();
        let big = format!("data: {}\ndata: x\n\n", "a".repeat(1000));
        for _ in 0..3 {
            let (head, tail) = big.as_bytes().split_at(500);
            drop(parser.feed(head));
            drop(parser.feed(tail));
        }
        let (line_cap, data_cap) = (parser.line.capacity(), parser.data.capacity());
        for _ in 0..10 {
            let (head, tail) = big.as_bytes().split_at(500);
            drop(parser.feed(head));
            drop(parser.feed(tail));
        }
        assert_eq!((parser.line.capacity(), parser.data.capacity()), (line_cap, data_cap));
    }

    #[test]
    fn invalid_utf8_does_not_panic() {
        let mut parser = SseParser::new();
        let mut feed = parser.feed(b"event: \xff\xfe\nid: \xc3\ndata: \xff\n\n");
        let event = feed.next_block().unwrap().event.unwrap();
        assert_eq!(event.data, b"\xff");
        assert_eq!(event.event_type, Some("\u{fffd}\u{fffd}"));
    }

    pub(crate) mod random {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Line {
            Data(String),
            Comment(String),
            Event(String),
            Id(String),
            Unknown(String, String),
        }

        impl Line {
            fn render(&self) -> String {
                match self {
                    Self::Data(v) => format!("data: {v}"),
                    Self::Comment(v) => format!(":{v}"),
                    Self::Event(v) => format!("event: {v}"),
                    Self::Id(v) => format!("id: {v}"),
                    Self::Unknown(name, v) => format!("x{name}: {v}"),
                }
            }
        }

        fn line() -> impl Strategy<Value = Line> {
            let value = "[^\r\n]{0,12}";
            prop_oneof![
                4 => value.prop_map(Line::Data),
                1 => value.prop_map(Line::Comment),
                1 => value.prop_map(Line::Event),
                1 => "[^\r\n\u{0}]{0,6}".prop_map(Line::Id),
                1 => ("[a-z]{0,4}", value).prop_map(|(n, v)| Line::Unknown(n, v)),
            ]
        }

        /// A stream and the data of the events it dispatches.
        pub(crate) fn stream() -> impl Strategy<Value = (Vec<u8>, Vec<String>)> {
            (prop::collection::vec(prop::collection::vec(line(), 0..5), 0..12), 0..4u8, any::<u64>()).prop_map(
                |(blocks, eol_mode, bits)| {
                    let mut n = 0;
                    let mut eol = || {
                        n += 1;
                        match (eol_mode, bits >> (n % 64) & 1) {
                            (0, _) | (3, 0) => "\n",
                            (1, _) | (3, _) => "\r\n",
                            _ => "\r",
                        }
                    };
                    let mut text = String::new();
                    let mut expected = Vec::new();
                    for block in &blocks {
                        let mut data: Option<String> = None;
                        for line in block {
                            text.push_str(&line.render());
                            text.push_str(eol());
                            if let Line::Data(v) = line {
                                data = Some(match data {
                                    Some(d) => format!("{d}\n{v}"),
                                    None => v.clone(),
                                });
                            }
                        }
                        text.push_str(eol());
                        expected.extend(data);
                    }
                    (text.into_bytes(), expected)
                },
            )
        }

        /// Cut points into a stream of length `len`.
        pub(crate) fn cut(len: usize, picks: &[prop::sample::Index]) -> Vec<usize> {
            let mut cuts: Vec<usize> = picks.iter().map(|p| p.index(len + 1)).collect();
            cuts.sort_unstable();
            cuts
        }

        pub(crate) fn pieces<'a>(s: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
            let mut out = Vec::new();
            let mut from = 0;
            for &c in cuts {
                out.push(&s[from..c]);
                from = c;
            }
            out.push(&s[from..]);
            out
        }

        proptest! {
            #[test]
            fn random_chunkings_parse_like_one_shot(
                (stream, expected) in stream(),
                picks in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let whole = parse_all(&stream);
                prop_assert_eq!(whole.iter().map(|e| e.data.clone()).collect::<Vec<_>>(), expected);
                let cuts = cut(stream.len(), &picks);
                let (chunked, ends) = parse_chunks(&pieces(&stream, &cuts));
                prop_assert_eq!(&chunked, &whole);
                // Block ends, mapped back to stream offsets, are increasing and inside their chunk.
                let mut last = 0;
                for (chunk_index, chunk_ends) in ends.iter().enumerate() {
                    let base = if chunk_index == 0 { 0 } else { cuts[chunk_index - 1] };
                    for &end in chunk_ends {
                        prop_assert!(base + end > last || (base + end == last && end == 0));
                        last = base + end;
                    }
                }
            }
        }
    }
}
