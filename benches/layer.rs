//! The guard's per-request cost and the limiter's memory per key.
//!
//! `cargo bench -p reset-guard --bench layer` runs the timings and then prints the
//! resident memory per tracked email key after inserting 1,000,000 distinct addresses.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{criterion_group, BatchSize, Criterion};
use http::{Request, Response};
use http_body_util::{Empty, Full};
use reset_guard::internals::{Email, EmailPolicy};
use reset_guard::{ApiKey, GuardConfig, LimitGroup, PeerAddr, ResetGuardLayer, StoreSettings};
use tower::{service_fn, Service, ServiceBuilder};

/// SHA-256 of "foo".
const FOO: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

fn layer(limits: &str, max_keys: usize) -> ResetGuardLayer {
    let yaml = format!("clients: [{{ id: app, token_sha256: {FOO} }}]\nlimits:\n{limits}");
    let settings = GuardConfig::from_yaml(&yaml).unwrap().validate().unwrap();
    let mut store = StoreSettings::default();
    store.max_keys = max_keys;
    ResetGuardLayer::builder(settings, ApiKey::new("server-key").unwrap())
        .store(store)
        .key_secret(b"bench secret, sixteen+")
        .build()
        .unwrap()
        .0
}

fn request(email: &str, peer: SocketAddr) -> Request<Empty<Bytes>> {
    let mut request = Request::get(format!("/users/password/reset.json?email={email}"))
        .header("qb-token", "foo")
        .header("user-agent", "bench/1.0")
        .body(Empty::new())
        .unwrap();
    request.extensions_mut().insert(PeerAddr(peer));
    request
}

/// Every group active, limits far above what the bench sends: the allow path.
const GENEROUS: &str = "  per_ip: [{ requests: 1000000000, per: 1s }]\n  per_client: [{ requests: 1000000000, per: 1s }]\n  per_email: [{ requests: 1000000000, per: 1h }, { requests: 1000000000, per: 24h }]\n  global: [{ requests: 1000000000, per: 1s }]\n";

/// Polls a future that the guard completes without waiting (no upstream, no latency
/// floor): measures the layer, not an executor.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the guard waited on something"),
    }
}

/// The inner service every guard here wraps: an empty 200 at once.
async fn answer_at_once(_req: Request<Empty<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::new())))
}

/// Times `service` on requests `make` builds fresh for each call (outside the timing).
fn time_calls<S, B>(
    c: &mut Criterion,
    name: &str,
    service: &mut S,
    mut make: impl FnMut() -> Request<Empty<Bytes>>,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    c.bench_function(name, |b| {
        b.iter_batched(
            &mut make,
            |req| black_box(ready(service.call(req)).unwrap()),
            BatchSize::SmallInput,
        )
    });
}

fn bench_layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let inner = service_fn(answer_at_once);
    let peer: SocketAddr = "198.51.100.7:50000".parse().unwrap();
    let emails: Vec<String> = (0..1024)
        .map(|i| format!("user{i}%40example.com"))
        .collect();

    let mut allow = ServiceBuilder::new()
        .layer(layer(GENEROUS, 1_000_000))
        .service(inner);
    let mut i = 0usize;
    time_calls(
        c,
        "layer/allow (all four groups, 5 quotas)",
        &mut allow,
        || {
            i = (i + 1) % emails.len();
            request(&emails[i], peer)
        },
    );

    let mut deny = ServiceBuilder::new()
        .layer(layer("  per_ip: [{ requests: 1, per: 24h }]\n", 1_000_000))
        .service(inner);
    time_calls(c, "layer/deny (per-IP 429)", &mut deny, || {
        request("a%40example.com", peer)
    });

    // Every rejection path of the guard's steps (ARCHITECTURE.md, "The request's path"),
    // each refused at its own step.
    let mut guard = ServiceBuilder::new()
        .layer(layer(GENEROUS, 1_000_000))
        .service(inner);
    let rejections: [(&str, MakeRequest); 6] = [
        ("layer/reject 404 (unknown path)", |peer| {
            with_peer(Request::get("/users.json"), peer)
        }),
        ("layer/reject 405 (POST)", |peer| {
            with_peer(
                Request::post("/users/password/reset.json?email=a%40b.io"),
                peer,
            )
        }),
        ("layer/reject 400 (both credentials)", |peer| {
            with_peer(
                Request::get("/users/password/reset.json?email=a%40b.io")
                    .header("qb-token", "foo")
                    .header("authorization", "ApiKey foo"),
                peer,
            )
        }),
        ("layer/reject 401 (unknown token)", |peer| {
            with_peer(
                Request::get("/users/password/reset.json?email=a%40b.io").header("qb-token", "bar"),
                peer,
            )
        }),
        ("layer/reject 422 (invalid email)", |peer| {
            request("not-an-address", peer)
        }),
        ("layer/reject 422 (missing email)", |peer| {
            with_peer(
                Request::get("/users/password/reset.json").header("qb-token", "foo"),
                peer,
            )
        }),
    ];
    for (name, make) in rejections {
        time_calls(c, name, &mut guard, || make(peer));
    }

    // The per-email limiter with one hot key, and with 1,000,000 keys held.
    let one_quota = "  per_ip: []\n  per_client: []\n  global: []\n  per_email: [{ requests: 1000000000, per: 1s }]\n";
    let mut hot = ServiceBuilder::new()
        .layer(layer(one_quota, 2_000_000))
        .service(inner);
    time_calls(c, "limiter/1 key", &mut hot, || {
        request("same%40example.com", peer)
    });
    let mut full = ServiceBuilder::new()
        .layer(layer(one_quota, 2_000_000))
        .service(inner);
    // A million keys when benchmarking; a thousand when the suite runs this once as a test.
    let keys = if benchmarking() { 1_000_000 } else { 1_000 };
    let million: Vec<String> = (0..keys).map(|i| format!("u{i}%40example.com")).collect();
    for email in &million {
        ready(full.call(request(email, peer))).unwrap();
    }
    let mut i = 0usize;
    time_calls(c, "limiter/1,000,000 keys", &mut full, || {
        i = (i + 7919) % million.len();
        request(&million[i], peer)
    });
}

/// Builds one request from the peer address.
type MakeRequest = fn(SocketAddr) -> Request<Empty<Bytes>>;

/// Whether this run measures (`cargo bench`) rather than smoke-tests (`cargo test`).
fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn with_peer(builder: http::request::Builder, peer: SocketAddr) -> Request<Empty<Bytes>> {
    let mut request = builder.body(Empty::new()).unwrap();
    request.extensions_mut().insert(PeerAddr(peer));
    request
}

fn bench_email(c: &mut Criterion) {
    let policy = EmailPolicy::default();
    for (name, address) in [
        ("email/parse ascii", "Bob.Smith+news@Example.com"),
        ("email/parse idn", "anna@bücher.example"),
        ("email/parse invalid", "bob..smith@example.com"),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| black_box(Email::parse(black_box(address), policy)))
        });
    }
}

/// What an embedding service pays for a per-IP limit: this layer next to tower_governor's
/// `GovernorLayer`, same quota, same inner service. On the deny path both do exactly a
/// per-IP check and a 429; on the allow path this layer also runs its credential and
/// email checks, which governor does not have.
fn bench_against_governor(c: &mut Criterion) {
    use axum::extract::ConnectInfo;
    use tower_governor::governor::GovernorConfigBuilder;
    use tower_governor::GovernorLayer;

    let peer: SocketAddr = "198.51.100.7:50000".parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let axum_inner = service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(axum::body::Body::empty()))
    });
    for (label, per_ns, burst, quota) in [
        ("allow", 1u64, u32::MAX, "1000000000, per: 1s"),
        ("deny", 86_400_000_000_000, 1, "1, per: 24h"),
    ] {
        let config = GovernorConfigBuilder::default()
            .per_nanosecond(per_ns)
            .burst_size(burst)
            .finish()
            .unwrap();
        let mut governed = ServiceBuilder::new()
            .layer(GovernorLayer::new(config))
            .service(axum_inner);
        let governor_request = || {
            let mut req = request("a%40example.com", peer);
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        };
        ready(governed.call(governor_request())).unwrap();
        time_calls(
            c,
            &format!("per-ip/{label}/tower_governor"),
            &mut governed,
            governor_request,
        );

        let limits = format!(
            "  per_ip: [{{ requests: {quota} }}]\n  per_client: []\n  per_email: []\n  global: []\n"
        );
        let mut guarded = ServiceBuilder::new()
            .layer(layer(&limits, 1_000_000))
            .service(service_fn(answer_at_once));
        ready(guarded.call(request("a%40example.com", peer))).unwrap();
        time_calls(
            c,
            &format!("per-ip/{label}/reset-guard"),
            &mut guarded,
            || request("a%40example.com", peer),
        );
    }
}

/// Resident set size of this process, from /proc.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

const MEMORY_CHILD: &str = "RESET_GUARD_BENCH_MEMORY";

/// Per-email limit sections measured for memory per key.
const MEMORY_CASES: [(&str, &str); 2] = [
    ("one per-email quota", "  per_ip: []\n  per_client: []\n  global: []\n  per_email: [{ requests: 3, per: 1h }]\n"),
    (
        "two per-email quotas (the default)",
        "  per_ip: []\n  per_client: []\n  global: []\n  per_email: [{ requests: 3, per: 1h }, { requests: 10, per: 24h }]\n",
    ),
];

/// In a fresh child process (so nothing else has touched the heap), inserts 1,000,000
/// distinct addresses through the layer and prints the resident memory they added.
fn memory_per_key(case: usize) {
    const KEYS: usize = 1_000_000;
    let (label, limits) = MEMORY_CASES[case];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let inner = service_fn(answer_at_once);
    let guard = layer(limits, 2_000_000);
    let handle = guard.handle();
    let mut service = ServiceBuilder::new().layer(guard).service(inner);
    let peer: SocketAddr = "198.51.100.7:50000".parse().unwrap();
    // Warm up allocator and runtime before the baseline.
    for i in 0..1000 {
        ready(service.call(request(&format!("warm{i}%40example.org"), peer))).unwrap();
    }
    let before = rss_bytes().unwrap_or(0);
    for i in 0..KEYS {
        ready(service.call(request(&format!("u{i}%40example.com"), peer))).unwrap();
    }
    let after = rss_bytes().unwrap_or(0);
    let held = handle
        .tracked_keys(LimitGroup::PerEmail)
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        - 1000;
    let added = after.saturating_sub(before);
    println!(
        "memory/{label}: {held} keys, RSS +{:.1} MiB, {:.1} bytes per key",
        added as f64 / (1024.0 * 1024.0),
        added as f64 / held.max(1) as f64
    );
}

criterion_group!(benches, bench_layer, bench_email, bench_against_governor);

fn main() {
    if let Ok(case) = std::env::var(MEMORY_CHILD) {
        memory_per_key(case.parse().expect("case index"));
        return;
    }
    benches();
    // The memory figures take a few seconds: only when benchmarking, not in `cargo test`.
    if benchmarking() {
        let exe = std::env::current_exe().expect("own path");
        for case in 0..MEMORY_CASES.len() {
            let status = std::process::Command::new(&exe)
                .env(MEMORY_CHILD, case.to_string())
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "memory measurement failed"
            );
        }
    }
    Criterion::default().configure_from_args().final_summary();
}
