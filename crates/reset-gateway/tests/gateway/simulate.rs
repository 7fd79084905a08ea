//! `reset-gateway simulate`: traffic recorded by the real gateway process, replayed
//! through the same limits, gets the same decisions request by request.

use std::collections::BTreeMap;
use std::process::Command;

use qb_mock::MockServer;
use reset_gateway::simulate::reader::Reader;
use reset_gateway::simulate::replay::Simulation;
use reset_gateway::simulate::{limits_of, simulate};
use reset_guard::LimitGroup;

use crate::common::*;
use crate::process::spawn_gateway;

const BIN: &str = env!("CARGO_BIN_EXE_reset-gateway");

/// Tight limits in every group, a shadow quota, and the client IP taken from
/// `X-Forwarded-For` (the test connects from loopback, a trusted proxy).
const LIMITS: &str = "  client_ip:\n    trusted_proxies: [127.0.0.0/8]\n  limits:\n\
    \x20   per_ip: [{ requests: 8, per: 1h }]\n\
    \x20   per_client: [{ requests: 10, per: 1h }]\n\
    \x20   per_email: [{ requests: 3, per: 1h }, { requests: 2, per: 1h, shadow: true }]\n\
    \x20   global: [{ requests: 14, per: 1h }]\n";

/// The traffic, (client IP, token, query), in phases that each trip one group: one
/// address in several spellings (per email), one client's many addresses (per client),
/// then everyone (global), one IP guessing tokens (per IP), an invalid address, and the
/// first address once more.
fn traffic() -> Vec<(String, &'static str, String)> {
    let mut requests = Vec::new();
    let mut next_ip = 0;
    let mut fresh_ip = || {
        next_ip += 1;
        format!("203.0.113.{next_ip}")
    };
    for (token, email) in [
        (IOS_TOKEN, "Bob.Smith%2Bnews%40GoogleMail.com"),
        (IOS_TOKEN, "bobsmith%40gmail.com"),
        (WEB_TOKEN, "BOB.SMITH%40gmail.com"),
        (IOS_TOKEN, "bobsmith%40gmail.com"),
    ] {
        requests.push((fresh_ip(), token, format!("email={email}")));
    }
    let mut web = vec![
        "carol%40b%C3%BCcher.example".to_owned(),
        "CAROL%40xn--bcher-kva.example".to_owned(),
        "alice%40example.com".to_owned(),
    ];
    web.extend((1..=7).map(|i| format!("user{i}%40example.com")));
    for email in web {
        requests.push((fresh_ip(), WEB_TOKEN, format!("email={email}")));
    }
    for i in 8..=10 {
        requests.push((
            fresh_ip(),
            IOS_TOKEN,
            format!("email=user{i}%40example.com"),
        ));
    }
    for _ in 0..9 {
        requests.push((
            "198.51.100.7".to_owned(),
            "guessed-token",
            "email=x%40example.com".to_owned(),
        ));
    }
    requests.push((fresh_ip(), IOS_TOKEN, "email=not-an-address".to_owned()));
    requests.push((
        fresh_ip(),
        IOS_TOKEN,
        "email=bobsmith%40gmail.com".to_owned(),
    ));
    requests
}

fn access_lines(logs: &[String]) -> Vec<String> {
    logs.iter()
        .filter(|l| l.contains("\"target\":\"access\""))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_replay_of_recorded_traffic_decides_as_the_gateway_did() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml(&mock.url(), LIMITS, "")).unwrap();
    let gateway = spawn_gateway(&config);
    let traffic = traffic();
    let mut statuses = Vec::new();
    for (ip, token, query) in &traffic {
        let reply = raw(
            gateway.addr,
            format!(
                "GET {RESET}?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 QB-Token: {token}\r\nX-Forwarded-For: {ip}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        statuses.push(reply.status);
    }
    let logs = poll_until(
        250,
        async || gateway.logs(),
        |logs: &Vec<String>| access_lines(logs).len() == traffic.len(),
    )
    .await;
    let log = dir.path().join("access.log");
    std::fs::write(&log, logs.join("\n")).unwrap();

    // The access line of a per-IP 429 names the client IP the limit keyed on, not the
    // proxy it came through.
    let per_ip_denial = access_lines(&logs)
        .into_iter()
        .find(|l| l.contains("\"limit\":\"per_ip\""))
        .expect("a request refused per IP");
    assert!(!per_ip_denial.contains("127.0.0.1"), "{per_ip_denial}");
    // Each spelling of one address was logged under one key.
    let mut hashes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (line, (_, token, query)) in access_lines(&logs).iter().zip(&traffic) {
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(hash) = json["email_hash"].as_str() {
            assert_eq!(hash.len(), 16, "{line}");
            hashes
                .entry(hash.to_owned())
                .or_default()
                .push(query.clone());
        }
        if *token != "guessed-token" && json["limit"] != "per_ip" {
            assert!(
                json["client_id"].is_string(),
                "authenticated, so a client: {line}"
            );
        }
    }
    let keys_of = |spelling: &str| -> Vec<&String> {
        hashes
            .iter()
            .filter(|(_, queries)| queries.iter().any(|q| q.ends_with(spelling)))
            .map(|(hash, _)| hash)
            .collect()
    };
    assert_eq!(keys_of("GoogleMail.com"), keys_of("bobsmith%40gmail.com"));
    assert_eq!(
        keys_of("BOB.SMITH%40gmail.com"),
        keys_of("bobsmith%40gmail.com")
    );
    assert_eq!(
        keys_of("b%C3%BCcher.example"),
        keys_of("xn--bcher-kva.example")
    );
    // user7 was refused per client, before its address was read.
    assert_eq!(
        hashes.len(),
        1 + 1 + 1 + 9,
        "bob, carol, alice, user1 to 10 but 7: {hashes:?}"
    );

    // Request by request, the replay refuses what the gateway refused, at the same group.
    let recorded: Vec<(u64, Option<LimitGroup>)> = {
        let mut reader = Reader::default();
        let mut recorded = Vec::new();
        reader
            .read_all(
                std::fs::File::open(&log)
                    .map(std::io::BufReader::new)
                    .unwrap(),
                |r, _| {
                    for _ in 0..=r.more {
                        recorded.push((r.line, r.recorded_denial))
                    }
                },
            )
            .unwrap();
        recorded
    };
    assert_eq!(
        recorded.len(),
        traffic.len(),
        "every request reached the limits"
    );
    let denied = recorded.iter().filter(|(_, d)| d.is_some()).count();
    for group in LimitGroup::ALL {
        assert!(
            recorded.iter().any(|(_, d)| *d == Some(group)),
            "the traffic trips {} too: {recorded:?}",
            group.name()
        );
    }
    let mut simulation = Simulation::new(limits_of(&config).unwrap(), None).keep_fates();
    let mut reader = Reader::default();
    let input = std::io::BufReader::new(std::fs::File::open(&log).unwrap());
    simulate(input, "log", &mut simulation, &mut reader).unwrap();
    assert_eq!(reader.bad_line_count(), 0, "{:?}", reader.bad_lines);
    let mut replayed = simulation.fates.clone().unwrap();
    replayed.sort_by_key(|(line, _)| *line);
    assert_eq!(replayed, recorded);
    assert_eq!(simulation.proposed.denied as usize, denied);
    assert_eq!(simulation.proposed.unknown_beyond, 0);

    // The command says the same, and its shadow quota counts without refusing.
    let out = Command::new(BIN)
        .args(["simulate", "--json", "--config"])
        .arg(&config)
        .arg("--log")
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["requests"], traffic.len());
    assert_eq!(report["denied"], denied);
    assert_eq!(report["recorded_denied"], denied);
    let shadow = report["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["shadow"] == true)
        .unwrap();
    assert_eq!(shadow["group"], "per_email");
    assert!(shadow["denied"].as_u64().unwrap() > 0, "{shadow}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        recorded
            .iter()
            .filter(|(_, d)| d.is_some_and(|g| g != LimitGroup::PerEmail))
            .count(),
        "per-email denials answer like a success; every other denial is a 429"
    );
}

#[test]
fn a_missing_log_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml("http://127.0.0.1:9", "", "")).unwrap();
    let out = Command::new(BIN)
        .args(["simulate", "--config"])
        .arg(&config)
        .args(["--log", "/nonexistent/access.log"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/access.log"), "{stderr}");
}

#[test]
fn compare_lists_the_requests_whose_fate_changes() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, per_email: &str| {
        let path = dir.path().join(name);
        let limits = format!(
            "  limits:\n    per_ip: []\n    per_client: []\n    per_email: [{per_email}]\n    global: []\n"
        );
        std::fs::write(&path, yaml("http://127.0.0.1:9", &limits, "")).unwrap();
        path
    };
    let current = write("current.yaml", "{ requests: 3, per: 1h }");
    let proposed = write("proposed.yaml", "{ requests: 5, per: 1h }");
    let log: String = (0..6)
        .map(|i| {
            format!(
                "{{\"received_at\":\"2025-03-01T10:00:0{i}.000001Z\",\"guarded\":true,\"client_id\":\"ios\",\
                 \"client_ip\":\"203.0.113.{i}\",\"email_hash\":\"00000000000000aa\",\"outcome\":\"forwarded\",\
                 \"target\":\"access\"}}\n"
            )
        })
        .collect();
    // The proposal against the current file, the log on standard input.
    let compare = |json: bool| {
        let mut command = Command::new(BIN);
        command.arg("simulate");
        if json {
            command.arg("--json");
        }
        let mut child = command
            .arg("--config")
            .arg(&proposed)
            .arg("--compare")
            .arg(&current)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(log.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = compare(false);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("proposed ("), "{text}");
    assert!(text.contains("1 of 6 requests refused"), "{text}");
    assert!(text.contains("3 of 6 requests refused"), "{text}");
    assert!(text.contains("2 requests change fate"), "{text}");
    assert!(
        text.contains(
            "line 4 at 2025-03-01T10:00:03.000001Z (client_ip 203.0.113.3, client_id ios, \
             email_hash 00000000000000aa): refused by per_email now, admitted proposed"
        ),
        "{text}"
    );
    assert!(!text.contains("cannot model"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&compare(true).stdout).unwrap();
    assert_eq!(
        json["compare"]["changes"][0],
        serde_json::json!({
            "line": 4, "received_at": "2025-03-01T10:00:03.000001Z", "client_ip": "203.0.113.3",
            "client_id": "ios", "email_hash": "00000000000000aa",
            "current": "per_email", "proposed": null
        })
    );

    // A proposal that changes whose address a request is: said, not silently replayed as
    // the recording resolved it.
    let moved = std::fs::read_to_string(&proposed).unwrap().replace(
        "guard:\n",
        "guard:\n  client_ip: { trusted_proxies: [10.0.0.0/8] }\n",
    );
    std::fs::write(&proposed, moved).unwrap();
    let out = Command::new(BIN)
        .args(["simulate", "--json", "--config"])
        .arg(&proposed)
        .arg("--compare")
        .arg(&current)
        .stdin(std::fs::File::open("/dev/null").unwrap())
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["unreplayed_changes"],
        serde_json::json!(["guard.client_ip.trusted_proxies"])
    );
}

/// A log of one forwarded reset by `example-app` (the shipped examples' client), written in
/// `dir`: its path.
fn one_forwarded_reset_logged(dir: &std::path::Path) -> std::path::PathBuf {
    let log = "{\"received_at\":\"2025-03-01T10:00:00Z\",\"guarded\":true,\"client_id\":\"example-app\",\
               \"client_ip\":\"203.0.113.1\",\"email_hash\":\"00000000000000aa\",\"outcome\":\"forwarded\",\
               \"target\":\"access\"}\n";
    let path = dir.join("access.log");
    std::fs::write(&path, log).unwrap();
    path
}

/// The shipped files carry a placeholder client the gateway refuses to run with; a replay
/// sends nothing, so it takes them as they are (the README points at them as shapes to
/// try).
#[test]
fn the_shipped_examples_replay_as_they_are() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config");
    let dir = tempfile::tempdir().unwrap();
    let log_path = one_forwarded_reset_logged(dir.path());
    for file in ["gateway.yaml", "examples/shadow-rollout.yaml"] {
        let out = Command::new(BIN)
            .args(["simulate", "--config"])
            .arg(format!("{examples}/{file}"))
            .arg("--log")
            .arg(&log_path)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {said}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Replayed 1 requests"),
            "{file}"
        );
    }
    // The gateway itself still refuses them.
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(format!("{examples}/gateway.yaml"))
        .env("QB_API_KEY", "k")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// A report that cannot be written (a full disk) is no success: a script keeping `--json`
/// would be left an empty file and a zero status.
#[test]
fn a_report_that_cannot_be_written_fails_the_command() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config");
    let dir = tempfile::tempdir().unwrap();
    let log_path = one_forwarded_reset_logged(dir.path());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(BIN)
        .args(["simulate", "--json", "--config"])
        .arg(format!("{examples}/gateway.yaml"))
        .arg("--log")
        .arg(&log_path)
        .stdout(full)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("could not be written"), "{said}");
}
