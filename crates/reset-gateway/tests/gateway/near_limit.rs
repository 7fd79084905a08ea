//! `reset_gateway_near_limit_total`: admissions that left a key under a fifth of a quota,
//! with the memory store and with Redis; and `check-config --explain`.

use std::process::Command;

use qb_mock::MockServer;

use crate::common::*;

const LIMITS: &str = "  limits:\n    per_ip: []\n    per_client: []\n\
    \x20   per_email: [{ requests: 3, per: 1h }, { requests: 10, per: 24h }]\n    global: []\n";

/// Three resets for one address under 3 an hour: only the third leaves that quota under
/// a fifth of its burst (0 of 3); the daily quota keeps 7 of 10.
async fn assert_counts_the_third_request(gw: &Gateway) {
    for _ in 0..3 {
        assert_eq!(
            gw.reset_as_ios("email=alice%40example.com").await.status,
            200
        );
    }
    let metrics = gw.admin_get("/metrics").await.body;
    openmetrics_parser::openmetrics::parse_openmetrics(&metrics)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{metrics}"));
    let series = |quota: &str| {
        sample(
            &metrics,
            &format!("reset_gateway_near_limit_total{{limit=\"per_email\",quota=\"{quota}\"}}"),
        )
    };
    assert_eq!(series("3/1h"), Some(1.0), "{metrics}");
    assert_eq!(series("10/1d"), Some(0.0), "{metrics}");
}

#[tokio::test]
async fn near_limit_counts_admissions_that_leave_little_room_in_memory() {
    let gw = Gateway::start(LIMITS).await;
    assert_counts_the_third_request(&gw).await;
}

#[tokio::test]
async fn near_limit_counts_admissions_that_leave_little_room_in_redis() {
    let redis = test_support::RedisServer::start();
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = yaml(
        &mock.url(),
        LIMITS,
        &format!(
            "store:\n  kind: redis\n  key_secret_file: {}\n  redis:\n    url: {}\n",
            key_secret_file().display(),
            redis.url()
        ),
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    assert_counts_the_third_request(&gw).await;
}

#[test]
fn check_config_explains_each_quota_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml("http://127.0.0.1:9", LIMITS, "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_reset-gateway"))
        .args(["check-config", "--explain", "--config"])
        .arg(&path)
        .env("QB_API_KEY", "k")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "per_email: 3 per hour, at most 3 at once; a steady client gets one every 20 minutes; at most 10 a day per address"
        ),
        "{text}"
    );
    assert!(text.contains("per_ip: no limit"), "{text}");
}

/// A proposal read on a workstation, without the production secrets: the limits' own
/// errors come first, and `--explain` puts the limits in words even so (exiting 64, the
/// missing secret named).
#[test]
fn check_config_reads_the_limits_without_the_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let check = |yaml: &str| {
        std::fs::write(&path, yaml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_reset-gateway"))
            .args(["check-config", "--explain", "--config"])
            .arg(&path)
            .env_remove("QB_API_KEY")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = check(&yaml("http://127.0.0.1:9", LIMITS, ""));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("QB_API_KEY"), "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("per_email: 3 per hour"), "{text}");
    assert!(!text.contains("configuration OK"), "{text}");
    // A limit that could not work is named before the missing key.
    let broken = yaml("http://127.0.0.1:9", LIMITS, "")
        .replace("{ requests: 3, per: 1h }", "{ requests: 0, per: 1h }");
    assert_ne!(broken, yaml("http://127.0.0.1:9", LIMITS, ""));
    let out = check(&broken);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("guard.limits.per_email[0]"), "{stderr}");
    assert!(out.stdout.is_empty());
    // A spread of the global group the file is refused for is not described.
    let spread = yaml(
        "http://127.0.0.1:9",
        "  limits:\n    global: [{ requests: 4, per: 1s }]\n",
        "store:\n  kind: redis\n  redis:\n    url: redis://127.0.0.1:6379\n    global_keys: 2000\n",
    );
    let out = check(&spread);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("global: 4 per second"), "{text}");
    assert!(!text.contains("spread over"), "{text}");
}
