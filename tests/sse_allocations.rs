//! The SSE metering path allocates nothing per chunk: counted with a counting global allocator (this test
//! binary's own), not timed. Only the delivered-text buffer grows, by doubling, so a long stream costs a
//! logarithmic number of allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use token_exchange::openai::meter::StreamMeter;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a thread-local Cell
// that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const CHUNKS: usize = 10_000;

/// One content event as OpenAI sends it (with `"usage": null` once usage was requested), its text with
/// escapes as most real text has: a quote, a newline, a non-ASCII letter and a surrogate pair.
fn content_event(index: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-abc\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
         \"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\"delta\":\
         {{\"content\":\"tok{index} \\\"q\\\"\\n\\u00e9\\ud83d\\ude00\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
    ))
}

/// Feeds a long stream, one event per chunk (or each event cut in two), and returns the allocations made
/// inside `on_chunk` over the whole stream.
fn allocations_for(strip: bool, split: bool) -> u64 {
    let chunks: Vec<Bytes> = (0..CHUNKS)
        .flat_map(|i| {
            let event = content_event(i);
            if split {
                let cut = event.len() / 2;
                vec![event.slice(..cut), event.slice(cut..)]
            } else {
                vec![event]
            }
        })
        .collect();
    let mut meter = StreamMeter::new(strip, 4 * 1024 * 1024);
    let mut forwarded = 0usize;
    let before = allocations();
    for chunk in chunks {
        forwarded += meter.on_chunk(chunk).len();
    }
    let made = allocations() - before;
    assert!(forwarded > 0);
    assert_eq!(meter.events_forwarded(), CHUNKS as u64);
    let text = meter.delivered_text();
    assert!(text.starts_with("tok0 \"q\"\né\u{1f600}tok1 "), "{:?}", &text[..text.len().min(40)]);
    made
}

#[test]
fn whole_events_pass_without_per_chunk_allocations() {
    for strip in [false, true] {
        let made = allocations_for(strip, false);
        // The delivered text (~110 KB here) grows by doubling: about 17 reallocations, not 10,000.
        assert!(made <= 40, "strip={strip}: {made} allocations for {CHUNKS} chunks");
    }
}

#[test]
fn events_split_across_chunks_reuse_the_parser_buffers() {
    for strip in [false, true] {
        let made = allocations_for(strip, true);
        // A split event is joined in the parser's (or, in strip mode, the held) buffer, reused after the
        // first events; in strip mode each forwarded piece that joins a held head is one new buffer.
        let bound = if strip { CHUNKS as u64 + 40 } else { 40 };
        assert!(made <= bound, "strip={strip}: {made} allocations for {} chunks", 2 * CHUNKS);
    }
}
