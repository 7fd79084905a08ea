//! `global_keys`: the global group spread over several keys, one per part of the slot
//! range, against the real three-master cluster.

use super::*;

fn spread_store(cluster: &RedisCluster, prefix: &str, keys: u16) -> StoreSettings {
    let mut store = cluster_store(cluster, prefix);
    if let Some(redis) = store.redis.as_mut() {
        redis.global_keys = keys;
    }
    store
}

/// The global keys in the cluster: (node, key, the states it holds).
fn global_keys(cluster: &RedisCluster) -> Vec<(usize, String, Vec<[i64; 3]>)> {
    let mut keys: Vec<_> = cluster
        .quota_keys()
        .into_iter()
        .filter(|(_, key, _)| key.contains(":global:"))
        .map(|(node, key, _)| {
            let states = cluster.nodes[node].quota_states(&key);
            (node, key, states)
        })
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_spread_global_quota_admits_its_whole_in_the_addresses_own_calls() {
    let cluster = RedisCluster::start();
    // 30 an hour over three keys: 10 each, a key every 6 minutes.
    let rig = rig_in(
        "  per_email: [{ requests: 1, per: 1h }]\n  global: [{ requests: 30, per: 1h }]\n",
        "",
        spread_store(&cluster, "spread", 3),
        ManualClock::new(),
    );
    let mut statuses = Vec::new();
    // Until the slot map is read (in the background, on first use), a group is a call.
    let mut warm = 0;
    loop {
        let before = script_calls(&cluster);
        statuses.push(rig.status(ask(&format!("user{warm}@b.io"))).await);
        warm += 1;
        if script_calls(&cluster) - before == 1 || warm == 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // From then on, each address and the global key of its part of the slot range are on
    // one master (three keys, three masters holding a third of the slots each): one call.
    let before = script_calls(&cluster);
    let started = std::time::Instant::now();
    for i in warm..120 {
        statuses.push(rig.status(ask(&format!("user{i}@b.io"))).await);
    }
    // (The probe, each second, runs the script once on each master: a run of it may fall
    // among these requests, or more on a slow machine.)
    let probes = 3 * (started.elapsed().as_secs() + 1);
    let calls = script_calls(&cluster) - before;
    let requests = (120 - warm) as u64;
    assert!(
        (requests..=requests + probes).contains(&calls),
        "one call per request: {calls} for {requests}"
    );
    // Every key filled to its 10 (each part of the range got more than 10 addresses), and
    // a full key refused only its own part's addresses: 30 admitted in all, as one key.
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(admitted, 30, "{statuses:?}");

    // Three keys, one on each master, each holding its third of the quota: three times
    // the interval (6 minutes), the same capacity in time (10 of those, an hour).
    let keys = global_keys(&cluster);
    let nodes: std::collections::BTreeSet<usize> = keys.iter().map(|(n, ..)| *n).collect();
    assert_eq!((keys.len(), nodes.len()), (3, 3), "{keys:?}");
    for (_, key, states) in &keys {
        assert!(
            key.starts_with("{spread:global:") && key.ends_with('}'),
            "{key}"
        );
        let [[interval, capacity, _]] = states[..] else {
            panic!("{key}: {states:?}");
        };
        assert_eq!((interval, capacity), (360_000_000, 3_600_000_000), "{key}");
    }
}

#[tokio::test]
async fn a_changed_global_quota_is_carried_to_each_of_its_keys() {
    let cluster = RedisCluster::start();
    let rig = rig_in(
        "  global: [{ requests: 30, per: 1h }]\n",
        "",
        spread_store(&cluster, "carry-spread", 3),
        ManualClock::new(),
    );
    for i in 0..12 {
        assert_eq!(rig.status(ask(&format!("user{i}@b.io"))).await, 200);
    }
    assert_eq!(global_keys(&cluster).len(), 3);
    // 15 an hour: each key holds 5, one every 12 minutes; the walk gives every key the new
    // quota's state, in the keys' own numbers.
    reload(&rig, "  global: [{ requests: 15, per: 1h }]\n");
    let spread_hourly = (720_000_000, 3_600_000_000);
    assert_eq!(holding(&cluster, spread_hourly, 3).await, 3);
}

/// A global burst below `global_keys`: each key would hold less than one request, and one
/// given a request anyway would admit N at once. The builder refuses it.
#[tokio::test]
async fn the_builder_refuses_a_global_burst_below_global_keys() {
    let yaml = format!(
        "clients:\n  - {{ id: foo, token_sha256: {FOO} }}\nlimits:\n{}",
        only("  global: [{ requests: 10, per: 1h }, { requests: 1, per: 1m }]\n")
    );
    let settings = GuardConfig::from_yaml(&yaml).unwrap().validate().unwrap();
    let mut redis = RedisSettings::cluster(&["redis://127.0.0.1:1".to_owned()]).unwrap();
    redis.global_keys = 3;
    let refused = ResetGuardLayer::builder(settings, ApiKey::new("server-key").unwrap())
        .store(StoreSettings {
            redis: Some(redis),
            ..StoreSettings::default()
        })
        .key_secret(b"a test key secret")
        .build()
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("has a burst of 1: each key would hold less than one request"),
        "{refused}"
    );
}

/// A reload through the handle cannot be refused: with a burst below the keys asked for,
/// the group is spread over as many keys as the burst, never looser than the quota.
#[tokio::test]
async fn a_reload_to_a_burst_below_global_keys_spreads_over_fewer_keys() {
    let cluster = RedisCluster::start();
    let rig = rig_in(
        "  global: [{ requests: 300, per: 1h }]\n",
        "",
        spread_store(&cluster, "fewer", 3),
        ManualClock::new(),
    );
    reload(&rig, "  global: [{ requests: 2, per: 1h }]\n");
    let mut statuses = Vec::new();
    for i in 0..60 {
        statuses.push(rig.status(ask(&format!("user{i}@b.io"))).await);
    }
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(admitted, 2, "{statuses:?}");
}
