//! Risk control against real databases (SQLite and MariaDB): readings judged into samples, status changes
//! with their events and notifications, windows restarting after a key becomes active again.

use sea_orm::{ActiveValue::Set, DatabaseConnection};

use super::checks::{self, Outcome, Reading};
use super::window::ReadingTimes;
use crate::config::RiskConfig;
use crate::db::entities::{hosted_keys, usage_records};
use crate::db::hosted_keys::{self as keys, tests::new_key};
use crate::db::key_events;
use crate::db::risk::{self as queries, verdict};
use crate::db::testing::TestDb;

const NO_CONFIRM: std::time::Duration = std::time::Duration::ZERO;

fn config() -> RiskConfig {
    RiskConfig {
        dilution_threshold_bps: 1_500,
        dilution_min_excess_credits: 100,
        failure_min_attempts: 10,
        failure_pause_bps: 5_000,
        ..RiskConfig::default()
    }
}

async fn seller(db: &DatabaseConnection) -> i64 {
    let user = crate::db::users::NewUser { username: "seller", password_hash: "h", roles: "seller", now_ms: 1 };
    crate::db::users::insert(db, user).await.unwrap().id
}

async fn key(db: &DatabaseConnection, owner: i64, uid: &str) -> hosted_keys::Model {
    let mut new = new_key(owner, uid);
    new.balance_api = "deepseek".into();
    keys::insert(db, new).await.unwrap()
}

async fn reload(db: &DatabaseConnection, id: i64) -> hosted_keys::Model {
    queries::find_key(db, id).await.unwrap().unwrap()
}

fn reading(t0: i64, balance: i64) -> Reading {
    Reading { times: ReadingTimes { t0, t1: t0 + 5 }, balance: Ok(balance), inflight: 0 }
}

/// A usage record on the key: started at `at`, ran `latency` ms, cost `cost` credits.
async fn usage(db: &DatabaseConnection, key_id: i64, id: &str, at: i64, latency: i64, cost: i64) {
    let row = usage_records::ActiveModel {
        request_id: Set(id.to_string()),
        buyer_id: Set(1),
        buyer_key_id: Set(1),
        hosted_key_id: Set(Some(key_id)),
        model: Set("m".into()),
        endpoint: Set("chat.completions".into()),
        prompt_tokens: Set(1),
        completion_tokens: Set(1),
        estimated: Set(false),
        status_code: Set(200),
        attempts: Set(1),
        latency_ms: Set(latency),
        ttft_ms: Set(None),
        request_bytes: Set(1),
        response_bytes: Set(1),
        client_disconnected: Set(false),
        error_kind: Set(None),
        created_at_ms: Set(at),
        cost_credits: Set(cost),
        unpaid_credits: Set(0),
        hold_id: Set(None),
        fallback: Set(false),
        ..Default::default()
    };
    crate::db::usage_records::insert_batch(db, vec![row]).await.unwrap();
}

fn verdicts(samples: &[queries::Sample]) -> Vec<&str> {
    samples.iter().rev().map(|s| s.verdict.as_str()).collect()
}

#[tokio::test]
async fn an_unexplained_drop_flags_the_key_and_tells_its_owner() {
    for t in TestDb::all().await {
        let db = &t.db;
        let cfg = config();
        let owner = seller(db).await;
        let k = key(db, owner, "uid-a").await;
        let base = k.created_at_ms + 1_000;

        // Baseline, then a window whose drop is exactly what we metered (a request finished in it).
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &reading(base, 100_000), &|_| 0, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        usage(db, k.id, "r1", base + 100, 50, 10_000).await;
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &reading(base + 1_000, 90_000), &|_| 0, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        // A failed reading is stored, and is no window start.
        let failed = Reading { balance: Err("timeout".into()), ..reading(base + 1_500, 0) };
        checks::judge_reading(db, &cfg, &k, &failed, &|_| 0, NO_CONFIRM).await.unwrap();
        // Then 20,000 credits vanish with only 1,000 metered.
        usage(db, k.id, "r2", base + 1_600, 50, 1_000).await;
        let outcome =
            checks::judge_reading(db, &cfg, &k, &reading(base + 2_000, 69_000), &|_| 0, NO_CONFIRM).await.unwrap();
        assert_eq!(outcome, Outcome::Moved("flagged"), "{}", t.label);

        let samples = queries::samples_of(db, k.id, 10).await.unwrap();
        assert_eq!(verdicts(&samples), ["baseline", "ok", "skipped", "diluted"], "{}", t.label);
        let diluted = &samples[0];
        assert_eq!(
            (diluted.balance_credits, diluted.metered_credits, diluted.inflight_credits, diluted.excess_credits),
            (69_000, 1_000, 0, 21_000 - 1_000 - 150 - 100)
        );
        assert_eq!(samples[2].metered_credits, 10_000);

        let row = reload(db, k.id).await;
        assert_eq!(
            (row.status.as_str(), row.status_cause.as_str(), row.review.as_str()),
            ("flagged", "dilution", "pending")
        );
        let events = key_events::for_key(db, k.id, 5).await.unwrap();
        assert_eq!((events[0].to_status.as_str(), events[0].actor_id), ("flagged", None));
        assert!(events[0].reason.contains("21000"), "{}", events[0].reason);
        let notes = key_events::notifications_of(db, owner, 5).await.unwrap();
        assert!(notes[0].message.contains("flagged"), "{}", notes[0].message);

        // The admin clears it: the next reading is a new baseline, not the same drop again.
        super::review::review_key(db, 999, k.id, super::review::ReviewAction::Clear, None).await.unwrap();
        let k = reload(db, k.id).await;
        let later = crate::now_ms() + 10;
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &reading(later, 60_000), &|_| 0, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(queries::samples_of(db, k.id, 1).await.unwrap()[0].verdict, verdict::BASELINE);
        assert_eq!(reload(db, k.id).await.status, "active");
        t.cleanup().await;
    }
}

#[tokio::test]
async fn requests_in_flight_and_top_ups_are_not_dilution() {
    for t in TestDb::all().await {
        let db = &t.db;
        let cfg = config();
        let owner = seller(db).await;
        let k = key(db, owner, "uid-a").await;
        let base = k.created_at_ms + 1_000;
        checks::judge_reading(db, &cfg, &k, &reading(base, 100_000), &|_| 0, NO_CONFIRM).await.unwrap();
        // A slow stream started before the reading and finished after it: charged, but metered next window.
        usage(db, k.id, "slow", base + 500, 3_000, 30_000).await;
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &reading(base + 1_000, 70_000), &|_| 0, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        // Next window: metered 30,000 with no drop at all. Still fine.
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &reading(base + 5_000, 70_000), &|_| 0, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        // A request still running on this node (no record yet): its worst case is the allowance.
        let running = Reading { inflight: 20_000, ..reading(base + 6_000, 50_000) };
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &running, &|_| 0, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        // ... also when only the judgement time sees it.
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &reading(base + 7_000, 30_000), &|_| 20_000, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        // A top-up.
        assert_eq!(
            checks::judge_reading(db, &cfg, &k, &reading(base + 8_000, 1_000_000), &|_| 0, NO_CONFIRM).await.unwrap(),
            Outcome::Unchanged
        );
        let samples = queries::samples_of(db, k.id, 10).await.unwrap();
        assert_eq!(verdicts(&samples), ["baseline", "ok", "ok", "ok", "ok", "ok"], "{}", t.label);
        assert_eq!(samples[4].inflight_credits, 30_000, "the slow stream was in flight");
        assert_eq!(samples[3].metered_credits, 30_000, "and metered once it finished");
        assert_eq!(reload(db, k.id).await.status, "active");
        t.cleanup().await;
    }
}

#[tokio::test]
async fn an_empty_balance_depletes_the_key_until_it_is_topped_up() {
    for t in TestDb::all().await {
        let db = &t.db;
        let cfg = config();
        let owner = seller(db).await;
        let k = key(db, owner, "uid-a").await;
        let base = k.created_at_ms + 1_000;
        checks::judge_reading(db, &cfg, &k, &reading(base, 1_000), &|_| 0, NO_CONFIRM).await.unwrap();
        usage(db, k.id, "r1", base + 10, 10, 1_000).await;
        let outcome = checks::judge_reading(db, &cfg, &k, &reading(base + 1_000, 0), &|_| 0, NO_CONFIRM).await.unwrap();
        assert_eq!(outcome, Outcome::Moved("depleted"), "{}", t.label);
        let row = reload(db, k.id).await;
        assert_eq!((row.status.as_str(), row.status_cause.as_str()), ("depleted", "balance"));

        assert_eq!(checks::judge_recovery(db, &row, &reading(base + 2_000, 0)).await.unwrap(), Outcome::Unchanged);
        let failed = Reading { balance: Err("down".into()), ..reading(base + 2_500, 0) };
        assert_eq!(checks::judge_recovery(db, &row, &failed).await.unwrap(), Outcome::Unchanged);
        assert_eq!(
            checks::judge_recovery(db, &row, &reading(base + 3_000, 5_000)).await.unwrap(),
            Outcome::Moved("active")
        );
        let row = reload(db, k.id).await;
        assert_eq!((row.status.as_str(), row.status_cause.as_str()), ("active", ""));
        let events = key_events::for_key(db, k.id, 5).await.unwrap();
        let trail: Vec<&str> = events.iter().rev().map(|e| e.to_status.as_str()).collect();
        assert_eq!(trail, ["depleted", "active"]);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn keys_without_a_balance_api_deplete_by_the_platforms_metering() {
    for t in TestDb::all().await {
        let db = &t.db;
        let owner = seller(db).await;
        let k = keys::insert(db, new_key(owner, "uid-a")).await.unwrap();
        assert_eq!(checks::check_metered_depletion(db, &k, 10).await.unwrap(), Outcome::Unchanged);
        let spend = keys::KeyOutcome {
            key_id: k.id,
            successes: 1,
            failures: 0,
            last_used_at_ms: None,
            last_failure_at_ms: None,
            spent: k.declared_balance,
        };
        keys::apply_outcomes(db, std::slice::from_ref(&spend)).await.unwrap();
        let k = reload(db, k.id).await;
        assert_eq!(
            checks::check_metered_depletion(db, &k, 11).await.unwrap(),
            Outcome::Moved("depleted"),
            "{}",
            t.label
        );
        let k = reload(db, k.id).await;
        assert_eq!(checks::check_metered_depletion(db, &k, 12).await.unwrap(), Outcome::Unchanged);
        keys::apply_outcomes(db, &[keys::KeyOutcome { spent: -5, ..spend }]).await.unwrap();
        let k = reload(db, k.id).await;
        assert_eq!(checks::check_metered_depletion(db, &k, 13).await.unwrap(), Outcome::Moved("active"));
        t.cleanup().await;
    }
}

#[tokio::test]
async fn failing_keys_are_paused_and_resumed_once_they_verify() {
    for t in TestDb::all().await {
        let db = &t.db;
        let cfg = config();
        let owner = seller(db).await;
        let k = key(db, owner, "uid-a").await;
        let outcome = |successes, failures| keys::KeyOutcome {
            key_id: k.id,
            successes,
            failures,
            last_used_at_ms: None,
            last_failure_at_ms: None,
            spent: 0,
        };
        // A long good run, checked.
        keys::apply_outcomes(db, &[outcome(1_000, 10)]).await.unwrap();
        let row = reload(db, k.id).await;
        assert!(queries::claim_check(db, &row, 1).await.unwrap());
        let row = reload(db, k.id).await;
        assert_eq!(checks::check_failures(db, &cfg, &row, 5).await.unwrap(), Outcome::Unchanged, "nothing since");
        // Then 6 of the next 10 attempts fail: 60 % ≥ 50 %.
        keys::apply_outcomes(db, &[outcome(4, 6)]).await.unwrap();
        let row = reload(db, k.id).await;
        assert!(queries::claim_check(db, &row, 2).await.unwrap());
        let now = crate::now_ms();
        assert_eq!(checks::check_failures(db, &cfg, &row, now).await.unwrap(), Outcome::Moved("paused"), "{}", t.label);
        let row = reload(db, k.id).await;
        assert_eq!((row.status.as_str(), row.status_cause.as_str()), ("paused", "failures"));
        assert_eq!(row.next_check_at_ms, now + i64::try_from(cfg.reverify_interval_ms).unwrap());
        assert_eq!((row.checked_successes, row.checked_failures), (1_004, 16), "the checkpoint moved");
        assert_eq!(queries::due_keys(db, i64::MAX, 10).await.unwrap().len(), 1, "due for re-verification");

        assert_eq!(checks::judge_verification(db, &row, Err("401".into())).await.unwrap(), Outcome::Unchanged);
        assert_eq!(checks::judge_verification(db, &row, Ok(())).await.unwrap(), Outcome::Moved("active"));
        let events = key_events::for_key(db, k.id, 5).await.unwrap();
        assert_eq!((events[0].to_status.as_str(), events[0].actor_id), ("active", None));
        assert!(events[1].reason.starts_with("6 of 10 attempts failed"), "{}", events[1].reason);
        assert_eq!(key_events::notifications_of(db, owner, 5).await.unwrap().len(), 2);

        // A key its seller paused is never resumed by risk control.
        let mine = key(db, owner, "uid-b").await;
        keys::transition_status_with_cause(db, owner, mine.id, "active", "paused", "seller", 3).await.unwrap();
        let mine = reload(db, mine.id).await;
        assert!(queries::due_keys(db, i64::MAX, 10).await.unwrap().iter().all(|k| k.id != mine.id));
        // ... not even when the seller paused it while risk control was verifying it.
        assert_eq!(checks::judge_verification(db, &mine, Ok(())).await.unwrap(), Outcome::Unchanged);
        assert_eq!(reload(db, mine.id).await.status, "paused");
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_usage_record_written_late_clears_a_suspected_window() {
    for t in TestDb::all().await {
        let db = &t.db;
        let cfg = config();
        let owner = seller(db).await;
        let k = key(db, owner, "uid-a").await;
        let base = k.created_at_ms + 1_000;
        checks::judge_reading(db, &cfg, &k, &reading(base, 100_000), &|_| 0, NO_CONFIRM).await.unwrap();
        // The request finished before the reading, but the usage writer is behind: its record lands while the
        // suspected window waits for confirmation.
        let late = {
            let db = db.clone();
            let key_id = k.id;
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                usage(&db, key_id, "late", base + 100, 50, 10_000).await;
            })
        };
        let confirm = std::time::Duration::from_millis(600);
        let outcome = checks::judge_reading(db, &cfg, &k, &reading(base + 1_000, 90_000), &|_| 0, confirm).await;
        late.await.unwrap();
        assert_eq!(outcome.unwrap(), Outcome::Unchanged, "{}", t.label);
        let latest = queries::samples_of(db, k.id, 1).await.unwrap().remove(0);
        assert_eq!((latest.verdict.as_str(), latest.metered_credits), ("ok", 10_000));

        // Nothing arrives for a real drop: flagged after the confirmation.
        let outcome =
            checks::judge_reading(db, &cfg, &k, &reading(base + 2_000, 50_000), &|_| 0, confirm).await.unwrap();
        assert_eq!(outcome, Outcome::Moved("flagged"), "{}", t.label);
        t.cleanup().await;
    }
}
