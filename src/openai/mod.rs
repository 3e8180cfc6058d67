//! OpenAI wire handling on the gateway's hot path, free of I/O and unit-tested on its own:
//! - `request`: validate a buyer's body in one borrowed pass and splice in the edits the gateway needs;
//! - `sse`: the incremental Server-Sent Events parser;
//! - `meter`: usage and delivered text of streamed (SSE) and whole (JSON) responses, passed through;
//! - `tokens`: local token counts for when an upstream reports no usage;
//! - `error`: OpenAI's error JSON.

pub mod error;
pub mod meter;
pub mod request;
pub mod sse;
pub mod tokens;
