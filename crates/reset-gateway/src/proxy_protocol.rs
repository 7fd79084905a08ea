//! The PROXY protocol (v1 and v2) on the public listener: behind a TCP load balancer the
//! client's address exists only in the header the balancer sends before the first byte of
//! TLS or HTTP. [`read_client`] reads that header, once per connection and before anything
//! else, and says which address the connection's requests belong to.
//!
//! Only peers in `server.proxy_protocol.trusted` may name a client. A connection from any
//! other peer that starts with a header is refused, so nothing else can claim an address;
//! with `required`, so is a trusted peer's connection without one. Bytes read past the
//! header are handed on to TLS or to the HTTP/2 preface check, as `preface.rs` does.

use std::io;
use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

pub mod header;

use header::Parsed;

/// How much the first read may take: the header and usually the request head or TLS
/// hello behind it, so that serving them costs no extra read.
const FIRST_READ: usize = 2048;

/// `server.proxy_protocol`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolSettings {
    /// Peers whose header is believed.
    pub trusted: Vec<IpNet>,
    /// A trusted peer's connection without a header is refused.
    pub required: bool,
}

impl ProxyProtocolSettings {
    fn trusts(&self, peer: SocketAddr) -> bool {
        let ip = peer.ip().to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// Why a connection was closed before its first request (the `reason` label of
/// `reset_gateway_proxy_protocol_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A header from a peer outside `trusted`.
    Untrusted,
    /// No header from a trusted peer under `required: true`.
    Missing,
    /// A header that breaks the format.
    Malformed,
    /// A header longer than the gateway reads.
    Oversized,
    /// The connection closed in the middle of a header.
    Truncated,
    /// A header started but did not end within `server.header_read_timeout`.
    Timeout,
}

impl Refused {
    /// Every reason, for metrics that exist from the start.
    pub const ALL: [Refused; 6] = [
        Refused::Untrusted,
        Refused::Missing,
        Refused::Malformed,
        Refused::Oversized,
        Refused::Truncated,
        Refused::Timeout,
    ];

    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Untrusted => "untrusted",
            Refused::Missing => "missing",
            Refused::Malformed => "malformed",
            Refused::Oversized => "oversized",
            Refused::Truncated => "truncated",
            Refused::Timeout => "timeout",
        }
    }
}

/// What became of a connection's first bytes.
#[derive(Debug)]
pub enum Failure {
    /// Refused for its header (or the lack of one): closed without an answer and counted.
    Refused(Refused),
    /// It closed, failed or stayed silent before anything PROXY-like: handled as any
    /// connection that never sent a request.
    Io(io::Error),
}

/// The client a connection's requests belong to, the bytes read after any header, and the
/// connection itself. Reads until the header is whole or the bytes are plainly something
/// else; each wait is one readiness wake-up, never a timer looking again, and all of it
/// ends at `deadline`.
pub async fn read_client<I: AsyncRead + Unpin>(
    io: &mut I,
    peer: SocketAddr,
    settings: &ProxyProtocolSettings,
    deadline: Instant,
) -> Result<(SocketAddr, BytesMut), Failure> {
    let trusted = settings.trusts(peer);
    let mut read = BytesMut::with_capacity(FIRST_READ);
    loop {
        // A peer that may not name a client is refused as soon as it tries, whether or
        // not the rest of its header would parse.
        if !trusted && header::started(&read) {
            return Err(Failure::Refused(Refused::Untrusted));
        }
        let refused = match header::parse(&read) {
            Parsed::Incomplete => {
                match tokio::time::timeout_at(deadline, io.read_buf(&mut read)).await {
                    Ok(Ok(0)) if header::started(&read) => Refused::Truncated,
                    Ok(Ok(0)) => return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into())),
                    Ok(Ok(_)) => continue,
                    Ok(Err(error)) => return Err(Failure::Io(error)),
                    Err(_) if header::started(&read) => Refused::Timeout,
                    Err(_) => return Err(Failure::Io(io::ErrorKind::TimedOut.into())),
                }
            }
            Parsed::Absent if settings.required && trusted => Refused::Missing,
            Parsed::Absent => return Ok((peer, read)),
            Parsed::Header { len, source } => {
                read.advance(len);
                return Ok((source.unwrap_or(peer), read));
            }
            Parsed::Malformed => Refused::Malformed,
            Parsed::Oversized => Refused::Oversized,
        };
        return Err(Failure::Refused(refused));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    const LB: &str = "10.0.0.5:40000";
    const STRANGER: &str = "198.51.100.9:40000";

    fn settings(required: bool) -> ProxyProtocolSettings {
        ProxyProtocolSettings {
            trusted: vec!["10.0.0.0/24".parse().unwrap()],
            required,
        }
    }

    /// What `read_client` makes of `sent` from `peer`, the sender then closing.
    async fn read(
        sent: &[u8],
        peer: &str,
        required: bool,
    ) -> Result<(SocketAddr, Vec<u8>), Failure> {
        let (mut client, mut server) = tokio::io::duplex(8192);
        client.write_all(sent).await.unwrap();
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        read_client(
            &mut server,
            peer.parse().unwrap(),
            &settings(required),
            deadline,
        )
        .await
        .map(|(client, rest)| (client, rest.to_vec()))
    }

    fn refused(result: Result<(SocketAddr, Vec<u8>), Failure>) -> Refused {
        match result {
            Err(Failure::Refused(refused)) => refused,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_trusted_peers_header_names_the_client_and_the_rest_is_handed_on() {
        let (client, rest) = read(
            b"PROXY TCP4 203.0.113.7 10.0.0.1 5000 80\r\nGET /",
            LB,
            true,
        )
        .await
        .unwrap();
        assert_eq!(client, "203.0.113.7:5000".parse().unwrap());
        assert_eq!(rest, b"GET /");
    }

    #[tokio::test]
    async fn without_a_header_the_peer_is_the_client_unless_one_is_required() {
        for peer in [LB, STRANGER] {
            let (client, rest) = read(b"GET / HTTP/1.1\r\n", peer, false).await.unwrap();
            assert_eq!(client, peer.parse().unwrap());
            assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        }
        let (client, _) = read(b"\x16\x03\x01", STRANGER, true).await.unwrap();
        assert_eq!(client, STRANGER.parse().unwrap());
        assert_eq!(
            refused(read(b"GET / HTTP/1.1\r\n", LB, true).await),
            Refused::Missing
        );
    }

    #[tokio::test]
    async fn an_untrusted_peer_is_refused_as_soon_as_its_header_starts() {
        // The signature alone: the rest never needs to arrive.
        assert_eq!(
            refused(read(b"PROXY ", STRANGER, false).await),
            Refused::Untrusted
        );
        assert_eq!(
            refused(read(header::V2_SIGNATURE, STRANGER, false).await),
            Refused::Untrusted
        );
    }

    #[tokio::test]
    async fn broken_cut_short_and_oversized_headers_are_refused_by_reason() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 5000 80\r\n";
        assert_eq!(
            refused(read(&v1[..20], LB, false).await),
            Refused::Truncated
        );
        assert_eq!(
            refused(read(b"PROXY TCP4 nonsense\r\n", LB, false).await),
            Refused::Malformed
        );
        let mut endless = b"PROXY UNKNOWN ".to_vec();
        endless.resize(200, b'x');
        assert_eq!(refused(read(&endless, LB, false).await), Refused::Oversized);
        let mut v2 = header::V2_SIGNATURE.to_vec();
        v2.extend([0x21, 0x11, 0xff, 0xff]);
        assert_eq!(refused(read(&v2, LB, false).await), Refused::Oversized);
    }

    #[tokio::test]
    async fn a_connection_closed_before_anything_proxy_like_is_not_counted() {
        assert!(matches!(read(b"", LB, true).await, Err(Failure::Io(_))));
        assert!(matches!(read(b"PRO", LB, true).await, Err(Failure::Io(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_that_stalls_is_refused_at_the_deadline() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PROXY TCP4 203.0.").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let result =
            read_client(&mut server, LB.parse().unwrap(), &settings(false), deadline).await;
        assert!(
            matches!(result, Err(Failure::Refused(Refused::Timeout))),
            "{result:?}"
        );
        assert!(Instant::now() >= deadline);
    }
}
