//! Secrets at rest and API keys.
//!
//! Project passwords and cluster admin URLs are sealed with XChaCha20-Poly1305 under the
//! control plane's secret key (`CAPY_SECRET_KEY`); the random nonce is stored in front
//! of the ciphertext. API keys are never stored: only their SHA-256.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore as _;
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 24;
pub const API_KEY_PREFIX: &str = "capy_live_";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secret key must be 32 bytes, given as 64 hex characters or base64")]
    BadKey,
    #[error("a sealed secret could not be opened (wrong secret key or corrupted data)")]
    Open,
}

/// Seals and opens secrets with the control plane's key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// Parses a key written as 64 hex characters or as base64 of 32 bytes.
    pub fn from_key_text(text: &str) -> Result<Self, SecretError> {
        let text = text.trim();
        let bytes = hex::decode(text)
            .ok()
            .or_else(|| base64::engine::general_purpose::STANDARD.decode(text).ok())
            .filter(|b| b.len() == 32)
            .ok_or(SecretError::BadKey)?;
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| SecretError::BadKey)?;
        Ok(Self { cipher })
    }

    /// A new random key, as 64 hex characters.
    pub fn generate_key_text() -> String {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        hex::encode(key)
    }

    pub fn seal(&self, plaintext: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), plaintext.as_bytes())
            // Encryption fails only for messages beyond 256 GiB.
            .unwrap_or_default();
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    pub fn open(&self, sealed: &[u8]) -> Result<String, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Open);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let plaintext = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), ciphertext)
            .map_err(|_| SecretError::Open)?;
        String::from_utf8(plaintext).map_err(|_| SecretError::Open)
    }
}

/// A random password of 32 URL-safe characters (192 bits).
pub fn generate_password() -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A freshly generated API key: the plaintext (shown once) and what is stored.
pub struct NewApiKey {
    pub plaintext: String,
    pub prefix: String,
    pub hash: Vec<u8>,
}

pub fn generate_api_key() -> NewApiKey {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let plaintext = format!("{API_KEY_PREFIX}{}", hex::encode(bytes));
    NewApiKey {
        prefix: plaintext[..API_KEY_PREFIX.len() + 8].to_string(),
        hash: hash_api_key(&plaintext),
        plaintext,
    }
}

/// Whether a presented key has the shape of a capy key (checked before any lookup).
pub fn is_well_formed_api_key(key: &str) -> bool {
    key.strip_prefix(API_KEY_PREFIX)
        .is_some_and(|rest| rest.len() == 64 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub fn hash_api_key(plaintext: &str) -> Vec<u8> {
    Sha256::digest(plaintext.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secret_opens_only_with_its_key() {
        let key = SecretBox::generate_key_text();
        let secret_box = SecretBox::from_key_text(&key).unwrap();
        let sealed = secret_box.seal("hunter2");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(secret_box.open(&sealed).unwrap(), "hunter2");

        let other = SecretBox::from_key_text(&SecretBox::generate_key_text()).unwrap();
        assert!(other.open(&sealed).is_err());
        assert!(secret_box.open(&sealed[..10]).is_err());
    }

    #[test]
    fn key_text_must_be_32_bytes() {
        assert!(SecretBox::from_key_text("abcd").is_err());
        assert!(SecretBox::from_key_text(&"0".repeat(64)).is_ok());
    }

    #[test]
    fn api_keys_are_well_formed_and_hashed() {
        let key = generate_api_key();
        assert!(is_well_formed_api_key(&key.plaintext));
        assert!(key.plaintext.starts_with(&key.prefix));
        assert_eq!(key.hash, hash_api_key(&key.plaintext));
        assert!(!is_well_formed_api_key("capy_live_short"));
        assert!(!is_well_formed_api_key(
            &key.plaintext.replace("capy_live_", "capy_test_")
        ));
    }
}
