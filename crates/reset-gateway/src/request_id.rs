//! `X-Request-Id`: the client's own when it is sane, else a fresh one; echoed on every answer.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header name.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const MAX_LEN: usize = 128;

/// The id this request goes by.
pub fn resolve(headers: &HeaderMap) -> HeaderValue {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if is_sane(value.as_bytes()) => value.clone(),
        _ => generate(),
    }
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
        for bad in [&["a b"][..], &["a", "b"], &["<script>"], &[""]] {
            let id = resolve(&with(bad));
            assert_eq!(id.len(), 32, "{bad:?}");
        }
        assert_eq!(resolve(&with(&[])).len(), 32);
        let long: &'static str = Box::leak("a".repeat(129).into_boxed_str());
        assert_eq!(resolve(&with(&[long])).len(), 32);
    }
}
