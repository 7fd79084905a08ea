//! The whole layer on arbitrary requests: never panics, never forwards a request without
//! the server key, and answers everything else as one of the guard's steps says (ARCHITECTURE.md,
//! "The request's path").
#![no_main]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use libfuzzer_sys::fuzz_target;
use reset_guard::{ApiKey, GuardConfig, GuardedRequest, PeerAddr, ResetGuardLayer};
use tower::{service_fn, Service, ServiceBuilder};

/// SHA-256 of "foo".
const CONFIG: &str = "clients: [{ id: app, token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae }]
limits: { per_ip: [{ requests: 1000, per: 1s }], per_email: [{ requests: 3, per: 1h }] }
responses: { uniform: false }";

fn layer() -> &'static ResetGuardLayer {
    static LAYER: OnceLock<ResetGuardLayer> = OnceLock::new();
    LAYER.get_or_init(|| {
        let settings = GuardConfig::from_yaml(CONFIG).unwrap().validate().unwrap();
        ResetGuardLayer::new(settings, ApiKey::new("server-key").unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    // method \0 target \0 name:value\n…
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(mut builder) =
        std::str::from_utf8(target).map(|t| Request::builder().method(method).uri(t))
    else {
        return;
    };
    for line in parts.next().unwrap_or_default().split(|&b| b == b'\n') {
        if let Some(i) = line.iter().position(|&b| b == b':') {
            builder = builder.header(&line[..i], &line[i + 1..]);
        }
    }
    let Ok(mut request) = builder.body(Empty::<Bytes>::new()) else {
        return;
    };
    request
        .extensions_mut()
        .insert(PeerAddr(SocketAddr::from(([192, 0, 2, 1], 4000))));

    let inner = service_fn(|request: Request<Empty<Bytes>>| async move {
        if request.extensions().get::<GuardedRequest>().is_some() {
            assert_eq!(request.headers()["authorization"], "ApiKey server-key");
            assert!(request.headers().get("qb-token").is_none());
        }
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let mut service = ServiceBuilder::new().layer(layer().clone()).service(inner);
    let mut future = pin!(service.call(request));
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(Ok(response)) => {
            let status = response.status().as_u16();
            assert!(
                [200, 400, 401, 404, 405, 422, 429].contains(&status),
                "{status}"
            );
        }
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => panic!("the memory store never waits"),
    }
});
