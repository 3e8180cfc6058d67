//! The main request: authenticate, read and inspect the body, pick keys and run attempts until one
//! answers, then record the usage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::subrequest::pipe::{pipe_subrequest, InputBody, InputBodyType};
use pingora::proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora::{ErrorSource, ErrorType};

use super::attempt::{metered_tokens, Attempt, CallPlan, Failure};
use super::error::GatewayError;
use super::route::{classify, Route};
use super::Gateway;
use crate::billing::FundsError;
use crate::metrics::METRICS;
use crate::openai::request::{inspect, Endpoint};
use crate::pool::{AuthError, BuyerKey, PoolSnapshot};
use crate::usage::{UsagePermit, UsageRecord};

/// How long the main request waits for a finished attempt's last hook before reading its outcome.
const ATTEMPT_SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Entry point for every client request.
pub async fn serve(gateway: &Gateway, session: &mut Session) -> Result<bool> {
    let started = Instant::now();
    let snapshot = gateway.pool.load_full();
    let route = classify(&session.req_header().method, session.req_header().uri.path());
    let outcome = match route {
        Route::Models => list_models(session, &snapshot).await,
        Route::Call { endpoint, path_model } => {
            return call(gateway, session, &snapshot, endpoint, path_model, started).await;
        }
        Route::NotFound => Err(GatewayError::NotFound),
        Route::MethodNotAllowed => Err(GatewayError::MethodNotAllowed),
    };
    match outcome {
        Ok(()) => {
            METRICS.requests.with_label_values(&["-", "200"]).inc();
            Ok(true)
        }
        Err(error) => reject(session, &error, "-", None).await,
    }
}

fn authenticate<'s>(session: &Session, snapshot: &'s PoolSnapshot) -> Result<&'s BuyerKey, GatewayError> {
    let header = session.req_header().headers.get("authorization").ok_or(GatewayError::InvalidKey)?;
    let value = header.to_str().map_err(|_| GatewayError::InvalidKey)?;
    let presented =
        value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(GatewayError::InvalidKey)?.trim();
    snapshot.authenticate(presented, crate::now_ms()).map_err(|e| match e {
        AuthError::InvalidKey => GatewayError::InvalidKey,
        AuthError::Expired => GatewayError::ExpiredKey,
    })
}

async fn list_models(session: &mut Session, snapshot: &PoolSnapshot) -> Result<(), GatewayError> {
    let buyer = authenticate(session, snapshot)?;
    let data: Vec<serde_json::Value> = snapshot
        .servable_models(buyer)
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "token-exchange"}))
        .collect();
    let body =
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).map_err(|_| GatewayError::Internal)?;
    respond_json(session, 200, Bytes::from(body), None).await.map_err(|_| GatewayError::Internal)
}

async fn call(
    gateway: &Gateway,
    session: &mut Session,
    snapshot: &PoolSnapshot,
    endpoint: Endpoint,
    path_model: Option<String>,
    started: Instant,
) -> Result<bool> {
    let buyer = match authenticate(session, snapshot) {
        Ok(buyer) => buyer,
        Err(e) => return reject(session, &e, "-", None).await,
    };
    let request_id = uuid::Uuid::now_v7().to_string();
    let mut record = UsageRecord {
        request_id: request_id.clone(),
        buyer_id: buyer.user_id,
        buyer_key_id: buyer.id,
        hosted_key_id: None,
        model: path_model.clone().unwrap_or_default(),
        endpoint: endpoint.as_str(),
        prompt_tokens: 0,
        completion_tokens: 0,
        estimated: false,
        status_code: 0,
        attempts: 0,
        latency_ms: 0,
        ttft_ms: None,
        request_bytes: 0,
        response_bytes: 0,
        client_disconnected: false,
        error_kind: None,
        created_at_ms: crate::now_ms(),
        key_attempts: Vec::new(),
        charge: None,
    };

    let body = match read_body(session, gateway.settings.max_body_bytes).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let e = GatewayError::PayloadTooLarge { limit: gateway.settings.max_body_bytes };
            return finish_rejected(gateway, session, record, &e, started).await;
        }
        Err(BodyError::Client(e)) => {
            record.client_disconnected = true;
            record.status_code = 499;
            record.error_kind = Some("client_closed");
            finish_record(gateway, record, started, "-", None);
            return Err(e);
        }
    };
    record.request_bytes = body.len() as u64;

    let request = match inspect(endpoint, body, path_model.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            let e = GatewayError::BadRequest { message: e.to_string(), code: e.code() };
            return finish_rejected(gateway, session, record, &e, started).await;
        }
    };
    record.model = request.model.clone();
    if !buyer.allows(&request.model) {
        let e = GatewayError::ModelNotAllowed { model: request.model.clone() };
        return finish_rejected(gateway, session, record, &e, started).await;
    }
    let Some(route) = snapshot.route(&request.model) else {
        let e = if snapshot.known_models.contains(&request.model) {
            GatewayError::NoCapacity { model: request.model.clone() }
        } else {
            GatewayError::UnknownModel { model: request.model.clone() }
        };
        return finish_rejected(gateway, session, record, &e, started).await;
    };
    let Some(price) = snapshot.price(&request.model).copied() else {
        let e = GatewayError::NotPriced { model: request.model.clone() };
        return finish_rejected(gateway, session, record, &e, started).await;
    };
    let model_label = request.model.clone();

    // Payment: a queue slot for the record (so it cannot be dropped), then the worst case reserved.
    let Some(permit) = gateway.usage.reserve() else {
        tracing::error!("the usage queue is full; refusing paid requests until it drains");
        return finish_rejected(gateway, session, record, &GatewayError::BillingUnavailable, started).await;
    };
    let worst = price.worst_case(&request, endpoint.has_completion());
    let candidates = snapshot
        .funds
        .get(&buyer.user_id)
        .map(|f| f.candidates(buyer.user_id, &request.model, record.created_at_ms, |k| route.get(k).is_some()))
        .unwrap_or_default();
    let reservation = match gateway.funds.reserve(&candidates, worst, snapshot.loaded_at_ms).await {
        Ok(r) => r,
        Err(e) => {
            let e = match e {
                FundsError::Insufficient => {
                    METRICS.insufficient_funds.inc();
                    GatewayError::InsufficientFunds { needed: worst, model: request.model }
                }
                FundsError::Unavailable(reason) => {
                    tracing::error!(error = %reason, "cannot open a hold");
                    GatewayError::BillingUnavailable
                }
            };
            drop(permit);
            return finish_rejected(gateway, session, record, &e, started).await;
        }
    };

    let plan = Arc::new(CallPlan {
        request_id,
        endpoint,
        model: request.model,
        strip_usage_chunk: request.stream && !request.client_wants_usage,
        stream: request.stream,
        body: request.body,
        started,
        max_metered_response_bytes: gateway.settings.max_metered_response_bytes,
    });

    let mut tried: Vec<i64> = Vec::with_capacity(gateway.settings.max_attempts);
    let mut last_failure: Option<Failure> = None;
    let mut served: Option<(Arc<Attempt>, AttemptRun)> = None;
    while tried.len() < gateway.settings.max_attempts {
        // An escrow pinned to a key pays for that key only.
        let key = match reservation.pinned_key {
            Some(pinned) if tried.is_empty() => route.get(pinned),
            Some(_) => None,
            None => route.pick(&mut rand::thread_rng(), &tried),
        };
        let Some(key) = key else { break };
        tried.push(key.id);
        let attempt = Attempt::new(key.clone(), plan.clone());
        let run = run_attempt(session, &attempt).await;
        if !attempt.wait_finished(ATTEMPT_SETTLE_LIMIT).await {
            tracing::warn!(request_id = %plan.request_id, key_id = key.id, "attempt did not settle in time");
        }
        // What reached the buyer decides, not what the subrequest intended: an upstream that sends its
        // header and fails at once can lose the race inside the pipe, and then nothing was written and
        // the attempt can still fail over.
        let response_started = final_response_written(session);
        let failure = {
            let outcome = attempt.outcome();
            outcome.failure.clone().unwrap_or(Failure::Other)
        };
        if response_started {
            served = Some((attempt, run));
            break;
        }
        record.key_attempts.push((key.id, false));
        METRICS.failovers.with_label_values(&[&model_label, failure.label()]).inc();
        tracing::warn!(request_id = %plan.request_id, key_id = key.id, failure = %failure, "attempt failed before the first byte");
        last_failure = Some(failure);
        if run.client_gone {
            record.client_disconnected = true;
            break;
        }
    }
    record.attempts = tried.len() as u32;

    let Some((attempt, run)) = served else {
        // Nothing was delivered: the reservation goes back unspent.
        drop(reservation);
        if record.client_disconnected {
            record.status_code = 499;
            record.error_kind = Some("client_closed");
            finish_record(gateway, record, started, &model_label, Some(permit));
            return Err(Error::explain(ErrorType::ConnectionClosed, "client went away during failover"));
        }
        let e = match last_failure {
            None => GatewayError::NoCapacity { model: model_label.clone() },
            Some(last) => GatewayError::UpstreamFailed { attempts: record.attempts, last: last.to_string() },
        };
        return finish_rejected(gateway, session, record, &e, started).await;
    };

    let (metered, reported, delivered_text, overflowed) = {
        let mut outcome = attempt.outcome();
        let metered = outcome.metered;
        let overflowed = outcome.overflowed;
        let reported = outcome.reported_usage;
        let delivered_text = std::mem::take(&mut outcome.delivered_text);
        record.hosted_key_id = Some(attempt.key.id);
        record.status_code = outcome.status;
        record.ttft_ms = outcome.ttft.map(|d| d.as_millis() as u64);
        record.response_bytes = outcome.response_bytes;
        record.client_disconnected |= run.client_gone;
        // `completed` is only set when the upstream body ended normally; a subrequest that died without
        // saying so (a panic) must not pass for a complete response.
        let interrupted = outcome.interrupted || !outcome.completed || run.error.is_some();
        if record.client_disconnected {
            record.error_kind = Some("client_closed");
        } else if interrupted {
            record.error_kind = Some("upstream_interrupted");
        }
        // A key that delivered a response worked, even if the buyer left early.
        record.key_attempts.push((attempt.key.id, !interrupted || record.client_disconnected));
        if let Some(ttft) = outcome.ttft {
            METRICS.ttft.with_label_values(&[&model_label]).observe(ttft.as_secs_f64());
        }
        (metered, reported, delivered_text, overflowed)
    };
    // Local counting of a large prompt or reply takes long enough to stall other requests on this thread.
    let (prompt, completion, estimated) = if metered && reported.is_none() {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || metered_tokens(&plan, metered, reported, &delivered_text))
            .await
            .unwrap_or((0, 0, true))
    } else {
        metered_tokens(&plan, metered, reported, &delivered_text)
    };
    record.prompt_tokens = prompt;
    record.completion_tokens = completion;
    record.estimated = estimated;
    // A response the upstream broke off before any completion token delivered nothing: it costs nothing.
    // (A buyer who hangs up pays for what was delivered up to then, prompt included.)
    let delivered_nothing = record.error_kind == Some("upstream_interrupted") && completion == 0;
    let cost = if !metered || delivered_nothing {
        0
    } else if overflowed {
        // A response too large to parse for usage: billed at the worst case the buyer agreed to.
        record.estimated = true;
        reservation.amount
    } else {
        price.cost(prompt, completion)
    };
    // The buyer never pays more than was reserved: usage beyond the bound (a provider ignoring the limit,
    // or an upstream reporting more than it could have produced) is recorded as unpaid, not charged.
    let charged = cost.min(reservation.amount);
    if charged < cost {
        tracing::warn!(request_id = %record.request_id, key_id = attempt.key.id, cost, reserved = reservation.amount, "usage exceeds the request's bound; the excess is not charged");
    }
    let seller = if attempt.key.platform { None } else { Some(attempt.key.owner_id) };
    record.charge = Some(reservation.finish(charged, seller).with_excess(cost - charged));
    METRICS.tokens.with_label_values(&[&model_label, "prompt"]).inc_by(prompt);
    METRICS.tokens.with_label_values(&[&model_label, "completion"]).inc_by(completion);
    METRICS.upstream_latency.with_label_values(&[&model_label]).observe(started.elapsed().as_secs_f64());
    finish_record(gateway, record, started, &model_label, Some(permit));

    match run.error {
        // The response was cut: close the connection so the client sees it was incomplete.
        Some(e) => Err(e),
        None => Ok(true),
    }
}

struct AttemptRun {
    client_gone: bool,
    error: Option<Box<Error>>,
}

/// Pipes one subrequest for this attempt, with the prepared body preset.
async fn run_attempt(session: &mut Session, attempt: &Arc<Attempt>) -> AttemptRun {
    let Some(spawner) = session.subrequest_spawner.as_ref() else {
        return AttemptRun {
            client_gone: false,
            error: Some(Error::explain(ErrorType::InternalError, "subrequests are not enabled")),
        };
    };
    let ctx = SubrequestCtx::builder().body_mode(BodyMode::ExpectBody).user_ctx(Box::new(attempt.clone())).build();
    let (subrequest, handle) = spawner.create_subrequest(session.as_downstream(), ctx);
    let body = InputBodyType::Preset(InputBody::Bytes(vec![attempt.plan.body.clone()]));
    match pipe_subrequest(session, subrequest, handle, |task| Ok(Some(task)), body).await {
        Ok(mut state) => {
            let joined = match state.join_handle.take() {
                Some(join) => join.await,
                None => Ok(()),
            };
            let error =
                joined.err().map(|e| Error::explain(ErrorType::InternalError, format!("attempt task failed: {e}")));
            AttemptRun { client_gone: false, error }
        }
        Err(e) => AttemptRun {
            client_gone: !e.from_subreq && matches!(e.error.esource(), ErrorSource::Downstream),
            error: Some(e.error),
        },
    }
}

enum BodyError {
    TooLarge,
    Client(Box<Error>),
}

/// Reads the whole request body, refusing it as soon as it is known to exceed `limit`.
async fn read_body(session: &mut Session, limit: usize) -> std::result::Result<Bytes, BodyError> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let expects_continue =
        session.req_header().headers.get("expect").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session.write_continue_response().await.map_err(BodyError::Client)?;
    }
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await.map_err(BodyError::Client)? {
        let total = buf.len() + first.as_ref().map_or(0, Bytes::len) + chunk.len();
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        // Most bodies arrive in one piece: keep it without copying.
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            None => buf.extend_from_slice(&chunk),
            Some(prev) => {
                buf.reserve(declared.unwrap_or(prev.len() + chunk.len()).min(limit));
                buf.extend_from_slice(&prev);
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Answers an error for a request that passed authentication, and records it.
async fn finish_rejected(
    gateway: &Gateway,
    session: &mut Session,
    mut record: UsageRecord,
    error: &GatewayError,
    started: Instant,
) -> Result<bool> {
    record.status_code = error.status();
    record.error_kind = Some(error.code());
    // Only models the pool serves become metric labels: buyer-chosen names would grow series without bound.
    let model_label = match error {
        GatewayError::NoCapacity { .. } | GatewayError::UpstreamFailed { .. } => record.model.clone(),
        _ => "-".to_string(),
    };
    let request_id = record.request_id.clone();
    finish_record(gateway, record, started, &model_label, None);
    reject(session, error, &model_label, Some(&request_id)).await
}

/// Queues the record: with the request's reserved slot when it has one, else if there is room.
fn finish_record(
    gateway: &Gateway,
    mut record: UsageRecord,
    started: Instant,
    model_label: &str,
    permit: Option<UsagePermit>,
) {
    record.latency_ms = started.elapsed().as_millis() as u64;
    METRICS.requests.with_label_values(&[model_label, &record.status_code.to_string()]).inc();
    match permit {
        Some(permit) => permit.send(record),
        None => gateway.usage.submit(record),
    }
}

/// Writes an OpenAI-style error and ends the request.
async fn reject(
    session: &mut Session,
    error: &GatewayError,
    model_label: &str,
    request_id: Option<&str>,
) -> Result<bool> {
    if request_id.is_none() {
        METRICS.requests.with_label_values(&[model_label, &error.status().to_string()]).inc();
    }
    // The body may not have been read; the connection cannot be reused safely.
    session.set_keepalive(None);
    respond_error(session, error, request_id).await?;
    Ok(true)
}

/// Whether the buyer has received a final (non-1xx) response header on this connection.
pub(super) fn final_response_written(session: &Session) -> bool {
    session.response_written().is_some_and(|r| !r.status.is_informational())
}

pub(super) async fn respond_error(session: &mut Session, error: &GatewayError, request_id: Option<&str>) -> Result<()> {
    respond_json(session, error.status(), error.body(), request_id).await
}

async fn respond_json(session: &mut Session, status: u16, body: Bytes, request_id: Option<&str>) -> Result<()> {
    let mut response = ResponseHeader::build(status, Some(4))?;
    response.insert_header("content-type", "application/json")?;
    response.insert_header("content-length", body.len().to_string())?;
    if let Some(id) = request_id {
        response.insert_header("x-tokex-request-id", id)?;
    }
    session.write_response_header(Box::new(response), false).await?;
    session.write_response_body(Some(body), true).await
}
