//! Rules that decide whether a response is "up": the per-target regexes (compiled by
//! [`crate::config`]) and drop-in WASM rules ([`RuleSet`]).
//!
//! The WASM engine lives in `wasm.rs` behind the `wasm` cargo feature; the ABI it speaks is
//! written down in `rules/README.md`. `cli.rs` is `sitewatch rule test`. Without the feature a
//! [`RuleSet`] loads nothing and every evaluation is a rule error saying so (config validation
//! already refuses targets that name a rule in that build).
//!
//! Architecture invariants: a rule cannot run longer than `rules.deadline` (plus one epoch
//! tick) nor use more than `rules.memory_limit`; a rule that fails to load or to run is a
//! [`RuleError`] for the checks that use it and never stops the agent; a reload never leaves a
//! target without the last good version of its rule.

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

/// Response headers as rules see them: names lower-cased, values as (lossy) UTF-8 text.
pub fn header_pairs(headers: &ureq::http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// The loaded rules, shared by all worker threads (cheap to clone). Reload swaps modules
/// atomically; a broken new file keeps the old version serving.
///
/// The WASM engine (and its `rule-epoch` thread) starts only once some target names a rule:
/// an agent with regex-only targets never pays for it (about 2 MB of RSS in `bench/run`
/// section 6). A SIGHUP that adds the first rule starts it then.
#[derive(Clone, Default)]
pub struct RuleSet {
    /// `None` for [`RuleSet::default`]: `load` was never called.
    #[cfg(feature = "wasm")]
    inner: Option<std::sync::Arc<LazyEngine>>,
}

#[cfg(feature = "wasm")]
struct LazyEngine {
    cfg: RulesConfig,
    /// The engine, or why it did not start (then every evaluation is a rule error saying so).
    engine: std::sync::OnceLock<Result<std::sync::Arc<wasm::Engine>, std::sync::Arc<str>>>,
}

#[cfg(feature = "wasm")]
impl LazyEngine {
    fn start(&self) -> &Result<std::sync::Arc<wasm::Engine>, std::sync::Arc<str>> {
        self.engine.get_or_init(|| {
            wasm::Engine::new(&self.cfg).map_err(|e| {
                log::error!("rules: {e}; every target with a rule records failure \"rule\"");
                e.into()
            })
        })
    }
}

#[cfg(not(feature = "wasm"))]
const NO_WASM: &str = "WASM rules are not available in this build (feature `wasm` is off)";

impl RuleSet {
    /// Loads every rule named in `names` from `cfg.dir`. A rule that fails to load is logged and
    /// remembered as an error: targets using it record `failure = "rule"`; the agent goes on.
    pub fn load(cfg: &RulesConfig, names: &[&str]) -> RuleSet {
        #[cfg(feature = "wasm")]
        {
            let rules = RuleSet {
                inner: Some(std::sync::Arc::new(LazyEngine {
                    cfg: cfg.clone(),
                    engine: std::sync::OnceLock::new(),
                })),
            };
            rules.reload(names);
            rules
        }
        #[cfg(not(feature = "wasm"))]
        {
            if !names.is_empty() {
                log::error!("rules in {}: {NO_WASM}", cfg.dir.display());
            }
            RuleSet::default()
        }
    }

    /// Re-reads the named rules (SIGHUP) on the caller's thread. Files whose content hash
    /// changed are recompiled and swapped in atomically; a broken new file is logged and the
    /// previous version keeps serving; names no longer listed are dropped.
    pub fn reload(&self, names: &[&str]) {
        #[cfg(feature = "wasm")]
        if let Some(lazy) = &self.inner {
            // No rule named and no engine yet: nothing to load, nothing to drop.
            let engine = if names.is_empty() {
                lazy.engine.get()
            } else {
                Some(lazy.start())
            };
            if let Some(Ok(engine)) = engine {
                engine.reload(names);
            }
        }
        let _ = names;
    }

    /// Whether the WASM engine is running (it starts when the first rule is named).
    pub fn engine_started(&self) -> bool {
        #[cfg(feature = "wasm")]
        if let Some(lazy) = &self.inner {
            return matches!(lazy.engine.get(), Some(Ok(_)));
        }
        false
    }

    /// Polls the named rule files every `every` on a thread named `rule-watch` and reloads
    /// what changed (by content hash: rules are a few KB, so reading them is cheaper than
    /// trusting mtimes, which in-place copies may keep). A broken file is logged once. The
    /// thread ends when `stop` is set (checked every `every`).
    pub fn watch(
        &self,
        names: Vec<String>,
        every: std::time::Duration,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let rules = self.clone();
        std::thread::Builder::new()
            .name("rule-watch".into())
            .spawn(move || {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(every);
                    rules.reload(&names);
                }
            })
    }

    /// Runs rule `name` on one response, within the deadline and memory limit.
    pub fn evaluate(&self, name: &str, input: &RuleInput<'_>) -> Result<RuleOutcome, RuleError> {
        let start = std::time::Instant::now();
        #[cfg(feature = "wasm")]
        let result = self.engine(name).and_then(|e| e.evaluate(name, input));
        #[cfg(not(feature = "wasm"))]
        let result = Err((None, NO_WASM.to_string()));
        let _ = input;
        result.map_err(|(hash, message)| rule_error(name, hash, message, start))
    }

    /// Whether rule `name` is ready to serve: its module hash, or the load error the targets
    /// using it will record.
    pub fn loaded(&self, name: &str) -> Result<String, RuleError> {
        let start = std::time::Instant::now();
        #[cfg(feature = "wasm")]
        let result = self
            .engine(name)
            .and_then(|e| e.loaded(name).map(|rule| rule.hash.clone()));
        #[cfg(not(feature = "wasm"))]
        let result = Err((None, NO_WASM.to_string()));
        result.map_err(|(hash, message)| rule_error(name, hash, message, start))
    }

    /// The running engine, or the error an evaluation of `name` records without one.
    #[cfg(feature = "wasm")]
    fn engine(&self, name: &str) -> Result<&wasm::Engine, (Option<String>, String)> {
        let Some(lazy) = &self.inner else {
            return Err((
                None,
                "no rules were loaded (RuleSet::load was not called)".into(),
            ));
        };
        match lazy.engine.get() {
            Some(Ok(engine)) => Ok(engine),
            Some(Err(e)) => Err((None, e.to_string())),
            None => Err((None, wasm::not_loaded(name))),
        }
    }

    /// The directory rules are read from, for messages.
    pub fn describe(dir: &Path) -> String {
        dir.display().to_string()
    }
}

pub mod cli;

fn rule_error(
    name: &str,
    hash: Option<String>,
    message: String,
    start: std::time::Instant,
) -> RuleError {
    RuleError {
        rule: name.to_string(),
        hash,
        message,
        elapsed_ms: crate::util::ms(start.elapsed()),
    }
}
#[cfg(feature = "wasm")]
pub mod wasm;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_rules_every_evaluation_is_a_clear_rule_error() {
        let rules = RuleSet::default();
        let input = RuleInput {
            status: 200,
            elapsed_ms: 1,
            body_truncated: false,
            tls: false,
            url: "http://127.0.0.1/",
            headers: &[],
            body: b"",
            error: None,
        };
        let err = rules.evaluate("x.wasm", &input).unwrap_err();
        assert_eq!(err.rule, "x.wasm");
        assert_eq!(err.hash, None);
        let expected = if cfg!(feature = "wasm") {
            "no rules were loaded"
        } else {
            "feature `wasm` is off"
        };
        assert!(err.message.contains(expected), "{}", err.message);
        assert_eq!(rules.loaded("x.wasm").unwrap_err().message, err.message);
    }
}
