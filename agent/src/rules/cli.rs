//! `sitewatch rule test RULE.wasm --url URL`: runs one rule once, on a real response or on
//! an offline one (`--status`, `--body-file`, `--header`), and prints the verdict, the reason,
//! the extra fields and the time the rule took. Self-contained: it makes its own plain GET with
//! ureq rather than going through the probe, so a rule author sees exactly what the rule sees.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{RuleInput, RuleSet, Verdict};
use crate::config::RulesConfig;

/// Exit codes of `rule test`.
pub const EXIT_UP: i32 = 0;
pub const EXIT_DOWN: i32 = 1;
pub const EXIT_UNKNOWN: i32 = 2;
/// The rule did not load, or failed (trap, deadline, bad output).
pub const EXIT_RULE_ERROR: i32 = 3;
/// Bad command line, or an input file that cannot be read.
pub const EXIT_USAGE: i32 = 64;

/// Bodies beyond this are cut (and flagged truncated), like the probe's body cap.
const BODY_CAP: u64 = 1 << 20;

pub const USAGE: &str = "\
usage: sitewatch rule test RULE.wasm --url URL [--timeout 10s]
       sitewatch rule test RULE.wasm [--status N] [--body-file F] [--header 'name: value']... [--elapsed MS]
limits: [--deadline 100ms] [--memory-limit 16MiB] [--fuel N]

Runs the rule once and prints its verdict, reason, extra fields and the time it took.
With --url it makes one GET (redirects not followed, any status accepted). Without --url the
response is described offline: --status (default 200), --body-file (default empty), --header
(repeatable, response headers) and --elapsed (ms, default 0).
Exit code: 0 up, 1 down, 2 unknown, 3 rule error, 64 usage error.";

/// The command line of `rule test`, parsed by [`parse_test_args`].
#[derive(Debug)]
pub struct Args {
    rule: PathBuf,
    url: Option<String>,
    timeout: Duration,
    status: Option<u16>,
    body_file: Option<PathBuf>,
    headers: Vec<(String, String)>,
    elapsed_ms: Option<u32>,
    limits: RulesConfig,
}

/// Entry point for `sitewatch rule test` from its words (the ones after `rule test`): parses
/// them as the binary does and runs [`rule_test`]. Returns the process exit code; everything,
/// errors included, goes to `out`.
pub fn rule_test_main(args: &[String], out: &mut dyn Write) -> i32 {
    let mut parser = lexopt::Parser::from_args(args);
    match parse_test_args(&mut parser) {
        Ok(Some(a)) => rule_test(&a, out),
        Ok(None) => {
            let _ = writeln!(out, "{USAGE}");
            0
        }
        Err(msg) => {
            let _ = writeln!(out, "error: {msg}\n\n{USAGE}");
            EXIT_USAGE
        }
    }
}

/// Runs `rule test` with parsed arguments. Returns the process exit code; everything, errors
/// included, goes to `out`.
pub fn rule_test(args: &Args, out: &mut dyn Write) -> i32 {
    match run(args, out) {
        Ok(code) => code,
        Err(msg) => {
            let _ = writeln!(out, "error: {msg}");
            EXIT_USAGE
        }
    }
}

/// Parses the words after `rule test` from `p` (the binary's one parser, [`crate::cli`]).
/// `Ok(None)` asks for the usage text.
pub fn parse_test_args(p: &mut lexopt::Parser) -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut rule = None;
    let mut args = Args {
        rule: PathBuf::new(),
        url: None,
        timeout: Duration::from_secs(10),
        status: None,
        body_file: None,
        headers: Vec::new(),
        elapsed_ms: None,
        limits: RulesConfig {
            dir: PathBuf::new(),
            deadline: Duration::from_millis(100),
            memory_limit: 16 << 20,
            fuel: None,
        },
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        // Owned, so that the parser is free to hand out the flag's value.
        let flag = match arg {
            Short(c) => format!("-{c}"),
            Long(l) => format!("--{l}"),
            Value(path) => {
                if rule.replace(PathBuf::from(&path)).is_some() {
                    return Err(format!(
                        "only one rule file, got a second: {}",
                        Path::new(&path).display()
                    ));
                }
                continue;
            }
        };
        let mut value = || -> Result<String, String> {
            p.value()
                .ok()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--url" => args.url = Some(value()?),
            "--timeout" => args.timeout = duration(&flag, &value()?)?,
            "--status" => {
                let v = value()?;
                args.status = Some(
                    v.parse()
                        .ok()
                        .filter(|s| (100..=999).contains(s))
                        .ok_or_else(|| {
                            format!("--status {v:?}: expected an HTTP status, 100-999")
                        })?,
                );
            }
            "--body-file" => args.body_file = Some(PathBuf::from(value()?)),
            "--header" => {
                let v = value()?;
                let (name, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--header {v:?}: expected 'name: value'"))?;
                args.headers
                    .push((name.trim().to_ascii_lowercase(), val.trim().to_string()));
            }
            "--elapsed" => {
                let v = value()?;
                args.elapsed_ms = Some(
                    v.parse()
                        .map_err(|_| format!("--elapsed {v:?}: expected milliseconds"))?,
                );
            }
            "--deadline" => args.limits.deadline = duration(&flag, &value()?)?,
            "--memory-limit" => {
                let v = value()?;
                args.limits.memory_limit = crate::config::parse_size(&v)
                    .filter(|&s| s > 0)
                    .ok_or_else(|| format!("--memory-limit {v:?}: expected a size like 16MiB"))?
                    as usize;
            }
            "--fuel" => {
                let v = value()?;
                args.limits.fuel = Some(
                    v.parse()
                        .map_err(|_| format!("--fuel {v:?}: expected a number"))?,
                );
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    args.rule = rule.ok_or("missing the rule file (RULE.wasm)")?;
    if args.url.is_some()
        && (args.status.is_some()
            || args.body_file.is_some()
            || !args.headers.is_empty()
            || args.elapsed_ms.is_some())
    {
        return Err(
            "--status, --body-file, --header and --elapsed describe an offline response; they cannot be combined with --url"
                .into(),
        );
    }
    Ok(Some(args))
}

fn duration(flag: &str, v: &str) -> Result<Duration, String> {
    crate::util::parse_duration(v)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{flag} {v:?}: expected a duration like 100ms or 10s"))
}

/// The response the rule is shown.
struct Response {
    status: u16,
    elapsed_ms: u32,
    tls: bool,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    truncated: bool,
    error: Option<String>,
}

fn run(args: &Args, out: &mut dyn Write) -> Result<i32, String> {
    let (dir, name) = split_rule_path(&args.rule)?;
    let limits = RulesConfig {
        dir,
        ..args.limits.clone()
    };
    let load_start = Instant::now();
    let rules = RuleSet::load(&limits, &[name.as_str()]);
    let load_ms = crate::util::ms(load_start.elapsed());
    let _ = write!(out, "rule     {}", args.rule.display());
    match rules.loaded(&name) {
        Ok(hash) => {
            let _ = writeln!(out, " (hash {hash}, loaded in {load_ms:.1} ms)");
        }
        Err(e) => {
            let _ = writeln!(out, "\nerror    {}", e.message);
            return Ok(EXIT_RULE_ERROR);
        }
    }

    let response = match &args.url {
        Some(url) => fetch(url, args.timeout),
        None => offline(args)?,
    };
    let _ = match &response.error {
        Some(e) => writeln!(out, "input    {}: request failed: {e}", response.url),
        None => writeln!(
            out,
            "input    {} -> {}, {} body bytes{}, {} headers, {} ms",
            response.url,
            response.status,
            response.body.len(),
            if response.truncated {
                " (truncated)"
            } else {
                ""
            },
            response.headers.len(),
            response.elapsed_ms
        ),
    };

    let input = RuleInput {
        status: response.status,
        elapsed_ms: response.elapsed_ms,
        body_truncated: response.truncated,
        tls: response.tls,
        url: &response.url,
        headers: &response.headers,
        body: &response.body,
        error: response.error.as_deref(),
    };
    match rules.evaluate(&name, &input) {
        Ok(outcome) => {
            let _ = writeln!(out, "verdict  {}", outcome.verdict.as_str());
            if let Some(reason) = &outcome.reason {
                let _ = writeln!(out, "reason   {reason}");
            }
            if let Some(extra) = &outcome.extra {
                let _ = writeln!(out, "extra    {extra}");
            }
            let _ = writeln!(out, "time     {:.3} ms", outcome.elapsed_ms);
            Ok(match outcome.verdict {
                Verdict::Up => EXIT_UP,
                Verdict::Down => EXIT_DOWN,
                Verdict::Unknown => EXIT_UNKNOWN,
            })
        }
        Err(e) => {
            let _ = writeln!(out, "error    {}", e.message);
            let _ = writeln!(out, "time     {:.3} ms", e.elapsed_ms);
            Ok(EXIT_RULE_ERROR)
        }
    }
}

fn split_rule_path(path: &Path) -> Result<(PathBuf, String), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_string()))
}

fn offline(args: &Args) -> Result<Response, String> {
    let body = match &args.body_file {
        Some(path) => {
            let file = std::fs::File::open(path)
                .map_err(|e| format!("--body-file {}: {e}", path.display()))?;
            let mut body = Vec::new();
            file.take(BODY_CAP + 1)
                .read_to_end(&mut body)
                .map_err(|e| format!("--body-file {}: {e}", path.display()))?;
            body
        }
        None => Vec::new(),
    };
    let truncated = body.len() as u64 > BODY_CAP;
    let mut body = body;
    body.truncate(BODY_CAP as usize);
    Ok(Response {
        status: args.status.unwrap_or(200),
        elapsed_ms: args.elapsed_ms.unwrap_or(0),
        tls: false,
        url: "offline:".into(),
        headers: args.headers.clone(),
        body,
        truncated,
        error: None,
    })
}

/// One plain GET: every status is a response, redirects are not followed, every phase is
/// bounded by `timeout`, the body is cut at [`BODY_CAP`].
fn fetch(url: &str, timeout: Duration) -> Response {
    let start = Instant::now();
    let tls = url.len() >= 8 && url[..8].eq_ignore_ascii_case("https://");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::NativeTls)
                .build(),
        )
        .build()
        .into();
    let mut response = Response {
        status: 0,
        elapsed_ms: 0,
        tls,
        url: url.to_string(),
        headers: Vec::new(),
        body: Vec::new(),
        truncated: false,
        error: None,
    };
    let result = agent.get(url).call().and_then(|mut r| {
        response.status = r.status().as_u16();
        response.headers = super::header_pairs(r.headers());
        r.body_mut()
            .with_config()
            .limit(u64::MAX)
            .reader()
            .take(BODY_CAP + 1)
            .read_to_end(&mut response.body)
            .map_err(ureq::Error::from)
    });
    if let Err(e) = result {
        response.error = Some(e.to_string());
    }
    response.truncated = response.body.len() as u64 > BODY_CAP;
    response.body.truncate(BODY_CAP as usize);
    response.elapsed_ms = start.elapsed().as_millis().min(u32::MAX as u128) as u32;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn parse_args(words: &[String]) -> Result<Option<Args>, String> {
        parse_test_args(&mut lexopt::Parser::from_args(words))
    }

    fn check_error(line: &str, needle: &str) {
        let err = parse_args(&words(line)).unwrap_err();
        assert!(err.contains(needle), "{line}: {err}");
    }

    #[test]
    fn bad_command_lines() {
        check_error("", "missing the rule file");
        check_error("a.wasm b.wasm", "only one rule file");
        check_error("a.wasm --url", "--url needs a value");
        check_error("a.wasm --status 42", "expected an HTTP status");
        check_error("a.wasm --header nocolon", "expected 'name: value'");
        check_error("a.wasm --url http://x/ --status 200", "cannot be combined");
        check_error("a.wasm --deadline soon", "expected a duration");
        check_error("a.wasm --memory-limit lots", "expected a size");
        check_error("a.wasm --frobnicate", "unknown option --frobnicate");
    }

    #[test]
    fn offline_command_line() {
        let a = parse_args(&words(
            "r.wasm --status 503 --header Content-Type:text/html --elapsed 7 --deadline 50ms --fuel 1000",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(a.rule, PathBuf::from("r.wasm"));
        assert_eq!(a.status, Some(503));
        assert_eq!(a.headers, vec![("content-type".into(), "text/html".into())]);
        assert_eq!(a.elapsed_ms, Some(7));
        assert_eq!(a.limits.deadline, Duration::from_millis(50));
        assert_eq!(a.limits.fuel, Some(1000));
        assert!(parse_args(&words("--help")).unwrap().is_none());
    }

    #[test]
    fn rule_paths() {
        assert_eq!(
            split_rule_path(Path::new("x.wasm")).unwrap(),
            (PathBuf::from("."), "x.wasm".to_string())
        );
        assert_eq!(
            split_rule_path(Path::new("/a/b/x.wat")).unwrap(),
            (PathBuf::from("/a/b"), "x.wat".to_string())
        );
    }
}
