use super::*;

const MS: u64 = 1_000_000;
const START: u64 = 1_700_000_000_000 * MS;

fn denial(ip: &str) -> Denial<'static> {
    Denial {
        outcome: "rate_limited",
        limit: Some("per_email"),
        status: 429,
        guarded: true,
        client_ip: ip.parse().unwrap(),
        client_id: Some("ios"),
        email_hash: Some(0x0123_4567_89ab_cdef),
    }
}

/// Feeds `denial` at each time (ms after START); the decisions and the summaries handed back.
fn feed(folder: &Folder, denial: &Denial<'_>, at_ms: &[u64]) -> (Vec<Decision>, Vec<Summary>) {
    let mut decisions = Vec::new();
    let mut summaries = Vec::new();
    for &ms in at_ms {
        let (decision, summary) = folder.observe(denial, START + ms * MS);
        decisions.push(decision);
        summaries.extend(summary);
    }
    (decisions, summaries)
}

#[test]
fn the_first_denials_of_a_window_are_logged_and_the_rest_counted() {
    let folder = Folder::new(Duration::from_secs(1));
    let flood = denial("203.0.113.7");
    let (decisions, summaries) = feed(&folder, &flood, &[0, 10, 20, 30, 40, 999]);
    use Decision::*;
    assert_eq!(decisions, [Log, Log, Log, Fold, Fold, Fold]);
    assert!(summaries.is_empty(), "the window is still open");
    // The next denial, a second after the first, opens a new window and closes the old.
    let (decisions, summaries) = feed(&folder, &flood, &[1000]);
    assert_eq!(decisions, [Log]);
    assert_eq!(
        summaries,
        [Summary {
            identity: Identity::of(&flood),
            count: 3,
            first_ns: START + 30 * MS,
            last_ns: START + 999 * MS,
        }]
    );
}

#[test]
fn a_window_without_folded_denials_closes_without_a_summary() {
    let folder = Folder::new(Duration::from_secs(1));
    let (_, summaries) = feed(&folder, &denial("203.0.113.7"), &[0, 1, 2, 5000]);
    assert!(summaries.is_empty());
    assert!(folder.sweep(START + 10_000 * MS).is_empty());
}

#[test]
fn identities_are_folded_apart() {
    let folder = Folder::new(Duration::from_millis(100));
    let one = denial("203.0.113.7");
    let other_ip = denial("203.0.113.8");
    let other_email = Denial {
        email_hash: Some(7),
        ..one
    };
    let other_limit = Denial {
        limit: Some("per_ip"),
        ..one
    };
    for identity in [&one, &other_ip, &other_email, &other_limit] {
        let (decisions, _) = feed(&folder, identity, &[0, 1, 2, 3, 4]);
        assert_eq!(
            decisions.iter().filter(|d| **d == Decision::Fold).count(),
            2
        );
    }
    let summaries = folder.sweep(START + 100 * MS);
    assert_eq!(summaries.len(), 4);
    assert!(summaries.iter().all(|s| s.count == 2));
}

#[test]
fn sweeping_closes_only_the_windows_that_ended() {
    let folder = Folder::new(Duration::from_secs(1));
    let early = denial("203.0.113.7");
    let late = denial("203.0.113.8");
    feed(&folder, &early, &[0, 1, 2, 3, 4]);
    feed(&folder, &late, &[500, 501, 502, 503]);
    assert!(folder.sweep(START + 999 * MS).is_empty());
    let summaries = folder.sweep(START + 1000 * MS);
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].identity.client_ip, early.client_ip);
    assert_eq!(summaries[0].count, 2);
    // Shutdown closes the rest, however recent.
    let rest = folder.drain();
    assert_eq!(rest.len(), 1);
    assert_eq!(
        (rest[0].identity.client_ip, rest[0].count),
        (late.client_ip, 1)
    );
    assert!(folder.drain().is_empty());
}

#[test]
fn a_full_table_logs_new_identities_in_full() {
    let folder = Folder::with_limits(Duration::from_secs(1), 1, SHARDS);
    let ips: Vec<String> = (0..1000)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    let mut folded = 0;
    for ip in &ips {
        let (decisions, _) = feed(&folder, &denial(ip), &[0, 1]);
        folded += decisions.iter().filter(|d| **d == Decision::Fold).count();
    }
    // Never more identities than the table holds; every other denial was logged.
    assert!(folded <= folder.capacity(), "{folded}");
    assert!(folded > 0);
    let held: usize = folder.shards.iter().map(|s| lock(s).len()).sum();
    assert!(held <= folder.capacity());
}

#[test]
fn a_clock_going_back_stays_in_the_window() {
    let folder = Folder::new(Duration::from_secs(1));
    let flood = denial("2001:db8::1");
    let (decisions, _) = feed(&folder, &flood, &[500, 501, 502, 400, 503]);
    assert_eq!(decisions[3..], [Decision::Fold, Decision::Fold]);
    let summary = &folder.drain()[0];
    assert_eq!(
        (summary.first_ns, summary.last_ns),
        (START + 400 * MS, START + 503 * MS)
    );
}
