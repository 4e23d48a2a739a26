//! The `sitewatch` binary: parses arguments, calls into the library, maps errors to exit codes.
//! Everything else lives in the library (`sitewatch::*`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sitewatch::config::{self, Config};
use sitewatch::output::{Format, Output, Printer};
use sitewatch::probe::Prober;
use sitewatch::rules::RuleSet;
use sitewatch::schedule::{self, Mode, Reload, Run};
use sitewatch::service::{self, Health, Shutdown, notify};

/// Exit codes, Nagios-style for `--once` (documented in README.md and sitewatch(8)).
mod exit {
    /// Every target up (or: the command succeeded).
    pub const OK: u8 = 0;
    /// Some targets down (warning).
    pub const SOME_DOWN: u8 = 1;
    /// Every target down (critical).
    pub const ALL_DOWN: u8 = 2;
    /// Unknown: bad config, bad usage, or an internal error.
    pub const UNKNOWN: u8 = 3;
    /// Daemons (`agent`, `sink`, `run`) with a config they cannot run on: EX_CONFIG, which the
    /// systemd units list in `RestartPreventExitStatus=` so a broken config is not restarted
    /// every few seconds, while a runtime failure (exit 3) still is.
    pub const CONFIG: u8 = 78;
}

const USAGE: &str = "\
sitewatch — website availability agent

USAGE:
    sitewatch --once [--config FILE] [--format json|table]
    sitewatch agent [--config FILE]        probe on schedule, publish to Kafka
    sitewatch sink [--config FILE]         consume Kafka, persist to PostgreSQL
    sitewatch run [--config FILE]          agent and sink in one process
    sitewatch init-db [--config FILE]      create or upgrade the PostgreSQL schema
    sitewatch check-config [--config FILE] validate and print the effective config
    sitewatch rule test RULE.wasm --url URL [--status N --body-file F --header 'k: v']
    sitewatch --version | --help

The config file defaults to ./agent.toml when present, else /etc/sitewatch/agent.toml.
Exit codes of --once: 0 all up, 1 some down, 2 all down, 3 unknown (config or usage error).
Daemons exit 78 when their config cannot run, 3 on a runtime failure.
Logging: RUST_LOG=debug|info|warn|error (stderr).";

/// Errors that end the program: printed as `sitewatch: <message>` with an exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::UNKNOWN,
            message: format!("{}\n\n{USAGE}", message.into()),
        }
    }
}

impl From<config::ConfigError> for Failure {
    fn from(e: config::ConfigError) -> Failure {
        Failure {
            code: exit::UNKNOWN,
            message: e.to_string(),
        }
    }
}

struct Args {
    command: String,
    config: Option<PathBuf>,
    format: Option<Format>,
    rest: Vec<String>,
}

fn parse_args(argv: Vec<String>) -> Result<Args, Failure> {
    let mut command: Option<String> = None;
    let mut config = None;
    let mut format = None;
    let mut rest = Vec::new();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        // `rule test ...` takes its own flags: hand everything after `rule` over untouched.
        if command.as_deref() == Some("rule") {
            rest.push(arg);
            rest.extend(it.by_ref());
            break;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, Failure> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| Failure::usage(format!("{name} needs a value")))
        };
        match flag.as_str() {
            "-h" | "--help" | "help" => command = Some("help".into()),
            "-V" | "--version" => command = Some("version".into()),
            "--once" => set_command(&mut command, "once")?,
            "-c" | "--config" => config = Some(PathBuf::from(value("--config")?)),
            "--format" => {
                format = Some(match value("--format")?.as_str() {
                    "json" => Format::Json,
                    "table" => Format::Table,
                    other => {
                        return Err(Failure::usage(format!(
                            "--format {other:?}: expected json or table"
                        )));
                    }
                })
            }
            "agent" | "sink" | "run" | "init-db" | "check-config" | "rule" => {
                set_command(&mut command, &flag)?
            }
            other => return Err(Failure::usage(format!("unknown argument {other:?}"))),
        }
    }
    let command = command.ok_or_else(|| Failure::usage("no command given"))?;
    Ok(Args {
        command,
        config,
        format,
        rest,
    })
}

fn set_command(command: &mut Option<String>, new: &str) -> Result<(), Failure> {
    if let Some(old) = command
        && old != "help"
        && old != "version"
    {
        return Err(Failure::usage(format!(
            "two commands given: {old} and {new}"
        )));
    }
    if command.is_none() {
        *command = Some(new.to_string());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("sitewatch: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn run() -> Result<u8, Failure> {
    service::limit_malloc_arenas();
    let args = parse_args(std::env::args().skip(1).collect())?;
    let daemon = matches!(args.command.as_str(), "agent" | "sink" | "run");
    service::init_logging(if daemon { "info" } else { "warn" });
    match args.command.as_str() {
        "help" => {
            println!("{USAGE}");
            Ok(exit::OK)
        }
        "version" => {
            println!("sitewatch {}", env!("CARGO_PKG_VERSION"));
            Ok(exit::OK)
        }
        "once" => once(&args),
        "check-config" => {
            let cfg = load(&args)?;
            print!("{}", cfg.effective());
            eprintln!(
                "{}: OK ({} targets)",
                cfg.source.display(),
                cfg.targets.len()
            );
            Ok(exit::OK)
        }
        "rule" => rule_command(&args.rest),
        "init-db" => init_db(&args),
        "agent" | "sink" | "run" => daemon_main(&args),
        other => Err(Failure::usage(format!("unknown command {other}"))),
    }
}

fn load(args: &Args) -> Result<Config, Failure> {
    let path = config::default_path(args.config.as_deref());
    Ok(Config::load(&path)?)
}

fn rule_names(cfg: &Config) -> Vec<&str> {
    cfg.targets
        .iter()
        .filter_map(|t| t.rule.as_deref())
        .collect()
}

fn once(args: &Args) -> Result<u8, Failure> {
    let cfg = load(args)?;
    if cfg.targets.is_empty() {
        return Err(Failure {
            code: exit::UNKNOWN,
            message: format!("{}: no [[target]] to check", cfg.source.display()),
        });
    }
    let rules = RuleSet::load(&cfg.rules, &rule_names(&cfg));
    let prober = Arc::new(Prober::new(&cfg.agent, rules));
    let stdout = std::io::stdout();
    let format = args.format.unwrap_or(if stdout.is_terminal() {
        Format::Table
    } else {
        Format::Json
    });
    // Stdout is line-buffered: without our own buffer every record would be a write(2). The
    // printer flushes whenever no further record is waiting.
    let out = std::io::BufWriter::with_capacity(64 * 1024, stdout);
    let summary = schedule::run_once(&cfg, prober, Box::new(Printer::new(out, format)));
    if let Some(e) = &summary.output_error {
        // stdout closed early (`| head`): not our failure to report loudly.
        if !e.contains("Broken pipe") {
            return Err(Failure {
                code: exit::UNKNOWN,
                message: e.clone(),
            });
        }
    }
    Ok(if summary.down == 0 {
        exit::OK
    } else if summary.up == 0 {
        exit::ALL_DOWN
    } else {
        exit::SOME_DOWN
    })
}

fn rule_command(rest: &[String]) -> Result<u8, Failure> {
    match rest.first().map(String::as_str) {
        Some("test") => rule_test(&rest[1..]),
        _ => Err(Failure::usage(
            "usage: sitewatch rule test RULE.wasm --url URL",
        )),
    }
}

#[cfg(feature = "wasm")]
fn rule_test(args: &[String]) -> Result<u8, Failure> {
    let code = sitewatch::rules::cli::rule_test_main(args, &mut std::io::stdout());
    Ok(code.clamp(0, 255) as u8)
}

#[cfg(not(feature = "wasm"))]
fn rule_test(_args: &[String]) -> Result<u8, Failure> {
    Err(Failure {
        code: exit::UNKNOWN,
        message: "this sitewatch was built without the `wasm` feature".into(),
    })
}

fn init_db(args: &Args) -> Result<u8, Failure> {
    let cfg = load(args)?;
    sitewatch::sink::init_db(&cfg).map_err(|e| Failure {
        code: exit::UNKNOWN,
        message: format!("init-db: {e}"),
    })?;
    eprintln!("init-db: schema is up to date");
    Ok(exit::OK)
}

/// `agent`, `sink` and `run`: long-running, signal-driven, sd_notify-aware.
fn daemon_main(args: &Args) -> Result<u8, Failure> {
    let path = config::default_path(args.config.as_deref());
    let cfg = Arc::new(Config::load(&path).map_err(|e| Failure {
        code: exit::CONFIG,
        message: e.to_string(),
    })?);
    let signals = service::install_signals().map_err(|e| Failure {
        code: exit::UNKNOWN,
        message: format!("cannot install signal handlers: {e}"),
    })?;
    let shutdown = signals.shutdown.clone();
    let health = Health::new();
    let want_agent = args.command != "sink";
    let want_sink = args.command != "agent";

    let mut sink = None;
    let mut sink_monitor = None;
    if want_sink {
        if cfg.postgres.is_none() || cfg.kafka.is_none() {
            return Err(Failure {
                code: exit::CONFIG,
                message: format!(
                    "{}: the sink needs [kafka] and [postgres] sections",
                    path.display()
                ),
            });
        }
        let started =
            sitewatch::sink::Sink::start_with_health(&cfg, &shutdown, &health).map_err(|e| {
                Failure {
                    code: exit::UNKNOWN,
                    message: format!("sink: {e}"),
                }
            })?;
        let started = Arc::new(started);
        // A sink that stops on its own (e.g. the schema is missing) stops the process, so
        // systemd's Restart= and the exit code tell the operator.
        let (s, stop) = (started.clone(), shutdown.clone());
        sink_monitor = Some(
            std::thread::Builder::new()
                .name("sink-monitor".into())
                .spawn(move || {
                    while !stop.sleep(Duration::from_millis(200)) {
                        if s.is_finished() {
                            stop.trigger();
                        }
                    }
                })
                .map_err(|e| Failure {
                    code: exit::UNKNOWN,
                    message: format!("cannot start a thread: {e}"),
                })?,
        );
        sink = Some(started);
    }

    let agent_result = if want_agent {
        let sink_status: Option<Box<dyn Fn() -> String + Send>> = sink
            .clone()
            .map(|s| Box::new(move || s.status().line()) as Box<dyn Fn() -> String + Send>);
        agent_loop(&path, cfg.clone(), &signals, &health, sink_status)
    } else {
        notify::ready();
        service::start_watchdog(health.clone(), shutdown.clone());
        log::info!(
            "sink started for topic {}",
            cfg.kafka.as_ref().map(|k| k.topic.as_str()).unwrap_or("")
        );
        let mut last = std::time::Instant::now();
        while !shutdown.sleep(Duration::from_millis(500)) {
            if let Some(s) = &sink
                && last.elapsed() >= Duration::from_secs(5)
            {
                last = std::time::Instant::now();
                notify::status(&s.status().line());
            }
        }
        Ok(())
    };
    notify::stopping();
    shutdown.trigger();
    let mut ok = agent_result.is_ok();
    if let Some(m) = sink_monitor {
        let _ = m.join();
    }
    if let Some(s) = sink {
        match Arc::try_unwrap(s) {
            Ok(s) => {
                if let Err(e) = s.join() {
                    log::error!("sink: {e}");
                    ok = false;
                }
            }
            Err(_) => log::warn!("sink status still shared at exit; not joined"),
        }
    }
    agent_result?;
    Ok(if ok { exit::OK } else { exit::UNKNOWN })
}

fn agent_loop(
    path: &std::path::Path,
    cfg: Arc<Config>,
    signals: &service::Signals,
    health: &Health,
    sink_status: Option<Box<dyn Fn() -> String + Send>>,
) -> Result<(), Failure> {
    let Some(kafka) = cfg.kafka.clone() else {
        return Err(Failure {
            code: exit::CONFIG,
            message: format!(
                "{}: `sitewatch agent` needs a [kafka] section (or SITEWATCH_KAFKA_BROKERS); use --once to print results instead",
                path.display()
            ),
        });
    };
    let rules = RuleSet::load(&cfg.rules, &rule_names(&cfg));
    let prober = Arc::new(Prober::new(&cfg.agent, rules.clone()));
    let publisher =
        sitewatch::publish::Publisher::start(&kafka, &cfg.agent).map_err(|e| Failure {
            code: exit::UNKNOWN,
            message: format!("publisher: {e}"),
        })?;
    let output: Box<dyn Output> = Box::new(publisher);

    let (reload_tx, reload_rx) = std::sync::mpsc::channel::<Reload>();
    let shutdown: Shutdown = signals.shutdown.clone();
    // SIGHUP: re-read the config on a side thread; an invalid one is logged and the old one
    // keeps running. Kafka settings need a restart (the publisher owns its connections).
    {
        let reload_flag = signals.reload.clone();
        let shutdown = shutdown.clone();
        let path = path.to_path_buf();
        let mut current = cfg.clone();
        let rules = rules.clone();
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                while !shutdown.sleep(Duration::from_millis(200)) {
                    if !reload_flag.swap(false, Ordering::SeqCst) {
                        continue;
                    }
                    notify::reloading();
                    match Config::load(&path) {
                        Ok(new) => {
                            if format!("{:?}", new.kafka) != format!("{:?}", current.kafka) {
                                log::warn!(
                                    "reload: [kafka] changed; restart the agent to apply it"
                                );
                            }
                            let new = Arc::new(new);
                            rules.reload(&rule_names(&new));
                            let prober = Arc::new(Prober::new(&new.agent, rules.clone()));
                            if reload_tx
                                .send(Reload {
                                    config: new.clone(),
                                    prober,
                                })
                                .is_err()
                            {
                                return;
                            }
                            current = new;
                        }
                        Err(e) => log::error!("reload refused, keeping the running config: {e}"),
                    }
                    notify::ready();
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the reload thread: {e}");
        }
    }

    notify::ready();
    service::start_watchdog(health.clone(), shutdown.clone());
    log::info!(
        "agent {} started: {} targets, {} workers, publishing to {}",
        cfg.agent.id,
        cfg.targets.len(),
        cfg.agent.concurrency,
        kafka.topic
    );
    let targets = cfg.targets.len();
    let summary = schedule::run(
        Run {
            mode: Mode::Forever,
            targets: cfg.targets.clone(),
            prober,
            concurrency: cfg.agent.concurrency,
            jitter: cfg.agent.jitter,
            drain_timeout: cfg.agent.drain_timeout,
            shutdown: shutdown.clone(),
            health: health.clone(),
            reloads: Some(reload_rx),
            on_status: Some(Box::new(move |s, out| {
                let sink = sink_status
                    .as_ref()
                    .map(|f| format!("; {}", f()))
                    .unwrap_or_default();
                notify::status(&format!(
                    "{targets} targets; {} checks, {} up, {} down; {out}{sink}",
                    s.checks, s.up, s.down
                ));
            })),
        },
        output,
    );
    log::info!(
        "agent stopped after {} checks ({} up, {} down)",
        summary.checks,
        summary.up,
        summary.down
    );
    match summary.output_error {
        Some(e) => Err(Failure {
            code: exit::UNKNOWN,
            message: e,
        }),
        None => Ok(()),
    }
}
