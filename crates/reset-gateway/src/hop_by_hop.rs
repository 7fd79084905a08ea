//! Hop-by-hop header hygiene (RFC 9110 §7.6.1): such headers describe one connection and
//! are never forwarded, in either direction.
//!
//! For the gateway that includes the framing headers, `Content-Length` and
//! `Transfer-Encoding`: hyper decodes the body of what it receives, and the framing of what
//! the gateway sends is computed from the body it actually sends. A copied `Content-Length`
//! that disagrees with that body (QuickBlox sending it beside `Transfer-Encoding: chunked`,
//! RFC 9112 §6.3) would make the client read the rest of the body as the answer to its next
//! request.

use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName};

/// Headers that are hop-by-hop by definition.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || matches!(
            name.as_str(),
            "keep-alive" | "proxy-connection" | "proxy-authenticate" | "proxy-authorization"
        )
}

/// Headers that frame a message on its connection; the sender computes them.
pub fn is_framing(name: &HeaderName) -> bool {
    name == CONTENT_LENGTH || name == TRANSFER_ENCODING
}

/// Removes every hop-by-hop and framing header, including each one named in `Connection`,
/// `Expect` (the gateway answers `100 Continue` to its client itself), and every
/// header whose name has an underscore: servers that map `X_Forwarded_For` and
/// `X-Forwarded-For` to one name would otherwise read a header we never checked.
pub fn strip(headers: &mut HeaderMap) {
    // The framing headers are on nearly every message: removed by name, collecting nothing.
    headers.remove(CONTENT_LENGTH);
    headers.remove(TRANSFER_ENCODING);
    // The rest are rare: one look at each name, and no allocation when there is none.
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_') || is_hop_by_hop(n) || *n == EXPECT)
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    doomed.extend(connection_named(headers));
    for name in doomed {
        headers.remove(&name);
    }
}

/// The header names listed in `Connection`.
pub fn connection_named(headers: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x_forwarded_for", "6.6.6.6"),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("x-kept", "1"),
        ] {
            headers.append(HeaderName::from_static(name), value.parse().unwrap());
        }
        strip(&mut headers);
        let left: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn no_framing_header_survives_whatever_else_is_there() {
        // Every mix of framing headers, with and without company, comes out without them.
        let framing = [
            ("content-length", "5"),
            ("content-length", "7"),
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "gzip, chunked"),
        ];
        for mask in 1u32..(1 << framing.len()) {
            for company in [&[][..], &[("x-kept", "1"), ("connection", "close")][..]] {
                let mut headers = HeaderMap::new();
                for (i, (name, value)) in framing.iter().enumerate() {
                    if mask & (1 << i) != 0 {
                        headers.append(*name, value.parse().unwrap());
                    }
                }
                for (name, value) in company {
                    headers.append(*name, value.parse().unwrap());
                }
                strip(&mut headers);
                assert!(!headers.keys().any(is_framing), "{mask:b} {company:?}");
            }
        }
    }
}
