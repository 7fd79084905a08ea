//! Who is asking: the TCP peer, or the right-most untrusted `X-Forwarded-For` entry when
//! the peer is a trusted proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The TCP peer of a request, which the guard reads from the request extensions. The
/// gateway's server inserts it; an embedding service copies it there from its own
/// connection info in a layer outside the guard (see the [crate docs](crate)). A request
/// on the guarded path without it is answered 500, unless the layer was built
/// [`without_peer_address`](crate::ResetGuardBuilder::without_peer_address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The address a request is attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(IpAddr);

impl ClientIp {
    /// Resolves the client behind any trusted proxies.
    pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Self {
        let peer = peer.to_canonical();
        if !is_trusted(peer, trusted) {
            return ClientIp(peer);
        }
        match walk_forwarded_for(headers, trusted) {
            Some(ip) => ClientIp(ip),
            None => ClientIp(peer),
        }
    }

    /// The address.
    pub fn ip(&self) -> IpAddr {
        self.0
    }

    /// The address of requests without a [`PeerAddr`] under
    /// [`without_peer_address`](crate::ResetGuardBuilder::without_peer_address): they all
    /// share this one per-IP key.
    pub const UNKNOWN: ClientIp = ClientIp(IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)));
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// Reads every `X-Forwarded-For` entry right to left and returns the first one that is
/// not a trusted proxy; `None` when the header is absent or any entry is malformed.
fn walk_forwarded_for(headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let mut entries = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        for entry in value.to_str().ok()?.split(',') {
            entries.push(entry.trim().parse::<IpAddr>().ok()?.to_canonical());
        }
    }
    let mut leftmost = None;
    for ip in entries.into_iter().rev() {
        if !is_trusted(ip, trusted) {
            return Some(ip);
        }
        leftmost = Some(ip);
    }
    leftmost
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append("x-forwarded-for", HeaderValue::from_static(value));
        }
        map
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let got = ClientIp::resolve(
            ip("203.0.113.9"),
            &xff(&["1.2.3.4"]),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(got.ip(), ip("203.0.113.9"));
    }

    #[test]
    fn walks_right_to_left_past_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8"]);
        let headers = xff(&["6.6.6.6, 198.51.100.7", "10.1.1.1"]);
        let got = ClientIp::resolve(ip("10.0.0.2"), &headers, &trusted);
        assert_eq!(got.ip(), ip("198.51.100.7"));
    }

    #[test]
    fn malformed_header_means_the_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        let got = ClientIp::resolve(ip("10.0.0.2"), &xff(&["1.2.3.4, nonsense"]), &trusted);
        assert_eq!(got.ip(), ip("10.0.0.2"));
        let got = ClientIp::resolve(ip("10.0.0.2"), &xff(&[]), &trusted);
        assert_eq!(got.ip(), ip("10.0.0.2"));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        let got = ClientIp::resolve(ip("::ffff:192.0.2.1"), &HeaderMap::new(), &[]);
        assert_eq!(got.ip(), ip("192.0.2.1"));
        let trusted = nets(&["192.0.2.0/24"]);
        let got = ClientIp::resolve(
            ip("::ffff:192.0.2.1"),
            &xff(&["::ffff:198.51.100.1"]),
            &trusted,
        );
        assert_eq!(got.ip(), ip("198.51.100.1"));
    }
}
