//! Credentials the platform issues or checks: buyer API keys, user passwords and admin session tokens.
//!
//! Buyer keys are `tkx-` + an 8-char public lookup id + a 40-char secret, all base62. Only the sha256 of
//! the whole key is stored; the lookup id finds the row without a scan, and the hash comparison is
//! constant-time. Passwords use argon2id. Session tokens are stored as their sha256 only.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::distributions::Alphanumeric;
use rand::rngs::OsRng;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::crypto::Secret;

pub const BUYER_KEY_PREFIX: &str = "tkx-";
pub const LOOKUP_ID_LEN: usize = 8;
const BUYER_SECRET_LEN: usize = 40;
pub const BUYER_KEY_LEN: usize = BUYER_KEY_PREFIX.len() + LOOKUP_ID_LEN + BUYER_SECRET_LEN;
/// 43 base62 characters carry 256 bits.
const SESSION_TOKEN_LEN: usize = 43;
const SESSION_TOKEN_PREFIX: &str = "tkxs-";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("password hashing failed: {0}")]
    Hashing(String),
}

/// Random base62 characters from the operating system's CSPRNG.
pub fn random_base62(len: usize) -> String {
    OsRng.sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

pub fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// A new buyer key: the plaintext is shown to the buyer once; only the lookup id and hash are stored.
#[derive(Debug)]
pub struct GeneratedBuyerKey {
    pub plaintext: Secret,
    pub lookup_id: String,
    /// Hex sha256 of the whole plaintext key.
    pub key_hash: String,
}

pub fn generate_buyer_key() -> GeneratedBuyerKey {
    let lookup_id = random_base62(LOOKUP_ID_LEN);
    let plaintext = format!("{BUYER_KEY_PREFIX}{lookup_id}{}", random_base62(BUYER_SECRET_LEN));
    let key_hash = sha256_hex(&plaintext);
    GeneratedBuyerKey { plaintext: Secret::new(plaintext), lookup_id, key_hash }
}

/// Splits a presented key into its lookup id and the sha256 of the whole key. The format check comes
/// first, so that garbage is rejected without hashing.
pub fn parse_buyer_key(presented: &str) -> Option<(String, [u8; 32])> {
    let body = presented.strip_prefix(BUYER_KEY_PREFIX)?;
    if presented.len() != BUYER_KEY_LEN || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let lookup_id = body.get(..LOOKUP_ID_LEN)?.to_string();
    Some((lookup_id, Sha256::digest(presented.as_bytes()).into()))
}

/// Compares a stored hex hash with a presented key's hash in constant time.
pub fn verify_key_hash(expected_hex: &str, presented_hash: &[u8; 32]) -> bool {
    let mut expected = [0u8; 32];
    if hex::decode_to_slice(expected_hex, &mut expected).is_err() {
        return false;
    }
    expected.ct_eq(presented_hash).into()
}

/// An argon2id PHC string (default parameters: 19 MiB, 2 passes). CPU-heavy: call it off the async
/// executor (`spawn_blocking`).
pub fn hash_password(password: &str) -> Result<String, CredentialError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| CredentialError::Hashing(e.to_string()))
}

/// Whether the password matches the PHC string; a malformed hash never matches. CPU-heavy, like
/// [`hash_password`].
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default().verify_password(password.as_bytes(), &hash).is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the user does not exist, so that a login for an unknown user costs as
/// much as one with a wrong password and does not reveal which usernames exist.
pub fn dummy_password_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&random_base62(20)).unwrap_or_default())
}

/// A new admin session token and the hex sha256 that is stored in its place.
pub fn generate_session_token() -> (Secret, String) {
    let token = format!("{SESSION_TOKEN_PREFIX}{}", random_base62(SESSION_TOKEN_LEN));
    let hash = sha256_hex(&token);
    (Secret::new(token), hash)
}

pub fn hash_session_token(token: &str) -> String {
    sha256_hex(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buyer_keys_have_the_documented_shape() {
        let key = generate_buyer_key();
        let text = key.plaintext.expose();
        assert_eq!(text.len(), BUYER_KEY_LEN);
        assert_eq!(text.len(), 52);
        assert!(text.starts_with("tkx-"));
        assert_eq!(&text[4..12], key.lookup_id);
        assert!(text[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(key.key_hash, sha256_hex(text));
        assert!(!format!("{key:?}").contains(&text[12..]));
        assert_ne!(generate_buyer_key().plaintext, key.plaintext);
    }

    #[test]
    fn presented_keys_parse_and_verify() {
        let key = generate_buyer_key();
        let (lookup_id, hash) = parse_buyer_key(key.plaintext.expose()).unwrap();
        assert_eq!(lookup_id, key.lookup_id);
        assert!(verify_key_hash(&key.key_hash, &hash));

        let other = generate_buyer_key();
        let (_, other_hash) = parse_buyer_key(other.plaintext.expose()).unwrap();
        assert!(!verify_key_hash(&key.key_hash, &other_hash));
        assert!(!verify_key_hash("not hex", &hash));
        assert!(!verify_key_hash(&key.key_hash[..62], &hash));
    }

    #[test]
    fn malformed_keys_are_rejected_before_hashing() {
        let good = generate_buyer_key().plaintext.expose().to_string();
        let wrong_prefix = format!("sk-{}", &good[3..]);
        let too_long = format!("{good}x");
        let bad_char = format!("{}-{}", &good[..20], &good[21..]);
        let non_ascii = format!("{}é", &good[..good.len() - 2]);
        for bad in ["", "tkx-", &good[..51], &too_long, &wrong_prefix, &bad_char, &non_ascii] {
            assert!(parse_buyer_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horsf", &hash));
        assert!(!verify_password("correct horse", "not a phc string"));
        assert_ne!(hash_password("correct horse").unwrap(), hash, "salted");
        assert!(!verify_password("anything", dummy_password_hash()));
    }

    #[test]
    fn session_tokens_are_random_and_stored_as_hashes() {
        let (token, hash) = generate_session_token();
        assert_eq!(hash, hash_session_token(token.expose()));
        assert_eq!(hash.len(), 64);
        assert!(token.expose().len() >= 48);
        assert_ne!(generate_session_token().0, token);
    }
}
