//! `X-Request-Id`: the client's own when it is sane, else a fresh one; echoed on every answer.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header name.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const MAX_LEN: usize = 128;

/// The id this request goes by.
pub fn resolve(headers: &HeaderMap) -> HeaderValue {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    match (values.next(), values.next()) {
        (Some(value), None)
            if is_sane(value.as_bytes()) && !holds_credential(headers, value.as_bytes()) =>
        {
            value.clone()
        }
        _ => generate(),
    }
}

/// Whether `id` holds the token of the request's own credential (a client that sends its
/// token as its request id): the id is written to logs, and a token must never be.
fn holds_credential(headers: &HeaderMap, id: &[u8]) -> bool {
    // Every word of an Authorization value, whatever whitespace (a space or a tab, as the
    // guard reads `ApiKey<TAB>token`) parts its scheme from its token.
    let tokens = headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b' ' || b == b'\t'))
        .chain(
            headers
                .get_all("qb-token")
                .iter()
                .map(HeaderValue::as_bytes),
        );
    tokens
        .map(<[u8]>::trim_ascii)
        .filter(|token| token.len() >= 8)
        .any(|token| id.windows(token.len()).any(|window| window == token))
}

/// Ids end up in logs and upstream headers: only short, plain tokens are kept.
fn is_sane(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// 128 random bits as 32 hex digits, without formatting machinery.
fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits = rand::random::<u128>();
    let mut id = [0u8; 32];
    for byte in id.iter_mut().rev() {
        *byte = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    // Owned by the value itself: the copies for the upstream request and the answer share it.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id)).expect("hex is a valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(&X_REQUEST_ID, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn keeps_a_sane_id_and_replaces_the_rest() {
        assert_eq!(resolve(&with(&["abc-123_x.y:z"])), "abc-123_x.y:z");
        // A client that sends its token as its request id: a fresh one instead.
        for credential in [
            ("qb-token", "ios-client-token-1234"),
            ("authorization", "ApiKey ios-client-token-1234"),
            // A tab after the scheme, which the guard reads as a space.
            ("authorization", "ApiKey\tios-client-token-1234"),
            ("authorization", "apikey \t ios-client-token-1234"),
        ] {
            for id in ["ios-client-token-1234", "req-ios-client-token-1234-7"] {
                let mut headers = with(&[]);
                headers.insert(X_REQUEST_ID, HeaderValue::from_static(id));
                headers.insert(credential.0, HeaderValue::from_static(credential.1));
                let resolved = resolve(&headers);
                assert_ne!(resolved, id, "{credential:?}");
                assert_eq!(resolved.len(), 32);
            }
        }
        let mut headers = with(&["abc-123"]);
        headers.insert(
            "qb-token",
            HeaderValue::from_static("ios-client-token-1234"),
        );
        assert_eq!(resolve(&headers), "abc-123", "an id of its own stands");
        for bad in [&["a b"][..], &["a", "b"], &["<script>"], &[""]] {
            let id = resolve(&with(bad));
            assert_eq!(id.len(), 32, "{bad:?}");
        }
        assert_eq!(resolve(&with(&[])).len(), 32);
        let long: &'static str = Box::leak("a".repeat(129).into_boxed_str());
        assert_eq!(resolve(&with(&[long])).len(), 32);
    }
}
