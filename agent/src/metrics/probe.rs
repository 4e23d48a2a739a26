//! `GET /probe?target=URL&module=NAME`: one check now, answered in blackbox_exporter's form,
//! so a Prometheus scrape config written for blackbox_exporter works after changing only the
//! address.
//!
//! Bounded three ways: a target must be a configured target's URL or start with a
//! `probe_allow` prefix (the endpoint cannot be used to make the agent fetch arbitrary
//! addresses); at most `probe_concurrency` checks run at once (one more is answered 503); and
//! the check's timeout is the module's, shortened to the scrape's
//! `X-Prometheus-Scrape-Timeout-Seconds` minus half a second, as blackbox_exporter does.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, MetricsConfig, Target};
use crate::httpd::Slot;
use crate::probe::Prober;

use super::ProbeView;
use super::expo::Exposition;

/// blackbox_exporter's default `--timeout-offset`: the answer must be back before Prometheus
/// gives up on the scrape.
const TIMEOUT_OFFSET: f64 = 0.5;
/// The module blackbox_exporter uses when the request names none.
const DEFAULT_MODULE: &str = "http_2xx";
/// A scrape timeout shorter than this after the offset is refused rather than run into a
/// certain timeout.
const MIN_TIMEOUT: Duration = Duration::from_millis(10);

/// What the endpoint checks with; replaced as a whole on reload.
struct Setup {
    prober: Arc<Prober>,
    /// The configured targets' URLs: always allowed.
    target_urls: Vec<String>,
    metrics: MetricsConfig,
    /// The template when the request names no module and none is called `http_2xx`: the
    /// agent's defaults.
    default: Target,
}

/// The `/probe` handler, shared by the listener's connection threads.
#[derive(Default)]
pub struct ProbeEndpoint {
    /// `None` until the agent hands over its config and prober.
    setup: Mutex<Option<Arc<Setup>>>,
    running: AtomicUsize,
}

/// A refused `/probe` request: the status and the text to answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

impl ProbeEndpoint {
    /// An endpoint that answers 503 until [`ProbeEndpoint::update`] gives it a config.
    pub fn new() -> ProbeEndpoint {
        ProbeEndpoint::default()
    }

    /// At start and after each reload: the targets, modules, allow-list and prober to use.
    /// Checks running keep the old ones.
    pub fn update(&self, cfg: &Config, prober: Arc<Prober>) {
        *self.setup.lock().unwrap_or_else(|e| e.into_inner()) =
            Setup::of(cfg, prober).map(Arc::new);
    }

    /// Runs one check for the query string `query` and returns the exposition text.
    /// `scrape_timeout` is the value of `X-Prometheus-Scrape-Timeout-Seconds`, if sent.
    pub fn probe(&self, query: &str, scrape_timeout: Option<&str>) -> Result<String, Refusal> {
        let setup = (self.setup.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .ok_or_else(|| refuse(503, "the agent is not probing yet"))?;
        let (target, module) = parse_query(query);
        let target = target.ok_or_else(|| refuse(400, "Target parameter is missing"))?;
        let mut template = match module.as_deref().unwrap_or(DEFAULT_MODULE) {
            name if setup.metrics.modules.contains_key(name) => setup.metrics.modules[name].clone(),
            DEFAULT_MODULE if module.is_none() => setup.default.clone(),
            name => return Err(refuse(400, format!("Unknown module {name:?}"))),
        };
        if !setup.allows(&target) {
            return Err(refuse(
                403,
                "target not allowed: it is neither a configured target's URL nor under a \
                 [metrics] probe_allow prefix",
            ));
        }
        let timeout = timeout(template.timeout, scrape_timeout)?;
        template.url = target;
        template.timeout = timeout;
        // One attempt: retries would outlive the scrape's deadline.
        template.retries = 0;

        let _slot = Slot::take(&self.running, setup.metrics.probe_concurrency)
            .ok_or_else(|| refuse(503, "too many /probe checks at once (probe_concurrency)"))?;
        let record = setup.prober.check(&template);
        let view = ProbeView::of(&record);
        let mut e = Exposition::default();
        super::write_probe_families(&mut e, &[(&[], &view)]);
        let name = "probe_timeout_seconds";
        e.family(
            name,
            "gauge",
            "Returns how long the probe timeout is in seconds",
        );
        e.sample(name, &[], timeout.as_secs_f64());
        Ok(e.text)
    }
}

impl Setup {
    fn of(cfg: &Config, prober: Arc<Prober>) -> Option<Setup> {
        let metrics = cfg.metrics.clone()?;
        let spec = crate::config::TargetSpec {
            method: "GET",
            headers: Vec::new(),
            body: None,
            interval: cfg.agent.interval,
            timeout: cfg.agent.timeout,
            expect_status: crate::config::StatusSet(std::borrow::Cow::Borrowed(&[(200, 299)])),
            regex: None,
            regex_absent: None,
            rule: None,
            follow_redirects: true,
            max_redirects: 10,
            ip: crate::config::IpFamily::Any,
            keep_alive: false,
            retries: 0,
            tls_ca_file: None,
            tls_insecure: false,
            tags: Vec::new(),
        };
        let default = Target {
            id: DEFAULT_MODULE.into(),
            url: String::new(),
            spec: Arc::new(spec),
        };
        Some(Setup {
            prober,
            target_urls: cfg.targets.iter().map(|t| t.url.clone()).collect(),
            metrics,
            default,
        })
    }

    fn allows(&self, url: &str) -> bool {
        // Prefixes end their host with `/` (config checks), so matching text is enough; a URL
        // with user-info or a `..` path could not reach past its own host either.
        self.target_urls.iter().any(|u| u == url)
            || self
                .metrics
                .probe_allow
                .iter()
                .any(|p| url.starts_with(p.as_str()))
    }
}

/// The check's timeout: the module's, or the scrape's minus the offset when that is shorter.
fn timeout(module: Duration, scrape: Option<&str>) -> Result<Duration, Refusal> {
    let Some(text) = scrape else {
        return Ok(module);
    };
    let secs: f64 = text.trim().parse().map_err(|_| {
        refuse(
            400,
            format!("Failed to parse timeout from Prometheus header: {text:?}"),
        )
    })?;
    if !secs.is_finite() || secs <= 0.0 {
        return Ok(module);
    }
    let limit = Duration::from_secs_f64((secs - TIMEOUT_OFFSET).max(0.0));
    if limit < MIN_TIMEOUT {
        return Err(refuse(
            400,
            format!("scrape timeout {secs}s leaves no time to check"),
        ));
    }
    Ok(module.min(limit))
}

/// `target` and `module` from a query string, percent-decoded (`+` is a space).
fn parse_query(query: &str) -> (Option<String>, Option<String>) {
    let (mut target, mut module) = (None, None);
    for (key, value) in crate::httpd::query_pairs(query) {
        match key {
            "target" if !value.is_empty() => target = Some(value),
            "module" if !value.is_empty() => module = Some(value),
            _ => {}
        }
    }
    (target, module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_decoded() {
        let check = |q: &str, t: Option<&str>, m: Option<&str>| {
            let (target, module) = parse_query(q);
            assert_eq!((target.as_deref(), module.as_deref()), (t, m), "{q}");
        };
        check(
            "target=http%3A%2F%2Fa%2Fx%3Fy%3D1&module=http_2xx",
            Some("http://a/x?y=1"),
            Some("http_2xx"),
        );
        check(
            "module=m+1&target=http://a/",
            Some("http://a/"),
            Some("m 1"),
        );
        check("target=&x=1", None, None);
        check("", None, None);
    }

    #[test]
    fn scrape_timeout_shortens_the_module_timeout() {
        let m = Duration::from_secs(10);
        assert_eq!(timeout(m, None), Ok(m));
        assert_eq!(timeout(m, Some("5")), Ok(Duration::from_millis(4500)));
        assert_eq!(timeout(m, Some("30")), Ok(m));
        assert_eq!(timeout(m, Some("0")), Ok(m));
        assert_eq!(timeout(m, Some("abc")).unwrap_err().status, 400);
        assert_eq!(timeout(m, Some("0.5")).unwrap_err().status, 400);
    }
}
