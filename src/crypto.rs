//! The secret box for seller API keys: AES-256-GCM under a master key, with key rotation.
//!
//! Stored format: `v1.<kid>.<base64url(nonce || ciphertext || tag)>`, where `kid` is the first 8 hex chars
//! of sha256(master key): it names the key that can open the value without revealing it, so that after a
//! rotation old values still decrypt with a previous key. The associated data binds a ciphertext to its
//! row (`hosted_keys:<uid>`): a value copied into another row does not decrypt.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

const VERSION: &str = "v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Never carries key material or plaintext in its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("the master key must be base64 of exactly 32 bytes")]
    InvalidMasterKey,
    #[error("the stored value is not in the v1 ciphertext format")]
    Malformed,
    #[error("the stored value was encrypted with master key {kid}, which is not configured")]
    UnknownKey { kid: String },
    #[error("decryption failed: wrong key, tampered value, or a value copied from another row")]
    DecryptFailed,
    #[error("encryption failed")]
    EncryptFailed,
    #[error("the decrypted value is not UTF-8")]
    NotUtf8,
}

/// A secret string (an API key, a password, a token) whose `Debug` and `Display` never print it; call
/// [`Secret::expose`] where the value is really needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

struct MasterKey {
    kid: String,
    cipher: Aes256Gcm,
}

impl MasterKey {
    fn new(bytes: &[u8; 32]) -> Self {
        Self { kid: key_id(bytes), cipher: Aes256Gcm::new(bytes.into()) }
    }
}

fn key_id(bytes: &[u8; 32]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..4])
}

/// The current master key (encrypts) and previous ones (still decrypt, during a rotation).
pub struct Keyring {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.kid)
            .field("previous", &self.previous.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    pub fn new(current: [u8; 32], previous: Vec<[u8; 32]>) -> Self {
        let current = MasterKey::new(&current);
        let previous = previous.iter().map(MasterKey::new).filter(|k| k.kid != current.kid).collect();
        Self { current, previous }
    }

    /// The id of the key new values are encrypted with.
    pub fn current_kid(&self) -> &str {
        &self.current.kid
    }

    /// Encrypts under the current key with a fresh random nonce.
    ///
    /// AES-GCM fails only for plaintexts over 64 GiB, which no caller can produce; if it ever did, the
    /// returned value would be one that never decrypts. Use [`Keyring::try_encrypt`] to see the error.
    pub fn encrypt(&self, plaintext: &str, aad: &str) -> String {
        self.try_encrypt(plaintext, aad).unwrap_or_else(|e| {
            tracing::error!(error = %e, "encryption failed");
            format!("{VERSION}.{}.", self.current.kid)
        })
    }

    pub fn try_encrypt(&self, plaintext: &str, aad: &str) -> Result<String, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .current
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext.as_bytes(), aad: aad.as_bytes() })
            .map_err(|_| CryptoError::EncryptFailed)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(format!("{VERSION}.{}.{}", self.current.kid, URL_SAFE_NO_PAD.encode(blob)))
    }

    /// Decrypts with whichever configured key the value names.
    pub fn decrypt(&self, stored: &str, aad: &str) -> Result<Secret, CryptoError> {
        let (kid, blob) = parse_stored(stored)?;
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.kid == kid)
            .ok_or_else(|| CryptoError::UnknownKey { kid: kid.to_string() })?;
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let plaintext = key
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: aad.as_bytes() })
            .map_err(|_| CryptoError::DecryptFailed)?;
        String::from_utf8(plaintext).map(Secret).map_err(|_| CryptoError::NotUtf8)
    }

    /// Whether the value is not encrypted under the current key (or not in the current format).
    pub fn needs_rotation(&self, stored: &str) -> bool {
        parse_stored(stored).map_or(true, |(kid, _)| kid != self.current.kid)
    }

    /// Re-encrypts a value under the current key (same associated data).
    pub fn rotate(&self, stored: &str, aad: &str) -> Result<String, CryptoError> {
        let secret = self.decrypt(stored, aad)?;
        self.try_encrypt(secret.expose(), aad)
    }
}

/// Splits `v1.<kid>.<payload>` and decodes the payload, checking it holds at least a nonce and a tag.
fn parse_stored(stored: &str) -> Result<(&str, Vec<u8>), CryptoError> {
    let mut parts = stored.splitn(3, '.');
    let (Some(VERSION), Some(kid), Some(payload)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(CryptoError::Malformed);
    };
    if kid.len() != 8 || !kid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(CryptoError::Malformed);
    }
    let blob = URL_SAFE_NO_PAD.decode(payload).map_err(|_| CryptoError::Malformed)?;
    if blob.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed);
    }
    Ok((kid, blob))
}

/// Parses a master key given as base64 (standard or URL-safe, padded or not) of exactly 32 bytes.
pub fn parse_master_key(b64: &str) -> Result<[u8; 32], CryptoError> {
    let text = b64.trim();
    let bytes = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or(CryptoError::InvalidMasterKey)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| CryptoError::InvalidMasterKey)
}

pub fn generate_master_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    key
}

/// A display hint for an API key that reveals only what helps its owner recognise it: the provider
/// prefix (`sk-`, when short) and the last 4 characters, e.g. `sk-...wxyz`. Keys too short to hide
/// anything show at most their last 2 characters.
pub fn mask_api_key(key: &str) -> String {
    const MAX_PREFIX: usize = 8;
    let chars: Vec<char> = key.chars().collect();
    let n = chars.len();
    let tail = |k: usize| chars.iter().skip(n.saturating_sub(k)).collect::<String>();
    if n < 12 {
        return if n >= 6 { format!("...{}", tail(2)) } else { "...".to_string() };
    }
    let prefix = match chars.iter().position(|&c| c == '-') {
        // The prefix and the tail together must leave most of the key hidden.
        Some(dash) if dash < MAX_PREFIX && dash + 1 + 4 + 8 <= n => chars.iter().take(dash + 1).collect(),
        _ => String::new(),
    };
    format!("{prefix}...{}", tail(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: &str = "hosted_keys:0190f5e4-0000-7000-8000-000000000001";

    fn keyring() -> Keyring {
        Keyring::new([7u8; 32], vec![])
    }

    #[test]
    fn round_trip_in_the_versioned_format() {
        let ring = keyring();
        let stored = ring.encrypt("sk-secret-value", AAD);
        let parts: Vec<&str> = stored.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "v1");
        assert_eq!(parts[1], key_id(&[7u8; 32]));
        assert_eq!(parts[1].len(), 8);
        assert!(!stored.contains("sk-secret-value"));
        assert_eq!(ring.decrypt(&stored, AAD).unwrap().expose(), "sk-secret-value");
        assert_eq!(ring.decrypt(&ring.encrypt("", AAD), AAD).unwrap().expose(), "");
    }

    #[test]
    fn every_encryption_uses_a_fresh_nonce() {
        let ring = keyring();
        assert_ne!(ring.encrypt("same", AAD), ring.encrypt("same", AAD));
    }

    #[test]
    fn a_tampered_ciphertext_fails() {
        let ring = keyring();
        let stored = ring.encrypt("sk-secret-value", AAD);
        let (head, payload) = stored.rsplit_once('.').unwrap();
        let mut blob = URL_SAFE_NO_PAD.decode(payload).unwrap();
        for i in [0, NONCE_LEN, blob.len() - 1] {
            blob[i] ^= 1;
            let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&blob));
            assert_eq!(ring.decrypt(&tampered, AAD).unwrap_err(), CryptoError::DecryptFailed);
            blob[i] ^= 1;
        }
        let truncated = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&blob[..NONCE_LEN + TAG_LEN - 1]));
        assert_eq!(ring.decrypt(&truncated, AAD).unwrap_err(), CryptoError::Malformed);
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_fails() {
        let ring = keyring();
        let stored = ring.encrypt("sk-secret-value", "hosted_keys:a");
        assert_eq!(ring.decrypt(&stored, "hosted_keys:b").unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn a_rotated_keyring_decrypts_old_values_and_flags_them() {
        let old = Keyring::new([1u8; 32], vec![]);
        let stored = old.encrypt("sk-old", AAD);
        let rotated = Keyring::new([2u8; 32], vec![[1u8; 32]]);
        assert_eq!(rotated.decrypt(&stored, AAD).unwrap().expose(), "sk-old");
        assert!(rotated.needs_rotation(&stored));
        let fresh = rotated.rotate(&stored, AAD).unwrap();
        assert!(!rotated.needs_rotation(&fresh));
        assert_eq!(rotated.decrypt(&fresh, AAD).unwrap().expose(), "sk-old");
        assert!(rotated.needs_rotation("garbage"));

        let without_old = Keyring::new([2u8; 32], vec![]);
        let err = without_old.decrypt(&stored, AAD).unwrap_err();
        assert_eq!(err, CryptoError::UnknownKey { kid: key_id(&[1u8; 32]) });
    }

    #[test]
    fn malformed_values_are_rejected() {
        let ring = keyring();
        let kid = ring.current_kid().to_string();
        for bad in ["", "v1", "v1.abc", "v2.00000000.AAAA", &format!("v1.{kid}.!!!"), "v1.XYZXYZXY.AAAA"] {
            assert_eq!(ring.decrypt(bad, AAD).unwrap_err(), CryptoError::Malformed, "{bad}");
        }
    }

    #[test]
    fn master_keys_parse_from_base64_only_at_32_bytes() {
        let key = generate_master_key();
        assert_ne!(key, generate_master_key());
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            assert_eq!(parse_master_key(&format!(" {}\n", engine.encode(key))).unwrap(), key);
        }
        let short = STANDARD.encode([0u8; 31]);
        let err = parse_master_key(&short).unwrap_err();
        assert_eq!(err, CryptoError::InvalidMasterKey);
        assert!(!err.to_string().contains(&short));
        assert!(parse_master_key("not base64 at all!").is_err());
    }

    #[test]
    fn secrets_never_print_their_value() {
        let secret = Secret::new("sk-very-secret".into());
        assert!(!format!("{secret:?} {secret}").contains("very"));
        assert_eq!(secret.expose(), "sk-very-secret");
        let ring = keyring();
        assert!(!format!("{ring:?}").contains("[7"));
    }

    #[test]
    fn api_keys_are_masked() {
        assert_eq!(mask_api_key("sk-proj-abcdefghijklmnopqrstuvwxyz"), "sk-...wxyz");
        assert_eq!(mask_api_key("sk-ant-api03-abcdefghijwxyz"), "sk-...wxyz");
        assert_eq!(mask_api_key("AIzaSyAbcdefghijklmnopwxyz"), "...wxyz");
        assert_eq!(mask_api_key("averyveryverylongprefix-abcdefghwxyz"), "...wxyz");
        assert_eq!(mask_api_key("sk-abcdefgh"), "...gh");
        assert_eq!(mask_api_key("sk-abcdefghi"), "...fghi");
        assert_eq!(mask_api_key("abc"), "...");
        assert_eq!(mask_api_key(""), "...");
        assert!(mask_api_key(&"x".repeat(512)).len() <= 32);
    }
}
