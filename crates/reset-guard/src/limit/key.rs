//! Limit keys: keyed 64-bit hashes, so neither memory nor Redis holds a raw address.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

use sha2::{Digest, Sha256};
use siphasher::sip::SipHasher13;

/// Separates the key spaces so an IP and an email can never share a key.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub(crate) enum Domain {
    Ip = 1,
    Client = 2,
    Email = 3,
}

/// SipHash-1-3 under a secret key.
#[derive(Clone)]
pub struct KeyHasher {
    k0: u64,
    k1: u64,
}

impl KeyHasher {
    /// Keys derived from a deployment secret: every replica derives the same keys.
    pub fn from_secret(secret: &[u8]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"qb-reset-gateway limit keys v1\0")
            .chain_update(secret)
            .finalize();
        let (k0, k1) = digest.split_at(8);
        KeyHasher {
            k0: u64::from_le_bytes(k0.try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(k1[..8].try_into().expect("8 bytes")),
        }
    }

    /// Fresh random keys for this process (enough for one in-memory replica).
    pub fn random() -> Self {
        let state = std::collections::hash_map::RandomState::new();
        KeyHasher {
            k0: state.hash_one(0u8),
            k1: state.hash_one(1u8),
        }
    }

    /// Hashes a string given one character at a time; equal to hashing its UTF-8 bytes.
    /// Characters are gathered on the stack and hashed in chunks.
    pub(crate) fn hash_chars(
        &self,
        domain: Domain,
        feed: impl FnOnce(&mut dyn FnMut(char)),
    ) -> u64 {
        let mut hasher = SipHasher13::new_with_keys(self.k0, self.k1);
        hasher.write_u8(domain as u8);
        let mut buf = [0u8; 256];
        let mut len = 0;
        feed(&mut |c: char| {
            if len + 4 > buf.len() {
                hasher.write(&buf[..len]);
                len = 0;
            }
            len += c.encode_utf8(&mut buf[len..]).len();
        });
        hasher.write(&buf[..len]);
        hasher.finish()
    }

    pub(crate) fn hash(&self, domain: Domain, bytes: &[u8]) -> u64 {
        let mut hasher = SipHasher13::new_with_keys(self.k0, self.k1);
        hasher.write_u8(domain as u8);
        hasher.write(bytes);
        hasher.finish()
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher(<secret>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_chars_equals_hashing_their_bytes() {
        let hasher = KeyHasher::from_secret(b"secret");
        let long: String = "é".repeat(300) + "@example.com";
        for text in ["bob@example.com", "élise@bücher.example", long.as_str()] {
            let by_chars = hasher.hash_chars(Domain::Email, |sink| text.chars().for_each(sink));
            assert_eq!(
                by_chars,
                hasher.hash(Domain::Email, text.as_bytes()),
                "{text}"
            );
        }
        assert_ne!(
            hasher.hash(Domain::Ip, b"x"),
            hasher.hash(Domain::Email, b"x")
        );
        assert_ne!(
            KeyHasher::from_secret(b"other").hash(Domain::Ip, b"x"),
            hasher.hash(Domain::Ip, b"x")
        );
    }
}
