//! `reset-gateway demo`: the gateway in front of an in-process QuickBlox stand-in, with
//! in-memory limits; needs no key, file, Redis or network.

use std::net::SocketAddr;

use anyhow::Context as _;
use qb_mock::{MockConfig, MockServer};
use reset_guard::{ApiKey, LimitGroup, Quota, TokenDigest};

use crate::config::{GatewayConfig, Settings};

/// The client token the demo accepts.
pub const DEMO_CLIENT_TOKEN: &str = "demo-client-token";
/// The one registered address.
pub const DEMO_USER: &str = "alice@example.com";
/// The key the demo gateway holds and the stand-in expects.
const DEMO_API_KEY: &str = "demo-server-api-key";

/// The address the rate-limit loop claims through `X-Forwarded-For`: one no other printed
/// command uses, so its per-IP budget starts full.
const DEMO_FORWARDED_FOR: &str = "203.0.113.7";

/// Settings for a demo gateway on `listen` in front of `upstream_url`: default limits but
/// one per-IP quota of 20 requests a minute, `X-Forwarded-For` believed from loopback, the
/// admin listener on a free loopback port.
pub fn settings(listen: SocketAddr, upstream_url: &str) -> anyhow::Result<Settings> {
    let digest = TokenDigest::of(DEMO_CLIENT_TOKEN.as_bytes()).to_hex();
    let yaml = format!(
        "server:\n  listen: \"{listen}\"\n  shutdown_grace: 2s\n\
         upstream:\n  url: \"{upstream_url}\"\n  timeout: 2s\n\
         guard:\n  clients:\n    - id: demo-app\n      token_sha256: {digest}\n\
         \x20 client_ip:\n    trusted_proxies: [\"127.0.0.0/8\", \"::1\"]\n\
         \x20 limits:\n    per_ip: [{{ requests: 20, per: 1m }}]\n\
         log:\n  format: text\n\
         admin:\n  listen: 127.0.0.1:0\n"
    );
    let key = ApiKey::new(DEMO_API_KEY).expect("the demo key is valid");
    Ok(GatewayConfig::from_yaml(&yaml)?.validate_with_key(&yaml, key)?)
}

/// Starts the stand-in and the gateway, prints what to try, serves until `shutdown` (and
/// cuts the requests still in flight when `now` completes during the drain).
pub async fn run(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
    now: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mock = MockServer::start(MockConfig {
        api_key: DEMO_API_KEY.to_owned(),
        users: vec![DEMO_USER.to_owned()],
        ..MockConfig::default()
    })
    .await
    .context("starting the QuickBlox stand-in")?;
    let settings = settings(listen, &mock.url())?;
    let per_ip = *per_ip_quota(&settings);
    let _log_sink = crate::telemetry::init(&settings.log);
    let app = crate::build(settings).await.with_context(|| {
        format!(
            "starting the demo gateway on {listen} (if another process holds that port, \
             pick another, such as `demo --listen 127.0.0.1:8081`)"
        )
    })?;
    crate::console::out(format_args!(
        "{}\n",
        instructions(app.local_addr(), app.admin_addr(), &mock.url(), per_ip)
    ));
    app.run_until(shutdown, now).await?;
    mock.shutdown().await;
    Ok(())
}

/// The demo's one per-IP quota, which the printed rate-limit loop is counted from.
fn per_ip_quota(settings: &Settings) -> &Quota {
    match settings.guard.quotas(LimitGroup::PerIp) {
        [quota] => quota,
        quotas => unreachable!("the demo sets one per-IP quota, not {}", quotas.len()),
    }
}

fn instructions(gateway: SocketAddr, admin: SocketAddr, mock: &str, per_ip: Quota) -> String {
    let url = format!("http://{gateway}/users/password/reset.json");
    let token = DEMO_CLIENT_TOKEN;
    let xff = DEMO_FORWARDED_FOR;
    // A full budget admits `burst` requests at once, then one more every `per / requests`.
    let allowed = per_ip.burst;
    let denied = allowed + 1;
    let window = per_ip.window_secs();
    let refill = window as f64 / f64::from(per_ip.requests);
    let refilled = refill * f64::from(per_ip.burst);
    let requests = per_ip.requests;
    format!(
        "\
qb-reset-gateway demo: gateway on http://{gateway}, admin listener on http://{admin},
QuickBlox stand-in on {mock}
client token: {token}   registered user: {DEMO_USER}   (Ctrl-C to stop)

# a registered user: 200, empty body; the demo's log line says upstream_status=200, so the
# stand-in accepted the server key the gateway sent in place of the client token
curl -i -H 'QB-Token: {token}' '{url}?email=alice%40example.com'
# an unknown user: the very same 200 (the log says upstream_status=404), so nobody can probe
# which addresses have accounts
curl -i -H 'QB-Token: {token}' '{url}?email=nobody%40example.com'
# the ApiKey form of the same credential: 200
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
# rate limit per client IP: {requests} guarded requests per {window} s, valid or not (one more every {refill} s).
# The demo believes X-Forwarded-For from loopback, so these come from {xff}, an address no
# command above used: {allowed} times 200 (each for another email), then request {denied} in full:
# 429 with Retry-After, RateLimit-Policy and RateLimit. {refilled} s later, the same again.
for i in $(seq {allowed}); do curl -s -o /dev/null -w '%{{http_code}} ' -H 'X-Forwarded-For: {xff}' -H 'QB-Token: {token}' \"{url}?email=user$i%40example.com\"; done; echo; curl -i -H 'X-Forwarded-For: {xff}' -H 'QB-Token: {token}' '{url}?email=user{denied}%40example.com'
# wrong method: 405; other path: 404
curl -i -X POST -H 'QB-Token: {token}' '{url}?email=alice%40example.com'
curl -i 'http://{gateway}/users.json'
# admin listener: health 200 ok; readiness 200 ready
curl -i 'http://{admin}/healthz'
curl -i 'http://{admin}/readyz'
# Prometheus metrics: every answer above counted by outcome, and the stand-in's own statuses
curl -s 'http://{admin}/metrics'
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
        let quota = per_ip_quota(&settings);
        assert_eq!(
            (quota.requests, quota.burst, quota.window_secs()),
            (20, 20, 60)
        );
    }

    #[test]
    fn the_rate_limit_loop_is_counted_from_the_per_ip_quota() {
        let settings = settings("127.0.0.1:0".parse().unwrap(), "http://127.0.0.1:9").unwrap();
        let text = instructions(
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:9090".parse().unwrap(),
            "http://127.0.0.1:9",
            *per_ip_quota(&settings),
        );
        assert!(text.contains("20 guarded requests per 60 s, valid or not (one more every 3 s)"));
        assert!(text.contains("20 times 200 (each for another email), then request 21 in full"));
        assert!(text.contains("for i in $(seq 20); do"));
        assert!(text.contains(
            "\"http://127.0.0.1:8080/users/password/reset.json?email=user$i%40example.com\""
        ));
        assert!(text.contains(
            "'http://127.0.0.1:8080/users/password/reset.json?email=user21%40example.com'"
        ));
        assert!(text.contains("60 s later, the same again"));
        assert!(text.contains("curl -i 'http://127.0.0.1:9090/healthz'"));
        assert!(text.contains("curl -i 'http://127.0.0.1:9090/readyz'"));
    }
}
