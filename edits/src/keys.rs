//! Signing keys and the trust store of public keys a device accepts bundles from.
//!
//! Key files (written by `amend keygen`): `PREFIX.key` holds the 32-byte ed25519 secret seed and
//! `PREFIX.pub` the 32-byte public key, each as 64 lowercase hex characters plus a newline. Readers
//! also accept the raw 32 bytes.

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::bundle::format::KEY_ID_LEN;

/// How many public keys a trust store holds (firmware-friendly fixed capacity).
pub const MAX_TRUSTED_KEYS: usize = 16;

/// First 8 bytes of sha256(public key): names the key that signed a bundle.
pub type KeyId = [u8; KEY_ID_LEN];

pub fn key_id(key: &VerifyingKey) -> KeyId {
    let h = Sha256::digest(key.as_bytes());
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&h[..KEY_ID_LEN]);
    id
}

/// Which of `trusted` (raw 32-byte keys), read as an ed25519 secret seed, is the key named
/// `signer`: both key files are 32 bytes, so a secret key given where the public key belongs
/// is only told apart here, once a bundle names the key. One scalar multiplication per key, so
/// the verifiers call it only when the signer is not trusted.
pub fn secret_seed_index(
    signer: &KeyId,
    trusted: impl IntoIterator<Item = [u8; 32]>,
) -> Option<usize> {
    trusted
        .into_iter()
        .position(|k| key_id(&SigningKey::from_bytes(&k).verifying_key()) == *signer)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key file is neither 32 raw bytes nor 64 hex characters")]
    BadEncoding,
    // Half of all secret seeds do not decode as a point: hint at the likely slip.
    #[error(
        "not a valid ed25519 public key (if it is a secret key file, use the .pub \
         beside it)"
    )]
    BadPublicKey,
    #[error("weak ed25519 public key (small-order point): any signature could verify under it")]
    WeakPublicKey,
    #[error("trust store is full ({MAX_TRUSTED_KEYS} keys)")]
    TrustStoreFull,
}

/// Decode a key file's contents (hex with optional surrounding whitespace, or raw 32 bytes).
pub fn decode_key_bytes(data: &[u8]) -> Result<[u8; 32], KeyError> {
    if data.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(data);
        return Ok(k);
    }
    let text = core::str::from_utf8(data)
        .map_err(|_| KeyError::BadEncoding)?
        .trim();
    if text.len() != 64 {
        return Err(KeyError::BadEncoding);
    }
    let mut k = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let hi = hex_val(chunk[0]).ok_or(KeyError::BadEncoding)?;
        let lo = hex_val(chunk[1]).ok_or(KeyError::BadEncoding)?;
        k[i] = (hi << 4) | lo;
    }
    Ok(k)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lowercase hex (key files, ids in `inspect`).
#[cfg(feature = "alloc")]
pub fn to_hex(bytes: &[u8]) -> alloc::string::String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = alloc::string::String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

pub fn signing_key_from_file_bytes(data: &[u8]) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&decode_key_bytes(data)?))
}

pub fn verifying_key_from_file_bytes(data: &[u8]) -> Result<VerifyingKey, KeyError> {
    let key =
        VerifyingKey::from_bytes(&decode_key_bytes(data)?).map_err(|_| KeyError::BadPublicKey)?;
    if key.is_weak() {
        return Err(KeyError::WeakPublicKey);
    }
    Ok(key)
}

/// A fresh signing key from the OS random source.
#[cfg(feature = "std")]
pub fn generate_signing_key() -> std::io::Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public keys bundles may be signed with.
#[derive(Clone, Debug, Default)]
pub struct TrustStore {
    keys: heapless::Vec<(KeyId, VerifyingKey), MAX_TRUSTED_KEYS>,
}

impl TrustStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_key(key: VerifyingKey) -> Self {
        let mut t = Self::new();
        // A fresh store always has room for one key.
        let _ = t.add(key);
        t
    }

    /// Trust `key`; adding a key twice is a no-op. Small-order ("weak") keys are refused:
    /// `verify_strict` already rejects them, but a store that holds one would name a key
    /// nobody can be held to.
    pub fn add(&mut self, key: VerifyingKey) -> Result<KeyId, KeyError> {
        if key.is_weak() {
            return Err(KeyError::WeakPublicKey);
        }
        let id = key_id(&key);
        if self.get(&id).is_none() {
            self.keys
                .push((id, key))
                .map_err(|_| KeyError::TrustStoreFull)?;
        }
        Ok(id)
    }

    pub fn remove(&mut self, id: &KeyId) -> bool {
        match self.keys.iter().position(|(k, _)| k == id) {
            Some(i) => {
                self.keys.swap_remove(i);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    /// The trusted public keys.
    pub fn keys(&self) -> impl Iterator<Item = &VerifyingKey> {
        self.keys.iter().map(|(_, k)| k)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_order_public_keys_are_refused() {
        // The identity point (y = 1) has order 1.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let hex = to_hex(&identity);
        assert_eq!(
            verifying_key_from_file_bytes(hex.as_bytes()),
            Err(KeyError::WeakPublicKey)
        );
        let vk = VerifyingKey::from_bytes(&identity).unwrap();
        let mut t = TrustStore::new();
        assert_eq!(t.add(vk), Err(KeyError::WeakPublicKey));
        assert!(t.is_empty());
        // A real key still goes in.
        let good = SigningKey::from_bytes(&[1; 32]).verifying_key();
        assert!(t.add(good).is_ok());
    }
}
