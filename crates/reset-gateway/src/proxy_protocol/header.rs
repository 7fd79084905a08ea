//! The PROXY protocol header itself, on the bytes read so far: absent, still arriving,
//! whole (and how long), or refused. No I/O here, so the fuzz target drives it directly.
//!
//! The `ppp` crate decodes the two formats (the v1 text line, the v2 addresses and TLVs);
//! this module frames them: it decides when a header has started and when it is whole,
//! bounds its length before waiting for the rest, and refuses the v2 family/protocol bytes
//! the specification says a receiver must refuse, which `ppp` accepts.

use std::net::SocketAddr;

/// How a v1 (text) header starts.
pub const V1_SIGNATURE: &[u8] = b"PROXY ";

/// How a v2 (binary) header starts.
pub const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Longest v1 header, `\r\n` included (the specification's own bound).
pub const MAX_V1_LEN: usize = 107;

/// Longest v2 header accepted, fixed part included. The format allows 16 + 65535 bytes;
/// balancers send the addresses and a few short TLVs (AWS's endpoint id, TLS facts), well
/// under this, and nothing longer is read into memory.
pub const MAX_V2_LEN: usize = 4096;

/// The fixed part of a v2 header: signature, version and command, family and protocol,
/// length.
const V2_FIXED_LEN: usize = 16;

/// What the bytes a connection started with say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// They start with something else (HTTP, TLS): there is no header.
    Absent,
    /// They are the start of a header, or could still be: read more.
    Incomplete,
    /// A whole header of `len` bytes. `source` is the client's address, or `None` when
    /// the header names none (a `LOCAL` health check, an unknown, UNIX or UDP family):
    /// then the connection's own peer stands.
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// A header that breaks the format.
    Malformed,
    /// A header longer than this gateway accepts ([`MAX_V1_LEN`], [`MAX_V2_LEN`]).
    Oversized,
}

/// Reads `bytes`, the first bytes of a connection (more may follow).
pub fn parse(bytes: &[u8]) -> Parsed {
    if bytes.starts_with(V2_SIGNATURE) {
        v2(bytes)
    } else if bytes.starts_with(V1_SIGNATURE) {
        v1(bytes)
    } else if V2_SIGNATURE.starts_with(bytes) || V1_SIGNATURE.starts_with(bytes) {
        Parsed::Incomplete
    } else {
        Parsed::Absent
    }
}

/// Whether `bytes` start with a whole signature: from there on, the connection is
/// sending a header, whatever follows.
pub fn started(bytes: &[u8]) -> bool {
    bytes.starts_with(V2_SIGNATURE) || bytes.starts_with(V1_SIGNATURE)
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, `TCP6` alike, or `PROXY UNKNOWN …\r\n`.
fn v1(bytes: &[u8]) -> Parsed {
    let window = &bytes[..bytes.len().min(MAX_V1_LEN)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        return if bytes.len() >= MAX_V1_LEN {
            Parsed::Oversized
        } else {
            Parsed::Incomplete
        };
    };
    let line = &bytes[..=newline];
    if !line.ends_with(b"\r\n") {
        return Parsed::Malformed;
    }
    // The line is whole: any error of ppp's, "partial" ones included, is a broken header.
    match ppp::v1::Header::try_from(line) {
        Ok(header) if header.header.len() == line.len() => Parsed::Header {
            len: line.len(),
            source: match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                ppp::v1::Addresses::Unknown => None,
            },
        },
        _ => Parsed::Malformed,
    }
}

/// The 16-byte fixed part, then as many bytes of addresses and TLVs as it announces.
fn v2(bytes: &[u8]) -> Parsed {
    if bytes.len() < V2_FIXED_LEN {
        return Parsed::Incomplete;
    }
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if len > MAX_V2_LEN {
        return Parsed::Oversized;
    }
    let (version_command, family_protocol) = (bytes[12], bytes[13]);
    // Version 2, command LOCAL (0) or PROXY (1); anything else must be dropped. Under
    // PROXY, UNSPEC, then TCP and UDP over IPv4 and IPv6, UNIX stream and datagram are the
    // only combinations defined; receivers must refuse the others.
    let local = match version_command {
        0x20 => true,
        0x21 if matches!(
            family_protocol,
            0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32
        ) =>
        {
            false
        }
        _ => return Parsed::Malformed,
    };
    if bytes.len() < len {
        return Parsed::Incomplete;
    }
    if local {
        // The balancer's own health check: the block after the fixed part, family
        // included, is discarded and the real endpoints stand.
        return Parsed::Header { len, source: None };
    }
    let Ok(header) = ppp::v2::Header::try_from(&bytes[..len]) else {
        return Parsed::Malformed;
    };
    // TLVs are ignored, but after a known address block they must be well formed: one
    // overrunning the header is a sender out of step with the format. (Under UNSPEC the
    // block's size is unknown, so nothing after it is read.)
    if family_protocol != 0x00 && header.tlvs().any(|tlv| tlv.is_err()) {
        return Parsed::Malformed;
    }
    let source = match (header.addresses, family_protocol) {
        (ppp::v2::Addresses::IPv4(a), 0x11) => Some((a.source_address, a.source_port).into()),
        (ppp::v2::Addresses::IPv6(a), 0x21) => Some((a.source_address, a.source_port).into()),
        // UNSPEC, UNIX and UDP: the real endpoints stand, as the specification allows.
        _ => None,
    };
    Parsed::Header { len, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend([command, family]);
        bytes.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
        bytes.extend(body);
        bytes
    }

    const TCP4_BODY: [u8; 12] = [203, 0, 113, 7, 10, 0, 0, 1, 0xc3, 0x50, 0, 80];

    fn header(len: usize, source: &str) -> Parsed {
        Parsed::Header {
            len,
            source: Some(source.parse().unwrap()),
        }
    }

    #[test]
    fn v1_tcp4_and_tcp6_name_the_source() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 50000 80\r\n";
        let mut bytes = line.to_vec();
        bytes.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&bytes), header(line.len(), "203.0.113.7:50000"));
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 443 8080\r\n";
        assert_eq!(parse(line), header(line.len(), "[2001:db8::7]:443"));
    }

    #[test]
    fn v1_unknown_keeps_the_peer() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ] {
            assert_eq!(
                parse(line),
                Parsed::Header {
                    len: line.len(),
                    source: None
                }
            );
        }
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 50000 80\r\n".to_vec();
        let v2 = v2_header(0x21, 0x11, &TCP4_BODY);
        for whole in [v1, v2] {
            for end in 0..whole.len() {
                assert_eq!(
                    parse(&whole[..end]),
                    Parsed::Incomplete,
                    "{:?}",
                    &whole[..end]
                );
            }
        }
    }

    #[test]
    fn other_protocols_are_absent_at_their_first_differing_byte() {
        for start in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST",
            b"PRI * HTTP/2.0",
            b"\x16\x03\x01",
            b"\r\n\r\nGET",
            b"PROXY\r\n",
        ] {
            assert_eq!(parse(start), Parsed::Absent, "{start:?}");
        }
    }

    #[test]
    fn broken_v1_lines_are_malformed() {
        for line in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 50000 80\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 50000\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 50000 80\r\n",
            b"PROXY TCP4 203.0.113.7  10.0.0.1 50000 80\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 050000 80\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 80\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 50000 80\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 50000 80 \r\n",
            b"PROXY \xff\r\n",
        ] {
            assert_eq!(
                parse(line),
                Parsed::Malformed,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_v1_line_without_an_end_is_oversized_at_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(MAX_V1_LEN - 1, b'x');
        assert_eq!(parse(&line), Parsed::Incomplete);
        line.push(b'x');
        assert_eq!(parse(&line), Parsed::Oversized);
    }

    #[test]
    fn v2_proxy_names_the_source_and_ignores_tlvs() {
        let whole = v2_header(0x21, 0x11, &TCP4_BODY);
        assert_eq!(parse(&whole), header(whole.len(), "203.0.113.7:50000"));
        // An AWS endpoint-id TLV (0xEA) and a NOOP (0x04) after the addresses.
        let mut body = TCP4_BODY.to_vec();
        body.extend([0xea, 0, 4, 1, b'v', b'p', b'c', 0x04, 0, 1, 0]);
        let whole = v2_header(0x21, 0x11, &body);
        let mut bytes = whole.clone();
        bytes.extend(b"\x16\x03\x01");
        assert_eq!(parse(&bytes), header(whole.len(), "203.0.113.7:50000"));
        let mut body = vec![0x20; 16];
        body.extend([0x20, 0x01, 0x0d, 0xb8].iter().chain(&[0; 11]).chain(&[1]));
        body.extend([0x01, 0xbb, 0, 80]);
        let whole = v2_header(0x21, 0x21, &body);
        assert_eq!(
            parse(&whole),
            header(whole.len(), "[2020:2020:2020:2020:2020:2020:2020:2020]:443")
        );
    }

    #[test]
    fn v2_local_unspec_unix_and_udp_keep_the_peer() {
        for (command, family, body) in [
            (0x20, 0x00, &[][..]),
            (0x20, 0x11, &TCP4_BODY[..]),
            (0x20, 0x4f, &[1, 2, 3][..]),
            (0x21, 0x00, &[1, 2, 3][..]),
            (0x21, 0x12, &TCP4_BODY[..]),
            (0x21, 0x31, &[0; 216][..]),
        ] {
            let whole = v2_header(command, family, body);
            assert_eq!(
                parse(&whole),
                Parsed::Header {
                    len: whole.len(),
                    source: None
                },
                "{command:#x} {family:#x}"
            );
        }
    }

    #[test]
    fn broken_v2_headers_are_malformed() {
        let mut overrun = TCP4_BODY.to_vec();
        overrun.extend([0xea, 0, 9, 1]);
        for (command, family, body) in [
            (0x11, 0x11, &TCP4_BODY[..]),
            (0x22, 0x11, &TCP4_BODY[..]),
            (0x21, 0x13, &TCP4_BODY[..]),
            (0x21, 0x01, &TCP4_BODY[..]),
            (0x21, 0x41, &TCP4_BODY[..]),
            (0x21, 0x11, &TCP4_BODY[..8]),
            (0x21, 0x21, &TCP4_BODY[..]),
            (0x21, 0x11, &overrun[..]),
        ] {
            let whole = v2_header(command, family, body);
            assert_eq!(
                parse(&whole),
                Parsed::Malformed,
                "{command:#x} {family:#x} {body:?}"
            );
        }
    }

    #[test]
    fn a_v2_length_over_the_bound_is_refused_before_its_body_arrives() {
        let mut fixed = v2_header(0x21, 0x11, &[]);
        let announced = u16::try_from(MAX_V2_LEN - V2_FIXED_LEN + 1).unwrap();
        fixed[14..16].copy_from_slice(&announced.to_be_bytes());
        assert_eq!(parse(&fixed), Parsed::Oversized);
        let mut at_bound = v2_header(0x21, 0x11, &TCP4_BODY);
        at_bound.extend([0x04, 0x0f, 0xe1]);
        at_bound.resize(MAX_V2_LEN, 0);
        let len = u16::try_from(MAX_V2_LEN - V2_FIXED_LEN).unwrap();
        at_bound[14..16].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse(&at_bound), header(MAX_V2_LEN, "203.0.113.7:50000"));
    }
}
