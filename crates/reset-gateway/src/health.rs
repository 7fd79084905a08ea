//! `reset-gateway health`: asks the running gateway's admin listener whether it is ready,
//! for container health checks in images without a shell or curl (distroless).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::config::GatewayConfig;

/// How long the whole check may take: a container runtime's own timeout is usually 30s,
/// but a gateway that cannot answer in this long is not healthy.
const TIMEOUT: Duration = Duration::from_secs(3);

/// `GET /readyz` on the admin listener the configuration at `path` names; `Ok` with the
/// address asked when it answers 200, else the reason.
pub fn check(path: &Path) -> Result<String, String> {
    let yaml = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config = GatewayConfig::from_yaml(&yaml).map_err(|e| format!("{}: {e}", path.display()))?;
    let addr = reachable(config.admin.listen);
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("admin listener {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .and_then(|()| {
            stream
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        })
        .map_err(|e| format!("admin listener {addr}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(4096)
        .read_to_end(&mut answer)
        .map_err(|e| format!("admin listener {addr}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
    if status_line.split(' ').nth(1) == Some("200") {
        Ok(addr.to_string())
    } else {
        Err(format!("{addr}: {status_line}: {body}"))
    }
}

/// The address to reach a listener on from the same host: a wildcard listen address is
/// reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}
