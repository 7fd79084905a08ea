//! The exactly-one-credential rule and client-token lookup (guard step 3 in ARCHITECTURE.md,
//! "The request's path").

use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use siphasher::sip128::{Hasher128, SipHasher24};
use subtle::{Choice, ConstantTimeEq};

use crate::rejection::Rejection;

/// The header QuickBlox SDKs send a session token in.
pub const QB_TOKEN: &str = "qb-token";

/// The token a request presents (exactly one of `QB-Token` and
/// `Authorization: ApiKey`), before it is matched against the clients.
pub fn presented_token(headers: &HeaderMap) -> Result<&[u8], Rejection> {
    let mut qb_tokens = headers.get_all(QB_TOKEN).iter();
    let mut authorizations = headers.get_all(AUTHORIZATION).iter();
    let (qb_token, authorization) = (qb_tokens.next(), authorizations.next());
    if qb_tokens.next().is_some() {
        return Err(Rejection::RepeatedCredential("QB-Token"));
    }
    if authorizations.next().is_some() {
        return Err(Rejection::RepeatedCredential("Authorization"));
    }
    match (qb_token, authorization) {
        (None, None) => Err(Rejection::MissingCredentials),
        (Some(_), Some(_)) => Err(Rejection::AmbiguousCredentials),
        (Some(token), None) => Ok(trim(token.as_bytes())),
        (None, Some(value)) => api_key_token(value.as_bytes()).ok_or(Rejection::BadScheme),
    }
}

/// Removes every `QB-Token` and `Authorization: ApiKey` header that carries a token of
/// `clients`, from a request passed on to another route: the gateway's credential shares
/// its header with QuickBlox's session token, and an app that sends it with every request
/// would otherwise hand it to QuickBlox. QuickBlox's own tokens (any other value) stay.
pub fn remove_client_tokens(headers: &mut HeaderMap, clients: &ClientRegistry) {
    for name in [QB_TOKEN, AUTHORIZATION.as_str()] {
        let is_qb_token = name == QB_TOKEN;
        let carries_one = |value: &http::HeaderValue| {
            let token = match is_qb_token {
                true => Some(trim(value.as_bytes())),
                false => api_key_token(value.as_bytes()),
            };
            token.is_some_and(|t| clients.identify(t).is_some())
        };
        let values = headers.get_all(name);
        if !values.iter().any(carries_one) {
            continue;
        }
        let kept: Vec<_> = values.iter().filter(|v| !carries_one(v)).cloned().collect();
        headers.remove(name);
        for value in kept {
            headers.append(name, value);
        }
    }
}

/// `ApiKey <token>`, scheme case-insensitive. `ApiKey` alone is the scheme with an empty
/// token (HTTP strips the space after it), which then matches no client, as an empty
/// `QB-Token` does.
fn api_key_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"apikey";
    let value = trim(value);
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    match rest.first() {
        None => Some(rest),
        Some(b' ' | b'\t') => Some(trim(rest)),
        Some(_) => None,
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// A configured client's name, as it appears in logs and metrics.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientId(Arc<str>);

impl ClientId {
    /// Wraps a client name.
    pub fn new(id: &str) -> Self {
        ClientId(id.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a client token; the only form in which tokens are configured or kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    /// The digest of a token.
    pub fn of(token: &[u8]) -> Self {
        TokenDigest(Sha256::digest(token).into())
    }

    /// Lower-case hex, as written in `guard.clients[].token_sha256`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The documentation's placeholder token this is the digest of (`change-me`), which
    /// a guard refuses: anyone can send it.
    pub fn placeholder(&self) -> Option<&'static str> {
        crate::config::PLACEHOLDER_TOKENS
            .into_iter()
            .find(|token| TokenDigest::of(token.as_bytes()) == *self)
    }
}

/// A digest written as 64 hex digits, as [`TokenDigest::to_hex`] and `reset-gateway
/// hash-token` print it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected 64 hex digits (SHA-256 of the token: `TokenDigest::of`, or `reset-gateway hash-token`)")]
pub struct InvalidDigest;

impl std::str::FromStr for TokenDigest {
    type Err = InvalidDigest;

    /// Reads the hex form (`guard.clients[].token_sha256`), surrounding whitespace ignored.
    fn from_str(text: &str) -> Result<Self, InvalidDigest> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut digest).map_err(|_| InvalidDigest)?;
        Ok(TokenDigest(digest))
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({}…)", &self.to_hex()[..8])
    }
}

/// The configured clients, matched in constant time.
///
/// A token is checked by its SHA-256 against every configured digest. Once a token has
/// matched, its client also keeps a keyed fingerprint of it (SipHash-2-4, 128 bits, under
/// a key drawn at random for this registry), and a later request presenting it is matched
/// by that fingerprint alone: the fast path any valid token takes after its first request.
/// A token matching no fingerprint takes the full path, so an unknown token's time is the
/// same as before and says nothing a fingerprint could (ARCHITECTURE.md, "Client tokens").
#[derive(Clone, Default)]
pub struct ClientRegistry {
    clients: Box<[(ClientId, TokenDigest)]>,
    /// Per client, the fingerprint of its token once a request has presented it.
    seen: Box<[OnceLock<u128>]>,
    fingerprint_key: (u64, u64),
}

impl ClientRegistry {
    /// Builds the registry; the caller has checked that ids and digests are unique.
    pub fn new(clients: impl IntoIterator<Item = (ClientId, TokenDigest)>) -> Self {
        let clients: Box<[_]> = clients.into_iter().collect();
        let state = RandomState::new();
        ClientRegistry {
            seen: clients.iter().map(|_| OnceLock::new()).collect(),
            clients,
            fingerprint_key: (state.hash_one(0u8), state.hash_one(1u8)),
        }
    }

    /// The client a token belongs to. Every fingerprint, and on a miss every digest, is
    /// compared, in constant time, so the time taken says nothing about how close a guess
    /// came.
    pub fn identify(&self, token: &[u8]) -> Option<&ClientId> {
        let fingerprint = self.fingerprint(token);
        if let Some(index) = self.seen_before(fingerprint) {
            return Some(&self.clients[index].0);
        }
        let presented = TokenDigest::of(token);
        let mut found = None;
        for (index, (_, digest)) in self.clients.iter().enumerate() {
            if bool::from(digest.0.ct_eq(&presented.0)) {
                found = Some(index);
            }
        }
        let index = found?;
        // Only a token whose SHA-256 matched gets here: the fingerprint is its own.
        let _ = self.seen[index].set(fingerprint);
        Some(&self.clients[index].0)
    }

    /// The client whose fingerprint matches, comparing every one that is set.
    fn seen_before(&self, fingerprint: u128) -> Option<usize> {
        let presented = fingerprint.to_le_bytes();
        let mut found = None;
        for (index, seen) in self.seen.iter().enumerate() {
            // An unset slot is compared too, its result masked out.
            let known = seen.get();
            let set = Choice::from(u8::from(known.is_some()));
            let known = known.copied().unwrap_or(0).to_le_bytes();
            if bool::from(known.ct_eq(&presented) & set) {
                found = Some(index);
            }
        }
        found
    }

    fn fingerprint(&self, token: &[u8]) -> u128 {
        let (k0, k1) = self.fingerprint_key;
        let mut hasher = SipHasher24::new_with_keys(k0, k1);
        hasher.write(token);
        hasher.finish128().as_u128()
    }

    /// How many clients are configured.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.clients.len()
    }
}

impl fmt::Debug for ClientRegistry {
    /// The clients and their digests' prefixes; never the fingerprints or their key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRegistry")
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn exactly_one_credential() {
        assert_eq!(
            presented_token(&headers(&[])),
            Err(Rejection::MissingCredentials)
        );
        assert_eq!(
            presented_token(&headers(&[("qb-token", "t")])),
            Ok(&b"t"[..])
        );
        assert_eq!(
            presented_token(&headers(&[
                ("qb-token", "t"),
                ("authorization", "ApiKey t")
            ])),
            Err(Rejection::AmbiguousCredentials)
        );
        assert_eq!(
            presented_token(&headers(&[("qb-token", "t"), ("qb-token", "t")])),
            Err(Rejection::RepeatedCredential("QB-Token"))
        );
        assert_eq!(
            presented_token(&headers(&[("authorization", "a"), ("authorization", "b")])),
            Err(Rejection::RepeatedCredential("Authorization"))
        );
    }

    #[test]
    fn api_key_scheme_is_case_insensitive_and_required() {
        for (value, expected) in [
            ("ApiKey abc", Some(&b"abc"[..])),
            ("apikey  abc ", Some(&b"abc"[..])),
            ("APIKEY\tabc", Some(&b"abc"[..])),
            ("Bearer abc", None),
            ("ApiKeyabc", None),
            ("ApiKey", Some(&b""[..])),
            ("ApiKey   ", Some(&b""[..])),
            ("", None),
        ] {
            assert_eq!(api_key_token(value.as_bytes()), expected, "{value:?}");
        }
    }

    #[test]
    fn a_digest_reads_from_its_hex_form() {
        let digest = TokenDigest::of(b"foo");
        assert_eq!(digest.to_hex().parse::<TokenDigest>(), Ok(digest));
        assert_eq!(
            format!(" {} ", digest.to_hex()).parse::<TokenDigest>(),
            Ok(digest)
        );
        assert_eq!("abc".parse::<TokenDigest>(), Err(InvalidDigest));
    }

    #[test]
    fn identifies_clients_by_digest() {
        let registry = ClientRegistry::new([
            (ClientId::new("ios"), TokenDigest::of(b"ios-token")),
            (ClientId::new("web"), TokenDigest::of(b"web-token")),
        ]);
        assert_eq!(
            registry.identify(b"web-token").map(ClientId::as_str),
            Some("web")
        );
        assert_eq!(
            registry.identify(b"ios-token").map(ClientId::as_str),
            Some("ios")
        );
        assert_eq!(registry.identify(b"web-token "), None);
        assert_eq!(registry.identify(b""), None);
    }

    #[test]
    fn a_token_seen_before_is_matched_by_its_fingerprint_alone() {
        let registry = ClientRegistry::new([
            (ClientId::new("ios"), TokenDigest::of(b"ios-token")),
            (ClientId::new("web"), TokenDigest::of(b"web-token")),
        ]);
        assert!(registry.seen.iter().all(|seen| seen.get().is_none()));
        registry.identify(b"web-token");
        assert!(registry.seen[0].get().is_none());
        assert_eq!(
            registry.seen_before(registry.fingerprint(b"web-token")),
            Some(1)
        );
        // The fast path gives the same answers as the full one, and learns nothing wrong.
        for _ in 0..2 {
            let identified = |token: &[u8]| registry.identify(token).map(ClientId::as_str);
            assert_eq!(identified(b"web-token"), Some("web"));
            assert_eq!(identified(b"ios-token"), Some("ios"));
            assert_eq!(identified(b"web-token "), None);
            assert_eq!(identified(b"nope"), None);
        }
        assert_eq!(registry.seen_before(registry.fingerprint(b"nope")), None);
        // Another registry (a reload) keys its fingerprints afresh.
        let other = ClientRegistry::new([(ClientId::new("web"), TokenDigest::of(b"web-token"))]);
        assert_ne!(
            other.fingerprint(b"web-token"),
            registry.fingerprint(b"web-token")
        );
        assert!(!format!("{registry:?}").contains("seen"));
    }
}
