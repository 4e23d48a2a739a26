//! Prometheus metrics: `[metrics] listen = "127.0.0.1:PORT"` serves `GET /metrics` (every
//! target's latest check under blackbox_exporter's names, and the agent's own counters) and
//! `GET /probe?target=URL&module=NAME` (one check now, as blackbox_exporter's endpoint does).
//!
//! Where the numbers come from: the [`Recorder`] wraps the daemon's [`Output`] on the output
//! thread, so every record updates the [`Registry`] on its way to Kafka; nothing else in the
//! pipeline knows about metrics. The registry keeps one small fixed-size state per target
//! (no record is kept), and renders the text format only when scraped.
//!
//! Not for: pushing metrics anywhere, or storing history (that is Prometheus's job).

pub mod expo;
mod probe;
mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::output::{Output, OutputError};
use crate::publish::PublisherStats;
use crate::result::{CheckResult, FailureReason};
use crate::sink::SinkStatus;

use expo::Exposition;

pub use probe::ProbeEndpoint;
pub use server::{Server, ServerError};

/// Upper bounds (seconds) of the check duration histogram: from a fast local check to a
/// timeout. Twelve buckets keep one target's histogram at 100 bytes.
const CHECK_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds (seconds) of the rule evaluation histogram (deadline default 100 ms).
const RULE_BUCKETS: [f64; 7] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1];

/// Failure reasons in the order of [`reason_index`]; index 0 is "none" (up).
const REASONS: [&str; 12] = [
    "none",
    "dns",
    "connect",
    "tls",
    "timeout",
    "http_status",
    "body_mismatch",
    "body_read",
    "rule",
    "too_many_redirects",
    "protocol",
    "internal",
];

fn reason_index(failure: Option<FailureReason>) -> usize {
    let name = failure.map_or("none", FailureReason::as_str);
    // An unknown (newer) reason books as "internal", the last one.
    REASONS
        .iter()
        .position(|r| *r == name)
        .unwrap_or(REASONS.len() - 1)
}

/// What blackbox_exporter would report for one check, taken from our record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeView {
    pub success: bool,
    pub duration_seconds: f64,
    /// 0 when no response came (as blackbox_exporter reports it).
    pub status_code: u16,
    /// Seconds by blackbox phase: resolve, connect, tls, processing, transfer; each already
    /// summed over redirects by the probe.
    pub phases: [f64; 5],
    pub redirects: u32,
    pub body_bytes: u64,
    pub failed_due_to_regex: bool,
    /// `1.1`, `2`; 0 without a response.
    pub http_version: f64,
    pub ssl: bool,
    /// Unix seconds of the leaf certificate's notAfter (TLS only).
    pub cert_expiry: Option<f64>,
    /// `TLS 1.3` (blackbox_exporter's spelling).
    pub tls_version: Option<&'static str>,
    /// 4 or 6; 0 when no address was reached.
    pub ip_protocol: u8,
    pub dns_seconds: f64,
}

const PHASES: [&str; 5] = ["resolve", "connect", "tls", "processing", "transfer"];

impl ProbeView {
    pub fn of(r: &CheckResult) -> ProbeView {
        let s = |ms: Option<f64>| ms.unwrap_or(0.0) / 1000.0;
        let t = &r.timings;
        let tls_version = r.tls_version.as_deref().and_then(|v| match v {
            "TLSv1.3" => Some("TLS 1.3"),
            "TLSv1.2" => Some("TLS 1.2"),
            "TLSv1.1" => Some("TLS 1.1"),
            "TLSv1.0" => Some("TLS 1.0"),
            _ => None,
        });
        let http_version = match r.http_version.as_deref() {
            Some("HTTP/0.9") => 0.9,
            Some("HTTP/1.0") => 1.0,
            Some("HTTP/1.1") => 1.1,
            Some("HTTP/2") => 2.0,
            Some("HTTP/3") => 3.0,
            _ => 0.0,
        };
        let final_url = r.final_url.as_deref().unwrap_or(&r.url);
        let ssl = r.status.is_some() && final_url.starts_with("https://");
        ProbeView {
            success: r.up,
            duration_seconds: t.total / 1000.0,
            status_code: r.status.unwrap_or(0),
            phases: [s(t.dns), s(t.connect), s(t.tls), s(t.ttfb), s(t.transfer)],
            redirects: r.redirects,
            body_bytes: r.body_bytes,
            failed_due_to_regex: r.failure == Some(FailureReason::BodyMismatch),
            http_version,
            ssl,
            cert_expiry: (r.cert_not_after.as_deref())
                .and_then(crate::util::parse_rfc3339_ms)
                .map(|ms| (ms / 1000) as f64),
            tls_version: if ssl { tls_version } else { None },
            ip_protocol: match r.remote_ip.as_deref() {
                Some(ip) if ip.contains(':') => 6,
                Some(_) => 4,
                None => 0,
            },
            dns_seconds: s(t.dns),
        }
    }
}

/// Writes the blackbox_exporter families for `views`, each with its labels. Shared by
/// `/metrics` (labels: instance, target, agent, and location when set) and `/probe` (no labels, as blackbox_exporter).
fn write_probe_families(e: &mut Exposition, views: &[(&[(&str, &str)], &ProbeView)]) {
    type Gauge = (&'static str, &'static str, fn(&ProbeView) -> f64);
    const GAUGES: [Gauge; 11] = [
        (
            "probe_success",
            "Displays whether or not the probe was a success",
            |v| {
                if v.success { 1.0 } else { 0.0 }
            },
        ),
        (
            "probe_duration_seconds",
            "Returns how long the probe took to complete in seconds",
            |v| v.duration_seconds,
        ),
        ("probe_http_status_code", "Response HTTP status code", |v| {
            f64::from(v.status_code)
        }),
        ("probe_http_redirects", "The number of redirects", |v| {
            f64::from(v.redirects)
        }),
        (
            "probe_http_content_length",
            "Length of http content response",
            |v| v.body_bytes as f64,
        ),
        (
            "probe_http_uncompressed_body_length",
            "Length of uncompressed response body",
            |v| v.body_bytes as f64,
        ),
        (
            "probe_failed_due_to_regex",
            "Indicates if probe failed due to regex",
            |v| {
                if v.failed_due_to_regex { 1.0 } else { 0.0 }
            },
        ),
        (
            "probe_http_version",
            "Returns the version of HTTP of the probe response",
            |v| v.http_version,
        ),
        (
            "probe_http_ssl",
            "Indicates if SSL was used for the final redirect",
            |v| {
                if v.ssl { 1.0 } else { 0.0 }
            },
        ),
        (
            "probe_ip_protocol",
            "Specifies whether probe ip protocol is IP4 or IP6",
            |v| f64::from(v.ip_protocol),
        ),
        (
            "probe_dns_lookup_time_seconds",
            "Returns the time taken for probe dns lookup in seconds",
            |v| v.dns_seconds,
        ),
    ];
    for (name, help, value) in GAUGES {
        e.family(name, "gauge", help);
        for (labels, view) in views {
            e.sample(name, labels, value(view));
        }
    }
    let name = "probe_http_duration_seconds";
    e.family(
        name,
        "gauge",
        "Duration of http request by phase, summed over all redirects",
    );
    for (labels, view) in views {
        for (phase, secs) in PHASES.iter().zip(view.phases) {
            let mut l = labels.to_vec();
            l.push(("phase", phase));
            e.sample(name, &l, secs);
        }
    }
    // Only checks that ended over TLS have these, as in blackbox_exporter.
    let tls: Vec<_> = views.iter().filter(|(_, v)| v.ssl).collect();
    if tls.iter().any(|(_, v)| v.cert_expiry.is_some()) {
        let name = "probe_ssl_earliest_cert_expiry";
        e.family(name, "gauge", "Returns last SSL chain expiry in unixtime");
        for (labels, view) in &tls {
            if let Some(x) = view.cert_expiry {
                e.sample(name, labels, x);
            }
        }
    }
    if tls.iter().any(|(_, v)| v.tls_version.is_some()) {
        let name = "probe_tls_version_info";
        e.family(
            name,
            "gauge",
            "Returns the TLS version used or NaN when unknown",
        );
        for (labels, view) in &tls {
            if let Some(version) = view.tls_version {
                let mut l = labels.to_vec();
                l.push(("version", version));
                e.sample(name, &l, 1.0);
            }
        }
    }
}

/// One target's state: its latest check and its counters. Fixed size apart from two strings.
struct TargetState {
    url: String,
    agent: String,
    /// The record's `location`; empty when the agent has none (then no `location` label).
    location: String,
    last: ProbeView,
    /// Unix seconds when the latest check started.
    last_started: f64,
    /// Checks by [`REASONS`] index.
    checks: [u64; REASONS.len()],
    /// Check durations by [`CHECK_BUCKETS`] (last: above every bound).
    durations: [u64; CHECK_BUCKETS.len() + 1],
    duration_sum: f64,
}

#[derive(Default)]
struct State {
    targets: BTreeMap<String, TargetState>,
    rules: [u64; RULE_BUCKETS.len() + 1],
    rule_seconds: f64,
    publisher: Option<PublisherStats>,
}

/// A status source the registry asks when scraped (the sink's partitions).
pub type SinkStatusFn = Box<dyn Fn() -> SinkStatus + Send + Sync>;

/// Everything `/metrics` shows. Shared (`Arc`) by the output thread, which writes, and the
/// listener, which reads; each holds the lock only to copy or render.
#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
    sink: Mutex<Option<SinkStatusFn>>,
}

fn bucket(bounds: &[f64], x: f64) -> usize {
    bounds.iter().position(|b| x <= *b).unwrap_or(bounds.len())
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves numbers that are still numbers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Books one check.
    pub fn record(&self, r: &CheckResult) {
        let view = ProbeView::of(r);
        let started = crate::util::parse_rfc3339_ms(&r.started_at).unwrap_or(0) as f64 / 1000.0;
        let mut st = self.state();
        if let Some(ms) = r.rule_ms {
            let secs = ms / 1000.0;
            st.rules[bucket(&RULE_BUCKETS, secs)] += 1;
            st.rule_seconds += secs;
        }
        let t = st
            .targets
            .entry(r.target.clone())
            .or_insert_with(|| TargetState {
                url: String::new(),
                agent: String::new(),
                location: String::new(),
                last: ProbeView::default(),
                last_started: 0.0,
                checks: [0; REASONS.len()],
                durations: [0; CHECK_BUCKETS.len() + 1],
                duration_sum: 0.0,
            });
        if t.url != r.url {
            t.url.clone_from(&r.url);
        }
        if t.agent != r.agent {
            t.agent.clone_from(&r.agent);
        }
        let location = r.location.as_deref().unwrap_or("");
        if t.location != location {
            location.clone_into(&mut t.location);
        }
        t.checks[reason_index(r.failure)] += 1;
        t.durations[bucket(&CHECK_BUCKETS, view.duration_seconds)] += 1;
        t.duration_sum += view.duration_seconds;
        t.last_started = started;
        t.last = view;
    }

    /// Forgets targets that are no longer configured (after a reload), so their series end.
    pub fn retain_targets(&self, keep: &dyn Fn(&str) -> bool) {
        self.state().targets.retain(|id, _| keep(id));
    }

    pub fn set_publisher(&self, stats: PublisherStats) {
        self.state().publisher = Some(stats);
    }

    /// The sink whose partitions `/metrics` shows (`sink` and `run`); `None` lets go of it
    /// (before the sink is joined at shutdown: no scrape holds it after this returns).
    pub fn set_sink(&self, status: Option<SinkStatusFn>) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// The text `/metrics` serves.
    pub fn render(&self) -> String {
        let sink = (self.sink.lock().unwrap_or_else(|e| e.into_inner()))
            .as_ref()
            .map(|f| f());
        let st = self.state();
        let mut e = Exposition::default();
        let labels: Vec<Vec<(&str, &str)>> = (st.targets.iter())
            .map(|(id, t)| {
                let mut l = vec![
                    ("instance", t.url.as_str()),
                    ("target", id),
                    ("agent", &t.agent),
                ];
                if !t.location.is_empty() {
                    l.push(("location", &t.location));
                }
                l
            })
            .collect();
        let views: Vec<(&[(&str, &str)], &ProbeView)> = (labels.iter())
            .zip(st.targets.values())
            .map(|(l, t)| (&l[..], &t.last))
            .collect();
        write_probe_families(&mut e, &views);

        let name = "sitewatch_last_check_timestamp_seconds";
        e.family(
            name,
            "gauge",
            "Unix time at which the latest check of the target started",
        );
        for (l, t) in labels.iter().zip(st.targets.values()) {
            e.sample(name, l, t.last_started);
        }
        let name = "sitewatch_checks_total";
        e.family(
            name,
            "counter",
            "Checks made, by target and failure reason (none: up)",
        );
        for (l, t) in labels.iter().zip(st.targets.values()) {
            for (reason, n) in REASONS.iter().zip(t.checks) {
                if n > 0 {
                    let mut with = l.to_vec();
                    with.push(("failure", reason));
                    e.sample(name, &with, n as f64);
                }
            }
        }
        let name = "sitewatch_check_duration_seconds";
        e.family(
            name,
            "histogram",
            "Duration of checks, retries and rule included",
        );
        for (l, t) in labels.iter().zip(st.targets.values()) {
            e.histogram(name, l, &CHECK_BUCKETS, &t.durations, t.duration_sum);
        }
        if st.rules.iter().any(|n| *n > 0) {
            let name = "sitewatch_rule_evaluation_seconds";
            e.family(name, "histogram", "Wall time of WASM rule evaluations");
            e.histogram(name, &[], &RULE_BUCKETS, &st.rules, st.rule_seconds);
        }
        if let Some(p) = st.publisher {
            write_publisher(&mut e, &p);
        }
        drop(st);
        if let Some(s) = sink {
            write_sink(&mut e, &s);
        }
        let name = "sitewatch_build_info";
        e.family(
            name,
            "gauge",
            "A metric with a constant '1' value labeled by the sitewatch version",
        );
        e.sample(name, &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        e.text
    }
}

fn write_publisher(e: &mut Exposition, p: &PublisherStats) {
    let rows: [(&str, &str, &str, u64); 7] = [
        (
            "sitewatch_publisher_accepted_records_total",
            "counter",
            "Records given to the Kafka publisher",
            p.accepted,
        ),
        (
            "sitewatch_publisher_acked_records_total",
            "counter",
            "Records Kafka acknowledged (spool replays of earlier runs included)",
            p.acked,
        ),
        (
            "sitewatch_publisher_dropped_records_total",
            "counter",
            "Records lost: deleted from a full spool or refused by Kafka",
            p.dropped,
        ),
        (
            "sitewatch_spool_records",
            "gauge",
            "Records in the disk spool, waiting for Kafka",
            p.spooled,
        ),
        (
            "sitewatch_spool_bytes",
            "gauge",
            "Bytes of the disk spool's segment files (a segment is deleted once all its records are acknowledged)",
            p.spool_bytes,
        ),
        (
            "sitewatch_publisher_queued_records",
            "gauge",
            "Records in the publisher's memory queue, waiting for the Kafka sender thread",
            p.queued,
        ),
        (
            "sitewatch_publisher_connected",
            "gauge",
            "Whether the publisher has a working Kafka connection",
            u64::from(p.connected),
        ),
    ];
    for (name, kind, help, v) in rows {
        e.family(name, kind, help);
        e.sample(name, &[], v as f64);
    }
}

fn write_sink(e: &mut Exposition, s: &SinkStatus) {
    let parts: Vec<(String, &crate::sink::PartitionStatus)> = s
        .partitions
        .iter()
        .map(|(p, st)| (p.to_string(), st))
        .collect();
    type Value = fn(&crate::sink::PartitionStatus) -> f64;
    let rows: [(&str, &str, &str, Value); 3] = [
        (
            "sitewatch_sink_lag_records",
            "gauge",
            "Records in the partition not yet committed to PostgreSQL",
            |p| (p.high_watermark - p.next_offset.unwrap_or(0)).max(0) as f64,
        ),
        (
            "sitewatch_sink_rows_total",
            "counter",
            "Rows the sink inserted from the partition",
            |p| p.rows as f64,
        ),
        (
            "sitewatch_sink_dead_letters_total",
            "counter",
            "Records of the partition that did not decode",
            |p| p.dead_letters as f64,
        ),
    ];
    for (name, kind, help, value) in rows {
        e.family(name, kind, help);
        for (partition, p) in &parts {
            e.sample(
                name,
                &[("topic", &s.topic), ("partition", partition)],
                value(p),
            );
        }
    }
}

/// An [`Output`] that books every record in the [`Registry`] and passes it on. It also copies
/// the publisher's counters when the output thread ticks it, since the publisher lives there.
pub struct Recorder<O: Output> {
    pub inner: O,
    registry: Arc<Registry>,
    stats: fn(&O) -> Option<PublisherStats>,
    last_stats: Instant,
}

impl<O: Output> Recorder<O> {
    /// `stats` reads the inner output's publisher counters (`None` for other outputs).
    pub fn new(inner: O, registry: Arc<Registry>, stats: fn(&O) -> Option<PublisherStats>) -> Self {
        let mut r = Recorder {
            inner,
            registry,
            stats,
            last_stats: Instant::now(),
        };
        r.copy_stats();
        r
    }

    fn copy_stats(&mut self) {
        self.last_stats = Instant::now();
        if let Some(s) = (self.stats)(&self.inner) {
            self.registry.set_publisher(s);
        }
    }
}

impl<O: Output> Output for Recorder<O> {
    fn write(&mut self, record: CheckResult) -> Result<(), OutputError> {
        self.registry.record(&record);
        self.inner.write(record)
    }

    fn drained(&mut self) -> Result<(), OutputError> {
        self.inner.drained()
    }

    fn idle(&mut self) -> Result<(), OutputError> {
        // Ticks come about every 100 ms; a scrape needs no fresher numbers than 1 s.
        if self.last_stats.elapsed().as_secs() >= 1 {
            self.copy_stats();
        }
        self.inner.idle()
    }

    fn close(&mut self, deadline: Instant) -> Result<(), OutputError> {
        let result = self.inner.close(deadline);
        self.copy_stats();
        result
    }

    fn status(&self) -> String {
        self.inner.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::PartitionStatus;

    fn tls_record() -> CheckResult {
        let mut r = CheckResult::new("shop", "https://shop.example/", "eu-1", "GET");
        r.fail(FailureReason::BodyMismatch, "regex did not match");
        r.status = Some(200);
        r.http_version = Some("HTTP/1.1".into());
        r.final_url = Some("https://shop.example/home".into());
        r.redirects = 1;
        r.remote_ip = Some("::1".into());
        r.body_bytes = 42;
        r.tls_version = Some("TLSv1.3".into());
        r.cert_not_after = Some("2030-01-01T00:00:00.000Z".into());
        r.timings.dns = Some(1.0);
        r.timings.connect = Some(2.0);
        r.timings.tls = Some(3.0);
        r.timings.ttfb = Some(250.0);
        r.timings.total = 300.0;
        r.rule_ms = Some(0.2);
        r
    }

    #[test]
    fn a_record_renders_under_blackbox_names_with_its_labels() {
        let registry = Registry::new();
        registry.record(&tls_record());
        let text = registry.render();
        let l = "instance=\"https://shop.example/\",target=\"shop\",agent=\"eu-1\"";
        for line in [
            format!("probe_success{{{l}}} 0"),
            format!("probe_duration_seconds{{{l}}} 0.3"),
            format!("probe_http_status_code{{{l}}} 200"),
            format!("probe_http_redirects{{{l}}} 1"),
            format!("probe_http_content_length{{{l}}} 42"),
            format!("probe_failed_due_to_regex{{{l}}} 1"),
            format!("probe_http_version{{{l}}} 1.1"),
            format!("probe_http_ssl{{{l}}} 1"),
            format!("probe_ip_protocol{{{l}}} 6"),
            format!("probe_http_duration_seconds{{{l},phase=\"resolve\"}} 0.001"),
            format!("probe_http_duration_seconds{{{l},phase=\"processing\"}} 0.25"),
            // A phase that did not happen is 0, as blackbox_exporter reports it.
            format!("probe_http_duration_seconds{{{l},phase=\"transfer\"}} 0"),
            format!("probe_ssl_earliest_cert_expiry{{{l}}} 1893456000"),
            format!("probe_tls_version_info{{{l},version=\"TLS 1.3\"}} 1"),
            format!("sitewatch_checks_total{{{l},failure=\"body_mismatch\"}} 1"),
            format!("sitewatch_check_duration_seconds_bucket{{{l},le=\"0.25\"}} 0"),
            format!("sitewatch_check_duration_seconds_bucket{{{l},le=\"0.5\"}} 1"),
            "sitewatch_rule_evaluation_seconds_count 1".to_string(),
            "# TYPE sitewatch_checks_total counter".to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "{line} not in:\n{text}");
        }
        // No publisher and no sink: none of their series.
        assert!(!text.contains("sitewatch_spool_records"), "{text}");
        assert!(!text.contains("sitewatch_sink_"), "{text}");
    }

    #[test]
    fn location_label_and_publisher_gauges() {
        let registry = Registry::new();
        let mut r = tls_record();
        r.location = Some("eu-west".into());
        registry.record(&r);
        registry.set_publisher(PublisherStats {
            accepted: 9,
            acked: 5,
            spooled: 3,
            spool_bytes: 4096,
            queued: 1,
            dropped: 0,
            connected: true,
        });
        let text = registry.render();
        let l = "instance=\"https://shop.example/\",target=\"shop\",agent=\"eu-1\",location=\"eu-west\"";
        for line in [
            format!("probe_success{{{l}}} 0"),
            format!("sitewatch_checks_total{{{l},failure=\"body_mismatch\"}} 1"),
            format!("sitewatch_check_duration_seconds_count{{{l}}} 1"),
            "sitewatch_publisher_acked_records_total 5".to_string(),
            "sitewatch_spool_records 3".to_string(),
            "sitewatch_spool_bytes 4096".to_string(),
            "sitewatch_publisher_queued_records 1".to_string(),
            "# TYPE sitewatch_spool_bytes gauge".to_string(),
            "# TYPE sitewatch_publisher_queued_records gauge".to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "{line} not in:\n{text}");
        }
    }

    #[test]
    fn sink_partitions_and_removed_targets() {
        let registry = Registry::new();
        registry.record(&tls_record());
        let mut status = SinkStatus {
            topic: "checks".into(),
            ..SinkStatus::default()
        };
        status.partitions.insert(
            0,
            PartitionStatus {
                next_offset: Some(10),
                high_watermark: 15,
                rows: 10,
                duplicates: 0,
                dead_letters: 1,
            },
        );
        registry.set_sink(Some(Box::new(move || status.clone())));
        let text = registry.render();
        for line in [
            "sitewatch_sink_lag_records{topic=\"checks\",partition=\"0\"} 5",
            "sitewatch_sink_rows_total{topic=\"checks\",partition=\"0\"} 10",
            "sitewatch_sink_dead_letters_total{topic=\"checks\",partition=\"0\"} 1",
        ] {
            assert!(text.lines().any(|x| x == line), "{line} not in:\n{text}");
        }
        registry.set_sink(None);
        registry.retain_targets(&|id| id != "shop");
        let text = registry.render();
        assert!(
            !text.contains("shop") && !text.contains("sitewatch_sink_"),
            "{text}"
        );
        assert!(text.contains("sitewatch_build_info{version="), "{text}");
    }
}
