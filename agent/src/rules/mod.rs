//! Rules that decide whether a response is "up": the per-target regexes (compiled by
//! [`crate::config`]) and drop-in WASM rules ([`RuleSet`]).
//!
//! The WASM engine lives in `wasm.rs` behind the `wasm` cargo feature. Without the feature a
//! [`RuleSet`] loads nothing and every evaluation is a rule error (config validation already
//! refuses targets that name a rule in that build).

use std::path::Path;

use crate::config::RulesConfig;

/// What a rule sees of one check. Mirrors the ABI record in `rules/README.md`.
#[derive(Debug, Clone, Copy)]
pub struct RuleInput<'a> {
    /// HTTP status; 0 when the request failed before a response.
    pub status: u16,
    pub elapsed_ms: u32,
    pub body_truncated: bool,
    pub tls: bool,
    pub url: &'a str,
    /// Response headers, names lower-cased.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
    /// Transport error text when the request failed.
    pub error: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Up,
    Down,
    /// Defer to the regex / status check.
    Unknown,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Up => "up",
            Verdict::Down => "down",
            Verdict::Unknown => "unknown",
        }
    }
}

/// A rule's answer for one check.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleOutcome {
    pub verdict: Verdict,
    pub reason: Option<String>,
    /// Extra fields when the rule wrote a JSON object as its reason.
    pub extra: Option<serde_json::Value>,
    /// First 16 hex digits of the module's SHA-256.
    pub hash: String,
    pub elapsed_ms: f64,
}

/// A rule failed to give a verdict: the check records `failure = "rule"` with this text.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleError {
    pub rule: String,
    pub hash: Option<String>,
    pub message: String,
    pub elapsed_ms: f64,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rule {}: {}", self.rule, self.message)
    }
}

impl std::error::Error for RuleError {}

/// The loaded rules, shared by all worker threads (cheap to clone). Reload swaps modules
/// atomically; a broken new file keeps the old version serving.
#[derive(Clone, Default)]
pub struct RuleSet {
    #[cfg(feature = "wasm")]
    #[allow(dead_code)] // filled by the WASM engine
    inner: Option<std::sync::Arc<wasm::Engine>>,
}

impl RuleSet {
    /// Loads every rule named in `names` from `cfg.dir`. A rule that fails to load is logged and
    /// remembered as an error: targets using it record `failure = "rule"`; the agent goes on.
    pub fn load(cfg: &RulesConfig, names: &[&str]) -> RuleSet {
        let _ = (cfg, names);
        RuleSet::default()
    }

    /// Re-reads the rules directory (SIGHUP). Changed files are recompiled; broken ones keep
    /// the previous version.
    pub fn reload(&self, names: &[&str]) {
        let _ = names;
    }

    /// Runs rule `name` on one response, within the deadline and memory limit.
    pub fn evaluate(&self, name: &str, input: &RuleInput<'_>) -> Result<RuleOutcome, RuleError> {
        let _ = input;
        Err(RuleError {
            rule: name.to_string(),
            hash: None,
            message: "WASM rules are not available in this build (feature `wasm` is off)".into(),
            elapsed_ms: 0.0,
        })
    }

    /// The directory rules are read from, for messages.
    pub fn describe(dir: &Path) -> String {
        dir.display().to_string()
    }
}

#[cfg(feature = "wasm")]
pub mod wasm;
