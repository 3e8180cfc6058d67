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

use super::attempt::{metered_tokens, Attempt, CallPlan, Failure, SubrequestState};
use super::error::GatewayError;
use super::route::{classify, Route};
use super::Gateway;
use crate::billing::{FundsError, Price, Reservation};
use crate::health::{CircuitChange, InFlight, Outcome as HealthOutcome, Recorded, Tick};
use crate::metrics::METRICS;
use crate::openai::request::{inspect, Endpoint};
use crate::pool::{AuthError, BuyerKey, PoolSnapshot, SellerKey};
use crate::usage::{UsagePermit, UsageRecord};

/// How long the main request waits for a finished attempt's last hook before reading its outcome.
const ATTEMPT_SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Entry point for every client request.
pub(super) async fn serve(gateway: &Gateway, session: &mut Session) -> Dispatch {
    let started = Instant::now();
    let snapshot = gateway.pool.load_full();
    let route = classify(&session.req_header().method, session.req_header().uri.path());
    let outcome = match route {
        Route::Models => list_models(session, &snapshot).await,
        Route::Call { endpoint, path_model } => {
            return call(gateway, session, snapshot, endpoint, path_model, started).await;
        }
        Route::NotFound => Err(GatewayError::NotFound),
        Route::MethodNotAllowed => Err(GatewayError::MethodNotAllowed),
    };
    Dispatch::Done(match outcome {
        Ok(()) => {
            METRICS.requests.with_label_values(&["-", "200"]).inc();
            Ok(true)
        }
        Err(error) => reject(session, &error, "-", None).await,
    })
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

/// How a call that passed its checks is carried out.
pub(super) enum Dispatch {
    /// Answered already (an error, or the subrequests' response); the request filter's result.
    Done(Result<bool>),
    /// The body fits Pingora's retry buffer: the request goes through Pingora's own proxy flow, each
    /// attempt a pass of its retry loop (see [`DirectCall`]).
    Direct(Box<DirectCall>),
}

/// `snapshot` is the pool as the request found it; it is let go before the first attempt, so that a
/// long stream does not keep a replaced pool alive (failover picks from the pool current at that time).
pub(super) async fn call(
    gateway: &Gateway,
    session: &mut Session,
    snapshot: Arc<PoolSnapshot>,
    endpoint: Endpoint,
    path_model: Option<String>,
    started: Instant,
) -> Dispatch {
    // Buffers the body as it is read (up to 64 KiB): Pingora replays that buffer on every pass of its
    // retry loop, and the request body filter puts the prepared body in its place.
    session.as_mut().enable_retry_buffering();
    let paid = match prepare(gateway, session, &snapshot, endpoint, path_model, started).await {
        Ok(paid) => paid,
        Err(done) => return Dispatch::Done(done),
    };
    if session.as_ref().get_retry_buffer().is_some() {
        drop(snapshot);
        return Dispatch::Direct(Box::new(DirectCall {
            paid,
            claim: None,
            same_key_retry: false,
            same_key_retried: false,
        }));
    }
    Dispatch::Done(run_subrequests(gateway, session, snapshot, paid).await)
}

/// A call between its reservation and its record: what every attempt of the request shares.
pub(super) struct PaidCall {
    pub(super) plan: Arc<CallPlan>,
    record: UsageRecord,
    chooser: KeyChooser,
    reservation: Reservation,
    permit: UsagePermit,
    price: Price,
    model_label: String,
    last_failure: Option<Failure>,
}

/// Authenticates the buyer, reads and inspects the body and reserves the request's worst case. `Err` is
/// the request filter's result for a request answered (or lost) on the way.
async fn prepare(
    gateway: &Gateway,
    session: &mut Session,
    snapshot: &PoolSnapshot,
    endpoint: Endpoint,
    path_model: Option<String>,
    started: Instant,
) -> std::result::Result<PaidCall, Result<bool>> {
    let buyer = match authenticate(session, snapshot) {
        Ok(buyer) => buyer,
        Err(e) => return Err(reject(session, &e, "-", None).await),
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
        fallback: false,
    };

    let body = match read_body(session, gateway.settings.max_body_bytes).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let e = GatewayError::PayloadTooLarge { limit: gateway.settings.max_body_bytes };
            return Err(finish_rejected(gateway, session, record, &e, started, None).await);
        }
        Err(BodyError::Client(e)) => {
            record.client_disconnected = true;
            record.status_code = 499;
            record.error_kind = Some("client_closed");
            finish_record(gateway, record, started, "-", None);
            return Err(Err(e));
        }
    };
    record.request_bytes = body.len() as u64;

    let request = match inspect(endpoint, body, path_model.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            let e = GatewayError::BadRequest { message: e.to_string(), code: e.code() };
            return Err(finish_rejected(gateway, session, record, &e, started, None).await);
        }
    };
    record.model = request.model.clone();
    if !buyer.allows(&request.model) {
        let e = GatewayError::ModelNotAllowed { model: request.model.clone() };
        return Err(finish_rejected(gateway, session, record, &e, started, None).await);
    }
    if !snapshot.serves(&request.model) {
        let e = if snapshot.known_models.contains(&request.model) {
            GatewayError::NoCapacity { model: request.model.clone() }
        } else {
            GatewayError::UnknownModel { model: request.model.clone() }
        };
        return Err(finish_rejected(gateway, session, record, &e, started, None).await);
    }
    let Some(price) = snapshot.price(&request.model).copied() else {
        let e = GatewayError::NotPriced { model: request.model.clone() };
        return Err(finish_rejected(gateway, session, record, &e, started, None).await);
    };
    let model_label = request.model.clone();

    // Payment: a queue slot for the record (so it cannot be dropped), then the worst case reserved.
    let Some(permit) = gateway.usage.reserve(record.buyer_id) else {
        tracing::error!("the usage queue is full; refusing paid requests until it drains");
        let e = GatewayError::BillingUnavailable;
        return Err(finish_rejected(gateway, session, record, &e, started, None).await);
    };
    let worst = price.worst_case(&request, endpoint.has_completion());
    let candidates = snapshot
        .funds
        .get(&buyer.user_id)
        .map(|f| {
            f.candidates(buyer.user_id, &request.model, record.created_at_ms, |k| {
                snapshot.key_for(&request.model, k).is_some()
            })
        })
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
            return Err(finish_rejected(gateway, session, record, &e, started, Some(permit)).await);
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
    let chooser = KeyChooser::new(reservation.pinned_key, gateway.settings.max_attempts, reservation.amount);
    Ok(PaidCall { plan, record, chooser, reservation, permit, price, model_label, last_failure: None })
}

/// Large bodies: one subrequest per attempt, the prepared body preset, until one answers.
async fn run_subrequests(
    gateway: &Gateway,
    session: &mut Session,
    snapshot: Arc<PoolSnapshot>,
    mut paid: PaidCall,
) -> Result<bool> {
    let mut first_pick = Some(snapshot);
    let mut served: Option<(Arc<Attempt>, AttemptRun, InFlight)> = None;
    loop {
        let next = match first_pick.take() {
            Some(snapshot) => paid.next_key(&snapshot),
            None => paid.next_key(&gateway.pool.load()),
        };
        let Some((key, claim)) = next else { break };
        let attempt = Attempt::new(key.clone(), paid.plan.clone());
        let run = run_attempt(session, &attempt).await;
        if !attempt.wait_finished(ATTEMPT_SETTLE_LIMIT).await {
            tracing::warn!(request_id = %paid.plan.request_id, key_id = key.id, "attempt did not settle in time");
        }
        // What reached the buyer decides, not what the subrequest intended: an upstream that sends its
        // header and fails at once can lose the race inside the pipe, and then nothing was written and
        // the attempt can still fail over.
        if final_response_written(session) {
            served = Some((attempt, run, claim));
            break;
        }
        paid.attempt_failed(gateway, &attempt, claim, run.client_gone);
        if run.client_gone {
            break;
        }
    }
    match served {
        Some((attempt, run, claim)) => {
            paid.finish_served(gateway, &attempt, claim, run.client_gone, run.error.is_some()).await;
            // A cut response: the error closes the connection, so the client sees it was incomplete.
            run.error.map_or(Ok(true), Err)
        }
        None => match paid.finish_unserved(gateway) {
            Unserved::ClientGone => {
                Err(Error::explain(ErrorType::ConnectionClosed, "client went away during failover"))
            }
            Unserved::Answer { error, model_label, request_id } => {
                reject(session, &error, &model_label, Some(&request_id)).await
            }
        },
    }
}

/// What to tell the buyer when no key answered.
pub(super) enum Unserved {
    ClientGone,
    Answer { error: GatewayError, model_label: String, request_id: String },
}

impl PaidCall {
    /// The next key to try, claimed (see [`KeyChooser::next`]).
    fn next_key(&mut self, snapshot: &PoolSnapshot) -> Option<(Arc<SellerKey>, InFlight)> {
        self.chooser.next(snapshot, &self.plan.model)
    }

    /// An attempt that failed before anything reached the buyer: its key's health, metrics and log, once
    /// per request and key (Pingora may retry inside one attempt).
    fn attempt_failed(&mut self, gateway: &Gateway, attempt: &Attempt, claim: InFlight, client_gone: bool) {
        let (failure, retry_after) = {
            let outcome = attempt.outcome();
            (outcome.failure.clone().unwrap_or(Failure::Other), outcome.retry_after)
        };
        let key = &attempt.key;
        let health = failed_attempt_outcome(&failure, retry_after, client_gone);
        note_health(gateway, key, claim.finish(health, crate::health::mono_ms()), &self.model_label);
        // A rate-limited key is not a failing one: its stored failure count (which risk control's
        // failure-rate check reads) leaves 429s out, as its circuit does.
        if !matches!(health, HealthOutcome::RateLimited { .. }) {
            self.record.key_attempts.push((key.id, false));
        }
        METRICS.failovers.with_label_values(&[&self.model_label, failure.label()]).inc();
        tracing::warn!(request_id = %self.plan.request_id, key_id = key.id, failure = %failure, "attempt failed before the first byte");
        self.last_failure = Some(failure);
        if client_gone {
            self.record.client_disconnected = true;
        }
    }

    /// No key answered: the reservation goes back unspent and the record is queued.
    fn finish_unserved(self, gateway: &Gateway) -> Unserved {
        let PaidCall { plan, mut record, chooser, reservation, permit, model_label, last_failure, .. } = self;
        record.attempts = chooser.attempts();
        drop(reservation);
        if record.client_disconnected {
            record.status_code = 499;
            record.error_kind = Some("client_closed");
            finish_record(gateway, record, plan.started, &model_label, Some(permit));
            return Unserved::ClientGone;
        }
        let error = match last_failure {
            None => GatewayError::NoCapacity { model: model_label },
            Some(last) => GatewayError::UpstreamFailed { attempts: record.attempts, last: last.to_string() },
        };
        let (model_label, request_id) = record_rejected(gateway, record, &error, plan.started, Some(permit));
        Unserved::Answer { error, model_label, request_id }
    }

    /// The attempt whose response reached the buyer: meters, charges and queues the record. `broken`: the
    /// response did not end normally.
    async fn finish_served(
        self,
        gateway: &Gateway,
        attempt: &Attempt,
        claim: InFlight,
        client_gone: bool,
        broken: bool,
    ) {
        let PaidCall { plan, mut record, chooser, reservation, permit, price, model_label, .. } = self;
        record.attempts = chooser.attempts();
        let (metered, reported, delivered_text, overflowed, health) = {
            let mut outcome = attempt.outcome();
            let metered = outcome.metered;
            let overflowed = outcome.overflowed;
            let reported = outcome.reported_usage;
            let delivered_text = std::mem::take(&mut outcome.delivered_text);
            record.hosted_key_id = Some(attempt.key.id);
            record.status_code = outcome.status;
            record.ttft_ms = outcome.ttft.map(|d| d.as_millis() as u64);
            record.response_bytes = outcome.response_bytes;
            record.client_disconnected |= client_gone;
            // `completed` is only set when the upstream body ended normally; an attempt that died without
            // saying so (a panic) must not pass for a complete response.
            let interrupted = outcome.interrupted || !outcome.completed || broken;
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
            let stream_ttft = outcome.ttft.filter(|_| plan.stream).map(|t| attempt.key_ttft(t));
            let health = served_attempt_outcome(outcome.status, interrupted, record.client_disconnected, stream_ttft);
            (metered, reported, delivered_text, overflowed, health)
        };
        record.fallback = attempt.key.platform;
        if attempt.key.platform {
            METRICS.fallback_requests.with_label_values(&[&model_label]).inc();
        }
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
        // The buyer never pays more than was reserved: usage beyond the bound (a provider ignoring the
        // limit, or an upstream reporting more than it could have produced) is recorded as unpaid, not
        // charged.
        let charged = cost.min(reservation.amount);
        if charged < cost {
            tracing::warn!(request_id = %record.request_id, key_id = attempt.key.id, cost, reserved = reservation.amount, "usage exceeds the request's bound; the excess is not charged");
        }
        let seller = if attempt.key.platform { None } else { Some(attempt.key.owner_id) };
        record.charge = Some(reservation.finish(charged, seller).with_excess(cost - charged));
        // Counted towards the key's daily cap before its in-flight worst case is released, so that the cap
        // sees one or the other at every moment.
        attempt.key.health.add_charge(charged);
        note_health(gateway, &attempt.key, claim.finish(health, crate::health::mono_ms()), &model_label);
        METRICS.tokens.with_label_values(&[&model_label, "prompt"]).inc_by(prompt);
        METRICS.tokens.with_label_values(&[&model_label, "completion"]).inc_by(completion);
        METRICS.upstream_latency.with_label_values(&[&model_label]).observe(plan.started.elapsed().as_secs_f64());
        finish_record(gateway, record, plan.started, &model_label, Some(permit));
    }
}

/// A call proxied by Pingora's own flow (no subrequest, no second session, no pipe): `upstream_peer`
/// claims the next key on every pass of Pingora's retry loop, the error hooks decide whether a failed pass
/// fails over, the request body filter sends the prepared body, and `logging` settles.
pub struct DirectCall {
    pub(super) paid: PaidCall,
    /// The current attempt's claim on its key.
    claim: Option<InFlight>,
    /// The next pass retries the current key on a new connection (a pooled one the provider had closed).
    pub(super) same_key_retry: bool,
    pub(super) same_key_retried: bool,
}

impl DirectCall {
    /// The attempt of the next pass. `current` is the attempt of the pass that failed, if any. None: no
    /// key is left to try.
    pub(super) fn next_attempt(&mut self, gateway: &Gateway, current: Option<SubrequestState>) -> Option<Arc<Attempt>> {
        if let Some(current) = current {
            if std::mem::take(&mut self.same_key_retry) {
                return Some(Attempt::new(current.attempt.key.clone(), self.paid.plan.clone()));
            }
            self.conclude_failed(gateway, &current, false);
        }
        let (key, claim) = self.paid.next_key(&gateway.pool.load())?;
        self.claim = Some(claim);
        self.same_key_retried = false;
        Some(Attempt::new(key, self.paid.plan.clone()))
    }

    fn conclude_failed(&mut self, gateway: &Gateway, current: &SubrequestState, client_gone: bool) {
        if let Some(claim) = self.claim.take() {
            self.paid.attempt_failed(gateway, &current.attempt, claim, client_gone);
        }
    }

    /// Pingora gave up before anything reached the buyer: answers the error (unless the buyer is gone)
    /// and queues the record. Returns the status written, 0 for none.
    pub(super) async fn fail(
        mut self,
        gateway: &Gateway,
        session: &mut Session,
        current: Option<SubrequestState>,
        client_gone: bool,
    ) -> u16 {
        if let Some(current) = current {
            self.conclude_failed(gateway, &current, client_gone);
        }
        if client_gone {
            self.paid.record.client_disconnected = true;
        }
        match self.paid.finish_unserved(gateway) {
            Unserved::ClientGone => 0,
            Unserved::Answer { error, model_label, request_id } => {
                session.set_keepalive(None);
                match respond_error(session, &error, Some(&request_id)).await {
                    Ok(()) => error.status(),
                    Err(e) => {
                        tracing::debug!(error = %e, model = %model_label, "could not answer a failed call");
                        0
                    }
                }
            }
        }
    }

    /// The request is over (Pingora's last hook). `error`: the final error, if any.
    pub(super) async fn finish(
        mut self,
        gateway: &Gateway,
        session: &Session,
        current: Option<SubrequestState>,
        error: Option<&Error>,
    ) {
        let client_gone = error.is_some_and(|e| matches!(e.esource(), ErrorSource::Downstream));
        match current {
            Some(mut current) if final_response_written(session) => {
                current.finalize(error.is_some());
                let Some(claim) = self.claim.take() else {
                    tracing::error!(request_id = %self.paid.plan.request_id, "served attempt without a claim");
                    return;
                };
                let attempt = current.attempt.clone();
                drop(current);
                self.paid.finish_served(gateway, &attempt, claim, client_gone, error.is_some()).await;
            }
            current => {
                // Not answered by `fail` (it takes the call): nothing reached the buyer and nothing can.
                if let Some(current) = current {
                    self.conclude_failed(gateway, &current, client_gone);
                }
                self.paid.record.client_disconnected |= client_gone;
                let _ = self.paid.finish_unserved(gateway);
            }
        }
    }
}

struct AttemptRun {
    client_gone: bool,
    error: Option<Box<Error>>,
}

/// The keys one request tries, in order: seller keys by weighted health pick (at most
/// `gateway.max_attempts`), then — when none of them answered, or none could be tried at all — the
/// platform's fallback keys in priority order (as many attempts again). An escrow pinned to a key pays for
/// that key alone: it is the only one tried, and never falls back. Every key is tried at most once per
/// request; a key that stopped being available between the pick and its claim (another request took its
/// probe or its last concurrency slot) is skipped without counting as an attempt.
struct KeyChooser {
    /// `Some` for a pinned request: the key's id, until it was tried.
    pinned: Option<Option<i64>>,
    max_attempts: usize,
    /// The request's worst case, counted as in flight on the key it runs on.
    credits: i64,
    seller_attempts: usize,
    sellers_done: bool,
    fallback_attempts: usize,
    /// Keys tried or skipped.
    excluded: Vec<i64>,
}

impl KeyChooser {
    fn new(pinned: Option<i64>, max_attempts: usize, credits: i64) -> Self {
        Self {
            pinned: pinned.map(Some),
            max_attempts,
            credits,
            seller_attempts: 0,
            sellers_done: false,
            fallback_attempts: 0,
            excluded: Vec::with_capacity(max_attempts * 2),
        }
    }

    /// The next key of `snapshot` to try for `model`, claimed, or None when the request has no more to
    /// try. Each call may see a newer snapshot; keys already tried stay excluded by id.
    fn next(&mut self, snapshot: &PoolSnapshot, model: &str) -> Option<(Arc<SellerKey>, InFlight)> {
        let now = Tick::now();
        if let Some(pinned) = self.pinned.as_mut() {
            let key = snapshot.key_for(model, pinned.take()?)?;
            let claim = key.acquire(now, self.credits)?;
            self.seller_attempts += 1;
            return Some((key, claim));
        }
        if let Some(route) = snapshot.route(model).filter(|_| !self.sellers_done) {
            let mut rng = rand::thread_rng();
            while self.seller_attempts < self.max_attempts {
                let Some(key) = route.pick(&mut rng, &self.excluded, now) else { break };
                self.excluded.push(key.id);
                if let Some(claim) = key.acquire(now, self.credits) {
                    self.seller_attempts += 1;
                    return Some((key, claim));
                }
            }
        }
        self.sellers_done = true;
        let route = snapshot.fallback(model)?;
        while self.fallback_attempts < self.max_attempts {
            let key = route.next(&self.excluded, now)?;
            self.excluded.push(key.id);
            if let Some(claim) = key.acquire(now, self.credits) {
                self.fallback_attempts += 1;
                return Some((key, claim));
            }
        }
        None
    }

    fn attempts(&self) -> u32 {
        u32::try_from(self.seller_attempts + self.fallback_attempts).unwrap_or(u32::MAX)
    }
}

/// What an attempt that failed before the first byte says about its key.
fn failed_attempt_outcome(failure: &Failure, retry_after: Option<Duration>, client_gone: bool) -> HealthOutcome {
    if client_gone {
        // The attempt was cut short by the buyer, not by the key.
        return HealthOutcome::Neutral;
    }
    match failure {
        Failure::Status(429) => HealthOutcome::RateLimited { retry_after },
        Failure::Status(_) | Failure::Connect | Failure::Timeout | Failure::Other => HealthOutcome::Failure,
    }
}

/// What an attempt whose response reached the buyer says about its key. `stream_ttft` is the key's own
/// time to first byte, for streams only.
fn served_attempt_outcome(
    status: u16,
    interrupted: bool,
    client_disconnected: bool,
    stream_ttft: Option<Duration>,
) -> HealthOutcome {
    if client_disconnected {
        HealthOutcome::Neutral
    } else if interrupted {
        HealthOutcome::Failure
    } else if (200..300).contains(&status) {
        HealthOutcome::Success { ttft: stream_ttft }
    } else {
        // The buyer's own error (400, 404, 413, 422...) passed on: says nothing about the key.
        HealthOutcome::Neutral
    }
}

/// Metrics and logs of a key's recorded outcome.
fn note_health(gateway: &Gateway, key: &SellerKey, recorded: Recorded, model_label: &str) {
    if recorded.cooled_down {
        METRICS.key_cooldowns.with_label_values(&[model_label]).inc();
    }
    match recorded.circuit {
        Some(CircuitChange::Opened { for_ms }) => {
            tracing::warn!(key_id = key.id, for_ms, "key taken out of rotation after consecutive failures");
        }
        Some(CircuitChange::Reopened { for_ms }) => {
            tracing::warn!(key_id = key.id, for_ms, "probe of a failing key failed; out of rotation again");
        }
        Some(CircuitChange::Closed) => tracing::info!(key_id = key.id, "probe succeeded; key back in rotation"),
        None => {}
    }
    if recorded.changed_availability() {
        gateway.health.note_change();
    }
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
    record: UsageRecord,
    error: &GatewayError,
    started: Instant,
    permit: Option<UsagePermit>,
) -> Result<bool> {
    let (model_label, request_id) = record_rejected(gateway, record, error, started, permit);
    reject(session, error, &model_label, Some(&request_id)).await
}

/// Queues the record of a request answered with `error`; returns its metric label and request id.
fn record_rejected(
    gateway: &Gateway,
    mut record: UsageRecord,
    error: &GatewayError,
    started: Instant,
    permit: Option<UsagePermit>,
) -> (String, String) {
    record.status_code = error.status();
    record.error_kind = Some(error.code());
    // Only models the pool serves become metric labels: buyer-chosen names would grow series without bound.
    let model_label = match error {
        GatewayError::NoCapacity { .. } | GatewayError::UpstreamFailed { .. } => record.model.clone(),
        _ => "-".to_string(),
    };
    let request_id = record.request_id.clone();
    finish_record(gateway, record, started, &model_label, permit);
    (model_label, request_id)
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use http::HeaderValue;

    use super::*;
    use crate::health::{HealthPolicy, KeyHealth};
    use crate::pool::{FallbackRoute, ModelRoute, Upstream};

    fn key(id: i64, weight: u64, platform: bool, priority: i64) -> Arc<SellerKey> {
        Arc::new(SellerKey {
            id,
            owner_id: 1,
            provider: "openai".into(),
            upstream: Arc::new(Upstream {
                addr: "127.0.0.1:1".parse().unwrap(),
                tls: false,
                host: "127.0.0.1".into(),
                authority: "127.0.0.1:1".into(),
                base_path: "/v1".into(),
            }),
            authorization: HeaderValue::from_static("Bearer x"),
            weight,
            platform,
            priority,
            max_concurrency: 0,
            max_spend_per_day: 0,
            spent_today: 0,
            spend_day: 0,
            health: Arc::new(KeyHealth::new(Arc::new(HealthPolicy::default()))),
        })
    }

    fn snapshot(sellers: Vec<Arc<SellerKey>>, fallback: Vec<Arc<SellerKey>>) -> PoolSnapshot {
        let mut snapshot = PoolSnapshot::default();
        if !sellers.is_empty() {
            snapshot.routes = HashMap::from([("m".to_string(), ModelRoute::new(sellers))]);
        }
        if !fallback.is_empty() {
            snapshot.fallback = HashMap::from([("m".to_string(), FallbackRoute::new(fallback))]);
        }
        snapshot
    }

    /// Runs the chooser to its end, every attempt failing; returns the keys in the order tried.
    fn tried(chooser: &mut KeyChooser, snapshot: &PoolSnapshot) -> Vec<i64> {
        let mut order = Vec::new();
        while let Some((key, claim)) = chooser.next(snapshot, "m") {
            order.push(key.id);
            claim.finish(HealthOutcome::Neutral, crate::health::mono_ms());
        }
        order
    }

    #[test]
    fn sellers_first_then_fallback_keys_by_priority_each_once() {
        let sellers = vec![key(1, 10, false, 0), key(2, 10, false, 0), key(3, 10, false, 0)];
        let fallback = vec![key(7, 1, true, 9), key(8, 1, true, 1), key(9, 1, true, 5)];
        let snapshot = snapshot(sellers, fallback);
        let mut chooser = KeyChooser::new(None, 2, 100);
        let order = tried(&mut chooser, &snapshot);
        assert_eq!(order.len(), 4, "two seller attempts, then two fallback attempts: {order:?}");
        assert!(order[..2].iter().all(|id| (1..=3).contains(id)) && order[0] != order[1], "{order:?}");
        assert_eq!(order[2..], [8, 9], "fallback keys by priority");
        assert_eq!(chooser.attempts(), 4);
    }

    #[test]
    fn unavailable_keys_are_skipped_without_counting_as_attempts() {
        let limited = key(2, 1_000_000, false, 0);
        let now = crate::health::mono_ms();
        limited.health.acquire(now, 0, 0).unwrap().finish(HealthOutcome::RateLimited { retry_after: None }, now);
        let fine = key(3, 1, false, 0);
        let snapshot = snapshot(vec![limited, fine], vec![key(9, 1, true, 0)]);
        let mut chooser = KeyChooser::new(None, 1, 1);
        assert_eq!(tried(&mut chooser, &snapshot), [3, 9], "the cooling key is never tried");
        assert_eq!(chooser.attempts(), 2);
    }

    #[test]
    fn a_model_served_only_by_fallback_keys_goes_straight_to_them() {
        let snapshot = snapshot(vec![], vec![key(5, 1, true, 2), key(4, 1, true, 3)]);
        let mut chooser = KeyChooser::new(None, 3, 1);
        assert_eq!(tried(&mut chooser, &snapshot), [5, 4]);
    }

    #[test]
    fn a_pinned_escrow_tries_its_key_alone_and_never_falls_back() {
        let snapshot = snapshot(vec![key(1, 10, false, 0), key(2, 10, false, 0)], vec![key(9, 1, true, 0)]);
        let mut chooser = KeyChooser::new(Some(2), 3, 1);
        assert_eq!(tried(&mut chooser, &snapshot), [2]);
        // Pinned to a key that cannot be claimed now: nothing is tried.
        let now = crate::health::mono_ms();
        let two = snapshot.key_for("m", 2).unwrap();
        two.health.acquire(now, 0, 0).unwrap().finish(HealthOutcome::RateLimited { retry_after: None }, now);
        let mut chooser = KeyChooser::new(Some(2), 3, 1);
        assert_eq!(tried(&mut chooser, &snapshot), Vec::<i64>::new());
        assert_eq!(chooser.attempts(), 0);
    }

    #[test]
    fn failover_picks_from_the_pool_current_then_and_never_retries_a_key() {
        let before = snapshot(vec![key(1, 10, false, 0)], vec![]);
        let mut chooser = KeyChooser::new(None, 3, 1);
        let (first, claim) = chooser.next(&before, "m").unwrap();
        assert_eq!(first.id, 1);
        claim.finish(HealthOutcome::Neutral, crate::health::mono_ms());
        // The pool was reloaded during the attempt: key 1 is still in it, key 2 is new.
        let after = snapshot(vec![key(1, 1_000_000, false, 0), key(2, 1, false, 0)], vec![]);
        assert_eq!(tried(&mut chooser, &after), [2]);
        assert_eq!(chooser.attempts(), 2);
    }

    #[test]
    fn outcomes_by_what_happened() {
        let wait = Some(Duration::from_secs(3));
        assert_eq!(
            failed_attempt_outcome(&Failure::Status(429), wait, false),
            HealthOutcome::RateLimited { retry_after: wait }
        );
        for failure in [Failure::Status(500), Failure::Status(401), Failure::Status(403), Failure::Connect] {
            assert_eq!(failed_attempt_outcome(&failure, None, false), HealthOutcome::Failure, "{failure:?}");
        }
        assert_eq!(failed_attempt_outcome(&Failure::Timeout, None, false), HealthOutcome::Failure);
        assert_eq!(failed_attempt_outcome(&Failure::Status(503), None, true), HealthOutcome::Neutral, "buyer left");

        let ttft = Some(Duration::from_millis(40));
        assert_eq!(served_attempt_outcome(200, false, false, ttft), HealthOutcome::Success { ttft });
        assert_eq!(served_attempt_outcome(200, true, false, ttft), HealthOutcome::Failure, "upstream broke off");
        assert_eq!(served_attempt_outcome(200, true, true, ttft), HealthOutcome::Neutral, "buyer broke off");
        for status in [400, 404, 413, 422] {
            assert_eq!(served_attempt_outcome(status, false, false, None), HealthOutcome::Neutral, "{status}");
        }
    }
}
