//! A tower [`Layer`](tower::Layer) that guards the QuickBlox password-reset endpoint,
//! `GET /users/password/reset.json?email=…`.
//!
//! For each request on the guarded path it checks, cheapest first: the method and the
//! absence of a body, exactly one credential header (`QB-Token` or `Authorization: ApiKey`)
//! carrying a known client token, and exactly one valid `email`. It answers every
//! rejection itself with QuickBlox's JSON error envelope, replaces the client's token with
//! the server-held API key, and leaves a [`GuardedRequest`] in the request extensions for
//! the service that forwards upstream. Under `responses.uniform` the upstream's 401 and
//! 404 become the same bare 200 as a success, so a caller cannot learn whether an account
//! exists.
//!
//! ```
//! use std::net::SocketAddr;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Empty, Full};
//! use reset_guard::{ApiKey, GuardSettings, GuardedRequest, PeerAddr, ResetGuardLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `guard:` section of the gateway's YAML, read and checked at once so that an error names
//! // its line; the token's SHA-256 is `TokenDigest::of(token)` (or `reset-gateway hash-token`).
//! let settings = GuardSettings::from_yaml(
//!     "clients:\n  - id: ios-app\n    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n",
//! )?;
//! let layer = ResetGuardLayer::new(settings, ApiKey::new("server-api-key")?);
//!
//! let upstream = service_fn(|request: Request<Empty<Bytes>>| async move {
//!     // The client token is gone; the server key is in its place.
//!     assert_eq!(request.headers()["authorization"], "ApiKey server-api-key");
//!     assert!(request.headers().get("qb-token").is_none());
//!     let guarded = request.extensions().get::<GuardedRequest>().unwrap();
//!     assert_eq!(guarded.email(), "bob@example.com");
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
//! });
//! let service = ServiceBuilder::new().layer(layer).service(upstream);
//!
//! // The server puts each connection's peer address where the guard reads it.
//! let peer = PeerAddr(SocketAddr::from(([203, 0, 113, 7], 50123)));
//! let request = Request::get("/users/password/reset.json?email=bob%40example.com")
//!     .header("QB-Token", "foo")
//!     .extension(peer)
//!     .body(Empty::new())?;
//! let response = service.clone().oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! let request = Request::get("/users/password/reset.json?email=not-an-address")
//!     .header("QB-Token", "foo")
//!     .extension(peer)
//!     .body(Empty::new())?;
//! let response = service.clone().oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(body, r#"{"errors":{"email":["is invalid"]}}"#);
//!
//! // Without a peer address the guard cannot tell clients apart: it refuses to guess.
//! let request = Request::get("/users/password/reset.json?email=bob%40example.com")
//!     .header("QB-Token", "foo")
//!     .body(Empty::new())?;
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
//! # Ok(())
//! # }
//! ```
//!
//! # What the guard changes in the host app
//!
//! Layered over a whole app, the guard sees every request first. These settings decide
//! what the app's own routes answer:
//!
//! - `other_routes`: the default, [`Reject`](OtherRoutes::Reject), answers 404 to every
//!   path but the guarded one, so the app's other routes vanish. Embedded, set `forward`:
//!   other paths reach the app untouched, except spellings of the guarded path
//!   (`/users/password/reset%2Ejson`, a trailing slash), which stay 404.
//! - `path` (by default `/users/password/reset.json`; written as it travels, ASCII with
//!   `%XX` escapes): the guard owns it, comparing it with the path the layer sees (under
//!   axum's `Router::nest`, without the prefix). It answers 405 to anything but GET there,
//!   a CORS preflight included (the guard has no CORS: put a CORS layer outside it), 400 to
//!   a body, and 401, 422 and 429 itself. Over HTTP/2 an empty body is told by
//!   `Content-Length: 0` or by its stream's end, which a body wrapper outside the guard can
//!   hide (tower-http's `RequestBodyTimeoutLayer`): such wrappers go inside it, or every
//!   HTTP/2 reset without that header is a 400. The handler only sees checked
//!   requests, whose `QB-Token` is replaced by `Authorization: ApiKey <server key>`.
//! - `responses.uniform`: the default, `true`, turns the handler's 200, 401 and 404 into
//!   one bare 200 with an empty body and none of its headers, and answers an address over
//!   its per-email limit with the same 200 without calling the handler. Set `false` when
//!   the handler's own answer should reach the client.
//! - `responses.min_latency`: answers on the guarded path that passed the email check take
//!   at least this long (at most 10 s).
//! - `limits.per_ip` and `client_ip.trusted_proxies` need the TCP peer (next section).
//! - `limits.response_headers`: adds `RateLimit-Policy` and `RateLimit` to the handler's
//!   answers.
//!
//! # The peer address
//!
//! The guard reads the client's address from a [`PeerAddr`] request extension, which a
//! layer outside the guard inserts from the connection. A request on the guarded path
//! without one is answered 500, and the first is logged with `tracing::error!` saying what
//! to do: counting such requests in one shared per-IP bucket would let any client spend it
//! for every other. The peer arrives with each request, so this cannot be caught when the
//! layer is built. [`ResetGuardBuilder::without_peer_address`] opts into the shared bucket
//! instead, for hosts that have no peer address or limit per client in front.
//!
//! What the guard makes of the peer (the peer itself, or the client behind it when it is one
//! of `client_ip.trusted_proxies`) is left as a [`ClientIp`] in the extensions of each
//! request it passes on under `other_routes: forward` and of each answer it gives before its
//! limits apply, for the rest of the stack's logs and forwarding headers.
//!
//! # Changing settings at run time
//!
//! [`ResetGuardLayer::handle`] gives a [`GuardHandle`]: new settings apply to every service
//! built from the layer from the next request on, each quota that did not change keeping
//! its state and a changed one carrying over what each key spent (as the gateway's reload
//! does). [`GuardHandle::update`] also swaps the API key.
//!
//! ```
//! use reset_guard::{ApiKey, GuardSettings, ResetGuardLayer};
//!
//! let clients = "clients: [{ id: app, token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae }]\n";
//! let settings = GuardSettings::from_yaml(clients)?;
//! let layer = ResetGuardLayer::new(settings, ApiKey::new("server-key")?);
//! let handle = layer.handle();
//! // Later, say from a file watcher: a tighter per-email limit.
//! let tighter = format!("{clients}limits: {{ per_email: [{{ requests: 1, per: 1h }}] }}\n");
//! handle.update_settings(GuardSettings::from_yaml(&tighter)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The `redis` feature
//!
//! Limits shared through Redis ([`ResetGuardLayer::builder`] with
//! `StoreSettings::with_redis`) need the `redis` feature. The inner service must be
//! `Clone + Send + 'static` and its future and bodies `Send` (with Redis a decision is
//! awaited before the service is called), with the feature or without, so that a crate
//! turning it on anywhere in a build breaks nothing that compiled before. With Redis, `build()`
//! needs a [`key_secret`](ResetGuardBuilder::key_secret) (the same on every replica), must
//! run inside a Tokio runtime, and for `rediss://` the process must have a rustls crypto
//! provider installed (`rustls::crypto::ring::default_provider().install_default()`, or
//! another): the Redis client takes the process's; `build()` says so rather than each
//! connection panicking. `RedisSettings::sentinel` and `RedisSettings::cluster` make the
//! settings for those modes.
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn wire(settings: reset_guard::GuardSettings, api_key: reset_guard::ApiKey)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use reset_guard::{OnError, RedisSettings, ResetGuardLayer, StoreSettings};
//!
//! let redis = RedisSettings::new("redis://redis.internal:6379")
//!     .with_password(std::env::var("REDIS_PASSWORD")?)
//!     .with_timeout(Duration::from_millis(100))
//!     .with_on_error(OnError::Deny);
//! let (layer, housekeeping) = ResetGuardLayer::builder(settings, api_key)
//!     .store(StoreSettings::default().with_redis(redis))
//!     .key_secret(std::env::var("LIMIT_KEY_SECRET")?.as_bytes())
//!     .build()?;
//! tokio::spawn(housekeeping);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # Embedding in axum
//!
//! Serve with `into_make_service_with_connect_info::<SocketAddr>()` and copy axum's
//! `ConnectInfo` into [`PeerAddr`] in a layer added after the guard (axum runs the last
//! layer added first). `examples/axum.rs` is a complete app, served on a loopback port by
//! `tests/embedding.rs`:
//!
//! ```no_run
//! use std::net::SocketAddr;
//!
//! use axum::extract::{ConnectInfo, Request};
//! use axum::{middleware, routing::get, Router};
//! use reset_guard::{ApiKey, GuardSettings, PeerAddr, ResetGuardLayer};
//!
//! async fn peer_addr(mut request: Request) -> Request {
//!     if let Some(&ConnectInfo(addr)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
//!         request.extensions_mut().insert(PeerAddr(addr));
//!     }
//!     request
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = GuardSettings::from_yaml(
//!     "clients:\n  - id: ios-app\n    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n\
//!      other_routes: forward\nresponses:\n  uniform: false\n",
//! )?;
//! let app = Router::new()
//!     .route("/users/password/reset.json", get(|| async { "reset requested" }))
//!     .route("/health", get(|| async { "ok" }))
//!     .layer(ResetGuardLayer::new(settings, ApiKey::new("server-api-key")?))
//!     .layer(middleware::map_request(peer_addr));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod auth;
mod body;
mod check;
mod client_ip;
mod config;
mod context;
mod duration;
mod email;
mod future;
mod handle;
mod layer;
mod limit;
mod query;
mod rejection;
mod replay;
mod secret;
mod service;
mod state;

pub use auth::{InvalidDigest, TokenDigest};
pub use body::GuardBody;
pub use client_ip::{ClientIp, PeerAddr};
pub use config::{
    Cidr, ClientConfig, ClientIpConfig, ConfigError, EmailConfig, EmailKeyConfig, GuardConfig,
    GuardSettings, InvalidCidr, LimitsConfig, OtherRoutes, QuotaConfig, ResponsesConfig,
};
pub use context::{Attribution, GuardedRequest, UpstreamStatus};
pub use duration::ConfigDuration;
pub use email::EmailError;
pub use future::ResponseFuture;
pub use handle::GuardHandle;
/// The network type of `client_ip.trusted_proxies` ([`Cidr`] wraps it), re-exported so
/// [`ClientIp::resolve`] can be called without depending on `ipnet` yourself.
pub use ipnet::IpNet;
pub use layer::{Housekeeping, ResetGuardBuilder, ResetGuardLayer, StoreError};
pub use limit::{Denial, LimitGroup, Quota, StoreSettings};
#[cfg(feature = "redis")]
pub use limit::{InvalidRedisSettings, OnError, RedisSettings, MAX_GLOBAL_KEYS};
pub use rejection::Rejection;
pub use secret::{ApiKey, InvalidApiKey};
pub use service::ResetGuard;

/// Not part of the API: the parts the project's own fuzz targets and benchmarks drive
/// directly, and what the gateway's access log and `simulate` command need. They may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::auth::presented_token;
    pub use crate::email::{Email, EmailKey, EmailKeyPolicy, EmailPolicy};
    pub use crate::limit::PassThroughHasher;
    pub use crate::limit::{near_limit, QuotaOutcome};
    pub use crate::query::{email_param, encode_query_value};
    pub use crate::replay::{Charge, Recorded, Replay};
}
