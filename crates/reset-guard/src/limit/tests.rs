//! The limits driven through the layer with a manual clock: no test sleeps.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use proptest::prelude::*;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};

use crate::*;

/// SHA-256 of "foo" and "bar".
const FOO: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
const BAR: &str = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

type Svc = BoxCloneService<Request<Empty<Bytes>>, Response<GuardBody<Full<Bytes>>>, Infallible>;

struct Rig {
    service: Svc,
    clock: ManualClock,
    handle: GuardHandle,
    upstream_calls: Arc<AtomicUsize>,
}

/// A guard whose `limits:` section is `limits` (YAML, indented two spaces) and `extra`.
fn rig_with(limits: &str, extra: &str, store: StoreSettings) -> Rig {
    let yaml = format!(
        "clients:\n  - {{ id: foo, token_sha256: {FOO} }}\n  - {{ id: bar, token_sha256: {BAR} }}\n\
         limits:\n{}{}",
        only(limits),
        // Plain 429s are easier to read in tests; the uniform tests ask for uniform answers.
        if extra.contains("responses") { extra.to_owned() } else { format!("{extra}responses: {{ uniform: false }}\n") }
    );
    let settings = GuardConfig::from_yaml(&yaml).unwrap().validate().unwrap();
    let clock = ManualClock::new();
    let layer = ResetGuardLayer::builder(settings, ApiKey::new("server-key").unwrap())
        .clock(clock.clone())
        .store(store)
        .key_secret(b"test secret")
        .build();
    let handle = layer.handle();
    let upstream_calls = Arc::new(AtomicUsize::new(0));
    let calls = upstream_calls.clone();
    let upstream = service_fn(move |_request: Request<Empty<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    });
    Rig {
        service: BoxCloneService::new(ServiceBuilder::new().layer(layer).service(upstream)),
        clock,
        handle,
        upstream_calls,
    }
}

/// `limits` with every group it does not name switched off, so each test sees only its quotas.
fn only(limits: &str) -> String {
    let mut yaml = limits.to_owned();
    for group in ["per_ip", "per_client", "per_email", "global"] {
        if !limits.contains(&format!("{group}:")) {
            yaml.push_str(&format!("  {group}: []\n"));
        }
    }
    yaml
}

fn new_rig(limits: &str) -> Rig {
    rig_with(limits, "", StoreSettings::default())
}

#[derive(Debug, Clone)]
struct Ask {
    peer: &'static str,
    token: Option<&'static str>,
    email: String,
    forwarded_for: Option<&'static str>,
}

fn ask(email: &str) -> Ask {
    Ask {
        peer: "192.0.2.1",
        token: Some("foo"),
        email: email.to_owned(),
        forwarded_for: None,
    }
}

impl Ask {
    fn from(mut self, peer: &'static str) -> Self {
        self.peer = peer;
        self
    }
    fn token(mut self, token: Option<&'static str>) -> Self {
        self.token = token;
        self
    }
    fn forwarded_for(mut self, value: &'static str) -> Self {
        self.forwarded_for = Some(value);
        self
    }
}

impl Rig {
    async fn send(&self, ask: Ask) -> Response<GuardBody<Full<Bytes>>> {
        let mut request = Request::get(format!(
            "/users/password/reset.json?email={}",
            encode_query_value(&ask.email)
        ));
        if let Some(token) = ask.token {
            request = request.header("qb-token", token);
        }
        if let Some(xff) = ask.forwarded_for {
            request = request.header("x-forwarded-for", xff);
        }
        let mut request = request.body(Empty::new()).unwrap();
        let ip: std::net::IpAddr = ask.peer.parse().unwrap();
        request
            .extensions_mut()
            .insert(PeerAddr(SocketAddr::new(ip, 40000)));
        self.service.clone().oneshot(request).await.unwrap()
    }

    async fn status(&self, ask: Ask) -> u16 {
        self.send(ask).await.status().as_u16()
    }

    /// Statuses of `n` identical requests.
    async fn statuses(&self, n: usize, ask: Ask) -> Vec<u16> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.status(ask.clone()).await);
        }
        out
    }

    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}

fn header<'a, B>(response: &'a Response<B>, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn per_ip_denial_names_the_quota_with_exact_retry_after() {
    let rig = new_rig("  per_ip: [{ requests: 2, per: 1m }]\n");
    assert_eq!(rig.statuses(2, ask("a@b.io")).await, [200, 200]);
    rig.clock.advance(Duration::from_millis(500));
    let denied = rig.send(ask("a@b.io")).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    // One request every 30s; the next fits 29.5s from now, rounded up.
    assert_eq!(header(&denied, "retry-after"), Some("30"));
    assert_eq!(
        header(&denied, "ratelimit-policy"),
        Some(r#""per_ip";q=2;w=60"#)
    );
    assert_eq!(header(&denied, "ratelimit"), Some(r#""per_ip";r=0;t=30"#));
    assert_eq!(
        header(&denied, "content-type"),
        Some("application/json; charset=utf-8")
    );
    let body = denied.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        r#"{"errors":{"base":["Too many requests, retry later"]}}"#
    );

    rig.clock.advance(Duration::from_millis(29_499));
    assert_eq!(rig.status(ask("a@b.io")).await, 429);
    rig.clock.advance(Duration::from_millis(1));
    assert_eq!(rig.status(ask("a@b.io")).await, 200);
    assert_eq!(rig.handle.counters().denied(LimitGroup::PerIp), 2);
}

#[tokio::test]
async fn per_ip_counts_invalid_requests_too() {
    let rig = new_rig("  per_ip: [{ requests: 3, per: 1h }]\n");
    assert_eq!(rig.status(ask("a@b.io").token(None)).await, 401);
    assert_eq!(rig.status(ask("a@b.io").token(Some("guess"))).await, 401);
    assert_eq!(rig.status(ask("not-an-address")).await, 422);
    assert_eq!(rig.status(ask("a@b.io")).await, 429);
    assert_eq!(rig.upstream_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_request_denied_earlier_is_not_charged_later() {
    let rig = new_rig(
        "  per_ip: [{ requests: 1, per: 1h }]\n  per_client: [{ requests: 2, per: 1h }]\n  per_email: [{ requests: 2, per: 1h }]\n",
    );
    // The per-IP limit denies every request from 192.0.2.1 after the first…
    assert_eq!(rig.statuses(3, ask("a@b.io")).await, [200, 429, 429]);
    // …and none of those denials was charged to the client or the address.
    assert_eq!(rig.status(ask("a@b.io").from("192.0.2.2")).await, 200);
    assert_eq!(
        rig.status(ask("a@b.io").from("192.0.2.3")).await,
        429,
        "client allows 2"
    );
    assert_eq!(
        rig.status(ask("a@b.io").from("192.0.2.4").token(Some("bar")))
            .await,
        429,
        "address allows 2"
    );
    assert_eq!(
        rig.status(ask("c@b.io").from("192.0.2.5").token(Some("bar")))
            .await,
        200
    );
}

#[tokio::test]
async fn every_quota_of_a_group_must_admit_and_only_then_is_charged() {
    let rig = new_rig("  per_email: [{ requests: 2, per: 1m }, { requests: 3, per: 1h }]\n");
    let to = || ask("a@b.io");
    assert_eq!(rig.statuses(3, to()).await, [200, 200, 429]);
    let denied = rig.send(to()).await;
    assert_eq!(
        header(&denied, "ratelimit-policy"),
        Some(r#""per_email";q=2;w=60"#)
    );
    rig.advance(30);
    assert_eq!(rig.status(to()).await, 200, "the third fits the hour");
    rig.advance(60);
    // Now the minute quota has room but the hour quota (one per 20 min) does not.
    let denied = rig.send(to()).await;
    assert_eq!(denied.status(), 429);
    assert_eq!(
        header(&denied, "ratelimit-policy"),
        Some(r#""per_email";q=3;w=3600"#)
    );
    assert_eq!(header(&denied, "retry-after"), Some("1110")); // 1200 - 90
                                                              // Those denials charged the minute quota nothing: a full burst of two fits once the
                                                              // hour quota admits again.
    rig.advance(1200);
    assert_eq!(rig.statuses(2, to()).await, [200, 429]);
}

#[tokio::test]
async fn burst_allows_more_at_once_than_the_rate() {
    let rig = new_rig("  per_client: [{ requests: 1, per: 1s, burst: 3 }]\n");
    assert_eq!(rig.statuses(4, ask("a@b.io")).await, [200, 200, 200, 429]);
    let denied = rig.send(ask("a@b.io")).await;
    assert_eq!(header(&denied, "retry-after"), Some("1"));
    assert_eq!(
        header(&denied, "ratelimit-policy"),
        Some(r#""per_client";q=1;w=1"#)
    );
    // The other client has its own bucket.
    assert_eq!(rig.status(ask("a@b.io").token(Some("bar"))).await, 200);
    rig.advance(1);
    assert_eq!(rig.statuses(2, ask("a@b.io")).await, [200, 429]);
}

#[tokio::test]
async fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
    let rig = new_rig("  global: [{ requests: 3, per: 1h }]\n");
    assert_eq!(rig.statuses(3, ask("a@b.io")).await, [200, 200, 200]);
    let denied = rig.send(ask("b@b.io")).await;
    assert_eq!(header(&denied, "retry-after"), Some("1200"));
    assert_eq!(header(&denied, "ratelimit"), Some(r#""global";r=0;t=1200"#));
    rig.clock.advance(Duration::from_millis(1_199_999));
    let denied = rig.send(ask("b@b.io")).await;
    assert_eq!(header(&denied, "retry-after"), Some("1"));
}

#[tokio::test]
async fn shadow_quotas_count_but_never_deny() {
    let rig = new_rig("  per_email: [{ requests: 1, per: 1h, shadow: true }]\n");
    assert_eq!(rig.statuses(3, ask("a@b.io")).await, [200, 200, 200]);
    assert_eq!(rig.upstream_calls.load(Ordering::SeqCst), 3);
    assert_eq!(rig.handle.counters().shadow_denied(LimitGroup::PerEmail), 2);
    assert_eq!(rig.handle.counters().denied(LimitGroup::PerEmail), 0);
}

#[tokio::test]
async fn exempt_ips_skip_the_per_ip_limit_only() {
    let rig = new_rig(
        "  per_ip: [{ requests: 1, per: 1h }]\n  per_email: [{ requests: 2, per: 1h }]\n  exempt_ips: [198.51.100.0/24]\n",
    );
    let from = |ip| ask("a@b.io").from(ip);
    assert_eq!(rig.statuses(2, from("198.51.100.7")).await, [200, 200]);
    assert_eq!(
        rig.status(from("198.51.100.7")).await,
        429,
        "the per-email limit still applies"
    );
    assert_eq!(
        rig.statuses(2, ask("c@b.io").from("192.0.2.9")).await,
        [200, 429]
    );
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let rig = new_rig("  per_ip: [{ requests: 2, per: 1h }]\n");
    let spoof = |xff| ask("a@b.io").forwarded_for(xff);
    assert_eq!(rig.status(spoof("1.1.1.1")).await, 200);
    assert_eq!(rig.status(spoof("2.2.2.2")).await, 200);
    assert_eq!(rig.status(spoof("3.3.3.3")).await, 429);
}

#[tokio::test]
async fn trusted_proxies_attribute_requests_to_the_real_client() {
    let rig = rig_with(
        "  per_ip: [{ requests: 1, per: 1h }]\n",
        "client_ip:\n  trusted_proxies: [10.0.0.0/8]\n",
        StoreSettings::default(),
    );
    let via_proxy = |xff| ask("a@b.io").from("10.0.0.5").forwarded_for(xff);
    assert_eq!(rig.status(via_proxy("203.0.113.1")).await, 200);
    assert_eq!(rig.status(via_proxy("203.0.113.2")).await, 200);
    assert_eq!(rig.status(via_proxy("203.0.113.1, 10.0.0.9")).await, 429);
}

#[tokio::test]
async fn one_ipv6_slash_64_is_one_client() {
    let rig = new_rig("  per_ip: [{ requests: 2, per: 1h }]\n");
    assert_eq!(rig.status(ask("a@b.io").from("2001:db8:1:2::1")).await, 200);
    assert_eq!(
        rig.status(ask("a@b.io").from("2001:db8:1:2:ffff:ffff:ffff:fffe"))
            .await,
        200
    );
    assert_eq!(
        rig.status(ask("a@b.io").from("2001:db8:1:2:abcd::9")).await,
        429
    );
    assert_eq!(
        rig.status(ask("a@b.io").from("2001:db8:1:3::1")).await,
        200,
        "another /64"
    );
    // IPv4-mapped IPv6 is the IPv4 address.
    assert_eq!(
        rig.statuses(2, ask("a@b.io").from("192.0.2.77")).await,
        [200, 200]
    );
    assert_eq!(
        rig.status(ask("a@b.io").from("::ffff:192.0.2.77")).await,
        429
    );
}

#[tokio::test]
async fn ipv4_prefix_groups_neighbours() {
    let rig = new_rig("  per_ip: [{ requests: 1, per: 1h }]\n  ipv4_prefix: 24\n");
    assert_eq!(rig.status(ask("a@b.io").from("192.0.2.1")).await, 200);
    assert_eq!(rig.status(ask("a@b.io").from("192.0.2.200")).await, 429);
    assert_eq!(rig.status(ask("a@b.io").from("192.0.3.1")).await, 200);
}

#[tokio::test]
async fn spellings_of_one_mailbox_share_a_bucket() {
    let rig = new_rig("  per_email: [{ requests: 3, per: 1h }]\n");
    for spelling in [
        "bob.smith@gmail.com",
        "Bob.Smith+promo@Gmail.com",
        "bobsmith+x@googlemail.com",
    ] {
        assert_eq!(rig.status(ask(spelling)).await, 200, "{spelling}");
    }
    assert_eq!(rig.status(ask("b.o.b.s.m.i.t.h@GMAIL.COM")).await, 429);
    assert_eq!(
        rig.status(ask("bob.smith@example.com")).await,
        200,
        "dots matter outside gmail"
    );

    let idn = new_rig("  per_email: [{ requests: 1, per: 1h }]\n");
    assert_eq!(idn.status(ask("anna@bücher.example")).await, 200);
    assert_eq!(idn.status(ask("Anna+x@xn--bcher-kva.example")).await, 429);
}

#[tokio::test]
async fn email_key_folding_can_be_switched_off() {
    let rig = new_rig("  per_email: [{ requests: 1, per: 1h }]\n  email_key: { strip_plus_tag: false, fold_gmail_dots: false }\n");
    assert_eq!(rig.status(ask("bob@gmail.com")).await, 200);
    assert_eq!(rig.status(ask("bob+x@gmail.com")).await, 200);
    assert_eq!(rig.status(ask("b.ob@gmail.com")).await, 200);
    assert_eq!(
        rig.status(ask("BOB@gmail.com")).await,
        429,
        "case always folds"
    );
}

#[tokio::test]
async fn uniform_per_email_denial_looks_like_success_and_skips_upstream() {
    let rig = rig_with(
        "  per_email: [{ requests: 1, per: 1h }]\n",
        "responses: { uniform: true }\n",
        StoreSettings::default(),
    );
    let first = rig.send(ask("a@b.io")).await;
    let denied = rig.send(ask("a@b.io")).await;
    assert_eq!(rig.upstream_calls.load(Ordering::SeqCst), 1);
    assert_eq!(denied.status(), first.status());
    assert_eq!(denied.headers(), first.headers());
    assert!(
        denied.extensions().get::<Rejection>().is_some(),
        "logs still see the denial"
    );
    let (a, b) = (
        first.into_body().collect().await.unwrap().to_bytes(),
        denied.into_body().collect().await.unwrap().to_bytes(),
    );
    assert_eq!(a, b);

    let rig = rig_with(
        "  per_email: [{ requests: 1, per: 1h }]\n",
        "responses: { uniform: false }\n",
        StoreSettings::default(),
    );
    assert_eq!(rig.statuses(2, ask("a@b.io")).await, [200, 429]);
}

#[tokio::test(start_paused = true)]
async fn uniform_per_email_denial_keeps_the_latency_floor() {
    let rig = rig_with(
        "  per_email: [{ requests: 1, per: 1h }]\n",
        "responses: { min_latency: 250ms }\n",
        StoreSettings::default(),
    );
    for _ in 0..2 {
        let started = tokio::time::Instant::now();
        assert_eq!(rig.status(ask("a@b.io")).await, 200);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }
}

#[tokio::test]
async fn response_headers_show_the_tightest_quota_on_allowed_answers() {
    let rig = new_rig(
        "  per_ip: [{ requests: 10, per: 1m }]\n  per_email: [{ requests: 3, per: 1h }]\n  response_headers: true\n",
    );
    let response = rig.send(ask("a@b.io")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "ratelimit-policy"),
        Some(r#""per_email";q=3;w=3600"#)
    );
    assert_eq!(
        header(&response, "ratelimit"),
        Some(r#""per_email";r=2;t=1200"#)
    );
    let quiet = new_rig("  per_ip: [{ requests: 10, per: 1m }]\n");
    assert_eq!(
        header(&quiet.send(ask("a@b.io")).await, "ratelimit"),
        None,
        "off by default"
    );
}

fn reload(rig: &Rig, limits: &str) {
    let yaml = format!(
        "clients:\n  - {{ id: foo, token_sha256: {FOO} }}\nlimits:\n{}responses: {{ uniform: false }}\n",
        only(limits)
    );
    let settings = GuardConfig::from_yaml(&yaml).unwrap().validate().unwrap();
    rig.handle
        .update(settings, ApiKey::new("server-key").unwrap());
}

#[tokio::test]
async fn reload_keeps_state_for_unchanged_quotas() {
    let rig = new_rig("  per_ip: [{ requests: 2, per: 1h }]\n  per_email: [{ requests: 1, per: 1h }]\n  response_headers: true\n");
    assert_eq!(rig.status(ask("a@b.io")).await, 200);
    // Same per-IP quota, now in shadow; per-email quota changed.
    reload(
        &rig,
        "  per_ip: [{ requests: 2, per: 1h }]\n  per_email: [{ requests: 2, per: 1h }]\n",
    );
    assert_eq!(rig.status(ask("a@b.io")).await, 200);
    assert_eq!(
        rig.status(ask("c@b.io")).await,
        429,
        "the per-IP charge survived the reload"
    );
    assert_eq!(
        rig.statuses(2, ask("a@b.io").from("192.0.2.50")).await,
        [200, 429],
        "new quota, fresh state"
    );
}

#[tokio::test]
async fn idle_keys_are_swept_and_memory_is_bounded() {
    let rig = rig_with(
        "  per_email: [{ requests: 3, per: 1m }]\n",
        "",
        StoreSettings {
            max_keys: 640,
            ..StoreSettings::default()
        },
    );
    for i in 0..2000 {
        assert_eq!(
            rig.status(ask(&format!("user{i}@example.com")).from("192.0.2.1"))
                .await,
            200
        );
    }
    let held: usize = rig.handle.tracked_keys(LimitGroup::PerEmail).iter().sum();
    assert!(held <= 640, "{held} keys held, bound is 640");
    assert!(rig.handle.forced_evictions() > 0);
    rig.advance(20);
    assert!(rig.handle.sweep() > 0);
    assert_eq!(rig.handle.tracked_keys(LimitGroup::PerEmail), [0]);
}

/// One step of a random schedule: wait some milliseconds, then ask for one of a few addresses.
fn schedule() -> impl Strategy<Value = Vec<(u64, u8)>> {
    proptest::collection::vec((0u64..30_000, 0u8..4), 1..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Forgetting idle keys changes no decision: a limiter swept after every step answers
    /// exactly like one never swept.
    #[test]
    fn sweeping_never_changes_a_decision(steps in schedule()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            let limits = "  per_email: [{ requests: 2, per: 10s }, { requests: 5, per: 1m, burst: 3 }]\n";
            let (swept, kept) = (new_rig(limits), new_rig(limits));
            for (wait_ms, who) in steps {
                for r in [&swept, &kept] {
                    r.clock.advance(Duration::from_millis(wait_ms));
                }
                swept.handle.sweep();
                let email = format!("user{who}@example.com");
                let a = swept.send(ask(&email)).await;
                let b = kept.send(ask(&email)).await;
                prop_assert_eq!(a.status(), b.status());
                prop_assert_eq!(header(&a, "retry-after"), header(&b, "retry-after"));
            }
            Ok(())
        })?;
    }
}

#[test]
fn quota_validation_names_the_quota() {
    let bad = [
        ("limits: { per_ip: [{ requests: 0, per: 1m }] }", "limits.per_ip[0]"),
        ("limits: { per_email: [{ requests: 1, per: 0 }] }", "limits.per_email[0]"),
        ("limits: { global: [{ requests: 1, per: 1s, burst: 0 }] }", "limits.global[0]"),
        ("limits: { ipv6_prefix: 129 }", "limits.ipv6_prefix"),
        ("limits: { per_client: [{ requests: 1, per: 1s }, { requests: 1, per: 1s }, { requests: 1, per: 1s }, { requests: 1, per: 1s }, { requests: 1, per: 1s }] }", "limits.per_client"),
    ];
    for (limits, path) in bad {
        let yaml = format!("clients: [{{ id: foo, token_sha256: {FOO} }}]\n{limits}");
        let error = GuardConfig::from_yaml(&yaml)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(error.path, path, "{limits}");
    }
    let yaml = format!("clients: [{{ id: foo, token_sha256: {FOO} }}]\nlimits: {{ per_ip: [{{ requests: 1, per: 1m, brust: 2 }}] }}");
    assert_eq!(
        GuardConfig::from_yaml(&yaml).unwrap_err().path,
        "limits.per_ip[0].brust"
    );
}

#[test]
fn default_limits_are_the_documented_ones() {
    let settings =
        GuardConfig::from_yaml(&format!("clients: [{{ id: foo, token_sha256: {FOO} }}]"))
            .unwrap()
            .validate()
            .unwrap();
    let limits = settings.limits();
    let shape = |g| {
        limits
            .quotas(g)
            .iter()
            .map(|q| (q.requests, q.per.as_secs(), q.burst))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(LimitGroup::PerIp), [(20, 60, 20)]);
    assert_eq!(shape(LimitGroup::PerClient), [(200, 1, 400)]);
    assert_eq!(
        shape(LimitGroup::PerEmail),
        [(3, 3600, 3), (10, 86_400, 10)]
    );
    assert_eq!(shape(LimitGroup::Global), [(100, 1, 100)]);
}
