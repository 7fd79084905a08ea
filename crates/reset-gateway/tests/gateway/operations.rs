//! What operators run: admin endpoints and metrics, reload, logs, TLS, CORS, limits on
//! connections and header sizes.

use std::sync::Arc;
use std::time::Duration;

use qb_mock::MockServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::process::{spawn_gateway, Process};

/// A full memory store forgets keys that still count: the operator must be able to see it.
#[tokio::test]
async fn keys_dropped_at_max_keys_are_counted() {
    let gw = Gateway::start_with(
        mock_config(),
        "  limits: { per_ip: [], per_client: [], per_email: [{ requests: 3, per: 1h }], global: [] }\n",
        "store:\n  max_keys: 64\n",
    )
    .await;
    let evicted = async || {
        sample(
            &gw.admin_get("/metrics").await.body,
            "reset_gateway_limiter_evictions_total{limit=\"per_email\"}",
        )
    };
    assert_eq!(evicted().await, Some(0.0));
    for i in 0..300 {
        gw.reset_as_ios(&format!("email=user{i}%40example.com"))
            .await;
    }
    assert!(evicted().await.unwrap() > 0.0);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let gw = Gateway::start("  limits:\n    per_ip: []\n    per_client: []\n    per_email: [{ requests: 1, per: 1h }]\n    global: []\n").await;
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
    assert_eq!(gw.admin_get("/readyz").await.status, 200);
    assert_eq!(gw.admin_get("/nope").await.status, 404);
    let post = raw(
        gw.admin,
        b"POST /readyz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        (post.status, post.header("allow")),
        (405, Some("GET, HEAD"))
    );

    gw.reset_as_ios("email=alice%40example.com").await; // forwarded
    gw.reset_as_ios("email=alice%40example.com").await; // per-email denial (silent)
    gw.reset_as_ios("email=nobody%40example.com").await; // forwarded, QuickBlox 404
    gw.reset_as_ios("email=bad").await; // 422
    gw.reset("email=bad", &[]).await; // 401

    let metrics = gw.admin_get("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let m = &metrics.body;
    for family in [
        "reset_gateway_requests_total",
        "reset_gateway_rate_limited_total",
        "reset_gateway_upstream_responses_total",
        "reset_gateway_upstream_duration_seconds_bucket",
        "reset_gateway_request_duration_seconds_bucket",
        "reset_gateway_store_errors_total",
        "reset_gateway_config_reloads_total",
    ] {
        assert!(
            m.contains(&format!(
                "# TYPE {}",
                family
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_total")
            )),
            "{family} missing:\n{m}"
        );
    }
    assert_eq!(
        sample(m, r#"reset_gateway_requests_total{outcome="forwarded"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(m, r#"reset_gateway_requests_total{outcome="rate_limited"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            m,
            r#"reset_gateway_requests_total{outcome="email_invalid"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            m,
            r#"reset_gateway_requests_total{outcome="missing_credentials"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            m,
            r#"reset_gateway_rate_limited_total{limit="per_email",shadow="false"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(m, r#"reset_gateway_upstream_responses_total{status="200"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(m, r#"reset_gateway_upstream_responses_total{status="404"}"#),
        Some(1.0),
        "true status, before uniform answers"
    );
    assert_eq!(
        sample(m, "reset_gateway_request_duration_seconds_count"),
        Some(5.0)
    );
    assert_eq!(
        sample(m, "reset_gateway_upstream_duration_seconds_count"),
        Some(2.0)
    );
    // No secret, token or address in the exposition.
    for secret in [SERVER_KEY, IOS_TOKEN, "alice", "nobody"] {
        assert!(!m.contains(secret), "{secret} in metrics");
    }
}

#[tokio::test]
async fn headers_over_max_header_bytes_get_431() {
    let gw = Gateway::start("").await;
    let big = "x".repeat(20_000);
    let reply = gw
        .reset(
            "email=alice%40example.com",
            &[("QB-Token", IOS_TOKEN), ("X-Big", &big)],
        )
        .await;
    assert_eq!(reply.status, 431);
    assert!(gw.mock.requests().is_empty());
    // The gateway keeps serving.
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );
}

#[tokio::test]
async fn beyond_max_connections_new_clients_wait_and_are_then_served() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(&yaml(&mock.url(), "", ""), "  max_connections: 1\n");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    // One idle connection holds the only slot until the header read timeout (300ms) frees it.
    let idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 200);
    drop(idle);
}

/// max_connections is the total over the workers, not rounded up per worker.
#[tokio::test]
async fn max_connections_split_over_workers_adds_up_to_it() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&mock.url(), "", "").replace("header_read_timeout: 300ms", "header_read_timeout: 5s"),
        "  max_connections: 3\n  workers: 2\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(gw.addr).await.unwrap());
    }
    let request = format!("{RESET}?email=alice%40example.com");
    let fourth = tokio::spawn({
        let addr = gw.addr;
        async move {
            let head = format!("GET {request} HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
            raw(addr, head.as_bytes()).await.status
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fourth.is_finished(),
        "a fourth connection was served beside three"
    );
    drop(idle.pop());
    assert_eq!(fourth.await.unwrap(), 200);
}

#[tokio::test]
async fn cors_preflight_and_exposed_headers_for_allowed_origins_only() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&mock.url(), "", ""),
        "  cors:\n    allow_origins: [\"https://app.example\"]\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let preflight = gw
        .send(
            "OPTIONS",
            &format!("{RESET}?email=a%40b.io"),
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "qb-token"),
            ],
            "",
        )
        .await;
    assert_eq!(preflight.status, 200, "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(preflight
        .header("access-control-allow-headers")
        .unwrap()
        .contains("qb-token"));
    assert!(
        gw.mock.requests().is_empty(),
        "a preflight never reaches QuickBlox"
    );

    let reply = gw
        .reset(
            "email=alice%40example.com",
            &[("QB-Token", IOS_TOKEN), ("Origin", "https://app.example")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(reply
        .header("access-control-expose-headers")
        .unwrap()
        .to_lowercase()
        .contains("retry-after"));

    let other = gw
        .reset(
            "email=alice%40example.com",
            &[("QB-Token", IOS_TOKEN), ("Origin", "https://evil.example")],
        )
        .await;
    assert_eq!(other.header("access-control-allow-origin"), None);
}

/// What a browser app meets: an origin configured as people write it matches what the
/// browser sends; tracing SDKs' headers and credentials pass when allowed; a preflight
/// from another origin is a 403 that says why; an OPTIONS that is no preflight is any
/// other method to the guard; and an answer the gateway makes before its checks (a target
/// too long) is readable by the page too.
#[tokio::test]
async fn cors_as_a_browser_app_meets_it() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&mock.url(), "", ""),
        "  max_uri_bytes: 256\n  cors:\n    allow_origins: [\"HTTPS://App.Example:443\"]\n    allow_headers: [x-datadog-trace-id]\n    allow_credentials: true\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let preflight = |origin: &'static str| {
        let gw = &gw;
        async move {
            gw.send(
                "OPTIONS",
                &format!("{RESET}?email=a%40b.io"),
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", "GET"),
                    (
                        "Access-Control-Request-Headers",
                        "qb-token,traceparent,sentry-trace,baggage,x-datadog-trace-id",
                    ),
                ],
                "",
            )
            .await
        }
    };
    let allowed = preflight("https://app.example").await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let headers = allowed.header("access-control-allow-headers").unwrap();
    for name in [
        "qb-token",
        "traceparent",
        "sentry-trace",
        "baggage",
        "x-datadog-trace-id",
    ] {
        assert!(headers.contains(name), "{name} in {headers}");
    }
    assert_eq!(
        allowed.header("access-control-allow-credentials"),
        Some("true")
    );

    let refused = preflight("https://evil.example").await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        refused.body,
        r#"{"errors":{"base":["Origin not allowed"]}}"#
    );
    assert_eq!(refused.header("access-control-allow-origin"), None);

    // No preflight: no Origin, or no method asked for.
    let plain = gw.send("OPTIONS", RESET, &[], "").await;
    assert_eq!((plain.status, plain.header("allow")), (405, Some("GET")));
    let no_method = gw
        .send("OPTIONS", RESET, &[("Origin", "https://app.example")], "")
        .await;
    assert_eq!(no_method.status, 405, "{no_method:?}");

    let long = format!("email={}%40b.io", "a".repeat(300));
    let too_long = gw
        .reset(
            &long,
            &[("QB-Token", IOS_TOKEN), ("Origin", "https://app.example")],
        )
        .await;
    assert_eq!(too_long.status, 414);
    assert_eq!(
        too_long.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let reply = gw
        .send("POST", RESET, &[("Origin", "https://app.example")], "")
        .await;
    assert_eq!(reply.status, 405);
    let exposed = reply.header("access-control-expose-headers").unwrap();
    assert!(exposed.to_lowercase().contains("allow"), "{exposed}");

    let metrics = gw.admin_get("/metrics").await.body;
    let count = |outcome: &str| {
        sample(
            &metrics,
            &format!("reset_gateway_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("preflight"), Some(1.0));
    assert_eq!(count("origin_refused"), Some(1.0));
    assert_eq!(count("passed_through"), Some(0.0));
    assert!(gw.mock.requests().is_empty());
}

#[tokio::test]
async fn tls_with_alpn_h2_and_http1() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let dir = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) = test_certificates(dir.path());
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&mock.url(), "", ""),
        &format!(
            "  tls:\n    cert_file: {}\n    key_file: {}\n",
            cert_file.display(),
            key_file.display()
        ),
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(&ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    for (alpn, version) in [
        (b"h2".to_vec(), http::Version::HTTP_2),
        (b"http/1.1".to_vec(), http::Version::HTTP_11),
    ] {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let tls = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let request = http::Request::get(format!(
            "https://localhost{RESET}?email=alice%40example.com"
        ))
        .header("qb-token", IOS_TOKEN)
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
        let response = if version == http::Version::HTTP_2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(request).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender.send_request(request).await.unwrap()
        };
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        assert!(response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }
    assert_eq!(gw.mock.requests().len(), 2);
}

fn write(path: &std::path::Path, yaml: &str) {
    // Written whole then renamed, as config managers do, so a poll never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let reply = raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    sample(&reply.body, series).unwrap_or(0.0)
}

#[tokio::test]
async fn reload_on_sighup_and_on_file_change_keeps_a_good_config() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let limits = |per_ip: u32| {
        format!("  responses: {{ uniform: false }}\n  limits:\n    per_ip: [{{ requests: {per_ip}, per: 1h }}]\n    per_client: []\n    per_email: []\n    global: []\n")
    };
    write(&path, &yaml(&mock.url(), &limits(100), ""));
    let gw = spawn_gateway(&path);
    let ask = || {
        let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
        async move { raw(gw.addr, request.as_bytes()).await.status }
    };
    assert_eq!(ask().await, 200);

    // SIGHUP with a tighter per-IP limit: applies at once.
    write(&path, &yaml(&mock.url(), &limits(1), ""));
    gw.signal("HUP");
    let status = poll_until(100, async || ask().await, |s| *s == 429).await;
    assert_eq!(status, 429, "the reloaded limit applies");
    // Counted once the new configuration is in force, so perhaps just after it answers.
    let successes = poll_until(
        100,
        async || {
            metric(
                gw.admin,
                r#"reset_gateway_config_reloads_total{result="success"}"#,
            )
            .await
        },
        |n| *n >= 1.0,
    )
    .await;
    assert!(successes >= 1.0);
    // The reload's line says what the quotas were and are: a mistake shows there.
    let reloaded = gw
        .line_with("configuration reloaded")
        .await
        .expect("a reload line");
    let json: serde_json::Value = serde_json::from_str(&reloaded).unwrap();
    assert_eq!(
        json["limits_changed"], "per_ip: 100/1h -> 1/1h",
        "{reloaded}"
    );
    let last_ok = async || metric(gw.admin, "reset_gateway_config_last_reload_successful").await;
    assert_eq!(last_ok().await, 1.0);

    // A broken file is rejected and the running config stays.
    std::fs::write(&path, "server: [this is not\n").unwrap();
    gw.signal("HUP");
    let failures = poll_until(
        100,
        async || {
            metric(
                gw.admin,
                r#"reset_gateway_config_reloads_total{result="failure"}"#,
            )
            .await
        },
        |n| *n >= 1.0,
    )
    .await;
    assert!(failures >= 1.0);
    assert_eq!(ask().await, 429, "still the last good configuration");
    // The failure is counted before it is logged, and the log is read by another thread.
    let rejection_logged = gw.logged("reload rejected").await;
    assert!(rejection_logged, "{:?}", gw.logs());
    // Until a reload succeeds, the gauge says the file on disk is refused (the alert on it
    // stays on as long as the bad file does, where one on the failure count cleared).
    assert_eq!(last_ok().await, 0.0);

    // Changing the file alone is enough (no signal): the limit goes back up.
    write(&path, &yaml(&mock.url(), &limits(1000), ""));
    let status = poll_until(250, async || ask().await, |s| *s == 200).await;
    assert_eq!(status, 200, "the file change was picked up");
    assert_eq!(poll_until(100, last_ok, |v| *v == 1.0).await, 1.0);
}

/// A writer that stops half way (truncated, then written in two parts with a pause): the
/// half lacks the limits the running file has, so it waits for the rest instead of
/// running a second on default limits; also when it stops inside the limits (before,
/// only sections two deep were compared: a file cut after `per_ip` ran on the default
/// per-email quotas). A file that is not YAML is not waited for: it is refused, saying
/// why, without a warning that names every key after its error as missing.
#[tokio::test]
async fn a_file_lacking_the_running_ones_sections_waits_for_the_rest() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let limits = |per_ip: u32| {
        format!("  responses: {{ uniform: false }}\n  limits:\n    per_ip: [{{ requests: {per_ip}, per: 1h }}]\n    per_client: []\n    per_email: []\n    global: []\n")
    };
    let full = |per_ip: u32| yaml(&mock.url(), &limits(per_ip), "");
    write(&path, &full(1));
    let gw = spawn_gateway(&path);
    let ask = || {
        let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
        async move { raw(gw.addr, request.as_bytes()).await.status }
    };
    assert_eq!(ask().await, 200);
    assert_eq!(ask().await, 429);

    // The first part: everything before the limits (the defaults would allow 20 a minute).
    let text = full(1);
    let half = &text[..text.find("  responses:").unwrap()];
    write(&path, half);
    // Generous: the file is looked at twice a second, and a loaded machine is slow.
    let waiting = poll_until(
        500,
        async || {
            gw.logs()
                .iter()
                .any(|l| l.contains("lacks the running one's last keys or list items"))
        },
        |said| *said,
    )
    .await;
    assert!(waiting, "{:?}", gw.logs());
    assert_eq!(ask().await, 429, "the half is not applied");
    let lacking = || {
        gw.logs()
            .iter()
            .filter(|l| l.contains("lacks the running one's last keys or list items"))
            .count()
    };
    // Cut inside the limits, after a per-IP quota that would let alice through.
    let text = full(1000);
    let inside = &text[..text.find("    per_client:").unwrap()];
    write(&path, inside);
    let said = poll_until(500, async || lacking(), |n| *n >= 2).await;
    assert_eq!(said, 2, "{:?}", gw.logs());
    assert_eq!(
        ask().await,
        429,
        "the file cut inside the limits is not applied"
    );
    // The rest arrives: applied as any change.
    write(&path, &full(1000));
    assert_eq!(
        poll_until(500, async || ask().await, |s| *s == 200).await,
        200
    );

    // Not YAML: refused, and not taken for a file lacking everything after its error.
    let broken = full(1000).replace(
        "per_ip: [{ requests: 1000, per: 1h }]",
        "per_ip: [{ requests: 1000, per: 1h }",
    );
    write(&path, &broken);
    let rejected = gw.logged("reload rejected").await;
    assert!(rejected, "{:?}", gw.logs());
    assert_eq!(lacking(), 2, "{:?}", gw.logs());
    assert_eq!(ask().await, 200, "the running configuration stays");

    // A key taken out of the middle (here the client list's `web`) is an edit, applied at
    // once, not held as a cut (the file on disk is the refused one: the running one is
    // `full(1000)`).
    let web_gone = full(1000).replacen("    - id: web\n", "", 1);
    let web_gone = {
        let at = web_gone.find("      token_sha256:").unwrap();
        let second = at + 1 + web_gone[at + 1..].find("      token_sha256:").unwrap();
        let end = second + web_gone[second..].find('\n').unwrap() + 1;
        format!("{}{}", &web_gone[..second], &web_gone[end..])
    };
    assert!(!web_gone.contains("id: web"), "{web_gone}");
    let reloads = || {
        gw.logs()
            .iter()
            .filter(|l| l.contains("configuration reloaded"))
            .count()
    };
    let before = reloads();
    write(&path, &web_gone);
    let after = poll_until(500, async || reloads(), |n| *n > before).await;
    assert!(after > before, "{:?}", gw.logs());
    assert_eq!(lacking(), 2, "not held: {:?}", gw.logs());

    // Edited and cut (the writer pauses before the limits of a file whose `web` is gone):
    // held. And a file with a tab after a key's colon, which the loader takes but the
    // check cannot read through: held too, cut or not, rather than applied at once.
    let edited_and_cut = &web_gone[..web_gone.find("  responses:").unwrap()];
    write(&path, edited_and_cut);
    assert_eq!(poll_until(500, async || lacking(), |n| *n >= 3).await, 3);
    let tabbed = web_gone.replacen("listen: 127.0.0.1:0", "listen:\t127.0.0.1:0", 1);
    assert_ne!(tabbed, web_gone);
    write(&path, &tabbed[..tabbed.find("  responses:").unwrap()]);
    assert_eq!(poll_until(500, async || lacking(), |n| *n >= 4).await, 4);
    assert_eq!(ask().await, 200, "neither is applied");
}

/// The warning that a reload changed settings that need a restart, once `gw` logs it.
pub(crate) async fn restart_warning(gw: &Process) -> Option<String> {
    gw.line_with("change only on restart").await
}

#[tokio::test]
async fn a_reload_names_the_settings_that_need_a_restart() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    write(&path, &yaml(&mock.url(), "", ""));
    let gw = spawn_gateway(&path);
    let changed = with_server_keys(
        &yaml(
            &mock.url(),
            "",
            "log:\n  level: debug\nstore:\n  max_keys: 5000\n",
        ),
        "  request_timeout: 1s\n  max_uri_bytes: 300\n",
    );
    write(&path, &changed);
    gw.signal("HUP");
    let warning = restart_warning(&gw).await.expect("a warning");
    let json: serde_json::Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(
        json["keys"], "server.request_timeout, server.max_uri_bytes, log, store.max_keys",
        "{warning}"
    );
    // Applied in part: a gauge says a restart is pending, until the file matches again.
    let pending = async || {
        let get = b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
        sample(
            &raw(gw.admin, get).await.body,
            "reset_gateway_config_restart_pending",
        )
    };
    assert_eq!(pending().await, Some(1.0));
    write(&path, &yaml(&mock.url(), "", ""));
    gw.signal("HUP");
    assert_eq!(
        poll_until(100, pending, |p| *p == Some(0.0)).await,
        Some(0.0)
    );
}

#[tokio::test]
async fn logs_are_json_lines_without_secrets_or_raw_emails() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml(&mock.url(), "", "log:\n  level: trace\n")).unwrap();
    let gw = spawn_gateway(&path);
    for (query, headers) in [
        ("email=alice%40example.com", vec![("QB-Token", IOS_TOKEN)]),
        (
            "email=Secret.Person%2Btag%40example.com",
            vec![("Authorization", "ApiKey web-client-token-4d5e6f")],
        ),
        ("email=not-an-address", vec![("QB-Token", IOS_TOKEN)]),
        (
            "email=alice%40example.com",
            vec![("QB-Token", "guessed-token-value")],
        ),
    ] {
        let mut request =
            format!("GET {RESET}?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for (n, v) in headers {
            request.push_str(&format!("{n}: {v}\r\n"));
        }
        request.push_str("\r\n");
        raw(gw.addr, request.as_bytes()).await;
    }
    let access: Vec<String> = poll_until(
        100,
        async || {
            gw.logs()
                .into_iter()
                .filter(|l| l.contains("\"target\":\"access\""))
                .collect()
        },
        |lines: &Vec<String>| lines.len() == 4,
    )
    .await;
    assert_eq!(access.len(), 4, "one line per request");
    for line in gw.logs() {
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(json.is_object());
        for secret in [
            SERVER_KEY,
            IOS_TOKEN,
            "web-client-token-4d5e6f",
            "guessed-token-value",
            "alice",
            "secret.person",
            "Secret.Person",
            "not-an-address",
        ] {
            assert!(!line.contains(secret), "the log holds {secret:?}: {line}");
        }
    }
    let first: serde_json::Value = serde_json::from_str(&access[0]).unwrap();
    for field in [
        "request_id",
        "client_id",
        "client_ip",
        "email_hash",
        "outcome",
        "status",
        "upstream_status",
        "duration_ms",
    ] {
        assert!(!first[field].is_null(), "{field} missing from {first}");
    }
    assert_eq!(first["client_id"], "ios");
    assert_eq!(first["outcome"], "forwarded");
}

#[tokio::test]
async fn readiness_follows_redis_under_deny() {
    let mut redis = test_support::RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = yaml(
        &mock.url(),
        "",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    url: {}\n    timeout: 200ms\n    on_error: deny\n",
            key_secret_file().display(),
            redis.url()
        ),
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    // Ready once the first probe finds Redis serving (it runs at start).
    let ready = poll_until(
        100,
        async || gw.admin_get("/readyz").await.status,
        |s| *s == 200,
    )
    .await;
    assert_eq!(ready, 200);
    redis.stop();
    let status = poll_until(
        150,
        async || gw.admin_get("/readyz").await.status,
        |s| *s == 503,
    )
    .await;
    assert_eq!(status, 503, "the probe noticed Redis is gone");
    let metrics = gw.admin_get("/metrics").await.body;
    assert_eq!(sample(&metrics, "reset_gateway_store_up"), Some(0.0));
}

/// Under `deny`, a gateway is not ready before the probe has found Redis serving: with a
/// Redis that takes connections and never answers, `/readyz` says 503 from the start,
/// while every request would get 503 too. Before, it said 200 until the first probe had
/// timed out (a moment here; with sentinels down, a quarter of a second per sentinel).
#[tokio::test]
async fn a_gateway_is_not_ready_before_redis_has_answered_under_deny() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = yaml(
        &mock.url(),
        "",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    url: redis://{}\n    timeout: 200ms\n    on_error: deny\n",
            key_secret_file().display(),
            silent.local_addr().unwrap()
        ),
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    assert_eq!(gw.admin_get("/readyz").await.status, 503);
    let metrics = gw.admin_get("/metrics").await.body;
    assert_eq!(sample(&metrics, "reset_gateway_store_up"), Some(0.0));
    drop(silent);
}

#[tokio::test]
async fn a_slow_client_body_does_not_hold_the_reset_path() {
    let gw = Gateway::start("").await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(format!("GET {RESET}?email=a%40b.io HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nContent-Length: 100\r\n\r\nab").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// The test configuration with QuickBlox's answers passed through and the API key read
/// from `key`.
fn with_api_key_file(mock: &MockServer, key: &std::path::Path) -> String {
    yaml(&mock.url(), "  responses: { uniform: false }\n", "").replace(
        "upstream:\n",
        &format!("upstream:\n  api_key_file: {}\n", key.display()),
    )
}

/// The status of alice's reset from the iOS client, on a connection of its own.
async fn reset_status(addr: std::net::SocketAddr) -> u16 {
    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    raw(addr, request.as_bytes()).await.status
}

/// A spawned gateway whose API key file holds an old key QuickBlox (which expects
/// `rotated-key-2`) refuses.
struct KeyFileGateway {
    gw: crate::process::Process,
    key_file: std::path::PathBuf,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _mock: MockServer,
}

impl KeyFileGateway {
    async fn start() -> Self {
        let mock = MockServer::start(mock_config()).await.unwrap();
        mock.set_api_key("rotated-key-2");
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("qb_api_key");
        std::fs::write(&key_file, "old-key-1\n").unwrap();
        let path = dir.path().join("gateway.yaml");
        write(&path, &with_api_key_file(&mock, &key_file));
        KeyFileGateway {
            gw: spawn_gateway(&path),
            key_file,
            path,
            _dir: dir,
            _mock: mock,
        }
    }
}

#[tokio::test]
async fn the_api_key_file_is_re_read_on_reload() {
    let KeyFileGateway {
        gw,
        key_file,
        path: _,
        _dir,
        _mock,
    } = KeyFileGateway::start().await;
    let ask = || reset_status(gw.addr);
    assert_eq!(ask().await, 401, "QuickBlox refuses the old key");
    std::fs::write(&key_file, "rotated-key-2\n").unwrap();
    gw.signal("HUP");
    let status = poll_until(100, async || ask().await, |s| *s == 200).await;
    assert_eq!(status, 200, "the rotated key is used without a restart");
    assert!(gw
        .logs()
        .iter()
        .all(|l| !l.contains("rotated-key-2") && !l.contains("old-key-1")));
}

/// Kubernetes rotates a mounted Secret in place, and the image has no shell to send SIGHUP:
/// the key file is watched like the configuration. A configuration file that disappears
/// is said, and counted, once.
#[tokio::test]
async fn a_rotated_api_key_file_is_picked_up_without_a_signal() {
    let KeyFileGateway {
        gw,
        key_file,
        path,
        _dir,
        _mock,
    } = KeyFileGateway::start().await;
    let ask = || reset_status(gw.addr);
    assert_eq!(ask().await, 401, "QuickBlox refuses the old key");
    std::fs::write(&key_file, "rotated-key-2\n").unwrap();
    let status = poll_until(250, async || ask().await, |s| *s == 200).await;
    assert_eq!(status, 200, "the rotated key is used without a signal");
    // The reload's line says the key changed (an operator confirms a rotation by it),
    // without the key.
    let reloaded = gw
        .line_with("configuration reloaded")
        .await
        .expect("the reload is logged");
    assert!(reloaded.contains(r#""api_key":"changed""#), "{reloaded}");
    assert!(!reloaded.contains("rotated-key-2"), "{reloaded}");

    let failures = async || {
        let metrics = raw(
            gw.admin,
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await
        .body;
        sample(
            &metrics,
            "reset_gateway_config_reloads_total{result=\"failure\"}",
        )
    };
    assert_eq!(failures().await, Some(0.0));
    std::fs::remove_file(&path).unwrap();
    let said = poll_until(
        250,
        async || {
            gw.logs()
                .iter()
                .filter(|l| l.contains("cannot read the configuration file"))
                .count()
        },
        |n| *n > 0,
    )
    .await;
    assert_eq!(said, 1);
    assert_eq!(failures().await, Some(1.0), "counted as a failed reload");
    assert_eq!(ask().await, 200, "the running configuration stays");
}

/// A file that names a key file not there yet is rejected, and reloads by itself once the
/// key file appears (the Secret mounted after the ConfigMap that names it).
#[tokio::test]
async fn a_key_file_that_appears_after_a_rejected_reload_is_followed() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    mock.set_api_key("rotated-key-2");
    let dir = tempfile::tempdir().unwrap();
    let old_key = dir.path().join("old_key");
    std::fs::write(&old_key, "old-key-1\n").unwrap();
    let new_key = dir.path().join("new_key");
    let path = dir.path().join("gateway.yaml");
    write(&path, &with_api_key_file(&mock, &old_key));
    let gw = spawn_gateway(&path);
    let ask = || reset_status(gw.addr);
    assert_eq!(ask().await, 401);
    write(&path, &with_api_key_file(&mock, &new_key));
    let rejected = gw.logged("reload rejected").await;
    assert!(rejected, "{:?}", gw.logs());
    std::fs::write(&new_key, "rotated-key-2\n").unwrap();
    let status = poll_until(250, async || ask().await, |s| *s == 200).await;
    assert_eq!(status, 200, "the key file was followed once it appeared");
}

#[tokio::test]
async fn metrics_parse_as_the_format_their_content_type_names() {
    use openmetrics_parser::{OpenMetricsType, OpenMetricsValue};

    let gw = Gateway::start("").await;
    gw.reset_as_ios("email=alice%40example.com").await;
    let metrics = gw.admin_get("/metrics").await;
    // Prometheus picks its parser by this header: as `text/plain; version=0.0.4`, every
    // `_total` sample under a `counter` family would be read as untyped.
    let content_type = metrics.header("content-type").unwrap();
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let exposition = openmetrics_parser::openmetrics::parse_openmetrics(&metrics.body)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{}", metrics.body));
    let family = |name: &str| {
        exposition
            .families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in\n{}", metrics.body))
    };
    for (name, kind) in [
        ("reset_gateway_requests", OpenMetricsType::Counter),
        ("reset_gateway_upstream_responses", OpenMetricsType::Counter),
        ("reset_gateway_rate_limited", OpenMetricsType::Counter),
        ("reset_gateway_store_errors", OpenMetricsType::Counter),
        ("reset_gateway_config_reloads", OpenMetricsType::Counter),
        (
            "reset_gateway_request_duration_seconds",
            OpenMetricsType::Histogram,
        ),
        ("reset_gateway_store_up", OpenMetricsType::Gauge),
    ] {
        assert_eq!(family(name).family_type, kind, "{name}");
    }
    let forwarded = family("reset_gateway_requests")
        .get_sample_by_label_values(&["forwarded".to_owned()])
        .map(|sample| sample.value.clone());
    assert!(
        matches!(&forwarded, Some(OpenMetricsValue::Counter(c)) if c.value.as_f64() == 1.0),
        "{forwarded:?}"
    );
    // Both reload results exist before any reload, so `increase()` sees the first one.
    let reloads = family("reset_gateway_config_reloads");
    for result in ["success", "failure"] {
        let sample = reloads
            .get_sample_by_label_values(&[result.to_owned()])
            .map(|sample| sample.value.clone());
        assert!(
            matches!(&sample, Some(OpenMetricsValue::Counter(c)) if c.value.as_f64() == 0.0),
            "{result}: {sample:?}"
        );
    }
}

/// The number a log line gives `field` (JSON `"field":1.5` or text `field=1.5`).
fn logged_number<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let start = [format!("\"{field}\":"), format!(" {field}=")]
        .iter()
        .find_map(|key| line.find(key.as_str()).map(|i| i + key.len()))?;
    let rest = &line[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Fails unless `number` has at most three decimals.
fn assert_at_most_three_decimals(number: &str, line: &str) {
    let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
    assert!(
        !number.is_empty() && decimals <= 3,
        "{number:?} has {decimals} decimals: {line}"
    );
}

/// A gateway in front of `upstream` whose one reset failed: the line naming the cause,
/// and every line logged.
async fn a_failed_reset_through(upstream: &str) -> (serde_json::Value, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml(upstream, "", "")).unwrap();
    let gw = spawn_gateway(&path);
    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw(gw.addr, request.as_bytes()).await.status, 502);

    let lines = poll_until(
        100,
        async || gw.logs(),
        |lines: &Vec<String>| {
            lines.iter().any(|l| l.contains("\"target\":\"access\""))
                && lines.iter().any(|l| l.contains("upstream_error"))
        },
    )
    .await;
    let cause: serde_json::Value = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|json: &serde_json::Value| !json["upstream_error"].is_null())
        .unwrap_or_else(|| panic!("no upstream_error logged: {lines:?}"));
    (cause, lines)
}

/// A certificate QuickBlox's side presents that does not verify is said as TLS's.
#[tokio::test]
async fn an_untrusted_upstream_certificate_is_logged_as_tls() {
    let (mock, _dir, _ca_file) = tls_mock(&[b"http/1.1"]).await;
    let (cause, _) = a_failed_reset_through(&mock.url()).await;
    assert_eq!(
        cause["upstream_error"], "tls: invalid peer certificate: UnknownIssuer",
        "{cause}"
    );
}

/// An answer whose head is larger than an upstream connection reads ahead (16 KiB) is
/// said as that, not as an invalid answer.
#[tokio::test]
async fn an_answer_head_over_the_read_ahead_is_said_so() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head).await;
            let padding = "x".repeat(20_000);
            let answer =
                format!("HTTP/1.1 200 OK\r\nX-Padding: {padding}\r\nContent-Length: 0\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let (cause, _) = a_failed_reset_through(&format!("http://{addr}")).await;
    assert_eq!(
        cause["upstream_error"], "answer head over 16 KiB",
        "{cause}"
    );
}

#[tokio::test]
async fn a_refused_upstream_logs_its_cause_at_the_default_level() {
    let (cause, lines) = a_failed_reset_through(&format!("http://{}", closed_port())).await;
    assert_eq!(cause["level"], "WARN", "{cause}");
    assert_eq!(cause["upstream_error"], "connect refused", "{cause}");
    for line in &lines {
        for secret in [SERVER_KEY, IOS_TOKEN, "alice"] {
            assert!(!line.contains(secret), "the log holds {secret:?}: {line}");
        }
    }
    let access = lines
        .iter()
        .find(|l| l.contains("\"target\":\"access\""))
        .unwrap();
    assert!(
        access.contains("\"outcome\":\"upstream_unavailable\""),
        "{access}"
    );
    assert_at_most_three_decimals(logged_number(access, "duration_ms").unwrap(), access);
}

/// A gateway run from `yaml` (a text log format) written in `dir`, its stderr a pipe:
/// found by its `serving` line, which holds no colour code.
async fn spawn_text_gateway(dir: &std::path::Path, yaml: &str) -> Process {
    use std::io::BufRead;

    let path = dir.join("gateway.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_reset-gateway"))
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env("QB_API_KEY", SERVER_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(line);
        }
    });
    let address = |line: &str, key: &str| -> Option<std::net::SocketAddr> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let serving = poll_until(
        250,
        async || {
            logs.lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("serving"))
                .cloned()
        },
        Option::is_some,
    )
    .await
    .unwrap_or_else(|| panic!("the gateway never said it serves: {:?}", logs.lock()));
    // Parsed only after checking for colour codes, which would split `listen=` from its value.
    assert!(!serving.contains("\x1b["), "colour codes in {serving:?}");
    Process {
        child,
        addr: address(&serving, " listen=").unwrap(),
        admin: address(&serving, " admin=").unwrap(),
        logs,
        logs_ended: Default::default(),
    }
}

#[tokio::test]
async fn text_logs_to_a_pipe_are_plain_with_short_durations() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_text_gateway(dir.path(), &yaml(&mock.url(), "", "log:\n  format: text\n")).await;

    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw(gw.addr, request.as_bytes()).await.status, 200);
    let lines = poll_until(
        100,
        async || gw.logs(),
        |lines: &Vec<String>| lines.iter().any(|l| l.contains("outcome=")),
    )
    .await;
    for line in &lines {
        assert!(!line.contains('\x1b'), "an escape code in {line:?}");
    }
    let access = lines
        .iter()
        .find(|l| l.contains("outcome="))
        .unwrap_or_else(|| panic!("no access line: {lines:?}"));
    for field in ["duration_ms", "upstream_ms"] {
        let number =
            logged_number(access, field).unwrap_or_else(|| panic!("no {field} in {access}"));
        assert_at_most_three_decimals(number, access);
    }
}

/// A gateway of two workers on `redis` under `on_error: deny`, a per-IP limit its only
/// one (so every request asks Redis).
async fn two_workers_on(redis: &test_support::RedisServer) -> Gateway {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(
            &mock.url(),
            "  limits:\n    per_ip: [{ requests: 1000, per: 1m }]\n    per_client: []\n    per_email: []\n    global: []\n",
            &format!(
                "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    url: {}\n    timeout: 200ms\n    on_error: deny\n",
                key_secret_file().display(),
                redis.url()
            ),
        ),
        "  workers: 2\n",
    );
    Gateway::start_yaml(mock, &yaml).await
}

#[tokio::test]
async fn once_ready_again_after_redis_restarts_no_request_fails() {
    let mut redis = test_support::RedisServer::start();
    let port = redis.port();
    let gw = two_workers_on(&redis).await;
    let ready = async || gw.admin_get("/readyz").await.status;
    // Requests on many connections: both workers have their connection to Redis.
    for _ in 0..20 {
        assert_eq!(gw.reset_as_ios(&format!("email={ALICE}")).await.status, 200);
    }
    // Redis goes and comes back while no request is made: the workers' connections are
    // dead, and nothing but the probe saw it.
    redis.stop();
    assert_eq!(poll_until(300, ready, |s| *s == 503).await, 503);
    let _redis = test_support::RedisServer::start_on(port);
    assert_eq!(poll_until(300, ready, |s| *s == 200).await, 200);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(gw.reset_as_ios(&format!("email={ALICE}")).await.status);
    }
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}

#[tokio::test]
async fn a_request_refused_before_the_guard_still_gets_its_log_line() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    write(&path, &yaml(&mock.url(), "", ""));
    let gw = spawn_gateway(&path);
    let long = format!(
        "GET {RESET}?email={}%40example.com HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(9000)
    );
    let no_host = format!("GET {RESET}?email=a%40b.io HTTP/1.1\r\nConnection: close\r\n\r\n");
    let mut ids = Vec::new();
    for (request, status) in [(long, 414), (no_host, 400)] {
        let reply = raw(gw.addr, request.as_bytes()).await;
        assert_eq!(reply.status, status);
        ids.push(reply.header("x-request-id").unwrap().to_owned());
    }
    for (id, outcome) in ids.iter().zip(["target_too_long", "host_required"]) {
        let line = poll_until(
            100,
            async || gw.logs().into_iter().find(|l| l.contains(id.as_str())),
            Option::is_some,
        )
        .await
        .unwrap_or_else(|| panic!("no line for {outcome}"));
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["outcome"], outcome, "{line}");
    }
}

#[tokio::test]
async fn a_connection_redis_closed_while_idle_fails_no_request() {
    let redis = test_support::RedisServer::start();
    // Redis drops a connection idle for a second; the probe's never is.
    redis.command("CONFIG SET timeout 1").unwrap();
    let gw = two_workers_on(&redis).await;
    for _ in 0..20 {
        assert_eq!(gw.reset_as_ios(&format!("email={ALICE}")).await.status, 200);
    }
    // Past Redis's idle timeout (it checks idle clients every 100ms or so).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(gw.reset_as_ios(&format!("email={ALICE}")).await.status);
    }
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}

/// Connections open are a gauge; a worker with its share of `server.max_connections` all
/// open counts it (new connections wait in the backlog, where no request duration shows
/// the wait), and serves the one waiting once a place is free.
#[tokio::test]
async fn connections_open_and_the_limit_reached_are_counted() {
    let mut config = mock_config();
    config.latency = Duration::from_millis(1500);
    let mock = MockServer::start(config).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&mock.url(), "", "").replace("timeout: 400ms", "timeout: 5s"),
        "  workers: 1\n  max_connections: 2\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let request = format!(
        "GET /users/password/reset.json?email=alice%40example.com HTTP/1.1\r\nHost: x\r\n\
         QB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    // Two held on QuickBlox, a third waiting for a place.
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let (addr, request) = (gw.addr, request.clone());
            tokio::spawn(async move { raw(addr, request.as_bytes()).await.status })
        })
        .collect();
    let open = poll_until(
        200,
        async || metric(gw.admin, "reset_gateway_connections").await,
        |open| *open == 2.0,
    )
    .await;
    assert_eq!(open, 2.0);
    let reached = poll_until(
        200,
        async || metric(gw.admin, "reset_gateway_connection_limit_reached_total").await,
        |n| *n >= 1.0,
    )
    .await;
    assert!(reached >= 1.0);
    for answer in waiting {
        assert_eq!(answer.await.unwrap(), 200);
    }
    let open = poll_until(
        200,
        async || metric(gw.admin, "reset_gateway_connections").await,
        |open| *open == 0.0,
    )
    .await;
    assert_eq!(open, 0.0);
}

/// A QuickBlox that never answers: its wait is in the upstream latency histogram, whole
/// (`upstream.timeout`, 400ms here), though no answer is counted by status. Without it, a
/// slowdown that ends in timeouts empties the latency panel.
#[tokio::test]
async fn an_upstream_timeout_counts_its_wait_in_the_upstream_latency() {
    let gw = Gateway::start("").await;
    gw.mock.set_failure(qb_mock::Failure::Hang);
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        504
    );
    let count = metric(gw.admin, "reset_gateway_upstream_duration_seconds_count").await;
    let sum = metric(gw.admin, "reset_gateway_upstream_duration_seconds_sum").await;
    assert_eq!(count, 1.0);
    assert!(sum >= 0.4, "the whole wait: {sum}");
    assert_eq!(
        metric(
            gw.admin,
            r#"reset_gateway_upstream_responses_total{status="504"}"#
        )
        .await,
        0.0
    );
}

/// A SIGHUP while the file is away (moved aside by an editor, a remount) is a failed
/// reload; the same file back clears it, where the gauge stayed at 0 (and the alert on)
/// until the file next changed.
#[tokio::test]
async fn a_sighup_while_the_file_is_away_is_cleared_by_its_return() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let aside = dir.path().join("gateway.yaml.moved");
    write(&path, &yaml(&mock.url(), "", ""));
    let gw = spawn_gateway(&path);
    let last_ok = async || metric(gw.admin, "reset_gateway_config_last_reload_successful").await;
    assert_eq!(last_ok().await, 1.0);
    std::fs::rename(&path, &aside).unwrap();
    gw.signal("HUP");
    assert_eq!(poll_until(100, last_ok, |v| *v == 0.0).await, 0.0);
    std::fs::rename(&aside, &path).unwrap();
    assert_eq!(poll_until(100, last_ok, |v| *v == 1.0).await, 1.0);

    // The same when the watch finds it away (at two looks) with no signal.
    std::fs::rename(&path, &aside).unwrap();
    assert_eq!(poll_until(150, last_ok, |v| *v == 0.0).await, 0.0);
    std::fs::rename(&aside, &path).unwrap();
    assert_eq!(poll_until(150, last_ok, |v| *v == 1.0).await, 1.0);
}

/// In the text format one event is one line, whatever a value holds: here the Redis
/// client's error for a server that answers HTTP spans lines, and is logged on one, its
/// line breaks escaped.
#[tokio::test]
async fn a_text_log_event_is_one_line_whatever_its_values_hold() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let http = mock.url().replace("http://", "redis://");
    let yaml = crate::redis::redis_yaml_at(&mock, &http, "", "deny") + "log:\n  format: text\n";
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_text_gateway(dir.path(), &yaml).await;
    assert!(gw.logged("Redis does not answer the probe").await);
    let logs = gw.logs();
    let probe = logs
        .iter()
        .find(|l| l.contains("Redis does not answer the probe"))
        .unwrap();
    assert!(
        probe.contains("\\n"),
        "the error's line break, escaped: {probe}"
    );
    // Every line is an event's: it starts with the event's timestamp.
    for line in &logs {
        assert!(
            line.starts_with("20"),
            "a line that is no event's: {line:?}"
        );
    }
}

/// The store's files are watched like the configuration: a Redis password file rotated in
/// place (a Secret) is noticed without a signal, and said to need a restart (the password
/// is read at start), with the restart-pending gauge set.
#[tokio::test]
async fn a_rotated_redis_password_file_is_said_to_need_a_restart() {
    let redis = test_support::RedisServer::start_with(test_support::RedisOptions {
        password: Some("first-redis-password".to_owned()),
        ..Default::default()
    });
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("redis-password");
    std::fs::write(&password, "first-redis-password\n").unwrap();
    let yaml = crate::redis::redis_yaml_at(
        &mock,
        &redis.url(),
        &format!("    password_file: {}\n", password.display()),
        "deny",
    );
    let path = dir.path().join("gateway.yaml");
    write(&path, &yaml);
    let gw = spawn_gateway(&path);
    // Rotated until noticed: the watch takes its first look at the files once it starts,
    // which can be after the gateway says it serves.
    let mut warning = None;
    for round in 0..5 {
        std::fs::write(&password, format!("rotated-redis-password-{round}\n")).unwrap();
        warning = restart_warning(&gw).await;
        if warning.is_some() {
            break;
        }
    }
    let warning = warning.expect("a warning, with no signal sent");
    assert!(warning.contains("store.redis.password"), "{warning}");
    assert!(!warning.contains("rotated-redis-password"), "{warning}");
    let get = b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let pending = sample(
        &raw(gw.admin, get).await.body,
        "reset_gateway_config_restart_pending",
    );
    assert_eq!(pending, Some(1.0));
}
