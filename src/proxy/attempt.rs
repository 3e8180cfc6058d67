//! One attempt = one seller key tried for one request, run as a Pingora subrequest. The main request and
//! the subrequest share an [`Attempt`]: the main request fills in the plan, the subrequest's hooks report
//! what happened, and the main request reads the outcome after the subrequest has finished.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::metrics::METRICS;
use crate::openai::meter::{JsonMeter, StreamMeter, Usage};
use crate::openai::request::Endpoint;
use crate::pool::SellerKey;

/// What the main request decided; identical for every attempt of one request.
#[derive(Debug)]
pub struct CallPlan {
    pub request_id: String,
    pub endpoint: Endpoint,
    pub model: String,
    /// The body sent upstream (already rewritten), replayed unchanged on failover.
    pub body: Bytes,
    pub stream: bool,
    /// The gateway added `include_usage`; the buyer must not see the extra usage-only chunk.
    pub strip_usage_chunk: bool,
    pub started: Instant,
    pub max_metered_response_bytes: usize,
}

/// Why an attempt failed before any byte reached the buyer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Timeout,
    /// The upstream answered with a status that another key may not share (401/403/408/429/5xx).
    Status(u16),
    Other,
}

impl Failure {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Status(429) => "rate_limited",
            Self::Status(401 | 403) => "auth",
            Self::Status(_) => "status",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect => f.write_str("connection failed"),
            Self::Timeout => f.write_str("timed out"),
            Self::Status(code) => write!(f, "upstream returned {code}"),
            Self::Other => f.write_str("upstream error"),
        }
    }
}

/// Statuses that say "this key cannot serve now" rather than "this request is wrong": try another key.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 408 | 429) || status >= 500
}

#[derive(Debug, Default)]
pub struct AttemptOutcome {
    /// The upstream's response header was accepted and passed on: from here on there is no failover.
    pub response_started: bool,
    pub failure: Option<Failure>,
    pub status: u16,
    pub ttft: Option<Duration>,
    pub response_bytes: u64,
    /// The upstream body ended normally.
    pub completed: bool,
    /// The response broke off after it had started (upstream cut, timeout or client gone).
    pub interrupted: bool,
    pub reported_usage: Option<Usage>,
    /// Text delivered to the buyer, kept only for local counting when no usage is reported.
    pub delivered_text: String,
    /// The body was a successful API response whose tokens must be metered.
    pub metered: bool,
    /// A non-stream response too large to parse for its usage.
    pub overflowed: bool,
    /// The wait a 429's `Retry-After` asked for (the key's cooldown).
    pub retry_after: Option<Duration>,
}

#[derive(Debug)]
pub struct Attempt {
    pub key: Arc<SellerKey>,
    pub plan: Arc<CallPlan>,
    /// When this attempt began (the plan's start is the request's, before any earlier attempt).
    pub started: Instant,
    outcome: Mutex<AttemptOutcome>,
    finished: tokio::sync::Notify,
}

impl Attempt {
    pub fn new(key: Arc<SellerKey>, plan: Arc<CallPlan>) -> Arc<Self> {
        Arc::new(Self {
            key,
            plan,
            started: Instant::now(),
            outcome: Mutex::new(AttemptOutcome::default()),
            finished: tokio::sync::Notify::new(),
        })
    }

    /// The key's own time to first byte: from the start of this attempt, not of the request (earlier
    /// attempts on other keys are not this key's latency). `ttft` is the outcome's, since the request start.
    pub fn key_ttft(&self, ttft: Duration) -> Duration {
        (self.plan.started + ttft).saturating_duration_since(self.started)
    }

    /// Only the subrequest writes and only after it finished does the main request read, so the lock is
    /// never contended; a poisoned lock still holds consistent plain data.
    pub fn outcome(&self) -> MutexGuard<'_, AttemptOutcome> {
        self.outcome.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until the subrequest has dropped its context (its last hook has run), at most `limit`.
    pub async fn wait_finished(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.finished.notified()).await.is_ok()
    }
}

/// How the subrequest meters the body it passes on.
// One per attempt, never moved around: boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum BodyMeter {
    Stream(StreamMeter),
    Json(JsonMeter),
    /// Error responses passed through: not metered.
    Off,
}

/// The subrequest's own state. Dropping it tells the main request that the attempt is over.
pub struct SubrequestState {
    pub attempt: Arc<Attempt>,
    pub meter: BodyMeter,
    pub response_bytes: u64,
    pub first_byte: Option<Duration>,
    pub counted_stream: bool,
}

impl SubrequestState {
    pub fn new(attempt: Arc<Attempt>) -> Self {
        Self { attempt, meter: BodyMeter::Off, response_bytes: 0, first_byte: None, counted_stream: false }
    }

    /// Chooses the meter for an accepted 2xx response.
    pub fn start_metering(&mut self, event_stream: bool) {
        const TEXT_LIMIT: usize = 4 * 1024 * 1024;
        let plan = &self.attempt.plan;
        self.meter = if event_stream {
            METRICS.active_streams.inc();
            self.counted_stream = true;
            BodyMeter::Stream(StreamMeter::new(plan.strip_usage_chunk, TEXT_LIMIT))
        } else {
            BodyMeter::Json(JsonMeter::new(plan.max_metered_response_bytes))
        };
    }

    /// Passes one upstream body chunk through the meter; returns what to forward.
    pub fn on_body(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        if let Some(chunk) = body.as_ref() {
            if self.first_byte.is_none() && !chunk.is_empty() {
                self.first_byte = Some(self.attempt.plan.started.elapsed());
            }
        }
        match &mut self.meter {
            BodyMeter::Stream(meter) => {
                if let Some(chunk) = body.take() {
                    *body = Some(meter.on_chunk(chunk));
                }
                if end_of_stream {
                    let tail = meter.finish();
                    if !tail.is_empty() {
                        *body = Some(match body.take() {
                            Some(b) if !b.is_empty() => [b, tail].concat().into(),
                            _ => tail,
                        });
                    }
                }
            }
            BodyMeter::Json(meter) => {
                if let Some(chunk) = body.as_ref() {
                    meter.on_chunk(chunk);
                }
            }
            BodyMeter::Off => {}
        }
        if let Some(chunk) = body.as_ref() {
            self.response_bytes += chunk.len() as u64;
        }
        if end_of_stream {
            self.attempt.outcome().completed = true;
        }
    }

    /// Copies what the meter saw into the shared outcome (the subrequest's last hook).
    pub fn finalize(&mut self, failed: bool) {
        let meter = std::mem::replace(&mut self.meter, BodyMeter::Off);
        let mut outcome = self.attempt.outcome();
        outcome.response_bytes = self.response_bytes;
        outcome.ttft = self.first_byte;
        if outcome.response_started && (failed || !outcome.completed) {
            outcome.interrupted = true;
        }
        match meter {
            BodyMeter::Stream(meter) => {
                outcome.metered = true;
                outcome.reported_usage = meter.reported_usage();
                outcome.delivered_text = meter.delivered_text().to_string();
            }
            BodyMeter::Json(mut meter) => {
                outcome.metered = true;
                let parsed = meter.finish();
                outcome.overflowed = parsed.overflowed;
                outcome.reported_usage = parsed.reported_usage;
                outcome.delivered_text = parsed.text;
            }
            BodyMeter::Off => {}
        }
    }
}

impl Drop for SubrequestState {
    fn drop(&mut self) {
        if self.counted_stream {
            METRICS.active_streams.dec();
        }
        // notify_one stores a permit, so the main request sees it even if it starts waiting later.
        self.attempt.finished.notify_one();
    }
}

/// The metering rule. Reported usage wins. Without it (a provider that never reports it, or a stream
/// cut before the usage chunk, e.g. a client disconnect), the prompt is counted locally from the request
/// and the completion from the text actually delivered, and the record is marked estimated. Responses that
/// were not successful API results cost no tokens.
pub fn metered_tokens(
    plan: &CallPlan,
    metered: bool,
    reported: Option<Usage>,
    delivered_text: &str,
) -> (u64, u64, bool) {
    if !metered {
        return (0, 0, false);
    }
    if let Some(usage) = reported {
        return (usage.prompt_tokens, usage.completion_tokens, false);
    }
    let prompt = crate::openai::tokens::estimate_prompt(plan.endpoint, &plan.model, &plan.body);
    let completion = crate::openai::tokens::count_text(&plan.model, delivered_text);
    (prompt, completion, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(body: &str) -> CallPlan {
        CallPlan {
            request_id: "r".into(),
            endpoint: Endpoint::ChatCompletions,
            model: "gpt-4o-mini".into(),
            body: Bytes::from(body.to_string()),
            stream: true,
            strip_usage_chunk: true,
            started: Instant::now(),
            max_metered_response_bytes: 1024,
        }
    }

    #[test]
    fn reported_usage_wins_and_estimates_are_marked() {
        let p = plan(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#);
        let usage = Usage { prompt_tokens: 11, completion_tokens: 7 };
        assert_eq!(metered_tokens(&p, true, Some(usage), "ignored"), (11, 7, false));
        let (prompt, completion, estimated) = metered_tokens(&p, true, None, "tok0 tok1 tok2");
        assert!(estimated);
        assert!(prompt > 0 && completion > 0);
        assert_eq!(metered_tokens(&p, false, Some(usage), "x"), (0, 0, false));
    }

    #[test]
    fn retryable_statuses() {
        for s in [401, 403, 408, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(s), "{s}");
        }
        for s in [200, 400, 404, 413, 422] {
            assert!(!is_retryable_status(s), "{s}");
        }
    }
}
