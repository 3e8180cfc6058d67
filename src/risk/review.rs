//! Admin review of flagged keys: the list of keys waiting for a decision with the evidence (the flagging
//! reason and the latest balance samples), and the decision itself: confirm (the key stays flagged) or
//! clear (the key returns to active, and its next balance reading starts a new window).

use sea_orm::{DatabaseConnection, TransactionTrait};
use serde::{Deserialize, Serialize};

use crate::accounts::AccountError;
use crate::db::entities::hosted_keys;
use crate::db::key_events::{self, NewEvent};
use crate::db::risk::{self as queries, review, Sample, Transition};

/// Samples shown with each key under review.
pub const REVIEW_SAMPLES: u64 = 10;
const MAX_NOTE_CHARS: usize = 200;

/// A seller key as an admin reviews it; never the API key or its ciphertext.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ReviewedKey {
    pub id: i64,
    pub owner_id: i64,
    pub name: String,
    pub provider: String,
    pub base_url: String,
    pub key_hint: String,
    pub status: String,
    pub status_cause: String,
    pub review: String,
    pub pool: String,
    pub balance_api: String,
    pub declared_balance: i64,
    pub remaining_balance: i64,
    pub updated_at_ms: i64,
}

impl From<&hosted_keys::Model> for ReviewedKey {
    fn from(k: &hosted_keys::Model) -> Self {
        Self {
            id: k.id,
            owner_id: k.owner_id,
            name: k.name.clone(),
            provider: k.provider.clone(),
            base_url: k.base_url.clone(),
            key_hint: k.key_hint.clone(),
            status: k.status.clone(),
            status_cause: k.status_cause.clone(),
            review: k.review.clone(),
            pool: k.pool.clone(),
            balance_api: k.balance_api.clone(),
            declared_balance: k.declared_balance,
            remaining_balance: k.remaining_balance,
            updated_at_ms: k.updated_at_ms,
        }
    }
}

/// One flagged key waiting for review.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PendingReview {
    pub key: ReviewedKey,
    pub owner_username: Option<String>,
    /// Why it was flagged (the reason of its latest change to flagged) and when.
    pub reason: Option<String>,
    pub flagged_at_ms: Option<i64>,
    /// The latest balance samples, newest first.
    pub samples: Vec<Sample>,
}

pub async fn pending_reviews(db: &DatabaseConnection) -> Result<Vec<PendingReview>, AccountError> {
    let mut out = Vec::new();
    for key in queries::pending_reviews(db).await? {
        let owner = crate::db::users::find_by_id(db, key.owner_id).await?;
        let flagged = queries::latest_event_to(db, key.id, "flagged").await?;
        let samples = queries::samples_of(db, key.id, REVIEW_SAMPLES).await?;
        out.push(PendingReview {
            key: ReviewedKey::from(&key),
            owner_username: owner.map(|u| u.username),
            reason: flagged.as_ref().map(|e| e.reason.clone()),
            flagged_at_ms: flagged.map(|e| e.created_at_ms),
            samples,
        });
    }
    Ok(out)
}

/// Any key's samples, newest first (an unknown key is not found).
pub async fn key_samples(db: &DatabaseConnection, key_id: i64, limit: u64) -> Result<Vec<Sample>, AccountError> {
    queries::find_key(db, key_id).await?.ok_or(AccountError::NotFound { what: "seller key" })?;
    Ok(queries::samples_of(db, key_id, limit).await?)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReviewAction {
    /// The dilution is real: the key stays flagged (out of routing), review `confirmed`.
    Confirm,
    /// A false alarm: the key returns to active.
    Clear,
}

fn validate_note(note: Option<&str>) -> Result<String, AccountError> {
    let note = note.unwrap_or_default().trim();
    if note.chars().count() > MAX_NOTE_CHARS || note.chars().any(char::is_control) {
        return Err(AccountError::Invalid {
            field: "note".into(),
            message: format!("at most {MAX_NOTE_CHARS} characters, no control characters"),
        });
    }
    Ok(note.to_string())
}

/// Applies an admin's decision on a flagged key, with a key event (the owner is notified). A key that is
/// not flagged, or stops being flagged meanwhile, is a conflict. The caller reloads the pool after a clear.
pub async fn review_key(
    db: &DatabaseConnection,
    admin_id: i64,
    key_id: i64,
    action: ReviewAction,
    note: Option<&str>,
) -> Result<hosted_keys::Model, AccountError> {
    let note = validate_note(note)?;
    let key = queries::find_key(db, key_id).await?.ok_or(AccountError::NotFound { what: "seller key" })?;
    let conflict = |status: &str| AccountError::Conflict {
        message: format!("the key is {status}; only a flagged key can be reviewed"),
    };
    if key.status != "flagged" {
        return Err(conflict(&key.status));
    }
    let now = crate::now_ms();
    let (reason, to) = match action {
        ReviewAction::Confirm => ("flag confirmed by an admin", "flagged"),
        ReviewAction::Clear => ("flag cleared by an admin", "active"),
    };
    let reason = if note.is_empty() { reason.to_string() } else { format!("{reason}: {note}") };
    let txn = db.begin().await?;
    let changed = match action {
        ReviewAction::Confirm => queries::set_review(&txn, key.id, review::CONFIRMED, now).await?,
        ReviewAction::Clear => {
            let clear = Transition {
                key_id: key.id,
                owner_id: key.owner_id,
                from: "flagged",
                to: "active",
                cause: "",
                review: review::NONE,
                // Due now: the next reading is the new window's baseline.
                next_check_at_ms: Some(now),
                only_causes: &[],
                reason: &reason,
                actor_id: Some(admin_id),
                now_ms: now,
            };
            queries::transition(&txn, &clear).await?
        }
    };
    if !changed {
        txn.rollback().await?;
        let current = queries::find_key(db, key_id).await?.map_or_else(|| "gone".to_string(), |k| k.status);
        return Err(conflict(&current));
    }
    if matches!(action, ReviewAction::Confirm) {
        // Not a status change, but part of the key's history all the same.
        let event = NewEvent {
            hosted_key_id: key.id,
            owner_id: key.owner_id,
            from_status: Some("flagged"),
            to_status: to,
            reason: &reason,
            actor_id: Some(admin_id),
            now_ms: now,
        };
        key_events::record(&txn, event).await?;
    }
    txn.commit().await?;
    queries::find_key(db, key_id).await?.ok_or(AccountError::NotFound { what: "seller key" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::hosted_keys::{self as keys, tests::new_key};
    use crate::db::risk::{cause, verdict, NewSample};
    use crate::db::testing::TestDb;

    #[tokio::test]
    async fn confirm_keeps_the_flag_and_clear_restores_the_key() {
        for t in TestDb::all().await {
            let db = &t.db;
            let owner = crate::db::users::insert(
                db,
                crate::db::users::NewUser { username: "seller", password_hash: "h", roles: "seller", now_ms: 1 },
            )
            .await
            .unwrap();
            let key = keys::insert(db, new_key(owner.id, "uid-a")).await.unwrap();
            let other = keys::insert(db, new_key(owner.id, "uid-b")).await.unwrap();
            let flag = Transition {
                key_id: key.id,
                owner_id: owner.id,
                from: "active",
                to: "flagged",
                cause: cause::DILUTION,
                review: review::PENDING,
                next_check_at_ms: None,
                only_causes: &[],
                reason: "balance fell 5000 credits more than metered",
                actor_id: None,
                now_ms: 5,
            };
            assert!(queries::transition(db, &flag).await.unwrap());
            queries::insert_sample(
                db,
                NewSample {
                    hosted_key_id: key.id,
                    taken_at_ms: 4,
                    balance_credits: 10,
                    metered_credits: 1,
                    inflight_credits: 0,
                    excess_credits: 5_000,
                    verdict: verdict::DILUTED,
                },
            )
            .await
            .unwrap();

            let list = pending_reviews(db).await.unwrap();
            assert_eq!(list.len(), 1, "{}", t.label);
            assert_eq!(list[0].key.id, key.id);
            assert_eq!(list[0].owner_username.as_deref(), Some("seller"));
            assert_eq!(list[0].reason.as_deref(), Some("balance fell 5000 credits more than metered"));
            assert_eq!(list[0].samples.len(), 1);

            let err = review_key(db, 99, other.id, ReviewAction::Clear, None).await.unwrap_err();
            assert!(matches!(err, AccountError::Conflict { .. }), "an active key: {err:?}");
            assert!(matches!(
                review_key(db, 99, 12345, ReviewAction::Clear, None).await,
                Err(AccountError::NotFound { .. })
            ));
            assert!(matches!(
                review_key(db, 99, key.id, ReviewAction::Clear, Some("a\u{7}")).await,
                Err(AccountError::Invalid { .. })
            ));

            let confirmed = review_key(db, 99, key.id, ReviewAction::Confirm, Some("seen it")).await.unwrap();
            assert_eq!((confirmed.status.as_str(), confirmed.review.as_str()), ("flagged", "confirmed"));
            assert!(pending_reviews(db).await.unwrap().is_empty(), "reviewed");

            let cleared = review_key(db, 99, key.id, ReviewAction::Clear, None).await.unwrap();
            assert_eq!(
                (cleared.status.as_str(), cleared.status_cause.as_str(), cleared.review.as_str()),
                ("active", "", "")
            );
            assert!(cleared.next_check_at_ms > 0);
            let err = review_key(db, 99, key.id, ReviewAction::Clear, None).await.unwrap_err();
            assert!(matches!(err, AccountError::Conflict { .. }), "no longer flagged: {err:?}");

            let events = key_events::for_key(db, key.id, 10).await.unwrap();
            let summary: Vec<(&str, Option<i64>)> = events.iter().map(|e| (e.to_status.as_str(), e.actor_id)).collect();
            assert_eq!(summary, [("active", Some(99)), ("flagged", Some(99)), ("flagged", None)]);
            assert_eq!(events[1].reason, "flag confirmed by an admin: seen it");
            let notes = key_events::notifications_of(db, owner.id, 10).await.unwrap();
            assert_eq!(notes.len(), 3, "the owner hears of every change");
            assert!(notes[0].message.contains("is now active"), "{}", notes[0].message);

            // A window started before the clear is no longer a window start.
            assert_eq!(queries::latest_event_to(db, key.id, "active").await.unwrap().unwrap().actor_id, Some(99));
            assert_eq!(key_samples(db, key.id, 10).await.unwrap().len(), 1);
            assert!(matches!(key_samples(db, 12345, 10).await, Err(AccountError::NotFound { .. })));
            t.cleanup().await;
        }
    }
}
