//! The server-held QuickBlox API key.

use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use zeroize::Zeroizing;

/// The application API key that the gateway sends upstream in place of a client token.
///
/// It has no `Display`, its `Debug` is redacted, its memory is zeroed on drop, and the
/// header value built from it is marked sensitive so HTTP/2 never indexes it.
#[derive(Clone)]
pub struct ApiKey {
    key: Zeroizing<String>,
    header: HeaderValue,
}

/// Why a key was refused; never shows the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("API key must be non-empty visible ASCII without spaces")]
pub struct InvalidApiKey;

impl ApiKey {
    /// Wraps a key, trimming surrounding whitespace (a trailing newline in a key file
    /// is not part of the key).
    pub fn new(key: impl Into<String>) -> Result<ApiKey, InvalidApiKey> {
        let raw = Zeroizing::new(key.into());
        let key = Zeroizing::new(raw.trim().to_owned());
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidApiKey);
        }
        // The header's bytes live in a zeroizing buffer too: they are wiped when the last
        // request holding a clone of the header is gone.
        let mut value = Zeroizing::new(Vec::with_capacity(7 + key.len()));
        value.extend_from_slice(b"ApiKey ");
        value.extend_from_slice(key.as_bytes());
        let bytes = Bytes::from_owner(ZeroizingBytes(value));
        let mut header = HeaderValue::from_maybe_shared(bytes).map_err(|_| InvalidApiKey)?;
        header.set_sensitive(true);
        Ok(ApiKey { key, header })
    }

    /// The `Authorization` header value, `ApiKey <key>`, marked sensitive.
    pub fn authorization(&self) -> &HeaderValue {
        &self.header
    }

    /// The key itself, for code that must compare or send it.
    pub fn expose(&self) -> &str {
        &self.key
    }
}

/// Owner of a header's bytes that wipes them on drop.
struct ZeroizingBytes(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_builds_a_sensitive_header() {
        let key = ApiKey::new("  s3cr3t\n").unwrap();
        assert_eq!(key.expose(), "s3cr3t");
        assert_eq!(key.authorization(), "ApiKey s3cr3t");
        assert!(key.authorization().is_sensitive());
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
    }

    #[test]
    fn refuses_empty_or_spaced_keys() {
        assert_eq!(ApiKey::new("  ").unwrap_err(), InvalidApiKey);
        assert_eq!(ApiKey::new("a b").unwrap_err(), InvalidApiKey);
        assert_eq!(ApiKey::new("é").unwrap_err(), InvalidApiKey);
    }
}
