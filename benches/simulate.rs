//! `cargo bench -p reset-gateway --bench simulate`: how fast `reset-gateway simulate`
//! replays an access log, in requests per second of log on one core.
//!
//! The log is generated: a million access lines as the gateway writes them (about 330
//! bytes each), a day of traffic from 50,000 client IPs, two clients and 200,000
//! addresses, replayed through the shipped default limits (all four groups, five quotas).
//! Reading (JSON, RFC 3339 times), putting in order and deciding are all timed.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, Criterion, Throughput};
use reset_gateway::simulate::reader::Reader;
use reset_gateway::simulate::replay::Simulation;
use reset_guard::GuardConfig;

/// Whether this run measures (`cargo bench`) rather than smoke-tests (`cargo test`).
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// `lines` access lines over a day, in the order a busy gateway writes them.
fn log(lines: u64) -> String {
    let mut out = String::with_capacity(lines as usize * 340);
    let start = 1_740_787_200u64; // 2025-03-01T00:00:00Z
    let step_ns = 86_400_000_000_000 / lines;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..lines {
        // xorshift: cheap, repeatable spread over IPs and addresses.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let ns = i * step_ns;
        let (secs, nanos) = (start + ns / 1_000_000_000, ns % 1_000_000_000);
        let (day_secs, hour) = (secs % 86_400, (secs % 86_400) / 3600);
        let ip = state % 50_000;
        let email = (state >> 20) % 200_000;
        let client = if state & 1 == 0 { "ios" } else { "web" };
        let _ = writeln!(
            out,
            r#"{{"timestamp":"2025-03-01T{hour:02}:{:02}:{:02}.{:06}Z","level":"INFO","received_at":"2025-03-01T{hour:02}:{:02}:{:02}.{nanos:09}Z","request_id":"{state:032x}","guarded":true,"client_id":"{client}","client_ip":"10.{}.{}.{}","email_hash":"{:016x}","outcome":"forwarded","status":200,"upstream_status":200,"upstream_ms":41.2,"duration_ms":41.5,"target":"access"}}"#,
            (day_secs / 60) % 60,
            day_secs % 60,
            nanos / 1000,
            (day_secs / 60) % 60,
            day_secs % 60,
            ip >> 16,
            (ip >> 8) & 255,
            ip & 255,
            email.wrapping_mul(0x2545_F491_4F6C_DD1D),
        );
    }
    out
}

fn defaults() -> (reset_guard::GuardSettings, usize) {
    let yaml = "clients:\n  - id: ios\n    token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n";
    let settings = GuardConfig::from_yaml(yaml).unwrap().validate().unwrap();
    (settings, 1_000_000)
}

fn bench_replay(c: &mut Criterion) {
    let lines = if measuring() { 1_000_000 } else { 2_000 };
    let text = log(lines);
    let mut group = c.benchmark_group("simulate");
    group.sample_size(10);
    group.throughput(Throughput::Elements(lines));
    group.bench_function(format!("replay {lines} lines"), |b| {
        b.iter(|| {
            let mut simulation = Simulation::new(defaults(), None);
            let mut reader = Reader::default();
            reset_gateway::simulate::simulate(
                text.as_bytes(),
                "bench",
                &mut simulation,
                &mut reader,
            )
            .unwrap();
            assert_eq!(simulation.proposed.requests, lines);
            black_box(simulation.proposed.denied)
        })
    });
    group.bench_function(format!("read only {lines} lines"), |b| {
        b.iter(|| {
            let mut reader = Reader::default();
            let mut n = 0u64;
            reader
                .read_all(text.as_bytes(), |request, _| n += request.at_ns & 1)
                .unwrap();
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_replay);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
