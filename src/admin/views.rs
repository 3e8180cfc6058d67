//! Response bodies. Explicit structs, never entity models: the encrypted seller key, key hashes and
//! password hashes have no field here to leak through.

use serde::Serialize;
use utoipa::ToSchema;

use crate::accounts::{self, Role};
use crate::db::entities::{buyer_keys, hosted_keys, users};
use crate::db::hosted_keys::utc_day;
use crate::provider::BalanceApi;

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub id: i64,
    pub username: String,
    pub roles: Vec<Role>,
    pub disabled: bool,
    pub created_at_ms: i64,
}

impl From<&users::Model> for UserView {
    fn from(u: &users::Model) -> Self {
        Self {
            id: u.id,
            username: u.username.clone(),
            roles: accounts::roles_of(u),
            disabled: u.disabled,
            created_at_ms: u.created_at_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BuyerKeyView {
    pub id: i64,
    pub name: String,
    /// `tkx-<lookup id>…`: enough to recognise a key, useless to call with.
    pub prefix: String,
    /// None: any model.
    pub models: Option<Vec<String>>,
    /// active | expired | revoked
    #[schema(value_type = String, example = "active")]
    pub status: &'static str,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

impl BuyerKeyView {
    pub fn new(k: &buyer_keys::Model, now_ms: i64) -> Self {
        let status = if k.revoked_at_ms.is_some() {
            "revoked"
        } else if k.expires_at_ms.is_some_and(|t| t <= now_ms) {
            "expired"
        } else {
            "active"
        };
        Self {
            id: k.id,
            name: k.name.clone(),
            prefix: format!("{}{}…", crate::credentials::BUYER_KEY_PREFIX, k.lookup_id),
            models: k.models.as_deref().map(split_models),
            status,
            expires_at_ms: k.expires_at_ms,
            revoked_at_ms: k.revoked_at_ms,
            created_at_ms: k.created_at_ms,
        }
    }
}

/// A new buyer key: the only response that ever carries a key, once.
#[derive(Serialize, ToSchema)]
pub struct CreatedBuyerKey {
    pub key: String,
    #[serde(flatten)]
    pub meta: BuyerKeyView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SellerKeyView {
    pub id: i64,
    pub owner_id: i64,
    pub name: String,
    pub provider: String,
    pub base_url: String,
    pub models: Vec<String>,
    /// e.g. `sk-...wxyz`; the key itself is never returned.
    pub key_hint: String,
    pub status: String,
    /// What put the key in its status: seller, admin, failures, verification, dilution, balance; empty
    /// for an active key.
    pub status_cause: String,
    /// Admin review of a flagged key: empty, pending or confirmed.
    pub review: String,
    /// seller, or platform (a fallback key).
    pub pool: String,
    pub declared_balance: i64,
    pub remaining_balance: i64,
    /// Requests at once per gateway node; 0 = no cap.
    pub max_concurrency: i64,
    /// Credits per UTC day; 0 = no cap.
    pub max_spend_per_day: i64,
    /// Credits earned on the key today (UTC).
    pub spent_today: i64,
    /// The provider balance adapter in effect (set on the key, or derived from its provider); `none`: the
    /// provider has no balance API.
    #[schema(value_type = String, example = "deepseek")]
    pub balance_api: &'static str,
    /// When the provider last confirmed the key; null: deposited without verification.
    pub verified_at_ms: Option<i64>,
    pub success_count: i64,
    pub failure_count: i64,
    pub last_used_at_ms: Option<i64>,
    pub last_failure_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl SellerKeyView {
    pub fn new(k: &hosted_keys::Model, now_ms: i64) -> Self {
        // The counter belongs to the day of its last spend; a key not used today has spent nothing today.
        let spent_today = if k.spend_day == utc_day(now_ms) { k.spent_today } else { 0 };
        Self {
            id: k.id,
            owner_id: k.owner_id,
            name: k.name.clone(),
            provider: k.provider.clone(),
            base_url: k.base_url.clone(),
            models: split_models(&k.models),
            key_hint: k.key_hint.clone(),
            status: k.status.clone(),
            status_cause: k.status_cause.clone(),
            review: k.review.clone(),
            pool: k.pool.clone(),
            declared_balance: k.declared_balance,
            remaining_balance: k.remaining_balance,
            max_concurrency: k.max_concurrency,
            max_spend_per_day: k.max_spend_per_day,
            spent_today,
            balance_api: BalanceApi::of_key(&k.balance_api, &k.provider).as_str(),
            verified_at_ms: k.verified_at_ms,
            success_count: k.success_count,
            failure_count: k.failure_count,
            last_used_at_ms: k.last_used_at_ms,
            last_failure_at_ms: k.last_failure_at_ms,
            created_at_ms: k.created_at_ms,
            updated_at_ms: k.updated_at_ms,
        }
    }
}

impl From<&hosted_keys::Model> for SellerKeyView {
    fn from(k: &hosted_keys::Model) -> Self {
        Self::new(k, crate::now_ms())
    }
}

fn split_models(models: &str) -> Vec<String> {
    models.split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> hosted_keys::Model {
        hosted_keys::Model {
            id: 1,
            uid: "u".into(),
            owner_id: 2,
            name: "k".into(),
            provider: "deepseek".into(),
            base_url: "https://api.deepseek.com".into(),
            models: "deepseek-chat, deepseek-reasoner".into(),
            api_key_enc: "v1.SECRET".into(),
            key_hint: "sk-...abcd".into(),
            status: "active".into(),
            declared_balance: 10,
            remaining_balance: 5,
            failure_count: 0,
            success_count: 0,
            last_used_at_ms: None,
            last_failure_at_ms: None,
            created_at_ms: 0,
            pool: "seller".into(),
            updated_at_ms: 0,
            priority: 0,
            max_concurrency: 3,
            max_spend_per_day: 100,
            spent_today: 42,
            spend_day: utc_day(86_400_000 * 3 + 5),
            balance_api: String::new(),
            verified_at_ms: Some(7),
            next_check_at_ms: 0,
            review: String::new(),
            status_cause: String::new(),
            checked_successes: 0,
            checked_failures: 0,
            pool_changed_at_ms: 0,
        }
    }

    #[test]
    fn seller_key_view_shows_caps_effective_adapter_and_todays_spend_only() {
        let today = 86_400_000 * 3 + 1_000;
        let view = SellerKeyView::new(&key(), today);
        assert_eq!((view.max_concurrency, view.max_spend_per_day, view.spent_today), (3, 100, 42));
        assert_eq!((view.balance_api, view.verified_at_ms), ("deepseek", Some(7)));
        assert_eq!(view.models, ["deepseek-chat", "deepseek-reasoner"]);
        assert_eq!(SellerKeyView::new(&key(), today + 86_400_000).spent_today, 0, "yesterday's spend");
        let none = hosted_keys::Model { balance_api: "none".into(), ..key() };
        assert_eq!(SellerKeyView::new(&none, today).balance_api, "none");
        let json = serde_json::to_string(&view).unwrap();
        assert!(!json.contains("SECRET") && !json.contains("api_key_enc"), "{json}");
    }
}
