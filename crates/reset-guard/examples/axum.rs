//! Embedding the guard in an axum service whose other routes stay its own.
//!
//! The guard answers every rejection on the reset path itself; the handler there only
//! sees checked requests, already carrying the server key. Run with
//! `QB_API_KEY=… cargo run -p reset-guard --example axum`, then
//! `curl -H 'QB-Token: foo' 'http://127.0.0.1:3000/users/password/reset.json?email=a%40b.io'`.
//! `tests/embedding.rs` serves this app on a loopback port and checks what it answers.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Router};
use reset_guard::{ApiKey, GuardSettings, GuardedRequest, PeerAddr, ResetGuardLayer};
use tokio::net::TcpListener;

/// The `guard:` section, as in the gateway's YAML. The token is "foo", a stand-in anyone can
/// read: give each real app a random token (`openssl rand -hex 24`) and put its digest here.
const GUARD_YAML: &str = "
clients:
  - id: example-app
    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
# The default, reject, answers 404 to every path but the reset one: the app's routes would vanish.
other_routes: forward
# The default, true, turns this handler's 200, 401 and 404 into one bare, empty 200.
responses:
  uniform: false
# Counted per client address: the app hands the guard each connection's peer address.
limits:
  per_ip: [{ requests: 20, per: 1m }]
";

/// The app's routes, with the guard in front of the reset route.
pub fn app(api_key: ApiKey) -> Router {
    let settings =
        GuardSettings::from_yaml(GUARD_YAML).expect("the example configuration is valid");
    Router::new()
        .route("/users/password/reset.json", get(reset))
        .route("/health", get(|| async { "ok" }))
        .route("/notes", post(add_note))
        // The layer added last runs first: the peer address is copied in, then the guard runs.
        .layer(ResetGuardLayer::new(settings, api_key))
        .layer(middleware::map_request(peer_addr))
}

/// Copies axum's connection info into the extension the guard reads. Without it the
/// guard answers 500 on its path rather than count every client in one per-IP bucket.
async fn peer_addr(mut request: Request) -> Request {
    if let Some(&ConnectInfo(addr)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        request.extensions_mut().insert(PeerAddr(addr));
    }
    request
}

/// Serves the app with each connection's peer address (`axum::serve(listener, app)` alone
/// gives none).
pub async fn serve(listener: TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// Only checked requests get here. A real service would call QuickBlox now.
async fn reset(Extension(guarded): Extension<GuardedRequest>) -> impl IntoResponse {
    format!(
        "reset requested by {} for a valid address\n",
        guarded.client_id()
    )
}

/// One of the app's own routes, which the guard leaves alone.
async fn add_note(note: String) -> String {
    format!("noted {} bytes\n", note.len())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = ApiKey::new(std::env::var("QB_API_KEY").unwrap_or_else(|_| "example-key".into()))?;
    let listener = TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    serve(listener, app(key)).await?;
    Ok(())
}
