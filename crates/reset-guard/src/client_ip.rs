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

/// The address a request is attributed to: its [`PeerAddr`], or the client behind it when the
/// peer is one of `client_ip.trusted_proxies`. The guard leaves it in the extensions of
/// every request it passes on to the inner service under `other_routes: forward`, and of
/// every answer it gives before its limits apply (another path, a method other than `GET`),
/// so what follows (a forwarder's `X-Forwarded-For`, an access log) names the same client
/// the limits would. A request without a [`PeerAddr`] gets none.
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

    /// Where `request` came from, as the guard resolves it; `None` without a [`PeerAddr`].
    pub(crate) fn of<B>(request: &http::Request<B>, trusted: &[IpNet]) -> Option<Self> {
        let peer = request.extensions().get::<PeerAddr>()?;
        Some(Self::resolve(peer.0.ip(), request.headers(), trusted))
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

/// Walks the `X-Forwarded-For` entries right to left (the last header line first) and
/// returns the first one that is not a trusted proxy. Only the entries walked must be
/// readable: what a client wrote to the left of the first untrusted entry is never looked
/// at, so it cannot move the client into its proxy's bucket. A malformed entry reached
/// before any untrusted one ends the walk at the nearest trusted address before it (a
/// proxy vouched for nothing further); `None` when there is none.
fn walk_forwarded_for(headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let mut nearest = None;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        // Split as bytes: a client's non-ASCII bytes on the left of the line must not make
        // the entries its proxy appended unreadable.
        for entry in value.as_bytes().rsplit(|b| *b == b',') {
            let Some(ip) = std::str::from_utf8(entry)
                .ok()
                .and_then(|entry| forwarded_address(entry.trim()))
            else {
                return nearest;
            };
            if !is_trusted(ip, trusted) {
                return Some(ip);
            }
            nearest = Some(ip);
        }
    }
    nearest
}

/// One entry: an address, or an address with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`), in brackets (`[2001:db8::1]`) or with a zone (`fe80::1%eth0`,
/// `[fe80::1%eth0]:4711`), as balancers write them.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let ip = match entry.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => match entry.parse::<SocketAddr>() {
            Ok(socket) => socket.ip(),
            Err(_) => {
                // `[fe80::1%eth0]`, `[fe80::1%eth0]:4711`: a zone, which `SocketAddr` does
                // not read, in brackets, with or without a port.
                let bare = match entry.strip_prefix('[') {
                    Some(rest) => {
                        let (inside, after) = rest.split_once(']')?;
                        if !after.is_empty() {
                            after.strip_prefix(':')?.parse::<u16>().ok()?;
                        }
                        inside
                    }
                    None => entry,
                };
                let without_zone = bare.split_once('%').map_or(bare, |(ip, _)| ip);
                without_zone.parse::<std::net::Ipv6Addr>().ok()?.into()
            }
        },
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
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
    fn malformed_entries_left_of_the_client_are_never_read() {
        let trusted = nets(&["10.0.0.0/8"]);
        // What nginx's $proxy_add_x_forwarded_for and HAProxy's forwardfor send for a
        // client that wrote its own header: its writing stays to the left of its address.
        for written in ["nonsense", "unknown", "1.2.3.4:80, ,", "\"[::1]\""] {
            let headers = xff(&[&format!("{written}, 198.51.100.7")]);
            let got = ClientIp::resolve(ip("10.0.0.2"), &headers, &trusted);
            assert_eq!(got.ip(), ip("198.51.100.7"), "{written}");
        }
        let got = ClientIp::resolve(
            ip("10.0.0.2"),
            &xff(&["nonsense", "198.51.100.7"]),
            &trusted,
        );
        assert_eq!(got.ip(), ip("198.51.100.7"), "over two header lines");
    }

    #[test]
    fn a_malformed_entry_a_proxy_vouched_for_ends_the_walk_at_that_proxy() {
        let trusted = nets(&["10.0.0.0/8"]);
        let got = ClientIp::resolve(ip("10.0.0.2"), &xff(&["1.2.3.4, nonsense"]), &trusted);
        assert_eq!(got.ip(), ip("10.0.0.2"), "nothing readable: the peer");
        let got = ClientIp::resolve(
            ip("10.0.0.2"),
            &xff(&["1.2.3.4, nonsense, 10.9.9.9"]),
            &trusted,
        );
        assert_eq!(got.ip(), ip("10.9.9.9"), "the nearest trusted address");
        let got = ClientIp::resolve(ip("10.0.0.2"), &xff(&[]), &trusted);
        assert_eq!(got.ip(), ip("10.0.0.2"));
    }

    #[test]
    fn bytes_a_client_wrote_that_are_not_text_are_never_read_either() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.7").unwrap(),
        );
        let got = ClientIp::resolve(ip("10.0.0.2"), &headers, &trusted);
        assert_eq!(got.ip(), ip("198.51.100.7"));
    }

    #[test]
    fn entries_with_a_port_are_their_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        for (entry, want) in [
            ("198.51.100.7:4711", "198.51.100.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("fe80::1%eth0", "fe80::1"),
            ("[fe80::1%eth0]", "fe80::1"),
            ("[fe80::1%eth0]:80", "fe80::1"),
        ] {
            let got = ClientIp::resolve(ip("10.0.0.2"), &xff(&[entry]), &trusted);
            assert_eq!(got.ip(), ip(want));
        }
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
