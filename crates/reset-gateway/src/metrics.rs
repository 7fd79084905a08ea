//! Prometheus metrics (SPEC §10), exposed in text format on the admin listener.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use reset_guard::{GuardHandle, LimitGroup};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Result_ {
    result: &'static str,
}

/// Every metric the gateway records.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Outcome, Counter>,
    upstream_responses: Family<Status, Counter>,
    upstream_duration: Histogram,
    request_duration: Histogram,
    reloads: Family<Result_, Counter>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 250µs to ~8s.
    exponential_buckets(0.000_25, 2.0, 16)
}

impl Metrics {
    /// Registers every family; `guard` supplies the limiter's own counters at scrape time.
    pub fn new(guard: GuardHandle) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Outcome, Counter>::default();
        let upstream_responses = Family::<Status, Counter>::default();
        let upstream_duration = Histogram::new(latency_buckets());
        let request_duration = Histogram::new(latency_buckets());
        let reloads = Family::<Result_, Counter>::default();
        registry.register(
            "reset_gateway_requests",
            "Requests answered, by outcome (forwarded, rate_limited, email_invalid, …)",
            requests.clone(),
        );
        registry.register(
            "reset_gateway_upstream_responses",
            "QuickBlox answers, by their true status (before uniform answers)",
            upstream_responses.clone(),
        );
        registry.register(
            "reset_gateway_upstream_duration_seconds",
            "Time QuickBlox took to answer",
            upstream_duration.clone(),
        );
        registry.register(
            "reset_gateway_request_duration_seconds",
            "Time from request head to answer",
            request_duration.clone(),
        );
        registry.register(
            "reset_gateway_config_reloads",
            "Configuration reloads, by result",
            reloads.clone(),
        );
        registry.register_collector(Box::new(LimiterCollector { guard }));
        Metrics {
            registry,
            requests,
            upstream_responses,
            upstream_duration,
            request_duration,
            reloads,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, outcome: &'static str, duration: Duration) {
        self.requests.get_or_create(&Outcome { outcome }).inc();
        self.request_duration.observe(duration.as_secs_f64());
    }

    /// Counts one QuickBlox answer.
    pub fn upstream(&self, status: u16, duration: Duration) {
        self.upstream_responses
            .get_or_create(&Status { status })
            .inc();
        self.upstream_duration.observe(duration.as_secs_f64());
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&Result_ { result }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Reads the guard's counters when scraped, so the hot path pays nothing extra.
#[derive(Debug)]
struct LimiterCollector {
    guard: GuardHandle,
}

impl Collector for LimiterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.guard.counters();
        let mut family = encoder.encode_descriptor(
            "reset_gateway_rate_limited",
            "Requests a quota denied (shadow=\"true\": would have denied)",
            None,
            MetricType::Counter,
        )?;
        for group in LimitGroup::ALL {
            for (shadow, value) in [
                ("false", counters.denied(group)),
                ("true", counters.shadow_denied(group)),
            ] {
                let labels = [("limit", group.name()), ("shadow", shadow)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let errors = encoder.encode_descriptor(
            "reset_gateway_store_errors",
            "Requests that could not ask the rate-limit store",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.guard.store_errors()).encode(errors)?;
        let up = encoder.encode_descriptor(
            "reset_gateway_store_up",
            "1 when the rate-limit store answers",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(self.guard.store_healthy())).encode(up)?;
        let mut keys = encoder.encode_descriptor(
            "reset_gateway_limiter_keys",
            "Keys tracked in memory, per group (largest quota of the group)",
            None,
            MetricType::Gauge,
        )?;
        for group in LimitGroup::ALL {
            let held = self
                .guard
                .tracked_keys(group)
                .into_iter()
                .max()
                .unwrap_or(0);
            let labels = [("limit", group.name())];
            ConstGauge::new(held as i64).encode(keys.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
