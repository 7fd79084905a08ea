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

use crate::limit::ManualClock;
use crate::query::encode_query_value;
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
    rig_in(limits, extra, store, ManualClock::new())
}

fn rig_in(limits: &str, extra: &str, store: StoreSettings, clock: ManualClock) -> Rig {
    let yaml = format!(
        "clients:\n  - {{ id: foo, token_sha256: {FOO} }}\n  - {{ id: bar, token_sha256: {BAR} }}\n\
         limits:\n{}{}",
        only(limits),
        // Plain 429s are easier to read in tests; the uniform tests ask for uniform answers.
        if extra.contains("responses") { extra.to_owned() } else { format!("{extra}responses: {{ uniform: false }}\n") }
    );
    let settings = GuardConfig::from_yaml(&yaml).unwrap().validate().unwrap();
    let (layer, housekeeping) =
        ResetGuardLayer::builder(settings, ApiKey::new("server-key").unwrap())
            .clock(clock.clone())
            .store(store)
            .key_secret(b"a test key secret")
            .build()
            .unwrap();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(housekeeping);
    }
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

#[cfg(feature = "redis")]
/// A runtime of one worker thread, for tests that make requests from threads of their own.
fn one_worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[cfg(feature = "redis")]
/// The statuses of `count` requests (new addresses), each made from a thread of its own
/// that then exits, on `runtime`.
fn from_exiting_threads(runtime: &tokio::runtime::Runtime, rig: &Rig, count: usize) -> Vec<u16> {
    (0..count)
        .map(|i| {
            let service = rig.service.clone();
            let handle = runtime.handle().clone();
            std::thread::spawn(move || {
                let request = ask(&format!("u{i}@b.io")).request();
                handle
                    .block_on(service.oneshot(request))
                    .unwrap()
                    .status()
                    .as_u16()
            })
            .join()
            .unwrap()
        })
        .collect()
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
pub(super) struct Ask {
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

impl Ask {
    /// The reset request this asks for, from its peer.
    fn request(self) -> Request<Empty<Bytes>> {
        let mut request = Request::get(format!(
            "/users/password/reset.json?email={}",
            encode_query_value(&self.email)
        ));
        if let Some(token) = self.token {
            request = request.header("qb-token", token);
        }
        if let Some(xff) = self.forwarded_for {
            request = request.header("x-forwarded-for", xff);
        }
        let mut request = request.body(Empty::new()).unwrap();
        let ip: std::net::IpAddr = self.peer.parse().unwrap();
        request
            .extensions_mut()
            .insert(PeerAddr(SocketAddr::new(ip, 40000)));
        request
    }
}

impl Rig {
    async fn send(&self, ask: Ask) -> Response<GuardBody<Full<Bytes>>> {
        self.service.clone().oneshot(ask.request()).await.unwrap()
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

/// `count()` once `done` holds for it, or when `limit` has passed (asked every 20ms): for
/// what background work (a carry-over walk, connections closing) makes true soon.
#[cfg(feature = "redis")]
async fn counted_until(
    limit: Duration,
    count: impl Fn() -> usize,
    done: impl Fn(usize) -> bool,
) -> usize {
    let step = Duration::from_millis(20);
    for _ in 0..limit.as_millis() / step.as_millis() {
        if done(count()) {
            break;
        }
        tokio::time::sleep(step).await;
    }
    count()
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
    // The answer's extensions are the guard's alone, not the request's.
    assert!(denied.extensions().get::<Rejection>().is_some());
    assert!(denied.extensions().get::<PeerAddr>().is_none());
    let body = denied.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        r#"{"errors":{"base":["Too many requests, retry later"]}}"#
    );

    rig.clock.advance(Duration::from_millis(29_499));
    assert_eq!(rig.status(ask("a@b.io")).await, 429);
    rig.clock.advance(Duration::from_millis(1));
    assert_eq!(rig.status(ask("a@b.io")).await, 200);
    assert_eq!(rig.handle.denied(LimitGroup::PerIp), 2);
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
async fn a_request_two_shadow_quotas_would_deny_counts_once() {
    let rig = new_rig("  per_email: [{ requests: 100, per: 1m }, { requests: 1, per: 1m, shadow: true }, { requests: 2, per: 1h, shadow: true }]\n");
    assert_eq!(rig.statuses(4, ask("a@b.io")).await, [200, 200, 200, 200]);
    // The second would be denied by the first shadow quota, the third and fourth by both.
    assert_eq!(rig.handle.shadow_denied(LimitGroup::PerEmail), 3);
}

#[tokio::test]
async fn shadow_quotas_count_but_never_deny() {
    let rig = new_rig("  per_email: [{ requests: 1, per: 1h, shadow: true }]\n");
    assert_eq!(rig.statuses(3, ask("a@b.io")).await, [200, 200, 200]);
    assert_eq!(rig.upstream_calls.load(Ordering::SeqCst), 3);
    assert_eq!(rig.handle.shadow_denied(LimitGroup::PerEmail), 2);
    assert_eq!(rig.handle.denied(LimitGroup::PerEmail), 0);
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

    // Accented spellings a mail store matching without regard to accents would take for
    // the victim's address, and another provider's aliases.
    let accents = new_rig("  per_email: [{ requests: 3, per: 1h }]\n");
    for spelling in [
        "victim@gmail.com",
        "victim@gmáil.com",
        "victim@xn--gmil-6na.com",
    ] {
        assert_eq!(accents.status(ask(spelling)).await, 200, "{spelling}");
    }
    assert_eq!(accents.status(ask("victim@ｇｍａｉｌ.cóm")).await, 429);
    let aliases = new_rig("  per_email: [{ requests: 2, per: 1h }]\n");
    assert_eq!(aliases.status(ask("Bob.Smith@protonmail.com")).await, 200);
    assert_eq!(aliases.status(ask("bob_smith@pm.me")).await, 200);
    assert_eq!(aliases.status(ask("bob-smith+x@proton.me")).await, 429);
}

#[tokio::test]
async fn email_key_folding_can_be_switched_off() {
    let rig = new_rig("  per_email: [{ requests: 1, per: 1h }]\n  email_key: { strip_plus_tag: false, fold_gmail_dots: false, fold_provider_aliases: false }\n");
    assert_eq!(rig.status(ask("bob@gmail.com")).await, 200);
    assert_eq!(rig.status(ask("bob+x@gmail.com")).await, 200);
    assert_eq!(rig.status(ask("b.ob@gmail.com")).await, 200);
    assert_eq!(
        rig.status(ask("BOB@gmail.com")).await,
        429,
        "case always folds"
    );
    assert_eq!(rig.status(ask("bob@me.com")).await, 200);
    assert_eq!(rig.status(ask("bob@icloud.com")).await, 200);
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
    let attribution = denied.extensions().get::<Attribution>();
    assert_eq!(
        attribution.and_then(Attribution::client_id),
        Some("foo"),
        "and whom it was for, as on the guard's other answers"
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
async fn near_limit_counts_follow_their_quota_through_a_reload() {
    let rig = new_rig("  per_email: [{ requests: 2, per: 1h }, { requests: 9, per: 1d }]\n");
    // The second request leaves 2/1h with nothing: near its limit; 9/1d is not.
    assert_eq!(rig.statuses(2, ask("a@b.io")).await, [200, 200]);
    let counts = |rig: &Rig| {
        let mut counts: Vec<(String, u64)> = rig
            .handle
            .near_limit(LimitGroup::PerEmail)
            .iter()
            .map(|(quota, n)| (format!("{}/{:?}", quota.requests, quota.per), *n))
            .collect();
        counts.sort();
        counts
    };
    let before = counts(&rig);
    assert_eq!(
        before,
        [("2/3600s".to_owned(), 1), ("9/86400s".to_owned(), 0)]
    );
    reload(
        &rig,
        "  per_email: [{ requests: 9, per: 1d }, { requests: 2, per: 1h }]\n",
    );
    assert_eq!(
        counts(&rig),
        before,
        "reordered: each count stays with its quota"
    );
    reload(
        &rig,
        "  per_email: [{ requests: 9, per: 1d }, { requests: 3, per: 1h }]\n",
    );
    assert_eq!(
        counts(&rig),
        [("3/3600s".to_owned(), 0), ("9/86400s".to_owned(), 0)],
        "a changed quota's count starts from nothing (a series of its own)"
    );
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
    assert_eq!(
        rig.status(ask("a@b.io")).await,
        200,
        "one more: it had spent one of the two"
    );
    assert_eq!(
        rig.status(ask("c@b.io")).await,
        429,
        "the per-IP charge survived the reload"
    );
    assert_eq!(
        rig.statuses(2, ask("a@b.io").from("192.0.2.50")).await,
        [429, 429],
        "both spent under the changed quota"
    );
    assert_eq!(rig.status(ask("d@b.io").from("192.0.2.51")).await, 200);
}

/// A changed quota takes over the one it replaces, each address charged with what it had
/// spent: tightening 3 an hour to 1 refuses an address that had 2 (a fresh quota handed
/// every address a new burst on each reload); loosening keeps what was spent.
#[tokio::test]
async fn a_changed_quota_keeps_what_each_address_spent() {
    let rig = new_rig("  per_email: [{ requests: 3, per: 1h }]\n");
    assert_eq!(rig.statuses(2, ask("two@b.io")).await, [200, 200]);
    assert_eq!(rig.statuses(4, ask("all@b.io")).await, [200, 200, 200, 429]);
    assert_eq!(rig.status(ask("one@b.io")).await, 200);
    reload(&rig, "  per_email: [{ requests: 1, per: 1h }]\n");
    assert_eq!(
        rig.status(ask("two@b.io")).await,
        429,
        "had two of the new one"
    );
    assert_eq!(rig.status(ask("all@b.io")).await, 429);
    assert_eq!(rig.status(ask("one@b.io")).await, 429, "had its one");
    assert_eq!(rig.status(ask("new@b.io")).await, 200);
    // A full burst at most: an hour on, each has one again, as under a fresh 1/1h.
    rig.advance(3600);
    assert_eq!(rig.statuses(2, ask("all@b.io")).await, [200, 429]);

    // Reordered and retuned at once: each takes over the quota of the nearest window.
    let rig = new_rig("  per_email: [{ requests: 1, per: 1m }, { requests: 3, per: 1h }]\n");
    for _ in 0..3 {
        assert_eq!(rig.status(ask("r@b.io")).await, 200);
        rig.advance(61);
    }
    reload(
        &rig,
        "  per_email: [{ requests: 5, per: 1h }, { requests: 2, per: 1m }]\n",
    );
    assert_eq!(
        rig.statuses(3, ask("r@b.io")).await,
        [200, 200, 429],
        "3 of 5 spent"
    );

    // A quota added beside a tightened one: both derive from the one they replace, so
    // neither starts afresh, whichever is written first.
    for new in [
        "  per_email: [{ requests: 10, per: 1d }, { requests: 2, per: 1h }]\n",
        "  per_email: [{ requests: 2, per: 1h }, { requests: 10, per: 1d }]\n",
    ] {
        let rig = new_rig("  per_email: [{ requests: 3, per: 1h }]\n");
        assert_eq!(rig.statuses(3, ask("s@b.io")).await, [200; 3]);
        reload(&rig, new);
        assert_eq!(rig.status(ask("s@b.io")).await, 429, "{new}");
    }
    // Retuned and reordered at once: each derives from the quota of the nearest window.
    for new in [
        "  per_email: [{ requests: 6, per: 30m }, { requests: 3, per: 10s }]\n",
        "  per_email: [{ requests: 3, per: 10s }, { requests: 6, per: 30m }]\n",
    ] {
        let rig = new_rig("  per_email: [{ requests: 2, per: 10s }, { requests: 6, per: 1h }]\n");
        for _ in 0..6 {
            assert_eq!(rig.status(ask("w@b.io")).await, 200);
            rig.advance(5);
        }
        reload(&rig, new);
        rig.advance(10);
        assert_eq!(rig.status(ask("w@b.io")).await, 429, "{new}");
    }

    // Loosened: 1 an hour to 3 keeps the one spent.
    let rig = new_rig("  per_email: [{ requests: 1, per: 1h }]\n");
    assert_eq!(rig.status(ask("a@b.io")).await, 200);
    reload(&rig, "  per_email: [{ requests: 3, per: 1h }]\n");
    assert_eq!(rig.statuses(3, ask("a@b.io")).await, [200, 200, 429]);
}

#[cfg(feature = "redis")]
/// Reloads whose answers once differed between the stores: each is (limits before, how
/// many requests from one address, limits after, how many more).
const RELOADS_ANSWERED_ALIKE: [(&str, usize, &str, usize); 5] = [
    // A shadow copy put before the quota it copies: the quota keeps its state (memory
    // handed the copy the state and every address a fresh burst).
    (
        "  per_email: [{ requests: 3, per: 1h }]\n",
        3,
        "  per_email: [{ requests: 3, per: 1h, shadow: true }, { requests: 3, per: 1h }]\n",
        2,
    ),
    // Tightened while a denial is cached: it names the new quota and its wait (Redis's
    // cache went on naming 2 an hour, and half the wait).
    (
        "  per_email: [{ requests: 2, per: 1h }]\n",
        3,
        "  per_email: [{ requests: 1, per: 1h }]\n",
        2,
    ),
    // A shadow quota enforced beside the one whose denial is cached: the longer wait.
    (
        "  per_email: [{ requests: 1, per: 24h, shadow: true }, { requests: 2, per: 1h }]\n",
        3,
        "  per_email: [{ requests: 1, per: 24h }, { requests: 2, per: 1h }]\n",
        2,
    ),
    // The same numbers written another way: answers name the quota as now written (the
    // memory store named it as the state it kept was first made for).
    (
        "  per_email: [{ requests: 2, per: 1h }]\n",
        3,
        "  per_email: [{ requests: 4, per: 2h, burst: 2 }]\n",
        2,
    ),
    // Unchanged, with a quota of another group added: the cached denial stands as it was.
    (
        "  per_email: [{ requests: 2, per: 1h }]\n",
        3,
        "  per_ip: [{ requests: 100, per: 1h }]\n  per_email: [{ requests: 2, per: 1h }]\n",
        2,
    ),
];

#[cfg(feature = "redis")]
/// What a client is told: the status, the quota named, and `Retry-After`.
async fn told(rig: &Rig, email: &str) -> (u16, Option<String>, Option<u64>) {
    let response = rig.send(ask(email)).await;
    let policy = header(&response, "ratelimit-policy").map(str::to_owned);
    let retry = header(&response, "retry-after").and_then(|v| v.parse().ok());
    (response.status().as_u16(), policy, retry)
}

#[cfg(feature = "redis")]
/// Runs [`RELOADS_ANSWERED_ALIKE`] against the memory store and against `store` (a Redis
/// store, new for each case), and asserts that a client is told the same by both once a
/// reload's walk is done (Redis's `Retry-After` within a few seconds of memory's: its
/// clock runs while the memory store's does not).
async fn reloads_answered_alike(store: impl Fn(usize) -> StoreSettings) {
    for (case, (before, spent, after, more)) in RELOADS_ANSWERED_ALIKE.into_iter().enumerate() {
        let memory = new_rig(before);
        let redis = rig_with(before, "", store(case));
        for _ in 0..spent {
            assert_eq!(told(&memory, "a@b.io").await, told(&redis, "a@b.io").await);
        }
        reload(&memory, after);
        reload(&redis, after);
        for _ in 0..more {
            let expected = told(&memory, "a@b.io").await;
            // Until the reload's walk is done, Redis may still answer from before it.
            let mut got = told(&redis, "a@b.io").await;
            for _ in 0..100 {
                if got.0 == expected.0 && got.1 == expected.1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                got = told(&redis, "a@b.io").await;
            }
            assert_eq!(
                (got.0, &got.1),
                (expected.0, &expected.1),
                "case {case}: {after}"
            );
            let (retry, retry_expected) = (got.2.unwrap_or(0), expected.2.unwrap_or(0));
            assert!(
                retry <= retry_expected && retry + 5 >= retry_expected,
                "case {case}: Retry-After {retry}, memory {retry_expected}"
            );
        }
    }
}

/// A shadow copy put before the quota it copies leaves the quota its state, and the copy
/// starts where it stood: the two move in step, as they would had both been there all
/// along.
#[tokio::test]
async fn a_shadow_copy_put_before_its_quota_leaves_it_its_state() {
    let rig = new_rig("  per_email: [{ requests: 3, per: 1h }]\n");
    assert_eq!(rig.statuses(3, ask("a@b.io")).await, [200; 3]);
    assert_eq!(rig.statuses(2, ask("b@b.io")).await, [200; 2]);
    reload(
        &rig,
        "  per_email: [{ requests: 3, per: 1h, shadow: true }, { requests: 3, per: 1h }]\n",
    );
    assert_eq!(rig.status(ask("a@b.io")).await, 429, "spent before");
    assert_eq!(rig.status(ask("b@b.io")).await, 200);
    let shadowed = rig.handle.shadow_denied(LimitGroup::PerEmail);
    assert_eq!(rig.status(ask("b@b.io")).await, 429);
    assert_eq!(
        rig.handle.shadow_denied(LimitGroup::PerEmail),
        shadowed,
        "the copy denies with its quota, not before it"
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
    let evicted = rig.handle.forced_evictions(LimitGroup::PerEmail);
    assert!(evicted > 0);
    assert_eq!(rig.handle.forced_evictions(LimitGroup::PerIp), 0);
    rig.advance(20);
    assert!(rig.handle.sweep() > 0);
    assert_eq!(rig.handle.tracked_keys(LimitGroup::PerEmail), [0]);
    // A reload that replaces the quota keeps the count: a counter never goes back.
    reload(&rig, "  per_email: [{ requests: 4, per: 1m }]\n");
    assert_eq!(rig.handle.forced_evictions(LimitGroup::PerEmail), evicted);
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
    let limits = &settings.limits;
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

/// One scenario of the table both stores must pass: a limits section, other guard
/// settings, and requests with the status (and Retry-After) each must get. No scenario
/// needs time to pass, so the same table runs against Redis, whose clock is its own.
struct Case {
    name: &'static str,
    limits: &'static str,
    extra: &'static str,
    steps: Vec<(Ask, u16, Option<&'static str>)>,
    /// Upstream calls expected at the end.
    forwarded: usize,
}

fn table() -> Vec<Case> {
    let a = || ask("a@b.io");
    vec![
        Case {
            name: "per-IP quota, exact Retry-After",
            limits: "  per_ip: [{ requests: 2, per: 1m }]\n",
            extra: "",
            steps: vec![(a(), 200, None), (a(), 200, None), (a(), 429, Some("30"))],
            forwarded: 2,
        },
        Case {
            name: "per-IP counts invalid requests",
            limits: "  per_ip: [{ requests: 3, per: 1h }]\n",
            extra: "",
            steps: vec![
                (a().token(None), 401, None),
                (a().token(Some("guess")), 401, None),
                (ask("not-an-address"), 422, None),
                (a(), 429, Some("1200")),
            ],
            forwarded: 0,
        },
        Case {
            name: "a denial charges no later group",
            limits: "  per_ip: [{ requests: 1, per: 1h }]\n  per_client: [{ requests: 2, per: 1h }]\n  per_email: [{ requests: 2, per: 1h }]\n",
            extra: "",
            steps: vec![
                (a(), 200, None),
                (a(), 429, Some("3600")),
                (a(), 429, Some("3600")),
                (a().from("192.0.2.2"), 200, None),
                (a().from("192.0.2.3"), 429, Some("1800")),
                (a().from("192.0.2.4").token(Some("bar")), 429, Some("1800")),
                (ask("c@b.io").from("192.0.2.5").token(Some("bar")), 200, None),
            ],
            forwarded: 3,
        },
        Case {
            name: "per-email denial leaves the global quota alone",
            limits: "  per_email: [{ requests: 1, per: 1h }]\n  global: [{ requests: 2, per: 1h }]\n",
            extra: "",
            steps: vec![
                (a(), 200, None),
                (a(), 429, Some("3600")),
                (ask("c@b.io"), 200, None),
                (ask("d@b.io"), 429, Some("1800")),
            ],
            forwarded: 2,
        },
        Case {
            name: "several quotas in a group, the tightest denies",
            limits: "  per_email: [{ requests: 10, per: 1m }, { requests: 2, per: 1h }]\n",
            extra: "",
            steps: vec![(a(), 200, None), (a(), 200, None), (a(), 429, Some("1800"))],
            forwarded: 2,
        },
        Case {
            name: "two quotas with the same numbers count as one",
            limits: "  per_email: [{ requests: 2, per: 1h }, { requests: 2, per: 1h, shadow: true }]\n",
            extra: "",
            steps: vec![(a(), 200, None), (a(), 200, None), (a(), 429, Some("1800"))],
            forwarded: 2,
        },
        Case {
            name: "a shadow copy before the quota it copies",
            limits: "  per_email: [{ requests: 1, per: 1h, shadow: true }, { requests: 1, per: 1h }]\n",
            extra: "",
            steps: vec![(a(), 200, None), (a(), 429, Some("3600"))],
            forwarded: 1,
        },
        Case {
            name: "two quotas that reduce to the same numbers",
            limits: "  per_email: [{ requests: 10, per: 1m, burst: 2 }, { requests: 20, per: 2m, burst: 2 }]\n",
            extra: "",
            steps: vec![(a(), 200, None), (a(), 200, None), (a(), 429, Some("6"))],
            forwarded: 2,
        },
        Case {
            name: "burst",
            limits: "  per_client: [{ requests: 1, per: 1s, burst: 3 }]\n",
            extra: "",
            steps: vec![
                (a(), 200, None),
                (a(), 200, None),
                (a(), 200, None),
                (a(), 429, Some("1")),
                (a().token(Some("bar")), 200, None),
            ],
            forwarded: 4,
        },
        Case {
            name: "shadow quotas never deny",
            limits: "  per_email: [{ requests: 1, per: 1h, shadow: true }]\n",
            extra: "",
            steps: vec![(a(), 200, None), (a(), 200, None), (a(), 200, None)],
            forwarded: 3,
        },
        Case {
            name: "exempt IPs skip the per-IP limit only",
            limits: "  per_ip: [{ requests: 1, per: 1h }]\n  per_email: [{ requests: 2, per: 1h }]\n  exempt_ips: [198.51.100.0/24]\n",
            extra: "",
            steps: vec![
                (a().from("198.51.100.7"), 200, None),
                (a().from("198.51.100.7"), 200, None),
                (a().from("198.51.100.7"), 429, Some("1800")),
                (ask("c@b.io").from("192.0.2.9"), 200, None),
                (ask("c@b.io").from("192.0.2.9"), 429, Some("3600")),
            ],
            forwarded: 3,
        },
        Case {
            name: "spoofed X-Forwarded-For from an untrusted peer",
            limits: "  per_ip: [{ requests: 2, per: 1h }]\n",
            extra: "",
            steps: vec![
                (a().forwarded_for("1.1.1.1"), 200, None),
                (a().forwarded_for("2.2.2.2"), 200, None),
                (a().forwarded_for("3.3.3.3"), 429, Some("1800")),
            ],
            forwarded: 2,
        },
        Case {
            name: "trusted proxies",
            limits: "  per_ip: [{ requests: 1, per: 1h }]\n",
            extra: "client_ip:\n  trusted_proxies: [10.0.0.0/8]\n",
            steps: vec![
                (a().from("10.0.0.5").forwarded_for("203.0.113.1"), 200, None),
                (a().from("10.0.0.5").forwarded_for("203.0.113.2"), 200, None),
                (a().from("10.0.0.5").forwarded_for("203.0.113.1, 10.0.0.9"), 429, Some("3600")),
            ],
            forwarded: 2,
        },
        Case {
            name: "one IPv6 /64 is one client",
            limits: "  per_ip: [{ requests: 2, per: 1h }]\n",
            extra: "",
            steps: vec![
                (a().from("2001:db8:1:2::1"), 200, None),
                (a().from("2001:db8:1:2:ffff::2"), 200, None),
                (a().from("2001:db8:1:2:abcd::9"), 429, Some("1800")),
                (a().from("2001:db8:1:3::1"), 200, None),
            ],
            forwarded: 3,
        },
        Case {
            name: "spellings of one mailbox share a bucket",
            limits: "  per_email: [{ requests: 3, per: 1h }]\n",
            extra: "",
            steps: vec![
                (ask("bob.smith@gmail.com"), 200, None),
                (ask("Bob.Smith+promo@Gmail.com"), 200, None),
                (ask("bobsmith+x@googlemail.com"), 200, None),
                (ask("b.o.b.s.m.i.t.h@GMAIL.COM"), 429, Some("1200")),
                (ask("anna@bücher.example"), 200, None),
                (ask("bob.smith@example.com"), 200, None),
            ],
            forwarded: 5,
        },
        Case {
            name: "uniform answers silence per-email denials",
            limits: "  per_email: [{ requests: 1, per: 1h }]\n",
            extra: "responses: { uniform: true }\n",
            steps: vec![(a(), 200, None), (a(), 200, None), (ask("A+x@B.io"), 200, None)],
            forwarded: 1,
        },
    ]
}

async fn run_table(make: impl Fn(&'static str, &'static str) -> Rig) {
    for case in table() {
        let rig = make(case.limits, case.extra);
        for (i, (ask, status, retry)) in case.steps.into_iter().enumerate() {
            let response = rig.send(ask).await;
            assert_eq!(
                response.status().as_u16(),
                status,
                "{}: step {i}",
                case.name
            );
            if retry.is_some() {
                assert_eq!(
                    header(&response, "retry-after"),
                    retry,
                    "{}: step {i}",
                    case.name
                );
            }
        }
        assert_eq!(
            rig.upstream_calls.load(Ordering::SeqCst),
            case.forwarded,
            "{}",
            case.name
        );
    }
}

/// The counters a sequence of requests leaves (denials, shadow denials and near-limit
/// admissions per group and quota): the same for every store.
const COUNTED_LIMITS: &str = "  per_ip: [{ requests: 6, per: 1h }, { requests: 2, per: 1h, shadow: true }]\n  per_email: [{ requests: 4, per: 1h }, { requests: 3, per: 1d, shadow: true }, { requests: 2, per: 1m }]\n  global: [{ requests: 5, per: 1h }]\n";

async fn counted(rig: &Rig, requests: usize) -> (Vec<u16>, Vec<(u64, u64, Vec<u64>)>) {
    let mut statuses = Vec::new();
    for i in 0..requests {
        let email = if i % 3 == 2 { "b@b.io" } else { "a@b.io" };
        statuses.push(rig.status(ask(email)).await);
    }
    let counters = LimitGroup::ALL
        .iter()
        .map(|&group| {
            (
                rig.handle.denied(group),
                rig.handle.shadow_denied(group),
                rig.handle
                    .near_limit(group)
                    .iter()
                    .map(|(_, n)| *n)
                    .collect(),
            )
        })
        .collect();
    (statuses, counters)
}

#[tokio::test]
async fn the_counted_sequence_in_memory() {
    let (statuses, counters) =
        counted(&rig_with(COUNTED_LIMITS, "", StoreSettings::default()), 9).await;
    // Hand-checked: a@b.io's third and fourth requests are over its 2/1m quota, the per-IP
    // quota denies from the seventh request on, and its shadow quota would have from the
    // third: counted for the four the per-IP group still admitted (what promoting it would
    // add), not for the three it denied anyway.
    assert_eq!(statuses, [200, 200, 200, 429, 429, 200, 429, 429, 429]);
    let ip = &counters[LimitGroup::PerIp.index()];
    assert_eq!((ip.0, ip.1), (3, 4), "{counters:?}");
    assert!(
        counters.iter().any(|(_, shadow, _)| *shadow > 0),
        "{counters:?}"
    );
    assert!(
        counters
            .iter()
            .any(|(_, _, near)| near.iter().any(|n| *n > 0)),
        "{counters:?}"
    );
}

#[tokio::test]
async fn the_shared_table_in_memory() {
    run_table(|limits, extra| rig_with(limits, extra, StoreSettings::default())).await;
}

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;
    use test_support::RedisServer;

    fn redis_store(server: &RedisServer, on_error: OnError) -> StoreSettings {
        StoreSettings {
            redis: Some(RedisSettings {
                username: None,
                password: None,
                sentinel_auth: None,
                ca_pem: None,
                client_certificate: None,
                url: server.url(),
                key_prefix: format!("t{}", rand_suffix()),
                timeout: Duration::from_millis(500),
                on_error,
                global_keys: 1,
            }),
            ..StoreSettings::default()
        }
    }

    /// A store (`deny`, the given timeout) reaching `server` through a proxy that delays
    /// each way by `delay`, and the proxy.
    fn away(
        server: &RedisServer,
        delay: Duration,
        timeout: Duration,
    ) -> (test_support::DelayProxy, StoreSettings) {
        let away = test_support::DelayProxy::start(server.addr(), delay);
        let mut store = redis_store(server, OnError::Deny);
        if let Some(redis) = store.redis.as_mut() {
            redis.url = away.url();
            redis.timeout = timeout;
        }
        (away, store)
    }

    /// Redis a network away (200 ms a round trip) with a 350 ms timeout, less than two
    /// round trips (room for a loaded machine): the probe, each of whose exchanges is a
    /// round trip, finds it serving, and requests after pauses past the idle check (the
    /// connection kept alive in the background, not checked with a `PING` on the request's
    /// time) are decided, not failed as `on_error` says. (The first request, for which the
    /// thread's connection is made, goes while the network is quick: the test below is the
    /// one of a first connection far away.)
    #[tokio::test]
    async fn redis_a_round_trip_under_the_timeout_away_decides_every_request() {
        let server = RedisServer::start();
        let (away, store) = away(
            &server,
            Duration::from_millis(10),
            Duration::from_millis(350),
        );
        let rig = rig_with("  per_email: [{ requests: 100, per: 1h }]\n", "", store);
        let mut statuses = vec![rig.status(ask("first@b.io")).await];
        away.set_delay(Duration::from_millis(100));
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(1300)).await;
            statuses.push(rig.status(ask(&format!("after{i}@b.io"))).await);
        }
        assert_eq!(statuses, [200; 4]);
        assert_eq!(rig.handle.store_errors(), 0);
        assert!(rig.handle.store_ready(), "the probe finds Redis serving");
    }

    /// Redis farther away (80 ms a round trip) with the timeout three round trips, as the
    /// README advises, and eight requests at once as the thread's first: all wait for the
    /// connection being made (a few round trips more than a call: four times the timeout is
    /// allowed for it), not only the one its queue was made for, and are decided, not
    /// failed as `on_error` says.
    #[tokio::test]
    async fn a_burst_on_a_new_connection_far_away_is_decided_whole() {
        let server = RedisServer::start();
        let (_away, store) = away(
            &server,
            Duration::from_millis(40),
            Duration::from_millis(240),
        );
        let rig = rig_with("  per_email: [{ requests: 100, per: 1h }]\n", "", store);
        let burst = (0..8).map(|i| rig.status(ask(&format!("b{i}@b.io"))));
        let statuses = futures_util::future::join_all(burst).await;
        assert_eq!(statuses, [200; 8]);
        assert_eq!(rig.handle.store_errors(), 0);
    }

    /// Waits up to two seconds for `count` to fall to `to`; what it is then.
    pub(super) async fn falls_to(to: usize, count: impl Fn() -> usize) -> usize {
        counted_until(Duration::from_secs(2), count, |n| n <= to).await
    }

    /// A store dropped while its threads live on (an application that builds its layer
    /// again): its queues' tasks end and their connections close, with the probe's.
    #[tokio::test]
    async fn a_dropped_store_closes_its_connections() {
        let server = RedisServer::start();
        let before = server.connected_clients();
        let rig = redis_rig(
            &server,
            "  per_email: [{ requests: 3, per: 1h }]\n",
            "",
            OnError::Deny,
        );
        assert_eq!(rig.status(ask("a@b.io")).await, 200);
        assert!(server.connected_clients() > before);
        drop(rig);
        assert_eq!(
            falls_to(before, || server.connected_clients()).await,
            before
        );
    }

    /// Requests from threads that then exit (an application's own threads, a blocking
    /// pool's that retire, the threads `block_in_place` hands a worker's core to): each
    /// thread's queue, task and connection end with it, while the store lives on.
    #[test]
    fn a_thread_that_exits_releases_its_queue() {
        let server = RedisServer::start();
        let runtime = one_worker_runtime();
        let limits = "  per_email: [{ requests: 1000, per: 1h }]\n";
        let rig = runtime.block_on(async { redis_rig(&server, limits, "", OnError::Deny) });
        assert_eq!(runtime.block_on(rig.status(ask("w@b.io"))), 200);
        let base = server.connected_clients();
        assert_eq!(from_exiting_threads(&runtime, &rig, 5), [200; 5]);
        let left = runtime.block_on(falls_to(base, || server.connected_clients()));
        assert_eq!(left, base, "connections of threads gone");
        assert_eq!(runtime.block_on(rig.status(ask("w2@b.io"))), 200);
    }

    /// What a request asked from a thread-local's destructor was answered.
    static LATE_STATUS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

    /// Asks for a reset when dropped, on the runtime it holds.
    struct AskOnDrop(Option<(Svc, tokio::runtime::Handle)>);

    impl Drop for AskOnDrop {
        fn drop(&mut self) {
            if let Some((service, runtime)) = self.0.take() {
                let request = ask("late@b.io").request();
                let response = runtime.block_on(service.oneshot(request)).unwrap();
                LATE_STATUS.store(response.status().as_u16(), Ordering::SeqCst);
            }
        }
    }

    thread_local! {
        static LATE: std::cell::RefCell<AskOnDrop> = const { std::cell::RefCell::new(AskOnDrop(None)) };
    }

    /// A request decided while its thread's thread-locals are being destroyed (from another
    /// thread-local's destructor, after the thread's queue list is gone) fails as `on_error`
    /// says, rather than panicking in a destructor, which aborts the process.
    #[test]
    fn a_decision_asked_while_the_thread_exits_fails_as_on_error_says() {
        let server = RedisServer::start();
        let runtime = one_worker_runtime();
        let limits = "  per_email: [{ requests: 1000, per: 1h }]\n";
        let rig = runtime.block_on(async { redis_rig(&server, limits, "", OnError::Deny) });
        let handle = runtime.handle().clone();
        let service = rig.service.clone();
        std::thread::spawn(move || {
            // Thread-locals are destroyed in the reverse order of their first use: Tokio's
            // (its context, the thread's parker) last, then LATE, and the queue list (first
            // used by the request below) before LATE.
            handle.block_on(async {});
            LATE.with(|late| late.borrow_mut().0 = Some((service.clone(), handle.clone())));
            let early = handle.block_on(service.oneshot(ask("early@b.io").request()));
            assert_eq!(early.unwrap().status(), 200);
        })
        .join()
        .unwrap();
        assert_eq!(LATE_STATUS.load(Ordering::SeqCst), 503);
        drop(rig);
    }

    fn rand_suffix() -> u64 {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(0u8)
    }

    fn redis_rig(server: &RedisServer, limits: &str, extra: &str, on_error: OnError) -> Rig {
        rig_in(
            limits,
            extra,
            redis_store(server, on_error),
            ManualClock::new(),
        )
    }

    /// A rig on `server` under 3 an hour per address (`deny`), whose `address` has had its
    /// three and been refused once (the denial cached).
    async fn refused_after_three(server: &RedisServer, address: &str) -> Rig {
        let rig = redis_rig(
            server,
            "  per_email: [{ requests: 3, per: 1h }]\n",
            "",
            OnError::Deny,
        );
        assert_eq!(rig.statuses(4, ask(address)).await, [200, 200, 200, 429]);
        rig
    }

    /// Every quota state in Redis (not the probe's): (interval_us, capacity_us, TAT).
    fn states(server: &RedisServer) -> Vec<[i64; 3]> {
        quota_keys(server)
            .iter()
            .flat_map(|(key, _)| server.quota_states(key))
            .collect()
    }

    /// How many keys hold a state of the quota (interval_us, capacity_us), once `expected`
    /// do or after two seconds (the walk carrying a reload runs in the background).
    async fn holding(server: &RedisServer, quota: (i64, i64), expected: usize) -> usize {
        let count = || {
            states(server)
                .iter()
                .filter(|[interval, capacity, _]| (*interval, *capacity) == quota)
                .count()
        };
        counted_until(Duration::from_secs(2), count, |n| n >= expected).await
    }

    /// A reload is answered as the memory store answers it: a shadow copy before its quota,
    /// and a denial cached before a reload that changes what it would say.
    #[tokio::test]
    async fn reloads_are_answered_as_in_memory() {
        let server = RedisServer::start();
        reloads_answered_alike(|_| redis_store(&server, OnError::Deny)).await;
    }

    /// A second reload before the first one's walk is done: a denial the first kept until
    /// its walk stands through the second (it was forgotten, and the address reached Redis
    /// before its spent state was carried over: a fresh burst), and once the walk is done
    /// Redis answers it with the new quota.
    #[tokio::test]
    async fn a_denial_kept_until_a_walk_stands_through_the_next_reload() {
        let server = RedisServer::start();
        let rig = refused_after_three(&server, "a@b.io").await;
        reload(&rig, "  per_email: [{ requests: 1, per: 1h }]\n");
        reload(
            &rig,
            "  per_ip: [{ requests: 100, per: 1h }]\n  per_email: [{ requests: 1, per: 1h }]\n",
        );
        assert_eq!(rig.status(ask("a@b.io")).await, 429);
        let mut told = None;
        for _ in 0..100 {
            let response = rig.send(ask("a@b.io")).await;
            assert_eq!(response.status(), 429);
            told = header(&response, "ratelimit-policy").map(str::to_owned);
            if told.as_deref() == Some(r#""per_email";q=1;w=3600"#) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(told.as_deref(), Some(r#""per_email";q=1;w=3600"#));
    }

    /// As in memory: a changed quota keeps what each address spent, each key given the new
    /// quota's state in the background (within a moment of the reload).
    #[tokio::test]
    async fn a_changed_quota_keeps_what_each_address_spent_in_redis() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            "  per_email: [{ requests: 3, per: 1h }]\n",
            "",
            OnError::Deny,
        );
        assert_eq!(rig.statuses(2, ask("two@b.io")).await, [200, 200]);
        assert_eq!(rig.status(ask("one@b.io")).await, 200);
        assert_eq!(rig.statuses(3, ask("three@b.io")).await, [200, 200, 200]);
        reload(&rig, "  per_email: [{ requests: 1, per: 1h }]\n");
        let hourly = (3_600_000_000, 3_600_000_000);
        assert_eq!(holding(&server, hourly, 3).await, 3, "{:?}", server.dump());
        assert_eq!(
            rig.status(ask("two@b.io")).await,
            429,
            "had two of the new one"
        );
        assert_eq!(rig.status(ask("one@b.io")).await, 429, "had its one");
        assert_eq!(rig.status(ask("new@b.io")).await, 200);
        // Changed twice more, each walk after the one before: what was spent under the
        // first quota, carried through the others (at most a burst of one under 1/1h),
        // counts under the last, as the memory store carries it at each reload.
        reload(&rig, "  per_email: [{ requests: 1, per: 2h }]\n");
        reload(&rig, "  per_email: [{ requests: 5, per: 1h }]\n");
        let five = (720_000_000, 3_600_000_000);
        assert_eq!(holding(&server, five, 4).await, 4, "{:?}", server.dump());
        assert_eq!(
            rig.statuses(5, ask("three@b.io")).await,
            [200, 200, 200, 200, 429],
            "one of five spent"
        );
    }

    /// Replicas reloading at different times share one key per address, each counting
    /// under its own file's quota: the one still on the old file keeps its count through
    /// the other's writes.
    #[tokio::test]
    async fn replicas_reloading_apart_keep_their_own_counts_in_one_key() {
        let server = RedisServer::start();
        let store = redis_store(&server, OnError::Deny);
        let old = "  per_email: [{ requests: 3, per: 1h }]\n";
        let behind = rig_in(old, "", store.clone(), ManualClock::new());
        let ahead = rig_in(old, "", store, ManualClock::new());
        reload(&ahead, "  per_email: [{ requests: 2, per: 1h }]\n");
        // The reload's walk (which finds no key: none is written yet) over before the
        // other replica's request, whose charge it would otherwise carry over.
        let scans = || {
            let stats = server.command("INFO commandstats").unwrap_or_default();
            stats.lines().any(|line| line.starts_with("cmdstat_scan:"))
        };
        for _ in 0..100 {
            if scans() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(scans(), "the walk never ran");
        assert_eq!(behind.statuses(1, ask("r@b.io")).await, [200]);
        assert_eq!(ahead.statuses(3, ask("r@b.io")).await, [200, 200, 429]);
        assert_eq!(behind.statuses(3, ask("r@b.io")).await, [200, 200, 429]);
        let held = states(&server);
        assert_eq!(held.len(), 2, "both quotas in the one key: {held:?}");
    }

    /// A key holds another replica's quota beside this one's (a reload not yet everywhere):
    /// kept through this one's writes while it counts, the key expiring with the later of
    /// the two; one that no longer counts is dropped; a value that reads as no state (not
    /// written by the gateway, or not numbers) is decided as a full burst spent, not an
    /// error, and written over.
    #[tokio::test]
    async fn a_key_keeps_the_quotas_it_holds_for_others_while_they_count() {
        let server = RedisServer::start();
        let store = redis_store(&server, OnError::Deny);
        let daily = rig_in(
            "  per_email: [{ requests: 5, per: 1d }]\n",
            "",
            store.clone(),
            ManualClock::new(),
        );
        let hourly = rig_in(
            "  per_email: [{ requests: 5, per: 1h }]\n",
            "",
            store,
            ManualClock::new(),
        );
        assert_eq!(daily.status(ask("k@b.io")).await, 200);
        assert_eq!(hourly.status(ask("k@b.io")).await, 200);
        let keys = quota_keys(&server);
        let [(key, _)] = &keys[..] else {
            panic!("{keys:?}")
        };
        assert_eq!(server.quota_states(key).len(), 2, "{keys:?}");
        let ttl = server.pttl(key);
        assert!(
            ttl > 3_600_000,
            "expires with the daily quota's state: {ttl}"
        );

        // A quota of another file whose state has run out, and one whose TAT is not a
        // state at all, beside this one's.
        let day = 86_400_000_000i64;
        server.plant_quota_states(
            key,
            &format!("17280000000, {day}, now + 17280000000, 1000, 2000, now - 1, 7, 8, 1/0"),
        );
        assert_eq!(daily.status(ask("k@b.io")).await, 200, "two of five spent");
        let held = server.quota_states(key);
        assert_eq!(held.len(), 1, "the others dropped: {held:?}");
        assert_eq!(held[0][..2], [17_280_000_000, day]);

        // This quota's own state past its capacity (or not a number): a full burst spent,
        // so the next request waits one interval (4.8 h), not the ten days written.
        for tat in ["now + 10 * 86400000000", "0/0"] {
            server.plant_quota_states(key, &format!("17280000000, {day}, {tat}"));
            let denied = daily.send(ask("k@b.io")).await;
            assert_eq!(denied.status(), 429, "{tat}");
            assert_eq!(header(&denied, "retry-after"), Some("17280"), "{tat}");
            assert_eq!(daily.handle.store_errors(), 0);
        }
    }

    /// A rig in Sentinel mode asking only `sentinel` (`deny`, the given timeout): per_ip
    /// five an hour.
    fn slow_sentinel_rig(sentinel: &test_support::FakeSentinel, timeout: Duration) -> Rig {
        let mut settings =
            RedisSettings::sentinel(&[sentinel.url()], test_support::SENTINEL_MASTER).unwrap();
        settings.timeout = timeout;
        settings.on_error = OnError::Deny;
        rig_in(
            "  per_ip: [{ requests: 5, per: 1h }]\n",
            "",
            StoreSettings {
                redis: Some(settings),
                ..StoreSettings::default()
            },
            ManualClock::new(),
        )
    }

    /// The first decision, before any master is named, waits as long as making connections
    /// may take (four times `timeout`), in all: the sentinels' answer and Redis's come out of
    /// one deadline. Here the sentinel answers after 3.5 s, past a one-second timeout but
    /// within the 4 s allowed, and the master it names, which answers `ROLE`, holds every
    /// write (`CLIENT PAUSE ... WRITE`): the request fails as `on_error` says at the deadline,
    /// 4 s, not when the call's own second runs out (4.5 s) or a new allowance would (7.5 s).
    #[tokio::test]
    async fn the_first_decision_waits_for_the_sentinels_and_redis_within_one_deadline() {
        let master = test_support::RedisServer::start();
        let slow =
            test_support::FakeSentinel::naming_after(master.port(), Duration::from_millis(3500));
        assert_eq!(
            master.command("CLIENT PAUSE 10000 WRITE").as_deref(),
            Some("+OK\r\n")
        );
        let rig = slow_sentinel_rig(&slow, Duration::from_millis(1000));
        let started = std::time::Instant::now();
        assert_eq!(rig.status(ask("a@b.io")).await, 503);
        let waited = started.elapsed();
        // It waited for the sentinel (which a 500 ms limit of the Redis client's own on
        // every answer had cut short, as `timeout` alone would have), and for nothing past
        // its one deadline.
        assert!(waited >= Duration::from_millis(3950), "{waited:?}");
        assert!(waited < Duration::from_millis(4400), "{waited:?}");
        let _ = master.command("CLIENT UNPAUSE");
    }

    /// Sentinels first asked long after the store was made (a host that runs no
    /// housekeeping, which the library allows, asks them with its first request; here the
    /// runtime the housekeeping is spawned on is first driven 600 ms after): the first
    /// request waits for their answer as long as making connections may take (400 ms here),
    /// counted from when they are first asked.
    #[test]
    fn sentinels_first_asked_long_after_the_store_was_made_are_waited_for() {
        let master = test_support::RedisServer::start();
        let slow =
            test_support::FakeSentinel::naming_after(master.port(), Duration::from_millis(250));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let rig = {
            let _inside = runtime.enter();
            slow_sentinel_rig(&slow, Duration::from_millis(100))
        };
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(runtime.block_on(rig.status(ask("a@b.io"))), 200);
    }

    /// Sentinels that do not answer past the store's first moments are away, as Redis can
    /// be: a request then waits `timeout` (100 ms), not the 400 ms a first connection is
    /// given, before it fails as `on_error` says.
    #[tokio::test]
    async fn sentinels_silent_past_the_first_moments_cost_a_request_the_timeout() {
        let silent = test_support::FakeSentinel::silent();
        let rig = slow_sentinel_rig(&silent, Duration::from_millis(100));
        // Past the 400 ms the first requests may wait.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut slowest = Duration::ZERO;
        for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            let asked = std::time::Instant::now();
            assert_eq!(rig.status(ask("a@b.io").from(ip)).await, 503);
            slowest = slowest.max(asked.elapsed());
        }
        assert!(slowest < Duration::from_millis(300), "{slowest:?}");
    }

    /// First requests arriving together, before any master is named, with a sentinel that
    /// answers in 400 ms, within a one-second timeout: all wait for the one answer and are
    /// decided, rather than each asking the sentinel again in turn and the last running out
    /// of time.
    #[tokio::test]
    async fn first_requests_together_share_the_sentinels_first_answer() {
        let master = test_support::RedisServer::start();
        let slow =
            test_support::FakeSentinel::naming_after(master.port(), Duration::from_millis(400));
        let rig = slow_sentinel_rig(&slow, Duration::from_millis(1000));
        let ips = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"];
        let statuses =
            futures_util::future::join_all(ips.iter().map(|ip| rig.status(ask("a@b.io").from(ip))))
                .await;
        assert_eq!(statuses, [200; 4]);
    }

    /// Writes `key` as `state` (interval_us, capacity_us, TAT) followed by 9,000 numbers
    /// that are no state: more than Lua returns from one call.
    fn plant_overlong(server: &RedisServer, key: &str, state: [f64; 3]) {
        let mut value = Vec::new();
        for number in state.into_iter().chain(std::iter::repeat_n(7.0, 9_000)) {
            value.extend_from_slice(&f64::to_le_bytes(number));
        }
        let mut connection = redis::Client::open(server.url())
            .and_then(|client| client.get_connection())
            .unwrap();
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query(&mut connection)
            .unwrap();
    }

    /// A value far longer than any state the gateway writes (9,000 numbers, more than
    /// Lua returns from one call) under a key: its first quotas are read as ever, the rest
    /// ignored; neither that request nor the others of its call fail.
    #[tokio::test]
    async fn an_overlong_value_under_a_key_is_read_as_its_first_quotas() {
        let server = RedisServer::start();
        let daily = rig_in(
            "  per_email: [{ requests: 5, per: 1d }]\n  per_ip: []\n",
            "",
            redis_store(&server, OnError::Deny),
            ManualClock::new(),
        );
        assert_eq!(daily.status(ask("k@b.io")).await, 200);
        let keys = quota_keys(&server);
        let [(key, _)] = &keys[..] else {
            panic!("{keys:?}")
        };
        // This quota's own state, a full burst spent, then numbers that are no state.
        plant_overlong(
            &server,
            key,
            [17_280_000_000.0, 86_400_000_000.0, f64::INFINITY],
        );
        let (planted, other) =
            futures_util::future::join(daily.send(ask("k@b.io")), daily.status(ask("other@b.io")))
                .await;
        assert_eq!(planted.status(), 429);
        assert_eq!(header(&planted, "retry-after"), Some("17280"));
        assert_eq!(other, 200);
        assert_eq!(daily.handle.store_errors(), 0);
    }

    /// Two changed quotas deriving from one removed quota: the walk gives each key both.
    #[tokio::test]
    async fn a_walk_carries_every_changed_quota_of_a_group() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            "  per_email: [{ requests: 3, per: 1h }]\n",
            "",
            OnError::Deny,
        );
        assert_eq!(rig.statuses(3, ask("w@b.io")).await, [200, 200, 200]);
        reload(
            &rig,
            "  per_email: [{ requests: 1, per: 1h }, { requests: 10, per: 1d }]\n",
        );
        let daily = (8_640_000_000, 86_400_000_000);
        assert_eq!(holding(&server, daily, 1).await, 1, "{:?}", server.dump());
        let held = states(&server);
        assert_eq!(held.len(), 3, "the old quota and both new ones: {held:?}");
        // Three spent: the hourly quota's one (capped), three of the daily ten.
        let lead = |quota: (i64, i64)| {
            let [.., tat] = held
                .iter()
                .find(|[i, c, _]| (*i, *c) == quota)
                .copied()
                .unwrap();
            let [.., old] = held
                .iter()
                .find(|[i, c, _]| (*i, *c) == (1_200_000_000, 3_600_000_000))
                .copied()
                .unwrap();
            (tat - old) / 1_000_000
        };
        // Each new state is the old one's backlog (3 x 20 min) at the new interval, from
        // the walk's moment: within a few seconds of what these give.
        assert!(
            (lead((3_600_000_000, 3_600_000_000))).abs() < 10,
            "{held:?}"
        );
        assert!((lead(daily) - (3 * 8_640 - 3_600)).abs() < 10, "{held:?}");
        assert_eq!(rig.status(ask("w@b.io")).await, 429);
    }

    /// A reload's walk meets a key holding a value far longer than any state (9,003
    /// numbers, this quota's state first): it carries that key's state over like any other
    /// and goes on to the rest, rather than failing at it.
    #[tokio::test]
    async fn a_walk_reads_an_overlong_value_as_its_first_quotas() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            "  per_email: [{ requests: 3, per: 1h }]\n",
            "",
            OnError::Deny,
        );
        assert_eq!(rig.status(ask("v@b.io")).await, 200);
        let keys = quota_keys(&server);
        let [(key, _)] = &keys[..] else {
            panic!("{keys:?}")
        };
        // Two of three spent, by the server's clock.
        let mut connection = redis::Client::open(server.url())
            .and_then(|client| client.get_connection())
            .unwrap();
        let (seconds, micros): (u64, u64) = redis::cmd("TIME").query(&mut connection).unwrap();
        let tat = (seconds * 1_000_000 + micros + 2_400_000_000) as f64;
        plant_overlong(&server, key, [1_200_000_000.0, 3_600_000_000.0, tat]);
        assert_eq!(rig.status(ask("w@b.io")).await, 200);
        reload(
            &rig,
            "  per_email: [{ requests: 1, per: 1h }, { requests: 10, per: 1d }]\n",
        );
        let daily = (8_640_000_000, 86_400_000_000);
        assert_eq!(holding(&server, daily, 2).await, 2, "{:?}", server.dump());
    }

    /// A reload that tightens a quota keeps the denials cached under it (the address would
    /// be refused under the new one at least as long): a flood refused before it is not
    /// let through while the changed quota's state is carried over. One that loosens it
    /// forgets them.
    #[tokio::test]
    async fn a_cached_denial_stands_through_a_reload_that_tightens_its_quota() {
        let mut server = RedisServer::start();
        let rig = refused_after_three(&server, "f@b.io").await;
        reload(&rig, "  per_email: [{ requests: 2, per: 2h }]\n");
        server.stop();
        // Redis is gone: only the cache can refuse it (under deny, Redis's absence is a 503).
        assert_eq!(rig.status(ask("f@b.io")).await, 429, "still refused");
        assert_eq!(rig.status(ask("g@b.io")).await, 503);
        reload(&rig, "  per_email: [{ requests: 5, per: 1h }]\n");
        assert_eq!(rig.status(ask("f@b.io")).await, 503, "loosened: forgotten");
    }

    /// A→B→A: the state A's quota left before B is older than what B spent, and the
    /// walk back writes over it.
    #[tokio::test]
    async fn a_quota_changed_and_changed_back_keeps_what_was_spent_in_between() {
        let server = RedisServer::start();
        let a = "  per_email: [{ requests: 3, per: 1h }]\n";
        let rig = redis_rig(&server, a, "", OnError::Deny);
        assert_eq!(rig.status(ask("ab@b.io")).await, 200);
        reload(&rig, "  per_email: [{ requests: 5, per: 1h }]\n");
        let (three, five) = ((1_200_000_000, 3_600_000_000), (720_000_000, 3_600_000_000));
        assert_eq!(holding(&server, five, 1).await, 1);
        assert_eq!(
            rig.statuses(5, ask("ab@b.io")).await,
            [200, 200, 200, 200, 429]
        );
        reload(&rig, a);
        // The walk back writes over what A left (one spent): five spent, capped at three.
        let tat = |quota: (i64, i64)| {
            states(&server)
                .iter()
                .find(|[interval, capacity, _]| (*interval, *capacity) == quota)
                .map_or(0, |[.., tat]| *tat)
        };
        for _ in 0..100 {
            if tat(three) >= tat(five) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(tat(three) >= tat(five), "{:?}", server.dump());
        assert_eq!(rig.status(ask("ab@b.io")).await, 429);
        let keys = quota_keys(&server);
        assert_eq!(keys.len(), 1, "one key for the address: {keys:?}");
    }

    #[tokio::test]
    async fn the_shared_table_in_redis() {
        let server = RedisServer::start();
        run_table(|limits, extra| redis_rig(&server, limits, extra, OnError::Allow)).await;
    }

    #[tokio::test]
    async fn the_counted_sequence_in_redis_counts_as_in_memory() {
        let server = RedisServer::start();
        // Up to the first per-IP denial: every request reaches Redis, whose script computes
        // the shadow and near-limit masks.
        let memory = counted(&rig_with(COUNTED_LIMITS, "", StoreSettings::default()), 7).await;
        let redis = counted(&redis_rig(&server, COUNTED_LIMITS, "", OnError::Allow), 7).await;
        assert_eq!(redis, memory);
        // Past it, the address's denial is answered from the local cache: still counted as
        // a denial, and its group's shadow quotas, unasked, count nothing, as in memory,
        // where a request an enforced quota denies is not counted for its shadow ones.
        let memory = counted(&rig_with(COUNTED_LIMITS, "", StoreSettings::default()), 9).await;
        let redis = counted(&redis_rig(&server, COUNTED_LIMITS, "", OnError::Allow), 9).await;
        assert_eq!(redis, memory);
    }

    #[tokio::test]
    async fn the_tightest_quota_on_a_tie_is_the_memory_stores() {
        let server = RedisServer::start();
        // Both quotas have four requests left after the first: the headers name the later.
        let limits = "  per_ip: [{ requests: 5, per: 1m }]\n  per_email: [{ requests: 5, per: 1h }, { requests: 5, per: 1d }]\n  response_headers: true\n";
        let memory = rig_with(limits, "", StoreSettings::default());
        let redis = redis_rig(&server, limits, "", OnError::Allow);
        for _ in 0..2 {
            let (m, r) = (
                memory.send(ask("a@b.io")).await,
                redis.send(ask("a@b.io")).await,
            );
            assert_eq!(header(&r, "ratelimit"), header(&m, "ratelimit"));
            assert!(header(&m, "ratelimit")
                .unwrap()
                .starts_with("\"per_email\""));
        }
    }

    #[tokio::test]
    async fn a_server_that_lost_the_script_is_given_it_again() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            "  per_email: [{ requests: 2, per: 1h }]\n",
            "",
            OnError::Deny,
        );
        assert_eq!(rig.status(ask("a@b.io")).await, 200);
        // As after a restart or a failover to a server that never ran it.
        assert_eq!(
            server.command("SCRIPT FLUSH").as_deref().map(str::trim),
            Some("+OK")
        );
        assert_eq!(rig.status(ask("a@b.io")).await, 200);
        assert_eq!(rig.status(ask("a@b.io")).await, 429);
        assert_eq!(rig.handle.store_errors(), 0);
    }

    /// The keys of quotas, without the probe's own (`{prefix}:probe`).
    fn quota_keys(server: &RedisServer) -> Vec<(String, String)> {
        let mut keys = server.dump();
        keys.retain(|(key, _)| !key.ends_with(":probe"));
        keys
    }

    #[tokio::test]
    async fn a_group_is_charged_only_if_every_quota_admits() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            "  per_email: [{ requests: 1, per: 1h }, { requests: 5, per: 1h }]\n",
            "",
            OnError::Allow,
        );
        assert_eq!(rig.status(ask("a@b.io")).await, 200);
        let before = quota_keys(&server);
        assert_eq!(before.len(), 1, "one key for the group: {before:?}");
        assert_eq!(
            server.quota_states(&before[0].0).len(),
            2,
            "holding both quotas"
        );
        assert_eq!(rig.status(ask("a@b.io")).await, 429);
        // The denied request moved neither quota's state.
        assert_eq!(quota_keys(&server), before);
    }

    #[tokio::test]
    async fn keys_expire_and_hold_no_raw_email_or_token() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            "  per_ip: [{ requests: 5, per: 1m }]\n  per_client: [{ requests: 5, per: 1m }]\n  per_email: [{ requests: 5, per: 1h }]\n  global: [{ requests: 5, per: 1s }]\n",
            "",
            OnError::Allow,
        );
        assert_eq!(rig.status(ask("Secret.Person+tag@Example.com")).await, 200);
        assert_eq!(quota_keys(&server).len(), 4, "one per group");
        // The probe's own key too.
        let dump = server.dump();
        for (key, value) in &dump {
            for secret in ["secret", "person", "example", "foo", "192.0.2.1", "bar"] {
                assert!(!key.to_lowercase().contains(secret), "{key} holds {secret}");
            }
            // Numbers only: the probe's `1`, or interval, capacity and TAT per quota.
            if !key.ends_with(":probe") {
                let states = server.quota_states(key);
                assert_eq!(states.len(), 1, "{key} = {value}");
                assert!(states[0].iter().all(|n| *n > 0), "{key} = {value}");
            }
            let ttl = server.pttl(key);
            assert!(ttl > 0 && ttl <= 3_600_001, "{key} has no expiry ({ttl})");
        }
    }

    #[tokio::test]
    async fn two_guards_sharing_redis_enforce_one_limit() {
        let server = RedisServer::start();
        let store = redis_store(&server, OnError::Allow);
        let limits = "  per_email: [{ requests: 3, per: 1h }]\n";
        let one = rig_in(limits, "", store.clone(), ManualClock::new());
        let two = rig_in(limits, "", store, ManualClock::new());
        let mut statuses = Vec::new();
        for i in 0..6 {
            let rig = if i % 2 == 0 { &one } else { &two };
            statuses.push(rig.status(ask("shared@b.io").from("192.0.2.1")).await);
        }
        assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    }

    #[tokio::test]
    async fn requests_decided_many_per_call_each_get_exactly_their_quota() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            // One day per 100,000: each charge moves a key's state 864ms ahead, so the per-IP
            // and global states below count charges exactly (they never fall behind now).
            "  per_ip: [{ requests: 100000, per: 1d }]\n  per_email: [{ requests: 2, per: 1h }, { requests: 5, per: 1d }]\n  global: [{ requests: 100000, per: 1d }]\n",
            "",
            OnError::Allow,
        );
        assert_eq!(rig.status(ask("warm@b.io")).await, 200);
        let state = |group: &str| -> Vec<i64> {
            let mut found: Vec<(String, i64)> = server
                .dump()
                .into_iter()
                .filter(|(key, _)| key.contains(&format!(":{group}:")))
                .flat_map(|(key, _)| {
                    let states = server.quota_states(&key);
                    states.into_iter().map(move |[.., tat]| (key.clone(), tat))
                })
                .collect();
            found.sort();
            found.into_iter().map(|(_, value)| value).collect()
        };
        let (ip_before, global_before) = (state("per_ip"), state("global"));
        assert_eq!((ip_before.len(), global_before.len()), (1, 1));
        // 40 addresses, each asked three times in one burst, interleaved: the calls carry
        // many requests sharing the per-IP and global keys, and each address's two keys.
        let calls_before = server.script_calls();
        let asks = (0..120).map(|i| rig.status(ask(&format!("exact{}@b.io", i % 40))));
        let statuses = futures_util::future::join_all(asks).await;
        let calls = server.script_calls() - calls_before;
        assert!(calls < 120, "120 requests took {calls} script calls");
        for address in 0..40 {
            let mine: Vec<u16> = statuses.iter().skip(address).step_by(40).copied().collect();
            assert_eq!(mine, [200, 200, 429], "address {address}");
        }
        // Every request charged per_ip (decided first); only the 80 admitted reached global.
        let charge_us = 864_000;
        assert_eq!(state("per_ip")[0] - ip_before[0], 120 * charge_us);
        assert_eq!(state("global")[0] - global_before[0], 80 * charge_us);
        // Each address's one per-email key, holding its two quotas (1 + 40 addresses).
        assert_eq!(state("per_email").len(), 2 * 41);
        assert_eq!(
            quota_keys(&server).len(),
            41 + 2,
            "and per_ip's and global's"
        );
    }

    /// A store (`deny`) reaching `server` through a proxy that refuses a script call whose
    /// keys are in several slots, as one that spreads keys over shards does, and the proxy.
    fn behind_a_sharding_proxy(server: &RedisServer) -> (test_support::ScriptProxy, StoreSettings) {
        let proxy = test_support::ScriptProxy::start(
            server.addr(),
            test_support::Refuse::KeysInSeveralSlots,
        );
        let mut store = redis_store(server, OnError::Deny);
        if let Some(redis) = store.redis.as_mut() {
            redis.url = proxy.url();
        }
        (proxy, store)
    }

    /// A proxy that spreads keys over shards may read keys of different slots together
    /// (`MGET`) but refuse a script call whose keys are in several (`CROSSSLOT`), and so
    /// every request of the standalone mode: the probe, which runs the script with keys in
    /// two slots as a request's call does, does not find Redis serving.
    #[tokio::test]
    async fn a_proxy_refusing_a_script_over_several_slots_is_not_found_serving() {
        let server = RedisServer::start();
        let (proxy, store) = behind_a_sharding_proxy(&server);
        // A request's keys in three slots (none shares a hash tag).
        let limits = "  per_ip: [{ requests: 100, per: 1h }]\n  per_client: [{ requests: 100, per: 1h }]\n  per_email: [{ requests: 100, per: 1h }]\n";
        let rig = rig_with(limits, "", store);
        let status = rig.status(ask("a@b.io")).await;
        // The store starts not healthy: the probe's own call refused (beside the
        // request's), and its verdict recorded, is what shows it.
        for _ in 0..150 {
            if proxy.refused() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(proxy.refused() >= 2, "the probe ran the script");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(status, 503, "the request's call is refused");
        assert!(
            !rig.handle.store_healthy(),
            "the probe does not find Redis serving"
        );
        assert!(!rig.handle.store_ready());
    }

    /// The same proxy, with a key prefix in braces (a hash tag: every key in one slot, and
    /// so on one shard): the probe finds it serving, requests are decided, and nothing is
    /// refused.
    #[tokio::test]
    async fn a_prefix_in_braces_passes_a_proxy_refusing_a_script_over_several_slots() {
        let server = RedisServer::start();
        let (proxy, mut store) = behind_a_sharding_proxy(&server);
        if let Some(redis) = store.redis.as_mut() {
            redis.key_prefix = format!("{{t{}}}", rand_suffix());
        }
        let limits = "  per_ip: [{ requests: 2, per: 1h }]\n  per_client: [{ requests: 100, per: 1h }]\n  per_email: [{ requests: 100, per: 1h }]\n";
        let rig = rig_with(limits, "", store);
        let mut statuses = Vec::new();
        for i in 0..3 {
            statuses.push(rig.status(ask(&format!("a{i}@b.io"))).await);
        }
        let mut healthy = false;
        for _ in 0..30 {
            healthy = rig.handle.store_healthy();
            if healthy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(statuses, [200, 200, 429]);
        assert!(healthy, "the probe finds Redis serving");
        assert_eq!(proxy.refused(), 0);
        assert!(proxy.passed() > 0);
    }

    #[tokio::test]
    async fn redis_down_follows_on_error_and_recovers() {
        let mut server = RedisServer::start();
        let port = server.port();
        let limits = "  per_email: [{ requests: 1, per: 1h }]\n";
        let allow = redis_rig(&server, limits, "", OnError::Allow);
        let deny = redis_rig(&server, limits, "", OnError::Deny);
        assert_eq!(allow.status(ask("a@b.io")).await, 200);
        assert_eq!(allow.status(ask("a@b.io")).await, 429);
        // Ready once the first probe finds Redis serving.
        for _ in 0..100 {
            if deny.handle.store_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(deny.handle.store_ready());

        server.stop();
        // allow: served unlimited, errors counted. deny: 503 with the JSON body.
        assert_eq!(allow.status(ask("b@b.io")).await, 200);
        assert_eq!(allow.status(ask("b@b.io")).await, 200);
        assert!(allow.handle.store_errors() >= 2);
        let refused = deny.send(ask("c@b.io")).await;
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, r#"{"errors":{"base":["Rate limiter unavailable"]}}"#);
        // The failed request has the probe run at once; its verdict is what readiness says.
        let mut ready = true;
        for _ in 0..150 {
            ready = deny.handle.store_ready();
            if !ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!ready, "the probe found Redis gone");
        assert!(
            allow.handle.store_ready(),
            "allow keeps serving, so it stays ready"
        );

        // Back on the same port, empty: limits apply again without a new guard.
        let _server = RedisServer::start_on(port);
        let mut statuses = Vec::new();
        for _ in 0..200 {
            let status = deny.status(ask("d@b.io")).await;
            if status != 503 {
                statuses.push(status);
            }
            if statuses.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            statuses,
            [200, 429],
            "limits apply again once Redis is back"
        );
        // Ready again once the probe (every second) has found it back.
        let mut ready = false;
        for _ in 0..150 {
            ready = deny.handle.store_ready();
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ready, "the probe found Redis back");
    }

    #[tokio::test]
    async fn a_stalled_redis_costs_at_most_the_timeout() {
        // A listener that accepts and never answers: the worst kind of Redis outage.
        let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let store = StoreSettings {
            redis: Some(RedisSettings {
                username: None,
                password: None,
                sentinel_auth: None,
                ca_pem: None,
                client_certificate: None,
                url: format!("redis://{}", stalled.local_addr().unwrap()),
                key_prefix: "stalled".into(),
                timeout: Duration::from_millis(100),
                on_error: OnError::Deny,
                global_keys: 1,
            }),
            ..StoreSettings::default()
        };
        let rig = rig_in(
            "  per_email: [{ requests: 1, per: 1h }]\n",
            "",
            store,
            ManualClock::new(),
        );
        let started = std::time::Instant::now();
        assert_eq!(rig.status(ask("a@b.io")).await, 503);
        // Generous bound: this asserts "does not hang", not a speed.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn denials_are_cached_locally_until_their_reset() {
        let server = RedisServer::start();
        let rig = redis_rig(
            &server,
            "  per_ip: [{ requests: 1, per: 1h }]\n",
            "",
            OnError::Deny,
        );
        assert_eq!(rig.status(ask("a@b.io")).await, 200);
        assert_eq!(rig.status(ask("a@b.io")).await, 429);
        let before = server.script_calls();
        for _ in 0..20 {
            let response = rig.send(ask("a@b.io")).await;
            assert_eq!(response.status(), 429);
            assert!(header(&response, "retry-after").is_some());
        }
        assert_eq!(
            server.script_calls(),
            before,
            "a flood against a denied IP does not reach Redis"
        );
    }
}

#[cfg(feature = "redis")]
mod redis_cluster;
