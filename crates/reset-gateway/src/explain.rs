//! `reset-gateway check-config --explain`: every quota in plain words, so what the YAML
//! means is never a guess.

use std::time::Duration;

use reset_guard::{GuardSettings, LimitGroup, Quota};

/// One line per limit group, for example
/// `per_email: 3 per hour, at most 3 at once; a steady client gets one every 20 minutes;
/// at most 10 a day per address`. `global_keys`: how many keys a Redis Cluster store
/// spreads the global group over (`store.redis.global_keys`; 1 for any other store).
pub fn explain(settings: &GuardSettings, global_keys: u16) -> String {
    let mut text: String = LimitGroup::ALL
        .into_iter()
        .map(|group| format!("{}\n", group_line(group, settings.quotas(group))))
        .collect();
    if let Some(spread) = global_spread(settings.quotas(LimitGroup::Global), global_keys) {
        text.push_str(&spread);
    }
    if let Some(note) = one_client_spends_global(settings) {
        text.push_str(&note);
    }
    text
}

/// The steady rate a group's enforced quotas admit for one key, in requests a second
/// (`None`: no enforced quota, no limit).
fn steady_rate(quotas: &[Quota]) -> Option<f64> {
    quotas
        .iter()
        .filter(|quota| !quota.shadow)
        .map(|quota| f64::from(quota.requests) / quota.per.as_secs_f64())
        .min_by(f64::total_cmp)
}

/// A note when one client alone may admit as much as the global quota: a leaked client
/// token flooding new addresses then spends `global`, and every client's resets get 429.
fn one_client_spends_global(settings: &GuardSettings) -> Option<String> {
    let global = steady_rate(settings.quotas(LimitGroup::Global))?;
    let client = steady_rate(settings.quotas(LimitGroup::PerClient));
    if client.is_some_and(|client| client < global) {
        return None;
    }
    let per_client = match client {
        Some(rate) => format!("admits {} a second", spoken_rate(rate)),
        None => "has no limit".to_owned(),
    };
    Some(format!(
        "note: one client alone can spend the global quota (per_client {per_client}, global \
         {} a second): with its token leaked, a flood of new addresses gets every client's \
         resets refused until global refills. With several apps, keep each one's per_client \
         below global.\n",
        spoken_rate(global)
    ))
}

/// What each of the keys the global group is spread over holds, when it is spread.
fn global_spread(quotas: &[Quota], keys: u16) -> Option<String> {
    if keys <= 1 || quotas.is_empty() {
        return None;
    }
    let each: Vec<String> = quotas
        .iter()
        .map(|quota| {
            format!(
                "{} per {}, at most {} at once",
                spoken_rate(f64::from(quota.requests) / f64::from(keys)),
                window(quota.per),
                quota.burst / u32::from(keys),
            )
        })
        .collect();
    Some(format!(
        "  spread over {keys} keys (store.redis.global_keys), each charged by the addresses of \
         its part of the cluster's slots: {} on each key; an approximation, never looser\n",
        each.join("; ")
    ))
}

/// `200`, `0.5`, `0.0028`, `0.000012`: a rate with what precision it needs (four decimals,
/// and two significant digits at least, so that 1 a day is not read as 0 a second).
fn spoken_rate(rate: f64) -> String {
    let decimals = match rate > 0.0 && rate < 1.0 {
        true => (1.0 - rate.log10().floor()).clamp(4.0, 15.0) as usize,
        false => 4,
    };
    let text = format!("{rate:.decimals$}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn group_line(group: LimitGroup, quotas: &[Quota]) -> String {
    let name = group.name();
    let Some((first, rest)) = quotas.split_first() else {
        return format!("{name}: no limit");
    };
    let steady = if group == LimitGroup::Global {
        "steady traffic gets"
    } else {
        "a steady client gets"
    };
    let mut line = format!(
        "{name}: {} per {}, at most {} at once; {steady} one every {}{}",
        first.requests,
        window(first.per),
        first.burst,
        every(interval(first)),
        shadow_note(first),
    );
    for quota in rest {
        let burst = if quota.burst == quota.requests {
            String::new()
        } else {
            format!(" ({} at once)", quota.burst)
        };
        line.push_str(&format!(
            "; at most {} {}{burst} {}{}",
            quota.requests,
            per_window(quota.per),
            subject(group),
            shadow_note(quota),
        ));
    }
    line
}

fn subject(group: LimitGroup) -> &'static str {
    match group {
        LimitGroup::PerIp => "per client IP",
        LimitGroup::PerClient => "per client",
        LimitGroup::PerEmail => "per address",
        _ => "in all",
    }
}

fn shadow_note(quota: &Quota) -> &'static str {
    if quota.shadow {
        " (shadow: counted and logged, never denied)"
    } else {
        ""
    }
}

/// The time between two requests a quota admits at its steady rate.
fn interval(quota: &Quota) -> Duration {
    quota.per / quota.requests
}

/// `per` as it would be written in the YAML: the largest unit that divides it (`1h`,
/// `90m`, `250ms`).
pub fn written_duration(per: Duration) -> String {
    reset_guard::ConfigDuration(per).to_string()
}

const UNITS: [(&str, u128); 5] = [
    ("day", 86_400_000_000_000),
    ("hour", 3_600_000_000_000),
    ("minute", 60_000_000_000),
    ("second", 1_000_000_000),
    ("millisecond", 1_000_000),
];

/// `hour`, `day`, `5 minutes`: the window after "per".
fn window(per: Duration) -> String {
    let ns = per.as_nanos();
    for (unit, size) in UNITS {
        if ns == size {
            return unit.to_owned();
        }
    }
    spoken(per)
}

/// `a day`, `an hour`, `per 5 minutes`.
fn per_window(per: Duration) -> String {
    match window(per).as_str() {
        "hour" => "an hour".to_owned(),
        one @ ("day" | "minute" | "second" | "millisecond") => format!("a {one}"),
        other => format!("per {other}"),
    }
}

/// `20 minutes`, or `hour` for exactly one: "one every hour".
fn every(duration: Duration) -> String {
    let text = spoken(duration);
    match text.strip_prefix("1 ") {
        Some(unit) if !unit.contains(' ') => unit.to_owned(),
        _ => text,
    }
}

/// `20 minutes`, `2 hours 24 minutes`, `1 second`, `250 milliseconds`: the two largest
/// units, enough to picture a pace.
fn spoken(duration: Duration) -> String {
    // Under a second, whole milliseconds can be a sixth off (60 a second is one every
    // 16.7, not 16): a tenth is shown.
    let ns = duration.as_nanos();
    if (1_000_000..999_950_000).contains(&ns) && !ns.is_multiple_of(1_000_000) {
        return format!("{:.1} milliseconds", ns as f64 / 1e6);
    }
    let mut rest = duration.as_nanos();
    let mut parts = Vec::new();
    for (unit, size) in UNITS {
        if rest >= size && parts.len() < 2 {
            let n = rest / size;
            rest %= size;
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        } else if !parts.is_empty() {
            break;
        }
    }
    if parts.is_empty() {
        let (n, unit) = match duration.as_micros() {
            0 => (duration.as_nanos().max(1), "nanosecond"),
            micros => (micros, "microsecond"),
        };
        return format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use reset_guard::GuardConfig;

    use super::*;

    fn explained(limits: &str) -> String {
        let client = "clients:\n  - id: ios\n    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n";
        let settings = GuardConfig::from_yaml(&format!("{client}limits:\n{limits}"))
            .unwrap()
            .validate()
            .unwrap();
        explain(&settings, 1)
    }

    #[test]
    fn rates_keep_two_significant_digits_at_least() {
        assert_eq!(spoken_rate(200.0), "200");
        assert_eq!(spoken_rate(0.5), "0.5");
        assert_eq!(spoken_rate(1.0 / 360.0), "0.0028");
        // 1 a day: it read as 0 a second.
        assert_eq!(spoken_rate(1.0 / 86_400.0), "0.000012");
        assert_eq!(spoken_rate(0.0), "0");
    }

    #[test]
    fn each_group_in_plain_words() {
        let text = explained(
            "  per_ip: [{ requests: 20, per: 1m }]\n  per_client: [{ requests: 200, per: 1s, burst: 400 }]\n  per_email: [{ requests: 3, per: 1h }, { requests: 10, per: 24h }]\n  global: []\n",
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "per_ip: 20 per minute, at most 20 at once; a steady client gets one every 3 seconds",
                "per_client: 200 per second, at most 400 at once; a steady client gets one every 5 milliseconds",
                "per_email: 3 per hour, at most 3 at once; a steady client gets one every 20 minutes; at most 10 a day per address",
                "global: no limit",
            ]
        );
    }

    /// A global group spread over several keys (`store.redis.global_keys`) says what each
    /// key holds.
    #[test]
    fn a_spread_global_group_says_what_each_key_holds() {
        let client = "clients:\n  - id: ios\n    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n";
        let limits = "  per_ip: []\n  per_client: []\n  per_email: []\n  global: [{ requests: 100, per: 1s }]\n";
        let settings = GuardConfig::from_yaml(&format!("{client}limits:\n{limits}"))
            .unwrap()
            .validate()
            .unwrap();
        let text = explain(&settings, 3);
        assert!(
            text.contains("global: 100 per second, at most 100 at once"),
            "{text}"
        );
        assert!(
            text.contains("spread over 3 keys (store.redis.global_keys)"),
            "{text}"
        );
        assert!(
            text.contains("33.3333 per second, at most 33 at once on each key"),
            "{text}"
        );
        assert!(!explain(&settings, 1).contains("spread"));
    }

    /// The shipped limits let one client spend the whole global quota: said, with what to do.
    #[test]
    fn a_client_that_can_spend_the_global_quota_is_noted() {
        let text = explained(
            "  per_ip: []\n  per_client: [{ requests: 200, per: 1s, burst: 400 }]\n  per_email: []\n  global: [{ requests: 100, per: 1s }]\n",
        );
        assert!(
            text.contains("note: one client alone can spend the global quota (per_client admits 200 a second, global 100 a second)"),
            "{text}"
        );
        let text = explained(
            "  per_ip: []\n  per_client: []\n  per_email: []\n  global: [{ requests: 10, per: 1h }]\n",
        );
        assert!(
            text.contains("(per_client has no limit, global 0.0028 a second)"),
            "{text}"
        );
        for fine in [
            "  per_ip: []\n  per_client: [{ requests: 50, per: 1s }]\n  per_email: []\n  global: [{ requests: 100, per: 1s }]\n",
            "  per_ip: []\n  per_client: [{ requests: 500, per: 1s }]\n  per_email: []\n  global: []\n",
        ] {
            assert!(!explained(fine).contains("note:"), "{fine}");
        }
    }

    #[test]
    fn odd_windows_and_shadow_quotas() {
        let text = explained(
            "  per_ip: []\n  per_client: []\n  per_email: [{ requests: 5, per: 90m, shadow: true }, { requests: 7, per: 2d, burst: 2 }]\n  global: [{ requests: 10, per: 24h }]\n",
        );
        assert!(text.contains(
            "per_email: 5 per 1 hour 30 minutes, at most 5 at once; a steady client gets one every 18 minutes (shadow: counted and logged, never denied); at most 7 per 2 days (2 at once) per address"
        ), "{text}");
        assert!(text.contains("global: 10 per day, at most 10 at once; steady traffic gets one every 2 hours 24 minutes"), "{text}");
    }

    #[test]
    fn a_sub_second_pace_is_not_rounded_away() {
        let text = explained(
            "  per_ip: []
  per_client: []
  per_email: []
  global: [{ requests: 60, per: 1s }]
",
        );
        assert!(text.contains("one every 16.7 milliseconds"), "{text}");
        for (quota, pace) in [
            ("1000000, per: 1s", "one every microsecond"),
            ("200000, per: 1s", "one every 5 microseconds"),
            ("4294967295, per: 1h", "one every 838 nanoseconds"),
        ] {
            let text = explained(&format!(
                "  per_ip: []\n  per_client: []\n  per_email: []\n  global: [{{ requests: {quota} }}]\n"
            ));
            assert!(text.contains(pace), "{quota}: {text}");
        }
    }
}
