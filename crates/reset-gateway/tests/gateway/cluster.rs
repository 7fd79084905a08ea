//! Limits in a real Redis Cluster of three masters: two gateways share one limit, keys
//! spread over the masters, and thousands of slots move while requests flow.

use std::time::{Duration, Instant};

use qb_mock::MockServer;

use crate::common::*;
use crate::redis::four_resets;
use crate::redis::{another_ca_is_not_trusted, two_gateways_trusting};
use test_support::{ClusterOptions, RedisCluster};

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

/// A gateway config for the cluster at the seed `nodes`, with a per-email limit only (so
/// each address has exactly one key), more `store.redis` keys, and `on_error`.
fn per_email_yaml(
    mock: &MockServer,
    nodes: &[String],
    redis_extra: &str,
    on_error: &str,
) -> String {
    yaml(
        &mock.url(),
        "  responses: { uniform: false }\n  limits:\n    per_ip: []\n    per_client: []\n    per_email: [{ requests: 3, per: 1h }]\n    global: []\n",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    mode: cluster\n    nodes: [{}]\n    key_prefix: cluster\n    timeout: 300ms\n    on_error: {on_error}\n{redis_extra}",
            key_secret_file().display(),
            nodes.join(", "),
        ),
    )
}

/// Thirty addresses reset through `a` and `b` in turn, all admitted: their keys land on
/// every master.
async fn addresses_reach_every_master(a: &Gateway, b: &Gateway, cluster: &RedisCluster) {
    for i in 0..30 {
        a.mock.add_user(&format!("user{i}@example.com"));
    }
    for i in 0..30 {
        let gateway = [a, b][i % 2];
        let reply = gateway
            .reset_as_ios(&format!("email=user{i}%40example.com"))
            .await;
        assert_eq!(reply.status, 200, "user{i}: {reply:?}");
    }
    let per_node = keys_per_node(cluster);
    assert!(
        per_node.iter().all(|&n| n > 0),
        "keys per master: {per_node:?}"
    );
}

/// How many keys of limits each master holds (not the probe's).
fn keys_per_node(cluster: &RedisCluster) -> Vec<usize> {
    let mut per_node = vec![0; cluster.nodes.len()];
    for (node, ..) in cluster.quota_keys() {
        per_node[node] += 1;
    }
    per_node
}

#[tokio::test]
async fn a_killed_master_serves_no_5xx_and_applies_limits_again_once_back() {
    let mut cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = per_email_yaml(&mock, &cluster.urls(), "", "allow");
    let a = Gateway::start_yaml(mock, &yaml).await;
    let b = Gateway::replica(&yaml).await;
    let address = |i: usize| format!("email=user{i}%40example.com");
    for i in 0..40 {
        a.mock.add_user(&format!("user{i}@example.com"));
    }

    // Which master holds each address's one key: the one whose key count grows.
    let mut home = Vec::new();
    for i in 0..40 {
        let before = keys_per_node(&cluster);
        assert_eq!(a.reset_as_ios(&address(i)).await.status, 200);
        let after = keys_per_node(&cluster);
        home.push((0..3).find(|&n| after[n] > before[n]).expect("a new key"));
    }
    // The master holding user0's key goes; user0 is at its limit on it first.
    let victim = home[0];
    let on_victim: Vec<usize> = (1..40).filter(|&i| home[i] == victim).collect();
    let elsewhere: Vec<usize> = (1..40).filter(|&i| home[i] != victim).collect();
    assert!(
        on_victim.len() >= 4 && elsewhere.len() >= 4,
        "addresses per master: {home:?}"
    );
    let mut statuses = Vec::new();
    for gateway in [&b, &a, &b] {
        statuses.push(gateway.reset_as_ios(&address(0)).await.status);
    }
    assert_eq!(statuses, [200, 200, 429], "the limit was written");

    // While it is down, and while the others call the cluster down, on_error: allow
    // serves every request: no 5xx, whichever master the address lives on.
    let killed = Instant::now();
    cluster.kill(victim);
    let live = (victim + 1) % 3;
    let mut down = Vec::new();
    let mut cluster_failed = false;
    for round in 0.. {
        for (gateway, i) in [
            (&a, on_victim[0]),
            (&b, elsewhere[round % (elsewhere.len() - 2)]),
        ] {
            let status = gateway.reset_as_ios(&address(i)).await.status;
            down.push(status);
            assert!(status < 500, "a 5xx with a master down: {down:?}");
        }
        cluster_failed = cluster.nodes[live]
            .command("CLUSTER INFO")
            .is_some_and(|info| info.contains("cluster_state:fail"));
        if cluster_failed || killed.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    assert!(cluster_failed, "the other masters did not notice");
    // The address on the dead master (one reset before) was served every time, uncounted.
    assert!(
        down.iter().step_by(2).all(|&s| s == 200),
        "user{}: {down:?}",
        on_victim[0]
    );

    // Back on its port with its nodes.conf (and without its keys: nothing is persisted),
    // it gets limits again, on both gateways, without their restart: the 429 of an
    // address that lives on it is a decision only that master can make.
    let restarted = Instant::now();
    cluster.restart(victim);
    for (gateway, i) in [(&a, on_victim[1]), (&b, on_victim[2])] {
        reset_until_limited(gateway, &address(i), restarted, "after the restart").await;
    }
    let recovered = restarted.elapsed();
    assert!(
        keys_per_node(&cluster)[victim] > 0,
        "the restarted master holds the new keys"
    );
    // The other masters refuse (CLUSTERDOWN) until they clear the failure flag of the one
    // that came back, some seconds later; until then on_error: allow serves, then they
    // decide again too.
    let other = elsewhere[elsewhere.len() - 2];
    let mut statuses = Vec::new();
    loop {
        let gateway = [&a, &b][statuses.len() % 2];
        let status = gateway.reset_as_ios(&address(other)).await.status;
        statuses.push(status);
        assert!(status < 500, "a 5xx after the restart: {statuses:?}");
        if status == 429 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "the other masters did not decide again within 15 s: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = restarted.elapsed();
    // Once the cluster is whole, limits are exact again on every master: on the restarted
    // one from zero (the reset it counted before was lost with it), on the others from
    // what they held.
    cluster.wait_ok(Duration::from_secs(5));
    for (i, expected) in [
        (on_victim[3], &[200, 200, 200, 429][..]),
        (elsewhere[elsewhere.len() - 1], &[200, 200, 429][..]),
    ] {
        let mut statuses = Vec::new();
        for gateway in [&a, &b, &a, &b].into_iter().take(expected.len()) {
            statuses.push(gateway.reset_as_ios(&address(i)).await.status);
        }
        assert_eq!(statuses, expected, "user{i}");
    }
    eprintln!(
        "down {:?} ({} requests, none 5xx); limits applied again on the restarted master \
         {recovered:?} after its restart, on all {all:?} after",
        restarted - killed,
        down.len()
    );
}

/// The README's ACL user on every node: two gateways share limits on every master, and no
/// node refuses them anything (a refused `GET` in the per-master script sent every call
/// the slow way, slot by slot, with nothing wrong to see but in Redis's ACL LOG).
#[tokio::test]
async fn the_documented_acl_user_works_on_every_cluster_node() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_CLUSTER_ACL_PASSWORD";
    let cluster = RedisCluster::start();
    let user = crate::redis::documented_acl_user("cluster-acl-password", "cluster");
    for node in &cluster.nodes {
        assert_eq!(node.command(&user).as_deref(), Some("+OK\r\n"), "{user}");
    }
    std::env::set_var(VARIABLE, "cluster-acl-password");
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = per_email_yaml(
        &mock,
        &cluster.urls(),
        &format!("    username: reset-gateway\n    password_env: {VARIABLE}\n"),
        "deny",
    );
    let a = Gateway::start_yaml(mock, &yaml).await;
    let b = Gateway::replica(&yaml).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    addresses_reach_every_master(&a, &b, &cluster).await;
    // Ready once the probe has found Redis serving (it runs at start).
    let ready = poll_until(100, || a.admin_get("/readyz"), |r| r.status == 200).await;
    assert_eq!(ready.status, 200);
    // Once a gateway has read the slot map, it decides on each master in one call whose
    // script reads keys with GET: go on until a node has seen such a call.
    let mut sent = 0;
    let per_master_call = poll_until(
        100,
        async || {
            sent += 1;
            a.reset_as_ios(&format!("email=more{sent}%40example.com"))
                .await;
            // Redis lists a command once it was called or refused.
            cluster.nodes.iter().any(|node| {
                let stats = node.command("INFO commandstats").unwrap_or_default();
                stats.lines().any(|l| l.starts_with("cmdstat_get:"))
            })
        },
        |seen| *seen,
    )
    .await;
    assert!(per_master_call, "no per-master call after {sent} requests");
    for node in &cluster.nodes {
        let log = node.command("ACL LOG").unwrap_or_default();
        assert!(!log.contains("reset-gateway"), "refused: {log}");
    }
}

#[tokio::test]
async fn auth_on_every_cluster_node_from_env_or_file_shares_one_limit() {
    const PASSWORD: &str = "s3cret-cluster-password";
    const VARIABLE: &str = "RESET_GATEWAY_TEST_CLUSTER_PASSWORD";
    // Every node wants the password (requirepass, masterauth); redis-cli joins them with it.
    let cluster = RedisCluster::start_with(ClusterOptions {
        password: Some(PASSWORD.to_owned()),
        ..Default::default()
    });
    // Each test runs in its own process: setting the variable touches no other test.
    std::env::set_var(VARIABLE, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let mock = MockServer::start(mock_config()).await.unwrap();
    // One seed node: the others, learned from it, are asked with the same password.
    let seed = &cluster.urls()[..1];
    let from_env = per_email_yaml(
        &mock,
        seed,
        &format!("    password_env: {VARIABLE}\n"),
        "deny",
    );
    let from_file = per_email_yaml(
        &mock,
        seed,
        &format!("    password_file: {}\n", password_file.display()),
        "deny",
    );
    let a = Gateway::start_yaml(mock, &from_env).await;
    let b = Gateway::replica(&from_file).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);

    // Addresses on every master, from both gateways: under on_error: deny, a node that
    // refused either would answer 503.
    addresses_reach_every_master(&a, &b, &cluster).await;

    // Without the password every node refuses: under on_error deny, 503, and not ready.
    let no_password = per_email_yaml(&a.mock, seed, "", "deny");
    let c = Gateway::replica(&no_password).await;
    let reply = c.reset_as_ios("email=bob%40example.com").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(
        reply.body,
        r#"{"errors":{"base":["Rate limiter unavailable"]}}"#
    );
    let ready = readiness_across_probes(&c).await;
    assert_eq!(ready, [503; 15], "not ready without the password");
    // The gateways with it go on deciding.
    assert_eq!(
        a.reset_as_ios("email=alice%40example.com").await.status,
        429
    );
}

#[tokio::test]
async fn tls_on_every_cluster_node_with_a_private_ca_and_not_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    // TLS for clients and on the cluster bus; redis-cli joins the nodes over it. Each
    // node's plain port stays open for the test's own commands, but a TLS client is told
    // TLS ports only: a node reached in plain text would fail the handshake.
    let cluster = RedisCluster::start_with(ClusterOptions {
        tls: Some((cert, key, ca.clone())),
        ..Default::default()
    });
    // The seed by name, the others by the address the cluster gives (127.0.0.1): the
    // certificate carries both.
    let seed = &cluster.tls_urls("localhost")[..1];
    let (a, b) = two_gateways_trusting(&ca, |mock, ca_file| {
        per_email_yaml(mock, seed, ca_file, "deny")
    })
    .await;
    addresses_reach_every_master(&a, &b, &cluster).await;
    // Every master's clients (but the test asking) came in on its TLS port.
    for (node, url) in cluster.nodes.iter().zip(cluster.tls_urls("127.0.0.1")) {
        let tls = url.trim_start_matches("rediss://");
        let clients = node.command("CLIENT LIST").unwrap_or_default();
        let gateways: Vec<&str> = clients
            .lines()
            .filter(|line| line.contains(" laddr=") && !line.contains("cmd=client|list"))
            .collect();
        assert!(
            !gateways.is_empty()
                && gateways
                    .iter()
                    .all(|l| l.contains(&format!(" laddr={tls} "))),
            "clients not on {tls}: {clients}"
        );
    }

    // Certificates from another CA do not verify: under on_error deny, 503, not ready.
    another_ca_is_not_trusted(|ca_file| per_email_yaml(&a.mock, seed, ca_file, "deny")).await;
    assert_eq!(
        a.reset_as_ios("email=alice%40example.com").await.status,
        429
    );
}

/// Managed clusters over TLS (ElastiCache's) announce their nodes by hostname, with
/// certificates that name only hostnames: here every node announces `localhost`
/// (`cluster-announce-hostname`, `cluster-preferred-endpoint-type hostname`) and its
/// certificate names `localhost` alone. While the nodes still announce their IP address,
/// which the certificate does not name, no connection to a master verifies, and the probe
/// says why.
#[tokio::test]
async fn tls_on_a_cluster_announcing_hostnames_with_certificates_naming_only_them() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates_for(dir.path(), &["localhost"]);
    let cluster = RedisCluster::start_with(ClusterOptions {
        tls: Some((cert, key, ca.clone())),
        ..Default::default()
    });
    let seed = &cluster.tls_urls("localhost")[..1];
    let yaml = |mock: &MockServer, ca_file: &str| per_email_yaml(mock, seed, ca_file, "deny");

    let mock = MockServer::start(mock_config()).await.unwrap();
    let ca_line = format!("    ca_file: {}\n", ca.display());
    let text = yaml(&mock, &ca_line);
    let by_address = Gateway::start_yaml(mock, &text).await;
    let refused = by_address.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(refused.status, 503, "127.0.0.1 is not in the certificate");
    drop(by_address);
    // The probe's line says so, and what to change: not that the port may not speak TLS
    // (the seed answered over TLS).
    let (line, _) = probe_failure(&text.replace("timeout: 300ms", "timeout: 50ms")).await;
    assert!(line.contains("master 127.0.0.1:"), "{line}");
    assert!(line.contains("not valid for name"), "{line}");
    assert!(line.contains("cluster-announce-hostname"), "{line}");
    assert!(!line.contains("rediss:// is for a TLS port"), "{line}");

    for node in &cluster.nodes {
        for setting in [
            "cluster-announce-hostname localhost",
            "cluster-preferred-endpoint-type hostname",
        ] {
            let reply = node.command(&format!("CONFIG SET {setting}"));
            assert_eq!(reply.as_deref().map(str::trim), Some("+OK"), "{setting}");
        }
    }
    // Every node has heard every other's hostname (the cluster bus gossips it).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.nodes.iter().all(|node| {
        node.command("CLUSTER SLOTS")
            .is_some_and(|slots| slots.matches("localhost").count() >= 3)
    }) {
        assert!(
            Instant::now() < deadline,
            "the nodes never announced hostnames"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (a, b) = two_gateways_trusting(&ca, yaml).await;
    addresses_reach_every_master(&a, &b, &cluster).await;
}

#[tokio::test]
async fn two_gateways_share_limits_in_a_cluster_while_slots_move() {
    let cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    // One seed node is enough: the client learns the others from it.
    let yaml = cluster_yaml(&mock, &cluster.urls()[..1]);
    let a = Gateway::start_yaml(mock, &yaml).await;
    // B has its own (unused) mock; its upstream is A's, which knows every address used.
    let b = Gateway::replica(&yaml).await;
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
        // -1: no expiry; -2: gone since the dump, so it had one (the global key's lasts
        // about a second).
        let ttl = cluster.pttl(*node, key);
        assert!(ttl > 0 || ttl == -2, "{key} has no expiry ({ttl})");
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
    // Rounds in which a gateway's probe reported the store down: the slots that move are
    // where the probe's own keys are (a master's lowest slot moves first).
    let mut down = Vec::new();
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
        for gateway in [&a, &b] {
            let metrics = gateway.admin_get("/metrics").await.body;
            if sample(&metrics, "reset_gateway_store_up") != Some(1.0) {
                down.push(rounds);
            }
        }
        rounds += 1;
        assert!(rounds < 2000, "the reshard did not end");
    }
    eprintln!(
        "{rounds} addresses (x4 requests) while 3000 slots moved, in {:?}",
        started.elapsed()
    );
    assert!(bad.is_empty(), "wrong answers while slots moved: {bad:?}");
    assert!(down.is_empty(), "reported down while slots moved: {down:?}");
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
    let check = check_redis_section;
    let cluster = "    mode: cluster\n    nodes: [redis://10.0.0.1:6379, redis://10.0.0.2:6379]\n";
    check(cluster).unwrap();
    check(&format!(
        "    mode: cluster\n    nodes: [rediss://10.0.0.1:6379]\n    username: limiter\n    password_file: {}\n",
        key_secret_file().display()
    ))
    .unwrap();
    let refused = [
        ("    mode: cluster\n", "store.redis.nodes (line", "needs seed nodes"),
        ("    mode: cluster\n    nodes: []\n", "store.redis.nodes (line", "needs seed nodes"),
        (&format!("{cluster}    url: redis://10.0.0.3:6379\n"), "store.redis.url (line", "seed nodes go in nodes"),
        (&format!("{cluster}    sentinel_master: mymaster\n"), "store.redis.sentinel_master (line", "is for mode: sentinel"),
        (&format!("{cluster}    key_prefix: 'a{{b}}'\n"), "store.redis.key_prefix (line", "hash tags"),
        (&format!("{cluster}    key_prefix: 'rg*'\n"), "store.redis.key_prefix (line", "glob character"),
        ("    mode: cluster\n    nodes: [redis://10.0.0.1:6379, 'redis://:hunter2-password@10.0.0.2:6379']\n", "store.redis.nodes (line", "node 2 holds a password"),
        ("    mode: cluster\n    nodes: [redis://10.0.0.1:6379, rediss://10.0.0.2:6379]\n", "store.redis.nodes (line", "same scheme"),
        ("    mode: cluster\n    nodes: [not a url]\n", "store.redis.nodes (line", "must start with redis:// or rediss://"),
        ("    mode: cluster\n    nodes: ['redis://not a host:6379']\n", "store.redis.nodes (line", "not a valid Redis URL"),
        (&format!("{cluster}    global_keys: 0\n"), "store.redis.global_keys (line", "must be 1 to 1024"),
        (&format!("{cluster}    global_keys: 1025\n"), "store.redis.global_keys (line", "must be 1 to 1024"),
        ("    url: redis://10.0.0.1:6379\n    global_keys: 3\n", "store.redis.global_keys (line", "is for mode: cluster"),
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

/// Spread over N keys, each global quota's burst is cut in N: a burst below N is refused,
/// on the line of the quota, at start and at a reload alike (both check the whole file).
#[test]
fn a_global_burst_below_global_keys_is_refused_on_its_line() {
    let store = format!(
        "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    mode: cluster\n    nodes: [redis://10.0.0.1:6379]\n    global_keys: 3\n",
        key_secret_file().display()
    );
    let check = |global: &str| {
        let limits = format!(
            "  limits: {{ per_ip: [], per_client: [], per_email: [], global: {global} }}\n"
        );
        let yaml = yaml("http://127.0.0.1:9", &limits, &store);
        let line = 1 + yaml.lines().position(|l| l.contains("global: [")).unwrap();
        reset_gateway::GatewayConfig::from_yaml(&yaml)
            .unwrap()
            .validate_with_key(&yaml, reset_guard::ApiKey::new(SERVER_KEY).unwrap())
            .map(|_| ())
            .map_err(|e| (line, e.to_string()))
    };
    check("[{ requests: 100, per: 1s }]").unwrap();
    check("[{ requests: 100, per: 1s, burst: 3 }]").unwrap();
    check("[]").unwrap();
    let (line, shown) =
        check("[{ requests: 100, per: 1s }, { requests: 1000, per: 1h, burst: 2 }]").unwrap_err();
    assert!(
        shown.contains(&format!("guard.limits.global[1] (line {line})"))
            && shown.contains(
                "burst of 2, below the 3 keys the global group is spread over (store.redis.global_keys)"
            ),
        "{shown}"
    );
}

/// `global_keys` changes only on restart: a reload's global bursts are held to the
/// running store's, not to what the file says now (a file that drops global_keys and the
/// burst to 1 would have the running three keys admit three at once).
#[tokio::test]
async fn a_reload_holds_global_bursts_to_the_running_global_keys() {
    let cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    for i in 0..10 {
        mock.add_user(&format!("user{i}@example.com"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let file = |global: &str, extra: &str| {
        yaml(
            &mock.url(),
            &format!("  responses: {{ uniform: false }}\n  limits:\n    per_ip: []\n    per_client: []\n    per_email: []\n    global: {global}\n"),
            &format!(
                "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    mode: cluster\n    nodes: [{}]\n    timeout: 1s\n    on_error: deny\n{extra}",
                key_secret_file().display(),
                cluster.urls().join(", "),
            ),
        )
    };
    std::fs::write(
        &path,
        file("[{ requests: 300, per: 1h }]", "    global_keys: 3\n"),
    )
    .unwrap();
    let gw = crate::process::spawn_gateway(&path);
    std::fs::write(&path, file("[{ requests: 1, per: 1h }]", "")).unwrap();
    gw.signal("HUP");
    let rejected = gw.reload_rejection().await;
    assert!(
        rejected.contains("guard.limits.global[0]")
            && rejected.contains("burst of 1, below the 3 keys")
            && rejected.contains("running gateway"),
        "{rejected}"
    );
    // The running limits stay: 300 an hour over three keys.
    for i in 0..10 {
        let request = format!("GET {RESET}?email=user{i}%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
        assert_eq!(
            raw(gw.addr, request.as_bytes()).await.status,
            200,
            "user{i}"
        );
    }
}

/// The shipped cluster example, as a deployment writes it (its seed nodes, upstream and
/// secrets), runs against a real cluster: an address gets its three resets an hour, on
/// both of two replicas, with the global group spread over the three masters.
#[tokio::test]
async fn the_cluster_example_serves_on_a_real_cluster() {
    let cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let example = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/examples/redis-cluster.yaml"
    ));
    let path = crate::process::deployed_copy(example, dir.path(), true);
    let secret = dir.path().join("key_secret");
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace("https://api.quickblox.com", &mock.url())
        .replace(
            "[redis://redis-1:6379, redis://redis-2:6379, redis://redis-3:6379]",
            &format!("[{}]", cluster.urls().join(", ")),
        )
        .replace(
            "key_secret_env: RESET_GATEWAY_KEY_SECRET",
            &format!("key_secret_file: {}", secret.display()),
        );
    assert!(yaml.contains("global_keys: 3") && yaml.contains(&cluster.urls()[0]));
    std::fs::write(&path, format!("{yaml}admin:\n  listen: 127.0.0.1:0\n")).unwrap();
    let (a, b) = (
        crate::process::spawn_gateway(&path),
        crate::process::spawn_gateway(&path),
    );
    let reset = |addr| async move {
        let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
        raw(addr, request.as_bytes()).await.status
    };
    let mut statuses = Vec::new();
    for addr in [a.addr, b.addr, a.addr, b.addr] {
        statuses.push(reset(addr).await);
    }
    // The fourth, refused, is answered as a success (uniform answers), never forwarded.
    assert_eq!(statuses, [200, 200, 200, 200]);
    assert_eq!(mock.requests().len(), 3, "forwarded");
    let globals = cluster
        .quota_keys()
        .into_iter()
        .filter(|(_, key, _)| key.contains(":global:"))
        .count();
    assert_eq!(globals, 1, "one request's global key so far");
}

#[tokio::test]
async fn readiness_follows_every_master_under_deny() {
    let mut cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = per_email_yaml(&mock, &cluster.urls(), "", "deny");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let ready = async || gw.admin_get("/readyz").await.status;
    assert_eq!(poll_until(300, ready, |s| *s == 200).await, 200);

    // No request is sent: only the probe can tell that one master of three went.
    cluster.kill(1);
    assert_eq!(
        poll_until(300, ready, |s| *s == 503).await,
        503,
        "a master is gone"
    );
    let metrics = gw.admin_get("/metrics").await.body;
    assert_eq!(sample(&metrics, "reset_gateway_store_up"), Some(0.0));
    // Requests whose keys live on the other masters are still decided; that does not
    // make the store whole.
    let mut decided = 0;
    for i in 0..30 {
        let status = gw
            .reset_as_ios(&format!("email=user{i}%40example.com"))
            .await
            .status;
        decided += usize::from(status != 503);
        assert_eq!(ready().await, 503, "after user{i}: {status}");
    }
    assert!(decided > 0, "no address lives on the masters left");

    cluster.restart(1);
    assert_eq!(
        poll_until(1000, ready, |s| *s == 200).await,
        200,
        "the cluster is whole again"
    );
    gw.mock.add_user("bob@example.com");
    assert_eq!(gw.reset_as_ios("email=bob%40example.com").await.status, 200);
}

/// A master at `maxmemory` that evicts nothing answers everything but refuses every write
/// (`OOM`), failing each request whose keys it holds: the probe, which writes a key of its
/// own on every master, reports the store down until it takes writes again.
#[tokio::test]
async fn a_master_that_refuses_writes_is_reported_down() {
    let cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = per_email_yaml(&mock, &cluster.urls(), "", "deny");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let ready = async || gw.admin_get("/readyz").await.status;
    assert_eq!(poll_until(300, ready, |s| *s == 200).await, 200);
    // One probe key on each master, in a slot it serves, expiring.
    let probe_keys = async || {
        let mut keys = cluster.dump();
        keys.retain(|(_, key, _)| key.contains(":probe:"));
        keys
    };
    let probes = poll_until(300, probe_keys, |keys| keys.len() == 3).await;
    let mut holders: Vec<usize> = probes.iter().map(|(node, ..)| *node).collect();
    holders.sort();
    assert_eq!(holders, [0, 1, 2], "{probes:?}");
    for (node, key, _) in &probes {
        let ttl = cluster.pttl(*node, key);
        assert!(ttl > 0 && ttl <= 10_000, "{key}: {ttl}");
    }

    for setting in ["maxmemory-policy noeviction", "maxmemory 1"] {
        let reply = cluster.nodes[2].command(&format!("CONFIG SET {setting}"));
        assert_eq!(reply.as_deref().map(str::trim), Some("+OK"), "{setting}");
    }
    assert_eq!(
        poll_until(300, ready, |s| *s == 503).await,
        503,
        "a master refuses writes"
    );
    let metrics = gw.admin_get("/metrics").await.body;
    assert_eq!(sample(&metrics, "reset_gateway_store_up"), Some(0.0));
    cluster.nodes[2].command("CONFIG SET maxmemory 0");
    assert_eq!(poll_until(300, ready, |s| *s == 200).await, 200);
}

/// The probe's line when the cluster client cannot connect, in a gateway process of its
/// own: waits for it (and a second more), and returns it with every line logged.
async fn probe_failure(yaml: &str) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = crate::process::spawn_gateway(&config);
    let line = crate::redis::probe_failure_line(&gateway).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    (line, gateway.logs())
}

/// A cluster whose nodes want a password, and the environment variable `variable` holding
/// another one (each test runs in its own process: setting it touches no other test).
fn cluster_refusing_the_password_in(variable: &str) -> RedisCluster {
    let cluster = RedisCluster::start_with(ClusterOptions {
        password: Some("the-cluster-password".to_owned()),
        ..Default::default()
    });
    std::env::set_var(variable, "not-the-cluster-password");
    cluster
}

/// Seed nodes that refuse the password, and a seed that is a single server, not a
/// cluster: the probe's line says what the seeds answered (the cluster client alone says
/// only that it has no connection), and the Redis client's own errors, one per retry of
/// each reconnection (dozens a second), stay out of the log. No password is logged.
#[tokio::test]
async fn the_probe_names_what_the_seed_nodes_answer() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_CLUSTER_WRONG_PASSWORD";
    let cluster = cluster_refusing_the_password_in(VARIABLE);
    let mock = MockServer::start(mock_config()).await.unwrap();
    let seed = &cluster.urls()[..1];
    let yaml = per_email_yaml(
        &mock,
        seed,
        &format!("    password_env: {VARIABLE}\n"),
        "deny",
    );
    let (line, logs) = probe_failure(&yaml).await;
    assert!(line.contains(&format!("seed {}: ", seed[0])), "{line}");
    assert!(line.to_lowercase().contains("authentication"), "{line}");
    // And where to look, as in the other modes.
    assert!(line.contains("password_env or password_file"), "{line}");
    let from_the_client: Vec<_> = logs
        .iter()
        .filter(|l| l.contains("\"target\":\"redis::"))
        .collect();
    assert!(from_the_client.is_empty(), "{from_the_client:?}");
    assert!(logs.iter().all(|l| !l.contains("not-the-cluster-password")));

    let single = test_support::RedisServer::start();
    let yaml = per_email_yaml(&mock, &[single.url()], "", "deny");
    let (line, _) = probe_failure(&yaml).await;
    assert!(line.contains("cluster support disabled"), "{line}");
    assert!(line.contains("mode: standalone"), "{line}");

    // A sentinel given as a seed.
    let sentinel = test_support::RedisServer::sentinel(single.port());
    let yaml = per_email_yaml(&mock, &[sentinel.url()], "", "deny");
    let (line, _) = probe_failure(&yaml).await;
    assert!(line.contains("(a sentinel? "), "{line}");
}

/// Seed nodes that refuse the password are not flooded with connections. The cluster
/// client, asked while it reaches no node, connects to the seeds anew for every question
/// and every retry of it, and goes on after the asker has stopped waiting: an idle gateway
/// made about 290 connections to the seed in 2 s, and 100 requests about 650 more. Now
/// the probe asks each seed over a connection of its own, and calls only the cluster client
/// could send are answered at once for a while after it reached no node.
#[tokio::test]
async fn seeds_refusing_the_password_are_not_flooded_with_connections() {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_CLUSTER_FLOOD_PASSWORD";
    let cluster = cluster_refusing_the_password_in(VARIABLE);
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = per_email_yaml(
        &mock,
        &cluster.urls()[..1],
        &format!("    password_env: {VARIABLE}\n"),
        "deny",
    );
    let seed = &cluster.nodes[0];
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let start = seed.connections_received();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = seed.connections_received() - start;
    for i in 0..100 {
        let reply = gw
            .reset_as_ios(&format!("email=flood{i}%40example.com"))
            .await;
        assert_eq!(reply.status, 503, "{reply:?}");
    }
    let busy = seed.connections_received() - start - idle;
    assert!(idle < 60, "{idle} connections in 2 s of an idle gateway");
    assert!(busy < 150, "{busy} connections for 100 requests");
}

/// A seed that is a cluster node whose slots are not assigned yet (started with
/// `cluster-enabled yes`, before `redis-cli --cluster create`), or that left its cluster:
/// it answers a slot map naming no master. The probe says so (requests are refused as
/// `on_error` says: `a_seed_serving_no_slot_fails_requests_as_on_error_says`).
#[tokio::test]
async fn a_seed_serving_no_slot_is_reported_down_with_the_reason() {
    let nodes = tempfile::tempdir().unwrap();
    let lone = test_support::lone_cluster_node(nodes.path());
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = per_email_yaml(&mock, &[lone.url()], "", "deny");
    let (line, _) = probe_failure(&yaml).await;
    assert!(line.contains("serves no slot"), "{line}");
}

/// `mode: standalone` given a node of a Redis Cluster: every request's keys span slots
/// (CROSSSLOT), so the probe reports the store down and says to use `mode: cluster`, rather
/// than passing because its own key happens to live on that node.
#[tokio::test]
async fn a_cluster_node_given_as_a_standalone_server_is_reported_with_the_mode_to_use() {
    let cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    // And a node whose slots are not assigned yet (CLUSTERDOWN).
    let nodes = tempfile::tempdir().unwrap();
    let lone = test_support::lone_cluster_node(nodes.path());
    let urls = cluster.nodes.iter().chain([&lone]).map(|node| node.url());
    for url in urls {
        let yaml = crate::redis::redis_yaml_at(&mock, &url, "", "deny");
        let (line, _) = probe_failure(&yaml).await;
        assert!(line.contains("Redis Cluster node"), "{url}: {line}");
        assert!(line.contains("mode: cluster"), "{url}: {line}");
    }
}

/// As in the other modes: requests answered while the masters stall are not charged once
/// they resume, but for those of the call in flight when they stalled.
#[tokio::test]
async fn requests_answered_while_the_masters_stall_are_not_charged_when_they_resume() {
    let cluster = RedisCluster::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = per_email_yaml(&mock, &cluster.urls()[..1], "", "deny").replace("300ms", "100ms");
    let gw = Gateway::start_yaml(mock, &with_server_keys(&yaml, "  workers: 1\n")).await;
    gw.mock.add_user("bob@example.com");
    let ask = async |email: &str| gw.reset_as_ios(&format!("email={email}")).await.status;
    assert_eq!(ask("bob%40example.com").await, 200);
    assert_eq!(ask("alice%40example.com").await, 200);

    for node in &cluster.nodes {
        node.signal("STOP");
    }
    for _ in 0..3 {
        assert_eq!(ask("alice%40example.com").await, 503);
    }
    for node in &cluster.nodes {
        node.signal("CONT");
    }
    assert_eq!(
        poll_until(300, async || ask("bob%40example.com").await, |s| *s == 200).await,
        200
    );
    // Alice's quota is 3 an hour, one spent before: at most one more counted meanwhile.
    // (Her master, whose call went unanswered, is asked again after a PING, at most 250 ms
    // after the last one failed.)
    let alice = async || ask("alice%40example.com").await;
    assert_eq!(poll_until(100, alice, |s| *s != 503).await, 200);
}
