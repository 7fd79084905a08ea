//! Hand-computed replays: each group, time refilling a quota, shadow quotas, the order of
//! lines, and lines that cannot be read.

use reset_guard::{GuardConfig, LimitGroup};

use super::reader::Reader;
use super::replay::Simulation;
use super::simulate;

/// The guard settings with `limits` (lines under `limits:`); groups it does not name
/// have no quota.
fn settings(limits: &str) -> reset_guard::GuardSettings {
    let unnamed: String = ["per_ip", "per_client", "per_email", "global"]
        .into_iter()
        .filter(|group| !limits.contains(&format!("{group}:")))
        .map(|group| format!("  {group}: []\n"))
        .collect();
    GuardConfig::from_yaml(&format!(
        "clients:\n  - id: ios\n    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n\
         limits:\n{unnamed}{limits}"
    ))
    .unwrap()
    .validate()
    .unwrap()
}

/// An access line at `second` seconds past 10:00, from `ip`, for `client` and `email`.
fn line(second: u32, ip: &str, client: Option<&str>, email: Option<u64>) -> String {
    let mut fields = format!(
        r#"{{"timestamp":"x","received_at":"2025-03-01T10:{:02}:{:02}.5Z","guarded":true,"client_ip":"{ip}","#,
        second / 60,
        second % 60
    );
    if let Some(client) = client {
        fields.push_str(&format!(r#""client_id":"{client}","#));
    }
    if let Some(email) = email {
        fields.push_str(&format!(r#""email_hash":"{email:016x}","#));
    }
    fields.push_str(r#""outcome":"forwarded","status":200,"target":"access"}"#);
    fields
}

/// Replays `lines` through `limits` (YAML lines under `limits:`, which override the
/// empty defaults); each line's fate and the simulation.
fn replay(limits: &str, lines: &[String]) -> (Vec<Option<LimitGroup>>, Simulation, Reader) {
    let mut simulation = Simulation::new((settings(limits), 1000), None).keep_fates();
    let mut reader = Reader::default();
    let text = lines.join("\n");
    simulate(text.as_bytes(), "test", &mut simulation, &mut reader).unwrap();
    let mut fates = simulation.fates.clone().unwrap();
    fates.sort_by_key(|(line, _)| *line);
    (
        fates.into_iter().map(|(_, f)| f).collect(),
        simulation,
        reader,
    )
}

const IP: &str = "203.0.113.9";

#[test]
fn per_ip_counts_every_request_and_groups_ipv6_by_prefix() {
    let lines = [
        line(0, IP, None, None),
        line(1, IP, Some("ios"), Some(1)),
        line(2, IP, Some("ios"), Some(2)),
        line(3, "2001:db8::1", None, None),
        line(4, "2001:db8::2", None, None),
        line(5, "2001:db8::3", None, None),
        line(6, "2001:db8:0:1::1", None, None),
    ];
    let (fates, simulation, _) = replay("  per_ip: [{ requests: 2, per: 1h }]\n", &lines);
    let ip = Some(LimitGroup::PerIp);
    assert_eq!(fates, [None, None, ip, None, None, ip, None]);
    let tally = &simulation.proposed;
    assert_eq!((tally.requests, tally.denied), (7, 2));
    // 2001:db8::1 and ::2 share a /64; 2001:db8:0:1:: is another.
    assert_eq!(tally.distinct_keys(LimitGroup::PerIp), 3);
    assert_eq!(tally.quotas[0].peak_use, 1.0);
}

#[test]
fn per_client_and_global_count_authenticated_and_valid_requests() {
    let lines = [
        line(0, "198.51.100.1", Some("ios"), None),
        line(1, "198.51.100.2", Some("ios"), Some(7)),
        line(2, "198.51.100.3", Some("web"), Some(8)),
        line(3, "198.51.100.4", Some("ios"), Some(9)),
        line(4, "198.51.100.5", Some("web"), Some(10)),
        line(5, "198.51.100.6", None, None),
    ];
    let (fates, simulation, _) = replay(
        "  per_client: [{ requests: 2, per: 1h }]\n  global: [{ requests: 2, per: 1h }]\n",
        &lines,
    );
    let (client, global) = (Some(LimitGroup::PerClient), Some(LimitGroup::Global));
    // ios: an invalid address (charged per client, not globally), a valid one; the third
    // is over. web: two valid ones, the second over the global limit, which the ios
    // request before it had reached.
    assert_eq!(fates, [None, None, None, client, global, None]);
    assert_eq!(simulation.proposed.denied_by, [0, 1, 0, 1]);
    let global_quota = &simulation.proposed.quotas[1];
    assert_eq!((global_quota.seen, global_quota.denied), (3, 1));
}

#[test]
fn per_email_refills_with_time_and_shadow_quotas_refuse_nothing() {
    let lines = [
        line(0, "198.51.100.1", Some("ios"), Some(42)),
        line(30, "198.51.100.2", Some("ios"), Some(42)),
        line(45, "198.51.100.3", Some("ios"), Some(43)),
        line(60, "198.51.100.4", Some("ios"), Some(42)),
    ];
    let (fates, simulation, _) = replay(
        "  per_email: [{ requests: 1, per: 1m }, { requests: 1, per: 1h, shadow: true }]\n",
        &lines,
    );
    // One a minute: the second, 30 s later, is refused; the fourth, a minute after the
    // first, is admitted. The shadow quota (one an hour) would have refused both.
    assert_eq!(fates, [None, Some(LimitGroup::PerEmail), None, None]);
    let [enforced, shadow] = &simulation.proposed.quotas[..] else {
        panic!("two quotas")
    };
    assert_eq!((enforced.seen, enforced.denied), (4, 1));
    assert_eq!((shadow.seen, shadow.denied), (4, 2));
    assert!(shadow.quota.shadow);
    assert_eq!(simulation.proposed.denied, 1);
    assert_eq!(simulation.proposed.distinct_keys(LimitGroup::PerEmail), 2);
}

#[test]
fn lines_are_replayed_in_arrival_order_whatever_order_they_were_written_in() {
    // Written when each finished: the slow first request's line comes last.
    let lines = [
        line(1, IP, None, None),
        line(2, IP, None, None),
        line(0, IP, None, None),
    ];
    let (fates, _, _) = replay("  per_ip: [{ requests: 2, per: 1h }]\n", &lines);
    assert_eq!(fates, [None, Some(LimitGroup::PerIp), None]);
}

#[test]
fn the_table_is_as_wide_as_its_widest_quota() {
    let lines = [line(0, IP, Some("ios"), Some(7))];
    let (_, simulation, reader) = replay(
        "  per_ip: [{ requests: 20, per: 1m }]\n  global: [{ requests: 12345678, per: 1s, burst: 99999999 }]\n",
        &lines,
    );
    let table = super::report::human(&simulation, &reader, ("proposed.yaml", None));
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("config") || l.starts_with("proposed  "))
        .collect();
    assert_eq!(rows.len(), 3, "{table}");
    // The shadow column ends at the same place on every row.
    let ends: Vec<usize> = rows
        .iter()
        .map(|row| {
            row.find(" shadow")
                .map_or_else(|| row.find(" no ").unwrap() + 3, |at| at + 7)
        })
        .collect();
    assert!(ends.iter().all(|end| *end == ends[0]), "{table}");
}

#[test]
fn logs_of_several_replicas_one_after_another_are_replayed_in_arrival_order() {
    // One replica's log (10:00:00, 10:16:40, 10:33:20), then another's (10:08:20), as
    // `kubectl logs -l` or `cat` puts them: far more apart than a slow request's line.
    let lines = [
        line(0, IP, None, None),
        line(1000, IP, None, None),
        line(2000, IP, None, None),
        line(500, IP, None, None),
    ];
    let (fates, simulation, _) = replay("  per_ip: [{ requests: 2, per: 1h }]\n", &lines);
    // Two an hour, one every 30 minutes: 10:00:00 and 10:08:20 are admitted, 10:16:40 is
    // the third within the burst and refused, 10:33:20 has had one refilled.
    assert_eq!(fates, [None, Some(LimitGroup::PerIp), None, None]);
    assert_eq!(simulation.proposed.denied, 1);
}

#[test]
fn a_summary_lines_requests_take_their_turns_among_other_lines() {
    // Three folded denials from 10:00:00.5 to 10:00:02.5 (so at .5, 1.5 and 2.5), then a
    // line of its own at 10:00:01.5 from the same address, written later, and one at
    // 10:00:01.0 written after it.
    let summary = line(0, IP, None, None).replace(
        r#""outcome":"forwarded","status":200"#,
        r#""outcome":"rate_limited","limit":"per_ip","status":429,"count":3,"last_received_at":"2025-03-01T10:00:02.5Z""#,
    );
    let mut lines = vec![summary, line(1, IP, None, None)];
    lines.push(line(1, IP, None, None).replace(":01.5Z", ":01.0Z"));
    let (fates, simulation, _) = replay("  per_ip: [{ requests: 3, per: 1h }]\n", &lines);
    // Fates by line, each line's requests in arrival order: the summary's at .5, 1.5 (its
    // line comes first at that time) and 2.5, the fifth request in all, refused like
    // the line at 1.5, the fourth; the one at 1.0 is the second.
    let refused = Some(LimitGroup::PerIp);
    assert_eq!(fates, [None, None, refused, refused, None]);
    assert_eq!(simulation.proposed.requests, 5);
    assert_eq!(simulation.recorded_denied, 3);
}

#[test]
fn requests_cut_before_their_answer_are_counted_not_replayed() {
    let cut = |extra: &str| {
        format!(
            r#"{{"received_at":"2025-03-01T10:00:00Z","request_id":"r","client_ip":"{IP}","outcome":"cut","status":499{extra},"target":"access"}}"#
        )
    };
    let lines = [
        line(1, IP, None, None),
        cut(""),
        // A summary of folded cut requests stands for its count.
        cut(r#","count":4,"last_received_at":"2025-03-01T10:00:01Z""#),
    ];
    let (fates, simulation, reader) = replay("", &lines);
    assert_eq!(fates, [None]);
    assert_eq!(simulation.proposed.requests, 1);
    assert_eq!(reader.cut, 5);
    assert_eq!(reader.unguarded, 0);
    assert!(reader.bad_lines.is_empty(), "{:?}", reader.bad_lines);

    // Read as carefully as a line that is replayed: no count a summary cannot hold, no
    // time that is not one.
    let bad = [
        cut(r#","count":18446744073709551615,"last_received_at":"2025-03-01T10:00:01Z""#),
        cut(r#","count":0,"last_received_at":"2025-03-01T10:00:01Z""#),
        cut(r#","count":2"#),
        cut("").replace("2025-03-01T10:00:00Z", "nonsense"),
    ];
    let (_, _, reader) = replay("", &bad);
    assert_eq!(reader.cut, 0);
    assert_eq!(reader.bad_line_count(), 4, "{:?}", reader.bad_lines);
}

#[test]
fn unreadable_access_lines_are_reported_by_number_and_others_skipped() {
    let lines = [
        "plain text from another program".to_owned(),
        r#"{"timestamp":"x","level":"INFO","message":"serving","target":"reset_gateway"}"#.to_owned(),
        r#"{"received_at":"2025-03-01T10:00:00Z","outcome":"not_found","status":404,"target":"access"}"#.to_owned(),
        r#"{"target":"access", truncated"#.to_owned(),
        line(1, "not-an-ip", None, None),
        line(2, IP, None, None).replace("2025-03-01T10:00:02.5Z", "yesterday"),
        line(3, IP, None, Some(5)).replace("0000000000000005", "05"),
        line(4, IP, None, None).replace(r#""received_at":"2025-03-01T10:00:04.5Z","#, ""),
        String::new(),
        line(5, IP, None, None),
        // Cut before its target: still known as an access line by its received_at.
        line(6, IP, None, None).split(r#","status""#).next().unwrap().to_owned(),
    ];
    let (fates, simulation, reader) = replay("", &lines);
    assert_eq!(fates, [None]);
    assert_eq!(simulation.proposed.requests, 1);
    assert_eq!(reader.unguarded, 1);
    assert_eq!(reader.other_lines, 3);
    let bad: Vec<u64> = reader.bad_lines.iter().map(|b| b.line).collect();
    assert_eq!(bad, [4, 5, 6, 7, 8, 11]);
    assert!(reader.bad_lines[5].reason.contains("cut short"));
    let reasons: Vec<&str> = reader.bad_lines.iter().map(|b| b.reason.as_str()).collect();
    assert!(reasons[1].contains("client_ip"), "{reasons:?}");
    assert!(reasons[2].contains("RFC 3339"), "{reasons:?}");
    assert!(reasons[3].contains("16 hex digits"), "{reasons:?}");
    assert!(reasons[4].contains("received_at"), "{reasons:?}");
}

#[test]
fn a_request_refused_early_when_recorded_is_counted_when_the_proposal_lets_it_further() {
    let mut refused = line(0, IP, None, None);
    refused = refused.replace(
        r#""outcome":"forwarded""#,
        r#""outcome":"rate_limited","limit":"per_ip""#,
    );
    let (fates, simulation, _) = replay("", &[refused]);
    assert_eq!(fates, [None]);
    assert_eq!(simulation.recorded_denied, 1);
    assert_eq!(simulation.proposed.unknown_beyond, 1);
}

#[test]
fn a_request_refused_per_address_when_recorded_has_nothing_unknown_beyond() {
    // Its address was read and logged: the replay charges the global group for it.
    let refused = line(0, IP, Some("ios"), Some(0xaa)).replace(
        r#""outcome":"forwarded""#,
        r#""outcome":"rate_limited","limit":"per_email""#,
    );
    let (fates, simulation, _) = replay("", &[refused]);
    assert_eq!(fates, [None]);
    assert_eq!(simulation.recorded_denied, 1);
    assert_eq!(simulation.proposed.unknown_beyond, 0);
}

/// The hand-written reading of the gateway's own time format gives what the general RFC
/// 3339 parser gives, over four centuries of leap years, every fraction length and the
/// edges of each field; what it does not read (offsets, out-of-range fields) falls to the
/// general parser, which keeps refusing what is not a time.
#[test]
fn log_times_read_as_the_general_parser_reads_them() {
    use super::reader::parse_time;
    use time::format_description::well_known::Rfc3339;
    let general = |text: &str| {
        time::OffsetDateTime::parse(text, &Rfc3339)
            .ok()
            .and_then(|t| u64::try_from(t.unix_timestamp_nanos()).ok())
    };
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut texts = vec![
        "1970-01-01T00:00:00Z".to_owned(),
        "2000-02-29T23:59:59.999999999Z".to_owned(),
        "2100-02-28T12:00:00.5Z".to_owned(),
        "2024-12-31T23:59:59.123456Z".to_owned(),
    ];
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let secs = state % (400 * 365 * 86_400);
        let at = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap();
        let digits = (state >> 40) % 10;
        let fraction = match digits {
            0 => String::new(),
            n => format!(
                ".{:0width$}",
                (state >> 8) % 10u64.pow(n as u32),
                width = n as usize
            ),
        };
        texts.push(format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        ));
    }
    for text in &texts {
        assert_eq!(parse_time(text).ok(), general(text), "{text}");
    }
    for refused in [
        "2025-02-29T10:00:00Z",
        "2025-13-01T10:00:00Z",
        "2025-03-01T24:00:00Z",
        "2025-03-01T10:00:00.Z",
        "1969-12-31T23:59:59Z",
        "not a time",
    ] {
        assert!(parse_time(refused).is_err(), "{refused}");
    }
    // Offsets are read by the general parser.
    assert_eq!(
        parse_time("2025-03-01T11:00:00+01:00").ok(),
        parse_time("2025-03-01T10:00:00Z").ok()
    );
}

#[test]
fn only_a_change_the_replay_cannot_model_is_named_and_order_is_no_change() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, guard: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "guard:\n  clients:\n    - id: ios\n      token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n{guard}"
            ),
        )
        .unwrap();
        path
    };
    let current = write(
        "current.yaml",
        "  client_ip: { trusted_proxies: [10.0.0.0/8, 192.0.2.0/24] }\n",
    );
    let reordered = write(
        "reordered.yaml",
        "  client_ip: { trusted_proxies: [192.0.2.0/24, 10.0.0.0/8] }\n",
    );
    let utf8 = write(
        "utf8.yaml",
        "  client_ip: { trusted_proxies: [10.0.0.0/8, 192.0.2.0/24] }\n  email: { allow_utf8_local: true }\n",
    );
    assert!(super::unreplayed_changes(&reordered, &current)
        .unwrap()
        .is_empty());
    assert_eq!(
        super::unreplayed_changes(&utf8, &current).unwrap(),
        ["guard.email.allow_utf8_local"]
    );
}
