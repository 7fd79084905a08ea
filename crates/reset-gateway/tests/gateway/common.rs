//! Shared test harness: a gateway in-process on a free loopback port in front of qb-mock.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use qb_mock::{MockConfig, MockServer};
use reset_gateway::GatewayConfig;
use reset_guard::{ApiKey, TokenDigest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SERVER_KEY: &str = "server-api-key-9f8e7d";
pub const IOS_TOKEN: &str = "ios-client-token-1a2b3c";
pub const WEB_TOKEN: &str = "web-client-token-4d5e6f";
pub const ALICE: &str = "alice@example.com";
pub const RESET: &str = "/users/password/reset.json";

pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub mock: MockServer,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The YAML a test gateway runs on: two clients, short timeouts, `extra` appended to `guard:`
/// (indented by the caller) or as further top-level sections.
pub fn yaml(upstream: &str, guard_extra: &str, top_extra: &str) -> String {
    let ios = TokenDigest::of(IOS_TOKEN.as_bytes()).to_hex();
    let web = TokenDigest::of(WEB_TOKEN.as_bytes()).to_hex();
    format!(
        "server:\n  listen: 127.0.0.1:0\n  header_read_timeout: 300ms\n  shutdown_grace: 5s\n\
         admin:\n  listen: 127.0.0.1:0\n\
         upstream:\n  url: {upstream}\n  timeout: 400ms\n  connect_timeout: 400ms\n  pass_headers: [User-Agent, X-Trace]\n\
         guard:\n  clients:\n    - id: ios\n      token_sha256: {ios}\n    - id: web\n      token_sha256: {web}\n{guard_extra}{limits}\
         {top_extra}",
        // Tests that are not about limits must not trip over the defaults.
        limits = if guard_extra.contains("limits:") {
            ""
        } else {
            "  limits: { per_ip: [], per_client: [], per_email: [], global: [] }\n"
        }
    )
}

/// `yaml` with `keys` (lines indented by two) added to its `server:` section.
pub fn with_server_keys(yaml: &str, keys: &str) -> String {
    yaml.replacen("server:\n", &format!("server:\n{keys}"), 1)
}

pub fn mock_config() -> MockConfig {
    MockConfig {
        api_key: SERVER_KEY.to_owned(),
        users: vec![ALICE.to_owned()],
        ..MockConfig::default()
    }
}

impl Gateway {
    pub async fn start(guard_extra: &str) -> Gateway {
        Self::start_with(mock_config(), guard_extra, "").await
    }

    pub async fn start_with(mock: MockConfig, guard_extra: &str, top_extra: &str) -> Gateway {
        let mock = MockServer::start(mock).await.unwrap();
        let yaml = yaml(&mock.url(), guard_extra, top_extra);
        Self::start_yaml(mock, &yaml).await
    }

    /// A further gateway on `yaml`, whose upstream is whatever `yaml` names: another
    /// replica of a gateway started before (its own mock is there only to be owned).
    pub async fn replica(yaml: &str) -> Gateway {
        Self::start_yaml(MockServer::start(mock_config()).await.unwrap(), yaml).await
    }

    pub async fn start_yaml(mock: MockServer, yaml: &str) -> Gateway {
        let settings = GatewayConfig::from_yaml(yaml)
            .unwrap()
            .validate_with_key(yaml, ApiKey::new(SERVER_KEY).unwrap())
            .unwrap();
        let app = reset_gateway::build(settings).await.unwrap();
        let addr = app.local_addr();
        let admin = app.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        Gateway {
            addr,
            admin,
            mock,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `GET /users/password/reset.json?{query}` with these headers.
    pub async fn reset(&self, query: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", &format!("{RESET}?{query}"), headers, "")
            .await
    }

    /// A reset from the iOS client.
    pub async fn reset_as_ios(&self, query: &str) -> Reply {
        self.reset(query, &[("QB-Token", IOS_TOKEN)]).await
    }

    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut head =
            format!("{method} {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(body);
        raw(self.addr, head.as_bytes()).await
    }

    /// `GET` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        raw(
            self.admin,
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Headers other than the ones that differ between any two answers (date, request id).
    pub fn stable_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(n, _)| n != "date" && n != "x-request-id")
            .cloned()
            .collect()
    }
}

/// Writes `request` on a fresh connection and reads the answer until the server closes.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the gateway answered and closed within 10s")
        .unwrap();
    parse(&bytes)
}

pub fn parse(bytes: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

impl Gateway {
    /// A gateway whose upstream is `url` rather than its own mock.
    pub async fn start_upstream(url: &str, top_extra: &str) -> Gateway {
        let mock = MockServer::start(mock_config()).await.unwrap();
        let yaml = yaml(url, "", top_extra);
        Self::start_yaml(mock, &yaml).await
    }
}

/// A loopback address nothing listens on.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A CA and a certificate for `localhost` and `127.0.0.1` signed by it, written to `dir`. Each has a name
/// of its own: OpenSSL (redis-server, redis-cli) takes a leaf named as its issuer for
/// self-signed.
pub fn test_certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    test_certificates_for(dir, &["localhost", "127.0.0.1"])
}

/// [`test_certificates`], the server's certificate naming `sans` alone.
pub fn test_certificates_for(
    dir: &std::path::Path,
    sans: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let named = |sans: Vec<String>, name: &str| {
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params
    };
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = named(Vec::new(), "reset-gateway test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = named(sans.iter().map(|s| s.to_string()).collect(), sans[0])
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let files = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&files.0, ca.pem()).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

/// Asks `probe` every 20 ms until `done` holds of its answer, at most `tries` times, and
/// returns the last answer: for state another task or process reaches in its own time.
pub async fn poll_until<T>(
    tries: u32,
    mut probe: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let mut answer = probe().await;
    for _ in 1..tries {
        if done(&answer) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        answer = probe().await;
    }
    answer
}

/// `/readyz` of `gateway`, asked every 100 ms for a second and a half: a gateway starts
/// not ready under `on_error: deny`, and its probe (at start, then every 250 ms while Redis
/// does not answer) would turn a 503 to 200 within that time if it found Redis serving. So
/// a 503 throughout says the probe found it not serving, not only that it has not run.
pub async fn readiness_across_probes(gateway: &Gateway) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..15 {
        statuses.push(gateway.admin_get("/readyz").await.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    statuses
}

/// The value of one sample in Prometheus text, e.g. `reset_gateway_requests_total{outcome="forwarded"}`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A file holding the limit-key secret that gateways sharing one Redis must all use.
pub fn key_secret_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "reset-gateway-test-key-secret-{}",
        std::process::id()
    ));
    std::fs::write(&path, "test-key-secret-0123456789abcdef").unwrap();
    path
}

/// Checks a gateway configuration whose `store.redis` section is `redis` (lines indented by
/// four), as check-config would; the error as shown.
pub fn check_redis_section(redis: &str) -> Result<(), String> {
    let yaml = yaml(
        "http://127.0.0.1:9",
        "",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n{redis}",
            key_secret_file().display()
        ),
    );
    let config = reset_gateway::GatewayConfig::from_yaml(&yaml).map_err(|e| e.to_string())?;
    config
        .validate_with_key(&yaml, ApiKey::new(SERVER_KEY).unwrap())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A TLS server's settings with a certificate from a private CA written to `dir`, offering
/// `alpn`; and the CA's file.
pub fn tls_server_config(
    dir: &std::path::Path,
    alpn: &[&[u8]],
) -> (rustls::ServerConfig, std::path::PathBuf) {
    use rustls::pki_types::pem::PemObject;
    let (ca_file, cert_file, key_file) = test_certificates(dir);
    let cert = rustls::pki_types::CertificateDer::pem_file_iter(&cert_file)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key_file).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (tls, ca_file)
}

/// qb-mock over TLS with a certificate from a private CA, offering `alpn`; and the CA's file,
/// kept as long as the directory.
pub async fn tls_mock(alpn: &[&[u8]]) -> (MockServer, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca_file) = tls_server_config(dir.path(), alpn);
    let mock = MockServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        mock_config(),
        Some(std::sync::Arc::new(tls)),
    )
    .await
    .unwrap();
    (mock, dir, ca_file)
}

/// Resets `query` on `gateway` every 100 ms until one is refused with 429, a decision only
/// the limit store makes: no answer may be a 5xx meanwhile, and the 429 must come within
/// 15 s of `since`. `during` names the disturbance for the failure messages.
pub async fn reset_until_limited(
    gateway: &Gateway,
    query: &str,
    since: std::time::Instant,
    during: &str,
) {
    let mut statuses = Vec::new();
    loop {
        let status = gateway.reset_as_ios(query).await.status;
        statuses.push(status);
        assert!(status < 500, "a 5xx {during}: {statuses:?}");
        if status == 429 {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "limits did not apply again within 15 s: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sending half of a cleartext HTTP/2 connection to `addr`, its driver spawned.
pub async fn h2_connect(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// A reset of `query` to `addr` as the iOS client sends it over HTTP/2 (the full URI).
pub fn h2_reset(addr: SocketAddr, query: &str) -> http::request::Builder {
    http::Request::get(format!("http://{addr}{RESET}?{query}")).header("qb-token", IOS_TOKEN)
}

/// Whether `server` holds limit state: a key other than the probe's own (`{prefix}:probe`).
pub fn holds_limits(server: &test_support::RedisServer) -> bool {
    server
        .dump()
        .iter()
        .any(|(key, _)| !key.ends_with(":probe"))
}
