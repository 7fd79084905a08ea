//! Prometheus metrics, exposed in the OpenMetrics text format on the admin listener.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::encoding::{MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use reset_guard::{GuardHandle, LimitGroup, Rejection};

use crate::proxy_protocol::Refused;
use crate::refusal::Refusal;

use crate::telemetry::AccessRecord;

/// The `outcome` label of `reset_gateway_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The `status` label of `reset_gateway_upstream_responses_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

/// The `reason` label of `reset_gateway_proxy_protocol_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The `result` label of `reset_gateway_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Every metric the gateway records. Recording is a few atomic adds: counters are looked
/// up without hashing or locking their family, and the histograms take no lock, since
/// every worker thread records every request.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    outcome_counters: Vec<(&'static str, Counter)>,
    /// `outcome="cut"`, counted on its own path (a dropped request).
    cut: Counter,
    upstream_responses: Family<StatusLabel, Counter>,
    status_counters: Box<[OnceLock<Counter>]>,
    upstream_duration: Arc<LatencyHistogram>,
    request_duration: Arc<LatencyHistogram>,
    reloads: Family<ResultLabel, Counter>,
    /// 1 while the file last applied changes settings that only a restart applies.
    restart_pending: Gauge,
    last_reload_successful: Gauge,
    proxy_refused: Family<ReasonLabel, Counter>,
    /// Client connections open, over every worker.
    connections: Gauge,
    /// Times a worker had every place of its `max_connections` share taken.
    connection_limit: Counter,
}

/// How long requests waited for the Redis store's decisions: the guard records into it
/// (`ResetGuardBuilder::on_store_wait`, made before the guard), [`Metrics`] exports it.
#[derive(Clone, Debug)]
pub struct StoreWaits(Arc<LatencyHistogram>);

impl Default for StoreWaits {
    fn default() -> Self {
        StoreWaits(Arc::new(LatencyHistogram::new(latency_buckets())))
    }
}

impl StoreWaits {
    pub fn observe(&self, waited: Duration) {
        self.0.observe(waited);
    }
}

/// A client connection counted open until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 250µs to ~8s.
    exponential_buckets(0.000_25, 2.0, 16)
}

impl Metrics {
    /// The media type of [`render`](Self::render)'s body. prometheus-client writes
    /// OpenMetrics (`# EOF`, `_total` samples under a `counter` family); read as the older
    /// `text/plain; version=0.0.4`, every counter would be untyped.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Registers every family; `guard` supplies the limiter's own counters at scrape time.
    pub fn new(guard: GuardHandle, store_waits: StoreWaits) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OutcomeLabel, Counter>::default();
        let upstream_responses = Family::<StatusLabel, Counter>::default();
        let upstream_duration = Arc::new(LatencyHistogram::new(latency_buckets()));
        let request_duration = Arc::new(LatencyHistogram::new(latency_buckets()));
        let reloads = Family::<ResultLabel, Counter>::default();
        let proxy_refused = Family::<ReasonLabel, Counter>::default();
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
            "Time QuickBlox took over a reset: to answer, or until the exchange failed (a timeout counts its whole wait)",
            SharedHistogram(upstream_duration.clone()),
        );
        registry.register(
            "reset_gateway_store_duration_seconds",
            "Time a request waited for the Redis store's decision (asked in a batch with others), or for its failure (a timeout waits store.redis.timeout, a refused connection fails at once); none with the memory store",
            SharedHistogram(store_waits.0),
        );
        registry.register(
            "reset_gateway_request_duration_seconds",
            "Time from request head to answer",
            SharedHistogram(request_duration.clone()),
        );
        registry.register(
            "reset_gateway_config_reloads",
            "Configuration reloads, by result",
            reloads.clone(),
        );
        let restart_pending = Gauge::default();
        registry.register(
            "reset_gateway_config_restart_pending",
            "1 while the configuration last applied changes settings that only a restart applies (the running ones stay)",
            restart_pending.clone(),
        );
        let last_reload_successful = Gauge::default();
        // The file the process started with was valid, or it would not have started.
        last_reload_successful.set(1);
        registry.register(
            "reset_gateway_config_last_reload_successful",
            "0 from a refused reload until one succeeds: the file on disk is not what runs, and a replica starting from it would refuse to start",
            last_reload_successful.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "reset_gateway_connections",
            "Client connections open",
            connections.clone(),
        );
        let connection_limit = Counter::default();
        registry.register(
            "reset_gateway_connection_limit_reached",
            "Times a worker had server.max_connections (its share) open and left new connections waiting in the listen backlog",
            connection_limit.clone(),
        );
        registry.register(
            "reset_gateway_proxy_protocol_refused",
            "Connections closed for their PROXY protocol header, or its absence, by reason",
            proxy_refused.clone(),
        );
        // Every reason from the start, so that the first refusal shows in `increase()`.
        for refused in Refused::ALL {
            let reason = refused.reason();
            let _ = proxy_refused.get_or_create(&ReasonLabel { reason });
        }
        registry.register_collector(Box::new(LimiterCollector { guard }));
        registry.register_collector(Box::new(LogCollector));
        // Both results from the start: `increase()` sees nothing of a series' first sample,
        // so a first failed reload would never alert if its series only appeared then.
        for result in RELOAD_RESULTS {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        // Every outcome's counter resolved once (one not listed still counts, through the
        // family).
        let outcome_counters = AccessRecord::FORWARD_OUTCOMES
            .iter()
            .chain([AccessRecord::PREFLIGHT].iter())
            .chain(Rejection::OUTCOMES.iter())
            .chain(Refusal::OUTCOMES.iter())
            .map(|&outcome| {
                (
                    outcome,
                    requests.get_or_create(&OutcomeLabel { outcome }).clone(),
                )
            })
            .collect();
        let cut = requests
            .get_or_create(&OutcomeLabel {
                outcome: AccessRecord::CUT,
            })
            .clone();
        Metrics {
            registry,
            requests,
            outcome_counters,
            cut,
            upstream_responses,
            status_counters: (0..STATUSES).map(|_| OnceLock::new()).collect(),
            upstream_duration,
            request_duration,
            reloads,
            restart_pending,
            last_reload_successful,
            proxy_refused,
            connections,
            connection_limit,
        }
    }

    /// Counts a client connection open until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections.inc();
        OpenConnection(self.connections.clone())
    }

    /// Counts a worker finding its share of `server.max_connections` all taken.
    pub fn connection_limit_reached(&self) {
        self.connection_limit.inc();
    }

    /// Counts one answered request.
    pub fn request(&self, outcome: &'static str, duration: Duration) {
        match self
            .outcome_counters
            .iter()
            .find(|(known, _)| *known == outcome)
        {
            Some((_, counter)) => counter.inc(),
            None => self.requests.get_or_create(&OutcomeLabel { outcome }).inc(),
        };
        self.request_duration.observe(duration);
    }

    /// Counts one request whose connection ended before its answer was made (apart from
    /// [`request`](Self::request), which stays inlined on every answer's path).
    pub fn cut(&self, duration: Duration) {
        self.cut.inc();
        self.request_duration.observe(duration);
    }

    /// Times one exchange with QuickBlox that brought no answer.
    pub fn upstream_failed(&self, duration: Duration) {
        self.upstream_duration.observe(duration);
    }

    /// Counts one QuickBlox answer.
    pub fn upstream(&self, status: u16, duration: Duration) {
        let family = || {
            self.upstream_responses
                .get_or_create(&StatusLabel { status })
        };
        match self.status_counters.get(usize::from(status)) {
            Some(slot) => slot.get_or_init(|| family().clone()).inc(),
            None => family().inc(),
        };
        self.upstream_duration.observe(duration);
    }

    /// Counts a connection closed for its PROXY protocol header.
    pub fn proxy_refused(&self, refused: Refused) {
        let reason = refused.reason();
        self.proxy_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Whether the file last applied waits for a restart in part.
    pub fn restart_pending(&self, pending: bool) {
        self.restart_pending.set(i64::from(pending));
    }

    /// Counts a reload attempt, and keeps whether the last one succeeded.
    pub fn reload(&self, ok: bool) {
        self.last_reload_successful.set(i64::from(ok));
        let [success, failure] = RELOAD_RESULTS;
        let result = if ok { success } else { failure };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// The OpenMetrics text exposition (what [`CONTENT_TYPE`](Self::CONTENT_TYPE) names).
    pub fn render(&self) -> String {
        let mut out = String::new();
        text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The `result` labels of `reset_gateway_config_reloads_total`.
const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];

/// HTTP statuses with a counter slot of their own.
const STATUSES: usize = 600;

/// A latency histogram kept in atomics: observing takes no lock (prometheus-client's
/// takes a write lock for each observation, which every worker thread would contend on).
#[derive(Debug)]
struct LatencyHistogram {
    /// Upper bounds, in seconds for the exposition and in nanoseconds for observing.
    bounds: Vec<(f64, u64)>,
    /// Observations per bucket (not cumulative); the last one is above every bound.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    fn new(bounds: impl Iterator<Item = f64>) -> Self {
        let bounds: Vec<(f64, u64)> = bounds.map(|b| (b, (b * 1e9) as u64)).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram {
            bounds,
            counts,
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, duration: Duration) {
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        // A bucket holds what is at most its bound (Prometheus's `le`).
        let bucket = self.bounds.partition_point(|&(_, bound)| bound < ns);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The registry's handle on a histogram the metrics also record into.
#[derive(Debug)]
struct SharedHistogram(Arc<LatencyHistogram>);

impl EncodeMetric for SharedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let histogram = &self.0;
        let counts: Vec<u64> = histogram
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = histogram
            .bounds
            .iter()
            .map(|&(bound, _)| bound)
            .chain(std::iter::once(f64::MAX))
            .zip(counts.iter().copied())
            .collect();
        let sum = histogram.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Reads the guard's counters when scraped, so the hot path pays nothing extra.
#[derive(Debug)]
struct LimiterCollector {
    guard: GuardHandle,
}

impl Collector for LimiterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "reset_gateway_rate_limited",
            "Requests a quota denied (shadow=\"true\": requests the group admitted that a \
             shadow quota of it would have denied, once each)",
            None,
            MetricType::Counter,
        )?;
        for group in LimitGroup::ALL {
            for (shadow, value) in [
                ("false", self.guard.denied(group)),
                ("true", self.guard.shadow_denied(group)),
            ] {
                let labels = [("limit", group.name()), ("shadow", shadow)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let near: Vec<(LimitGroup, Vec<(reset_guard::Quota, u64)>)> = LimitGroup::ALL
            .into_iter()
            .map(|group| (group, self.guard.near_limit(group)))
            .collect();
        // A family without a series is left out: OpenMetrics parsers refuse an empty one.
        if near.iter().any(|(_, quotas)| !quotas.is_empty()) {
            let mut family = encoder.encode_descriptor(
                "reset_gateway_near_limit",
                "Admissions that left a key less than 20% of a quota's burst, by group and quota",
                None,
                MetricType::Counter,
            )?;
            for (group, quotas) in near {
                for (quota, value) in quotas {
                    let label = quota_label(&quota);
                    let labels = [("limit", group.name()), ("quota", label.as_str())];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
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
            "1 when the rate-limit store answered its last probe",
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
        let mut evictions = encoder.encode_descriptor(
            "reset_gateway_limiter_evictions",
            "Keys dropped while still counting because a quota of the group held \
             store.max_keys keys: their next request starts afresh",
            None,
            MetricType::Counter,
        )?;
        for group in LimitGroup::ALL {
            let labels = [("limit", group.name())];
            ConstCounter::new(self.guard.forced_evictions(group))
                .encode(evictions.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Reads the log sink's drop counter when scraped.
#[derive(Debug)]
struct LogCollector;

impl Collector for LogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = encoder.encode_descriptor(
            "reset_gateway_log_lines_dropped",
            "Log lines dropped because the log reader did not keep up, or was gone",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(crate::telemetry::dropped_lines()).encode(dropped)
    }
}

/// A quota as its `quota` label: `3/1h`, with the burst when it is not `requests`
/// (`200/1s burst 400`) and ` shadow` for a shadow quota, so two quotas of one group
/// never share a series (the log's `quota` field reads the same).
pub(crate) fn quota_label(quota: &reset_guard::Quota) -> String {
    quota.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_counts_each_observation_at_most_its_bound() {
        let histogram = Arc::new(LatencyHistogram::new([0.001, 0.01].into_iter()));
        for ms in [0, 1, 2, 10, 11, 5000] {
            histogram.observe(Duration::from_millis(ms));
        }
        let mut registry = Registry::default();
        registry.register("latency", "test", SharedHistogram(histogram));
        let mut text = String::new();
        text::encode(&mut text, &registry).unwrap();
        for line in [
            "latency_count 6",
            "latency_sum 5.024",
            "latency_bucket{le=\"0.001\"} 2",
            "latency_bucket{le=\"0.01\"} 4",
            "latency_bucket{le=\"+Inf\"} 6",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
