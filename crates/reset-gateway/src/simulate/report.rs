//! What a replay found, as a table for a person or one JSON object for a script.

use std::fmt::Write;
use std::time::Duration;

use reset_guard::LimitGroup;
use serde_json::{json, Value};

use super::reader::Reader;
use super::replay::{Change, QuotaTally, Simulation, Tally};
use crate::explain::written_duration;
use crate::telemetry::email_tag;

fn time_of(ns: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_nanos(ns);
    crate::telemetry::timestamp(at)
}

fn fate(group: Option<LimitGroup>) -> String {
    match group {
        Some(group) => format!("refused by {}", group.name()),
        None => "admitted".to_owned(),
    }
}

/// Whom a changed request was for, as the access log names them (`email_hash` as its
/// line writes it), so the report can be read beside the log.
fn whom(change: &Change) -> String {
    let mut whom = format!("client_ip {}", change.client_ip);
    if let Some(id) = &change.client_id {
        let _ = write!(whom, ", client_id {id}");
    }
    if let Some(hash) = change.email_hash {
        let _ = write!(whom, ", email_hash {}", email_tag(hash));
    }
    whom
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The table, the totals, the changed requests and the lines not read.
pub fn human(simulation: &Simulation, reader: &Reader, names: (&str, Option<&str>)) -> String {
    let mut out = String::new();
    let proposed = &simulation.proposed;
    match simulation.span {
        Some((first, last)) => {
            let _ = writeln!(
                out,
                "Replayed {} requests that reached the limits, arrived {} to {}.",
                proposed.requests,
                time_of(first),
                time_of(last)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "No request in the log reached the limits ({} access lines of requests that \
                 did not, {} requests cut before their answer, {} unreadable, {} other lines: \
                 is this the gateway's JSON access log, log.format: json?).",
                reader.unguarded,
                reader.cut,
                reader.bad_line_count(),
                reader.other_lines
            );
        }
    }
    let _ = writeln!(out);
    let mut tallies = vec![("proposed", proposed)];
    if let Some(current) = &simulation.current {
        tallies.push(("current", current));
    }
    // As wide as the widest quota and burst (a quota of millions a second is 7 digits).
    let quotas = || tallies.iter().flat_map(|(_, tally)| &tally.quotas);
    let widths = (
        quotas().map(|q| quota_text(q).len()).fold(8, usize::max),
        quotas()
            .map(|q| q.quota.burst.to_string().len())
            .fold(6, usize::max),
    );
    let _ = writeln!(
        out,
        "{:<9} {:<10} {:<q$} {:>b$} {:>6} {:>9} {:>10} {:>13} {:>9}",
        "config",
        "group",
        "quota",
        "burst",
        "shadow",
        "seen",
        "would deny",
        "distinct keys",
        "peak use",
        q = widths.0,
        b = widths.1,
    );
    for group in LimitGroup::ALL {
        for (config, tally) in &tallies {
            table_rows(&mut out, config, tally, group, widths);
        }
    }
    let _ = writeln!(out);
    for (config, tally) in &tallies {
        let name = if *config == "proposed" {
            names.0
        } else {
            names.1.unwrap_or("")
        };
        let _ = writeln!(
            out,
            "{config} ({name}): {} of {} requests refused ({:.2}%){}",
            tally.denied,
            tally.requests,
            percent(tally.denied, tally.requests),
            by_group(tally)
        );
    }
    let _ = writeln!(
        out,
        "recorded: {} of {} requests refused by a limit",
        simulation.recorded_denied, proposed.requests
    );
    if reader.cut > 0 {
        let _ = writeln!(
            out,
            "note: {} requests were cut before their answer (outcome cut); the log does not \
             say what they were charged (they may have been), so they are not replayed and the \
             replay may refuse fewer than the recording did",
            reader.cut
        );
    }
    if proposed.unknown_beyond > 0 {
        let _ = writeln!(
            out,
            "note: {} requests the recording refused per IP or per client got further in this \
             replay; the log does not say which client or address they were for, so the \
             later groups were not charged for them",
            proposed.unknown_beyond
        );
    }
    if !simulation.unreplayed.is_empty() {
        let _ = writeln!(
            out,
            "note: the proposal changes {}, which the replay cannot model: each request keeps \
             the client IP, client and address key the recording gave it",
            simulation.unreplayed.join(", ")
        );
    }
    if simulation.current.is_some() {
        let _ = writeln!(out, "\n{} requests change fate", simulation.changed);
        for change in simulation.changes.iter().take(20) {
            let _ = writeln!(
                out,
                "  line {} at {} ({}): {} now, {} proposed",
                change.line,
                time_of(change.at_ns),
                whom(change),
                fate(change.current),
                fate(change.proposed)
            );
        }
        if simulation.changed > 20 {
            let _ = writeln!(
                out,
                "  … {} more (--json lists up to 100)",
                simulation.changed - 20
            );
        }
    }
    lines_not_read(&mut out, reader);
    out
}

fn by_group(tally: &Tally) -> String {
    let parts: Vec<String> = LimitGroup::ALL
        .into_iter()
        .zip(tally.denied_by)
        .filter(|(_, n)| *n > 0)
        .map(|(group, n)| format!("{} {n}", group.name()))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    }
}

/// `3/1h`, as the quota column shows it.
fn quota_text(quota: &QuotaTally) -> String {
    format!(
        "{}/{}",
        quota.quota.requests,
        written_duration(quota.quota.per)
    )
}

fn table_rows(
    out: &mut String,
    config: &str,
    tally: &Tally,
    group: LimitGroup,
    (quota_width, burst_width): (usize, usize),
) {
    for quota in tally.quotas.iter().filter(|q| q.group == group) {
        let _ = writeln!(
            out,
            "{:<9} {:<10} {:<quota_width$} {:>burst_width$} {:>6} {:>9} {:>10} {:>13} {:>8.0}%",
            config,
            group.name(),
            quota_text(quota),
            quota.quota.burst,
            if quota.quota.shadow { "yes" } else { "no" },
            quota.seen,
            quota.denied,
            tally.distinct_keys(group),
            quota.peak_use * 100.0
        );
    }
}

fn lines_not_read(out: &mut String, reader: &Reader) {
    if reader.bad_line_count() == 0 {
        return;
    }
    let _ = writeln!(
        out,
        "\n{} access lines could not be read and were skipped:",
        reader.bad_line_count()
    );
    for bad in &reader.bad_lines {
        let _ = writeln!(out, "  line {}: {}", bad.line, bad.reason);
    }
}

fn tally_json(tally: &Tally) -> Value {
    let quotas: Vec<Value> = tally
        .quotas
        .iter()
        .map(|q| {
            json!({
                "group": q.group.name(),
                "requests": q.quota.requests,
                "per": written_duration(q.quota.per),
                "burst": q.quota.burst,
                "shadow": q.quota.shadow,
                "seen": q.seen,
                "denied": q.denied,
                "distinct_keys": tally.distinct_keys(q.group),
                "peak_use": q.peak_use,
            })
        })
        .collect();
    let denied_by: serde_json::Map<String, Value> = LimitGroup::ALL
        .into_iter()
        .zip(tally.denied_by)
        .map(|(group, n)| (group.name().to_owned(), json!(n)))
        .collect();
    json!({
        "requests": tally.requests,
        "denied": tally.denied,
        "denied_by": denied_by,
        "quotas": quotas,
    })
}

/// One JSON object: the proposal's tally at the top, the comparison under `compare`.
pub fn json(simulation: &Simulation, reader: &Reader) -> Value {
    let mut out = tally_json(&simulation.proposed);
    let object = out.as_object_mut().expect("an object");
    object.insert("recorded_denied".into(), json!(simulation.recorded_denied));
    object.insert(
        "unknown_beyond".into(),
        json!(simulation.proposed.unknown_beyond),
    );
    object.insert("unreplayed_changes".into(), json!(simulation.unreplayed));
    if let Some((first, last)) = simulation.span {
        object.insert("first".into(), json!(time_of(first)));
        object.insert("last".into(), json!(time_of(last)));
    }
    object.insert("unguarded_lines".into(), json!(reader.unguarded));
    object.insert("cut_requests".into(), json!(reader.cut));
    object.insert("other_lines".into(), json!(reader.other_lines));
    object.insert("bad_line_count".into(), json!(reader.bad_line_count()));
    let bad: Vec<Value> = reader
        .bad_lines
        .iter()
        .map(|b| json!({"line": b.line, "reason": b.reason}))
        .collect();
    object.insert("bad_lines".into(), json!(bad));
    if let Some(current) = &simulation.current {
        let changes: Vec<Value> = simulation
            .changes
            .iter()
            .map(|c| {
                json!({
                    "line": c.line,
                    "received_at": time_of(c.at_ns),
                    "client_ip": c.client_ip.to_string(),
                    "client_id": c.client_id,
                    "email_hash": c.email_hash.map(email_tag),
                    "current": c.current.map(LimitGroup::name),
                    "proposed": c.proposed.map(LimitGroup::name),
                })
            })
            .collect();
        let mut compare = tally_json(current);
        let compare_object = compare.as_object_mut().expect("an object");
        compare_object.insert("changed".into(), json!(simulation.changed));
        compare_object.insert("changes".into(), json!(changes));
        object.insert("compare".into(), compare);
    }
    out
}
