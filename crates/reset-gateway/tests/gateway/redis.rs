//! Replicas sharing limits through a real redis-server.

use qb_mock::MockServer;

use crate::common::*;
use test_support::RedisServer;

fn redis_yaml(mock: &MockServer, redis: &RedisServer, on_error: &str) -> String {
    yaml(
        &mock.url(),
        "  responses: { uniform: false }\n  limits:\n    per_ip: [{ requests: 100, per: 1m }]\n    per_client: []\n    per_email: [{ requests: 3, per: 1h }]\n    global: []\n",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    url: {}\n    key_prefix: replicas\n    timeout: 300ms\n    on_error: {on_error}\n",
            key_secret_file().display(),
            redis.url()
        ),
    )
}

/// A Redis at `maxmemory` that evicts nothing refuses every write, so every request
/// fails: the store is reported down (not ready under `deny`) until it takes writes again.
#[tokio::test]
async fn a_redis_that_refuses_writes_is_reported_down() {
    let redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml(&mock, &redis, "deny");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let ready = async || gw.admin_get("/readyz").await.status;
    assert_eq!(poll_until(300, ready, |s| *s == 200).await, 200);
    for setting in ["maxmemory-policy noeviction", "maxmemory 1"] {
        let reply = redis.command(&format!("CONFIG SET {setting}"));
        assert_eq!(reply.as_deref().map(str::trim), Some("+OK"), "{setting}");
    }
    let refused = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(poll_until(300, ready, |s| *s == 503).await, 503);
    let up = sample(
        &gw.admin_get("/metrics").await.body,
        "reset_gateway_store_up",
    );
    assert_eq!(up, Some(0.0));
    redis.command("CONFIG SET maxmemory 0");
    assert_eq!(poll_until(300, ready, |s| *s == 200).await, 200);
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );
}

/// An address refused before Redis went away stays refused while it is away, under
/// `on_error: allow` too: its denial is cached, and the groups before it (per IP here)
/// that Redis cannot decide would not have let it through either. Other addresses are
/// served unlimited, as `allow` says.
#[tokio::test]
async fn an_address_refused_stays_refused_while_redis_is_away_under_allow() {
    let mut redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml(&mock, &redis, "allow");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let alice = "email=alice%40example.com";
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(gw.reset_as_ios(alice).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    redis.stop();
    let sent = gw.mock.requests().len();
    for _ in 0..3 {
        assert_eq!(gw.reset_as_ios(alice).await.status, 429);
    }
    assert_eq!(
        gw.mock.requests().len(),
        sent,
        "nothing reached QuickBlox for alice"
    );
    let bob = gw.reset_as_ios("email=bob%40example.com").await;
    assert!(![429, 503].contains(&bob.status), "{bob:?}");
}

#[tokio::test]
async fn two_replicas_enforce_one_per_email_limit_exactly() {
    let redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let url = mock.url();
    let yaml = redis_yaml(&mock, &redis, "allow");
    let a = Gateway::start_yaml(mock, &yaml).await;
    // Replica B has its own (unused) mock; its upstream is A's, so one QuickBlox sees all.
    let b = Gateway::replica(&yaml).await;
    assert!(yaml.contains(&url));
    a.mock.add_user("Alice+x@Example.com");

    let mut statuses = Vec::new();
    for i in 0..8 {
        let replica = if i % 2 == 0 { &a } else { &b };
        // Spellings of one mailbox, alternating replicas.
        let spelling = ["alice%40example.com", "Alice%2Bx%40Example.com"][i % 2];
        statuses.push(
            replica
                .reset_as_ios(&format!("email={spelling}"))
                .await
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429, 429, 429]);
    assert_eq!(
        a.mock.requests().len(),
        3,
        "QuickBlox saw exactly the three allowed resets"
    );

    // Nothing in Redis names the address, the client or its token.
    assert!(holds_limits(&redis));
    for (key, value) in redis.dump() {
        let both = format!("{key} {value}").to_lowercase();
        for secret in ["alice", "example", "ios", IOS_TOKEN, "127.0.0.1"] {
            assert!(
                !both.contains(secret),
                "Redis holds {secret:?}: {key} = {value}"
            );
        }
    }
}

#[tokio::test]
async fn redis_outage_under_deny_answers_503_then_recovers() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml(&mock, &redis, "deny");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );

    redis.stop();
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.body,
        r#"{"errors":{"base":["Rate limiter unavailable"]}}"#
    );
    assert_eq!(
        reply.header("content-type"),
        Some("application/json; charset=utf-8")
    );

    let _redis = RedisServer::start_on(port);
    let status = poll_until(
        200,
        async || gw.reset_as_ios("email=alice%40example.com").await.status,
        |s| *s == 200,
    )
    .await;
    assert_eq!(
        status, 200,
        "the gateway uses Redis again without a restart"
    );
}

#[tokio::test]
async fn redis_outage_under_allow_keeps_serving() {
    let mut redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml(&mock, &redis, "allow");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    redis.stop();
    for _ in 0..5 {
        assert_eq!(
            gw.reset_as_ios("email=alice%40example.com").await.status,
            200
        );
    }
}

/// Under `allow`, the access line of a request Redis could not decide says it passed
/// without its limits (it reads `forwarded` like any other), and one Redis decided does not.
#[tokio::test]
async fn a_request_let_through_by_on_error_allow_says_so_in_its_access_line() {
    let mut redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, redis_yaml(&mock, &redis, "allow")).unwrap();
    let gateway = crate::process::spawn_gateway(&config);
    let ask = || {
        let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
        async move { raw(gateway.addr, request.as_bytes()).await.status }
    };
    assert_eq!(ask().await, 200);
    redis.stop();
    assert_eq!(ask().await, 200);
    // The access log is written by a thread of its own: wait for both lines.
    let access_lines = || -> Vec<serde_json::Value> {
        gateway
            .logs()
            .iter()
            .filter(|l| l.contains("\"target\":\"access\""))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let lines = poll_until(100, async || access_lines(), |l| l.len() >= 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["outcome"], "forwarded");
    assert_eq!(lines[0].get("limits_skipped"), None, "{}", lines[0]);
    assert_eq!(lines[1]["outcome"], "forwarded");
    assert_eq!(lines[1]["limits_skipped"], true, "{}", lines[1]);
}

/// Redis gone (its port refusing connections): a request is failed by the refusal
/// itself, not by waiting out `store.redis.timeout` (100ms here) while the client retried
/// with backoff, so its failure line names the refusal rather than "timed out". The first
/// request after the stop fails on the broken connection either way; the one a second
/// later (failure lines come at most once a second) is the one that reconnects.
#[tokio::test]
async fn a_refused_redis_connection_fails_a_request_by_the_refusal_not_the_timeout() {
    let mut redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let yaml = redis_yaml(&mock, &redis, "deny").replace("timeout: 300ms", "timeout: 100ms");
    std::fs::write(&config, yaml).unwrap();
    let gateway = crate::process::spawn_gateway(&config);
    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw(gateway.addr, request.as_bytes()).await.status, 200);
    redis.stop();
    assert_eq!(raw(gateway.addr, request.as_bytes()).await.status, 503);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(raw(gateway.addr, request.as_bytes()).await.status, 503);
    let failed = poll_until(
        100,
        async || {
            gateway
                .logs()
                .into_iter()
                .filter(|l| l.contains("rate-limit store unavailable"))
                .nth(1)
        },
        Option::is_some,
    )
    .await
    .expect("the second failure is logged");
    let json: serde_json::Value = serde_json::from_str(&failed).unwrap();
    let error = json["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("refused") || error.contains("broken pipe") || error.contains("reset"),
        "{failed}"
    );
}

/// Redis slower than usual but within its timeout fails nothing and trips no alert: the
/// store latency histogram is where it shows. Paused 200ms (timeout 300ms), a request
/// waits out the pause, and its wait is in `reset_gateway_store_duration_seconds`.
#[tokio::test]
async fn a_slow_redis_shows_in_the_store_latency() {
    let redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml(&mock, &redis, "deny");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let waits = async || {
        let reply = raw(
            gw.admin,
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        let count = sample(&reply.body, "reset_gateway_store_duration_seconds_count");
        let sum = sample(&reply.body, "reset_gateway_store_duration_seconds_sum");
        (count.unwrap_or(0.0), sum.unwrap_or(0.0))
    };
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );
    let (count, quick) = waits().await;
    assert_eq!(count, 1.0);
    assert!(redis.command("CLIENT PAUSE 200 ALL").is_some());
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200,
        "slow, not failed"
    );
    let (count, sum) = waits().await;
    assert_eq!(count, 2.0);
    assert!(
        sum - quick >= 0.1,
        "the pause is in the wait: {quick} then {sum}"
    );
}

/// `redis_yaml` for a Redis at `url`, with more `store.redis` keys.
pub(crate) fn redis_yaml_at(
    mock: &MockServer,
    url: &str,
    redis_extra: &str,
    on_error: &str,
) -> String {
    yaml(
        &mock.url(),
        "  responses: { uniform: false }\n  limits:\n    per_ip: []\n    per_client: []\n    per_email: [{ requests: 3, per: 1h }]\n    global: []\n",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    url: {url}\n    key_prefix: secured\n    timeout: 300ms\n    on_error: {on_error}\n{redis_extra}",
            key_secret_file().display(),
        ),
    )
}

/// Two gateways on one store reached over TLS trusting `ca` (`yaml` given the mock and its
/// `ca_file` line) share one per-email limit.
pub(crate) async fn two_gateways_trusting(
    ca: &std::path::Path,
    yaml: impl Fn(&MockServer, &str) -> String,
) -> (Gateway, Gateway) {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let trusting = yaml(&mock, &format!("    ca_file: {}\n", ca.display()));
    let a = Gateway::start_yaml(mock, &trusting).await;
    let b = Gateway::replica(&trusting).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    (a, b)
}

/// A further gateway on the same store, trusting only another CA (`yaml` given its
/// `ca_file` line): its connections fail, and under on_error deny it answers 503 and is
/// not ready.
pub(crate) async fn another_ca_is_not_trusted(yaml: impl Fn(&str) -> String) {
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = test_certificates(other.path());
    let c = Gateway::replica(&yaml(&format!("    ca_file: {}\n", other_ca.display()))).await;
    assert_eq!(c.reset_as_ios("email=bob%40example.com").await.status, 503);
    let ready = readiness_across_probes(&c).await;
    assert_eq!(ready, [503; 15], "not ready without a trusted certificate");
}

/// Four resets of one address, alternating between the two gateways.
pub(crate) async fn four_resets(a: &Gateway, b: &Gateway) -> Vec<u16> {
    let mut statuses = Vec::new();
    for i in 0..4 {
        let replica = if i % 2 == 0 { a } else { b };
        statuses.push(
            replica
                .reset_as_ios("email=alice%40example.com")
                .await
                .status,
        );
    }
    statuses
}

#[tokio::test]
async fn auth_with_a_password_from_the_environment_shares_one_limit() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_REDIS_PASSWORD";
    let redis = test_support::RedisServer::start_with(test_support::RedisOptions {
        password: Some("s3cret-redis-password".to_owned()),
        ..Default::default()
    });
    // Each test runs in its own process: setting the variable touches no other test.
    std::env::set_var(VARIABLE, "s3cret-redis-password");
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml_at(
        &mock,
        &redis.url(),
        &format!("    password_env: {VARIABLE}\n"),
        "deny",
    );
    let a = Gateway::start_yaml(mock, &yaml).await;
    let b = Gateway::replica(&yaml).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    assert!(
        holds_limits(&redis),
        "the limits live in the password-protected Redis"
    );

    // Without the password Redis refuses every command: under on_error deny, 503.
    let no_password = redis_yaml_at(&a.mock, &redis.url(), "", "deny");
    let c = Gateway::replica(&no_password).await;
    let reply = c.reset_as_ios("email=bob%40example.com").await;
    assert_eq!(reply.status, 503, "{reply:?}");
}

/// A shadow quota that would have denied is logged (naming it) and counted, with the
/// Redis store as with the memory store, as `check-config --explain` and the shipped
/// configs say. Before, the Redis store only counted it.
#[tokio::test]
async fn a_shadow_quota_that_would_deny_is_logged_with_either_store() {
    let redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let limits = "  responses: { uniform: false }\n  limits:\n    per_ip: [{ requests: 100, per: 1m }, { requests: 2, per: 1m, shadow: true }]\n    per_client: []\n    per_email: []\n    global: []\n";
    let redis_store = format!(
        "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    url: {}\n    key_prefix: shadow\n    timeout: 300ms\n    on_error: deny\n",
        key_secret_file().display(),
        redis.url()
    );
    let dir = tempfile::tempdir().unwrap();
    for (store, top) in [("memory", String::new()), ("redis", redis_store)] {
        let config = dir.path().join(format!("{store}.yaml"));
        std::fs::write(&config, yaml(&mock.url(), limits, &top)).unwrap();
        let gateway = crate::process::spawn_gateway(&config);
        for i in 0..5 {
            let request = format!("GET {RESET}?email=user{i}%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
            // Forwarded (QuickBlox knows no such user: 404), never refused.
            let status = raw(gateway.addr, request.as_bytes()).await.status;
            assert_eq!(status, 404, "{store}");
        }
        let logged = || {
            gateway
                .logs()
                .into_iter()
                .filter(|l| l.contains("shadow quota would deny"))
                .collect::<Vec<_>>()
        };
        let lines = poll_until(100, async || logged(), |l| l.len() >= 3).await;
        assert_eq!(lines.len(), 3, "{store}: {lines:?}");
        assert!(
            lines.iter().all(
                |l| l.contains(r#""limit":"per_ip""#) && l.contains(r#""quota":"2/1m shadow""#)
            ),
            "{store}: {lines:?}"
        );
    }
}

/// A password changed on the server while a gateway runs (a rotation whose old password
/// was removed before this replica got the new one): every connection made from then on
/// is refused, while those made before still work. The probe, whose connection is one of
/// those, asks the server to take the password again, and `/readyz` says not ready under
/// `deny`. Before, it stayed ready while most requests failed. Standalone and Cluster.
#[tokio::test]
async fn a_password_changed_on_the_server_is_noticed_by_the_probe() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_REDIS_ROTATED_PASSWORD";
    const OLD: &str = "the-password-before";
    std::env::set_var(VARIABLE, OLD);
    let redis = test_support::RedisServer::start_with(test_support::RedisOptions {
        password: Some(OLD.to_owned()),
        ..Default::default()
    });
    let cluster = test_support::RedisCluster::start_with(test_support::ClusterOptions {
        password: Some(OLD.to_owned()),
        ..Default::default()
    });
    let mock = MockServer::start(mock_config()).await.unwrap();
    let password = format!("    password_env: {VARIABLE}\n");
    let standalone = redis_yaml_at(&mock, &redis.url(), &password, "deny");
    let in_cluster = standalone.replace(
        &format!("    url: {}\n", redis.url()),
        &format!("    mode: cluster\n    nodes: [{}]\n", cluster.urls()[0]),
    );
    let a = Gateway::start_yaml(mock, &standalone).await;
    let b = Gateway::replica(&in_cluster).await;
    for gateway in [&a, &b] {
        let ready = poll_until(100, || gateway.admin_get("/readyz"), |r| r.status == 200).await;
        assert_eq!(ready.status, 200, "{ready:?}");
    }
    for server in std::iter::once(&redis).chain(&cluster.nodes) {
        assert_eq!(
            server
                .command("CONFIG SET requirepass the-password-after")
                .as_deref(),
            Some("+OK\r\n")
        );
    }
    for gateway in [&a, &b] {
        let ready = poll_until(100, || gateway.admin_get("/readyz"), |r| r.status == 503).await;
        assert_eq!(ready.status, 503, "{ready:?}");
    }
}

/// A `store.redis` section that names a server while `kind` is left at memory (the
/// default) is refused on `kind`'s line: each replica would otherwise keep a limit of its
/// own, silently. The shipped file's section, which names none, is not.
#[tokio::test]
async fn a_redis_server_named_under_the_memory_store_is_refused() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let redis = redis_yaml_at(&mock, "redis://10.0.0.7:6379", "", "deny");
    for (yaml, named) in [
        (redis.replace("  kind: redis\n", ""), "store.redis.url"),
        (
            redis.replace("kind: redis", "kind: memory"),
            "store.redis.url",
        ),
        (
            redis
                .replace("kind: redis", "kind: memory")
                .replace("url: redis://10.0.0.7:6379", "password_env: REDIS_PASSWORD"),
            "store.redis.password_env",
        ),
    ] {
        let error = reset_gateway::GatewayConfig::from_yaml(&yaml)
            .unwrap()
            .validate_with_key(&yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("store.kind"), "{error}\n{yaml}");
        assert!(error.contains(named), "{error}");
        assert!(error.contains("kind: redis"), "{error}");
    }
}

/// A `store.redis` section the file alone shows could not work is refused under the memory
/// store too, before the day `kind` turns to redis.
#[test]
fn a_redis_section_that_could_not_work_is_refused_under_the_memory_store() {
    for (section, key, why) in [
        ("timeout: 0s", "store.redis.timeout", "1ms to 60s"),
        (
            "key_prefix: \"a b*\"",
            "store.redis.key_prefix",
            "without spaces",
        ),
        (
            "key_prefix: gw*",
            "store.redis.key_prefix",
            "glob character",
        ),
        (
            "username: \"\"",
            "store.redis.username",
            "must be non-empty",
        ),
    ] {
        let yaml = yaml(
            "http://127.0.0.1:9",
            "",
            &format!("store:\n  kind: memory\n  redis:\n    {section}\n"),
        );
        let error = reset_gateway::GatewayConfig::from_yaml(&yaml)
            .unwrap()
            .validate_with_key(&yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!("{key} (line")),
            "{section}: {error}"
        );
        assert!(error.contains(why), "{section}: {error}");
    }
}

/// A secret pasted into a key that names a file holding one (`password_file`,
/// `key_secret_file`, `upstream.api_key_file`, a TLS `key_file`) is not echoed by the
/// error that it names no file it can read.
#[tokio::test]
async fn a_secret_given_for_a_secret_files_path_is_not_echoed() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let redis = redis_yaml_at(&mock, "redis://127.0.0.1:6379", "", "deny");
    let secret = "Sup3rS3cret-pasted!";
    let refused = |error: String, key: &str| {
        assert!(error.starts_with(key), "{error}");
        assert!(error.contains("cannot read the file it names"), "{error}");
        assert!(!error.contains(secret), "the secret was echoed: {error}");
    };
    for (yaml, key) in [
        (
            format!("{redis}    password_file: {secret}\n"),
            "store.redis.password_file",
        ),
        (
            redis.replace(
                &format!("key_secret_file: {}", key_secret_file().display()),
                &format!("key_secret_file: {secret}"),
            ),
            "store.key_secret_file",
        ),
    ] {
        let error = reset_gateway::GatewayConfig::from_yaml(&yaml)
            .unwrap()
            .validate_with_key(&yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
            .unwrap_err();
        refused(error.to_string(), key);
    }
    let yaml = redis.replacen(
        "  timeout: 400ms\n",
        &format!("  timeout: 400ms\n  api_key_file: {secret}\n"),
        1,
    );
    let config = reset_gateway::GatewayConfig::from_yaml(&yaml).unwrap();
    let error = config.upstream.resolve_api_key().unwrap_err();
    refused(error.to_string(), "upstream.api_key_file");

    // A private key pasted in place of a key_file's path: the store's, and the server's.
    let pem = "-----BEGIN PRIVATE KEY-----\\nMIIEvSup3rS3cret-pasted!\\n-----END PRIVATE KEY-----";
    let any_file = key_secret_file();
    let store = redis_yaml_at(
        &mock,
        "rediss://127.0.0.1:6379",
        &format!(
            "    cert_file: {}\n    key_file: \"{pem}\"\n",
            any_file.display()
        ),
        "deny",
    );
    let server = with_server_keys(
        &redis,
        &format!(
            "  tls:\n    cert_file: {}\n    key_file: \"{pem}\"\n",
            any_file.display()
        ),
    );
    for (yaml, key) in [
        (store, "store.redis.key_file"),
        (server, "server.tls.key_file"),
    ] {
        let error = reset_gateway::GatewayConfig::from_yaml(&yaml)
            .unwrap()
            .validate_with_key(&yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(key), "{error}");
        assert!(
            error.contains("names no readable file")
                || error.contains("cannot read the file it names"),
            "{error}"
        );
        assert!(
            !error.contains(secret) && !error.contains("PRIVATE"),
            "the key was echoed: {error}"
        );
    }
}

#[tokio::test]
async fn a_password_in_the_url_is_refused_without_echoing_it() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    for url in [
        "redis://:hunter2-password@127.0.0.1:6379",
        "redis://default:hunter2-password@127.0.0.1:6379/0",
        "rediss://user:hunter2-password@redis.internal:6380",
    ] {
        let redis = redis_yaml_at(&mock, url, "", "allow");
        // Refused while the memory store is in use too: the password is in the file.
        let memory = redis.replace("kind: redis", "kind: memory");
        for yaml in [redis, memory] {
            let error = reset_gateway::GatewayConfig::from_yaml(&yaml)
                .unwrap()
                .validate_with_key(&yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
                .unwrap_err();
            let shown = error.to_string();
            assert!(shown.starts_with("store.redis.url (line "), "{shown}");
            assert!(shown.contains("password_env or password_file"), "{shown}");
            assert!(
                !shown.contains("hunter2"),
                "the password was echoed: {shown}"
            );
        }
    }
}

#[tokio::test]
async fn tls_with_a_private_ca_and_not_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let redis = test_support::RedisServer::start_with(test_support::RedisOptions {
        tls: Some((test_support::free_port(), cert, key, ca.clone())),
        ..Default::default()
    });
    let tls_url = redis.tls_url("localhost").unwrap();
    let (a, _b) = two_gateways_trusting(&ca, |mock, ca_file| {
        redis_yaml_at(mock, &tls_url, ca_file, "deny")
    })
    .await;
    assert!(
        holds_limits(&redis),
        "the limits went over TLS to this Redis"
    );

    // A certificate from another CA does not verify: a connection failure, handled by
    // on_error (deny: 503, and not ready).
    another_ca_is_not_trusted(|ca_file| redis_yaml_at(&a.mock, &tls_url, ca_file, "deny")).await;
}

/// A Redis that asks TLS clients for a certificate (`tls-auth-clients yes`, Redis's own
/// default): with `cert_file` and `key_file`, two gateways share its limits; without, the
/// probe's line names the missing certificate and requests fail as `on_error` says. A key
/// without its certificate, or a certificate with a plain URL, is refused on its line.
#[tokio::test]
async fn a_client_certificate_for_a_redis_that_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let redis = test_support::RedisServer::start_with(test_support::RedisOptions {
        tls: Some((
            test_support::free_port(),
            cert.clone(),
            key.clone(),
            ca.clone(),
        )),
        ..Default::default()
    });
    redis.command("CONFIG SET tls-auth-clients yes").unwrap();
    let tls_url = redis.tls_url("localhost").unwrap();
    // The server's own certificate, from the CA Redis trusts, serves as the client's.
    let client_certificate = format!(
        "    cert_file: {}\n    key_file: {}\n",
        cert.display(),
        key.display()
    );
    let (_a, _b) = two_gateways_trusting(&ca, |mock, ca_file| {
        redis_yaml_at(
            mock,
            &tls_url,
            &format!("{ca_file}{client_certificate}"),
            "deny",
        )
    })
    .await;
    assert!(
        holds_limits(&redis),
        "the limits went over TLS to this Redis"
    );

    let mock = MockServer::start(mock_config()).await.unwrap();
    let without = redis_yaml_at(
        &mock,
        &tls_url,
        &format!("    ca_file: {}\n", ca.display()),
        "deny",
    );
    let config = dir.path().join("without.yaml");
    let (_gateway, line) = started_with_failing_probe(&config, &without).await;
    assert!(line.contains("cert_file"), "{line}");

    let key_alone = redis_yaml_at(
        &mock,
        &tls_url,
        &format!(
            "    ca_file: {}\n    key_file: {}\n",
            ca.display(),
            key.display()
        ),
        "deny",
    );
    let error = reset_gateway::GatewayConfig::from_yaml(&key_alone)
        .unwrap()
        .validate_with_key(&key_alone, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("store.redis.cert_file"), "{error}");
    let missing = redis_yaml_at(
        &mock,
        &tls_url,
        &format!(
            "    cert_file: {}\n    key_file: {}\n",
            cert.display(),
            dir.path().join("no-such-key.pem").display()
        ),
        "deny",
    );
    let error = reset_gateway::GatewayConfig::from_yaml(&missing)
        .unwrap()
        .validate_with_key(&missing, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("store.redis.key_file (line "), "{error}");
    assert!(error.contains("cannot read"), "{error}");
    let plain = redis_yaml_at(&mock, &redis.url(), &client_certificate, "deny");
    let error = reset_gateway::GatewayConfig::from_yaml(&plain)
        .unwrap()
        .validate_with_key(&plain, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("store.redis.cert_file (line "), "{error}");
    assert!(error.contains("rediss://"), "{error}");
}

/// TLS where the port has none, and none where it has TLS: the probe's line says what
/// the URL's scheme may have to do with it.
#[tokio::test]
async fn a_scheme_that_does_not_match_the_port_is_hinted_at() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let redis = test_support::RedisServer::start_with(test_support::RedisOptions {
        tls: Some((test_support::free_port(), cert, key, ca.clone())),
        ..Default::default()
    });
    let mock = MockServer::start(mock_config()).await.unwrap();
    let plain_port = redis.url().replace("redis://", "rediss://");
    let tls_port = redis
        .tls_url("127.0.0.1")
        .unwrap()
        .replace("rediss://", "redis://");
    for (url, extra, hint) in [
        (
            plain_port,
            format!("    ca_file: {}\n", ca.display()),
            "rediss:// is for a TLS port",
        ),
        (tls_port, String::new(), "must start with rediss://"),
    ] {
        let config = dir.path().join("gateway.yaml");
        let (_gateway, line) =
            started_with_failing_probe(&config, &redis_yaml_at(&mock, &url, &extra, "deny")).await;
        assert!(line.contains(hint), "{url}: {line}");
    }
    // A TLS Redis that served, then stalls: no hint about TLS.
    let tls_url = redis.tls_url("localhost").unwrap();
    let yaml = redis_yaml_at(
        &mock,
        &tls_url,
        &format!("    ca_file: {}\n", ca.display()),
        "deny",
    );
    let config = dir.path().join("served.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = crate::process::spawn_gateway(&config);
    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw(gateway.addr, request.as_bytes()).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    redis.command("CLIENT PAUSE 3000 ALL").unwrap();
    let line = probe_failure_line(&gateway).await;
    assert!(line.contains(&format!("server {tls_url}: ")), "{line}");
    assert!(!line.contains("is for a TLS port"), "{line}");
}

#[test]
fn standalone_mode_takes_only_redis_urls() {
    for url in [
        "redis+cluster://127.0.0.1:7000",
        "redis+sentinel://127.0.0.1:26379/mymaster",
        "unix:///tmp/redis.sock",
    ] {
        let error = check_redis_section(&format!("    url: {url}\n")).unwrap_err();
        assert!(
            error.starts_with("store.redis.url (line ") && error.contains("mode:"),
            "{url}: {error}"
        );
    }
    check_redis_section("    url: rediss://127.0.0.1:6380/2\n").unwrap();
    // Port 0 is no server's: refused, in a URL and in a node.
    let error = check_redis_section("    url: redis://127.0.0.1:0\n").unwrap_err();
    assert!(
        error.contains("store.redis.url (line") && error.contains("port 0"),
        "{error}"
    );
    let error = check_redis_section(
        "    mode: cluster\n    nodes: [redis://10.0.0.1:6379, redis://10.0.0.2:0]\n",
    )
    .unwrap_err();
    assert!(error.contains("node 2 names port 0"), "{error}");
}

#[test]
fn a_node_whose_scheme_the_gateway_would_not_read_as_tls_is_refused() {
    // The client reads `REDISS://` and `valkeys://` as TLS, the gateway did not: the password
    // went in clear, certificates unchecked.
    for (mode, scheme) in [
        ("cluster", "REDISS"),
        ("sentinel", "Rediss"),
        ("cluster", "valkeys"),
    ] {
        let master = if mode == "sentinel" {
            "    sentinel_master: m\n"
        } else {
            ""
        };
        let section = format!("    mode: {mode}\n    nodes: [{scheme}://10.0.0.1:6380]\n{master}");
        let error = check_redis_section(&section).unwrap_err();
        assert!(
            error.starts_with("store.redis.nodes (line ")
                && error.contains("node 1 must start with redis:// or rediss://"),
            "{scheme}: {error}"
        );
    }
    let error =
        check_redis_section("    mode: cluster\n    nodes: [\"rediss://a,10.0.0.1:6380\"]\n")
            .unwrap_err();
    assert!(error.contains("node 1 holds a comma"), "{error}");
}

/// A `ca_file` that holds no certificate, or is missing: the error names the key once,
/// with its line, and the file.
#[test]
fn a_ca_file_without_certificates_is_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let missing = dir.path().join("missing.pem");
    for file in [&empty, &missing] {
        let error = check_redis_section(&format!(
            "    url: rediss://127.0.0.1:6380\n    ca_file: {}\n",
            file.display()
        ))
        .unwrap_err();
        assert!(error.starts_with("store.redis.ca_file (line "), "{error}");
        assert_eq!(error.matches("store.redis.ca_file").count(), 1, "{error}");
        assert!(error.contains(&file.display().to_string()), "{error}");
    }
}

#[test]
fn redis_settings_that_cannot_work_are_refused_without_echoing_a_secret() {
    const EMPTY: &str = "RESET_GATEWAY_TEST_EMPTY_REDIS_PASSWORD";
    // Each test runs in its own process: setting the variable touches no other test.
    std::env::set_var(EMPTY, "");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (empty, blank, password) = (
        file("empty", ""),
        file("blank", "\n"),
        file("password", "hunter2-password\n"),
    );
    let cluster = "    mode: cluster\n";
    let refused = [
        // A URL with a password written where the list of nodes belongs: its type is wrong,
        // and the message says so without the value.
        (
            format!("{cluster}    nodes: 'redis://:hunter2-password@10.0.0.1:6379'\n"),
            "store.redis.nodes (line",
            "a string, expected a sequence",
        ),
        (
            "    password_env: 'hunter2-password!'\n".to_owned(),
            "store.redis.password_env (line",
            "the environment variable it names is not set",
        ),
        (
            // A secret shaped like a variable's name is not repeated either.
            "    password_env: HUNTER2_PASSWORD_X9\n".to_owned(),
            "store.redis.password_env (line",
            "the environment variable it names is not set",
        ),
        (
            format!("    password_env: {EMPTY}\n"),
            "store.redis.password_env (line",
            "is empty",
        ),
        (
            format!("    password_file: {empty}\n"),
            "store.redis.password_file (line",
            "is empty",
        ),
        (
            format!("    password_file: {blank}\n"),
            "store.redis.password_file (line",
            "is empty",
        ),
        (
            "    password: hunter2-password\n".to_owned(),
            "store.redis.password (line",
            "set store.redis.password_env or password_file",
        ),
        (
            "    username: limiter\n".to_owned(),
            "store.redis.username (line",
            "needs a password",
        ),
        (
            format!("    username: ''\n    password_file: {password}\n"),
            "store.redis.username (line",
            "non-empty",
        ),
        (
            "    url: 'redis://127.0.0.1:6379/?password=hunter2-password'\n".to_owned(),
            "store.redis.url (line",
            "password_env or password_file",
        ),
        (
            "    url: 'rediss://redis.internal:6380/#insecure'\n".to_owned(),
            "store.redis.url (line",
            "query or a fragment",
        ),
        (
            format!("{cluster}    nodes: ['redis://10.0.0.1:6379?password=hunter2-password']\n"),
            "store.redis.nodes (line",
            "node 1 has a query",
        ),
        (
            format!("{cluster}    nodes: [redis://10.0.0.1:6379, redis://10.0.0.2:6379/5]\n"),
            "store.redis.nodes (line",
            "node 2 names a database",
        ),
        (
            "    mode: sentinel\n    sentinel_master: m\n    nodes: [redis://10.0.0.1:26379/2]\n"
                .to_owned(),
            "store.redis.nodes (line",
            "node 1 names a database",
        ),
        // A user in the URL: where a password written by mistake would travel as the name.
        (
            "    url: redis://Hunter2Secret@127.0.0.1:6379\n".to_owned(),
            "store.redis.url (line",
            "user name",
        ),
        (
            format!("{cluster}    nodes: [redis://hunter2secret@10.0.0.1:6379]\n"),
            "store.redis.nodes (line",
            "node 1 holds a user name",
        ),
        // The default URL written out is still a URL given in cluster mode.
        (
            format!(
                "{cluster}    nodes: [redis://10.0.0.1:6379]\n    url: redis://127.0.0.1:6379\n"
            ),
            "store.redis.url (line",
            "seed nodes go in nodes",
        ),
        // A wait for Redis longer than the request's own time would never reach on_error.
        (
            "    timeout: 30s\n".to_owned(),
            "store.redis.timeout (line",
            "shorter than server.request_timeout (30s)",
        ),
        // Nor may the wait for a new connection, four times the timeout, with the time a
        // request decided then still takes to ask QuickBlox, upstream.timeout (400ms
        // here): a wait of 29.6s left it none, and it ended in a 504 blamed on QuickBlox,
        // under on_error: allow (the default) as under deny.
        (
            "    timeout: 8s\n    on_error: deny\n".to_owned(),
            "store.redis.timeout (line",
            "gets 32s (four times it, at least 250ms), and a request then asks QuickBlox for \
             up to upstream.timeout (400ms). Keep it below 7400ms",
        ),
        (
            "    timeout: 7400ms\n".to_owned(),
            "store.redis.timeout (line",
            "Keep it below 7400ms",
        ),
        (
            "    timeout: 7400ms\n    on_error: deny\n".to_owned(),
            "store.redis.timeout (line",
            "Keep it below 7400ms",
        ),
    ];
    for (redis, path, why) in refused {
        let shown = check_redis_section(&redis).unwrap_err();
        assert!(shown.starts_with(path), "{redis}: {shown}");
        assert!(shown.contains(why), "{redis}: {shown}");
        assert!(
            !shown.to_lowercase().contains("hunter2"),
            "a secret was echoed: {shown}"
        );
    }
    check_redis_section(&format!(
        "    username: limiter\n    password_file: {password}\n"
    ))
    .unwrap();
    // Four times 7.3s and upstream.timeout, 400ms, are less than the default
    // request_timeout, 30s.
    check_redis_section("    timeout: 7300ms\n    on_error: deny\n").unwrap();
    check_redis_section("    timeout: 7300ms\n").unwrap();
}

/// A request timeout no Redis timeout fits in (a wait for a new connection is 250 ms at
/// least) is the setting named.
#[test]
fn a_request_timeout_too_short_for_a_new_redis_connection_is_refused() {
    let yaml = with_server_keys(
        &yaml(
            "http://127.0.0.1:9",
            "",
            &format!(
                "store:\n  kind: redis\n  key_secret_file: {}\n",
                key_secret_file().display()
            ),
        ),
        "  request_timeout: 600ms\n",
    );
    let shown = |yaml: &str| {
        let config = reset_gateway::GatewayConfig::from_yaml(yaml).unwrap();
        config
            .validate_with_key(yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // QuickBlox is asked after the wait, for up to upstream.timeout (400ms here), under
    // on_error: allow (the default) as under deny.
    let deny = yaml.replace(
        "  kind: redis\n",
        "  kind: redis\n  redis:\n    on_error: deny\n",
    );
    for shown in [shown(&yaml), shown(&deny)] {
        assert!(shown.starts_with("server.request_timeout (line"), "{shown}");
        assert!(
            shown.contains("must be longer than 650ms with the Redis store")
                && shown.contains("upstream.timeout (400ms)"),
            "{shown}"
        );
    }
}

/// A reload applies `upstream.timeout` but not `server.request_timeout` or the Redis
/// settings: it is held to the running ones. A reload that lengthened the upstream's time
/// (and the request's, which waits for a restart) left requests waiting for a new Redis
/// connection no time to ask QuickBlox: 504s blamed on it.
#[tokio::test]
async fn a_reload_holds_upstream_timeout_to_the_running_request_timeout() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = |request_timeout: &str, upstream_timeout: &str| {
        let yaml = redis_yaml_at(&mock, &format!("redis://127.0.0.1:{port}"), "", "allow")
            .replace("    timeout: 300ms\n", "    timeout: 2s\n")
            .replace(
                "  timeout: 400ms\n",
                &format!("  timeout: {upstream_timeout}\n"),
            );
        with_server_keys(&yaml, &format!("  request_timeout: {request_timeout}\n"))
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    // A new connection's wait, 8s, and 400ms for QuickBlox fit in 10s.
    std::fs::write(&path, file("10s", "400ms")).unwrap();
    let gw = crate::process::spawn_gateway(&path);
    std::fs::write(&path, file("30s", "2s")).unwrap();
    gw.signal("HUP");
    let rejected = gw.reload_rejection().await;
    assert!(
        rejected.contains("upstream.timeout (line")
            && rejected.contains(
                "must be below 2s with the running gateway's server.request_timeout (10s)"
            ),
        "{rejected}"
    );
    // Within the running request timeout it is taken.
    std::fs::write(&path, file("30s", "1500ms")).unwrap();
    gw.signal("HUP");
    assert!(gw.logged("configuration reloaded").await, "{:?}", gw.logs());
}

/// A gateway started on `yaml` (written to `config`), and the line in which it says the
/// Redis probe failed.
pub(crate) async fn started_with_failing_probe(
    config: &std::path::Path,
    yaml: &str,
) -> (crate::process::Process, String) {
    std::fs::write(config, yaml).unwrap();
    let gateway = crate::process::spawn_gateway(config);
    let line = probe_failure_line(&gateway).await;
    (gateway, line)
}

/// The line in which a gateway process says the Redis probe failed, once it is logged
/// (within five seconds).
pub(crate) async fn probe_failure_line(gateway: &crate::process::Process) -> String {
    let probe_failed = |logs: Vec<String>| {
        logs.into_iter()
            .find(|line| line.contains("Redis does not answer the probe"))
    };
    poll_until(100, async || probe_failed(gateway.logs()), Option::is_some)
        .await
        .expect("the probe's failure is logged")
}

/// A sharded database behind one address (a managed service's proxy) reads keys of several
/// slots together but refuses a script whose keys are in several, as every request's call
/// is in the standalone mode: the probe's line says so, and which setting to use.
#[tokio::test]
async fn a_proxy_refusing_scripts_over_several_slots_is_named_in_the_probes_line() {
    let redis = test_support::RedisServer::start();
    let proxy =
        test_support::ScriptProxy::start(redis.addr(), test_support::Refuse::KeysInSeveralSlots);
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let (_gateway, line) =
        started_with_failing_probe(&config, &redis_yaml_at(&mock, &proxy.url(), "", "deny")).await;
    assert!(
        line.contains(&format!("server {}: ", proxy.url())),
        "{line}"
    );
    assert!(line.to_lowercase().contains("crossslot"), "{line}");
    assert!(line.contains("`mode: cluster`"), "{line}");
    assert!(line.contains("`key_prefix` in braces"), "{line}");
}

/// With a password set, a Redis that refuses connections is not said to refuse AUTH: the
/// connection is made with the probe's first command, which is AUTH.
#[tokio::test]
async fn a_redis_away_is_not_blamed_on_auth_when_a_password_is_set() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("redis-password");
    std::fs::write(&password, "s3cret-redis-password\n").unwrap();
    let yaml = redis_yaml_at(
        &mock,
        &format!("redis://127.0.0.1:{port}"),
        &format!("    password_file: {}\n", password.display()),
        "deny",
    );
    let config = dir.path().join("gateway.yaml");
    let (_gateway, line) = started_with_failing_probe(&config, &yaml).await;
    assert!(line.to_lowercase().contains("refused"), "{line}");
    assert!(!line.contains("AUTH"), "{line}");
    assert!(!line.contains("s3cret"), "{line}");
}

#[tokio::test]
async fn a_wrong_redis_password_is_logged_as_the_cause_without_the_password() {
    let redis = test_support::RedisServer::start_with(test_support::RedisOptions {
        password: Some("s3cret-redis-password".to_owned()),
        ..Default::default()
    });
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("redis-password");
    std::fs::write(&password, "hunter2-wrong-password\n").unwrap();
    let yaml = redis_yaml_at(
        &mock,
        &redis.url(),
        &format!("    password_file: {}\n", password.display()),
        "deny",
    );
    let config = dir.path().join("gateway.yaml");
    let (gateway, line) = started_with_failing_probe(&config, &yaml).await;
    assert!(
        line.to_lowercase().contains("authentication"),
        "the cause is named: {line}"
    );
    assert!(line.contains("password_file (and username)"), "{line}");
    // Twenty requests fail at once (on_error deny): one line, counting them, not twenty.
    let request = format!("GET {RESET}?email=a%40b.io HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    let addr = gateway.addr;
    let sent: Vec<_> = (0..20)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move { raw(addr, request.as_bytes()).await.status })
        })
        .collect();
    for reply in sent {
        assert_eq!(reply.await.unwrap(), 503);
    }
    let failures = |logs: Vec<String>| {
        logs.into_iter()
            .filter(|l| l.contains("rate-limit store unavailable") && l.contains("\"failed\""))
            .count()
    };
    // The log reaches the test through a pipe: wait for the first line, then a moment more.
    let first = poll_until(100, async || failures(gateway.logs()), |n| *n > 0).await;
    assert!(first > 0, "the failures were logged");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(failures(gateway.logs()) <= 2, "{:?}", gateway.logs());
    // And every one of the twenty is in a line within a second or so, while Redis still
    // refuses (not held until the next failure, or its return).
    let counted = |logs: Vec<String>| -> u64 {
        logs.iter()
            .filter(|l| l.contains("rate-limit store unavailable"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|json| json["failed"].as_u64())
            .sum()
    };
    let logged = poll_until(100, async || counted(gateway.logs()), |n| *n >= 20).await;
    assert_eq!(logged, 20, "{:?}", gateway.logs());
    // The requests' line says what the probe knows of why, and on_error as it is written.
    let failed = gateway
        .logs()
        .into_iter()
        .find(|l| l.contains("rate-limit store unavailable"))
        .unwrap();
    let failed: serde_json::Value = serde_json::from_str(&failed).unwrap();
    assert!(
        failed["probe_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("authentication")),
        "{failed}"
    );
    assert_eq!(failed["on_error"], "deny", "{failed}");
    assert!(
        gateway.logs().iter().all(|l| !l.contains("hunter2")),
        "the password was logged"
    );
}

/// The ACL user the README lists, with `password` and the keys of `key_prefix`.
pub(crate) fn documented_acl_user(password: &str, key_prefix: &str) -> String {
    let readme = crate::deploy::read("README.md");
    let documented = readme
        .lines()
        .find(|l| l.starts_with("ACL SETUSER reset-gateway "))
        .expect("the README shows the ACL user");
    assert!(documented.contains(" >PASSWORD "), "{documented}");
    assert!(
        documented.contains(" ~reset-gateway:* ~{reset-gateway:* "),
        "{documented}"
    );
    documented
        .replace(">PASSWORD", &format!(">{password}"))
        .replace(
            "~reset-gateway:* ~{reset-gateway:*",
            &format!("~{key_prefix}:* ~{{{key_prefix}:*"),
        )
}

/// The ACL user the README lists is enough to share limits; a user who may not run the
/// script is not taken for a store that serves: `/readyz` and `store_up` say so.
#[tokio::test]
async fn the_documented_acl_user_serves_and_one_without_the_script_is_down() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_ACL_PASSWORD";
    let redis = RedisServer::start();
    let user = documented_acl_user("acl-user-password", "secured");
    assert_eq!(redis.command(&user).as_deref(), Some("+OK\r\n"), "{user}");
    let without_script = "ACL SETUSER no-script on >acl-user-password resetkeys ~secured:* \
                          -@all +mget +psetex +time";
    assert_eq!(redis.command(without_script).as_deref(), Some("+OK\r\n"));
    std::env::set_var(VARIABLE, "acl-user-password");
    let as_user = |mock: &MockServer, name: &str| {
        redis_yaml_at(
            mock,
            &redis.url(),
            &format!("    username: {name}\n    password_env: {VARIABLE}\n"),
            "deny",
        )
    };

    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = as_user(&mock, "reset-gateway");
    let a = Gateway::start_yaml(mock, &yaml).await;
    let b = Gateway::replica(&yaml).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    // Ready once the probe has found Redis serving (it runs at start).
    let ready = poll_until(100, || a.admin_get("/readyz"), |r| r.status == 200).await;
    assert_eq!(ready.status, 200);
    let log = redis.command("ACL LOG").unwrap_or_default();
    assert!(!log.contains("reset-gateway"), "refused: {log}");

    let c = Gateway::replica(&as_user(&a.mock, "no-script")).await;
    let ready = readiness_across_probes(&c).await;
    assert_eq!(ready, [503; 15]);
    let metrics = c.admin_get("/metrics").await.body;
    assert!(metrics.contains("reset_gateway_store_up 0"), "{metrics}");
    assert_eq!(
        c.reset_as_ios("email=carol%40example.com").await.status,
        503
    );
}

/// A key secret made from a file keeps its trailing newline when it is put in a variable
/// (`kubectl create secret --from-file`): a replica reading it from `key_secret_env` and one
/// reading the mounted file derive the same keys, and share the limit. Before, the
/// variable's newline was kept and the file's trimmed: two limits, each address's four
/// resets all forwarded.
#[tokio::test]
async fn a_key_secret_from_a_variable_or_a_file_with_its_newline_is_one_secret() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_KEY_SECRET_WITH_NEWLINE";
    let redis = RedisServer::start();
    let secret = "0123456789abcdef0123456789abcdef\n";
    let file = std::env::temp_dir().join(format!("key-secret-newline-{}", std::process::id()));
    std::fs::write(&file, secret).unwrap();
    std::env::set_var(VARIABLE, secret);
    let mock = MockServer::start(mock_config()).await.unwrap();
    let from_file = redis_yaml_at(&mock, &redis.url(), "", "deny").replace(
        &key_secret_file().display().to_string(),
        &file.display().to_string(),
    );
    let from_variable = from_file.replace(
        &format!("key_secret_file: {}", file.display()),
        &format!("key_secret_env: {VARIABLE}"),
    );
    assert!(from_variable.contains("key_secret_env"), "{from_variable}");
    let a = Gateway::start_yaml(mock, &from_file).await;
    let b = Gateway::replica(&from_variable).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    let _ = std::fs::remove_file(file);
}

/// A user whose ACL leaves `PING` out (the README's user, less `+ping`) is answered
/// `NOPERM` to the `PING` that checks a new or quiet connection: the connection works, and
/// requests are decided. Before, every request failed as `on_error` says while `/readyz`
/// said ready.
#[tokio::test]
async fn a_user_who_may_not_ping_still_shares_limits() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_NO_PING_PASSWORD";
    let redis = RedisServer::start();
    let documented = documented_acl_user("acl-user-password", "secured");
    let user = documented
        .replace("ACL SETUSER reset-gateway ", "ACL SETUSER no-ping ")
        .replace(" +ping", "");
    assert_ne!(user, documented.replace("reset-gateway ", "no-ping "));
    assert_eq!(redis.command(&user).as_deref(), Some("+OK\r\n"), "{user}");
    std::env::set_var(VARIABLE, "acl-user-password");
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml_at(
        &mock,
        &redis.url(),
        &format!("    username: no-ping\n    password_env: {VARIABLE}\n"),
        "deny",
    );
    let a = Gateway::start_yaml(mock, &yaml).await;
    let b = Gateway::replica(&yaml).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    // Ready once the probe has found Redis serving (it runs at start).
    let ready = poll_until(100, || a.admin_get("/readyz"), |r| r.status == 200).await;
    assert_eq!(ready.status, 200);
    let metrics = a.admin_get("/metrics").await.body;
    assert!(
        metrics.contains("reset_gateway_store_errors_total 0"),
        "{metrics}"
    );
}

/// A Redis with the documented ACL user, and a gateway (with `server_keys`) on it as that
/// user under `on_error: deny`, its password in the environment variable `variable`.
async fn acl_user_gateway(variable: &str, server_keys: &str) -> (RedisServer, Gateway) {
    let redis = RedisServer::start();
    let user = documented_acl_user("acl-user-password", "secured");
    assert_eq!(redis.command(&user).as_deref(), Some("+OK\r\n"), "{user}");
    // Each test runs in its own process: setting the variable touches no other test.
    std::env::set_var(variable, "acl-user-password");
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml_at(
        &mock,
        &redis.url(),
        &format!("    username: reset-gateway\n    password_env: {variable}\n"),
        "deny",
    );
    let gw = Gateway::start_yaml(mock, &with_server_keys(&yaml, server_keys)).await;
    (redis, gw)
}

/// The gateway's ACL user switched off and its connections closed (AUTH then refused,
/// which the Redis client does not retry as it does a broken connection), then switched on
/// again: the gateway serves again within seconds, without a restart.
#[tokio::test]
async fn the_gateway_serves_again_once_its_refused_acl_user_is_back() {
    let (redis, gw) = acl_user_gateway("RESET_GATEWAY_TEST_ACL_PASSWORD_OFF_ON", "").await;
    let ask = || async { gw.reset_as_ios("email=alice%40example.com").await.status };
    assert_eq!(ask().await, 200);

    assert_eq!(
        redis.command("ACL SETUSER reset-gateway off").as_deref(),
        Some("+OK\r\n")
    );
    assert!(redis.command("CLIENT KILL USER reset-gateway").is_some());
    let down = poll_until(100, || gw.admin_get("/readyz"), |r| r.status == 503).await;
    assert_eq!(down.status, 503, "refused while the user is off");
    assert_eq!(ask().await, 503);

    assert_eq!(
        redis.command("ACL SETUSER reset-gateway on").as_deref(),
        Some("+OK\r\n")
    );
    let ready = poll_until(250, || gw.admin_get("/readyz"), |r| r.status == 200).await;
    assert_eq!(ready.status, 200, "ready again once the user is back");
    assert_eq!(poll_until(100, ask, |s| *s == 200).await, 200);
}

/// As above, but only the connections that carried requests are closed; the probe's stays
/// open and finds Redis serving throughout, so only the worker threads see AUTH refused
/// when they remake theirs. The Redis client remakes a connection only after an I/O error:
/// each thread makes its own anew, and serves again once the user is back, though nothing
/// else told it Redis was away (every request got 503 for as long as the gateway ran).
#[tokio::test]
async fn a_request_connection_refused_at_auth_is_made_anew_once_the_user_is_back() {
    // One worker thread, whose connection is the one refused.
    let (redis, gw) = acl_user_gateway(
        "RESET_GATEWAY_TEST_ACL_PASSWORD_REQUESTS_ONLY",
        "  workers: 1\n",
    )
    .await;
    let ask = || async { gw.reset_as_ios("email=alice%40example.com").await.status };
    assert_eq!(ask().await, 200);

    assert_eq!(
        redis.command("ACL SETUSER reset-gateway off").as_deref(),
        Some("+OK\r\n")
    );
    // The probe's connection last sent its own write (PSETEX), the requests' their script.
    let clients = redis.command("CLIENT LIST").unwrap();
    let carried_requests: Vec<&str> = clients
        .lines()
        .filter(|line| line.contains(" cmd=evalsha "))
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next())
        .collect();
    assert!(!carried_requests.is_empty(), "{clients}");
    for id in carried_requests {
        assert!(redis.command(&format!("CLIENT KILL ID {id}")).is_some());
    }
    assert_eq!(poll_until(100, ask, |s| *s == 503).await, 503);
    // Until a thread has tried to make its connection again, and been refused.
    let refused = poll_until(
        100,
        async || redis.command("ACL LOG").unwrap_or_default(),
        |log| log.contains("reset-gateway"),
    )
    .await;
    assert!(refused.contains("auth"), "{refused}");
    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "the probe's own connection still serves");

    assert_eq!(
        redis.command("ACL SETUSER reset-gateway on").as_deref(),
        Some("+OK\r\n")
    );
    assert_eq!(poll_until(250, ask, |s| *s == 200).await, 200);
}

/// Redis runs every call it has received, however late: calls sent while it stalls would
/// all charge their requests once it resumes, though each request was answered as
/// `on_error` says (503 here) and no reset was sent. After a call that got no answer, the
/// next waits for a `PING` to come back first, and the requests that give up meanwhile
/// are not sent: at most the call in flight when Redis stalled is charged.
#[tokio::test]
async fn requests_answered_while_redis_stalls_are_not_charged_when_it_resumes() {
    let redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = redis_yaml_at(&mock, &redis.url(), "", "deny").replace("300ms", "100ms");
    let gw = Gateway::start_yaml(mock, &with_server_keys(&yaml, "  workers: 1\n")).await;
    gw.mock.add_user("bob@example.com");
    let ask = async |email: &str| gw.reset_as_ios(&format!("email={email}")).await.status;
    assert_eq!(ask("bob%40example.com").await, 200);

    redis.signal("STOP");
    for _ in 0..3 {
        assert_eq!(ask("alice%40example.com").await, 503);
    }
    redis.signal("CONT");
    // Redis answers again.
    assert_eq!(
        poll_until(200, async || ask("bob%40example.com").await, |s| *s == 200).await,
        200
    );
    // Alice's quota is 3 an hour: at most one of the three refused requests counted.
    assert_eq!(ask("alice%40example.com").await, 200);
    assert_eq!(ask("alice%40example.com").await, 200);
}
