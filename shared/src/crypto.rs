//! Secrets at rest and API keys.
//!
//! Project passwords and cluster admin URLs are sealed with XChaCha20-Poly1305 under the
//! control plane's secret key (`CAPY_SECRET_KEY`); the random nonce is stored in front
//! of the ciphertext. API keys are never stored: only their SHA-256.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
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
    /// Signs URLs (export downloads): a key of its own derived from the secret key,
    /// so a signature never uses the sealing key itself.
    signing_key: [u8; 32],
}

type HmacSha256 = Hmac<Sha256>;

/// What the signing key is derived for (HMAC-SHA256 of this under the secret key).
const SIGNING_KEY_PURPOSE: &[u8] = b"capy url signing v1";

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
        let signing_key = hmac_sha256(&bytes, SIGNING_KEY_PURPOSE);
        Ok(Self {
            cipher,
            signing_key,
        })
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

    /// HMAC-SHA256 of `message` under the signing key, hex.
    pub fn sign(&self, message: &str) -> String {
        hex::encode(hmac_sha256(&self.signing_key, message.as_bytes()))
    }

    /// Whether `signature` (hex) is [`Self::sign`]'s for `message`, compared in
    /// constant time.
    pub fn verify(&self, message: &str, signature: &str) -> bool {
        let Ok(signature) = hex::decode(signature) else {
            return false;
        };
        let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(&self.signing_key) else {
            return false;
        };
        mac.update(message.as_bytes());
        mac.verify_slice(&signature).is_ok()
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(message);
    mac.finalize().into_bytes().into()
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
    fn signatures_verify_only_for_their_message_and_key() {
        let secret_box = SecretBox::from_key_text(&SecretBox::generate_key_text()).unwrap();
        let signature = secret_box.sign("export.123");
        assert_eq!(signature.len(), 64);
        assert!(secret_box.verify("export.123", &signature));
        assert!(!secret_box.verify("export.124", &signature));
        assert!(!secret_box.verify("export.123", &signature[..62]));
        assert!(!secret_box.verify("export.123", "not hex"));
        let other = SecretBox::from_key_text(&SecretBox::generate_key_text()).unwrap();
        assert!(!other.verify("export.123", &signature));
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
