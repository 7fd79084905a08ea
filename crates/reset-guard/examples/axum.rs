//! Embedding the guard in an axum service.
//!
//! The guard answers every rejection itself; the handler behind it only sees checked
//! requests, already carrying the server key. Run with
//! `QB_API_KEY=… cargo run -p reset-guard --example axum`, then
//! `curl -H 'QB-Token: foo' 'http://127.0.0.1:3000/users/password/reset.json?email=a%40b.io'`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use reset_guard::{ApiKey, GuardConfig, GuardedRequest, PeerAddr, ResetGuardLayer};

/// The `guard:` section, as in the gateway's YAML. The token is "foo".
const GUARD_YAML: &str = "
clients:
  - id: example-app
    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
other_routes: forward
# This handler writes its own answer; uniform answers would replace every 200 with a bare one.
responses:
  uniform: false
";

/// The app: the reset route guarded, everything else left to the app's own routes.
fn app(api_key: ApiKey) -> Router {
    let settings = GuardConfig::from_yaml(GUARD_YAML)
        .and_then(|config| config.validate())
        .expect("the example configuration is valid");
    Router::new()
        .route("/users/password/reset.json", get(reset))
        .route("/health", get(|| async { "ok" }))
        // The guard runs first for every request…
        .layer(ResetGuardLayer::new(settings, api_key))
        // …after the peer address is copied where the guard looks for it.
        .layer(middleware::from_fn(peer_addr))
}

/// Copies axum's connection info into the extension the guard reads.
async fn peer_addr(mut request: Request, next: Next) -> impl IntoResponse {
    if let Some(ConnectInfo(addr)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    {
        request.extensions_mut().insert(PeerAddr(addr));
    }
    next.run(request).await
}

/// Only checked requests get here. A real service would call QuickBlox now.
async fn reset(Extension(guarded): Extension<GuardedRequest>) -> impl IntoResponse {
    format!(
        "reset requested by {} for a valid address\n",
        guarded.client_id()
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = ApiKey::new(std::env::var("QB_API_KEY").unwrap_or_else(|_| "example-key".into()))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app(key).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(uri: &str, token: Option<&str>) -> (StatusCode, String) {
        let mut request = http::Request::get(uri);
        if let Some(token) = token {
            request = request.header("qb-token", token);
        }
        let response = app(ApiKey::new("k").unwrap())
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn guarded_route_sees_only_checked_requests() {
        let (status, body) = call("/users/password/reset.json?email=a%40b.io", Some("foo")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "reset requested by example-app for a valid address\n");
        let (status, _) = call("/users/password/reset.json?email=a%40b.io", Some("bar")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, body) = call("/users/password/reset.json?email=nope", Some("foo")).await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"errors":{"email":["is invalid"]}}"#
            )
        );
    }

    #[tokio::test]
    async fn other_routes_stay_the_apps() {
        assert_eq!(
            call("/health", None).await,
            (StatusCode::OK, "ok".to_owned())
        );
    }
}
