//! The layer's building and background work, which need the limiter's injected clock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use tower::{service_fn, ServiceBuilder, ServiceExt};

use crate::limit::ManualClock;
use crate::*;

fn settings(extra: &str) -> GuardSettings {
    let digest = TokenDigest::of(b"foo").to_hex();
    GuardConfig::from_yaml(&format!(
        "clients: [{{ id: app, token_sha256: {digest} }}]\n{extra}"
    ))
    .unwrap()
    .validate()
    .unwrap()
}

fn reset(query: &str) -> http::request::Builder {
    Request::get(format!("/users/password/reset.json?{query}"))
        .extension(PeerAddr(SocketAddr::from(([192, 0, 2, 1], 40000))))
}

#[test]
fn building_needs_no_runtime_and_starts_nothing() {
    // Outside any runtime there is nothing to spawn on, and building must not try.
    let (layer, housekeeping) =
        ResetGuardLayer::builder(settings(""), ApiKey::new("server-key").unwrap())
            .build()
            .unwrap();
    drop(housekeeping);
    assert_eq!(layer.handle().tracked_keys(LimitGroup::PerIp), [0]);
}

#[tokio::test(start_paused = true)]
async fn spawned_housekeeping_forgets_idle_keys() {
    let clock = ManualClock::new();
    let (layer, housekeeping) = ResetGuardLayer::builder(
        settings("limits:\n  per_ip: [{ requests: 5, per: 1m }]\n"),
        ApiKey::new("server-key").unwrap(),
    )
    .clock(clock.clone())
    .build()
    .unwrap();
    let handle = layer.handle();
    let upstream = service_fn(|_: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let service = ServiceBuilder::new().layer(layer).service(upstream);
    let request = reset("email=a%40example.com")
        .header("qb-token", "foo")
        .body(Empty::new())
        .unwrap();
    service.oneshot(request).await.unwrap();
    assert_eq!(handle.tracked_keys(LimitGroup::PerIp), [1]);

    // Idle on the limiter's clock, but nothing sweeps until the housekeeping runs.
    clock.advance(Duration::from_secs(120));
    let sweep_interval = StoreSettings::default().sweep_interval;
    tokio::time::sleep(sweep_interval * 2).await;
    assert_eq!(handle.tracked_keys(LimitGroup::PerIp), [1]);

    tokio::spawn(housekeeping);
    for _ in 0..20 {
        tokio::time::sleep(sweep_interval).await;
        if handle.tracked_keys(LimitGroup::PerIp) == [0] {
            return;
        }
    }
    panic!("the idle key was never swept");
}

/// Housekeeping ends when the guard is dropped, not at its next sweep (virtual time: the
/// paused clock would jump to that sweep if the task waited for it). A handle keeps it.
#[tokio::test(start_paused = true)]
async fn housekeeping_ends_once_the_guard_and_its_handles_are_dropped() {
    let (layer, housekeeping) =
        ResetGuardLayer::builder(settings(""), ApiKey::new("server-key").unwrap())
            .build()
            .unwrap();
    let handle = layer.handle();
    let service =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|_: Request<Empty<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }));
    let mut task = tokio::spawn(housekeeping);
    drop(service);
    let sweep_interval = StoreSettings::default().sweep_interval;
    let held = tokio::time::timeout(sweep_interval * 5 / 2, &mut task).await;
    assert!(
        held.is_err(),
        "a handle keeps the guard and its housekeeping"
    );

    let dropped_at = tokio::time::Instant::now();
    drop(handle);
    task.await.unwrap();
    assert_eq!(dropped_at.elapsed(), Duration::ZERO);
}

#[test]
fn a_zero_sweep_interval_is_an_error_not_a_panic() {
    let store = StoreSettings {
        sweep_interval: Duration::ZERO,
        ..StoreSettings::default()
    };
    let error = ResetGuardLayer::builder(settings(""), ApiKey::new("server-key").unwrap())
        .store(store)
        .build()
        .expect_err("refused");
    assert!(error.to_string().contains("sweep_interval"), "{error}");
}

#[test]
fn a_short_key_secret_or_no_keys_at_all_is_refused() {
    let builder = || ResetGuardLayer::builder(settings(""), ApiKey::new("server-key").unwrap());
    for secret in [&b""[..], b"fifteen bytes.."] {
        let error = builder().key_secret(secret).build().expect_err("short");
        assert!(error.to_string().contains("at least 16 bytes"), "{error}");
    }
    let _built = builder().key_secret(b"sixteen bytes..!").build().unwrap();
    let error = builder()
        .store(StoreSettings::default().with_max_keys(0))
        .build()
        .expect_err("no keys");
    assert!(error.to_string().contains("max_keys"), "{error}");
}

/// Hashes of addresses under no secret can be reversed with a dictionary by anyone who
/// reads Redis: the library refuses to store them, as the gateway does.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_without_a_key_secret_is_refused() {
    let error = ResetGuardLayer::builder(settings(""), ApiKey::new("server-key").unwrap())
        .store(StoreSettings::default().with_redis(RedisSettings::new("redis://127.0.0.1:6379")))
        .build()
        .expect_err("no key secret");
    assert!(error.to_string().contains("key_secret()"), "{error}");
}

/// With Redis, a decision's connections run as tasks of the runtime that polls it, not of
/// the one (or none) the service is called in: called outside a runtime, it panicked ("no
/// reactor running"); called in a runtime nobody drives, its thread's queue to Redis was
/// that runtime's task, and every later request of the thread failed. Polled outside a
/// runtime (another executor), a request answers as `on_error` says.
#[cfg(feature = "redis")]
#[test]
fn a_redis_decision_runs_on_the_runtime_that_polls_it() {
    use std::future::Future;
    use tower::{Layer, Service};
    let server = test_support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layer = runtime.block_on(async {
        let redis = RedisSettings::new(server.url()).with_on_error(OnError::Deny);
        let (layer, _housekeeping) =
            ResetGuardLayer::builder(settings(""), ApiKey::new("server-key").unwrap())
                .store(StoreSettings::default().with_redis(redis))
                .key_secret(b"a key secret of 16+ bytes")
                .build()
                .unwrap();
        layer
    });
    let upstream = service_fn(|_: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let mut service = layer.layer(upstream);
    let request = |n: u32| {
        reset(&format!("email=user{n}%40example.com"))
            .header("qb-token", "foo")
            .body(Empty::new())
            .unwrap()
    };
    // Called on this thread, in no runtime; awaited in one.
    let answer = service.call(request(1));
    assert_eq!(runtime.block_on(answer).unwrap().status(), 200);
    // Called in a runtime nobody drives; awaited in the one that runs, as the next.
    let undriven = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = {
        let _inside = undriven.enter();
        service.call(request(2))
    };
    assert_eq!(runtime.block_on(answer).unwrap().status(), 200);
    let answer = service.call(request(3));
    assert_eq!(runtime.block_on(answer).unwrap().status(), 200);
    // Polled outside any runtime: on_error (deny) answers, at once.
    let mut answer = std::pin::pin!(service.call(request(4)));
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match answer.as_mut().poll(&mut context) {
        std::task::Poll::Ready(response) => assert_eq!(response.unwrap().status(), 503),
        std::task::Poll::Pending => panic!("a decision outside a runtime waits for nothing"),
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_settings_that_cannot_work_are_errors_not_panics() {
    let build = |settings: RedisSettings| {
        let store = StoreSettings {
            redis: Some(settings),
            ..StoreSettings::default()
        };
        ResetGuardLayer::builder(self::settings(""), ApiKey::new("server-key").unwrap())
            .store(store)
            .key_secret(b"a key secret of 16+ bytes")
            .build()
            .map(|_| ())
    };
    // Outside a runtime: an error saying so, not the client's panic.
    let error = build(RedisSettings::new("redis://127.0.0.1:6379")).expect_err("no runtime");
    assert!(error.to_string().contains("Tokio runtime"), "{error}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _inside = runtime.enter();
    let mut zero = RedisSettings::new("redis://127.0.0.1:6379");
    zero.timeout = Duration::ZERO;
    for (settings, why) in [
        (
            RedisSettings::new("redis://:s3cret@127.0.0.1:6379"),
            "password",
        ),
        (
            RedisSettings::new("redis://127.0.0.1:6379/?protocol=resp3"),
            "query",
        ),
        (
            RedisSettings::new("redis+sentinel://127.0.0.1:26379"),
            "no master",
        ),
        (zero, "timeout"),
    ] {
        let error = build(settings).expect_err(why);
        assert!(error.to_string().contains(why), "{error}");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }
    // rediss:// with no crypto provider for the process: an error saying what to install,
    // not a panic at every connection; with one, it builds.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let error = build(RedisSettings::new("rediss://127.0.0.1:6379")).expect_err("provider");
        assert!(error.to_string().contains("crypto provider"), "{error}");
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    build(RedisSettings::new("rediss://127.0.0.1:6379")).unwrap();
    let with_password = RedisSettings::new("redis://:s3cret@127.0.0.1:6379");
    assert!(!format!("{with_password:?}").contains("s3cret"));
    // A standard error: `?` takes it into any error type an application uses.
    let cluster = || -> Result<RedisSettings, Box<dyn std::error::Error + Send + Sync>> {
        Ok(RedisSettings::cluster(&[
            "redis://:s3cret@10.0.0.1:6379".to_owned()
        ])?)
    };
    let error = cluster().unwrap_err().to_string();
    assert!(error.starts_with("node 1 holds a password"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
}
