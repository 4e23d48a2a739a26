//! The command line: one parser ([`lexopt`], as ripgrep uses) for every command, `rule test`
//! included, into one [`Command`]. The binary matches on it; nothing else reads argv.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use crate::daemon::Role;
use crate::output::Format;
use crate::rules::cli as rule_cli;

pub const USAGE: &str = "\
sitewatch — website availability agent

USAGE:
    sitewatch --once [--config FILE] [--format json|table]
    sitewatch agent [--config FILE]        probe on schedule, publish to Kafka
    sitewatch sink [--config FILE]         consume Kafka, persist to PostgreSQL
    sitewatch run [--config FILE]          agent and sink in one process
    sitewatch init-db [--config FILE]      create or upgrade the PostgreSQL schema
    sitewatch serve [--config FILE]        status page, badges and JSON from PostgreSQL
    sitewatch check-config [--config FILE] validate and print the effective config
    sitewatch targets push FILE [--dry-run] [--config FILE]
                                           make the fleet's targets topic match FILE's [[target]]s
    sitewatch targets list [--config FILE] print the fleet's targets topic as [[target]]s
    sitewatch alerts [--config FILE]       open alerts and recent alert events (PostgreSQL)
    sitewatch rule test RULE.wasm --url URL [--status N --body-file F --header 'k: v']
    sitewatch --version | --help

The config file defaults to ./agent.toml when present, else /etc/sitewatch/agent.toml.
Exit codes of --once: 0 all up, 1 some down, 2 all down, 3 unknown (config or usage error).
Daemons exit 78 when their config cannot run, 3 on a runtime failure.
Logging: RUST_LOG=debug|info|warn|error (stderr).";

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Help,
    Version,
    /// `--once`: one round of every target, records on stdout.
    Once {
        config: Option<PathBuf>,
        /// `None`: a table on a terminal, JSON lines otherwise.
        format: Option<Format>,
    },
    /// `agent`, `sink` or `run`.
    Daemon {
        role: Role,
        config: Option<PathBuf>,
    },
    InitDb {
        config: Option<PathBuf>,
    },
    /// `serve`: the status page (`[serve]`), read-only on `[postgres]`.
    Serve {
        config: Option<PathBuf>,
    },
    CheckConfig {
        config: Option<PathBuf>,
    },
    /// `alerts`: open alerts and recent events, as tables.
    Alerts {
        config: Option<PathBuf>,
    },
    /// `rule test ...`; `None` asks for its usage text.
    RuleTest(Option<rule_cli::Args>),
    /// `targets push|list`: the fleet's targets topic.
    Targets {
        action: TargetsAction,
        config: Option<PathBuf>,
    },
}

/// What `sitewatch targets` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetsAction {
    /// Make the topic match FILE's `[[target]]` tables; `dry_run` only prints the diff.
    Push { file: PathBuf, dry_run: bool },
    /// Print the topic's targets.
    List,
}

impl Command {
    /// Long-running commands log at `info` by default, one-shot ones at `warn`.
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Daemon { .. } | Command::Serve { .. })
    }
}

/// A command line that does not parse. The message names the argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The command words, before the flags that go with them are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Word {
    Once,
    Daemon(Role),
    InitDb,
    Serve,
    CheckConfig,
    Targets,
    Alerts,
}

impl Word {
    fn name(self) -> &'static str {
        match self {
            Word::Once => "--once",
            Word::Daemon(Role::Agent) => "agent",
            Word::Daemon(Role::Sink) => "sink",
            Word::Daemon(Role::Both) => "run",
            Word::InitDb => "init-db",
            Word::Serve => "serve",
            Word::CheckConfig => "check-config",
            Word::Targets => "targets",
            Word::Alerts => "alerts",
        }
    }
}

/// Parses the arguments after the program name. `--help` and `--version` win over any
/// command; everything after `rule test` belongs to `rule test`.
pub fn parse<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let (mut help, mut version) = (false, false);
    let mut word: Option<Word> = None;
    let mut config = None;
    let mut format = None;
    let mut dry_run = false;
    let mut words: Vec<OsString> = Vec::new();
    let usage = |m: String| UsageError(m);
    let set = |word: &mut Option<Word>, new: Word| match word.replace(new) {
        Some(old) if old != new => Err(usage(format!(
            "two commands given: {} and {}",
            old.name(),
            new.name()
        ))),
        _ => Ok(()),
    };
    while let Some(arg) = p.next().map_err(|e| usage(e.to_string()))? {
        match arg {
            Short('h') | Long("help") => help = true,
            Short('V') | Long("version") => version = true,
            Long("once") => set(&mut word, Word::Once)?,
            Short('c') | Long("config") => {
                let v = p
                    .value()
                    .map_err(|_| usage("--config needs a value".into()))?;
                config = Some(PathBuf::from(v));
            }
            Long("dry-run") => dry_run = true,
            Long("format") => {
                let v = p
                    .value()
                    .map_err(|_| usage("--format needs a value".into()))?;
                format = Some(match v.to_str() {
                    Some("json") => Format::Json,
                    Some("table") => Format::Table,
                    _ => {
                        return Err(usage(format!(
                            "--format {:?}: expected json or table",
                            v.to_string_lossy()
                        )));
                    }
                });
            }
            // `targets push FILE`: the words after `targets` are its own.
            Value(v) if word == Some(Word::Targets) => words.push(v),
            Value(v) => match v.to_str() {
                Some("help") => help = true,
                Some("targets") => set(&mut word, Word::Targets)?,
                Some("agent") => set(&mut word, Word::Daemon(Role::Agent))?,
                Some("sink") => set(&mut word, Word::Daemon(Role::Sink))?,
                Some("run") => set(&mut word, Word::Daemon(Role::Both))?,
                Some("init-db") => set(&mut word, Word::InitDb)?,
                Some("serve") => set(&mut word, Word::Serve)?,
                Some("check-config") => set(&mut word, Word::CheckConfig)?,
                Some("alerts") => set(&mut word, Word::Alerts)?,
                Some("rule") => {
                    if let Some(w) = word {
                        return Err(usage(format!("two commands given: {} and rule", w.name())));
                    }
                    if help || version {
                        break;
                    }
                    return parse_rule(&mut p);
                }
                _ => {
                    return Err(usage(format!("unknown argument {:?}", v.to_string_lossy())));
                }
            },
            Short(c) => return Err(usage(format!("unknown argument \"-{c}\""))),
            Long(l) => return Err(usage(format!("unknown argument \"--{l}\""))),
        }
    }
    if help {
        return Ok(Command::Help);
    }
    if version {
        return Ok(Command::Version);
    }
    if format.is_some() && word != Some(Word::Once) {
        return Err(usage("--format goes with --once".into()));
    }
    if dry_run && word != Some(Word::Targets) {
        return Err(usage("--dry-run goes with targets push".into()));
    }
    match word {
        None => Err(usage("no command given".into())),
        Some(Word::Once) => Ok(Command::Once { config, format }),
        Some(Word::Daemon(role)) => Ok(Command::Daemon { role, config }),
        Some(Word::InitDb) => Ok(Command::InitDb { config }),
        Some(Word::Serve) => Ok(Command::Serve { config }),
        Some(Word::CheckConfig) => Ok(Command::CheckConfig { config }),
        Some(Word::Alerts) => Ok(Command::Alerts { config }),
        Some(Word::Targets) => {
            targets_action(words, dry_run).map(|action| Command::Targets { action, config })
        }
    }
}

fn targets_action(words: Vec<OsString>, dry_run: bool) -> Result<TargetsAction, UsageError> {
    let usage =
        || UsageError("usage: sitewatch targets push FILE [--dry-run] | targets list".into());
    let mut words = words.into_iter();
    let action = match words.next().as_ref().and_then(|w| w.to_str()) {
        Some("push") => TargetsAction::Push {
            file: words.next().map(PathBuf::from).ok_or_else(usage)?,
            dry_run,
        },
        Some("list") if !dry_run => TargetsAction::List,
        _ => return Err(usage()),
    };
    match words.next() {
        Some(extra) => Err(UsageError(format!(
            "unknown argument {:?}",
            extra.to_string_lossy()
        ))),
        None => Ok(action),
    }
}

/// `rule test ...`: the one sub-command with words of its own.
fn parse_rule(p: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let usage = || UsageError("usage: sitewatch rule test RULE.wasm --url URL".into());
    let sub = p.value().map_err(|_| usage())?;
    if sub != "test" {
        return Err(usage());
    }
    rule_cli::parse_test_args(p)
        .map(Command::RuleTest)
        .map_err(|m| UsageError(format!("rule test: {m}\n\n{}", rule_cli::USAGE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<Command, UsageError> {
        parse(line.split_whitespace())
    }

    /// One case per line: the command line and the `Debug` of what it parses to.
    fn check(line: &str, expected: &str) {
        let got = match parse_line(line) {
            Ok(c) => format!("{c:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert!(got.starts_with(expected), "{line:?}: {got}");
    }

    #[test]
    fn commands() {
        check("--once", "Once { config: None, format: None }");
        check(
            "--once -c a.toml --format table",
            "Once { config: Some(\"a.toml\"), format: Some(Table) }",
        );
        check(
            "--once --config=a.toml --format=json",
            "Once { config: Some(\"a.toml\"), format: Some(Json) }",
        );
        check("agent", "Daemon { role: Agent, config: None }");
        check(
            "sink --config s.toml",
            "Daemon { role: Sink, config: Some(\"s.toml\") }",
        );
        check("run", "Daemon { role: Both, config: None }");
        check("init-db", "InitDb");
        check(
            "serve --config s.toml",
            "Serve { config: Some(\"s.toml\") }",
        );
        check("check-config", "CheckConfig");
        check("alerts -c a.toml", "Alerts { config: Some(\"a.toml\") }");
        check("--version", "Version");
        check("agent --help", "Help");
        check("help", "Help");
        check(
            "rule test r.wasm --url http://127.0.0.1/",
            "RuleTest(Some(Args { rule: \"r.wasm\"",
        );
        check("rule test --help", "RuleTest(None)");
        check(
            "targets push t.toml --dry-run -c a.toml",
            "Targets { action: Push { file: \"t.toml\", dry_run: true }, config: Some(\"a.toml\") }",
        );
        check("targets list", "Targets { action: List, config: None }");
    }

    #[test]
    fn bad_command_lines() {
        check("", "error: no command given");
        check("agent sink", "error: two commands given: agent and sink");
        check(
            "--once agent",
            "error: two commands given: --once and agent",
        );
        check(
            "--once --format xml",
            "error: --format \"xml\": expected json or table",
        );
        check("agent --format json", "error: --format goes with --once");
        check("--once --config", "error: --config needs a value");
        check("frobnicate", "error: unknown argument \"frobnicate\"");
        check("--frobnicate", "error: unknown argument \"--frobnicate\"");
        check("targets push", "error: usage: sitewatch targets push FILE");
        check(
            "targets list --dry-run",
            "error: usage: sitewatch targets push FILE",
        );
        check("targets push a b", "error: unknown argument \"b\"");
        check("agent --dry-run", "error: --dry-run goes with targets push");
        check("rule run x.wasm", "error: usage: sitewatch rule test");
        check(
            "rule test x.wasm --status 42",
            "error: rule test: --status \"42\"",
        );
        check(
            "agent rule test x.wasm",
            "error: two commands given: agent and rule",
        );
    }
}
