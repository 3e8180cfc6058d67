//! Response bodies. Explicit structs, never entity models: the encrypted seller key, key hashes and
//! password hashes have no field here to leak through.

use serde::Serialize;

use crate::accounts::{self, Role};
use crate::db::entities::{buyer_keys, hosted_keys, users};

#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct BuyerKeyView {
    pub id: i64,
    pub name: String,
    /// `tkx-<lookup id>…`: enough to recognise a key, useless to call with.
    pub prefix: String,
    /// None: any model.
    pub models: Option<Vec<String>>,
    /// active | expired | revoked
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
#[derive(Serialize)]
pub struct CreatedBuyerKey {
    pub key: String,
    #[serde(flatten)]
    pub meta: BuyerKeyView,
}

#[derive(Debug, Serialize)]
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
    pub declared_balance: i64,
    pub remaining_balance: i64,
    pub success_count: i64,
    pub failure_count: i64,
    pub last_used_at_ms: Option<i64>,
    pub last_failure_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl From<&hosted_keys::Model> for SellerKeyView {
    fn from(k: &hosted_keys::Model) -> Self {
        Self {
            id: k.id,
            owner_id: k.owner_id,
            name: k.name.clone(),
            provider: k.provider.clone(),
            base_url: k.base_url.clone(),
            models: split_models(&k.models),
            key_hint: k.key_hint.clone(),
            status: k.status.clone(),
            declared_balance: k.declared_balance,
            remaining_balance: k.remaining_balance,
            success_count: k.success_count,
            failure_count: k.failure_count,
            last_used_at_ms: k.last_used_at_ms,
            last_failure_at_ms: k.last_failure_at_ms,
            created_at_ms: k.created_at_ms,
            updated_at_ms: k.updated_at_ms,
        }
    }
}

fn split_models(models: &str) -> Vec<String> {
    models.split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect()
}
