//! One key's scheduled check, claimed by one node: the failure-rate check and the balance/dilution check of
//! an active key, the recovery of a depleted key, and the re-verification of a key risk control paused.
//! Every status change is conditional on the status read (a concurrent change wins), is recorded as a key
//! event with the platform as actor (the owner is notified) in the same transaction, and reloads the pool.

use std::time::Duration;

use sea_orm::{DatabaseConnection, DbErr, TransactionTrait};
use tokio::sync::watch;

use super::failures::FailureWindow;
use super::window::{self, ReadingTimes, Tolerance, UsageSpan, MAX_REQUEST_MS};
use super::RiskContext;
use crate::accounts::hosted_key_aad;
use crate::config::RiskConfig;
use crate::db::entities::hosted_keys;
use crate::db::risk::{self as queries, cause, review, verdict, NewSample, Transition};
use crate::metrics::METRICS;
use crate::provider::{Balance, BalanceApi, Currency};

const ACTIVE: &str = "active";
const PAUSED: &str = "paused";
const DEPLETED: &str = "depleted";
const FLAGGED: &str = "flagged";

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// How long until the key is checked again after a claim now.
pub(crate) fn interval_for(key: &hosted_keys::Model, config: &RiskConfig) -> i64 {
    if key.status == PAUSED {
        ms(config.reverify_interval_ms)
    } else {
        ms(config.check_interval_ms)
    }
}

/// A provider balance in credits at the configured rates.
pub(crate) fn balance_credits(balance: Balance, config: &RiskConfig) -> i64 {
    let rate = match balance.currency {
        Currency::Usd => config.credits_per_usd,
        Currency::Cny => config.credits_per_cny,
    };
    window::micros_to_credits(balance.micros, rate)
}

/// What a check did, for metrics and the pool reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing to change.
    Unchanged,
    /// The key moved to this status.
    Moved(&'static str),
}

/// A change of the key's status by risk control, with its event, in one transaction; `sample` is stored
/// with it (whether or not the change still applies). Returns whether the key changed.
async fn move_key(
    db: &DatabaseConnection,
    key: &hosted_keys::Model,
    change: Transition<'_>,
    reason: &str,
    sample: Option<NewSample<'_>>,
) -> Result<bool, DbErr> {
    let txn = db.begin().await?;
    if let Some(sample) = sample {
        queries::insert_sample(&txn, sample).await?;
    }
    let changed = queries::transition(&txn, &Transition { reason, ..change.clone() }).await?;
    txn.commit().await?;
    if changed {
        METRICS.risk_transitions.with_label_values(&[change.to]).inc();
        tracing::info!(
            key_id = key.id,
            from = change.from,
            to = change.to,
            reason,
            "risk control changed a key's status"
        );
    }
    Ok(changed)
}

/// A plain status change of the key (no review, next check unchanged).
fn status_change<'a>(key: &hosted_keys::Model, from: &'a str, to: &'a str, cause: &'a str, now: i64) -> Transition<'a> {
    Transition {
        key_id: key.id,
        owner_id: key.owner_id,
        from,
        to,
        cause,
        review: review::NONE,
        next_check_at_ms: None,
        only_causes: &[],
        reason: "",
        actor_id: None,
        now_ms: now,
    }
}

/// The failure-rate check over the attempts since the previous check (the claim moved the checkpoint).
pub(crate) async fn check_failures(
    db: &DatabaseConnection,
    config: &RiskConfig,
    key: &hosted_keys::Model,
    now: i64,
) -> Result<Outcome, DbErr> {
    let window =
        FailureWindow::between(key.success_count, key.failure_count, key.checked_successes, key.checked_failures);
    if !window.should_pause(config.failure_min_attempts, config.failure_pause_bps) {
        METRICS.risk_checks.with_label_values(&["failures", "ok"]).inc();
        return Ok(Outcome::Unchanged);
    }
    METRICS.risk_checks.with_label_values(&["failures", "paused"]).inc();
    let reason = format!(
        "{} of {} attempts failed since the last check (the limit is {}.{:02} %); it is verified again later",
        window.failures,
        window.attempts,
        config.failure_pause_bps / 100,
        config.failure_pause_bps % 100
    );
    let change = Transition {
        next_check_at_ms: Some(now.saturating_add(ms(config.reverify_interval_ms))),
        ..status_change(key, ACTIVE, PAUSED, cause::FAILURES, now)
    };
    Ok(if move_key(db, key, change, &reason, None).await? { Outcome::Moved(PAUSED) } else { Outcome::Unchanged })
}

/// Keys without a balance API: the platform's own metering says when the declared balance is used up.
pub(crate) async fn check_metered_depletion(
    db: &DatabaseConnection,
    key: &hosted_keys::Model,
    now: i64,
) -> Result<Outcome, DbErr> {
    let used_up = key.declared_balance > 0 && key.remaining_balance <= 0;
    let (from, to, reason) = match (key.status.as_str(), used_up) {
        (ACTIVE, true) => {
            (ACTIVE, DEPLETED, format!("its declared balance of {} credits is used up", key.declared_balance))
        }
        (DEPLETED, false) => {
            (DEPLETED, ACTIVE, format!("{} credits of its declared balance are left", key.remaining_balance))
        }
        _ => return Ok(Outcome::Unchanged),
    };
    let cause = if to == DEPLETED { cause::BALANCE } else { "" };
    let change = status_change(key, from, to, cause, now);
    Ok(if move_key(db, key, change, &reason, None).await? { Outcome::Moved(to) } else { Outcome::Unchanged })
}

/// One provider balance reading of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reading {
    pub times: ReadingTimes,
    /// The balance in credits, or why it could not be read.
    pub balance: Result<i64, String>,
    /// This node's worst-case credits in flight on the key around the reading.
    pub inflight: i64,
}

/// This node's worst-case credits in flight on a key, now.
pub(crate) type Inflight<'a> = &'a (dyn Fn(i64) -> i64 + Send + Sync);

/// The window from `previous` to the reading, judged with the usage records written by now.
async fn evaluate(
    db: &DatabaseConnection,
    config: &RiskConfig,
    key_id: i64,
    previous: &queries::Sample,
    balance: i64,
    reading: &Reading,
    inflight_now: i64,
) -> Result<window::Judgement, DbErr> {
    let from = previous.taken_at_ms.saturating_sub(MAX_REQUEST_MS);
    let rows = queries::usage_rows(db, key_id, from, reading.times.t1).await?;
    let spans: Vec<UsageSpan> = rows
        .iter()
        .map(|r| UsageSpan { started_at_ms: r.created_at_ms, latency_ms: r.latency_ms, credits: r.credits })
        .collect();
    let usage = window::window_usage(&spans, previous.taken_at_ms, reading.times);
    let allowance = usage.recorded_in_flight.saturating_add(reading.inflight.max(inflight_now).max(0));
    let tolerance = Tolerance {
        threshold_bps: config.dilution_threshold_bps,
        min_excess_credits: config.dilution_min_excess_credits,
    };
    Ok(window::judge(previous.balance_credits, balance, usage.metered, allowance, tolerance))
}

/// Judges a reading of an active key once the settle delay has passed: stores the sample and flags the key
/// when its window shows dilution, or marks it depleted when its balance is gone. A window that looks
/// diluted is judged again after `confirm_delay`, with the usage records written meanwhile: a usage writer
/// that lags behind the settle delay (a loaded node, a slow database) must not flag an honest key.
pub(crate) async fn judge_reading(
    db: &DatabaseConnection,
    config: &RiskConfig,
    key: &hosted_keys::Model,
    reading: &Reading,
    inflight: Inflight<'_>,
    confirm_delay: Duration,
) -> Result<Outcome, DbErr> {
    let t0 = reading.times.t0;
    let balance = match &reading.balance {
        Ok(balance) => *balance,
        Err(error) => {
            METRICS.risk_checks.with_label_values(&["balance", "error"]).inc();
            tracing::warn!(key_id = key.id, %error, "cannot read a key's provider balance");
            let sample = skipped_sample(key.id, t0);
            queries::insert_sample(db, sample).await?;
            return Ok(Outcome::Unchanged);
        }
    };
    // Readings from before the key last became active do not start a window.
    let activated_at =
        queries::latest_event_to(db, key.id, ACTIVE).await?.map_or(key.created_at_ms, |e| e.created_at_ms);
    let Some(previous) = queries::window_start(db, key.id, activated_at, t0).await? else {
        METRICS.risk_checks.with_label_values(&["balance", "baseline"]).inc();
        let sample = NewSample {
            hosted_key_id: key.id,
            taken_at_ms: t0,
            balance_credits: balance,
            metered_credits: 0,
            inflight_credits: 0,
            excess_credits: 0,
            verdict: verdict::BASELINE,
        };
        return deplete_or_store(db, key, balance, sample, crate::now_ms()).await;
    };
    let mut judgement = evaluate(db, config, key.id, &previous, balance, reading, inflight(key.id)).await?;
    if judgement.diluted() && !confirm_delay.is_zero() {
        tokio::time::sleep(confirm_delay).await;
        judgement = evaluate(db, config, key.id, &previous, balance, reading, inflight(key.id)).await?;
    }
    let now = crate::now_ms();
    let sample = NewSample {
        hosted_key_id: key.id,
        taken_at_ms: t0,
        balance_credits: balance,
        metered_credits: judgement.metered,
        inflight_credits: judgement.allowance,
        excess_credits: judgement.excess,
        verdict: if judgement.diluted() { verdict::DILUTED } else { verdict::OK },
    };
    if !judgement.diluted() {
        METRICS.risk_checks.with_label_values(&["balance", "ok"]).inc();
        return deplete_or_store(db, key, balance, sample, now).await;
    }
    METRICS.risk_checks.with_label_values(&["balance", "diluted"]).inc();
    let reason = format!(
        "its provider balance fell by {} credits since {} while the platform metered {} (+{} in flight): {} credits unexplained",
        judgement.drop, previous.taken_at_ms, judgement.metered, judgement.allowance, judgement.excess
    );
    tracing::warn!(
        key_id = key.id,
        owner_id = key.owner_id,
        drop = judgement.drop,
        metered = judgement.metered,
        allowance = judgement.allowance,
        excess = judgement.excess,
        "dilution detected"
    );
    let change = Transition { review: review::PENDING, ..status_change(key, ACTIVE, FLAGGED, cause::DILUTION, now) };
    Ok(if move_key(db, key, change, &reason, Some(sample)).await? {
        Outcome::Moved(FLAGGED)
    } else {
        Outcome::Unchanged
    })
}

fn skipped_sample(key_id: i64, t0: i64) -> NewSample<'static> {
    NewSample {
        hosted_key_id: key_id,
        taken_at_ms: t0,
        balance_credits: 0,
        metered_credits: 0,
        inflight_credits: 0,
        excess_credits: 0,
        verdict: verdict::SKIPPED,
    }
}

/// Stores the sample; an active key whose provider balance is gone is marked depleted with it.
async fn deplete_or_store(
    db: &DatabaseConnection,
    key: &hosted_keys::Model,
    balance: i64,
    sample: NewSample<'_>,
    now: i64,
) -> Result<Outcome, DbErr> {
    if balance > 0 || key.status != ACTIVE {
        queries::insert_sample(db, sample).await?;
        return Ok(Outcome::Unchanged);
    }
    let reason = format!("its provider balance is {balance} credits");
    let change = status_change(key, ACTIVE, DEPLETED, cause::BALANCE, now);
    Ok(if move_key(db, key, change, &reason, Some(sample)).await? {
        Outcome::Moved(DEPLETED)
    } else {
        Outcome::Unchanged
    })
}

/// A platform key's reading only tells whether its balance is gone.
pub(crate) async fn judge_platform_reading(
    db: &DatabaseConnection,
    key: &hosted_keys::Model,
    reading: &Reading,
) -> Result<Outcome, DbErr> {
    match &reading.balance {
        Ok(balance) => {
            METRICS.risk_checks.with_label_values(&["balance", "ok"]).inc();
            let sample = NewSample {
                hosted_key_id: key.id,
                taken_at_ms: reading.times.t0,
                balance_credits: *balance,
                metered_credits: 0,
                inflight_credits: 0,
                excess_credits: 0,
                verdict: verdict::BASELINE,
            };
            deplete_or_store(db, key, *balance, sample, crate::now_ms()).await
        }
        Err(error) => {
            METRICS.risk_checks.with_label_values(&["balance", "error"]).inc();
            tracing::warn!(key_id = key.id, %error, "cannot read a platform key's provider balance");
            queries::insert_sample(db, skipped_sample(key.id, reading.times.t0)).await?;
            Ok(Outcome::Unchanged)
        }
    }
}

/// A depleted key with a balance API returns to active once its provider balance is positive again. The
/// reading is stored as a baseline; the key's return to active makes the next reading a new baseline anyway.
pub(crate) async fn judge_recovery(
    db: &DatabaseConnection,
    key: &hosted_keys::Model,
    reading: &Reading,
) -> Result<Outcome, DbErr> {
    let now = crate::now_ms();
    let balance = match &reading.balance {
        Ok(balance) => *balance,
        Err(error) => {
            METRICS.risk_checks.with_label_values(&["balance", "error"]).inc();
            tracing::warn!(key_id = key.id, %error, "cannot read a depleted key's provider balance");
            queries::insert_sample(db, skipped_sample(key.id, reading.times.t0)).await?;
            return Ok(Outcome::Unchanged);
        }
    };
    let sample = NewSample {
        hosted_key_id: key.id,
        taken_at_ms: reading.times.t0,
        balance_credits: balance,
        metered_credits: 0,
        inflight_credits: 0,
        excess_credits: 0,
        verdict: verdict::BASELINE,
    };
    if balance <= 0 {
        METRICS.risk_checks.with_label_values(&["balance", "depleted"]).inc();
        queries::insert_sample(db, sample).await?;
        return Ok(Outcome::Unchanged);
    }
    METRICS.risk_checks.with_label_values(&["balance", "recovered"]).inc();
    let reason = format!("its provider balance is {balance} credits again");
    let change = status_change(key, DEPLETED, ACTIVE, "", now);
    Ok(if move_key(db, key, change, &reason, Some(sample)).await? {
        Outcome::Moved(ACTIVE)
    } else {
        Outcome::Unchanged
    })
}

/// A key paused by risk control is resumed when it verifies again.
pub(crate) async fn judge_verification(
    db: &DatabaseConnection,
    key: &hosted_keys::Model,
    verified: Result<(), String>,
) -> Result<Outcome, DbErr> {
    if let Err(error) = verified {
        METRICS.risk_checks.with_label_values(&["verify", "failed"]).inc();
        tracing::info!(key_id = key.id, %error, "a paused key still fails verification");
        return Ok(Outcome::Unchanged);
    }
    METRICS.risk_checks.with_label_values(&["verify", "ok"]).inc();
    let change = Transition {
        only_causes: &[cause::FAILURES, cause::VERIFICATION],
        ..status_change(key, PAUSED, ACTIVE, "", crate::now_ms())
    };
    let reason = "it passed verification again";
    Ok(if move_key(db, key, change, reason, None).await? { Outcome::Moved(ACTIVE) } else { Outcome::Unchanged })
}

/// Reads the key's provider balance, then waits the settle delay (so that the usage records of requests
/// that finished before the reading are written). None when shutdown came first.
async fn read_balance(
    ctx: &RiskContext,
    key: &hosted_keys::Model,
    api: BalanceApi,
    api_key: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Reading> {
    let t0 = crate::now_ms();
    let inflight_before = (ctx.inflight)(key.id);
    let result = ctx.provider.balance(api, &key.base_url, api_key).await;
    let t1 = crate::now_ms();
    let inflight = inflight_before.max((ctx.inflight)(key.id));
    let balance = result.map(|b| balance_credits(b, &ctx.config)).map_err(|e| e.to_string());
    let settle = tokio::time::sleep(Duration::from_millis(ctx.config.settle_delay_ms));
    tokio::select! {
        () = settle => {}
        _ = shutdown.wait_for(|stop| *stop) => return None,
    }
    Some(Reading { times: ReadingTimes { t0, t1 }, balance, inflight })
}

/// Runs the check of one claimed key.
pub(crate) async fn check_key(
    ctx: &RiskContext,
    key: hosted_keys::Model,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Outcome, DbErr> {
    let now = crate::now_ms();
    let api = BalanceApi::of_key(&key.balance_api, &key.provider);
    let secret = || match ctx.keyring.decrypt(&key.api_key_enc, &hosted_key_aad(&key.uid)) {
        Ok(secret) => Some(secret),
        Err(e) => {
            tracing::error!(key_id = key.id, error = %e, "cannot decrypt a seller key for its risk check");
            None
        }
    };
    match key.status.as_str() {
        ACTIVE => {
            if check_failures(&ctx.db, &ctx.config, &key, now).await? != Outcome::Unchanged {
                return Ok(Outcome::Moved(PAUSED));
            }
            if api == BalanceApi::None {
                return check_metered_depletion(&ctx.db, &key, now).await;
            }
            let Some(api_key) = secret() else { return Ok(Outcome::Unchanged) };
            let Some(reading) = read_balance(ctx, &key, api, api_key.expose(), &mut shutdown).await else {
                return Ok(Outcome::Unchanged);
            };
            // Platform keys are the platform's own (it may use them elsewhere): no dilution check.
            if key.pool == "platform" {
                return judge_platform_reading(&ctx.db, &key, &reading).await;
            }
            // A window that looks diluted is confirmed after twice the settle delay.
            let confirm = Duration::from_millis(ctx.config.settle_delay_ms.saturating_mul(2));
            judge_reading(&ctx.db, &ctx.config, &key, &reading, ctx.inflight.as_ref(), confirm).await
        }
        DEPLETED => {
            if api == BalanceApi::None {
                return check_metered_depletion(&ctx.db, &key, now).await;
            }
            let Some(api_key) = secret() else { return Ok(Outcome::Unchanged) };
            match read_balance(ctx, &key, api, api_key.expose(), &mut shutdown).await {
                Some(reading) => judge_recovery(&ctx.db, &key, &reading).await,
                None => Ok(Outcome::Unchanged),
            }
        }
        PAUSED => {
            let Some(api_key) = secret() else { return Ok(Outcome::Unchanged) };
            let models: Vec<String> =
                key.models.split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect();
            let verified = ctx.provider.verify(&key.base_url, api_key.expose(), &models).await;
            judge_verification(&ctx.db, &key, verified.map(|_| ()).map_err(|e| e.to_string())).await
        }
        _ => Ok(Outcome::Unchanged),
    }
}
