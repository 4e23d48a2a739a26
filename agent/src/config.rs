//! Configuration: `agent.toml` → [`RawConfig`] (serde, as written) → [`Config`] (validated,
//! typed, what the program runs on).
//!
//! This module owns every default, every environment override and every config error message.
//! Nothing else reads the file or the `SITEWATCH_*` environment. Errors name the file, the
//! line and column where TOML gives one, the target and the field, so a typo never starts an
//! agent that silently ignores it (`deny_unknown_fields` everywhere).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::util::{format_duration, parse_duration};

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
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub id: Option<String>,
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

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTargetTls {
    pub ca_file: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Typed form.

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for messages and reload).
    pub source: PathBuf,
    pub agent: AgentConfig,
    /// `None` when the file has no `[kafka]` section and no `SITEWATCH_KAFKA_BROKERS`.
    pub kafka: Option<KafkaConfig>,
    pub postgres: Option<PostgresConfig>,
    pub rules: RulesConfig,
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: String,
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
    pub compression: Compression,
    pub tls: Option<KafkaTls>,
    pub sasl: Option<Sasl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
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

#[derive(Clone, Debug, PartialEq)]
pub struct PostgresConfig {
    /// Connection URL with any password removed (safe to print).
    pub url: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    pub ca_file: Option<PathBuf>,
    /// Check partitions older than this are dropped by the sink.
    pub retention: Duration,
    pub batch_size: usize,
}

#[derive(Clone, Debug)]
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

/// Accepted statuses: a list of single codes and inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSet(pub Vec<(u16, u16)>);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl fmt::Display for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    pub id: String,
    pub url: String,
    pub method: String,
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

// ---------------------------------------------------------------------------------------------
// Defaults.

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONCURRENCY: usize = 16;
pub const DEFAULT_BODY_CAP: usize = 1024 * 1024;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sitewatch";
pub const DEFAULT_SPOOL_MAX: u64 = 256 * 1024 * 1024;
pub const DEFAULT_TOPIC: &str = "sitewatch.checks";
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.clone(),
            message: toml_error_message(text, &e),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Validator {
            file,
            base,
            env,
            regexes: RefCell::new(HashMap::new()),
        }
        .build(raw, path)
    }

    pub fn target(&self, id: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.id == id)
    }
}

/// `line 3, column 5: unknown field `intervall`, expected one of ...`
fn toml_error_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
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

struct Validator<'a> {
    file: String,
    base: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Compiled regexes by pattern. Fleets of targets tend to share a few patterns: each is
    /// compiled once and shared through an `Arc`, so the targets also share its pool of
    /// per-thread scratch caches. (A `Regex::clone` would get a pool of its own: one cache
    /// built and kept per target, measured with callgrind.)
    regexes: RefCell<HashMap<String, Arc<Regex>>>,
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

    fn build(&self, raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let agent = self.agent(&raw.agent)?;
        let kafka = self.kafka(raw.kafka.as_ref())?;
        let postgres = self.postgres(raw.postgres.as_ref())?;
        let rules = self.rules(&raw.rules)?;
        let mut targets = Vec::with_capacity(raw.targets.len());
        let mut seen = HashSet::new();
        for (i, t) in raw.targets.iter().enumerate() {
            let target = self.target(i, t, &agent)?;
            if !seen.insert(target.id.clone()) {
                return Err(self.err(format!("target {:?}: duplicate id", target.id)));
            }
            targets.push(target);
        }
        Ok(Config {
            source: path.to_path_buf(),
            agent,
            kafka,
            postgres,
            rules,
            targets,
        })
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
            Some(v) => self.size(ctx, "spool_max", v)?,
            None => DEFAULT_SPOOL_MAX,
        };
        let drain_timeout = match &raw.drain_timeout {
            Some(v) => self.duration(ctx, "drain_timeout", v)?,
            None => timeout + Duration::from_secs(5),
        };
        Ok(AgentConfig {
            id,
            interval,
            timeout,
            concurrency,
            jitter,
            body_cap,
            user_agent,
            retries: raw.retries.unwrap_or(0).min(10),
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
        let compression = match raw.compression.as_deref().unwrap_or("none") {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            other => {
                return Err(self.err(format!(
                    "kafka: compression {other:?}: expected \"none\" or \"gzip\""
                )));
            }
        };
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
        let tls = if raw.tls.is_some() || ca.is_some() || cert.is_some() || key.is_some() {
            if cert.is_some() != key.is_some() {
                return Err(self.err("kafka: tls: cert_file and key_file go together"));
            }
            Some(KafkaTls {
                ca_file: ca.as_deref().map(|p| self.path(p)),
                cert_file: cert.as_deref().map(|p| self.path(p)),
                key_file: key.as_deref().map(|p| self.path(p)),
                verify_hostname: raw_tls.verify_hostname.unwrap_or(true),
            })
        } else {
            None
        };
        let raw_sasl = raw.sasl.clone().unwrap_or_default();
        let username = self
            .env("SITEWATCH_KAFKA_SASL_USERNAME")
            .or(raw_sasl.username.clone());
        let sasl = if raw.sasl.is_some() || username.is_some() {
            let mechanism = match self
                .env("SITEWATCH_KAFKA_SASL_MECHANISM")
                .or(raw_sasl.mechanism.clone())
                .unwrap_or_else(|| "SCRAM-SHA-512".into())
                .to_ascii_uppercase()
                .as_str()
            {
                "PLAIN" => SaslMechanism::Plain,
                "SCRAM-SHA-256" => SaslMechanism::ScramSha256,
                "SCRAM-SHA-512" => SaslMechanism::ScramSha512,
                other => {
                    return Err(self.err(format!(
                        "kafka: sasl: mechanism {other:?}: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                    )));
                }
            };
            let username = username.ok_or_else(|| self.err("kafka: sasl: username: missing"))?;
            let password = match (
                self.env("SITEWATCH_KAFKA_SASL_PASSWORD"),
                &raw_sasl.password_file,
                &raw_sasl.password,
            ) {
                (Some(p), _, _) => p,
                (None, Some(f), _) => read_secret_file(&self.path(f))
                    .map_err(|e| self.err(format!("kafka: sasl: password_file {f:?}: {e}")))?,
                (None, None, Some(p)) => p.clone(),
                (None, None, None) => {
                    return Err(self.err(
                        "kafka: sasl: password: missing (set SITEWATCH_KAFKA_SASL_PASSWORD or password_file)",
                    ));
                }
            };
            Some(Sasl {
                mechanism,
                username,
                password: Secret(password),
            })
        } else {
            None
        };
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
            compression,
            tls,
            sasl,
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
            split_password(&url).map_err(|e| self.err(format!("postgres: url: {e}")))?;
        let password = match (self.env("SITEWATCH_PG_PASSWORD"), &raw.password_file) {
            (Some(p), _) => Some(p),
            (None, Some(f)) => Some(
                read_secret_file(&self.path(f))
                    .map_err(|e| self.err(format!("postgres: password_file {f:?}: {e}")))?,
            ),
            (None, None) => inline_password,
        };
        let sslmode_text = self
            .env("SITEWATCH_PG_SSLMODE")
            .or(raw.sslmode.clone())
            .unwrap_or_else(|| "prefer".into());
        let sslmode = match sslmode_text.as_str() {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(self.err(format!(
                    "postgres: sslmode {other:?}: expected disable, prefer, require, verify-ca or verify-full"
                )));
            }
        };
        let ca_file = self
            .env("SITEWATCH_PG_CA_FILE")
            .or(raw.ca_file.clone())
            .map(|p| self.path(&p));
        let retention = match &raw.retention {
            Some(v) => self.positive_duration("postgres: ", "retention", v)?,
            None => Duration::from_secs(90 * 86_400),
        };
        let batch_size = raw.batch_size.unwrap_or(5000);
        if !(1..=100_000).contains(&batch_size) {
            return Err(self.err(format!(
                "postgres: batch_size {batch_size}: expected 1 to 100000"
            )));
        }
        Ok(Some(PostgresConfig {
            url,
            password: password.map(Secret),
            sslmode,
            ca_file,
            retention,
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
        validate_url(&url).map_err(|e| self.err(format!("{ctx}url {url:?}: {e}")))?;
        let method = raw
            .method
            .clone()
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase();
        if !["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"].contains(&method.as_str())
        {
            return Err(self.err(format!(
                "{ctx}method {method:?}: expected GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS"
            )));
        }
        let mut headers = Vec::new();
        for (name, value) in &raw.headers {
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
        let interval = match &raw.interval {
            Some(v) => self.positive_duration(&ctx, "interval", v)?,
            None => agent.interval,
        };
        let timeout = match &raw.timeout {
            Some(v) => self.positive_duration(&ctx, "timeout", v)?,
            None => agent.timeout,
        };
        let expect_status = match &raw.expect_status {
            None => StatusSet(vec![(200, 399)]),
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
        Ok(Target {
            id,
            url,
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
            retries: raw.retries.unwrap_or(agent.retries).min(10),
            tls_ca_file,
            tls_insecure,
            tags: raw.tags.clone(),
        })
    }

    fn regex(&self, ctx: &str, field: &str, pattern: &str) -> Result<Arc<Regex>, ConfigError> {
        if let Some(re) = self.regexes.borrow().get(pattern) {
            return Ok(re.clone());
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
        self.regexes
            .borrow_mut()
            .insert(pattern.to_string(), re.clone());
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
        Ok(StatusSet(out))
    }
}

/// `http://` or `https://` with a host; nothing else is probed.
fn validate_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("expected an http:// or https:// URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    if host.is_empty() || host.starts_with(':') {
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

/// Splits `postgres://user:secret@host/db` into the URL without the password and the password.
fn split_password(url: &str) -> Result<(String, Option<String>), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        // Never echo the value: it may hold a password.
        return Err("expected a postgres:// or postgresql:// URL".into());
    }
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, pass)) => Ok((
                format!(
                    "{}{user}@{host}{}",
                    &url[..scheme_end],
                    &rest[authority_end..]
                ),
                Some(percent_decode(pass)),
            )),
            None => Ok((url.to_string(), None)),
        },
        None => Ok((url.to_string(), None)),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// The effective config, printed by `check-config` (secrets masked).

impl Config {
    /// The effective configuration as TOML-like text, with every default filled in and every
    /// secret masked.
    pub fn effective(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let a = &self.agent;
        let _ = writeln!(
            s,
            "# effective configuration from {}",
            self.source.display()
        );
        let _ = writeln!(s, "[agent]");
        let _ = writeln!(s, "id = {:?}", a.id);
        let _ = writeln!(s, "interval = {:?}", format_duration(a.interval));
        let _ = writeln!(s, "timeout = {:?}", format_duration(a.timeout));
        let _ = writeln!(s, "concurrency = {}", a.concurrency);
        let jitter = match a.jitter {
            Jitter::Fraction(f) => format!("{}%", f * 100.0),
            Jitter::Fixed(d) => format_duration(d),
        };
        let _ = writeln!(s, "jitter = {jitter:?}");
        let _ = writeln!(s, "body_cap = \"{}B\"", a.body_cap);
        let _ = writeln!(s, "user_agent = {:?}", a.user_agent);
        let _ = writeln!(s, "retries = {}", a.retries);
        let _ = writeln!(s, "retry_delay = {:?}", format_duration(a.retry_delay));
        let _ = writeln!(s, "state_dir = {:?}", a.state_dir.display().to_string());
        let _ = writeln!(s, "spool_max = \"{}B\"", a.spool_max_bytes);
        let _ = writeln!(s, "drain_timeout = {:?}", format_duration(a.drain_timeout));
        if let Some(k) = &self.kafka {
            let _ = writeln!(s, "\n[kafka]");
            let _ = writeln!(s, "brokers = {:?}", k.brokers);
            let _ = writeln!(s, "topic = {:?}", k.topic);
            let _ = writeln!(s, "client_id = {:?}", k.client_id);
            let _ = writeln!(s, "create_topic = {}", k.create_topic);
            let _ = writeln!(s, "partitions = {}", k.partitions);
            let _ = writeln!(s, "replication_factor = {}", k.replication_factor);
            let _ = writeln!(s, "linger = {:?}", format_duration(k.linger));
            let _ = writeln!(s, "batch_max = \"{}B\"", k.batch_max_bytes);
            let _ = writeln!(
                s,
                "request_timeout = {:?}",
                format_duration(k.request_timeout)
            );
            let c = if k.compression == Compression::Gzip {
                "gzip"
            } else {
                "none"
            };
            let _ = writeln!(s, "compression = {c:?}");
            if let Some(t) = &k.tls {
                let _ = writeln!(
                    s,
                    "tls = {{ ca_file = {:?}, cert_file = {:?}, key_file = {:?}, verify_hostname = {} }}",
                    t.ca_file.as_ref().map(|p| p.display().to_string()),
                    t.cert_file.as_ref().map(|p| p.display().to_string()),
                    t.key_file.as_ref().map(|p| p.display().to_string()),
                    t.verify_hostname
                );
            }
            if let Some(sasl) = &k.sasl {
                let _ = writeln!(
                    s,
                    "sasl = {{ mechanism = \"{:?}\", username = {:?}, password = {} }}",
                    sasl.mechanism, sasl.username, sasl.password
                );
            }
        }
        if let Some(p) = &self.postgres {
            let _ = writeln!(s, "\n[postgres]");
            let _ = writeln!(s, "url = {:?}", p.url);
            let _ = writeln!(s, "password = {}", p.password.clone().unwrap_or_default());
            let _ = writeln!(s, "sslmode = \"{:?}\"", p.sslmode);
            if let Some(ca) = &p.ca_file {
                let _ = writeln!(s, "ca_file = {:?}", ca.display().to_string());
            }
            let _ = writeln!(s, "retention = {:?}", format_duration(p.retention));
            let _ = writeln!(s, "batch_size = {}", p.batch_size);
        }
        let r = &self.rules;
        let _ = writeln!(s, "\n[rules]");
        let _ = writeln!(s, "dir = {:?}", r.dir.display().to_string());
        let _ = writeln!(s, "deadline = {:?}", format_duration(r.deadline));
        let _ = writeln!(s, "memory_limit = \"{}B\"", r.memory_limit);
        if let Some(f) = r.fuel {
            let _ = writeln!(s, "fuel = {f}");
        }
        for t in &self.targets {
            let _ = writeln!(s, "\n[[target]]");
            let _ = writeln!(s, "id = {:?}", t.id);
            let _ = writeln!(s, "url = {:?}", t.url);
            let _ = writeln!(s, "method = {:?}", t.method);
            for (k, v) in &t.headers {
                // Header values often carry tokens: show only the names.
                let masked = if is_sensitive_header(k) {
                    "********"
                } else {
                    v.as_str()
                };
                let _ = writeln!(s, "headers.{k:?} = {masked:?}");
            }
            let _ = writeln!(s, "interval = {:?}", format_duration(t.interval));
            let _ = writeln!(s, "timeout = {:?}", format_duration(t.timeout));
            let _ = writeln!(s, "expect_status = \"{}\"", t.expect_status);
            if let Some(re) = &t.regex {
                let _ = writeln!(s, "regex = {:?}", re.as_str());
            }
            if let Some(re) = &t.regex_absent {
                let _ = writeln!(s, "regex_absent = {:?}", re.as_str());
            }
            if let Some(rule) = &t.rule {
                let _ = writeln!(s, "rule = {rule:?}");
            }
            let _ = writeln!(s, "follow_redirects = {}", t.follow_redirects);
            let _ = writeln!(s, "max_redirects = {}", t.max_redirects);
            let _ = writeln!(s, "ip = \"{:?}\"", t.ip);
            let _ = writeln!(s, "keep_alive = {}", t.keep_alive);
            let _ = writeln!(s, "retries = {}", t.retries);
            if t.tls_insecure || t.tls_ca_file.is_some() {
                let _ = writeln!(
                    s,
                    "tls = {{ ca_file = {:?}, insecure_skip_verify = {} }}",
                    t.tls_ca_file.as_ref().map(|p| p.display().to_string()),
                    t.tls_insecure
                );
            }
            if !t.tags.is_empty() {
                let _ = writeln!(s, "tags = {:?}", t.tags);
            }
        }
        s
    }
}

/// Header names whose values are credentials.
pub fn is_sensitive_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "authorization"
        || n == "cookie"
        || n == "proxy-authorization"
        || n.contains("token")
        || n.contains("api-key")
        || n.contains("secret")
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
    }
}
