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

#[tokio::test]
async fn two_replicas_enforce_one_per_email_limit_exactly() {
    let redis = RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let url = mock.url();
    let yaml = redis_yaml(&mock, &redis, "allow");
    let a = Gateway::start_yaml(mock, &yaml).await;
    // Replica B has its own (unused) mock; its upstream is A's, so one QuickBlox sees all.
    let b = Gateway::start_yaml(MockServer::start(mock_config()).await.unwrap(), &yaml).await;
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
    let dump = redis.dump();
    assert!(!dump.is_empty());
    for (key, value) in dump {
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
