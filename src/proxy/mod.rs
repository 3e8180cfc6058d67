//! The gateway: a Pingora `ProxyHttp` service. The hooks are thin; the decisions live in plain functions.
//!
//! Request flow. The client's request (the *main* request) is authenticated, its body read (bounded) and
//! inspected, and its worst case reserved in `request_filter`. Then one of two ways:
//! - *Direct* (bodies up to 64 KiB, nearly all): Pingora's own proxy flow. Every pass of its retry loop is
//!   one attempt: `upstream_peer` claims the next key, the request body filter sends the prepared body in
//!   place of the client's (which Pingora replays from its retry buffer on each pass), `response_filter`
//!   turns a 429/5xx into a retryable error before anything is written, and `logging` meters and settles.
//! - *Subrequests* (larger bodies, beyond Pingora 0.9's 64 KiB retry buffer, see STYLE.md): the request
//!   filter answers the request itself (`Ok(true)`) by piping one subrequest per attempt with the prepared
//!   body preset.
//!
//! Either way each attempt runs the same upstream hooks (`upstream_peer`, header rewriting, response
//! metering) for one seller key, and a failed attempt is replayed on another key with the saved bytes as
//! long as nothing has reached the buyer.

mod attempt;
mod call;
pub mod error;
pub mod route;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use attempt::SubrequestState;
pub use attempt::{is_retryable_status, metered_tokens, Attempt, AttemptOutcome, CallPlan, Failure};

use crate::billing::Funds;
use crate::health::HealthRegistry;
use crate::pool::SharedPool;
use crate::usage::UsageSink;

/// Request headers of the buyer that must never reach a seller's provider: credentials and account
/// selectors of the buyer, client addresses, and hop-by-hop headers (the subrequest copies the client's
/// raw headers; a buyer's `Connection: close` or `Upgrade: h2c` is not the provider's business).
const STRIP_UPSTREAM_REQUEST_HEADERS: &[&str] = &[
    "cookie",
    "x-api-key",
    "api-key",
    "openai-organization",
    "openai-project",
    "proxy-authorization",
    "forwarded",
    "x-forwarded-for",
    "x-real-ip",
    "expect",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "http2-settings",
];

/// Response headers passed from the provider to the buyer. Everything else (organisation ids, rate-limit
/// state, cookies, vendor headers) describes the seller's account and is dropped.
const PASS_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "cache-control",
    "date",
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
];

#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub max_body_bytes: usize,
    pub max_attempts: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_metered_response_bytes: usize,
}

impl GatewaySettings {
    pub fn from_config(c: &crate::config::GatewayConfig) -> Self {
        Self {
            max_body_bytes: c.max_body_bytes,
            max_attempts: c.max_attempts,
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            read_timeout: Duration::from_millis(c.read_timeout_ms),
            write_timeout: Duration::from_millis(c.write_timeout_ms),
            max_metered_response_bytes: c.max_metered_response_bytes,
        }
    }
}

pub struct Gateway {
    pool: SharedPool,
    usage: UsageSink,
    funds: Arc<Funds>,
    /// This node's key health (also reachable from every key of the snapshot).
    health: Arc<HealthRegistry>,
    settings: GatewaySettings,
}

impl Gateway {
    pub fn new(
        pool: SharedPool,
        usage: UsageSink,
        funds: Arc<Funds>,
        health: Arc<HealthRegistry>,
        settings: GatewaySettings,
    ) -> Self {
        Self { pool, usage, funds, health, settings }
    }
}

/// Per-request state. A subrequest holds its attempt's state in `sub`; a direct call (see
/// [`call::DirectCall`]) holds the call in `direct` and its current attempt in `sub`.
#[derive(Default)]
pub struct RequestCtx {
    sub: Option<SubrequestState>,
    direct: Option<Box<call::DirectCall>>,
    /// A direct call's failure was answered (and logged per attempt) by `fail_to_proxy`.
    answered: bool,
}

fn sub_state(ctx: &mut RequestCtx) -> Result<&mut SubrequestState> {
    ctx.sub.as_mut().ok_or_else(|| Error::explain(ErrorType::InternalError, "upstream hook outside a subrequest"))
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &RequestCtx) -> bool {
        session.subrequest_ctx.is_none()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let attempt = session
            .subrequest_ctx
            .as_ref()
            .map(|sub| sub.user_ctx().and_then(|u| u.downcast_ref::<Arc<Attempt>>()).cloned());
        match attempt {
            None => match call::serve(self, session).await {
                call::Dispatch::Done(result) => result,
                call::Dispatch::Direct(direct) => {
                    ctx.direct = Some(direct);
                    Ok(false)
                }
            },
            Some(None) => Err(Error::explain(ErrorType::InternalError, "subrequest without an attempt")),
            Some(Some(attempt)) => {
                // The subrequest copied the client's raw headers; the body it sends is the prepared one.
                let req = session.req_header_mut();
                let _ = req.remove_header("transfer-encoding");
                let _ = req.remove_header("expect");
                req.insert_header("content-length", attempt.plan.body.len().to_string())?;
                ctx.sub = Some(SubrequestState::new(attempt));
                Ok(false)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        if let Some(direct) = ctx.direct.as_mut() {
            // A pass of Pingora's retry loop: the next key (the failed pass's attempt is concluded first).
            let Some(attempt) = direct.next_attempt(self, ctx.sub.take()) else {
                return Err(Error::explain(ErrorType::Custom("NoKeyLeft"), "no key left to try"));
            };
            ctx.sub = Some(SubrequestState::new(attempt));
        }
        let state = sub_state(ctx)?;
        let upstream = &state.attempt.key.upstream;
        let mut peer = HttpPeer::new(upstream.addr, upstream.tls, upstream.host.clone());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.settings.connect_timeout);
        options.total_connection_timeout = Some(self.settings.connect_timeout * 2);
        options.read_timeout = Some(self.settings.read_timeout);
        options.write_timeout = Some(self.settings.write_timeout);
        options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let state = sub_state(ctx)?;
        let key = &state.attempt.key;
        let plan = &state.attempt.plan;
        let path = format!("{}{}", key.upstream.base_path, plan.endpoint.upstream_suffix());
        let uri =
            path.parse::<http::Uri>().map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?;
        upstream_request.set_uri(uri);
        for name in STRIP_UPSTREAM_REQUEST_HEADERS {
            let _ = upstream_request.remove_header(*name);
        }
        upstream_request.insert_header("host", key.upstream.authority.as_str())?;
        upstream_request.insert_header("authorization", key.authorization.clone())?;
        // The body is metered as it passes: it must arrive uncompressed.
        upstream_request.insert_header("accept-encoding", "identity")?;
        upstream_request.insert_header("content-length", plan.body.len().to_string())?;
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(direct) = ctx.direct.as_ref() {
            // The client's body was read and inspected in the request filter; Pingora replays its retry
            // buffer on each pass, and the prepared body goes in its place. (An empty chunk is skipped;
            // `None` would end the upstream body.)
            *body = Some(if end_of_stream { direct.paid.plan.body.clone() } else { bytes::Bytes::new() });
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(state) = ctx.sub.as_mut() else {
            return Ok(());
        };
        let status = response.status.as_u16();
        if response.status.is_informational() {
            // 100/103: not the response yet; it neither starts the response nor fails the attempt.
            return Ok(());
        }
        if is_retryable_status(status) {
            let retry_after = (status == 429)
                .then(|| response.headers.get("retry-after").and_then(|v| v.to_str().ok()))
                .flatten()
                .and_then(|v| crate::health::parse_retry_after(v, crate::now_ms()));
            let mut outcome = state.attempt.outcome();
            outcome.status = status;
            outcome.failure = Some(Failure::Status(status));
            outcome.retry_after = retry_after;
            return Err(Error::explain(ErrorType::HTTPStatus(status), "upstream status calls for another key"));
        }
        {
            let mut outcome = state.attempt.outcome();
            outcome.status = status;
            outcome.response_started = true;
        }
        let dropped: Vec<http::HeaderName> =
            response.headers.keys().filter(|name| !PASS_RESPONSE_HEADERS.contains(&name.as_str())).cloned().collect();
        for name in dropped {
            let _ = response.remove_header(&name);
        }
        response.insert_header("x-tokex-request-id", state.attempt.plan.request_id.as_str())?;
        if response.status.is_success() {
            let event_stream = response
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
            state.start_metering(event_stream);
            if event_stream && state.attempt.plan.strip_usage_chunk {
                // The usage-only event is removed, so the length changes: send it chunked (without a length
                // or chunking the body would be close-delimited and the connection lost).
                if response.remove_header("content-length").is_some() {
                    response.insert_header("transfer-encoding", "chunked")?;
                }
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(state) = ctx.sub.as_mut() {
            state.on_body(body, end_of_stream);
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(state) = ctx.sub.as_mut() {
            let failure = match e.etype() {
                ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => Failure::Timeout,
                _ => Failure::Connect,
            };
            state.attempt.outcome().failure.get_or_insert(failure);
        }
        // A subrequest's failover is decided by its main request; a direct call's by the next pass of
        // Pingora's retry loop, which takes the next key.
        e.set_retry(ctx.direct.is_some());
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if let (Some(direct), Some(state)) = (ctx.direct.as_mut(), ctx.sub.as_mut()) {
            if call::final_response_written(session) || matches!(e.esource(), ErrorSource::Downstream) {
                // Something reached the buyer, or the buyer is gone: no other key can take over.
                e.set_retry(false);
                return e;
            }
            let mut outcome = state.attempt.outcome();
            e.retry.decide_reuse(client_reused);
            if e.retry() && outcome.failure.is_none() && !direct.same_key_retried {
                // A pooled connection the provider had already closed: once more on a fresh one, same key.
                direct.same_key_retry = true;
                direct.same_key_retried = true;
            } else {
                outcome.failure.get_or_insert_with(|| failure_of(&e));
            }
            e.set_retry(true);
            return e;
        }
        // A pooled connection the provider had already closed is safe to retry once on a fresh one, as long
        // as the body can be replayed; the default refuses all POST retries.
        if session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        if ctx.direct.is_some() && !call::final_response_written(session) {
            let client_gone = matches!(e.esource(), ErrorSource::Downstream);
            let current = ctx.sub.take();
            if let (Some(state), false) = (current.as_ref(), client_gone) {
                state.attempt.outcome().failure.get_or_insert_with(|| failure_of(e));
            }
            let error_code = match ctx.direct.take() {
                Some(direct) => direct.fail(self, session, current, client_gone).await,
                None => 0,
            };
            ctx.answered = true;
            return FailToProxy { error_code, can_reuse_downstream: false };
        }
        if ctx.direct.is_none() {
            if let Some(state) = ctx.sub.as_mut() {
                // Nothing is written from a subrequest: the main request decides between failover and an
                // error.
                let mut outcome = state.attempt.outcome();
                if !outcome.response_started && outcome.failure.is_none() {
                    outcome.failure = Some(failure_of(e));
                }
                return FailToProxy { error_code: 502, can_reuse_downstream: false };
            }
        }
        if call::final_response_written(session) || matches!(e.esource(), ErrorSource::Downstream) {
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        }
        let error = error::GatewayError::Internal;
        let _ = call::respond_error(session, &error, None).await;
        FailToProxy { error_code: error.status(), can_reuse_downstream: false }
    }

    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        // Attempt failures are logged by the main request with the key id; client disconnects are routine.
        session.subrequest_ctx.is_some() || ctx.answered || matches!(e.esource(), ErrorSource::Downstream)
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        _error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        // A direct call's failed passes are logged as failovers, with the key id.
        ctx.direct.is_some()
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(direct) = ctx.direct.take() {
            direct.finish(self, session, ctx.sub.take(), e).await;
        } else if let Some(state) = ctx.sub.as_mut() {
            state.finalize(e.is_some());
        }
    }
}

/// An attempt's failure from Pingora's error, when no hook named it first.
fn failure_of(e: &Error) -> Failure {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
        ErrorType::ConnectRefused | ErrorType::ConnectError | ErrorType::ConnectNoRoute => Failure::Connect,
        _ => Failure::Other,
    }
}
