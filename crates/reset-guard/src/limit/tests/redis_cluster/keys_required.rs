//! A cluster behind a proxy that routes script calls by their declared keys and refuses one
//! that declares none, as ElastiCache Serverless does (`ERR Lua scripts without any input
//! keys are not supported.`).

use super::*;
use test_support::{Refuse, ScriptProxy};

/// Through a proxy that refuses a script call declaring no key (ElastiCache Serverless's
/// rule), the probe finds the cluster serving and every request is decided, one hash tag
/// at a time once a master's batch has been refused, with the limits holding.
#[tokio::test]
async fn a_cluster_that_refuses_calls_declaring_no_key_decides_every_request() {
    let (node, dir) = lone_cluster_node("keys-required");
    let proxy = ScriptProxy::start(node.addr(), Refuse::NoKey);
    serve_every_slot_announcing(&node, proxy.port()).await;
    let rig = rig_in(
        "  per_ip: [{ requests: 3, per: 1h }]\n  per_client: []\n  per_email: [{ requests: 2, per: 1h }]\n  global: []\n",
        "",
        store_seeded_by(&[proxy.url()], "keys-required"),
        ManualClock::new(),
    );
    // Until a master's batch (no key declared) has been tried: the slot map is read in
    // the background. Each request from an address and for an address of its own.
    let mut warm_up = Vec::new();
    for i in 0..100 {
        let ip: &'static str = Box::leak(format!("198.51.100.{}", i + 1).into_boxed_str());
        warm_up.push(rig.status(ask(&format!("w{i}@b.io")).from(ip)).await);
        if proxy.refused() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut ready = rig.handle.store_ready();
    for _ in 0..30 {
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = rig.handle.store_ready();
    }
    let from_one_address = [
        rig.status(ask("a1@b.io").from("192.0.2.7")).await,
        rig.status(ask("a2@b.io").from("192.0.2.7")).await,
        rig.status(ask("a3@b.io").from("192.0.2.7")).await,
        rig.status(ask("a4@b.io").from("192.0.2.7")).await,
    ];
    let for_one_address = [
        rig.status(ask("same@b.io").from("192.0.2.21")).await,
        rig.status(ask("same@b.io").from("192.0.2.22")).await,
        rig.status(ask("same@b.io").from("192.0.2.23")).await,
    ];
    let errors = rig.handle.store_errors();
    drop(rig);
    drop(node);
    let _ = std::fs::remove_dir_all(dir);
    assert!(proxy.refused() > 0, "no call declaring no key was made");
    assert!(warm_up.iter().all(|&status| status == 200), "{warm_up:?}");
    assert!(ready, "the probe finds the cluster serving");
    assert_eq!(from_one_address, [200, 200, 200, 429]);
    assert_eq!(for_one_address, [200, 200, 429]);
    assert_eq!(errors, 0);
    assert!(proxy.passed() > 0);
}

/// A proxy that refuses a call declaring no key in words the requests' calls do not know
/// (`ERR EVALSHA needs a key`), or with a code of its own (`NOKEYS ...`): the probe, which
/// makes the call a master's batch makes and then the call of one hash tag, finds the
/// first refused and the second answered, and has the calls go one hash tag at a time;
/// within a second or two every request is decided and the cluster is found serving.
#[tokio::test]
async fn a_refusal_in_other_words_is_found_by_the_probe() {
    for (rule, name) in [
        (Refuse::NoKeyInOtherWords, "keys-other-words"),
        (Refuse::NoKeyWithACodeOfItsOwn, "keys-own-code"),
    ] {
        let (node, dir) = lone_cluster_node(name);
        let proxy = ScriptProxy::start(node.addr(), rule);
        serve_every_slot_announcing(&node, proxy.port()).await;
        let rig = roomy_rig(store_seeded_by(&[proxy.url()], name));
        let mut statuses = Vec::new();
        for i in 0..60 {
            let ip: &'static str = Box::leak(format!("198.51.100.{}", i + 1).into_boxed_str());
            statuses.push(rig.status(ask(&format!("w{i}@b.io")).from(ip)).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ready = rig.handle.store_ready();
        drop(rig);
        drop(node);
        let _ = std::fs::remove_dir_all(dir);
        assert!(
            proxy.refused() > 0,
            "{rule:?}: no call declaring no key was made"
        );
        assert_eq!(statuses[40..], [200; 20], "{rule:?}: {statuses:?}");
        assert!(ready, "{rule:?}: the probe finds the cluster serving");
    }
}
