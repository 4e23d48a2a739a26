//! The check record: one per probe, the Kafka message value, one row in PostgreSQL.
//!
//! This module owns the record's shape and its JSON form (schema version [`SCHEMA_VERSION`]).
//! Everything downstream (stdout, the spool, Kafka, the sink) moves these bytes unchanged, so a
//! field added here is a field added everywhere; a field renamed here is a breaking change that
//! needs a new `v`.

use serde::{Deserialize, Serialize};

/// Version of the JSON record. The sink refuses (dead-letters) records with another version.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a check was not up. `None` in the record means the target was up.
///
/// Serialized in snake_case (`"http_status"`), which is also the PostgreSQL text value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureReason {
    /// The host name did not resolve (or resolved to no address of the wanted family).
    Dns,
    /// TCP connect failed: refused, unreachable, reset during connect.
    Connect,
    /// The TLS handshake failed or the certificate was rejected.
    Tls,
    /// A phase ran past the check's timeout.
    Timeout,
    /// The final status was not in `expect_status`.
    HttpStatus,
    /// `regex` did not match, or `regex_absent` matched.
    BodyMismatch,
    /// The body could not be read to the end (connection reset mid-body, bad chunking).
    BodyRead,
    /// The WASM rule said down, or failed (trap, deadline, bad output, load error).
    Rule,
    /// More redirects than allowed, or a redirect loop.
    TooManyRedirects,
    /// The server spoke something that is not valid HTTP (or a header past the limit).
    Protocol,
    /// An internal error of the agent (a bug); the error text says more.
    Internal,
}

impl FailureReason {
    /// The snake_case name used in JSON and in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Dns => "dns",
            FailureReason::Connect => "connect",
            FailureReason::Tls => "tls",
            FailureReason::Timeout => "timeout",
            FailureReason::HttpStatus => "http_status",
            FailureReason::BodyMismatch => "body_mismatch",
            FailureReason::BodyRead => "body_read",
            FailureReason::Rule => "rule",
            FailureReason::TooManyRedirects => "too_many_redirects",
            FailureReason::Protocol => "protocol",
            FailureReason::Internal => "internal",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Phase timings in milliseconds. A phase that did not happen (no TLS on http://, connect
/// refused before TLS) is `None`, never 0, so averages stay honest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Timings {
    pub dns: Option<f64>,
    pub connect: Option<f64>,
    pub tls: Option<f64>,
    /// Request sent → first byte of the response head.
    pub ttfb: Option<f64>,
    /// First byte of the head → last body byte read.
    pub transfer: Option<f64>,
    /// Start of the check → end of the check (including redirects and rule evaluation).
    pub total: f64,
}

/// One check of one target. See DESIGN.md for the meaning of each field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CheckResult {
    pub v: u32,
    /// Unique per check (UUIDv7 text). The sink inserts with `ON CONFLICT (check_id) DO NOTHING`.
    pub check_id: String,
    /// Stable target id from the config; also the Kafka key.
    pub target: String,
    pub url: String,
    /// Which agent (its `[agent] id`) made the check.
    pub agent: String,
    /// Where the agent probes from (`[agent] location`). Added after v1 without a new `v`:
    /// absent (not `null`) when not set, so records of agents without one are unchanged, and
    /// records without it (older agents) decode as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub agent_version: String,
    /// UTC, RFC 3339 with milliseconds: `2026-11-27T23:59:38.123Z`.
    pub started_at: String,
    pub up: bool,
    pub failure: Option<FailureReason>,
    pub error: Option<String>,
    /// 1 for the first try; retries of the same round count up.
    pub attempt: u32,
    pub method: String,
    pub status: Option<u16>,
    pub http_version: Option<String>,
    pub final_url: Option<String>,
    pub redirects: u32,
    pub remote_ip: Option<String>,
    pub body_bytes: u64,
    pub body_truncated: bool,
    pub timings: Timings,
    pub tls_version: Option<String>,
    /// Leaf certificate notAfter, RFC 3339 UTC.
    pub cert_not_after: Option<String>,
    /// Days (fractional) until the leaf certificate expires; negative when expired.
    pub cert_days_left: Option<f64>,
    pub cert_issuer: Option<String>,
    pub regex: Option<String>,
    pub regex_matched: Option<bool>,
    /// Rule file name, e.g. `status_ok.wasm`.
    pub rule: Option<String>,
    /// First 16 hex digits of the SHA-256 of the module that judged this check.
    pub rule_hash: Option<String>,
    /// `up`, `down`, `unknown` or `error`.
    pub rule_verdict: Option<String>,
    pub rule_reason: Option<String>,
    /// Extra fields of a JSON reason object, stored as they came.
    pub rule_extra: Option<serde_json::Value>,
    /// Wall time the rule took, ms.
    pub rule_ms: Option<f64>,
    pub tags: Vec<String>,
}

impl CheckResult {
    /// A record with identity filled in and every outcome field empty; the probe fills the rest.
    pub fn new(target: &str, url: &str, agent: &str, method: &str) -> CheckResult {
        CheckResult {
            v: SCHEMA_VERSION,
            check_id: crate::util::new_check_id(),
            target: target.to_string(),
            url: url.to_string(),
            agent: agent.to_string(),
            location: None,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: crate::util::rfc3339_now(),
            up: false,
            failure: None,
            error: None,
            attempt: 1,
            method: method.to_string(),
            status: None,
            http_version: None,
            final_url: None,
            redirects: 0,
            remote_ip: None,
            body_bytes: 0,
            body_truncated: false,
            timings: Timings::default(),
            tls_version: None,
            cert_not_after: None,
            cert_days_left: None,
            cert_issuer: None,
            regex: None,
            regex_matched: None,
            rule: None,
            rule_hash: None,
            rule_verdict: None,
            rule_reason: None,
            rule_extra: None,
            rule_ms: None,
            tags: Vec::new(),
        }
    }

    /// Marks the check down with a reason and an error text.
    pub fn fail(&mut self, reason: FailureReason, error: impl Into<String>) {
        self.up = false;
        self.failure = Some(reason);
        self.error = Some(error.into());
    }

    /// The record as one JSON line (no trailing newline).
    pub fn to_json(&self) -> String {
        let bytes = self.to_json_bytes();
        // serde_json writes UTF-8 only; the expect documents that.
        String::from_utf8(bytes).expect("serde_json writes UTF-8")
    }

    /// [`Self::to_json`] as bytes, the form Kafka and stdout take.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // A typical record is 700-900 bytes: one allocation instead of growing from 128.
        let mut out = Vec::with_capacity(1024);
        self.write_json(&mut out)
            .expect("CheckResult serializes into memory");
        out
    }

    /// Writes the JSON line (without newline) straight into `w`.
    pub fn write_json(&self, w: impl std::io::Write) -> std::io::Result<()> {
        // Serializing a struct of plain fields cannot fail except by the writer's own error.
        serde_json::to_writer(w, self).map_err(std::io::Error::from)
    }

    /// Parses and validates a record (used by the sink and the spool). The error text names the
    /// problem; the sink stores it with the dead letter.
    pub fn from_json(bytes: &[u8]) -> Result<CheckResult, String> {
        let record: CheckResult =
            serde_json::from_slice(bytes).map_err(|e| format!("not a check record: {e}"))?;
        if record.v != SCHEMA_VERSION {
            return Err(format!(
                "unsupported record version v={} (this sink reads v={SCHEMA_VERSION})",
                record.v
            ));
        }
        if record.check_id.is_empty() || record.target.is_empty() {
            return Err("check_id and target must not be empty".to_string());
        }
        if crate::util::parse_rfc3339_ms(&record.started_at).is_none() {
            return Err(format!(
                "started_at {:?} is not RFC 3339 UTC",
                record.started_at
            ));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_field() {
        let mut r = CheckResult::new("shop", "https://shop.example/", "eu-1", "GET");
        r.fail(FailureReason::HttpStatus, "status 503");
        r.status = Some(503);
        r.timings.total = 12.5;
        r.rule_extra = Some(serde_json::json!({"db": "slow"}));
        let line = r.to_json();
        assert!(line.contains(r#""failure":"http_status""#), "{line}");
        assert_eq!(CheckResult::from_json(line.as_bytes()).unwrap(), r);
    }

    #[test]
    fn location_round_trips_and_records_without_it_decode() {
        let mut r = CheckResult::new("shop", "https://shop.example/", "eu-1", "GET");
        let without = r.to_json();
        assert!(!without.contains("location"), "{without}");
        assert_eq!(CheckResult::from_json(without.as_bytes()).unwrap(), r);
        r.location = Some("eu-west".into());
        let with = r.to_json();
        assert!(
            with.contains(r#""agent":"eu-1","location":"eu-west""#),
            "{with}"
        );
        assert_eq!(CheckResult::from_json(with.as_bytes()).unwrap(), r);
        // A record as an agent before `location` wrote it (v1, every other field present).
        let old = r#"{"v":1,"check_id":"0190c0de-0000-7000-8000-000000000001","target":"shop",
            "url":"https://shop.example/","agent":"eu-1","agent_version":"0.1.0",
            "started_at":"2026-11-27T23:59:38.123Z","up":true,"failure":null,"error":null,
            "attempt":1,"method":"GET","status":200,"http_version":"HTTP/1.1","final_url":null,
            "redirects":0,"remote_ip":"127.0.0.1","body_bytes":5,"body_truncated":false,
            "timings":{"dns":null,"connect":0.2,"tls":null,"ttfb":1.0,"transfer":0.1,"total":1.5},
            "tls_version":null,"cert_not_after":null,"cert_days_left":null,"cert_issuer":null,
            "regex":null,"regex_matched":null,"rule":null,"rule_hash":null,"rule_verdict":null,
            "rule_reason":null,"rule_extra":null,"rule_ms":null,"tags":[]}"#;
        let decoded = CheckResult::from_json(old.as_bytes()).unwrap();
        assert_eq!((decoded.location, decoded.status), (None, Some(200)));
    }

    #[test]
    fn from_json_rejects_bad_records() {
        let check = |input: &str, expected: &str| {
            let err = CheckResult::from_json(input.as_bytes()).unwrap_err();
            assert!(
                err.contains(expected),
                "{input:?}: got {err:?}, want {expected:?}"
            );
        };
        check("not json", "not a check record");
        check("{}", "missing field");
        let mut r = CheckResult::new("t", "http://x/", "a", "GET");
        r.v = 99;
        check(&r.to_json(), "unsupported record version v=99");
        r.v = 1;
        r.started_at = "yesterday".into();
        check(&r.to_json(), "started_at");
    }
}
