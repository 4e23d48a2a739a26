//! WASM rules against the real engine: every hostile fixture is contained within the deadline
//! and the rule set keeps serving; the example rules judge real responses from a local HTTP
//! server (through `RuleSet::evaluate` and through `sitewatch rule test`); hot reload keeps the
//! old version until a fixed one arrives; load errors are clear; threads share one rule.
//!
//! The Rust example rules are built once per run by `scripts/build-rules` (OnceLock); the WAT
//! fixtures in `tests/fixtures/rules/` need no build. Without the `wasm` feature there is no
//! engine to test (the stub's error is a unit test in `agent/src/rules/mod.rs`).
#![cfg(feature = "wasm")]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sitewatch::config::RulesConfig;
use sitewatch::rules::cli::rule_test_main;
use sitewatch::rules::{RuleInput, RuleOutcome, RuleSet, Verdict};

use crate::support::http::{HttpServer, Reply};

const DEADLINE: Duration = Duration::from_millis(200);
/// Room for a loaded 2-core machine on top of the deadline; containment, not speed, is tested.
const SLACK: Duration = Duration::from_secs(5);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/rules")
}

/// Builds the example rules once per test run and returns `rules/dist`.
pub fn examples() -> &'static Path {
    static DIST: OnceLock<PathBuf> = OnceLock::new();
    DIST.get_or_init(|| {
        let start = Instant::now();
        let out = std::process::Command::new("bash")
            .arg(repo().join("scripts/build-rules"))
            .output()
            .expect("run scripts/build-rules");
        assert!(
            out.status.success(),
            "scripts/build-rules failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "scripts/build-rules took {:?}:\n{}",
            start.elapsed(),
            String::from_utf8_lossy(&out.stdout)
        );
        repo().join("rules/dist")
    })
}

fn limits(dir: &Path) -> RulesConfig {
    RulesConfig {
        dir: dir.to_path_buf(),
        deadline: DEADLINE,
        memory_limit: 16 << 20,
        fuel: None,
    }
}

fn owned_headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn example_input<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RuleInput<'a> {
    RuleInput {
        status: 200,
        elapsed_ms: 5,
        body_truncated: false,
        tls: false,
        url: "http://127.0.0.1/",
        headers,
        body,
        error: None,
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "sitewatch-rules-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.0.join(name), bytes).expect("write rule file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The harness HTTP server and a raw client, so rules see real response bytes.

/// A response as received over the socket.
struct Fetched {
    url: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    elapsed_ms: u32,
}

impl Fetched {
    fn input(&self) -> RuleInput<'_> {
        RuleInput {
            status: self.status,
            elapsed_ms: self.elapsed_ms,
            body_truncated: false,
            tls: false,
            url: &self.url,
            headers: &self.headers,
            body: &self.body,
            error: None,
        }
    }
}

fn fetch(server: &HttpServer, path: &str) -> Fetched {
    let start = Instant::now();
    let mut conn = TcpStream::connect(server.addr()).expect("connect to the test server");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        server.addr()
    )
    .expect("send request");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).expect("read response");
    let elapsed_ms = start.elapsed().as_millis() as u32;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header block");
    let head = String::from_utf8(raw[..split].to_vec()).expect("ASCII response head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Fetched {
        url: server.url(path),
        status,
        headers,
        body: raw[split + 4..].to_vec(),
        elapsed_ms,
    }
}

/// The responses the example rules are tried on, by path.
fn test_server() -> HttpServer {
    HttpServer::start(|request, _| {
        let (status, content_type, body) = match request.path.as_str() {
            "/" => (200, "text/html", "<html><h1>Example Domain</h1></html>"),
            "/missing" => (200, "text/html", "<html>nothing here</html>"),
            "/error" => (503, "text/html", "Example Domain is down"),
            "/health" => (200, "application/json", r#"{"status":"ok","db":"up"}"#),
            "/health-bad" => (
                200,
                "application/json",
                r#"{"db":{"status":"ok"},"status":"degraded"}"#,
            ),
            "/plain" => (200, "text/plain", "Example Domain"),
            "/slow" => (200, "text/html", "Example Domain"),
            _ => (404, "text/plain", "not found"),
        };
        let reply = Reply::Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        };
        match request.path.as_str() {
            // A slow server: the answer comes 450 ms after the request (the latency rule's input).
            "/slow" => Reply::Late(Duration::from_millis(450), Box::new(reply)),
            _ => reply,
        }
    })
}

// ---------------------------------------------------------------------------------------------

/// Evaluates and checks verdict and reason; returns the outcome for further checks.
fn check_verdict(
    rules: &RuleSet,
    rule: &str,
    input: &RuleInput<'_>,
    verdict: Verdict,
    reason: Option<&str>,
) -> RuleOutcome {
    let outcome = rules
        .evaluate(rule, input)
        .unwrap_or_else(|e| panic!("{rule} on {}: {e}", input.url));
    assert_eq!(
        outcome.verdict, verdict,
        "{rule} on {}: {outcome:?}",
        input.url
    );
    match reason {
        Some(needle) => assert!(
            outcome
                .reason
                .as_deref()
                .is_some_and(|r| r.contains(needle)),
            "{rule} on {}: reason {:?} should contain {needle:?}",
            input.url,
            outcome.reason
        ),
        None => assert_eq!(outcome.reason, None, "{rule} on {}", input.url),
    }
    assert_eq!(outcome.hash.len(), 16, "{outcome:?}");
    assert!(outcome.hash.bytes().all(|b| b.is_ascii_hexdigit()));
    outcome
}

#[test]
fn hostile_rules_are_contained_and_the_set_keeps_serving() {
    let hostile: &[(&str, &str)] = &[
        (
            "loop.wat",
            "trapped in evaluate: deadline of 200ms exceeded",
        ),
        (
            "start-loop.wat",
            "trapped in instantiation: deadline of 200ms exceeded",
        ),
        ("grow.wat", "memory limit exceeded"),
        (
            "huge-memory.wat",
            "declares an initial memory of 256 MiB, above rules.memory_limit (16 MiB)",
        ),
        ("recursion.wat", "call stack exhausted"),
        ("unreachable.wat", "`unreachable` executed"),
        ("oob-write.wat", "out-of-bounds memory access"),
        (
            "bad-signature.wat",
            "exports `evaluate` as (i32) -> (i32); ABI v1 needs (i32, i32) -> (i32)",
        ),
        (
            "no-alloc.wat",
            "does not export the function `alloc` (i32) -> (i32)",
        ),
        (
            "import.wat",
            "imports wasi_snapshot_preview1.fd_write (function): a rule may not import anything",
        ),
        (
            "out-len-overflow.wat",
            "out_len is 4097, larger than the output capacity (4096 bytes)",
        ),
        (
            "bad-utf8.wat",
            "the reason is not valid UTF-8 (invalid byte at offset 4 of 13)",
        ),
        ("bad-return.wat", "evaluate returned 7"),
        (
            "bad-alloc.wat",
            "returned 2147483640, but the memory ends at 65536",
        ),
        (
            "as-abort.wat",
            "the rule called env.abort: \"boom!!\" at rule.ts:3:5",
        ),
    ];
    let mut names: Vec<&str> = hostile.iter().map(|(n, _)| *n).collect();
    names.push("keyword.wat");
    let rules = RuleSet::load(&limits(&fixtures()), &names);
    let headers = owned_headers(&[("content-type", "text/html")]);
    let input = example_input(&headers, b"<h1>Example Domain</h1>");

    for (name, expected) in hostile {
        let start = Instant::now();
        let err = rules
            .evaluate(name, &input)
            .expect_err(&format!("{name} must be a rule error"));
        let took = start.elapsed();
        assert!(
            err.message.contains(expected),
            "{name}: message {:?} should contain {expected:?}",
            err.message
        );
        assert_eq!(err.rule, *name);
        assert!(
            err.hash.as_ref().is_some_and(|h| h.len() == 16),
            "{name}: the error names the module hash: {err:?}"
        );
        assert!(
            took < DEADLINE + SLACK,
            "{name}: took {took:?}, the deadline is {DEADLINE:?}"
        );
        // The set keeps serving after every hostile rule.
        check_verdict(&rules, "keyword.wat", &input, Verdict::Up, Some("found"));
    }
}

#[test]
fn fuel_budget_stops_a_loop_and_lets_a_good_rule_finish() {
    let cfg = RulesConfig {
        fuel: Some(200_000),
        deadline: Duration::from_secs(30),
        ..limits(&fixtures())
    };
    let rules = RuleSet::load(&cfg, &["loop.wat", "keyword.wat"]);
    let headers = Vec::new();
    let input = example_input(&headers, b"Example Domain");
    let err = rules
        .evaluate("loop.wat", &input)
        .expect_err("loop runs out of fuel");
    assert!(
        err.message.contains("fuel budget of 200000 exhausted"),
        "{}",
        err.message
    );
    check_verdict(&rules, "keyword.wat", &input, Verdict::Up, Some("found"));
}

#[test]
fn load_errors_are_clear_and_become_rule_errors() {
    let dir = TempDir::new("load");
    dir.write("text.wasm", b"hello, I am not wasm");
    dir.write("empty.wasm", b"");
    dir.write("elf.wasm", b"\x7fELF\x02\x01\x01\0\0\0\0\0");
    dir.write("component.wasm", b"\0asm\x0d\0\x01\0");
    dir.write(
        "broken.wat",
        b"(module\n  (func (export \"evaluate\") (param i32 i32) (result i32)\n    (i32.const)))",
    );
    dir.write("truncated.wasm", b"\0asm\x01\0\0\0\x01\x05");
    dir.write(
        "import.wasm",
        &std::fs::read(fixtures().join("import.wat")).expect("fixture"),
    );
    let cases: &[(&str, &str)] = &[
        ("text.wasm", "is not a WebAssembly module"),
        ("empty.wasm", "is not a WebAssembly module"),
        ("elf.wasm", "is a precompiled module (.cwasm)"),
        ("component.wasm", "rules must be core modules"),
        ("broken.wat", "not a valid WebAssembly module"),
        ("truncated.wasm", "not a valid WebAssembly module"),
        ("import.wasm", "imports wasi_snapshot_preview1.fd_write"),
        ("absent.wasm", "cannot read"),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let rules = RuleSet::load(&limits(&dir.0), &names);
    let headers = Vec::new();
    let input = example_input(&headers, b"");
    for (name, expected) in cases {
        let load = rules.loaded(name).expect_err(name);
        assert!(
            load.message.contains(expected),
            "{name}: {:?}",
            load.message
        );
        let err = rules.evaluate(name, &input).expect_err(name);
        assert_eq!(
            err.message, load.message,
            "{name}: evaluate reports the load error"
        );
        assert_eq!(
            err.hash.is_some(),
            *name != "absent.wasm",
            "{name}: {err:?}"
        );
    }
    // A WAT error names the line and column.
    let broken = rules.loaded("broken.wat").expect_err("broken");
    assert!(broken.message.contains(":3:"), "{}", broken.message);
    // A name nobody loaded.
    let err = rules
        .evaluate("never.wasm", &input)
        .expect_err("not loaded");
    assert!(err.message.contains("is not loaded"), "{}", err.message);
}

#[test]
fn example_rules_judge_real_responses() {
    let dist = examples();
    let dir = TempDir::new("examples");
    for name in [
        "status_and_keyword.wasm",
        "json_health.wasm",
        "header_check.wasm",
        "latency_budget.wasm",
    ] {
        std::fs::copy(dist.join(name), dir.0.join(name)).expect("copy example rule");
    }
    std::fs::copy(fixtures().join("keyword.wat"), dir.0.join("keyword.wat")).expect("copy");
    let rules = RuleSet::load(
        &limits(&dir.0),
        &[
            "status_and_keyword.wasm",
            "json_health.wasm",
            "header_check.wasm",
            "latency_budget.wasm",
            "keyword.wat",
        ],
    );
    let server = test_server();
    let cases: &[(&str, &str, Verdict, Option<&str>)] = &[
        (
            "status_and_keyword.wasm",
            "/",
            Verdict::Up,
            Some("found \"Example Domain\""),
        ),
        (
            "status_and_keyword.wasm",
            "/missing",
            Verdict::Down,
            Some("missing \"Example Domain\""),
        ),
        (
            "status_and_keyword.wasm",
            "/error",
            Verdict::Down,
            Some("status 503 is not 2xx"),
        ),
        (
            "keyword.wat",
            "/",
            Verdict::Up,
            Some("found \"Example Domain\""),
        ),
        (
            "keyword.wat",
            "/missing",
            Verdict::Down,
            Some("missing \"Example Domain\""),
        ),
        (
            "keyword.wat",
            "/error",
            Verdict::Down,
            Some("status not 2xx"),
        ),
        ("json_health.wasm", "/health", Verdict::Up, None),
        (
            "json_health.wasm",
            "/health-bad",
            Verdict::Down,
            Some("status is \"degraded\""),
        ),
        (
            "json_health.wasm",
            "/",
            Verdict::Down,
            Some("no top-level \"status\" string"),
        ),
        (
            "json_health.wasm",
            "/error",
            Verdict::Down,
            Some("health endpoint answered 503"),
        ),
        ("header_check.wasm", "/", Verdict::Unknown, None),
        (
            "header_check.wasm",
            "/plain",
            Verdict::Down,
            Some("content-type is \"text/plain\", expected text/html"),
        ),
        ("latency_budget.wasm", "/", Verdict::Unknown, None),
        (
            "latency_budget.wasm",
            "/slow",
            Verdict::Down,
            Some("over the latency budget"),
        ),
    ];
    for (rule, path, verdict, reason) in cases {
        let response = fetch(&server, path);
        let outcome = check_verdict(&rules, rule, &response.input(), *verdict, *reason);
        if *path == "/slow" {
            let extra = outcome.extra.expect("latency extra fields");
            assert_eq!(extra["budget_ms"], 300);
            let elapsed = extra["elapsed_ms"].as_u64().expect("elapsed_ms number");
            assert_eq!(elapsed, u64::from(response.elapsed_ms));
            assert!(elapsed >= 450, "the server waited 450 ms: {elapsed}");
        } else {
            assert_eq!(outcome.extra, None, "{rule} on {path}");
        }
    }

    // A failed request: the examples defer (the agent records the transport failure).
    let headers = Vec::new();
    let failed = RuleInput {
        status: 0,
        error: Some("connection refused"),
        ..example_input(&headers, b"")
    };
    for rule in [
        "status_and_keyword.wasm",
        "json_health.wasm",
        "header_check.wasm",
        "latency_budget.wasm",
    ] {
        check_verdict(&rules, rule, &failed, Verdict::Unknown, None);
    }
}

/// Runs `rule test` and checks the exit code and that each needle is in the output.
fn check_cli(args: &[String], code: i32, needles: &[&str]) {
    let mut out = Vec::new();
    let got = rule_test_main(args, &mut out);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(got, code, "rule test {args:?}:\n{text}");
    for needle in needles {
        assert!(
            text.contains(needle),
            "rule test {args:?}: no {needle:?} in:\n{text}"
        );
    }
}

fn words(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

#[test]
fn rule_test_command_on_real_and_offline_responses() {
    let dist = examples();
    let keyword = dist.join("status_and_keyword.wasm");
    let keyword = keyword.to_str().expect("utf-8 path");
    let latency = dist.join("latency_budget.wasm");
    let latency = latency.to_str().expect("utf-8 path");
    let header = dist.join("header_check.wasm");
    let header = header.to_str().expect("utf-8 path");
    let fixtures = fixtures();
    let wat = fixtures.join("keyword.wat");
    let wat = wat.to_str().expect("utf-8 path");
    let looping = fixtures.join("loop.wat");
    let looping = looping.to_str().expect("utf-8 path");
    let server = test_server();
    let closed = crate::support::free_port();
    let body = TempDir::new("cli");
    body.write("body.html", b"<p>Example Domain</p>");
    let body_file = body.0.join("body.html");
    let body_file = body_file.to_str().expect("utf-8 path");

    check_cli(
        &words(&[keyword, "--url", &server.url("/")]),
        0,
        &[
            "verdict  up",
            "reason   found \"Example Domain\"",
            "-> 200, 36 body bytes",
            "time     ",
            "(hash ",
        ],
    );
    check_cli(
        &words(&[wat, "--url", &server.url("/missing")]),
        1,
        &["verdict  down", "reason   missing \"Example Domain\""],
    );
    check_cli(
        &words(&[latency, "--url", &server.url("/slow")]),
        1,
        &[
            "verdict  down",
            "reason   over the latency budget",
            "extra    {\"budget_ms\":300,\"elapsed_ms\":",
        ],
    );
    check_cli(
        &words(&[keyword, "--url", &format!("http://127.0.0.1:{closed}/")]),
        2,
        &["request failed", "verdict  unknown"],
    );
    check_cli(
        &words(&[keyword, "--status", "503", "--body-file", body_file]),
        1,
        &[
            "input    offline: -> 503, 21 body bytes",
            "reason   status 503 is not 2xx",
        ],
    );
    check_cli(
        &words(&[keyword, "--body-file", body_file]),
        0,
        &["verdict  up"],
    );
    check_cli(
        &words(&[header, "--header", "Content-Type: text/plain"]),
        1,
        &["reason   content-type is \"text/plain\", expected text/html"],
    );
    check_cli(
        &words(&[looping, "--deadline", "50ms"]),
        3,
        &["error    trapped in evaluate: deadline of 50ms exceeded"],
    );
    let import = fixtures.join("import.wat");
    check_cli(
        &words(&[import.to_str().expect("utf-8 path")]),
        3,
        &["error    imports wasi_snapshot_preview1.fd_write"],
    );
    check_cli(
        &words(&[keyword, "--url"]),
        64,
        &["--url needs a value", "usage:"],
    );
    check_cli(
        &words(&[keyword, "--body-file", "/nonexistent/body"]),
        64,
        &["error: --body-file /nonexistent/body"],
    );
}

#[test]
fn the_engine_starts_only_when_a_rule_is_named() {
    let dir = TempDir::new("lazy");
    let (good, _) = keyword_versions();
    dir.write("rule.wat", &good);
    let headers = Vec::new();
    let input = example_input(&headers, b"Example Domain");

    // Regex-only config: no engine, no rule-epoch thread; a stray name is a clear error.
    let rules = RuleSet::load(&limits(&dir.0), &[]);
    assert!(!rules.engine_started());
    rules.reload(&[]);
    assert!(!rules.engine_started(), "an empty reload starts nothing");
    let err = rules.evaluate("rule.wat", &input).unwrap_err();
    assert!(err.message.contains("is not loaded"), "{}", err.message);

    // A reload (SIGHUP) that names the first rule starts the engine, for every clone.
    let clone = rules.clone();
    rules.reload(&["rule.wat"]);
    assert!(clone.engine_started());
    check_verdict(&clone, "rule.wat", &input, Verdict::Up, Some("found"));

    // Dropping every rule drops them from the running engine too.
    rules.reload(&[]);
    let err = clone.evaluate("rule.wat", &input).unwrap_err();
    assert!(err.message.contains("is not loaded"), "{}", err.message);
}

/// The WAT keyword rule, and a second version of it looking for another keyword.
fn keyword_versions() -> (Vec<u8>, Vec<u8>) {
    let good = std::fs::read_to_string(fixtures().join("keyword.wat")).expect("fixture");
    let other = good.replace("Example Domain", "Example Dxmain");
    (good.into_bytes(), other.into_bytes())
}

#[test]
fn reload_keeps_the_old_version_until_a_fixed_one_arrives() {
    let dir = TempDir::new("reload");
    let (good, other) = keyword_versions();
    let broken = b"(module (func $oops".to_vec();
    dir.write("rule.wat", &good);
    dir.write("late.wat", &broken);
    let names = ["rule.wat", "late.wat"];
    let rules = RuleSet::load(&limits(&dir.0), &names);
    let headers = Vec::new();
    let input = example_input(&headers, b"Example Domain");

    let first = check_verdict(&rules, "rule.wat", &input, Verdict::Up, Some("found"));
    assert!(
        rules.evaluate("late.wat", &input).is_err(),
        "broken from the start"
    );

    // Broken new version: logged, the old one keeps serving with its hash.
    dir.write("rule.wat", &broken);
    rules.reload(&names);
    let still = check_verdict(&rules, "rule.wat", &input, Verdict::Up, Some("found"));
    assert_eq!(still.hash, first.hash);

    // Fixed (and different) version: swapped in, new hash, new behaviour.
    dir.write("rule.wat", &other);
    dir.write("late.wat", &good);
    rules.reload(&names);
    let fixed = check_verdict(
        &rules,
        "rule.wat",
        &input,
        Verdict::Down,
        Some("missing \"Example Dxmain\""),
    );
    assert_ne!(fixed.hash, first.hash);
    let late = check_verdict(&rules, "late.wat", &input, Verdict::Up, Some("found"));
    assert_eq!(late.hash, first.hash, "same bytes, same hash");

    // A clone made before the reload sees the same table.
    let clone = rules.clone();
    rules.reload(&["late.wat"]);
    let gone = clone
        .evaluate("rule.wat", &input)
        .expect_err("dropped from the set");
    assert!(gone.message.contains("is not loaded"), "{}", gone.message);
    check_verdict(&clone, "late.wat", &input, Verdict::Up, Some("found"));
}

#[test]
fn four_threads_share_one_rule_while_another_loops() {
    let dist = examples();
    let dir = TempDir::new("threads");
    std::fs::copy(
        dist.join("status_and_keyword.wasm"),
        dir.0.join("status_and_keyword.wasm"),
    )
    .expect("copy");
    std::fs::copy(fixtures().join("loop.wat"), dir.0.join("loop.wat")).expect("copy");
    let rules = RuleSet::load(&limits(&dir.0), &["status_and_keyword.wasm", "loop.wat"]);
    let hash = rules.loaded("status_and_keyword.wasm").expect("loaded");

    let looping = {
        let rules = rules.clone();
        std::thread::spawn(move || {
            let headers = Vec::new();
            let input = example_input(&headers, b"");
            (0..3).all(|_| rules.evaluate("loop.wat", &input).is_err())
        })
    };
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let rules = rules.clone();
            std::thread::spawn(move || {
                let mut verdicts = BTreeMap::new();
                let headers = owned_headers(&[("content-type", "text/html")]);
                for i in 0..50 {
                    let body = if (t + i) % 2 == 0 {
                        "Example Domain"
                    } else {
                        "other"
                    };
                    let input = example_input(&headers, body.as_bytes());
                    let outcome = rules
                        .evaluate("status_and_keyword.wasm", &input)
                        .expect("a good rule never errors");
                    assert_eq!(outcome.verdict == Verdict::Up, body == "Example Domain");
                    *verdicts.entry(outcome.hash).or_insert(0) += 1;
                }
                verdicts
            })
        })
        .collect();
    for w in workers {
        let verdicts = w.join().expect("worker thread");
        assert_eq!(verdicts, BTreeMap::from([(hash.clone(), 50)]));
    }
    assert!(
        looping.join().expect("loop thread"),
        "every loop evaluation is a rule error"
    );
}

#[test]
fn rules_from_other_toolchains_follow_the_abi() {
    // Binaries built from the sources beside them (commands in their first line), so the ABI
    // as documented in rules/README.md is proven with real C and AssemblyScript output.
    let dir = fixtures().join("foreign");
    let rules = RuleSet::load(&limits(&dir), &["c_rule.wasm", "assemblyscript.wasm"]);
    let headers = Vec::new();
    type Expected = Result<(Verdict, Option<&'static str>), &'static str>;
    let cases: &[(&str, u16, Expected)] = &[
        ("c_rule.wasm", 200, Ok((Verdict::Up, None))),
        ("c_rule.wasm", 500, Ok((Verdict::Down, Some("bad status")))),
        ("assemblyscript.wasm", 204, Ok((Verdict::Up, None))),
        (
            "assemblyscript.wasm",
            503,
            Ok((Verdict::Down, Some("bad status 503"))),
        ),
        (
            "assemblyscript.wasm",
            418,
            Err("the rule called env.abort: \"teapot\" at assembly/index.ts:8:3"),
        ),
    ];
    for (rule, status, expected) in cases {
        let input = RuleInput {
            status: *status,
            ..example_input(&headers, b"")
        };
        match expected {
            Ok((verdict, reason)) => {
                check_verdict(&rules, rule, &input, *verdict, *reason);
            }
            Err(needle) => {
                let err = rules.evaluate(rule, &input).expect_err(rule);
                assert!(err.message.contains(needle), "{rule}: {}", err.message);
            }
        }
    }
}

#[test]
fn the_watcher_picks_up_a_changed_file() {
    let dir = TempDir::new("watch");
    let (good, other) = keyword_versions();
    dir.write("rule.wat", &good);
    let rules = RuleSet::load(&limits(&dir.0), &["rule.wat"]);
    let headers = Vec::new();
    let input = example_input(&headers, b"Example Domain");
    let first = check_verdict(&rules, "rule.wat", &input, Verdict::Up, Some("found"));

    // A broken file, read by a reload pass (the one SIGHUP runs, on this thread, so the test
    // knows it happened), never replaces the serving rule.
    dir.write("rule.wat", b"(module (func $broken");
    rules.reload(&["rule.wat"]);
    let still = check_verdict(&rules, "rule.wat", &input, Verdict::Up, Some("found"));
    assert_eq!(
        still.hash, first.hash,
        "a broken file never replaces a serving rule"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = rules
        .watch(
            vec!["rule.wat".into()],
            Duration::from_millis(20),
            stop.clone(),
        )
        .expect("spawn watcher");
    // Write to a temp name and rename, as deploy tools do, so the watcher never sees half a file.
    dir.write("rule.wat.tmp", &other);
    std::fs::rename(dir.0.join("rule.wat.tmp"), dir.0.join("rule.wat")).expect("rename");
    crate::support::wait_for(
        "the watcher to reload the changed file",
        Duration::from_secs(30),
        || {
            rules
                .loaded("rule.wat")
                .is_ok_and(|hash| hash != first.hash)
        },
    );
    let changed = rules.evaluate("rule.wat", &input).expect("serving");
    assert_eq!(changed.verdict, Verdict::Down);
    assert_eq!(
        changed.reason.as_deref(),
        Some("missing \"Example Dxmain\"")
    );
    stop.store(true, Ordering::SeqCst);
    watcher.join().expect("watcher thread");
}

#[test]
fn large_bodies_grow_memory_up_to_the_limit() {
    let dist = examples();
    let cfg = RulesConfig {
        memory_limit: 4 << 20,
        ..limits(dist)
    };
    let rules = RuleSet::load(&cfg, &["status_and_keyword.wasm"]);
    let headers = Vec::new();
    // 3 MiB with the keyword at the very end: the SDK's allocator grows memory to hold it.
    let mut body = vec![b'x'; 3 << 20];
    body.extend_from_slice(b"Example Domain");
    check_verdict(
        &rules,
        "status_and_keyword.wasm",
        &example_input(&headers, &body),
        Verdict::Up,
        Some("found"),
    );
    // 5 MiB cannot fit under a 4 MiB limit: a rule error naming the limit, then business as usual.
    let huge = vec![b'x'; 5 << 20];
    let err = rules
        .evaluate("status_and_keyword.wasm", &example_input(&headers, &huge))
        .expect_err("over the memory limit");
    assert!(
        err.message.starts_with("alloc: memory limit exceeded"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("rules.memory_limit is 4 MiB"),
        "{}",
        err.message
    );
    check_verdict(
        &rules,
        "status_and_keyword.wasm",
        &example_input(&headers, b"Example Domain"),
        Verdict::Up,
        Some("found"),
    );
}
