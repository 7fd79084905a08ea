//! The headers that say where a request came from: the gateway's `X-Forwarded-For` is the
//! one account of it sent upstream.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The forwarding chain sent upstream.
pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The standard forwarding header (RFC 7239), which a client could fill with anything.
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The client address as some servers read it, which a client could fill with anything.
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The client address as CDNs and balancers name it (Akamai and Cloudflare Enterprise's
/// `True-Client-IP`, Cloudflare's, Fastly's, and others'): set by them in front of a
/// server that trusts them, and forged by anyone else. The gateway is the edge here, so a
/// client's never reaches QuickBlox.
const CLIENT_IP_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("x-original-forwarded-for"),
];

/// The chain sent upstream: the peer, preceded by the client when it came through trusted
/// proxies (the guard resolved a client other than the peer). Nothing the client wrote is
/// passed on: a chain copied whole carried its forged entries to the left, where a reader
/// of the leftmost entry would have believed them.
pub(super) fn forwarded_for(peer: Option<IpAddr>, client: IpAddr) -> Option<HeaderValue> {
    let peer = peer?;
    if peer == client {
        return Some(ip_header(peer));
    }
    HeaderValue::from_str(&format!("{client}, {peer}")).ok()
}

/// Replaces whatever forwarding headers a client sent with the gateway's chain (a forwarded
/// route): the client the guard resolved behind trusted proxies, if any, and the peer.
pub(super) fn replace_forwarding(
    headers: &mut HeaderMap,
    peer: Option<IpAddr>,
    client: Option<IpAddr>,
) {
    for spoofable in [&X_FORWARDED_FOR, &FORWARDED, &X_REAL_IP]
        .into_iter()
        .chain(&CLIENT_IP_HEADERS)
    {
        headers.remove(spoofable);
    }
    let chain = peer.and_then(|peer| forwarded_for(Some(peer), client.unwrap_or(peer)));
    if let Some(chain) = chain {
        headers.insert(X_FORWARDED_FOR, chain);
    }
}

/// An address as a header value. IPv4, the common case, is written out by hand: it is on
/// every forwarded request, and the formatting machinery costs more than the rest of it.
fn ip_header(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string()).expect("an address is a valid header");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots are a valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_their_display_form() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.200.3.45",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header(ip).to_str().unwrap(), ip.to_string());
        }
    }
}
