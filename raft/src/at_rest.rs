//! The Raft data at rest, encrypted: every log entry and the snapshot file
//! are sealed with the node's data key (ChaCha20-Poly1305, a random nonce
//! per value, the value's place as associated data so that a sealed value
//! moved elsewhere does not open). The node keeps the data key with its
//! other secrets, so under autolock it is sealed under the unlock key too.
//!
//! A sealed value starts with [`SEALED`]; a value in the clear starts with
//! the codec's version byte (1), so data written before encryption (or by
//! a store opened without a key) still reads, and is sealed when rewritten.

use std::borrow::Cow;
use std::sync::Arc;

use ring::aead;

/// The first byte of a sealed value (never a codec version).
pub const SEALED: u8 = 0xE5;

const NONCE: usize = 12;

/// Why a stored value does not open.
#[derive(Debug, thiserror::Error)]
pub enum AtRestError {
    /// Sealed, and this store has no key.
    #[error("the Raft data is encrypted and this store was opened without its data key")]
    NoKey,
    /// Sealed under another key, cut short, or altered.
    #[error("the Raft data does not open with this node's data key (wrong key, or damaged)")]
    Damaged,
}

/// The data key, or none (values are written in the clear).
#[derive(Clone, Default)]
pub struct AtRest {
    key: Option<Arc<aead::LessSafeKey>>,
}

impl std::fmt::Debug for AtRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AtRest(encrypted: {})", self.key.is_some())
    }
}

impl AtRest {
    /// Values sealed with `key`.
    pub fn with_key(key: &[u8; 32]) -> Self {
        // A 32-byte key is always valid for ChaCha20-Poly1305.
        let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key)
            .unwrap_or_else(|_| unreachable!("32-byte ChaCha20 key"));
        AtRest {
            key: Some(Arc::new(aead::LessSafeKey::new(unbound))),
        }
    }

    /// Values in the clear (tests, benches, tools without the node's keys).
    pub fn clear() -> Self {
        AtRest::default()
    }

    /// `plain` as it is stored at `place` (e.g. `b"log"` and the index).
    pub fn seal(&self, place: &[u8], plain: Vec<u8>) -> Vec<u8> {
        let Some(key) = &self.key else {
            return plain;
        };
        let nonce: [u8; NONCE] = rand::random();
        let mut out = Vec::with_capacity(1 + NONCE + plain.len() + aead::MAX_TAG_LEN);
        out.push(SEALED);
        out.extend_from_slice(&nonce);
        let mut body = plain;
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(place),
            &mut body,
        )
        .unwrap_or_else(|_| unreachable!("sealing into a Vec cannot fail"));
        out.extend_from_slice(&body);
        out
    }

    /// What `stored` (from `place`) holds: opened if sealed, as it is if in
    /// the clear.
    pub fn open<'a>(&self, place: &[u8], stored: &'a [u8]) -> Result<Cow<'a, [u8]>, AtRestError> {
        let Some(rest) = stored.strip_prefix(&[SEALED]) else {
            return Ok(Cow::Borrowed(stored));
        };
        let key = self.key.as_ref().ok_or(AtRestError::NoKey)?;
        if rest.len() < NONCE {
            return Err(AtRestError::Damaged);
        }
        let (nonce, body) = rest.split_at(NONCE);
        let nonce =
            aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| AtRestError::Damaged)?;
        let mut buf = body.to_vec();
        let len = key
            .open_in_place(nonce, aead::Aad::from(place), &mut buf)
            .map_err(|_| AtRestError::Damaged)?
            .len();
        buf.truncate(len);
        Ok(Cow::Owned(buf))
    }
}

/// The place of log entry `index`, as associated data.
pub fn log_place(index: u64) -> [u8; 11] {
    let mut p = [0u8; 11];
    p[..3].copy_from_slice(b"log");
    p[3..].copy_from_slice(&index.to_be_bytes());
    p
}

/// The snapshot file's place.
pub const SNAPSHOT_PLACE: &[u8] = b"snapshot";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_in_their_place() {
        let at_rest = AtRest::with_key(&[7; 32]);
        let plain = shoal_mesh::codec::encode(&"a secret env value").unwrap();
        let sealed = at_rest.seal(&log_place(3), plain.clone());
        assert_eq!(sealed[0], SEALED);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(at_rest.open(&log_place(3), &sealed).unwrap(), plain);
        assert!(matches!(
            at_rest.open(&log_place(4), &sealed),
            Err(AtRestError::Damaged)
        ));
        assert!(matches!(
            AtRest::with_key(&[8; 32]).open(&log_place(3), &sealed),
            Err(AtRestError::Damaged)
        ));
        assert!(matches!(
            AtRest::clear().open(&log_place(3), &sealed),
            Err(AtRestError::NoKey)
        ));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(at_rest.open(&log_place(3), &flipped).is_err());
        for cut in [1, 5, 13, sealed.len() - 1] {
            assert!(at_rest.open(&log_place(3), &sealed[..cut]).is_err());
        }
        // Values written in the clear (before encryption) still read.
        assert_eq!(at_rest.open(&log_place(3), &plain).unwrap(), plain);
        assert_eq!(AtRest::clear().seal(b"x", plain.clone()), plain);
    }
}
