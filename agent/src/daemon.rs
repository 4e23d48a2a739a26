//! The long-running commands, `agent`, `sink` and `run`: what each starts, the SIGHUP reload,
//! the sink monitor, the sd_notify status line and the order of shutdown. The binary only picks
//! the [`Role`] and maps a [`DaemonError`] to an exit code ([`DaemonError::is_config`]: a
//! config that can never run, which systemd must not restart).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::kafka::KafkaError;
use crate::output::{Output, OutputError};
use crate::probe::Prober;
use crate::publish::{PublishError, Publisher};
use crate::rules::RuleSet;
use crate::schedule::{self, Mode, Reload, Run};
use crate::service::{self, Health, Shutdown, Signals, notify};
use crate::sink::{Sink, SinkError};

/// Which daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `sitewatch agent`: probe on schedule, publish to Kafka.
    Agent,
    /// `sitewatch sink`: consume Kafka, persist to PostgreSQL.
    Sink,
    /// `sitewatch run`: both, as threads of one process.
    Both,
}

impl Role {
    fn probes(self) -> bool {
        self != Role::Sink
    }

    fn sinks(self) -> bool {
        self != Role::Agent
    }
}

/// Why a daemon could not start or stopped with a failure. Each variant keeps its cause.
#[derive(Debug)]
#[non_exhaustive]
pub enum DaemonError {
    /// The config file is invalid.
    Config(ConfigError),
    /// The config is valid but lacks what this role needs.
    Missing {
        path: PathBuf,
        /// What is missing and what to do about it.
        what: &'static str,
    },
    /// The signal handlers could not be installed.
    Signals(std::io::Error),
    /// The sink could not start, or stopped with an error retrying cannot fix.
    Sink(SinkError),
    /// The publisher could not start (its spool).
    Publisher(PublishError),
    /// The output lost records (the spool could not keep them).
    Output(Arc<OutputError>),
    /// The `[metrics]` listener could not start.
    #[cfg(feature = "metrics")]
    Metrics(crate::metrics::ServerError),
    /// The `[serve]` listener of `sink` or `run` could not start.
    #[cfg(feature = "serve")]
    Serve(crate::httpd::ServerError),
    /// Kafka refused the agent's first connection as configured (credentials, certificates).
    Kafka(KafkaError),
}

impl DaemonError {
    /// A config that can never run as it is: restarting will not help (exit 78, EX_CONFIG).
    pub fn is_config(&self) -> bool {
        match self {
            DaemonError::Config(_) | DaemonError::Missing { .. } => true,
            DaemonError::Kafka(e) | DaemonError::Sink(SinkError::Kafka(e)) => e.is_config(),
            _ => false,
        }
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Config(e) => e.fmt(f),
            DaemonError::Missing { path, what } => write!(f, "{}: {what}", path.display()),
            DaemonError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            DaemonError::Sink(e) => write!(f, "sink: {e}"),
            DaemonError::Publisher(e) => write!(f, "publisher: {e}"),
            DaemonError::Output(e) => e.fmt(f),
            #[cfg(feature = "metrics")]
            DaemonError::Metrics(e) => e.fmt(f),
            #[cfg(feature = "serve")]
            DaemonError::Serve(e) => e.fmt(f),
            DaemonError::Kafka(e) => write!(f, "Kafka: {e}"),
        }
    }
}

impl std::error::Error for DaemonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DaemonError::Config(e) => Some(e),
            DaemonError::Missing { .. } => None,
            DaemonError::Signals(e) => Some(e),
            DaemonError::Sink(e) => Some(e),
            DaemonError::Publisher(e) => Some(e),
            DaemonError::Output(e) => Some(&**e),
            #[cfg(feature = "metrics")]
            DaemonError::Metrics(e) => Some(e),
            #[cfg(feature = "serve")]
            DaemonError::Serve(e) => Some(e),
            DaemonError::Kafka(e) => Some(e),
        }
    }
}

/// How long the agent's start waits to learn whether Kafka takes its credentials.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(10);
const NEEDS_KAFKA: &str = "`sitewatch agent` needs a [kafka] section (or SITEWATCH_KAFKA_BROKERS); \
                           use --once to print results instead";
const NEEDS_SINK_SECTIONS: &str = "the sink needs [kafka] and [postgres] sections";

/// Runs `role` with the config at `path` until SIGTERM/SIGINT (or until the sink stops on its
/// own), then shuts down in order: scheduler, workers, output (publisher or spool), sink.
/// A daemon that fails says why in its STATUS line too (`systemctl status` shows it).
pub fn run(role: Role, path: &Path) -> Result<(), DaemonError> {
    let result = run_role(role, path);
    if let Err(e) = &result {
        notify::status(&format!("failed: {e}"));
    }
    result
}

fn run_role(role: Role, path: &Path) -> Result<(), DaemonError> {
    let cfg = Arc::new(Config::load(path).map_err(DaemonError::Config)?);
    if role.sinks() && (cfg.postgres.is_none() || cfg.kafka.is_none()) {
        return Err(missing(path, NEEDS_SINK_SECTIONS));
    }
    if role.probes() && cfg.kafka.is_none() {
        return Err(missing(path, NEEDS_KAFKA));
    }
    let signals = service::install_signals().map_err(DaemonError::Signals)?;
    let shutdown = signals.shutdown.clone();
    let health = Health::new();

    let sink = if role.sinks() {
        let sink = Sink::start_with_health(&cfg, &shutdown, &health).map_err(DaemonError::Sink)?;
        Some(Arc::new(sink))
    } else {
        None
    };
    let pages = start_serve(&cfg, role)?;
    let metrics = Metrics::start(&cfg, role, sink.clone(), pages)?;
    // A sink that stops on its own (e.g. the schema is missing) stops the process, so
    // systemd's Restart= and the exit code tell the operator.
    let monitor = sink.clone().map(|s| {
        let stop = shutdown.clone();
        spawn_named("sink-monitor", move || {
            while !stop.sleep(Duration::from_millis(200)) {
                if s.is_finished() {
                    stop.trigger();
                }
            }
        })
    });

    let agent_result = if role.probes() {
        let sink_status = sink.clone().map(|s| {
            let status: Box<dyn Fn() -> String + Send> = Box::new(move || s.status().line());
            status
        });
        run_agent(
            path,
            cfg.clone(),
            &signals,
            &health,
            sink_status,
            metrics.as_ref(),
        )
    } else {
        wait_as_sink(&cfg, &shutdown, &health, sink.as_deref());
        Ok(())
    };
    notify::stopping();
    shutdown.trigger();
    if let Some(m) = monitor {
        let _ = m.join();
    }
    if let Some(m) = &metrics {
        m.release_sink();
    }
    let sink_result = match sink.map(Arc::try_unwrap) {
        Some(Ok(s)) => s.join().map_err(DaemonError::Sink),
        Some(Err(_)) => {
            log::warn!("sink status still shared at exit; not joined");
            Ok(())
        }
        None => Ok(()),
    };
    agent_result.and(sink_result)
}

fn missing(path: &Path, what: &'static str) -> DaemonError {
    DaemonError::Missing {
        path: path.to_path_buf(),
        what,
    }
}

/// `sitewatch sink` alone: the sink's threads do the work; this one reports status until
/// shutdown.
fn wait_as_sink(cfg: &Config, shutdown: &Shutdown, health: &Health, sink: Option<&Sink>) {
    notify::ready();
    service::start_watchdog(health.clone(), shutdown.clone());
    log::info!(
        "sink started for topic {}",
        cfg.kafka.as_ref().map(|k| k.topic.as_str()).unwrap_or("")
    );
    let mut last = Instant::now();
    while !shutdown.sleep(Duration::from_millis(500)) {
        if let Some(s) = sink
            && last.elapsed() >= Duration::from_secs(5)
        {
            last = Instant::now();
            notify::status(&s.status().line());
        }
    }
}

/// The agent: probes on schedule into the publisher until shutdown; SIGHUP reloads.
fn run_agent(
    path: &Path,
    cfg: Arc<Config>,
    signals: &Signals,
    health: &Health,
    sink_status: Option<Box<dyn Fn() -> String + Send>>,
    metrics: Option<&Metrics>,
) -> Result<(), DaemonError> {
    let Some(kafka) = cfg.kafka.clone() else {
        return Err(missing(path, NEEDS_KAFKA));
    };
    let rules = RuleSet::load(&cfg.rules, &rule_names(&cfg));
    let prober = Arc::new(Prober::for_config(&cfg, rules.clone()));
    let publisher = Publisher::start(&kafka, &cfg.agent).map_err(DaemonError::Publisher)?;
    // Credentials or certificates Kafka refuses at start will not work by retrying: stop
    // (exit 78) before probing into the spool for nothing. A broker that is down or slow to
    // answer is not a reason: the agent starts and spools.
    publisher
        .first_connect(kafka.request_timeout.min(FIRST_CONNECT_WAIT))
        .map_err(DaemonError::Kafka)?;
    #[cfg(feature = "fleet")]
    let stats = publisher.stats_source();
    let output: Box<dyn Output> = match metrics {
        Some(m) => {
            m.reloaded(&cfg, &prober);
            m.output(publisher)
        }
        None => Box::new(publisher),
    };

    let (reload_tx, reload_rx) = std::sync::mpsc::channel::<Reload>();
    let shutdown = signals.shutdown.clone();
    // With [fleet], SIGHUP reloads go through the fleet, which adds its targets; the
    // [metrics] registry then keeps the series of the targets the agent runs now.
    #[cfg(feature = "fleet")]
    let (reload_tx, fleet) = {
        let m = metrics.cloned();
        let on_targets: crate::fleet::OnTargets = Box::new(move |c, p| {
            if let Some(m) = &m {
                m.reloaded(c, p);
            }
        });
        crate::fleet::start_if_configured(&cfg, &prober, reload_tx, &shutdown, on_targets, stats)
    };
    let reloader = Reloader {
        path: path.to_path_buf(),
        current: cfg.clone(),
        rules,
        metrics: metrics.cloned(),
    };
    reloader.spawn(signals, reload_tx);

    notify::ready();
    service::start_watchdog(health.clone(), shutdown.clone());
    log::info!(
        "agent {} started: {} targets, {} workers, publishing to {}",
        cfg.agent.id,
        cfg.targets.len(),
        cfg.agent.concurrency,
        kafka.topic
    );
    let summary = schedule::run(
        Run {
            mode: Mode::Forever,
            targets: cfg.targets.clone(),
            prober,
            concurrency: cfg.agent.concurrency,
            jitter: cfg.agent.jitter,
            drain_timeout: cfg.agent.drain_timeout,
            shutdown,
            health: health.clone(),
            reloads: Some(reload_rx),
            on_status: Some(Box::new(move |s, out| {
                let sink = sink_status
                    .as_ref()
                    .map(|f| format!("; {}", f()))
                    .unwrap_or_default();
                notify::status(&format!(
                    "{} targets; {} checks, {} up, {} down; {out}{sink}",
                    s.targets, s.checks, s.up, s.down
                ));
            })),
        },
        output,
    );
    #[cfg(feature = "fleet")]
    if let Some(f) = fleet {
        f.join();
    }
    log::info!(
        "agent stopped after {} checks ({} up, {} down)",
        summary.checks,
        summary.up,
        summary.down
    );
    match summary.output_error {
        Some(e) => Err(DaemonError::Output(e)),
        None => Ok(()),
    }
}

/// The rule files the targets of `cfg` (and its `/probe` modules) name.
pub fn rule_names(cfg: &Config) -> Vec<&str> {
    let modules = cfg.metrics.iter().flat_map(|m| m.modules.values());
    (cfg.targets.iter().map(|t| &**t).chain(modules))
        .filter_map(|t| t.rule.as_deref())
        .collect()
}

/// What SIGHUP does: re-read the config file; when it is valid, reload the rules it names and
/// build a prober for it. An invalid file is refused and the running config stays.
pub struct Reloader {
    pub path: PathBuf,
    /// The config running now.
    pub current: Arc<Config>,
    pub rules: RuleSet,
    /// The `[metrics]` listener, told of the new config (its `/probe` setup, and which
    /// targets' series to keep).
    pub metrics: Option<Metrics>,
}

impl Reloader {
    /// Reads the file again. On success the new config becomes current and the returned
    /// [`Reload`] is what the scheduler applies.
    pub fn reload(&mut self) -> Result<Reload, ConfigError> {
        let new = Arc::new(Config::load(&self.path)?);
        for section in needs_restart(&self.current, &new) {
            log::warn!("reload: [{section}] changed; restart to apply it");
        }
        self.rules.reload(&rule_names(&new));
        let prober = Arc::new(Prober::for_config(&new, self.rules.clone()));
        if let Some(m) = &self.metrics {
            m.reloaded(&new, &prober);
        }
        self.current = new.clone();
        Ok(Reload {
            config: new,
            prober,
        })
    }

    /// The `reload` thread: waits for SIGHUP (polling its flag), reloads, and hands the result
    /// to the scheduler until shutdown or until the scheduler is gone.
    fn spawn(mut self, signals: &Signals, to_scheduler: Sender<Reload>) {
        let flag = signals.reload.clone();
        let shutdown = signals.shutdown.clone();
        spawn_named("reload", move || {
            while !shutdown.sleep(Duration::from_millis(200)) {
                if !flag.swap(false, Ordering::SeqCst) {
                    continue;
                }
                notify::reloading();
                match self.reload() {
                    Ok(reload) => {
                        if to_scheduler.send(reload).is_err() {
                            return;
                        }
                    }
                    Err(e) => log::error!("reload refused, keeping the running config: {e}"),
                }
                notify::ready();
            }
        });
    }
}

/// The sections that changed between `old` and `new` but are only read at start: the
/// publisher and the sink own their Kafka connections, the sink its PostgreSQL ones. Compared
/// by value, secrets included (a changed password counts; their `Debug` text is masked).
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.kafka != new.kafka {
        changed.push("kafka");
    }
    if old.postgres != new.postgres {
        changed.push("postgres");
    }
    if old.fleet != new.fleet {
        changed.push("fleet");
    }
    // The sink's evaluators and notifier threads are built from `[alerts]` at start.
    if old.alerts != new.alerts {
        changed.push("alerts");
    }
    // Modules, the allow-list and probe_concurrency apply on reload; the socket does not.
    let socket = |c: &Config| c.metrics.as_ref().map(|m| (m.listen, m.connections));
    if socket(old) != socket(new) {
        changed.push("metrics");
    }
    changed
}

/// The status page's handler, to be mounted on the `[metrics]` listener.
#[cfg(feature = "serve")]
type Pages = Arc<dyn crate::httpd::Handler>;
#[cfg(not(feature = "serve"))]
type Pages = std::convert::Infallible;

/// `[serve]` in `sitewatch sink` and `run`: the same read-only status page as `sitewatch
/// serve` (its own read-only session, connected on the first request so that a database down
/// at start does not stop the sink, which retries on its own). On its own listener, or, when
/// `[serve] listen` is `[metrics] listen`, returned to answer every path but `/metrics` and
/// `/probe` on that listener (whose connection cap then applies). The agent alone has no
/// database: it ignores `[serve]`.
#[cfg(feature = "serve")]
fn start_serve(cfg: &Config, role: Role) -> Result<Option<Pages>, DaemonError> {
    let (Some(serve), Some(pg), true) = (&cfg.serve, &cfg.postgres, role.sinks()) else {
        return Ok(None);
    };
    let pages = crate::serve::pages(pg);
    if cfg
        .metrics
        .as_ref()
        .is_some_and(|m| m.listen == serve.listen)
    {
        log::info!("serve: status page on the metrics listener");
        return Ok(Some(pages));
    }
    let addr = crate::httpd::start("serve", serve.listen, serve.connections, pages)
        .map_err(DaemonError::Serve)?;
    log::info!("serve: status page on http://{addr}/");
    Ok(None)
}

#[cfg(not(feature = "serve"))]
fn start_serve(_: &Config, _: Role) -> Result<Option<Pages>, DaemonError> {
    Ok(None)
}

pub use wiring::Metrics;

/// The `[metrics]` listener as the daemon sees it: started or not, fed by the output, told of
/// reloads. Without the `metrics` feature the same calls do nothing (a `[metrics]` section is
/// then refused by the config).
#[cfg(feature = "metrics")]
mod wiring {
    use std::sync::Arc;

    use super::{DaemonError, Pages, Role};
    use crate::config::Config;
    use crate::metrics::{ProbeEndpoint, Recorder, Registry, Server};
    use crate::output::Output;
    use crate::probe::Prober;
    use crate::publish::Publisher;
    use crate::sink::Sink;

    #[derive(Clone)]
    pub struct Metrics {
        registry: Arc<Registry>,
        probe: Option<Arc<ProbeEndpoint>>,
    }

    impl Metrics {
        /// Starts the listener when `cfg` has `[metrics]`: `/probe` for the roles that probe,
        /// the sink's partitions for those that sink, the status `pages` on every other path.
        pub fn start(
            cfg: &Config,
            role: Role,
            sink: Option<Arc<Sink>>,
            pages: Option<Pages>,
        ) -> Result<Option<Metrics>, DaemonError> {
            let Some(m) = &cfg.metrics else {
                return Ok(None);
            };
            let registry = Arc::new(Registry::new());
            if let Some(sink) = sink {
                registry.set_sink(Some(Box::new(move || sink.status())));
            }
            let probe = role.probes().then(|| Arc::new(ProbeEndpoint::new()));
            #[cfg(not(feature = "serve"))]
            let pages = pages.map(|never| -> Arc<dyn crate::httpd::Handler> { match never {} });
            Server::start(
                m.listen,
                m.connections,
                registry.clone(),
                probe.clone(),
                pages,
            )
            .map_err(DaemonError::Metrics)?;
            Ok(Some(Metrics { registry, probe }))
        }

        /// The publisher, wrapped so that every record also updates the registry.
        pub fn output(&self, publisher: Publisher) -> Box<dyn Output> {
            Box::new(Recorder::new(publisher, self.registry.clone(), |p| {
                Some(p.stats())
            }))
        }

        pub fn reloaded(&self, cfg: &Config, prober: &Arc<Prober>) {
            if let Some(p) = &self.probe {
                p.update(cfg, prober.clone());
            }
            // A set, not a scan of the list per series: 100,000 targets would be 10^10 steps.
            let ids: std::collections::HashSet<&str> =
                cfg.targets.iter().map(|t| t.id.as_str()).collect();
            self.registry.retain_targets(&|id| ids.contains(id));
        }

        /// Lets go of the sink, so it can be joined.
        pub fn release_sink(&self) {
            self.registry.set_sink(None);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod wiring {
    use std::sync::Arc;

    use super::{DaemonError, Pages, Role};
    use crate::config::Config;
    use crate::output::Output;
    use crate::probe::Prober;
    use crate::publish::Publisher;
    use crate::sink::Sink;

    #[derive(Clone)]
    pub enum Metrics {}

    impl Metrics {
        pub fn start(
            _: &Config,
            _: Role,
            _: Option<Arc<Sink>>,
            _: Option<Pages>,
        ) -> Result<Option<Metrics>, DaemonError> {
            Ok(None)
        }

        pub fn output(&self, _: Publisher) -> Box<dyn Output> {
            match *self {}
        }

        pub fn reloaded(&self, _: &Config, _: &Arc<Prober>) {
            match *self {}
        }

        pub fn release_sink(&self) {
            match *self {}
        }
    }
}

/// Starts a named thread; a thread that cannot start is logged (the daemon runs on without
/// what it would have done, which the watchdog and the logs show).
fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Config {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(text, Path::new("t.toml"), &|k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
        .unwrap()
    }

    const KAFKA_SASL: &str = "[kafka]\nbrokers = [\"127.0.0.1:9092\"]\n\
        [kafka.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"u\"\n";
    const POSTGRES: &str = "[postgres]\nurl = \"postgres://u@127.0.0.1/db\"\n";

    #[test]
    fn a_changed_secret_alone_needs_a_restart() {
        let text = format!("{KAFKA_SASL}{POSTGRES}");
        let old = parse(
            &text,
            &[
                ("SITEWATCH_KAFKA_SASL_PASSWORD", "one"),
                ("SITEWATCH_PG_PASSWORD", "a"),
            ],
        );
        let same = parse(
            &text,
            &[
                ("SITEWATCH_KAFKA_SASL_PASSWORD", "one"),
                ("SITEWATCH_PG_PASSWORD", "a"),
            ],
        );
        assert_eq!(needs_restart(&old, &same), Vec::<&str>::new());
        // Their Debug text is the same (masked), their values are not.
        let new = parse(
            &text,
            &[
                ("SITEWATCH_KAFKA_SASL_PASSWORD", "two"),
                ("SITEWATCH_PG_PASSWORD", "b"),
            ],
        );
        assert_eq!(format!("{:?}", old.kafka), format!("{:?}", new.kafka));
        assert_eq!(needs_restart(&old, &new), vec!["kafka", "postgres"]);
    }

    #[cfg(feature = "fleet")]
    #[test]
    fn a_changed_fleet_needs_a_restart() {
        let old = parse("[fleet]\n", &[]);
        let new = parse("[fleet]\ngroup = \"eu-west\"\n", &[]);
        assert_eq!(needs_restart(&old, &new), vec!["fleet"]);
    }

    #[cfg(feature = "alerts")]
    #[test]
    fn a_changed_alert_channel_secret_needs_a_restart() {
        let text =
            "[alerts]\n[[alerts.channel]]\nname = \"s\"\nkind = \"slack\"\nurl_env = \"S\"\n";
        let old = parse(text, &[("S", "http://127.0.0.1:9/one")]);
        let new = parse(text, &[("S", "http://127.0.0.1:9/two")]);
        assert_eq!(needs_restart(&old, &old.clone()), Vec::<&str>::new());
        assert_eq!(needs_restart(&old, &new), vec!["alerts"]);
    }

    #[test]
    fn targets_alone_need_no_restart() {
        let old = parse(KAFKA_SASL, &[("SITEWATCH_KAFKA_SASL_PASSWORD", "p")]);
        let new = parse(
            &format!("{KAFKA_SASL}[[target]]\nid = \"a\"\nurl = \"http://127.0.0.1/\"\n"),
            &[("SITEWATCH_KAFKA_SASL_PASSWORD", "p")],
        );
        assert!(needs_restart(&old, &new).is_empty());
    }
}
