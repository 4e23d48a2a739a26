//! Configuration: `agent.toml` → [`RawConfig`] (serde, as written) → [`Config`] (validated,
//! typed, what the program runs on).
//!
//! This module owns every default, every environment override and every config error message.
//! Nothing else reads the file or the `SITEWATCH_*` environment. Errors name the file, the
//! line and column where TOML gives one, the target and the field, so a typo never starts an
//! agent that silently ignores it (`deny_unknown_fields` everywhere).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::util::{UrlParts, format_duration, parse_duration, percent_decode};

/// Where `sitewatch` looks when `--config` is not given: `./agent.toml`, else this.
pub const SYSTEM_CONFIG: &str = "/etc/sitewatch/agent.toml";

/// A config error, ready to print: `agent.toml: target "shop": interval "5x": expected ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Raw form: mirrors the TOML as closely as possible.

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    pub kafka: Option<RawKafka>,
    pub postgres: Option<RawPostgres>,
    #[serde(default)]
    pub rules: RawRules,
    #[serde(default, rename = "target")]
    pub targets: Vec<RawTarget>,
    pub alerts: Option<crate::alerts::RawAlerts>,
    pub serve: Option<RawServe>,
    pub metrics: Option<RawMetrics>,
    pub fleet: Option<RawFleet>,
}

// Without their features `[fleet]` and `[metrics]` are only noticed, then refused with a
// message by the validator: their deserializers (serde + toml code per field) would cost the
// smallest build, which has no room to spare under its 6 MB.
#[cfg(not(feature = "fleet"))]
pub type RawFleet = serde::de::IgnoredAny;
#[cfg(not(feature = "metrics"))]
pub type RawMetrics = serde::de::IgnoredAny;
#[cfg(not(feature = "serve"))]
pub type RawServe = serde::de::IgnoredAny;

/// `[serve]`: the status page listener of `sitewatch serve`.
#[cfg(feature = "serve")]
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawServe {
    pub listen: Option<String>,
    pub connections: Option<usize>,
}

/// `[fleet]`: share targets with other agents through a Kafka topic and consumer group.
#[cfg(feature = "fleet")]
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub targets_topic: Option<String>,
    pub group: Option<String>,
    pub partitions: Option<i32>,
    pub session_timeout: Option<String>,
    pub heartbeat_interval: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub id: Option<String>,
    /// Checked while parsing, so that a bad one is reported with its line and column.
    #[serde(default, deserialize_with = "deserialize_location")]
    pub location: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub concurrency: Option<usize>,
    /// Fraction of the interval (0.0–0.5) by which each round is spread, or a duration.
    pub jitter: Option<String>,
    pub body_cap: Option<String>,
    pub user_agent: Option<String>,
    pub retries: Option<u32>,
    pub retry_delay: Option<String>,
    pub state_dir: Option<String>,
    pub spool_max: Option<String>,
    pub drain_timeout: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    pub brokers: Option<Vec<String>>,
    pub topic: Option<String>,
    pub client_id: Option<String>,
    pub create_topic: Option<bool>,
    pub partitions: Option<i32>,
    pub replication_factor: Option<i16>,
    pub linger: Option<String>,
    pub batch_max: Option<String>,
    pub request_timeout: Option<String>,
    pub spool_after: Option<String>,
    pub compression: Option<String>,
    pub tls: Option<RawKafkaTls>,
    pub sasl: Option<RawSasl>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaTls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub verify_hostname: Option<bool>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawSasl {
    pub mechanism: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    pub url: Option<String>,
    pub password_file: Option<String>,
    pub sslmode: Option<String>,
    pub ca_file: Option<String>,
    pub retention: Option<String>,
    pub rollup_retention: Option<String>,
    pub batch_size: Option<usize>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawRules {
    pub dir: Option<String>,
    pub deadline: Option<String>,
    pub memory_limit: Option<String>,
    pub fuel: Option<u64>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub id: Option<String>,
    pub url: Option<String>,
    pub method: Option<String>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub expect_status: Option<Vec<toml::Value>>,
    pub regex: Option<String>,
    pub regex_absent: Option<String>,
    pub rule: Option<String>,
    pub follow_redirects: Option<bool>,
    pub max_redirects: Option<u32>,
    pub ip: Option<String>,
    pub keep_alive: Option<bool>,
    pub retries: Option<u32>,
    pub tls: Option<RawTargetTls>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `[metrics]`: the Prometheus listener. `[metrics.module.NAME]` tables are target templates
/// for `/probe` (every `[[target]]` key except `id` and `url`).
#[cfg(feature = "metrics")]
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
    pub probe_allow: Option<Vec<String>>,
    pub probe_concurrency: Option<usize>,
    pub connections: Option<usize>,
    #[serde(default, rename = "module")]
    pub modules: std::collections::BTreeMap<String, RawTarget>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTargetTls {
    pub ca_file: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Typed form.

/// Compared by value (`PartialEq`), secrets included: what a reload must notice.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from (for messages and reload).
    pub source: PathBuf,
    pub agent: AgentConfig,
    /// `None` when the file has no `[kafka]` section and no `SITEWATCH_KAFKA_BROKERS`.
    pub kafka: Option<KafkaConfig>,
    pub postgres: Option<PostgresConfig>,
    pub rules: RulesConfig,
    /// Shared (`Arc`) with the scheduler, the fleet and reloads: a target is held once however
    /// many of them look at it (bench section 10: 100,000 targets).
    pub targets: Vec<Arc<Target>>,
    /// `None` when the file has no `[alerts]` section: the sink decides no alerts.
    pub alerts: Option<crate::alerts::AlertsConfig>,
    /// `None` when the file has no `[serve]` section: `sitewatch serve` refuses to start.
    pub serve: Option<ServeConfig>,
    /// `None` when the file has no `[metrics]` section: no listener.
    pub metrics: Option<MetricsConfig>,
    /// `None` when the file has no `[fleet]` section: this agent probes its own targets only.
    pub fleet: Option<FleetConfig>,
    /// Where the passwords came from, so `check-config` can say so without showing them.
    pub secrets: SecretSources,
}

/// The Prometheus listener (`[metrics]`): `/metrics` and blackbox_exporter's `/probe`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub listen: std::net::SocketAddr,
    /// URL prefixes `/probe` may check besides the configured targets' own URLs. Each ends
    /// its host with a `/`, so `http://a.example/` never admits `http://a.example.evil/`.
    pub probe_allow: Vec<String>,
    /// `/probe` checks running at once; one more is answered 503.
    pub probe_concurrency: usize,
    /// Open connections at once; one more is closed unanswered.
    pub connections: usize,
    /// `/probe?module=NAME` templates: a [`Target`] whose `id` is the name and `url` empty.
    pub modules: std::collections::BTreeMap<String, Target>,
}

/// The status page listener (`[serve]`) of `sitewatch serve`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    pub listen: std::net::SocketAddr,
    /// Open connections at once; one more is closed unanswered.
    pub connections: usize,
}

/// `[fleet]`: targets shared by the agents of a group through a compacted topic.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// Compacted; key = target id, value = the target as a `[[target]]` table in TOML.
    pub targets_topic: String,
    /// The group's name as written; agents with an `[agent] location` join
    /// `<group>.<location>` (see [`FleetConfig::group_id`]).
    pub group: String,
    /// `[agent] location`, copied here because it picks the group.
    pub location: Option<String>,
    /// Partitions of the targets topic when sitewatch creates it: the most agents that can
    /// share one group's targets.
    pub partitions: i32,
    /// A member silent this long is out of the group and its targets go to the others.
    pub session_timeout: Duration,
    pub heartbeat_interval: Duration,
}

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        FleetConfig {
            targets_topic: DEFAULT_TARGETS_TOPIC.into(),
            group: DEFAULT_FLEET_GROUP.into(),
            location: None,
            partitions: DEFAULT_FLEET_PARTITIONS,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
        }
    }
}

impl FleetConfig {
    /// The consumer group this agent joins. The one place that decides it: every location
    /// probes every target, so each location's agents form a group of their own and split
    /// the targets among themselves (`sitewatch.fleet.eu-west`); agents without a location
    /// share `group` itself.
    pub fn group_id(&self) -> String {
        match &self.location {
            Some(location) => format!("{}.{location}", self.group),
            None => self.group.clone(),
        }
    }
}

pub const DEFAULT_TARGETS_TOPIC: &str = "sitewatch.targets";
pub const DEFAULT_FLEET_GROUP: &str = "sitewatch.fleet";
pub const DEFAULT_FLEET_PARTITIONS: i32 = 12;
/// Failover takes about this plus one heartbeat; Kafka refuses less than its
/// `group.min.session.timeout.ms` (6 s by default).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Where each secret of a [`Config`] came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretSources {
    pub kafka_sasl_password: Option<SecretSource>,
    pub postgres_password: Option<SecretSource>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// This environment variable.
    Env(&'static str),
    /// A `password_file` (resolved path).
    File(PathBuf),
    /// Written in the config file itself (`password = …`, or inside `postgres.url`).
    Inline,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub id: String,
    /// Where the agent probes from (`eu-west`): a label on its records, rows and metrics, and
    /// what the fleet groups agents by. `None`: not set.
    pub location: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Maximum random delay added to a round's start, per target.
    pub jitter: Jitter,
    pub body_cap: usize,
    pub user_agent: String,
    /// Extra tries, within one round, before a target counts as down.
    pub retries: u32,
    pub retry_delay: Duration,
    /// Spool and other state (`/var/lib/sitewatch` under systemd).
    pub state_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// How long shutdown waits for in-flight checks and the publisher.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Fraction of the interval.
    Fraction(f64),
    Fixed(Duration),
}

impl Jitter {
    pub fn max_for(self, interval: Duration) -> Duration {
        match self {
            Jitter::Fraction(f) => interval.mul_f64(f),
            // The config refuses a larger one; this bounds jitters built in code.
            Jitter::Fixed(d) => d.min(interval / 2),
        }
    }
}

/// Compared by value on reload (`PartialEq`, secrets included), never by its masked `Debug`.
#[derive(Clone, PartialEq)]
pub struct KafkaConfig {
    pub brokers: Vec<String>,
    pub topic: String,
    pub client_id: String,
    pub create_topic: bool,
    pub partitions: i32,
    pub replication_factor: i16,
    pub linger: Duration,
    pub batch_max_bytes: usize,
    pub request_timeout: Duration,
    /// How long a record may wait in memory for Kafka (queued, or in a request that has not
    /// been answered) before the publisher copies it to the spool, so a crash during an
    /// outage loses at most this much.
    pub spool_after: Duration,
    pub compression: Compression,
    pub tls: Option<KafkaTls>,
    pub sasl: Option<Sasl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

impl Compression {
    pub const ALL: [Compression; 2] = [Compression::None, Compression::Gzip];

    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub verify_hostname: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    pub const ALL: [SaslMechanism; 3] = [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
    ];

    /// As written in the config (and named on the wire).
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    /// Never printed: `Debug` masks it.
    pub password: Secret,
}

/// A string that never shows in `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"********\""
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("client_id", &self.client_id)
            .field("create_topic", &self.create_topic)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("linger", &self.linger)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("spool_after", &self.spool_after)
            .field("compression", &self.compression)
            .field("tls", &self.tls)
            .field("sasl", &self.sasl)
            .finish()
    }
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// As written in the config (libpq's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PostgresConfig {
    /// Connection URL with any password removed (safe to print).
    pub url: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    pub ca_file: Option<PathBuf>,
    /// Check partitions older than this are dropped by the sink.
    pub retention: Duration,
    /// Daily rollups older than this are deleted (hourly ones after at most
    /// `sink::rollup::HOURLY_KEEP`).
    pub rollup_retention: Duration,
    pub batch_size: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RulesConfig {
    pub dir: PathBuf,
    /// Wall-clock limit for one `evaluate` call.
    pub deadline: Duration,
    pub memory_limit: usize,
    pub fuel: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    Any,
    V4,
    V6,
}

impl IpFamily {
    /// As written in the config (`"ipv4"` and `"ipv6"` are read too).
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Any => "any",
            IpFamily::V4 => "v4",
            IpFamily::V6 => "v6",
        }
    }
}

/// Accepted statuses: a list of single codes and inclusive ranges. The default is a static
/// list: no allocation for each of 100,000 targets that keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSet(pub Cow<'static, [(u16, u16)]>);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl StatusSet {
    /// Each entry as the config writes it: `200`, or a range `300-302`.
    fn entries(&self) -> impl Iterator<Item = String> + '_ {
        self.0.iter().map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
    }
}

impl fmt::Display for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.entries().collect::<Vec<_>>().join(","))
    }
}

/// A target: its id and URL, and its settings, which targets that have equal ones share
/// (`spec`; read through `Deref`, so `target.interval` reads it). 100,000 targets of one kind
/// then cost ~80 bytes each plus their id and URL, not ~290 (bench section 10).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub id: String,
    pub url: String,
    pub spec: Arc<TargetSpec>,
}

impl std::ops::Deref for Target {
    type Target = TargetSpec;

    fn deref(&self) -> &TargetSpec {
        &self.spec
    }
}

/// Changing one target's settings copies them first (the others keep theirs).
impl std::ops::DerefMut for Target {
    fn deref_mut(&mut self) -> &mut TargetSpec {
        Arc::make_mut(&mut self.spec)
    }
}

/// Every setting of a target but its id and URL.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    /// One of the methods `config` accepts, upper case.
    pub method: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub expect_status: StatusSet,
    /// Shared by every target with the same pattern (see [`Validator::regex`]).
    pub regex: Option<Arc<Regex>>,
    pub regex_absent: Option<Arc<Regex>>,
    /// Rule file name inside `rules.dir` (e.g. `status_ok.wasm`).
    pub rule: Option<String>,
    pub follow_redirects: bool,
    pub max_redirects: u32,
    pub ip: IpFamily,
    pub keep_alive: bool,
    pub retries: u32,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_insecure: bool,
    pub tags: Vec<String>,
}

/// By value; a regex by its pattern (the same pattern compiles to the same matcher).
impl PartialEq for TargetSpec {
    fn eq(&self, other: &TargetSpec) -> bool {
        // Destructured, so that a new field cannot be forgotten here.
        let TargetSpec {
            method,
            headers,
            body,
            interval,
            timeout,
            expect_status,
            regex,
            regex_absent,
            rule,
            follow_redirects,
            max_redirects,
            ip,
            keep_alive,
            retries,
            tls_ca_file,
            tls_insecure,
            tags,
        } = self;
        let pattern = |r: &Option<Arc<Regex>>| r.as_ref().map(|r| r.as_str().to_string());
        *method == other.method
            && *headers == other.headers
            && *body == other.body
            && *interval == other.interval
            && *timeout == other.timeout
            && *expect_status == other.expect_status
            && pattern(regex) == pattern(&other.regex)
            && pattern(regex_absent) == pattern(&other.regex_absent)
            && *rule == other.rule
            && *follow_redirects == other.follow_redirects
            && *max_redirects == other.max_redirects
            && *ip == other.ip
            && *keep_alive == other.keep_alive
            && *retries == other.retries
            && *tls_ca_file == other.tls_ca_file
            && *tls_insecure == other.tls_insecure
            && *tags == other.tags
    }
}

/// The settings of the last few distinct kinds of target validated, for [`shared_spec`].
#[cfg(feature = "fleet")]
static SPECS: Mutex<Vec<Weak<TargetSpec>>> = Mutex::new(Vec::new());

/// `spec`, or an equal one a live target already has. The last [`SPECS`] few kinds are
/// looked at: a file or a topic of many targets tends to repeat a few kinds. Without the
/// `fleet` feature (small devices, few targets) every target keeps its own.
fn shared_spec(spec: TargetSpec) -> Arc<TargetSpec> {
    #[cfg(feature = "fleet")]
    {
        let mut recent = SPECS.lock().unwrap_or_else(|e| e.into_inner());
        let found = (recent.iter().enumerate())
            .find_map(|(i, s)| s.upgrade().filter(|s| **s == spec).map(|s| (i, s)));
        if let Some((i, s)) = found {
            // Most recently used last; the least recently used leaves first.
            let weak = recent.remove(i);
            recent.push(weak);
            return s;
        }
        let s = Arc::new(spec);
        if recent.len() >= 8 {
            recent.remove(0);
        }
        recent.push(Arc::downgrade(&s));
        s
    }
    #[cfg(not(feature = "fleet"))]
    Arc::new(spec)
}

// ---------------------------------------------------------------------------------------------
// Defaults.

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONCURRENCY: usize = 16;
pub const DEFAULT_BODY_CAP: usize = 1024 * 1024;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sitewatch";
pub const DEFAULT_SPOOL_MAX: u64 = 256 * 1024 * 1024;
/// The spool never holds less than this (`Spool::open` rounds a smaller bound up to it), so a
/// smaller `spool_max` is refused rather than quietly not honoured.
pub const MIN_SPOOL_MAX: u64 = 64 * 1024;
pub const DEFAULT_TOPIC: &str = "sitewatch.checks";
/// `/probe` checks at once: each holds a thread and a connection for up to its timeout.
pub const DEFAULT_PROBE_CONCURRENCY: usize = 4;
/// Connections the metrics listener serves at once (each is one short-lived thread).
pub const DEFAULT_METRICS_CONNECTIONS: usize = 16;
/// Connections the status page serves at once: a page view is one request (no assets).
pub const DEFAULT_SERVE_CONNECTIONS: usize = 32;
/// Upper bounds for the two above: a typo of 10000 must not mean 10000 threads.
pub const MAX_PROBE_CONCURRENCY: usize = 64;
pub const MAX_METRICS_CONNECTIONS: usize = 256;
/// Most extra attempts per round: more would let one target's retries outlast its interval.
pub const MAX_RETRIES: u32 = 10;
/// Regexes are compiled with these limits, so a hostile pattern is a config error, not a stall
/// or a memory blow-up at check time.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
pub const REGEX_DFA_SIZE_LIMIT: usize = 2 << 20;

// ---------------------------------------------------------------------------------------------
// Loading.

/// Where to read the config from: the given path, else `./agent.toml`, else [`SYSTEM_CONFIG`].
pub fn default_path(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    let local = PathBuf::from("agent.toml");
    if local.exists() {
        local
    } else {
        PathBuf::from(SYSTEM_CONFIG)
    }
}

impl Config {
    /// Reads, parses and validates `path`, applying `SITEWATCH_*` overrides from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|k| std::env::var(k).ok())
    }

    /// As [`Config::load`], with the environment given as a lookup function (for tests).
    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path, env)
    }

    /// Parses TOML text as if it came from `path` (relative paths in it resolve against the
    /// file's directory).
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let syntax = |text: &str, first_line: usize, e: toml::de::Error| ConfigError {
            file: file.clone(),
            message: toml_error_message(text, first_line, &e),
        };
        // The `[[target]]` tables are parsed one at a time and validated as they come, so a
        // file of 100,000 targets never holds its whole TOML tree, token list and raw form at
        // once (bench section 10). A file the split does not understand is parsed whole.
        let (raw, chunks) = match split_targets(text) {
            Some(split) => {
                let raw = parse_raw(&split.rest).map_err(|e| syntax(&split.rest, 1, e))?;
                (raw, split.targets)
            }
            None => (parse_raw(text).map_err(|e| syntax(text, 1, e))?, Vec::new()),
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let chunks = chunks.into_iter().map(|(line, chunk)| {
            let one = parse_raw(chunk).map_err(|e| syntax(chunk, line, e))?;
            Ok(one.targets)
        });
        Validator {
            file: file.clone(),
            base,
            env,
            secrets: RefCell::new(SecretSources::default()),
        }
        .build(raw, chunks, path)
    }

    pub fn target(&self, id: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.id == id).map(|t| &**t)
    }
}

/// Longest `[agent] location`: it becomes a label value, a column value and part of a Kafka
/// consumer group id, so it stays short (a DNS label's 63 characters).
pub const MAX_LOCATION_LEN: usize = 63;

/// Checks an `[agent] location`: 1 to [`MAX_LOCATION_LEN`] characters of `a-z 0-9 . _ -`, so
/// it can be used unquoted in a consumer group id, a label or a file name.
pub fn check_location(location: &str) -> Result<(), String> {
    let ok = (1..=MAX_LOCATION_LEN).contains(&location.len())
        && (location.bytes()).all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    Err(format!(
        "agent: location {location:?}: expected 1 to {MAX_LOCATION_LEN} characters of \
         a-z, 0-9, '.', '_' and '-' (like \"eu-west-1\")"
    ))
}

fn deserialize_location<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let location = String::deserialize(d)?;
    check_location(&location).map_err(serde::de::Error::custom)?;
    Ok(Some(location))
}

#[cfg(feature = "fleet")]
impl Config {
    /// Validates a target that comes from elsewhere than this file (the fleet's targets
    /// topic, a `targets push` file) exactly as a `[[target]]` of this file: this config's
    /// defaults, relative paths against its directory. `source` names where it came from
    /// (it is the error's "file").
    pub fn validate_target(&self, source: &str, raw: &RawTarget) -> Result<Target, ConfigError> {
        let v = Validator {
            file: source.to_string(),
            base: self
                .source
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            env: &|_| None,
            secrets: RefCell::new(SecretSources::default()),
        };
        let t = v.target(0, raw, &self.agent)?;
        if jitter_too_big(&self.agent, &t) {
            return Err(v.err(jitter_error(&self.agent, &t)));
        }
        Ok(t)
    }
}

fn jitter_too_big(agent: &AgentConfig, t: &Target) -> bool {
    matches!(agent.jitter, Jitter::Fixed(j) if j > t.interval / 2)
}

fn jitter_error(agent: &AgentConfig, t: &Target) -> String {
    let jitter = match agent.jitter {
        Jitter::Fixed(d) => d,
        Jitter::Fraction(f) => t.interval.mul_f64(f),
    };
    format!(
        "agent: jitter {:?}: more than half the interval of target {:?} ({}); \
         a fixed jitter may be at most half of every interval",
        format_duration(jitter),
        t.id,
        format_duration(t.interval)
    )
}

/// A config file with its `[[target]]` tables cut out: `rest` is the file with each table's
/// lines left empty (so line numbers in its errors stay the file's), `targets` each table's
/// first line and text (its own sub-tables, like `[target.tls]`, included).
struct SplitTargets<'a> {
    rest: String,
    targets: Vec<(usize, &'a str)>,
}

/// The raw form of TOML text: one copy of toml's deserializer code for the three places that
/// parse (the `--no-default-features` binary has a few KB to spare under its 6 MB).
#[inline(never)]
fn parse_raw(text: &str) -> Result<RawConfig, toml::de::Error> {
    toml::from_str(text)
}

/// Without the `fleet` feature (small devices, no fleets of targets) the file is parsed whole.
#[cfg(not(feature = "fleet"))]
fn split_targets(_: &str) -> Option<SplitTargets<'_>> {
    None
}

/// Cuts the `[[target]]` tables out of `text` by a scan of its TOML tokens (so a `[[target]]`
/// inside a multi-line string or an array is none), for [`Config::parse`]. `None` when the
/// file is not the plain shape this handles: a `target` key at the root (the inline form), a
/// `[target]` table, a `[target.x]` table away from its `[[target]]`, or a quoted table name;
/// TOML's own parser then reads the whole file (and reports what is wrong with it).
#[cfg(feature = "fleet")]
fn split_targets<'a>(text: &'a str) -> Option<SplitTargets<'a>> {
    use toml_parser::lexer::TokenKind as K;
    let mut tokens = toml_parser::Source::new(text).lex().peekable();
    let mut split = SplitTargets {
        rest: String::with_capacity(text.len().min(64 * 1024)),
        targets: Vec::new(),
    };
    // The open target table (where it starts, its line); where the rest resumes.
    let (mut open, mut copied) = (None::<(usize, usize)>, 0);
    // Ends the open target table at `at`: its lines stay in the rest as empty ones.
    let end_table = |split: &mut SplitTargets<'a>, open: &mut Option<(usize, usize)>, at| {
        if let Some((start, line)) = open.take() {
            let table = &text[start..at];
            split.targets.push((line, table));
            split
                .rest
                .extend(std::iter::repeat_n('\n', table.matches('\n').count()));
        }
        at
    };
    let (mut line, mut depth, mut line_start, mut in_root) = (1, 0usize, true, true);
    while let Some(t) = tokens.next() {
        let raw = &text[t.span().start()..t.span().end()];
        match t.kind() {
            K::Newline => {
                line += 1;
                line_start |= depth == 0;
            }
            K::Whitespace | K::Comment => {}
            K::Eof => break,
            K::LeftSquareBracket if line_start && depth == 0 => {
                // A table header: its name without whitespace; a quoted name is not ours.
                let array = tokens
                    .next_if(|n| n.kind() == K::LeftSquareBracket)
                    .is_some();
                let mut name = String::new();
                loop {
                    let n = tokens.next()?;
                    match n.kind() {
                        K::RightSquareBracket => break,
                        K::Whitespace => {}
                        K::Atom | K::Dot => name.push_str(&text[n.span().start()..n.span().end()]),
                        _ => return None,
                    }
                }
                if array {
                    tokens.next_if(|n| n.kind() == K::RightSquareBracket)?;
                }
                let header = text[..t.span().start()].rfind('\n').map_or(0, |i| i + 1);
                if array && name == "target" {
                    if open.is_some() {
                        copied = end_table(&mut split, &mut open, header);
                    }
                    split.rest.push_str(&text[copied..header]);
                    open = Some((header, line));
                } else if name.split('.').next() == Some("target") {
                    // `[target.tls]` of the open table; `[target]`, or one after another
                    // table, is left to TOML's parser.
                    if name == "target" || open.is_none() {
                        return None;
                    }
                } else if open.is_some() {
                    copied = end_table(&mut split, &mut open, header);
                }
                (in_root, line_start) = (false, false);
            }
            K::LeftSquareBracket | K::LeftCurlyBracket => {
                depth += 1;
                line_start = false;
            }
            K::RightSquareBracket | K::RightCurlyBracket => {
                depth = depth.saturating_sub(1);
                line_start = false;
            }
            _ => {
                // A root key named `target` (quoted or dotted too) is the inline form.
                let key = raw
                    .split('.')
                    .next()
                    .unwrap_or("")
                    .trim_matches(['"', '\'']);
                if line_start && in_root && key == "target" {
                    return None;
                }
                line += raw.matches('\n').count(); // a multi-line string
                line_start = false;
            }
        }
    }
    if open.is_some() {
        copied = end_table(&mut split, &mut open, text.len());
    }
    split.rest.push_str(&text[copied..]);
    Some(split)
}

/// `line 3, column 5: unknown field `intervall`, expected one of ...`, for an error in `text`,
/// which starts at line `first_line` of its file.
fn toml_error_message(text: &str, first_line: usize, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + first_line;
            let col = before
                .rsplit('\n')
                .next()
                .map(|l| l.chars().count())
                .unwrap_or(0)
                + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

/// Compiled regexes by pattern, for the whole process: fleets of targets tend to share a few
/// patterns, so each is compiled once and shared through an `Arc` by every target that names
/// it, whether it comes from agent.toml, a reload or the fleet's topic; the targets also share
/// its pool of per-thread scratch caches. (A `Regex::clone` would get a pool of its own: one
/// cache built and kept per target, measured with callgrind.) Weak, so a pattern no target
/// uses any more is freed.
static REGEXES: Mutex<Option<HashMap<String, Weak<Regex>>>> = Mutex::new(None);
static REGEXES_SWEPT_AT: AtomicUsize = AtomicUsize::new(32);

struct Validator<'a> {
    file: String,
    base: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Filled in as the secrets are read.
    secrets: RefCell<SecretSources>,
}

impl Validator<'_> {
    fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            message: message.into(),
        }
    }

    fn env(&self, key: &str) -> Option<String> {
        (self.env)(key).filter(|v| !v.is_empty())
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn duration(&self, ctx: &str, field: &str, value: &str) -> Result<Duration, ConfigError> {
        parse_duration(value).ok_or_else(|| {
            self.err(format!(
                "{ctx}{field} {value:?}: expected a duration like \"30s\""
            ))
        })
    }

    fn positive_duration(
        &self,
        ctx: &str,
        field: &str,
        value: &str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(ctx, field, value)?;
        if d.is_zero() {
            return Err(self.err(format!("{ctx}{field} {value:?}: must be greater than zero")));
        }
        Ok(d)
    }

    fn size(&self, ctx: &str, field: &str, value: &str) -> Result<u64, ConfigError> {
        parse_size(value).ok_or_else(|| {
            self.err(format!(
                "{ctx}{field} {value:?}: expected a size like \"1MiB\" or \"64KiB\""
            ))
        })
    }

    /// `chunks`: the `[[target]]` tables [`split_targets`] cut out of the file, parsed as they
    /// are taken (after `raw`'s own targets).
    fn build(
        &self,
        raw: RawConfig,
        chunks: impl Iterator<Item = Result<Vec<RawTarget>, ConfigError>>,
        path: &Path,
    ) -> Result<Config, ConfigError> {
        let agent = self.agent(&raw.agent)?;
        let kafka = self.kafka(raw.kafka.as_ref())?;
        let postgres = self.postgres(raw.postgres.as_ref())?;
        let rules = self.rules(&raw.rules)?;
        let serve = raw.serve.as_ref().map(|s| self.serve(s)).transpose()?;
        let metrics = raw
            .metrics
            .as_ref()
            .map(|m| self.metrics(m, &agent))
            .transpose()?;
        let fleet = (raw.fleet.as_ref())
            .map(|f| self.fleet(f, agent.location.clone()))
            .transpose()?;
        let alerts = raw
            .alerts
            .as_ref()
            .map(|a| {
                let cx = crate::alerts::Ctx {
                    env: &|k| self.env(k),
                    path: &|p| self.path(p),
                    read_secret: &read_secret_file,
                };
                crate::alerts::validate(a, &cx).map_err(|m| self.err(m))
            })
            .transpose()?;
        let mut targets = Vec::with_capacity(raw.targets.len());
        for t in raw.targets.iter() {
            targets.push(Arc::new(self.target(targets.len(), t, &agent)?));
        }
        drop(raw.targets);
        for chunk in chunks {
            for t in chunk? {
                targets.push(Arc::new(self.target(targets.len(), &t, &agent)?));
            }
        }
        targets.shrink_to_fit();
        let mut seen = HashSet::with_capacity(targets.len());
        if let Some(t) = targets.iter().find(|t| !seen.insert(t.id.as_str())) {
            return Err(self.err(format!("target {:?}: duplicate id", t.id)));
        }
        drop(seen);
        if let Some(t) = targets.iter().find(|t| jitter_too_big(&agent, t)) {
            return Err(self.err(jitter_error(&agent, t)));
        }
        Ok(Config {
            source: path.to_path_buf(),
            agent,
            kafka,
            postgres,
            rules,
            targets,
            alerts,
            serve,
            metrics,
            fleet,
            secrets: self.secrets.take(),
        })
    }

    fn retries(&self, ctx: &str, retries: u32) -> Result<u32, ConfigError> {
        if retries > MAX_RETRIES {
            return Err(self.err(format!(
                "{ctx}retries {retries}: expected 0 to {MAX_RETRIES}"
            )));
        }
        Ok(retries)
    }

    fn agent(&self, raw: &RawAgent) -> Result<AgentConfig, ConfigError> {
        let ctx = "agent: ";
        let id = self
            .env("SITEWATCH_AGENT_ID")
            .or(raw.id.clone())
            .unwrap_or_else(crate::util::hostname);
        if id.trim().is_empty() {
            return Err(self.err("agent: id: must not be empty"));
        }
        let interval = match &raw.interval {
            Some(v) => self.positive_duration(ctx, "interval", v)?,
            None => DEFAULT_INTERVAL,
        };
        let timeout = match &raw.timeout {
            Some(v) => self.positive_duration(ctx, "timeout", v)?,
            None => DEFAULT_TIMEOUT,
        };
        let concurrency = raw.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if !(1..=1024).contains(&concurrency) {
            return Err(self.err(format!(
                "agent: concurrency {concurrency}: expected 1 to 1024"
            )));
        }
        let jitter = match &raw.jitter {
            None => Jitter::Fraction(0.1),
            Some(v) => match v.trim().strip_suffix('%') {
                Some(pct) => match pct.trim().parse::<f64>() {
                    Ok(p) if (0.0..=50.0).contains(&p) => Jitter::Fraction(p / 100.0),
                    _ => {
                        return Err(self.err(format!(
                            "agent: jitter {v:?}: expected a percentage from 0% to 50% or a duration"
                        )));
                    }
                },
                None => Jitter::Fixed(self.duration(ctx, "jitter", v)?),
            },
        };
        let body_cap = match &raw.body_cap {
            Some(v) => {
                let n = self.size(ctx, "body_cap", v)?;
                if n == 0 || n > 256 * 1024 * 1024 {
                    return Err(self.err(format!("agent: body_cap {v:?}: expected 1B to 256MiB")));
                }
                n as usize
            }
            None => DEFAULT_BODY_CAP,
        };
        let user_agent = raw
            .user_agent
            .clone()
            .unwrap_or_else(|| format!("sitewatch/{}", env!("CARGO_PKG_VERSION")));
        let retry_delay = match &raw.retry_delay {
            Some(v) => self.duration(ctx, "retry_delay", v)?,
            None => Duration::from_secs(1),
        };
        let state_dir = self
            .env("SITEWATCH_STATE_DIR")
            .or_else(|| self.env("STATE_DIRECTORY")) // systemd's StateDirectory=
            .map(PathBuf::from)
            .or_else(|| raw.state_dir.as_deref().map(|p| self.path(p)))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let spool_max_bytes = match &raw.spool_max {
            Some(v) => {
                let n = self.size(ctx, "spool_max", v)?;
                if n < MIN_SPOOL_MAX {
                    return Err(
                        self.err(format!("agent: spool_max {v:?}: expected at least 64KiB"))
                    );
                }
                n
            }
            None => DEFAULT_SPOOL_MAX,
        };
        let drain_timeout = match &raw.drain_timeout {
            Some(v) => self.duration(ctx, "drain_timeout", v)?,
            None => timeout + Duration::from_secs(5),
        };
        Ok(AgentConfig {
            id,
            location: raw.location.clone(),
            interval,
            timeout,
            concurrency,
            jitter,
            body_cap,
            user_agent,
            retries: self.retries(ctx, raw.retries.unwrap_or(0))?,
            retry_delay,
            state_dir,
            spool_max_bytes,
            drain_timeout,
        })
    }

    fn kafka(&self, raw: Option<&RawKafka>) -> Result<Option<KafkaConfig>, ConfigError> {
        let env_brokers = self.env("SITEWATCH_KAFKA_BROKERS");
        if raw.is_none() && env_brokers.is_none() {
            return Ok(None);
        }
        let default = RawKafka::default();
        let raw = raw.unwrap_or(&default);
        let ctx = "kafka: ";
        let brokers: Vec<String> = match env_brokers {
            Some(list) => list
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => raw
                .brokers
                .clone()
                .unwrap_or_else(|| vec!["127.0.0.1:9092".to_string()]),
        };
        if brokers.is_empty() {
            return Err(self.err("kafka: brokers: must list at least one host:port"));
        }
        for b in &brokers {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(self.err(format!("kafka: brokers: {b:?}: expected host:port")));
            }
        }
        let topic = self
            .env("SITEWATCH_KAFKA_TOPIC")
            .or(raw.topic.clone())
            .unwrap_or_else(|| DEFAULT_TOPIC.into());
        if topic.is_empty()
            || topic.len() > 249
            || !topic
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        {
            return Err(self.err(format!(
                "kafka: topic {topic:?}: expected 1-249 characters of [a-zA-Z0-9._-]"
            )));
        }
        let partitions = raw.partitions.unwrap_or(3);
        if !(1..=10_000).contains(&partitions) {
            return Err(self.err(format!(
                "kafka: partitions {partitions}: expected 1 to 10000"
            )));
        }
        let replication_factor = raw.replication_factor.unwrap_or(1);
        if replication_factor < 1 {
            return Err(self.err("kafka: replication_factor: must be at least 1"));
        }
        let linger = match &raw.linger {
            Some(v) => self.duration(ctx, "linger", v)?,
            None => Duration::from_millis(50),
        };
        let batch_max_bytes = match &raw.batch_max {
            Some(v) => self.size(ctx, "batch_max", v)? as usize,
            None => 512 * 1024,
        };
        let request_timeout = match &raw.request_timeout {
            Some(v) => self.positive_duration(ctx, "request_timeout", v)?,
            None => Duration::from_secs(30),
        };
        let spool_after = match &raw.spool_after {
            Some(v) => self.positive_duration(ctx, "spool_after", v)?,
            None => Duration::from_secs(1),
        };
        let compression_text = raw.compression.as_deref().unwrap_or("none");
        let compression = Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == compression_text)
            .ok_or_else(|| {
                self.err(format!(
                    "kafka: compression {compression_text:?}: expected \"none\" or \"gzip\""
                ))
            })?;
        let tls = self.kafka_tls(raw)?;
        let sasl = self.kafka_sasl(raw)?;
        Ok(Some(KafkaConfig {
            brokers,
            topic,
            client_id: raw.client_id.clone().unwrap_or_else(|| "sitewatch".into()),
            create_topic: raw.create_topic.unwrap_or(true),
            partitions,
            replication_factor,
            linger,
            batch_max_bytes,
            request_timeout,
            spool_after,
            compression,
            tls,
            sasl,
        }))
    }

    fn kafka_tls(&self, raw: &RawKafka) -> Result<Option<KafkaTls>, ConfigError> {
        let raw_tls = raw.tls.clone().unwrap_or_default();
        let ca = self
            .env("SITEWATCH_KAFKA_CA_FILE")
            .or(raw_tls.ca_file.clone());
        let cert = self
            .env("SITEWATCH_KAFKA_CERT_FILE")
            .or(raw_tls.cert_file.clone());
        let key = self
            .env("SITEWATCH_KAFKA_KEY_FILE")
            .or(raw_tls.key_file.clone());
        if raw.tls.is_none() && ca.is_none() && cert.is_none() && key.is_none() {
            return Ok(None);
        }
        if cert.is_some() != key.is_some() {
            return Err(self.err("kafka: tls: cert_file and key_file go together"));
        }
        Ok(Some(KafkaTls {
            ca_file: ca.as_deref().map(|p| self.path(p)),
            cert_file: cert.as_deref().map(|p| self.path(p)),
            key_file: key.as_deref().map(|p| self.path(p)),
            verify_hostname: raw_tls.verify_hostname.unwrap_or(true),
        }))
    }

    fn kafka_sasl(&self, raw: &RawKafka) -> Result<Option<Sasl>, ConfigError> {
        let raw_sasl = raw.sasl.clone().unwrap_or_default();
        let username = self
            .env("SITEWATCH_KAFKA_SASL_USERNAME")
            .or(raw_sasl.username.clone());
        if raw.sasl.is_none() && username.is_none() {
            return Ok(None);
        }
        let mechanism_text = self
            .env("SITEWATCH_KAFKA_SASL_MECHANISM")
            .or(raw_sasl.mechanism.clone())
            .unwrap_or_else(|| "SCRAM-SHA-512".into())
            .to_ascii_uppercase();
        let mechanism = SaslMechanism::ALL
            .into_iter()
            .find(|m| m.as_str() == mechanism_text)
            .ok_or_else(|| {
                self.err(format!(
                    "kafka: sasl: mechanism {mechanism_text:?}: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                ))
            })?;
        let username = username.ok_or_else(|| self.err("kafka: sasl: username: missing"))?;
        const ENV: &str = "SITEWATCH_KAFKA_SASL_PASSWORD";
        let (password, source) = match (self.env(ENV), &raw_sasl.password_file, &raw_sasl.password)
        {
            (Some(p), _, _) => (p, SecretSource::Env(ENV)),
            (None, Some(f), _) => {
                let path = self.path(f);
                let p = read_secret_file(&path)
                    .map_err(|e| self.err(format!("kafka: sasl: password_file {f:?}: {e}")))?;
                (p, SecretSource::File(path))
            }
            (None, None, Some(p)) => (p.clone(), SecretSource::Inline),
            (None, None, None) => {
                return Err(self.err(
                        "kafka: sasl: password: missing (set SITEWATCH_KAFKA_SASL_PASSWORD or password_file)",
                    ));
            }
        };
        self.secrets.borrow_mut().kafka_sasl_password = Some(source);
        Ok(Some(Sasl {
            mechanism,
            username,
            password: Secret(password),
        }))
    }

    fn postgres(&self, raw: Option<&RawPostgres>) -> Result<Option<PostgresConfig>, ConfigError> {
        let env_url = self.env("SITEWATCH_PG_URL");
        if raw.is_none() && env_url.is_none() {
            return Ok(None);
        }
        let default = RawPostgres::default();
        let raw = raw.unwrap_or(&default);
        let url = env_url
            .or(raw.url.clone())
            .unwrap_or_else(|| "postgres://sitewatch@127.0.0.1/sitewatch".into());
        let (url, inline_password) =
            split_postgres_password(&url).map_err(|e| self.err(format!("postgres: url: {e}")))?;
        const ENV: &str = "SITEWATCH_PG_PASSWORD";
        let password = match (self.env(ENV), &raw.password_file) {
            (Some(p), _) => Some((p, SecretSource::Env(ENV))),
            (None, Some(f)) => {
                let path = self.path(f);
                let p = read_secret_file(&path)
                    .map_err(|e| self.err(format!("postgres: password_file {f:?}: {e}")))?;
                Some((p, SecretSource::File(path)))
            }
            (None, None) => inline_password.map(|p| (p, SecretSource::Inline)),
        };
        let password = password.map(|(p, source)| {
            self.secrets.borrow_mut().postgres_password = Some(source);
            Secret(p)
        });
        let sslmode_text = self
            .env("SITEWATCH_PG_SSLMODE")
            .or(raw.sslmode.clone())
            .unwrap_or_else(|| "prefer".into());
        let sslmode = SslMode::ALL
            .into_iter()
            .find(|m| m.as_str() == sslmode_text)
            .ok_or_else(|| {
                self.err(format!(
                    "postgres: sslmode {sslmode_text:?}: expected disable, prefer, require, verify-ca or verify-full"
                ))
            })?;
        let ca_file = self
            .env("SITEWATCH_PG_CA_FILE")
            .or(raw.ca_file.clone())
            .map(|p| self.path(&p));
        let retention = match &raw.retention {
            Some(v) => self.positive_duration("postgres: ", "retention", v)?,
            None => Duration::from_secs(90 * 86_400),
        };
        let rollup_retention = match &raw.rollup_retention {
            Some(v) => self.positive_duration("postgres: ", "rollup_retention", v)?,
            None => Duration::from_secs(400 * 86_400),
        };
        let batch_size = raw.batch_size.unwrap_or(5000);
        if !(1..=100_000).contains(&batch_size) {
            return Err(self.err(format!(
                "postgres: batch_size {batch_size}: expected 1 to 100000"
            )));
        }
        Ok(Some(PostgresConfig {
            url,
            password,
            sslmode,
            ca_file,
            retention,
            rollup_retention,
            batch_size,
        }))
    }

    fn rules(&self, raw: &RawRules) -> Result<RulesConfig, ConfigError> {
        let ctx = "rules: ";
        let dir = self
            .env("SITEWATCH_RULES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.path(raw.dir.as_deref().unwrap_or("rules")));
        let deadline = match &raw.deadline {
            Some(v) => self.positive_duration(ctx, "deadline", v)?,
            None => Duration::from_millis(100),
        };
        let memory_limit = match &raw.memory_limit {
            Some(v) => self.size(ctx, "memory_limit", v)? as usize,
            None => 16 * 1024 * 1024,
        };
        Ok(RulesConfig {
            dir,
            deadline,
            memory_limit,
            fuel: raw.fuel,
        })
    }

    fn target(
        &self,
        index: usize,
        raw: &RawTarget,
        agent: &AgentConfig,
    ) -> Result<Target, ConfigError> {
        let id = match &raw.id {
            Some(id) if !id.trim().is_empty() => id.clone(),
            Some(_) => {
                return Err(self.err(format!("target #{}: id: must not be empty", index + 1)));
            }
            None => return Err(self.err(format!("target #{}: id: missing", index + 1))),
        };
        let ctx = format!("target {id:?}: ");
        let url = raw
            .url
            .clone()
            .ok_or_else(|| self.err(format!("{ctx}url: missing")))?;
        validate_url(&url).map_err(|e| self.err(format!("{ctx}url {:?}: {e}", shown_url(&url))))?;
        self.target_fields(&ctx, id, url, raw, agent)
    }

    /// Every key of a target but `id` and `url` (already checked): shared by `[[target]]`
    /// and the `/probe` modules of `[metrics.module.NAME]`.
    fn target_fields(
        &self,
        ctx: &str,
        id: String,
        url: String,
        raw: &RawTarget,
        agent: &AgentConfig,
    ) -> Result<Target, ConfigError> {
        let ctx = ctx.to_string();
        let given = raw.method.as_deref().unwrap_or("GET");
        let Some(method) = (["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
            .into_iter())
        .find(|m| m.eq_ignore_ascii_case(given)) else {
            let method = given.to_ascii_uppercase();
            return Err(self.err(format!(
                "{ctx}method {method:?}: expected GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS"
            )));
        };
        let headers = self.headers(&ctx, &raw.headers)?;
        let interval = match &raw.interval {
            Some(v) => self.positive_duration(&ctx, "interval", v)?,
            None => agent.interval,
        };
        let timeout = match &raw.timeout {
            Some(v) => self.positive_duration(&ctx, "timeout", v)?,
            None => agent.timeout,
        };
        let expect_status = match &raw.expect_status {
            None => StatusSet(Cow::Borrowed(&[(200, 399)])),
            Some(list) => self.status_set(&ctx, list)?,
        };
        let regex = raw
            .regex
            .as_deref()
            .map(|p| self.regex(&ctx, "regex", p))
            .transpose()?;
        let regex_absent = raw
            .regex_absent
            .as_deref()
            .map(|p| self.regex(&ctx, "regex_absent", p))
            .transpose()?;
        let rule = match &raw.rule {
            None => None,
            Some(r) => {
                if r.is_empty() || r.contains('/') || r.starts_with('.') {
                    return Err(self.err(format!("{ctx}rule {r:?}: expected a file name in the rules directory, like \"status_ok.wasm\"")));
                }
                if !cfg!(feature = "wasm") {
                    return Err(self.err(format!("{ctx}rule {r:?}: this sitewatch was built without the `wasm` feature, so it cannot run rules")));
                }
                Some(r.clone())
            }
        };
        let max_redirects = raw.max_redirects.unwrap_or(10);
        if max_redirects > 50 {
            return Err(self.err(format!(
                "{ctx}max_redirects {max_redirects}: expected 0 to 50"
            )));
        }
        let ip = match raw.ip.as_deref().unwrap_or("any") {
            "any" => IpFamily::Any,
            "v4" | "ipv4" => IpFamily::V4,
            "v6" | "ipv6" => IpFamily::V6,
            other => {
                return Err(self.err(format!(
                    "{ctx}ip {other:?}: expected \"any\", \"v4\" or \"v6\""
                )));
            }
        };
        let tls = raw.tls.clone().unwrap_or_default();
        let tls_insecure = tls.insecure_skip_verify.unwrap_or(false);
        if tls_insecure {
            log::warn!(
                "target {id}: insecure_skip_verify is set: its TLS certificate is not verified"
            );
        }
        let tls_ca_file = tls.ca_file.as_deref().map(|p| self.path(p));
        if let Some(ca) = &tls_ca_file
            && !ca.is_file()
        {
            return Err(self.err(format!(
                "{ctx}tls: ca_file {:?}: no such file",
                ca.display()
            )));
        }
        let spec = TargetSpec {
            method,
            headers,
            body: raw.body.clone(),
            interval,
            timeout,
            expect_status,
            regex,
            regex_absent,
            rule,
            follow_redirects: raw.follow_redirects.unwrap_or(true),
            max_redirects,
            ip,
            keep_alive: raw.keep_alive.unwrap_or(false),
            retries: self.retries(&ctx, raw.retries.unwrap_or(agent.retries))?,
            tls_ca_file,
            tls_insecure,
            tags: raw.tags.clone(),
        };
        Ok(Target {
            id,
            url,
            spec: shared_spec(spec),
        })
    }

    #[cfg(not(feature = "fleet"))]
    fn fleet(&self, _: &RawFleet, _: Option<String>) -> Result<FleetConfig, ConfigError> {
        Err(self.err("fleet: this sitewatch was built without the `fleet` feature; remove [fleet]"))
    }

    #[cfg(feature = "fleet")]
    fn fleet(&self, raw: &RawFleet, location: Option<String>) -> Result<FleetConfig, ConfigError> {
        let ctx = "fleet: ";
        let name = |field: &str, v: &Option<String>, default: &str| {
            let v = v.clone().unwrap_or_else(|| default.to_string());
            // Kafka's rule for topic names (legal characters, at most 249); group ids share it
            // here so both print and type the same.
            let ok = !v.is_empty()
                && v.len() <= 249
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if ok {
                Ok(v)
            } else {
                Err(self.err(format!(
                    "{ctx}{field} {v:?}: expected 1 to 249 of a-z, A-Z, 0-9, '.', '_', '-'"
                )))
            }
        };
        let targets_topic = name("targets_topic", &raw.targets_topic, DEFAULT_TARGETS_TOPIC)?;
        let group = name("group", &raw.group, DEFAULT_FLEET_GROUP)?;
        let partitions = raw.partitions.unwrap_or(DEFAULT_FLEET_PARTITIONS);
        if !(1..=1000).contains(&partitions) {
            return Err(self.err(format!("{ctx}partitions {partitions}: expected 1 to 1000")));
        }
        let session_timeout = match &raw.session_timeout {
            Some(v) => self.duration(ctx, "session_timeout", v)?,
            None => DEFAULT_SESSION_TIMEOUT,
        };
        if !(Duration::from_secs(1)..=Duration::from_secs(1800)).contains(&session_timeout) {
            return Err(self.err(format!(
                "{ctx}session_timeout {:?}: expected 1s to 30m",
                format_duration(session_timeout)
            )));
        }
        let heartbeat_interval = match &raw.heartbeat_interval {
            Some(v) => self.positive_duration(ctx, "heartbeat_interval", v)?,
            None => DEFAULT_HEARTBEAT_INTERVAL.min(session_timeout / 3),
        };
        // Kafka's advice: three heartbeats per session, so one lost heartbeat is no eviction.
        if heartbeat_interval > session_timeout / 3 {
            return Err(self.err(format!(
                "{ctx}heartbeat_interval {:?}: at most a third of session_timeout ({})",
                format_duration(heartbeat_interval),
                format_duration(session_timeout)
            )));
        }
        Ok(FleetConfig {
            targets_topic,
            group,
            location,
            partitions,
            session_timeout,
            heartbeat_interval,
        })
    }

    #[cfg(not(feature = "serve"))]
    fn serve(&self, _: &RawServe) -> Result<ServeConfig, ConfigError> {
        Err(self.err("serve: this sitewatch was built without the `serve` feature; remove [serve]"))
    }

    #[cfg(feature = "serve")]
    fn serve(&self, raw: &RawServe) -> Result<ServeConfig, ConfigError> {
        let ctx = "serve: ";
        let listen = self.listen(ctx, raw.listen.as_deref(), "127.0.0.1:9782")?;
        let connections = match raw.connections {
            None => DEFAULT_SERVE_CONNECTIONS,
            Some(n) if (1..=MAX_METRICS_CONNECTIONS).contains(&n) => n,
            Some(n) => {
                return Err(self.err(format!(
                    "{ctx}connections {n}: expected 1 to {MAX_METRICS_CONNECTIONS}"
                )));
            }
        };
        Ok(ServeConfig {
            listen,
            connections,
        })
    }

    /// A listener's `listen` address: an IP address and port (no host names: no lookup).
    #[cfg(any(feature = "metrics", feature = "serve"))]
    fn listen(
        &self,
        ctx: &str,
        listen: Option<&str>,
        example: &str,
    ) -> Result<std::net::SocketAddr, ConfigError> {
        let listen =
            listen.ok_or_else(|| self.err(format!("{ctx}listen: missing (e.g. \"{example}\")")))?;
        listen.parse().map_err(|_| {
            self.err(format!(
                "{ctx}listen {listen:?}: expected an IP address and port, like \"{example}\""
            ))
        })
    }

    #[cfg(not(feature = "metrics"))]
    fn metrics(&self, _: &RawMetrics, _: &AgentConfig) -> Result<MetricsConfig, ConfigError> {
        Err(self.err(
            "metrics: this sitewatch was built without the `metrics` feature; remove [metrics]",
        ))
    }

    #[cfg(feature = "metrics")]
    fn metrics(&self, raw: &RawMetrics, agent: &AgentConfig) -> Result<MetricsConfig, ConfigError> {
        let ctx = "metrics: ";
        let listen = self.listen(ctx, raw.listen.as_deref(), "127.0.0.1:9781")?;
        let mut probe_allow = Vec::new();
        for prefix in raw.probe_allow.iter().flatten() {
            // The host must end at a `/`: a bare `http://a.example` would admit `a.example.evil`.
            // No user-info: a prefix is printed by check-config and matched against URLs.
            let plain = UrlParts::parse(prefix)
                .is_some_and(|p| p.rest.starts_with('/') && p.user.is_none());
            if validate_url(prefix).is_err() || !plain {
                return Err(self.err(format!(
                    "{ctx}probe_allow {:?}: expected an http:// or https:// URL prefix without user-info, with a path, like \"https://example.com/\"",
                    shown_url(prefix)
                )));
            }
            probe_allow.push(prefix.clone());
        }
        let bounded = |field: &str, value: Option<usize>, default: usize, max: usize| match value {
            None => Ok(default),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => Err(self.err(format!("{ctx}{field} {n}: expected 1 to {max}"))),
        };
        let probe_concurrency = bounded(
            "probe_concurrency",
            raw.probe_concurrency,
            DEFAULT_PROBE_CONCURRENCY,
            MAX_PROBE_CONCURRENCY,
        )?;
        let connections = bounded(
            "connections",
            raw.connections,
            DEFAULT_METRICS_CONNECTIONS,
            MAX_METRICS_CONNECTIONS,
        )?;
        let mut modules = std::collections::BTreeMap::new();
        for (name, module) in &raw.modules {
            let ctx = format!("metrics.module {name:?}: ");
            for (field, set) in [("id", module.id.is_some()), ("url", module.url.is_some())] {
                if set {
                    return Err(self.err(format!(
                        "{ctx}{field}: not allowed in a module (the URL comes from /probe?target=)"
                    )));
                }
            }
            let template = self.target_fields(&ctx, name.clone(), String::new(), module, agent)?;
            modules.insert(name.clone(), template);
        }
        Ok(MetricsConfig {
            listen,
            probe_allow,
            probe_concurrency,
            connections,
            modules,
        })
    }

    fn headers(
        &self,
        ctx: &str,
        raw: &std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let mut headers = Vec::new();
        for (name, value) in raw {
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
            if !name_ok {
                return Err(self.err(format!("{ctx}headers: {name:?}: not a valid header name")));
            }
            if value.bytes().any(|c| c == b'\r' || c == b'\n' || c == 0) {
                return Err(self.err(format!(
                    "{ctx}headers: {name:?}: value must not contain CR, LF or NUL"
                )));
            }
            headers.push((name.clone(), value.clone()));
        }
        Ok(headers)
    }

    /// The compiled regex of `pattern`, from [`REGEXES`] when a live target already has it.
    fn regex(&self, ctx: &str, field: &str, pattern: &str) -> Result<Arc<Regex>, ConfigError> {
        let mut cache = REGEXES.lock().unwrap_or_else(|e| e.into_inner());
        let cache = cache.get_or_insert_with(HashMap::new);
        if let Some(re) = cache.get(pattern).and_then(Weak::upgrade) {
            return Ok(re);
        }
        let re = RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                let detail = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                self.err(format!("{ctx}{field} {pattern:?}: invalid regex: {detail}"))
            })?;
        let re = Arc::new(re);
        // Patterns no target uses any more (reloads, fleet changes) leave the cache whenever
        // it has doubled since the last sweep.
        if cache.len() >= 2 * REGEXES_SWEPT_AT.load(Ordering::Relaxed) {
            cache.retain(|_, re| re.strong_count() > 0);
            REGEXES_SWEPT_AT.store(cache.len().max(32), Ordering::Relaxed);
        }
        cache.insert(pattern.to_string(), Arc::downgrade(&re));
        Ok(re)
    }

    fn status_set(&self, ctx: &str, list: &[toml::Value]) -> Result<StatusSet, ConfigError> {
        let bad = |v: &dyn fmt::Display| {
            self.err(format!(
                "{ctx}expect_status: {v}: expected a status (200) or a range (\"200-299\") from 100 to 599"
            ))
        };
        let valid = |n: i64| (100..=599).contains(&n);
        let mut out = Vec::new();
        for v in list {
            match v {
                toml::Value::Integer(n) if valid(*n) => out.push((*n as u16, *n as u16)),
                toml::Value::String(s) => {
                    let (lo, hi) = match s.split_once('-') {
                        Some((a, b)) => (a.trim().parse::<i64>(), b.trim().parse::<i64>()),
                        None => (s.trim().parse::<i64>(), s.trim().parse::<i64>()),
                    };
                    match (lo, hi) {
                        (Ok(lo), Ok(hi)) if valid(lo) && valid(hi) && lo <= hi => {
                            out.push((lo as u16, hi as u16))
                        }
                        _ => return Err(bad(&format!("{s:?}"))),
                    }
                }
                other => return Err(bad(other)),
            }
        }
        if out.is_empty() {
            return Err(self.err(format!("{ctx}expect_status: must not be empty")));
        }
        Ok(StatusSet(out.into()))
    }
}

/// `http://` or `https://` with a host; nothing else is probed.
fn validate_url(url: &str) -> Result<(), String> {
    let parts = UrlParts::parse(url)
        .filter(|p| p.scheme == "http" || p.scheme == "https")
        .ok_or("expected an http:// or https:// URL")?;
    if parts.host.is_empty() || parts.host.starts_with(':') {
        return Err("missing host".into());
    }
    if url
        .bytes()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(())
}

/// A target URL as errors and `check-config` show it: without the password of its user-info.
fn shown_url(url: &str) -> String {
    match UrlParts::parse(url) {
        Some(parts) => parts.without_password(),
        // Not cut into parts, so no telling what an `@` guards: show none of it.
        None if url.contains('@') => "(not shown: it may hold a password)".into(),
        None => url.to_string(),
    }
}

/// `"1MiB"`, `"64KiB"`, `"512KB"`, `"1000"` (bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.bytes().take_while(|c| c.is_ascii_digit()).count();
    let n: u64 = s[..digits].parse().ok()?;
    let mult: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" | "K" | "k" => 1024,
        "MB" => 1_000_000,
        "MiB" | "M" => 1024 * 1024,
        "GB" => 1_000_000_000,
        "GiB" | "G" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Splits a PostgreSQL URL into the URL without its password (what is printed, and connected
/// to) and the password, decoded. libpq and rust-postgres take a password from the user-info
/// (`postgres://user:secret@host/db`) and from the query (`?password=secret`): both are secrets.
fn split_postgres_password(url: &str) -> Result<(String, Option<String>), String> {
    let parts = UrlParts::parse(url)
        .filter(|p| p.scheme == "postgres" || p.scheme == "postgresql")
        // Never echo the value: it may hold a password.
        .ok_or("expected a postgres:// or postgresql:// URL")?;
    let (path, query) = parts.rest.split_once('?').unwrap_or((parts.rest, ""));
    let mut kept = Vec::new();
    let mut in_query = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("password", value)) => {
                if in_query.replace(percent_decode(value)).is_some() {
                    return Err("password: given more than once".into());
                }
            }
            _ => kept.push(pair),
        }
    }
    let password = match (parts.password, in_query) {
        (Some(_), Some(_)) => {
            return Err("password: given both as user:password@ and as ?password=".into());
        }
        (Some(p), None) => Some(percent_decode(p)),
        (None, in_query) => in_query,
    };
    let mut stripped = UrlParts {
        password: None,
        rest: path,
        ..parts
    }
    .without_password();
    if !kept.is_empty() {
        stripped.push('?');
        stripped.push_str(&kept.join("&"));
    }
    Ok((stripped, password))
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// The effective config, printed by `check-config`: valid TOML that parses back to this config.

impl Config {
    /// The effective configuration as TOML, with every default filled in. It parses back to the
    /// same config, except for secrets, which are never shown: a password read from a file shows
    /// as its `password_file`, any other as a comment saying where it came from; the password
    /// of a target URL's user-info and the values of credential-bearing headers are left out
    /// with a comment.
    pub fn effective(&self) -> String {
        let mut out = TomlWriter(String::new());
        out.line(format_args!(
            "# effective configuration from {}",
            toml_string(&self.source.display().to_string())
        ));
        out.line("[agent]");
        self.agent.write_toml(&mut out);
        if let Some(k) = &self.kafka {
            k.write_toml(&mut out, self.secrets.kafka_sasl_password.as_ref());
        }
        if let Some(p) = &self.postgres {
            p.write_toml(&mut out, self.secrets.postgres_password.as_ref());
        }
        self.rules.write_toml(&mut out);
        for t in &self.targets {
            t.write_toml(&mut out);
        }
        if let Some(f) = &self.fleet {
            f.write_toml(&mut out);
        }
        if let Some(a) = &self.alerts {
            crate::alerts::write_toml(a, &mut out.0, &|s| toml_string(s));
        }
        if let Some(s) = &self.serve {
            out.table("[serve]");
            out.string("listen", &s.listen.to_string());
            out.value("connections", s.connections);
        }
        if let Some(m) = &self.metrics {
            m.write_toml(&mut out);
        }
        out.0
    }
}

/// Lines of TOML; each value is encoded so that it parses back to itself.
struct TomlWriter(String);

impl TomlWriter {
    fn line(&mut self, line: impl fmt::Display) {
        use std::fmt::Write;
        let _ = writeln!(self.0, "{line}");
    }

    fn table(&mut self, header: &str) {
        self.line(format_args!("\n{header}"));
    }

    /// `value` is already TOML (a number, a bool, an array).
    fn value(&mut self, key: &str, value: impl fmt::Display) {
        self.line(format_args!("{key} = {value}"));
    }

    fn string(&mut self, key: &str, value: &str) {
        self.value(key, toml_string(value));
    }

    fn path(&mut self, key: &str, path: &Path) {
        self.string(key, &path.display().to_string());
    }

    fn duration(&mut self, key: &str, d: Duration) {
        self.string(key, &format_duration(d));
    }

    fn size(&mut self, key: &str, bytes: u64) {
        self.string(key, &format_size(bytes));
    }

    fn strings(&mut self, key: &str, list: &[String]) {
        let items: Vec<String> = list.iter().map(|s| toml_string(s)).collect();
        self.value(key, format_args!("[{}]", items.join(", ")));
    }

    /// A password: its file, or a comment saying where it came from.
    fn secret(&mut self, source: Option<&SecretSource>, env: &str) {
        match source {
            None => {}
            Some(SecretSource::File(path)) => self.path("password_file", path),
            Some(SecretSource::Env(var)) => {
                self.line(format_args!("# password: set from {var} (not shown)"));
            }
            Some(SecretSource::Inline) => self.line(format_args!(
                "# password: written in the config file (not shown); give it as {env} or password_file"
            )),
        }
    }
}

impl AgentConfig {
    fn write_toml(&self, out: &mut TomlWriter) {
        out.string("id", &self.id);
        if let Some(location) = &self.location {
            out.string("location", location);
        }
        out.duration("interval", self.interval);
        out.duration("timeout", self.timeout);
        out.value("concurrency", self.concurrency);
        let jitter = match self.jitter {
            Jitter::Fraction(f) => format_percent(f),
            Jitter::Fixed(d) => format_duration(d),
        };
        out.string("jitter", &jitter);
        out.size("body_cap", self.body_cap as u64);
        out.string("user_agent", &self.user_agent);
        out.value("retries", self.retries);
        out.duration("retry_delay", self.retry_delay);
        out.path("state_dir", &self.state_dir);
        out.size("spool_max", self.spool_max_bytes);
        out.duration("drain_timeout", self.drain_timeout);
    }
}

impl KafkaConfig {
    fn write_toml(&self, out: &mut TomlWriter, password: Option<&SecretSource>) {
        out.table("[kafka]");
        out.strings("brokers", &self.brokers);
        out.string("topic", &self.topic);
        out.string("client_id", &self.client_id);
        out.value("create_topic", self.create_topic);
        out.value("partitions", self.partitions);
        out.value("replication_factor", self.replication_factor);
        out.duration("linger", self.linger);
        out.size("batch_max", self.batch_max_bytes as u64);
        out.duration("request_timeout", self.request_timeout);
        out.duration("spool_after", self.spool_after);
        out.string("compression", self.compression.as_str());
        if let Some(tls) = &self.tls {
            out.table("[kafka.tls]");
            for (key, path) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ] {
                if let Some(path) = path {
                    out.path(key, path);
                }
            }
            out.value("verify_hostname", tls.verify_hostname);
        }
        if let Some(sasl) = &self.sasl {
            out.table("[kafka.sasl]");
            out.string("mechanism", sasl.mechanism.as_str());
            out.string("username", &sasl.username);
            out.secret(password, "SITEWATCH_KAFKA_SASL_PASSWORD");
        }
    }
}

impl PostgresConfig {
    fn write_toml(&self, out: &mut TomlWriter, password: Option<&SecretSource>) {
        out.table("[postgres]");
        out.string("url", &self.url);
        out.secret(password, "SITEWATCH_PG_PASSWORD");
        out.string("sslmode", self.sslmode.as_str());
        if let Some(ca) = &self.ca_file {
            out.path("ca_file", ca);
        }
        out.duration("retention", self.retention);
        out.duration("rollup_retention", self.rollup_retention);
        out.value("batch_size", self.batch_size);
    }
}

impl RulesConfig {
    fn write_toml(&self, out: &mut TomlWriter) {
        out.table("[rules]");
        out.path("dir", &self.dir);
        out.duration("deadline", self.deadline);
        out.size("memory_limit", self.memory_limit as u64);
        if let Some(fuel) = self.fuel {
            out.value("fuel", fuel);
        }
    }
}

impl FleetConfig {
    fn write_toml(&self, out: &mut TomlWriter) {
        out.table("[fleet]");
        out.string("targets_topic", &self.targets_topic);
        out.string("group", &self.group);
        out.value("partitions", self.partitions);
        out.duration("session_timeout", self.session_timeout);
        out.duration("heartbeat_interval", self.heartbeat_interval);
    }
}

impl MetricsConfig {
    fn write_toml(&self, out: &mut TomlWriter) {
        out.table("[metrics]");
        out.string("listen", &self.listen.to_string());
        out.strings("probe_allow", &self.probe_allow);
        out.value("probe_concurrency", self.probe_concurrency);
        out.value("connections", self.connections);
        for (name, module) in &self.modules {
            out.table(&format!("[metrics.module.{}]", toml_string(name)));
            module.write_fields(out);
        }
    }
}

impl Target {
    fn write_toml(&self, out: &mut TomlWriter) {
        out.table("[[target]]");
        out.string("id", &self.id);
        let shown = shown_url(&self.url);
        if shown == self.url {
            out.string("url", &self.url);
        } else {
            out.line(format_args!(
                "url = {}  # the password in this URL is not shown",
                toml_string(&shown)
            ));
        }
        self.write_fields(out);
    }

    /// Every key but `id` and `url` (a `/probe` module has neither).
    fn write_fields(&self, out: &mut TomlWriter) {
        out.string("method", self.method);
        for (name, value) in &self.headers {
            let key = format!("headers.{}", toml_string(name));
            if is_sensitive_header(name) {
                out.line(format_args!("# {key} = (set, not shown)"));
            } else {
                out.string(&key, value);
            }
        }
        if let Some(body) = &self.body {
            out.string("body", body);
        }
        out.duration("interval", self.interval);
        out.duration("timeout", self.timeout);
        // A range is a string in TOML (`"300-302"`), a single status a number.
        let statuses: Vec<String> = (self.expect_status.entries())
            .map(|e| if e.contains('-') { toml_string(&e) } else { e })
            .collect();
        out.value("expect_status", format_args!("[{}]", statuses.join(", ")));
        for (key, regex) in [("regex", &self.regex), ("regex_absent", &self.regex_absent)] {
            if let Some(regex) = regex {
                out.string(key, regex.as_str());
            }
        }
        if let Some(rule) = &self.rule {
            out.string("rule", rule);
        }
        out.value("follow_redirects", self.follow_redirects);
        out.value("max_redirects", self.max_redirects);
        out.string("ip", self.ip.as_str());
        out.value("keep_alive", self.keep_alive);
        out.value("retries", self.retries);
        out.value("tls.insecure_skip_verify", self.tls_insecure);
        if let Some(ca) = &self.tls_ca_file {
            out.path("tls.ca_file", ca);
        }
        out.strings("tags", &self.tags);
    }
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `1MiB` when the size is a whole number of a binary unit, else bytes (`1000B`).
fn format_size(bytes: u64) -> String {
    for (unit, len) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= len && bytes.is_multiple_of(len) {
            return format!("{}{unit}", bytes / len);
        }
    }
    format!("{bytes}B")
}

/// A fraction as the shortest percentage that the config reads back to the same fraction
/// (`0.07` is `7%`, although `0.07 * 100.0` is `7.000000000000001`).
fn format_percent(fraction: f64) -> String {
    let pct = fraction * 100.0;
    (0..=17)
        .map(|places| format!("{pct:.places$}"))
        .find(|text| text.parse::<f64>().is_ok_and(|p| p / 100.0 == fraction))
        .unwrap_or_else(|| pct.to_string())
        + "%"
}

/// Header values `check-config` may show: these carry no credential in any API we know of.
/// Every other value is masked, since a custom name (`X-Password`, `Apikey`) says nothing.
const HARMLESS_HEADERS: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "cache-control",
    "connection",
    "content-type",
    "host",
    "pragma",
    "user-agent",
];

/// Whether a header's value may be a credential: any header not known to be harmless.
pub fn is_sensitive_header(name: &str) -> bool {
    !HARMLESS_HEADERS
        .iter()
        .any(|harmless| harmless.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        Config::parse(text, Path::new("agent.toml"), &lookup)
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_env(text, &[])
    }

    /// `check_err(config, expected substring of the full message)`.
    fn check_err(text: &str, expected: &str) {
        let err = parse(text).expect_err(text).to_string();
        assert!(
            err.contains(expected),
            "config:\n{text}\ngot:  {err}\nwant: {expected}"
        );
    }

    const T: &str = "[[target]]\nid = \"shop\"\nurl = \"https://shop.example/\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(T).unwrap();
        let t = &c.targets[0];
        assert_eq!(t.interval, DEFAULT_INTERVAL);
        assert_eq!(t.timeout, DEFAULT_TIMEOUT);
        assert_eq!(t.method, "GET");
        assert!(t.expect_status.contains(200) && t.expect_status.contains(399));
        assert!(!t.expect_status.contains(404));
        assert!(c.kafka.is_none() && c.postgres.is_none());
        assert_eq!(c.agent.body_cap, DEFAULT_BODY_CAP);
    }

    #[cfg(feature = "fleet")]
    #[test]
    fn fleet_defaults_and_errors_name_the_field() {
        let f = parse("[fleet]\n").unwrap().fleet.unwrap();
        assert_eq!(f.targets_topic, DEFAULT_TARGETS_TOPIC);
        assert_eq!(f.group_id(), DEFAULT_FLEET_GROUP);
        let c = parse("[agent]\nlocation = \"eu-west\"\n\n[fleet]\ngroup = \"g\"\n").unwrap();
        assert_eq!(c.fleet.unwrap().group_id(), "g.eu-west");
        assert_eq!(f.session_timeout, DEFAULT_SESSION_TIMEOUT);
        assert_eq!(f.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        // A short session gets a heartbeat that fits it three times.
        let f = parse("[fleet]\nsession_timeout = \"1500ms\"\n")
            .unwrap()
            .fleet
            .unwrap();
        assert_eq!(f.heartbeat_interval, Duration::from_millis(500));
        for (text, want) in [
            (
                "session_timeout = \"10s\"\nheartbeat_interval = \"5s\"",
                "agent.toml: fleet: heartbeat_interval \"5s\": at most a third of session_timeout (10s)",
            ),
            (
                "session_timeout = \"2h\"",
                "fleet: session_timeout \"2h\": expected 1s to 30m",
            ),
            (
                "heartbeat_interval = \"0s\"",
                "fleet: heartbeat_interval \"0s\": must be greater",
            ),
            (
                "targets_topic = \"a b\"",
                "fleet: targets_topic \"a b\": expected 1 to 249",
            ),
            ("group = \"\"", "fleet: group \"\": expected"),
            ("partitions = 0", "fleet: partitions 0: expected 1 to 1000"),
            ("sesion_timeout = \"1s\"", "unknown field `sesion_timeout`"),
        ] {
            check_err(&format!("[fleet]\n{text}\n"), want);
        }
    }

    #[cfg(feature = "fleet")]
    #[test]
    fn a_target_from_elsewhere_is_validated_like_one_of_the_file() {
        let c = parse("[agent]\ninterval = \"7s\"\njitter = \"2s\"\n").unwrap();
        let raw: RawTarget = toml::from_str("id = \"a\"\nurl = \"http://127.0.0.1/\"").unwrap();
        let t = c.validate_target("topic t", &raw).unwrap();
        assert_eq!(
            t.interval,
            Duration::from_secs(7),
            "the agent's defaults apply"
        );
        let raw: RawTarget =
            toml::from_str("id = \"b\"\nurl = \"http://127.0.0.1/\"\ntimeout = \"5x\"").unwrap();
        let err = c
            .validate_target("topic t key \"b\"", &raw)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("topic t key \"b\": target \"b\": timeout \"5x\""),
            "{err}"
        );
        let raw: RawTarget =
            toml::from_str("id = \"c\"\nurl = \"http://127.0.0.1/\"\ninterval = \"3s\"").unwrap();
        let err = c.validate_target("f", &raw).unwrap_err().to_string();
        assert!(
            err.contains("jitter \"2s\": more than half the interval of target \"c\""),
            "{err}"
        );
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn metrics_errors_name_the_field() {
        let m = |rest: &str| format!("[metrics]\nlisten = \"127.0.0.1:9781\"\n{rest}");
        check_err("[metrics]\n", "agent.toml: metrics: listen: missing");
        check_err(
            "[metrics]\nlisten = \"localhost:80\"\n",
            "metrics: listen \"localhost:80\": expected an IP address and port",
        );
        for prefix in ["http://a.example", "ftp://a/", "http://u:secret@a/", "a/"] {
            let err = parse(&m(&format!("probe_allow = [\"{prefix}\"]\n")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("metrics: probe_allow"), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        check_err(
            &m("probe_concurrency = 0\n"),
            "metrics: probe_concurrency 0: expected 1 to 64",
        );
        check_err(
            &m("connections = 100000\n"),
            "metrics: connections 100000: expected 1 to 256",
        );
        check_err(
            &m("[metrics.module.m]\nurl = \"http://a/\"\n"),
            "metrics.module \"m\": url: not allowed in a module",
        );
        check_err(
            &m("[metrics.module.m]\nmax_redirects = 99\n"),
            "metrics.module \"m\": max_redirects 99: expected 0 to 50",
        );
        check_err(
            &m("[metrics.module.m]\nbogus = 1\n"),
            "unknown field `bogus`",
        );
        let c = parse(&m("[metrics.module.m]\n")).unwrap();
        let metrics = c.metrics.unwrap();
        assert_eq!(metrics.probe_concurrency, DEFAULT_PROBE_CONCURRENCY);
        assert_eq!(metrics.modules["m"].timeout, DEFAULT_TIMEOUT);
    }

    /// The `[[target]]` tables are parsed one at a time (a file of 100,000 targets never
    /// holds its whole TOML tree): the result is the whole file's, tables in between, sub-tables,
    /// comments and strings that look like headers included, and errors keep the file's lines.
    #[cfg(feature = "fleet")]
    #[test]
    fn targets_parsed_one_table_at_a_time_mean_what_the_whole_file_means() {
        let text = "# fleet of two\n[agent]\nid = \"a\"\n\n[[target]]\nid = \"one\"\n\
                    url = \"https://one.example/\"\nbody = \"\"\"\n[[target]]\nid = 'x'\n\"\"\"\n\
                    method = \"POST\"\n[target.headers]\nX-A = \"1\"\n[ target . tls ]\n\
                    insecure_skip_verify = true\n\n[kafka]\nbrokers = [\n  \"127.0.0.1:9092\",\n]\n\
                    [[ target ]] # two\nid = \"two\"\nurl = \"http://two.example/\"\ntags = [\"a\",\n \"b\"]\n";
        let split = split_targets(text).expect("a plain file");
        assert_eq!(split.targets.len(), 2);
        assert_eq!((split.targets[0].0, split.targets[1].0), (5, 22));
        assert_eq!(split.rest.lines().count(), text.lines().count());
        let c = parse(text).unwrap();
        let whole: RawConfig = toml::from_str(text).unwrap();
        let ids: Vec<&str> = c.targets.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["one", "two"]);
        assert_eq!(whole.targets.len(), 2);
        assert_eq!(c.targets[0].body, whole.targets[0].body);
        assert!(c.targets[0].body.as_deref().unwrap().contains("[[target]]"));
        assert_eq!(c.targets[0].headers, [("X-A".to_string(), "1".to_string())]);
        assert!(c.targets[0].tls_insecure);
        assert_eq!(c.targets[1].tags, ["a", "b"]);
        assert_eq!(c.kafka.unwrap().brokers, ["127.0.0.1:9092"]);
        // Errors keep the file's lines, in a target table and after one.
        check_err(
            &text.replace("method = \"POST\"", "methd = \"POST\""),
            "agent.toml: line 12, column 1: unknown field `methd`",
        );
        check_err(
            &text.replace("brokers = [", "brokrs = ["),
            "agent.toml: line 19, column 1: unknown field `brokrs`",
        );
        check_err(
            &format!("{text}[[target]]\nid = \"one\"\nurl = \"http://x.example/\"\n"),
            "agent.toml: target \"one\": duplicate id",
        );
        // Shapes it leaves to TOML's parser, which reads them as before.
        let inline = "target = [{ id = \"i\", url = \"http://i.example/\" }]\n";
        let late = format!("{T}[agent]\nid = \"a\"\n[target.tls]\ninsecure_skip_verify = true\n");
        let quoted = "[[\"target\"]]\nid = \"q\"\nurl = \"http://q.example/\"\n";
        for text in [inline, &late, quoted, "[target]\nid = \"x\"\n"] {
            assert!(split_targets(text).is_none(), "{text}");
        }
        assert_eq!(parse(inline).unwrap().targets[0].id, "i");
        assert!(parse(&late).unwrap().targets[0].tls_insecure);
        assert_eq!(parse(quoted).unwrap().targets[0].id, "q");
    }

    /// Targets with equal settings share one `TargetSpec` (a copy each would cost ~220 bytes
    /// a target at 100,000); a change to one target's settings leaves the others' alone.
    #[cfg(feature = "fleet")]
    #[test]
    fn targets_of_one_kind_share_their_settings() {
        let kind = |i: usize, interval: &str| {
            format!(
                "[[target]]\nid = \"t{i}\"\nurl = \"http://t{i}.example/\"\ninterval = \"{interval}\"\nregex = \"ok\"\n"
            )
        };
        let text = [kind(0, "1m"), kind(1, "5m"), kind(2, "1m"), kind(3, "5m")].concat();
        let mut c = parse(&text).unwrap();
        let t = &c.targets;
        assert!(Arc::ptr_eq(&t[0].spec, &t[2].spec) && Arc::ptr_eq(&t[1].spec, &t[3].spec));
        assert!(!Arc::ptr_eq(&t[0].spec, &t[1].spec));
        assert_eq!(
            (t[2].interval, t[3].interval),
            (Duration::from_secs(60), Duration::from_secs(300))
        );
        Arc::make_mut(&mut c.targets[2]).retries = 3;
        assert_eq!((c.targets[0].retries, c.targets[2].retries), (0, 3));
        assert_eq!(
            *c.targets[0].spec,
            *parse(&kind(9, "1m")).unwrap().targets[0].spec
        );
    }

    #[test]
    fn errors_name_file_target_and_field() {
        check_err(
            &format!("{T}interval = \"5x\"\n"),
            "agent.toml: target \"shop\": interval \"5x\": expected a duration like \"30s\"",
        );
        check_err(
            &format!("{T}intervall = \"5s\"\n"),
            "agent.toml: line 4, column 1: unknown field `intervall`",
        );
        check_err(
            "[agent]\nconcurency = 3\n",
            "line 2, column 1: unknown field `concurency`",
        );
        // A location is checked while parsing: the error has its line and column.
        for bad in ["EU West", "", "eu/west", &"a".repeat(MAX_LOCATION_LEN + 1)] {
            check_err(
                &format!("[agent]\nid = \"a\"\nlocation = {}\n", toml_string(bad)),
                &format!(
                    "agent.toml: line 3, column 12: agent: location {bad:?}: expected 1 to 63"
                ),
            );
        }
        let c = parse("[agent]\nlocation = \"eu-west-1.b_2\"\n").unwrap();
        assert_eq!(c.agent.location.as_deref(), Some("eu-west-1.b_2"));
        assert_eq!(parse("[agent]\n").unwrap().agent.location, None);
        check_err(
            &format!("{T}regex = \"(unclosed\"\n"),
            "target \"shop\": regex \"(unclosed\": invalid regex",
        );
        check_err(
            &format!("{T}expect_status = [200, \"abc\"]\n"),
            "target \"shop\": expect_status: \"abc\"",
        );
        check_err(&format!("{T}expect_status = [700]\n"), "expect_status: 700");
        check_err(
            "[[target]]\nid = \"a\"\nurl = \"ftp://x/\"\n",
            "target \"a\": url \"ftp://x/\": expected an http:// or https:// URL",
        );
        check_err(
            "[[target]]\nurl = \"http://x/\"\n",
            "target #1: id: missing",
        );
        check_err(&format!("{T}{T}"), "target \"shop\": duplicate id");
        check_err(&format!("{T}ip = \"v5\"\n"), "ip \"v5\"");
        check_err(&format!("{T}method = \"BREW\"\n"), "method \"BREW\"");
        check_err("[agent]\nconcurrency = 0\n", "agent: concurrency 0");
        check_err(
            "[agent]\ntimeout = \"0s\"\n",
            "agent: timeout \"0s\": must be greater than zero",
        );
        check_err(
            "[kafka]\nbrokers = [\"nohost\"]\n",
            "kafka: brokers: \"nohost\": expected host:port",
        );
        check_err(
            "[postgres]\nsslmode = \"maybe\"\n",
            "postgres: sslmode \"maybe\"",
        );
        check_err(
            "[kafka]\nsasl = { username = \"u\" }\n",
            "kafka: sasl: password: missing",
        );
        check_err(
            &format!("{T}headers = {{ \"X-A\" = \"a\\nb\" }}\n"),
            "must not contain CR, LF or NUL",
        );
    }

    #[test]
    fn hostile_regex_is_a_config_error() {
        // Counted repetition that blows past the compiled-size limit.
        check_err(
            &format!("{T}regex = \"(\\\\w{{100}}){{100}}\"\n"),
            "invalid regex",
        );
    }

    #[test]
    fn status_ranges() {
        let c = parse(&format!("{T}expect_status = [200, \"300-302\", 418]\n")).unwrap();
        let s = &c.targets[0].expect_status;
        for (code, want) in [
            (200, true),
            (201, false),
            (301, true),
            (303, false),
            (418, true),
        ] {
            assert_eq!(s.contains(code), want, "{code}");
        }
        assert_eq!(s.to_string(), "200,300-302,418");
    }

    #[test]
    fn env_overrides_and_masking() {
        let text = "[kafka]\nbrokers = [\"a:1\"]\n[kafka.sasl]\nmechanism = \"PLAIN\"\nusername = \"u\"\n[postgres]\nurl = \"postgres://u:hunter2@db:5432/x\"\n";
        let c = parse_env(
            text,
            &[
                ("SITEWATCH_KAFKA_BROKERS", "b:2, c:3"),
                ("SITEWATCH_KAFKA_SASL_PASSWORD", "s3cr3t"),
            ],
        )
        .unwrap();
        let k = c.kafka.as_ref().unwrap();
        assert_eq!(k.brokers, vec!["b:2", "c:3"]);
        assert_eq!(k.sasl.as_ref().unwrap().password.expose(), "s3cr3t");
        let p = c.postgres.as_ref().unwrap();
        assert_eq!(p.url, "postgres://u@db:5432/x");
        assert_eq!(p.password.as_ref().unwrap().expose(), "hunter2");
        let shown = format!("{}\n{:?}", c.effective(), c);
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("********"));
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent.toml");
        let c = Config::load_with_env(&path, &|_| None).unwrap();
        assert!(!c.targets.is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1 parsec"), None);
        for bytes in [0, 1, 1000, 1024, 1536, 1 << 20, 3 << 30, u64::MAX] {
            assert_eq!(parse_size(&format_size(bytes)), Some(bytes), "{bytes}");
        }
    }

    #[test]
    fn toml_strings_read_back_as_written() {
        for text in [
            "",
            "plain",
            "'\"\\",
            "\0\u{1}\t\n\r\u{1b}\u{7f}\u{85}",
            "ü \u{2028} 🦀",
        ] {
            let line = format!("k = {}", toml_string(text));
            let table: toml::Table =
                toml::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(table["k"].as_str(), Some(text), "{line}");
        }
    }

    #[test]
    fn jitter_percentages_print_back_exactly() {
        for text in ["0%", "7%", "12.5%", "33.33%", "0.1%", "49.999%", "50%"] {
            let jitter = |text: &str| parse(&format!("[agent]\njitter = {text:?}\n")).unwrap();
            let Jitter::Fraction(f) = jitter(text).agent.jitter else {
                panic!("{text}")
            };
            assert_eq!(format_percent(f), text);
            assert_eq!(jitter(&format_percent(f)).agent.jitter, Jitter::Fraction(f));
        }
    }

    /// A directory of its own under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("sitewatch-config-{}", crate::util::new_check_id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Sets every key of every table (see the file's header).
    const EVERY_KEY: &str = include_str!("../../tests/fixtures/config/every-key.toml");
    /// The fixture's `[fleet]` table, refused by a build without the `fleet` feature.
    const EVERY_KEY_FLEET: &str = "[fleet]\ntargets_topic = \"fleet.targets-1\"\ngroup = \"eu_west.1\"\npartitions = 24\nsession_timeout = \"45s\"\nheartbeat_interval = \"3s\"\n\n";

    fn every_key_files(dir: &Scratch) -> PathBuf {
        dir.write("sasl-password", "sasl-secret-2\n");
        dir.write("pg-password", "pg-secret-3\n");
        dir.write("target-ca.pem", "not read at load");
        for (name, text) in ALERT_SECRET_FILES {
            dir.write(name, text);
        }
        let mut text = match cfg!(feature = "wasm") {
            true => EVERY_KEY.to_string(),
            // Without the rule engine a `rule` is refused, so it cannot be part of this config.
            false => EVERY_KEY.replace("rule = \"status_ok.wasm\"\n", ""),
        };
        if !cfg!(feature = "serve") {
            // Without the status page `[serve]` is refused.
            text = text.replace(
                "[serve]\nlisten = \"127.0.0.1:9782\"\nconnections = 7\n",
                "",
            );
        }
        if !cfg!(feature = "alerts") {
            // Without alerts `[alerts]` is refused; its tables come just before `[metrics]`.
            if let (Some(a), Some(m)) = (text.find("\n[alerts]"), text.find("\n[metrics]")) {
                text.replace_range(a..m, "");
            }
        }
        if !cfg!(feature = "metrics") {
            // Without the listener `[metrics]` is refused; it is the file's last table.
            text.truncate(text.find("\n[metrics]").unwrap_or(text.len()) + 1);
        }
        if !cfg!(feature = "fleet") {
            text = text.replace(EVERY_KEY_FLEET, "");
        }
        dir.write("agent.toml", &text)
    }

    /// The alert channels' secret files named by the every-key config, and their contents.
    const ALERT_SECRET_FILES: [(&str, &str); 5] = [
        (
            "hook-url",
            "http://127.0.0.1:9/hook?token=hook-url-secret-4\n",
        ),
        ("hook-secret", "hook-secret-5\n"),
        (
            "slack-url",
            "http://127.0.0.1:9/services/T0/B0/slack-secret-6\n",
        ),
        ("pd-url", "http://127.0.0.1:9/v2/enqueue\n"),
        ("pd-key", "pd-secret-7\n"),
    ];

    /// `effective()` printed, parsed again: the same config, and the second print the same text
    /// but for the masked headers, which are not part of the printed config.
    fn round_trip(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> (Config, Config, String) {
        let first = Config::load_with_env(path, env).unwrap();
        let printed = first.effective();
        for (_, secret) in ALERT_SECRET_FILES {
            assert!(
                !printed.contains(secret.trim()),
                "{secret} shown:\n{printed}"
            );
        }
        let second = Config::parse(&printed, path, env)
            .unwrap_or_else(|e| panic!("{e}\nin the printed config:\n{printed}"));
        let unmasked: String = (printed.lines())
            .filter(|l| !l.starts_with("# headers."))
            .flat_map(|l| [l, "\n"])
            .collect();
        assert_eq!(second.effective(), unmasked, "printing is stable");
        (first, second, printed)
    }

    #[test]
    fn effective_config_parses_back_to_the_same_config() {
        let dir = Scratch::new();
        let path = every_key_files(&dir);
        let (mut first, second, printed) = round_trip(&path, &|_| None);
        for secret in ["key-secret-1", "sasl-secret-2", "pg-secret-3"] {
            assert!(!printed.contains(secret), "{secret} shown:\n{printed}");
        }
        assert!(
            printed.contains("# headers.\"X-Api-Key\" = (set, not shown)"),
            "{printed}"
        );
        // The one difference: the masked header is not part of the printed config.
        Arc::make_mut(&mut first.targets[0])
            .headers
            .retain(|(name, _)| name != "X-Api-Key");
        assert_eq!(first, second, "printed:\n{printed}");
        assert_eq!(
            second.kafka.unwrap().sasl.unwrap().password.expose(),
            "sasl-secret-2"
        );

        // Every other form of each value round-trips too.
        for (from, to) in [
            ("jitter = \"7%\"", "jitter = \"1.25s\""),
            ("ip = \"ipv6\"", "ip = \"v4\""),
            ("sslmode = \"verify-full\"", "sslmode = \"verify-ca\""),
            ("mechanism = \"scram-sha-256\"", "mechanism = \"PLAIN\""),
            ("compression = \"gzip\"", "compression = \"none\""),
            ("method = \"post\"", "method = \"HEAD\""),
            ("[200, \"300-302\", 418]", "[\"100-599\"]"),
        ] {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(from), "{from}");
            let variant = dir.write("variant.toml", &text.replace(from, to));
            let (mut first, second, printed) = round_trip(&variant, &|_| None);
            Arc::make_mut(&mut first.targets[0])
                .headers
                .retain(|(name, _)| name != "X-Api-Key");
            assert_eq!(first, second, "{to}: printed:\n{printed}");
        }
    }

    /// The first parse's fields of each table, from serde's "expected one of" list.
    fn fields_of(table: &str) -> Vec<String> {
        let text = format!("{table}\nzz_not_a_key = 1\n");
        let err = toml::from_str::<RawConfig>(&text).unwrap_err().to_string();
        let list = err.split("expected").nth(1).unwrap_or("");
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_every_key_config_sets_every_key() {
        let all: toml::Table = toml::from_str(EVERY_KEY).unwrap();
        let get = |path: &[&str]| -> toml::Table {
            let mut v = toml::Value::Table(all.clone());
            for key in path {
                v = match v {
                    toml::Value::Array(a) => a[0].get(key).unwrap().clone(),
                    toml::Value::Table(t) => t.get(*key).unwrap().clone(),
                    other => panic!("{other}"),
                };
            }
            match v {
                // Keys that exclude each other (`target` / `tag`) are set in different
                // elements: every key must be set in one of them.
                toml::Value::Array(a) => a
                    .iter()
                    .flat_map(|e| e.as_table().unwrap().clone())
                    .collect(),
                toml::Value::Table(t) => t,
                other => panic!("{other}"),
            }
        };
        for (header, path) in [
            ("", &[][..]),
            ("[agent]", &["agent"][..]),
            ("[kafka]", &["kafka"]),
            ("[kafka.tls]", &["kafka", "tls"]),
            ("[kafka.sasl]", &["kafka", "sasl"]),
            ("[postgres]", &["postgres"]),
            ("[rules]", &["rules"]),
            ("[fleet]", &["fleet"]),
            ("[[target]]", &["target"]),
            ("[[target]]\n[target.tls]", &["target", "tls"]),
            ("[alerts]", &["alerts"]),
            ("[[alerts.channel]]", &["alerts", "channel"]),
            ("[[alerts.override]]", &["alerts", "override"]),
            ("[[alerts.maintenance]]", &["alerts", "maintenance"]),
            ("[serve]", &["serve"]),
        ] {
            // Without their features these tables are read as anything (and refused later).
            let built = [
                ("alerts", cfg!(feature = "alerts")),
                ("fleet", cfg!(feature = "fleet")),
                ("serve", cfg!(feature = "serve")),
            ];
            if (built.iter()).any(|(table, on)| header.contains(table) && !on) {
                continue;
            }
            let fields = fields_of(header);
            assert!(fields.len() > 1, "{header}: {fields:?}");
            let set = get(path);
            for field in fields {
                // `password` is the inline form of `password_file`, and an alert channel's
                // `*_env` the environment form of its `*_file`: see the masking tests.
                if field == "password" || field.ends_with("_env") {
                    continue;
                }
                assert!(set.contains_key(&field), "{header} {field} is not set");
            }
        }
    }

    #[test]
    fn secrets_show_where_they_came_from_never_their_value() {
        let dir = Scratch::new();
        let path = every_key_files(&dir);
        let env = |k: &str| match k {
            "SITEWATCH_KAFKA_SASL_PASSWORD" => Some("sasl-env-secret".to_string()),
            "SITEWATCH_PG_PASSWORD" => Some("pg-env-secret".to_string()),
            _ => None,
        };
        let (first, second, printed) = round_trip(&path, &env);
        assert!(!printed.contains("env-secret"), "{printed}");
        for var in ["SITEWATCH_KAFKA_SASL_PASSWORD", "SITEWATCH_PG_PASSWORD"] {
            let comment = format!("# password: set from {var} (not shown)");
            assert!(printed.contains(&comment), "{printed}");
        }
        assert_eq!(first.secrets, second.secrets);
        assert_eq!(
            second.postgres.unwrap().password.unwrap().expose(),
            "pg-env-secret"
        );

        // Written in the file: a comment; the printed config then needs it from elsewhere.
        let text = "[kafka.sasl]\nusername = \"u\"\npassword = \"inline-1\"\n\
                    [postgres]\nurl = \"postgres://u:inline-2@db/x\"\n\
                    [[target]]\nid = \"a\"\nurl = \"http://admin:inline-3@h/x\"\n";
        let printed = parse(text).unwrap().effective();
        for secret in ["inline-1", "inline-2", "inline-3"] {
            assert!(!printed.contains(secret), "{secret} shown:\n{printed}");
        }
        assert!(printed.contains("# password: written in the config file (not shown); give it as SITEWATCH_KAFKA_SASL_PASSWORD or password_file"), "{printed}");
        assert!(printed.contains("# password: written in the config file (not shown); give it as SITEWATCH_PG_PASSWORD or password_file"), "{printed}");
        assert!(
            printed.contains("url = \"http://admin@h/x\"  # the password in this URL is not shown"),
            "{printed}"
        );
        let again = parse_env(&printed, &[("SITEWATCH_KAFKA_SASL_PASSWORD", "inline-1")]);
        assert_eq!(again.unwrap().postgres.unwrap().url, "postgres://u@db/x");
    }

    #[test]
    fn header_values_are_masked_unless_known_harmless() {
        let text = format!(
            "{T}headers = {{ X-Password = \"secret-v1\", Apikey = \"secret-v2\", X-Custom-Auth = \"secret-v3\", \
             authorization = \"secret-v4\", Accept = \"text/html\", User-Agent = \"ua/1\", \
             Cache-Control = \"no-cache\", content-type = \"text/plain\" }}\n"
        );
        let printed = parse(&text).unwrap().effective();
        for name in ["X-Password", "Apikey", "X-Custom-Auth", "authorization"] {
            let masked = format!("# headers.\"{name}\" = (set, not shown)\n");
            assert!(printed.contains(&masked), "{name}:\n{printed}");
        }
        assert!(!printed.contains("secret-v"), "{printed}");
        for shown in [
            "headers.\"Accept\" = \"text/html\"",
            "headers.\"User-Agent\" = \"ua/1\"",
            "headers.\"Cache-Control\" = \"no-cache\"",
            "headers.\"content-type\" = \"text/plain\"",
        ] {
            assert!(printed.contains(shown), "{shown}:\n{printed}");
        }
    }

    #[test]
    fn postgres_password_in_the_query_is_a_secret() {
        let check = |url: &str, want: Result<(&str, Option<&str>), &str>| {
            let text = format!("[postgres]\nurl = {url:?}\n");
            let got = parse(&text).map(|c| {
                let p = c.postgres.unwrap();
                (p.url, p.password.map(|s| s.expose().to_string()))
            });
            match (got, want) {
                (Ok((u, p)), Ok((want_url, want_password))) => {
                    assert_eq!(u, want_url, "{url}");
                    assert_eq!(p.as_deref(), want_password, "{url}");
                }
                (Err(e), Err(want)) => {
                    let e = e.to_string();
                    assert!(e.contains(want), "{url}: {e}");
                    assert!(!e.contains("pw"), "{url}: {e}");
                }
                (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
            }
        };
        check(
            "postgres://u@db/x?password=p%40w&sslmode=disable",
            Ok(("postgres://u@db/x?sslmode=disable", Some("p@w"))),
        );
        check(
            "postgres://u@db/x?application_name=a&password=pw",
            Ok(("postgres://u@db/x?application_name=a", Some("pw"))),
        );
        check(
            "postgres://u:p%3Aw@db",
            Ok(("postgres://u@db", Some("p:w"))),
        );
        check(
            "postgresql://db/x?user=u",
            Ok(("postgresql://db/x?user=u", None)),
        );
        check(
            "postgres://u:pw@db/x?password=pw2",
            Err("postgres: url: password: given both as user:password@ and as ?password="),
        );
        check(
            "postgres://db/x?password=pw&password=pw2",
            Err("postgres: url: password: given more than once"),
        );
        check(
            "mysql://u:pw@db/",
            Err("expected a postgres:// or postgresql:// URL"),
        );
        // The environment's password wins; the URL's is still kept out of the URL.
        let c = parse_env(
            "[postgres]\nurl = \"postgres://u@db/x?password=in-url\"\n",
            &[("SITEWATCH_PG_PASSWORD", "from-env")],
        )
        .unwrap();
        let p = c.postgres.as_ref().unwrap();
        assert_eq!(p.url, "postgres://u@db/x");
        assert_eq!(p.password.as_ref().unwrap().expose(), "from-env");
        assert!(!c.effective().contains("in-url"));
    }

    #[test]
    fn target_url_errors_do_not_show_its_password() {
        check_err(
            "[[target]]\nid = \"a\"\nurl = \"http://admin:pw-1@h/a b\"\n",
            "target \"a\": url \"http://admin@h/a b\": must not contain spaces",
        );
        check_err(
            "[[target]]\nid = \"a\"\nurl = \"admin:pw-1@h/\"\n",
            "url \"(not shown: it may hold a password)\": expected an http:// or https:// URL",
        );
    }

    /// Each out-of-range value is refused with its table, target and field; none is clamped.
    #[test]
    fn out_of_range_values_are_refused_not_clamped() {
        let check = |toml: &str, expected: &str| check_err(toml, expected);
        check(
            "[agent]\nretries = 11\n",
            "agent.toml: agent: retries 11: expected 0 to 10",
        );
        check(
            &format!("{T}retries = 50\n"),
            "agent.toml: target \"shop\": retries 50: expected 0 to 10",
        );
        check(
            "[agent]\nconcurrency = 0\n",
            "agent: concurrency 0: expected 1 to 1024",
        );
        check(
            "[agent]\nconcurrency = 1025\n",
            "agent: concurrency 1025: expected 1 to 1024",
        );
        check(
            "[agent]\njitter = \"51%\"\n",
            "agent: jitter \"51%\": expected a percentage from 0% to 50%",
        );
        check(
            "[agent]\njitter = \"-1%\"\n",
            "agent: jitter \"-1%\": expected a percentage",
        );
        check(
            &format!("[agent]\njitter = \"16s\"\n{T}"),
            "agent: jitter \"16s\": more than half the interval of target \"shop\" (30s)",
        );
        check(
            &format!("[agent]\njitter = \"2s\"\n{T}interval = \"3s\"\n"),
            "agent: jitter \"2s\": more than half the interval of target \"shop\" (3s)",
        );
        check(
            "[agent]\nbody_cap = \"0B\"\n",
            "agent: body_cap \"0B\": expected 1B to 256MiB",
        );
        check(
            "[agent]\nbody_cap = \"257MiB\"\n",
            "agent: body_cap \"257MiB\": expected 1B to 256MiB",
        );
        check(
            "[agent]\nspool_max = \"1KiB\"\n",
            "agent: spool_max \"1KiB\": expected at least 64KiB",
        );
        check(
            "[agent]\ninterval = \"0s\"\n",
            "agent: interval \"0s\": must be greater than zero",
        );
        check(
            &format!("{T}timeout = \"0ms\"\n"),
            "target \"shop\": timeout \"0ms\": must be greater than zero",
        );
        check(
            &format!("{T}max_redirects = 51\n"),
            "target \"shop\": max_redirects 51: expected 0 to 50",
        );
        check(
            &format!("{T}expect_status = [99]\n"),
            "target \"shop\": expect_status: 99",
        );
        check(
            &format!("{T}expect_status = [\"300-200\"]\n"),
            "expect_status: \"300-200\"",
        );
        check(
            "[kafka]\npartitions = 0\n",
            "kafka: partitions 0: expected 1 to 10000",
        );
        check(
            "[kafka]\npartitions = 10001\n",
            "kafka: partitions 10001: expected 1 to 10000",
        );
        check(
            "[kafka]\nreplication_factor = 0\n",
            "kafka: replication_factor: must be at least 1",
        );
        check(
            "[kafka]\nrequest_timeout = \"0s\"\n",
            "kafka: request_timeout \"0s\": must be greater than zero",
        );
        check(
            "[kafka]\nspool_after = \"0s\"\n",
            "kafka: spool_after \"0s\": must be greater than zero",
        );
        check(
            "[postgres]\nbatch_size = 0\n",
            "postgres: batch_size 0: expected 1 to 100000",
        );
        check(
            "[postgres]\nbatch_size = 100001\n",
            "postgres: batch_size 100001: expected 1 to 100000",
        );
        check(
            "[postgres]\nretention = \"0d\"\n",
            "postgres: retention \"0d\": must be greater than zero",
        );
        check(
            "[rules]\ndeadline = \"0s\"\n",
            "rules: deadline \"0s\": must be greater than zero",
        );
        check(
            "[agent]\ntimeout = \"10000000001s\"\n",
            "agent: timeout \"10000000001s\": expected a duration",
        );
        check(
            "[agent]\nspool_max = \"99999999999GiB\"\n",
            "agent: spool_max \"99999999999GiB\": expected a size",
        );
        // Out of the field's integer type: TOML's own message, with the line.
        check(
            "[agent]\nretries = -1\n",
            "line 2, column 11: invalid value: integer `-1`",
        );
        check("[kafka]\nreplication_factor = 40000\n", "line 2, column 22");
    }
}
