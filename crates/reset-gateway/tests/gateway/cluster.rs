//! Limits in a real Redis Cluster of three masters: two gateways share one limit, keys
//! spread over the masters, and thousands of slots move while requests flow.

use std::time::Instant;

use qb_mock::MockServer;

use crate::common::*;
use test_support::RedisCluster;

fn cluster_yaml(mock: &MockServer, nodes: &[String]) -> String {
    yaml(
        &mock.url(),
        "  responses: { uniform: false }\n  limits:\n    per_ip: [{ requests: 100000, per: 1m }]\n    per_client: []\n    per_email: [{ requests: 3, per: 1h }]\n    global: [{ requests: 100000, per: 1s }]\n",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    mode: cluster\n    nodes: [{}]\n    key_prefix: cluster\n    timeout: 1s\n    on_error: allow\n",
            key_secret_file().display(),
            nodes.join(", "),
        ),
    )
}

#[tokio::test]
async fn two_gateways_share_limits_in_a_cluster_while_slots_move() {
    let cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    // One seed node is enough: the client learns the others from it.
    let yaml = cluster_yaml(&mock, &cluster.urls()[..1]);
    let a = Gateway::start_yaml(mock, &yaml).await;
    // B has its own (unused) mock; its upstream is A's, which knows every address used.
    let b = Gateway::start_yaml(MockServer::start(mock_config()).await.unwrap(), &yaml).await;
    a.mock.add_user("alice@example.com");
    for i in 0..30 {
        a.mock.add_user(&format!("user{i}@example.com"));
    }
    for i in 0..2000 {
        a.mock.add_user(&format!("moving{i}@example.com"));
    }

    // The 4th reset of one address is 429, whichever gateway sees it.
    let alice = "email=alice%40example.com";
    let mut statuses = Vec::new();
    for gateway in [&a, &b, &a, &b, &a] {
        statuses.push(gateway.reset_as_ios(alice).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);

    // Addresses spread over the masters; nothing names an address, client or token; every
    // key expires.
    for i in 0..30 {
        let status = a
            .reset_as_ios(&format!("email=user{i}%40example.com"))
            .await
            .status;
        assert_eq!(status, 200);
    }
    let dump = cluster.dump();
    let mut per_node = [0usize; 3];
    for (node, key, value) in &dump {
        per_node[*node] += 1;
        let both = format!("{key} {value}").to_lowercase();
        for secret in ["alice", "user", "example", "ios", IOS_TOKEN, "127.0.0.1"] {
            assert!(
                !both.contains(secret),
                "Redis holds {secret:?}: {key} = {value}"
            );
        }
        let ttl = cluster.pttl(*node, key);
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
    assert!(
        per_node.iter().all(|&n| n > 0),
        "keys per master: {per_node:?}"
    );
    eprintln!("keys per master: {per_node:?}");

    // Move 3000 slots from the first master to the second while requests flow: every
    // address gets exactly three resets, so a request that could not ask Redis (served
    // unlimited by on_error: allow) would show as a 4th 200.
    let from_slots = cluster.slots_of(0);
    let started = Instant::now();
    let mut mover = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard"])
        .arg(format!("127.0.0.1:{}", cluster.nodes[0].port()))
        .args(["--cluster-from", &cluster.node_id(0)])
        .args(["--cluster-to", &cluster.node_id(1)])
        .args(["--cluster-slots", "3000", "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli must be installed");
    let mut rounds = 0;
    let mut bad = Vec::new();
    loop {
        if let Some(moved) = mover.try_wait().unwrap().filter(|_| rounds >= 20) {
            assert!(moved.success(), "the reshard failed");
            break;
        }
        let address = format!("email=moving{rounds}%40example.com");
        let mut got = Vec::new();
        for gateway in [&a, &b, &a, &b] {
            got.push(gateway.reset_as_ios(&address).await.status);
        }
        if got != [200, 200, 200, 429] {
            bad.push((rounds, got));
        }
        rounds += 1;
        assert!(rounds < 2000, "the reshard did not end");
    }
    eprintln!(
        "{rounds} addresses (x4 requests) while 3000 slots moved, in {:?}",
        started.elapsed()
    );
    assert!(bad.is_empty(), "wrong answers while slots moved: {bad:?}");
    assert_eq!(cluster.slots_of(0), from_slots - 3000, "the slots moved");
    // Limits written before the move still hold afterwards, on either gateway.
    assert_eq!(a.reset_as_ios(alice).await.status, 429);
    assert_eq!(b.reset_as_ios(alice).await.status, 429);
    for i in 0..30 {
        let address = format!("email=user{i}%40example.com");
        for gateway in [&a, &b] {
            assert_eq!(gateway.reset_as_ios(&address).await.status, 200);
        }
        assert_eq!(a.reset_as_ios(&address).await.status, 429, "{address}");
    }
}

#[test]
fn cluster_mode_is_checked_without_echoing_a_node_password() {
    let check = |redis: &str| -> Result<(), String> {
        let yaml = yaml(
            "http://127.0.0.1:9",
            "",
            &format!(
                "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n{redis}",
                key_secret_file().display()
            ),
        );
        let config = reset_gateway::GatewayConfig::from_yaml(&yaml).map_err(|e| e.to_string())?;
        config
            .validate_with_key(&yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let cluster = "    mode: cluster\n    nodes: [redis://10.0.0.1:6379, redis://10.0.0.2:6379]\n";
    check(cluster).unwrap();
    check("    mode: cluster\n    nodes: [rediss://10.0.0.1:6379]\n    username: limiter\n")
        .unwrap();
    let refused = [
        ("    mode: cluster\n", "store.redis.nodes:", "needs seed nodes"),
        ("    mode: cluster\n    nodes: []\n", "store.redis.nodes (line", "needs seed nodes"),
        (&format!("{cluster}    url: redis://10.0.0.3:6379\n"), "store.redis.url (line", "seed nodes go in nodes"),
        (&format!("{cluster}    sentinel_master: mymaster\n"), "store.redis.sentinel_master (line", "is for mode: sentinel"),
        (&format!("{cluster}    key_prefix: 'a{{b}}'\n"), "store.redis.key_prefix (line", "hash tags"),
        ("    mode: cluster\n    nodes: [redis://10.0.0.1:6379, 'redis://:hunter2-password@10.0.0.2:6379']\n", "store.redis.nodes (line", "node 2 holds a password"),
        ("    mode: cluster\n    nodes: [redis://10.0.0.1:6379, rediss://10.0.0.2:6379]\n", "store.redis.nodes (line", "same scheme"),
        ("    mode: cluster\n    nodes: [not a url]\n", "store.redis.nodes (line", "not a valid Redis URL"),
    ];
    for (redis, path, why) in refused {
        let shown = check(redis).unwrap_err();
        assert!(shown.contains(path), "{redis}: {shown}");
        assert!(shown.contains(why), "{redis}: {shown}");
        assert!(
            !shown.contains("hunter2"),
            "the password was echoed: {shown}"
        );
    }
}
