//! The `sitewatch` binary: parses arguments ([`sitewatch::cli`]), calls into the library, maps
//! errors to exit codes. Everything else lives in the library (`sitewatch::*`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use sitewatch::cli::{self, Command, USAGE};
use sitewatch::config::{self, Config};
use sitewatch::daemon::{self, rule_names};
use sitewatch::output::{Format, Printer};
use sitewatch::probe::Prober;
use sitewatch::rules::RuleSet;
use sitewatch::schedule;
use sitewatch::service;

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

/// Errors that end the program: printed as `sitewatch: <message>` with an exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn unknown(message: impl ToString) -> Failure {
        Failure {
            code: exit::UNKNOWN,
            message: message.to_string(),
        }
    }
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
    let command = cli::parse(std::env::args_os().skip(1))
        .map_err(|e| Failure::unknown(format!("{e}\n\n{USAGE}")))?;
    service::init_logging(if command.is_daemon() { "info" } else { "warn" });
    match command {
        Command::Help => {
            println!("{USAGE}");
            Ok(exit::OK)
        }
        Command::Version => {
            println!("sitewatch {}", env!("CARGO_PKG_VERSION"));
            Ok(exit::OK)
        }
        Command::Once { config, format } => once(config.as_deref(), format),
        Command::CheckConfig { config } => {
            let cfg = load(config.as_deref())?;
            print!("{}", cfg.effective());
            eprintln!(
                "{}: OK ({} targets)",
                cfg.source.display(),
                cfg.targets.len()
            );
            Ok(exit::OK)
        }
        Command::RuleTest(args) => rule_test(args),
        Command::Alerts { config } => alerts(config.as_deref()),
        Command::InitDb { config } => {
            let cfg = load(config.as_deref())?;
            sitewatch::sink::init_db(&cfg)
                .map_err(|e| Failure::unknown(format!("init-db: {e}")))?;
            eprintln!("init-db: schema is up to date");
            Ok(exit::OK)
        }
        Command::Targets { action, config } => targets(action, config.as_deref()),
        Command::Serve { config } => serve(config.as_deref()),
        Command::Daemon { role, config } => {
            let path = config_path(config.as_deref());
            let result = daemon::run(role, &path);
            finished(result.map_err(|e| (e.is_config(), e.to_string())))
        }
    }
}

#[cfg(feature = "serve")]
fn serve(config: Option<&Path>) -> Result<u8, Failure> {
    let cfg = load(config).map_err(|f| Failure {
        code: exit::CONFIG,
        ..f
    })?;
    let signals = service::install_signals()
        .map_err(|e| Failure::unknown(format!("cannot install signal handlers: {e}")))?;
    let result = sitewatch::serve::run(&cfg, &signals.shutdown);
    finished(result.map_err(|e| (e.is_config(), e.to_string())))
}

/// A long-running command's end: exit 78 for a config that cannot run, 3 for anything else.
fn finished(result: Result<(), (bool, String)>) -> Result<u8, Failure> {
    match result {
        Ok(()) => Ok(exit::OK),
        Err((is_config, message)) => Err(Failure {
            code: if is_config {
                exit::CONFIG
            } else {
                exit::UNKNOWN
            },
            message,
        }),
    }
}

#[cfg(not(feature = "serve"))]
fn serve(_config: Option<&Path>) -> Result<u8, Failure> {
    Err(Failure {
        code: exit::CONFIG,
        message: "this sitewatch was built without the `serve` feature".into(),
    })
}

fn config_path(given: Option<&Path>) -> PathBuf {
    config::default_path(given)
}

fn load(given: Option<&Path>) -> Result<Config, Failure> {
    Config::load(&config_path(given)).map_err(Failure::unknown)
}

fn once(config: Option<&Path>, format: Option<Format>) -> Result<u8, Failure> {
    let cfg = load(config)?;
    if cfg.targets.is_empty() {
        return Err(Failure::unknown(format!(
            "{}: no [[target]] to check",
            cfg.source.display()
        )));
    }
    let rules = RuleSet::load(&cfg.rules, &rule_names(&cfg));
    let prober = Arc::new(Prober::for_config(&cfg, rules));
    let stdout = std::io::stdout();
    let format = format.unwrap_or(if stdout.is_terminal() {
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
        if !e.is_broken_pipe() {
            return Err(Failure::unknown(e));
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

/// `targets push|list`: needs `[kafka]`; `[fleet]` gives the topic (defaults without it).
fn targets(action: cli::TargetsAction, config: Option<&Path>) -> Result<u8, Failure> {
    let cfg = load(config)?;
    #[cfg(feature = "fleet")]
    {
        let out = sitewatch::fleet::topic::command(&cfg, &action).map_err(Failure::unknown)?;
        print!("{out}");
        Ok(exit::OK)
    }
    #[cfg(not(feature = "fleet"))]
    {
        let _ = (cfg, action);
        Err(Failure::unknown(
            "this sitewatch was built without the `fleet` feature",
        ))
    }
}

/// `sitewatch alerts`: the open alerts and recent events, as tables.
fn alerts(config: Option<&Path>) -> Result<u8, Failure> {
    let cfg = load(config)?;
    #[cfg(feature = "alerts")]
    {
        let text = sitewatch::alerts::report::report(&cfg)
            .map_err(|e| Failure::unknown(format!("alerts: {e}")))?;
        print!("{text}");
        Ok(exit::OK)
    }
    #[cfg(not(feature = "alerts"))]
    {
        let _ = cfg;
        Err(Failure::unknown(
            "this sitewatch was built without the `alerts` feature",
        ))
    }
}

fn rule_test(args: Option<sitewatch::rules::cli::Args>) -> Result<u8, Failure> {
    if !cfg!(feature = "wasm") {
        return Err(Failure::unknown(
            "this sitewatch was built without the `wasm` feature",
        ));
    }
    let mut stdout = std::io::stdout();
    let code = match args {
        Some(args) => sitewatch::rules::cli::rule_test(&args, &mut stdout),
        None => {
            println!("{}", sitewatch::rules::cli::USAGE);
            0
        }
    };
    Ok(code.clamp(0, 255) as u8)
}
