//! The listeners: `server` (the public one, with its TLS and CORS) and `admin` (health,
//! readiness and metrics) as written, checked together into [`ServerSettings`], since the
//! two must not share an address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use reset_guard::{Cidr, ConfigDuration, ConfigError};
use serde::Deserialize;

use crate::proxy_protocol::ProxyProtocolSettings;

/// `server`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the public listener.
    pub listen: SocketAddr,
    /// A client must send its whole request head within this time.
    pub header_read_timeout: ConfigDuration,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace: ConfigDuration,
    /// A whole request, head to answer, must be done within this time.
    pub request_timeout: ConfigDuration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Worker threads, each with its own event loop, listener and upstream pool; 0: one per core.
    pub workers: usize,
    /// Largest request head, in bytes; beyond it the answer is 431.
    pub max_header_bytes: usize,
    /// Longest request target (path and query), in bytes; beyond it the answer is 414.
    pub max_uri_bytes: usize,
    /// TLS termination (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: Option<TlsConfig>,
    /// CORS for browser apps.
    pub cors: CorsConfig,
    /// PROXY protocol headers from TCP load balancers.
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            header_read_timeout: ConfigDuration::from_secs(5),
            shutdown_grace: ConfigDuration::from_secs(20),
            request_timeout: ConfigDuration::from_secs(30),
            max_connections: 10_000,
            workers: 0,
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            tls: None,
            cors: CorsConfig::default(),
            proxy_protocol: None,
        }
    }
}

/// `server.tls`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `server.proxy_protocol`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// Load balancers (CIDRs, or bare addresses) whose header names the client.
    pub trusted: Vec<Cidr>,
    /// Refuse a trusted peer's connection that starts without a header.
    #[serde(default)]
    pub required: bool,
}

/// `server.cors`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the gateway from a browser (`https://app.example`); empty: CORS off.
    pub allow_origins: Vec<String>,
    /// Request headers a browser may send besides [`CORS_HEADERS`] (a tracing SDK's own).
    pub allow_headers: Vec<String>,
    /// Whether a request sent with credentials (`credentials: "include"`, `withCredentials`)
    /// may be read: the gateway reads no cookie, so only for apps that send them anyway.
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight answer.
    pub max_age: ConfigDuration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allow_origins: Vec::new(),
            allow_headers: Vec::new(),
            allow_credentials: false,
            max_age: ConfigDuration::from_secs(600),
        }
    }
}

/// The request headers a browser may always send: the credentials, the QuickBlox SDK's
/// own, and the tracing headers browser SDKs add to every call (W3C trace context,
/// baggage, Sentry's), which would otherwise fail each call in its preflight.
pub const CORS_HEADERS: [&str; 10] = [
    "qb-token",
    "authorization",
    "content-type",
    "x-request-id",
    "qb-sdk",
    "qb-os",
    "traceparent",
    "tracestate",
    "baggage",
    "sentry-trace",
];

/// An origin as a browser sends it in `Origin`: scheme and host in lower case, without the
/// scheme's default port, so that what is configured can match it byte for byte.
fn browser_origin(origin: &str) -> Result<http::HeaderValue, String> {
    let like = "is not an origin like https://app.example";
    let uri = origin
        .parse::<Uri>()
        .map_err(|_| format!("{origin:?} {like}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!("{origin:?} {like}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(format!("{origin:?} {like}")),
    };
    if uri.path() != "/"
        || uri.query().is_some()
        || origin.ends_with('/')
        || origin.contains('#')
        || authority.as_str().contains('@')
    {
        return Err(format!(
            "{origin:?} {like} (no path, query, user or trailing slash)"
        ));
    }
    // A port that is no port number is no port at all to the URI parser (`:99999`).
    let after_host = authority.as_str().get(authority.host().len()..);
    if after_host.is_some_and(|rest| !rest.is_empty()) && authority.port_u16().is_none() {
        return Err(format!("{origin:?}: the port is not a port number"));
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("{origin:?} {like} (it names no host)"));
    }
    if host.contains('*') {
        return Err(format!(
            "{origin:?}: wildcards are not supported; list each origin"
        ));
    }
    let origin = match authority.port_u16() {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    };
    http::HeaderValue::from_str(&origin).map_err(|_| format!("{origin:?} {like}"))
}

/// `admin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
        }
    }
}

/// Checked `server` section.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Public listener.
    pub listen: SocketAddr,
    /// Request head deadline.
    pub header_read_timeout: Duration,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Whole-request deadline.
    pub request_timeout: Duration,
    /// Connections at once.
    pub max_connections: usize,
    /// Worker threads.
    pub workers: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Longest request target.
    pub max_uri_bytes: usize,
    /// TLS files, if TLS is on.
    pub tls: Option<TlsConfig>,
    /// Allowed CORS origins, as browsers write them (empty: off).
    pub cors_origins: Vec<http::HeaderValue>,
    /// Request headers a preflight may name: [`CORS_HEADERS`] and `allow_headers`.
    pub cors_allow_headers: Vec<http::HeaderName>,
    /// Requests with credentials may be read.
    pub cors_allow_credentials: bool,
    /// Preflight cache time.
    pub cors_max_age: Duration,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// PROXY protocol on the public listener, when on.
    pub proxy_protocol: Option<ProxyProtocolSettings>,
}

impl ServerConfig {
    pub(super) fn validate(&self, admin: &AdminConfig) -> Result<ServerSettings, ConfigError> {
        if self.workers > 1024 {
            return Err(ConfigError::new("server.workers", "at most 1024"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if !(8192..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be 8192 to 1048576",
            ));
        }
        if !(256..=self.max_header_bytes).contains(&self.max_uri_bytes) {
            return Err(ConfigError::new(
                "server.max_uri_bytes",
                "must be 256 to server.max_header_bytes",
            ));
        }
        for (key, value) in [
            ("server.header_read_timeout", self.header_read_timeout),
            ("server.request_timeout", self.request_timeout),
        ] {
            if value.0.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if let Some(tls) = &self.tls {
            if !tls.cert_file.is_file() {
                return Err(ConfigError::new(
                    "server.tls.cert_file",
                    format!("{} is not a readable file", tls.cert_file.display()),
                ));
            }
            if !tls.key_file.is_file() {
                // Not echoed: a private key pasted in place of its path would be.
                return Err(ConfigError::new(
                    "server.tls.key_file",
                    "names no readable file",
                ));
            }
        }
        let mut cors_origins = Vec::new();
        for (i, origin) in self.cors.allow_origins.iter().enumerate() {
            let value = browser_origin(origin)
                .map_err(|why| ConfigError::new(format!("server.cors.allow_origins[{i}]"), why))?;
            if !cors_origins.contains(&value) {
                cors_origins.push(value);
            }
        }
        let mut cors_allow_headers: Vec<http::HeaderName> = CORS_HEADERS
            .iter()
            .map(|name| http::HeaderName::from_static(name))
            .collect();
        for (i, name) in self.cors.allow_headers.iter().enumerate() {
            let name = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                ConfigError::new(
                    format!("server.cors.allow_headers[{i}]"),
                    format!("{name:?} is not a header name"),
                )
            })?;
            if !cors_allow_headers.contains(&name) {
                cors_allow_headers.push(name);
            }
        }
        if let Some(proxy) = &self.proxy_protocol {
            if proxy.trusted.is_empty() {
                // No peer could send a header: most likely a forgotten list, which would
                // refuse every balancer's connection.
                return Err(ConfigError::new(
                    "server.proxy_protocol.trusted",
                    "must name at least one load balancer address or CIDR block",
                ));
            }
        }
        if clash(admin.listen, self.listen) {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from server.listen: same port on an address both take",
            ));
        }
        if let Some(tls) = &self.tls {
            // Read as the gateway will at start, so a pair that cannot serve is found here.
            crate::tls::CertStore::load(tls)
                .map_err(|e| crate::config::located_error(&e, "server.tls"))?;
        }
        Ok(ServerSettings {
            listen: self.listen,
            header_read_timeout: self.header_read_timeout.0,
            shutdown_grace: self.shutdown_grace.0,
            request_timeout: self.request_timeout.0,
            max_connections: self.max_connections,
            workers: match self.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            max_header_bytes: self.max_header_bytes,
            max_uri_bytes: self.max_uri_bytes,
            tls: self.tls.clone(),
            cors_origins,
            cors_allow_headers,
            cors_allow_credentials: self.cors.allow_credentials,
            cors_max_age: self.cors.max_age.0,
            admin_listen: admin.listen,
            proxy_protocol: self
                .proxy_protocol
                .as_ref()
                .map(|proxy| ProxyProtocolSettings {
                    trusted: proxy.trusted.iter().map(|cidr| cidr.0).collect(),
                    required: proxy.required,
                }),
        })
    }
}

/// Whether two listeners cannot both bind: the same port (not 0, which picks a free one)
/// on the same address, or on one the other's wildcard covers (`0.0.0.0` every IPv4
/// address; `[::]` every address, IPv4 too on a dual-stack host).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

#[cfg(test)]
mod tests {
    use super::{browser_origin, clash};

    #[test]
    fn origins_are_written_as_browsers_send_them() {
        for (configured, sent) in [
            ("https://app.example", "https://app.example"),
            ("HTTPS://App.Example:443", "https://app.example"),
            ("http://LOCALHOST:39110", "http://localhost:39110"),
            ("http://app.example:80", "http://app.example"),
            ("https://app.example:8443", "https://app.example:8443"),
            ("http://[::1]:3000", "http://[::1]:3000"),
        ] {
            assert_eq!(browser_origin(configured).unwrap(), sent, "{configured}");
        }
        for refused in [
            "https://*.example.com",
            "https://app.example/",
            "https://app.example/path",
            "https://user@app.example",
            "https://app.example:99999",
            "https://app.example:84433",
            "https://:443",
            "https://app.example?x=1",
            "https://app.example#f",
            "ftp://app.example",
            "app.example",
            "*",
            "null",
        ] {
            let why = browser_origin(refused).unwrap_err();
            assert!(why.contains(refused), "{why}");
        }
        assert!(browser_origin("https://*.example.com")
            .unwrap_err()
            .contains("wildcards are not supported"));
    }

    #[test]
    fn listeners_clash_on_one_port_where_one_covers_the_other() {
        let clashing = [
            ("127.0.0.1:80", "127.0.0.1:80"),
            ("0.0.0.0:80", "127.0.0.1:80"),
            ("[::]:80", "127.0.0.1:80"),
            ("[::]:80", "[::1]:80"),
        ];
        for (a, b) in clashing {
            assert!(clash(a.parse().unwrap(), b.parse().unwrap()), "{a} {b}");
            assert!(clash(b.parse().unwrap(), a.parse().unwrap()), "{b} {a}");
        }
        for (a, b) in [
            ("0.0.0.0:80", "[::1]:80"),
            ("127.0.0.1:80", "127.0.0.2:80"),
            ("0.0.0.0:80", "0.0.0.0:81"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            assert!(!clash(a.parse().unwrap(), b.parse().unwrap()), "{a} {b}");
        }
    }
}
