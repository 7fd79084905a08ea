//! Limits in Redis through Sentinel: a real master, a replica and three sentinels, and a
//! failover the gateways follow without a restart, also with passwords everywhere; TLS to
//! the sentinels and the master.

use std::time::{Duration, Instant};

use qb_mock::MockServer;

use crate::common::*;
use crate::redis::{another_ca_is_not_trusted, four_resets, two_gateways_trusting};
use test_support::{free_port, RedisOptions, RedisServer, SentinelOptions, SENTINEL_MASTER};

/// A gateway config reaching Redis through the sentinels at `nodes`, with more
/// `store.redis` keys, and `on_error`.
fn sentinel_yaml(mock: &MockServer, nodes: &[String], redis_extra: &str, on_error: &str) -> String {
    yaml(
        &mock.url(),
        "  responses: { uniform: false }\n  limits:\n    per_ip: []\n    per_client: []\n    per_email: [{ requests: 3, per: 1h }]\n    global: []\n",
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    mode: sentinel\n    nodes: [{}]\n    sentinel_master: {SENTINEL_MASTER}\n    key_prefix: sentinel\n    timeout: 300ms\n    on_error: {on_error}\n{redis_extra}",
            key_secret_file().display(),
            nodes.join(", "),
        ),
    )
}

/// Waits (blocking) until `done` holds, at most `limit`; says whether it did.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// `count` sentinels of the master at `master_port`, each set up as `options` gives (a TLS
/// port of its own, say), once each says it reaches the master.
fn sentinels_reaching(
    master_port: u16,
    count: usize,
    options: impl Fn() -> SentinelOptions,
) -> Vec<RedisServer> {
    let sentinels: Vec<RedisServer> = (0..count)
        .map(|_| RedisServer::sentinel_with(master_port, options()))
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || sentinels
            .iter()
            .all(|s| s.sentinel_field("flags").as_deref() == Some("master"))),
        "the sentinels did not reach the master"
    );
    sentinels
}

/// A master, its replica and three sentinels (quorum 2) that know each other and the
/// replica, so a failover can happen. With `password`, every one of them wants it: the data
/// nodes (`requirepass`, and `masterauth` between them), the sentinels to reach them
/// (`auth-pass`) and the sentinels themselves (`requirepass`, shared between them).
fn master_replica_and_sentinels(
    password: Option<&str>,
) -> (RedisServer, RedisServer, Vec<RedisServer>) {
    let secured = RedisOptions {
        password: password.map(str::to_owned),
        ..Default::default()
    };
    let master = RedisServer::start_with(secured.clone());
    let replica = RedisServer::start_with(RedisOptions {
        replica_of: Some(master.port()),
        ..secured
    });
    assert!(
        wait_for(Duration::from_secs(10), || replica
            .command("INFO replication")
            .is_some_and(|info| info.contains("master_link_status:up"))),
        "the replica did not sync"
    );
    let sentinels: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::sentinel_with(
                master.port(),
                SentinelOptions {
                    auth_pass: password.map(str::to_owned),
                    password: password.map(str::to_owned),
                    ..Default::default()
                },
            )
        })
        .collect();
    // A failover needs the sentinels to know each other (they meet through the master
    // every 2 s) and the replica.
    assert!(
        wait_for(Duration::from_secs(15), || sentinels.iter().all(|s| {
            s.sentinel_field("num-other-sentinels").as_deref() == Some("2")
                && s.sentinel_field("num-slaves").as_deref() == Some("1")
        })),
        "the sentinels did not find each other and the replica"
    );
    (master, replica, sentinels)
}

/// Two gateways (the password, if any, from the environment) write limits to the master;
/// it is killed; both serve through the failover (`on_error: allow`), then enforce limits
/// on the promoted replica, which still has what was written before.
async fn a_failover_keeps_serving_and_the_limits(password: Option<&str>) {
    const VARIABLE: &str = "RESET_GATEWAY_TEST_SENTINEL_FAILOVER_PASSWORD";
    let (mut master, replica, sentinels) = master_replica_and_sentinels(password);
    let nodes: Vec<String> = sentinels.iter().map(RedisServer::url).collect();
    let mut extra = String::new();
    if let Some(password) = password {
        // Each test runs in its own process: setting the variable touches no other test.
        std::env::set_var(VARIABLE, password);
        extra = format!("    password_env: {VARIABLE}\n");
    }

    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = sentinel_yaml(&mock, &nodes, &extra, "allow");
    let a = Gateway::start_yaml(mock, &yaml).await;
    let b = Gateway::replica(&yaml).await;
    let alice = "email=alice%40example.com";
    for gateway in [&a, &b, &a] {
        assert_eq!(gateway.reset_as_ios(alice).await.status, 200);
    }
    assert!(holds_limits(&master), "the limits live in the master");
    // The replica has every write before the master goes.
    assert_eq!(master.command("WAIT 1 1000").as_deref(), Some(":1\r\n"));

    let killed = Instant::now();
    master.stop();
    // Until the gateways use the new master, on_error: allow serves every request; each
    // gateway has used it once another address reaches its limit (a 429 only Redis
    // decides).
    for (gateway, address) in [
        (&a, "email=bob%40example.com"),
        (&b, "email=carol%40example.com"),
    ] {
        reset_until_limited(gateway, address, killed, "during the failover").await;
    }
    let recovered = killed.elapsed();
    assert_eq!(
        sentinels[0].sentinel_master_port(),
        Some(replica.port()),
        "the sentinels promoted the replica"
    );
    // Alice's three resets, written before the failover, still count on the new master.
    assert_eq!(a.reset_as_ios(alice).await.status, 429);
    assert_eq!(b.reset_as_ios(alice).await.status, 429);
    assert!(holds_limits(&replica));
    eprintln!("limits applied again {recovered:?} after the master was killed");
}

#[tokio::test]
async fn a_failover_keeps_serving_and_keeps_the_limits_written_before_it() {
    a_failover_keeps_serving_and_the_limits(None).await;
}

#[tokio::test]
async fn a_failover_with_passwords_on_every_node_and_sentinel_keeps_the_limits() {
    a_failover_keeps_serving_and_the_limits(Some("s3cret-failover-password")).await;
}

#[tokio::test]
async fn tls_to_the_sentinels_and_the_master_with_a_private_ca_and_not_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let tls = || Some((free_port(), cert.clone(), key.clone(), ca.clone()));
    let master = RedisServer::start_with(RedisOptions {
        tls: tls(),
        ..Default::default()
    });
    let master_tls_port = master.options().tls.as_ref().unwrap().0;
    // The sentinels watch the master's TLS port, over TLS, and so name that port.
    let sentinels = sentinels_reaching(master_tls_port, 2, || SentinelOptions {
        tls: tls(),
        ..Default::default()
    });
    assert_eq!(sentinels[0].sentinel_master_port(), Some(master_tls_port));
    let nodes: Vec<String> = sentinels
        .iter()
        .map(|s| s.tls_url("localhost").unwrap())
        .collect();

    let (a, _b) = two_gateways_trusting(&ca, |mock, ca_file| {
        sentinel_yaml(mock, &nodes, ca_file, "deny")
    })
    .await;
    assert!(
        holds_limits(&master),
        "the limits went over TLS to the master the sentinels named"
    );

    // A certificate from another CA does not verify, the sentinels' or the master's: a
    // connection failure, handled by on_error (deny: 503, and not ready).
    another_ca_is_not_trusted(|ca_file| sentinel_yaml(&a.mock, &nodes, ca_file, "deny")).await;
}

#[tokio::test]
async fn auth_on_the_master_behind_sentinels_from_env_or_file_shares_one_limit() {
    const PASSWORD: &str = "s3cret-sentinel-master-password";
    const VARIABLE: &str = "RESET_GATEWAY_TEST_SENTINEL_MASTER_PASSWORD";
    let secured = RedisOptions {
        password: Some(PASSWORD.to_owned()),
        ..Default::default()
    };
    let master = RedisServer::start_with(secured.clone());
    // The replica authenticates to the master (masterauth), the sentinels to both
    // (auth-pass); the sentinels themselves want no password.
    let replica = RedisServer::start_with(RedisOptions {
        replica_of: Some(master.port()),
        ..secured
    });
    let sentinels: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::sentinel_with_auth(master.port(), Some(PASSWORD)))
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || replica
            .command("INFO replication")
            .is_some_and(|info| info.contains("master_link_status:up"))),
        "the replica did not sync with the password"
    );
    // A sentinel learns the replica from the master's INFO: it got in with auth-pass.
    assert!(
        wait_for(Duration::from_secs(10), || sentinels.iter().all(|s| {
            s.sentinel_field("num-slaves").as_deref() == Some("1")
                && s.sentinel_field("flags").as_deref() == Some("master")
        })),
        "the sentinels did not get into the master"
    );
    let nodes: Vec<String> = sentinels.iter().map(RedisServer::url).collect();

    // Each test runs in its own process: setting the variable touches no other test.
    std::env::set_var(VARIABLE, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let from_env = sentinel_yaml(
        &mock,
        &nodes,
        &format!("    password_env: {VARIABLE}\n"),
        "deny",
    );
    let from_file = sentinel_yaml(
        &mock,
        &nodes,
        &format!("    password_file: {}\n", password_file.display()),
        "deny",
    );
    let a = Gateway::start_yaml(mock, &from_env).await;
    let b = Gateway::replica(&from_file).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    assert!(
        holds_limits(&master),
        "the limits live in the password-protected master"
    );

    // Without the password the sentinels still name the master, but it refuses every
    // command: under on_error deny, 503.
    let no_password = sentinel_yaml(&a.mock, &nodes, "", "deny");
    let c = Gateway::replica(&no_password).await;
    let reply = c.reset_as_ios("email=bob%40example.com").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(
        reply.body,
        r#"{"errors":{"base":["Rate limiter unavailable"]}}"#
    );
    let ready = readiness_across_probes(&c).await;
    assert_eq!(ready, [503; 15], "not ready without the password");
}

/// Sentinels with a password of their own (`requirepass`), not the master's: given as
/// `sentinel_password_env` or `_file`, the sentinels are asked with it and the master with
/// its own, and two gateways share one limit. Without it, the sentinels refuse the
/// master's password, and the probe's line says which keys to set.
#[tokio::test]
async fn sentinels_with_a_password_of_their_own_are_asked_with_it() {
    const DATA: &str = "data-nodes-password";
    const SENTINELS: &str = "sentinels-own-password";
    const VARIABLE: &str = "RESET_GATEWAY_TEST_SENTINELS_OWN_PASSWORD";
    const MASTER_VARIABLE: &str = "RESET_GATEWAY_TEST_SENTINELS_DATA_PASSWORD";
    let secured = RedisOptions {
        password: Some(DATA.to_owned()),
        ..Default::default()
    };
    let master = RedisServer::start_with(secured);
    let sentinels = sentinels_reaching(master.port(), 3, || SentinelOptions {
        auth_pass: Some(DATA.to_owned()),
        password: Some(SENTINELS.to_owned()),
        ..Default::default()
    });
    let nodes: Vec<String> = sentinels.iter().map(RedisServer::url).collect();
    // Each test runs in its own process: setting the variables touches no other test.
    std::env::set_var(VARIABLE, SENTINELS);
    std::env::set_var(MASTER_VARIABLE, DATA);
    let dir = tempfile::tempdir().unwrap();
    let sentinel_file = dir.path().join("sentinel-password");
    std::fs::write(&sentinel_file, format!("{SENTINELS}\n")).unwrap();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let master_password = format!("    password_env: {MASTER_VARIABLE}\n");
    let from_env = sentinel_yaml(
        &mock,
        &nodes,
        &format!("{master_password}    sentinel_password_env: {VARIABLE}\n"),
        "deny",
    );
    let from_file = sentinel_yaml(
        &mock,
        &nodes,
        &format!(
            "{master_password}    sentinel_password_file: {}\n",
            sentinel_file.display()
        ),
        "deny",
    );
    let a = Gateway::start_yaml(mock, &from_env).await;
    let b = Gateway::replica(&from_file).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    assert!(holds_limits(&master), "the limits live in the master");

    let without = dir.path().join("without-sentinel-password.yaml");
    std::fs::write(
        &without,
        sentinel_yaml(&a.mock, &nodes, &master_password, "deny"),
    )
    .unwrap();
    let gateway = crate::process::spawn_gateway(&without);
    let line = crate::redis::probe_failure_line(&gateway).await;
    let logs = gateway.logs();
    assert!(line.contains("sentinel_password_env"), "{line}");
    assert!(
        logs.iter()
            .all(|l| !l.contains(DATA) && !l.contains(SENTINELS)),
        "a password was logged"
    );
}

/// An ACL user of the sentinels' own (`sentinel_username`) allowed nothing but the one
/// question the gateway asks them, as the README says to make it: two gateways share one
/// limit through it. A user of theirs without that command is named in the probe's line
/// with what it lacks, and no password is logged.
#[tokio::test]
async fn a_sentinel_user_that_may_only_ask_for_the_master_is_enough() {
    const SENTINELS: &str = "sentinels-default-password";
    const WATCHER: &str = "watcher-own-password";
    const VARIABLE: &str = "RESET_GATEWAY_TEST_SENTINEL_USER_PASSWORD";
    let master = RedisServer::start();
    let sentinels = sentinels_reaching(master.port(), 2, || SentinelOptions {
        password: Some(SENTINELS.to_owned()),
        users: vec![
            format!("watcher on >{WATCHER} -@all +sentinel|get-master-addr-by-name"),
            format!("blind on >{WATCHER} -@all +ping"),
        ],
        ..Default::default()
    });
    let nodes: Vec<String> = sentinels.iter().map(RedisServer::url).collect();
    // Each test runs in its own process: setting the variable touches no other test.
    std::env::set_var(VARIABLE, WATCHER);
    let as_user = |mock: &MockServer, user: &str| {
        sentinel_yaml(
            mock,
            &nodes,
            &format!("    sentinel_username: {user}\n    sentinel_password_env: {VARIABLE}\n"),
            "deny",
        )
    };
    let mock = MockServer::start(mock_config()).await.unwrap();
    let watcher = as_user(&mock, "watcher");
    let a = Gateway::start_yaml(mock, &watcher).await;
    let b = Gateway::replica(&watcher).await;
    assert_eq!(four_resets(&a, &b).await, [200, 200, 200, 429]);
    assert!(holds_limits(&master), "the limits live in the master");

    let dir = tempfile::tempdir().unwrap();
    let blind = dir.path().join("blind.yaml");
    std::fs::write(&blind, as_user(&a.mock, "blind")).unwrap();
    let gateway = crate::process::spawn_gateway(&blind);
    let line = crate::redis::probe_failure_line(&gateway).await;
    assert!(
        line.contains("sentinel 1 (") && line.contains("+sentinel|get-master-addr-by-name"),
        "{line}"
    );
    assert!(
        gateway
            .logs()
            .iter()
            .all(|l| !l.contains(WATCHER) && !l.contains(SENTINELS)),
        "a password was logged"
    );
}

/// A sentinel listed wrong (nothing listens there: a typo), before or after one that
/// answers: the gateway serves through the other, and says once, at `warn`, which sentinel
/// cannot be asked and why, rather than only at debug level, where the typo went unnoticed
/// until the other sentinels were down too. Listed after the one that answers, it is never
/// asked by a question for the master: the probe asks it once a master is named.
#[tokio::test]
async fn a_sentinel_listed_wrong_is_named_once_another_names_the_master() {
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel(master.port());
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (nodes, wrong) in [
        ([nowhere.clone(), sentinel.url()], 1),
        ([sentinel.url(), nowhere.clone()], 2),
    ] {
        let config = dir.path().join(format!("gateway-{wrong}.yaml"));
        std::fs::write(&config, sentinel_yaml(&mock, &nodes, "", "deny")).unwrap();
        let gateway = crate::process::spawn_gateway(&config);
        let said = |logs: Vec<String>| {
            logs.into_iter()
                .find(|line| line.contains("sentinels that cannot be asked"))
        };
        let line = poll_until(150, async || said(gateway.logs()), Option::is_some)
            .await
            .expect("the sentinel listed wrong is logged");
        assert!(line.contains(r#""level":"WARN""#), "{line}");
        assert!(
            line.contains(&format!("sentinel {wrong} ({nowhere})")),
            "{line}"
        );
        assert!(!line.contains(&sentinel.url()), "{line}");
        // Once: not at every probe.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let logs = gateway.logs();
        let lines = logs
            .iter()
            .filter(|l| l.contains("sentinels that cannot be asked"));
        assert_eq!(lines.count(), 1);
    }
}

/// The sentinels' password file is watched as the master's is: rotated in place, it is
/// noticed without a signal and said to need a restart (it is read at start).
#[tokio::test]
async fn a_rotated_sentinel_password_file_is_said_to_need_a_restart() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("sentinel-password");
    std::fs::write(&password, "first-sentinel-password\n").unwrap();
    let nowhere = [format!("redis://127.0.0.1:{}", free_port())];
    let extra = format!("    sentinel_password_file: {}\n", password.display());
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, sentinel_yaml(&mock, &nowhere, &extra, "allow")).unwrap();
    let gateway = crate::process::spawn_gateway(&path);
    // Rotated until noticed: the watch takes its first look once it starts.
    let mut warning = None;
    for round in 0..5 {
        std::fs::write(&password, format!("rotated-sentinel-password-{round}\n")).unwrap();
        warning = crate::operations::restart_warning(&gateway).await;
        if warning.is_some() {
            break;
        }
    }
    let warning = warning.expect("a warning, with no signal sent");
    assert!(warning.contains("sentinel_password"), "{warning}");
    assert!(!warning.contains("rotated-sentinel-password"), "{warning}");
}

#[test]
fn sentinel_mode_is_checked_without_echoing_a_node_password() {
    let check = check_redis_section;
    let sentinel = "    mode: sentinel\n    nodes: [redis://10.0.0.1:26379, redis://10.0.0.2:26379]\n    sentinel_master: mymaster\n";
    check(sentinel).unwrap();
    let refused = [
        ("    mode: cluster\n", "store.redis.nodes (line", "needs seed nodes"),
        ("    mode: sentinel\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "needs the sentinels"),
        ("    mode: sentinel\n    nodes: []\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "needs the sentinels"),
        ("    mode: sentinel\n    nodes: [redis://10.0.0.1:26379]\n", "store.redis.sentinel_master", "needs the name"),
        ("    nodes: [redis://10.0.0.1:26379]\n", "store.redis.nodes (line", "is for mode: sentinel"),
        ("    sentinel_master: mymaster\n", "store.redis.sentinel_master (line", "is for mode: sentinel"),
        (&format!("{sentinel}    url: redis://10.0.0.3:6379\n"), "store.redis.url (line", "comes from the sentinels"),
        ("    mode: sentinel\n    nodes: [redis://10.0.0.1:26379, 'redis://:hunter2-password@10.0.0.2:26379']\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "node 2 holds a password"),
        ("    mode: sentinel\n    nodes: ['redis://:hunter2-password@10.0.0.2:26379']\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "holds a password: a sentinel's own, given apart from the URLs: set store.redis.sentinel_password_env or sentinel_password_file"),
        ("    mode: sentinel\n    nodes: ['redis://watcher@10.0.0.2:26379']\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "set store.redis.sentinel_username"),
        ("    mode: sentinel\n    nodes: [redis://10.0.0.1:26379, rediss://10.0.0.2:26379]\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "same scheme"),
        ("    mode: sentinel\n    nodes: [not a url]\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "must start with redis:// or rediss://"),
        ("    mode: sentinel\n    nodes: ['redis://not a host:26379']\n    sentinel_master: mymaster\n", "store.redis.nodes (line", "not a valid Redis URL"),
        (&format!("{sentinel}    sentinels: 3\n"), "store.redis.sentinels", "unknown field"),
        ("    sentinel_password_env: SENTINEL_PASSWORD\n", "store.redis.sentinel_password_env (line", "is for mode: sentinel"),
        (&format!("{sentinel}    sentinel_username: watcher\n"), "store.redis.sentinel_username (line", "needs a password"),
        (&format!("{sentinel}    sentinel_password: hunter2-password\n"), "store.redis.sentinel_password (line", "sentinel_password_env or sentinel_password_file"),
    ];
    // A query is no password: its line names no password key.
    let query = "    mode: sentinel\n    nodes: ['redis://10.0.0.2:26379/?protocol=resp3']\n    sentinel_master: mymaster\n";
    let shown = check(query).unwrap_err();
    assert!(shown.contains("has a query or a fragment"), "{shown}");
    assert!(!shown.contains("password_env"), "{shown}");
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

/// Servers of the wrong kind where the settings want another: the probe's line names the
/// server and says what the settings should be, not only Redis's own words.
#[tokio::test]
async fn the_probe_says_when_a_server_is_of_the_wrong_kind() {
    let master = RedisServer::start();
    let replica = RedisServer::start_with(RedisOptions {
        replica_of: Some(master.port()),
        ..Default::default()
    });
    let sentinel = RedisServer::sentinel(master.port());
    let guarded = RedisServer::sentinel_with(
        master.port(),
        SentinelOptions {
            password: Some("sentinel-password".to_owned()),
            ..Default::default()
        },
    );
    let mock = MockServer::start(mock_config()).await.unwrap();
    let line_for = async |yaml: String| {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.yaml");
        std::fs::write(&config, yaml).unwrap();
        let gateway = crate::process::spawn_gateway(&config);
        crate::redis::probe_failure_line(&gateway).await
    };
    let standalone = |url: String| crate::redis::redis_yaml_at(&mock, &url, "", "deny");

    let line = line_for(standalone(replica.url())).await;
    assert!(
        line.contains(&format!("server {}: ", replica.url())),
        "{line}"
    );
    assert!(
        line.contains("a replica: `url` must name the master"),
        "{line}"
    );

    let line = line_for(standalone(sentinel.url())).await;
    assert!(
        line.contains(&format!("server {}: ", sentinel.url())),
        "{line}"
    );
    assert!(line.contains("the sentinels go in `nodes`"), "{line}");

    let line = line_for(sentinel_yaml(&mock, &[master.url()], "", "deny")).await;
    assert!(line.contains("not a sentinel"), "{line}");

    let line = line_for(sentinel_yaml(&mock, &[guarded.url()], "", "deny")).await;
    assert!(line.contains("the sentinel wants a password"), "{line}");
    assert!(line.contains("sentinel_password_env"), "{line}");
}
