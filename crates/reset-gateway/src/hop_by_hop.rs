//! Hop-by-hop header hygiene (RFC 9110 §7.6.1): such headers describe one connection and
//! are never forwarded, in either direction.

use http::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
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

/// Removes every hop-by-hop header, including each one named in `Connection`, and every
/// header whose name has an underscore: servers that map `X_Forwarded_For` and
/// `X-Forwarded-For` to one name would otherwise read a header we never checked.
pub fn strip(headers: &mut HeaderMap) {
    // Usually there is nothing to remove: one look at each name, and no allocation.
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_') || is_hop_by_hop(n))
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
            ("x-kept", "1"),
        ] {
            headers.append(HeaderName::from_static(name), value.parse().unwrap());
        }
        strip(&mut headers);
        let left: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }
}
