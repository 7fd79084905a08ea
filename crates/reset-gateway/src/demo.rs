//! `reset-gateway demo`: the gateway in front of an in-process QuickBlox stand-in, with
//! in-memory limits; needs no key, file, Redis or network.

use std::net::SocketAddr;

use anyhow::Context as _;
use qb_mock::{MockConfig, MockServer};
use reset_guard::{ApiKey, TokenDigest};

use crate::config::{GatewayConfig, Settings};

/// The client token the demo accepts.
pub const DEMO_CLIENT_TOKEN: &str = "demo-client-token";
/// The one registered address.
pub const DEMO_USER: &str = "alice@example.com";
/// The key the demo gateway holds and the stand-in expects.
const DEMO_API_KEY: &str = "demo-server-api-key";

/// Settings for a demo gateway on `listen` in front of `upstream_url`.
pub fn settings(listen: SocketAddr, upstream_url: &str) -> anyhow::Result<Settings> {
    let digest = TokenDigest::of(DEMO_CLIENT_TOKEN.as_bytes()).to_hex();
    let yaml = format!(
        "server:\n  listen: \"{listen}\"\n  shutdown_grace: 2s\n\
         upstream:\n  url: \"{upstream_url}\"\n  timeout: 2s\n\
         guard:\n  clients:\n    - id: demo-app\n      token_sha256: {digest}\n\
         log:\n  format: text\n\
         admin:\n  listen: 127.0.0.1:0\n"
    );
    let key = ApiKey::new(DEMO_API_KEY).expect("the demo key is valid");
    Ok(GatewayConfig::from_yaml(&yaml)?.validate_with_key(&yaml, key)?)
}

/// Starts the stand-in and the gateway, prints what to try, serves until `shutdown`.
pub async fn run(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mock = MockServer::start(MockConfig {
        api_key: DEMO_API_KEY.to_owned(),
        users: vec![DEMO_USER.to_owned()],
        ..MockConfig::default()
    })
    .await
    .context("starting the QuickBlox stand-in")?;
    let settings = settings(listen, &mock.url())?;
    crate::telemetry::init(&settings.log);
    let app = crate::build(settings).await.with_context(|| {
        format!("is another process on {listen}? try `demo --listen 127.0.0.1:8081`")
    })?;
    println!("{}", instructions(app.local_addr(), &mock.url()));
    println!(
        "# health, readiness and Prometheus metrics\ncurl http://{}/metrics\n",
        app.admin_addr()
    );
    app.run(shutdown).await?;
    mock.shutdown().await;
    Ok(())
}

fn instructions(gateway: SocketAddr, mock: &str) -> String {
    let url = format!("http://{gateway}/users/password/reset.json");
    let token = DEMO_CLIENT_TOKEN;
    format!(
        "\
qb-reset-gateway demo: gateway on http://{gateway}, QuickBlox stand-in on {mock}
client token: {token}   registered user: {DEMO_USER}   (Ctrl-C to stop)

# a registered user: 200, empty body (the stand-in saw the server key, never the client token)
curl -i -H 'QB-Token: {token}' '{url}?email=alice%40example.com'
# an unknown user: the very same 200, so nobody can probe which addresses have accounts
curl -i -H 'QB-Token: {token}' '{url}?email=nobody%40example.com'
# the ApiKey form of the same credential
curl -i -H 'Authorization: ApiKey {token}' '{url}?email=alice%40example.com'
# no credential: 401
curl -i '{url}?email=alice%40example.com'
# unknown client token: 401
curl -i -H 'QB-Token: wrong' '{url}?email=alice%40example.com'
# both credential headers: 400
curl -i -H 'QB-Token: {token}' -H 'Authorization: ApiKey {token}' '{url}?email=alice%40example.com'
# missing email: 422; invalid email: 422
curl -i -H 'QB-Token: {token}' '{url}'
curl -i -H 'QB-Token: {token}' '{url}?email=not-an-address'
# rate limits: 20 requests a minute per IP, so the last few of these answer 429 with Retry-After
for i in $(seq 22); do curl -s -o /dev/null -w '%{{http_code}} ' -H 'QB-Token: {token}' '{url}?email=user$i%40example.com'; done; echo
# wrong method: 405; other path: 404
curl -i -X POST -H 'QB-Token: {token}' '{url}?email=alice%40example.com'
curl -i 'http://{gateway}/users.json'
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_settings_are_valid() {
        let settings = settings("127.0.0.1:0".parse().unwrap(), "http://127.0.0.1:9").unwrap();
        assert_eq!(settings.api_key.expose(), DEMO_API_KEY);
    }
}
