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
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Empty, Full};
//! use reset_guard::{ApiKey, GuardConfig, GuardedRequest, ResetGuardLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `guard:` section of the gateway's YAML; the token's SHA-256 is from `reset-gateway hash-token`.
//! let config = GuardConfig::from_yaml(
//!     "clients:\n  - id: ios-app\n    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n",
//! )?;
//! let layer = ResetGuardLayer::new(config.validate()?, ApiKey::new("server-api-key")?);
//!
//! let upstream = service_fn(|request: Request<Empty<Bytes>>| async move {
//!     // The client token is gone; the server key is in its place.
//!     assert_eq!(request.headers()["authorization"], "ApiKey server-api-key");
//!     assert!(request.headers().get("qb-token").is_none());
//!     let guarded = request.extensions().get::<GuardedRequest>().unwrap();
//!     assert_eq!(guarded.email().as_str(), "bob@example.com");
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
//! });
//! let service = ServiceBuilder::new().layer(layer).service(upstream);
//!
//! let request = Request::get("/users/password/reset.json?email=bob%40example.com")
//!     .header("QB-Token", "foo")
//!     .body(Empty::new())?;
//! let response = service.clone().oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! let request = Request::get("/users/password/reset.json?email=not-an-address")
//!     .header("QB-Token", "foo")
//!     .body(Empty::new())?;
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(body, r#"{"errors":{"email":["is invalid"]}}"#);
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
pub mod duration;
mod email;
mod future;
mod layer;
pub mod limit;
mod query;
mod rejection;
mod secret;
mod service;

pub use auth::{presented_token, ClientId, ClientRegistry, TokenDigest, QB_TOKEN};
pub use body::GuardBody;
pub use client_ip::{ClientIp, PeerAddr};
pub use config::{
    from_yaml, Cidr, ClientConfig, ClientIpConfig, ConfigError, EmailConfig, GuardConfig,
    GuardSettings, OtherRoutes, ResponsesConfig, DEFAULT_PATH,
};
pub use context::{GuardedRequest, UpstreamStatus};
pub use email::{Email, EmailError, EmailKey, EmailKeyPolicy, EmailPolicy};
pub use future::ResponseFuture;
pub use layer::{GuardHandle, ResetGuardBuilder, ResetGuardLayer, StoreError};
pub use limit::{
    Clock, Denial, LimitCounters, LimitGroup, LimitSettings, LimitsConfig, ManualClock,
    MonotonicClock, Quota, QuotaConfig, Standing, StoreSettings,
};
#[cfg(feature = "redis")]
pub use limit::{OnError, RedisSettings};
pub use query::{email_param, encode_query_value};
pub use rejection::{rate_limit_fields, uniform_success, Rejection, RATELIMIT, RATELIMIT_POLICY};
pub use secret::{ApiKey, InvalidApiKey};
pub use service::ResetGuard;

#[cfg(test)]
mod tests;
