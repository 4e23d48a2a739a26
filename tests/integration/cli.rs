//! The real `sitewatch` binary, run as a user would: config errors, check-config, `--once`
//! output and exit codes.

use std::path::{Path, PathBuf};

use std::process::Output;

use sitewatch::config::Config;
use sitewatch::result::{CheckResult, FailureReason};

use crate::support::http::fixture;
use crate::support::{TempDir, free_port, sitewatch};

fn run(args: &[&str], dir: &Path) -> Output {
    sitewatch().args(args).current_dir(dir).output().unwrap()
}

fn once_json(cfg: &Path, dir: &Path) -> Output {
    run(
        &[
            "--once",
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "json",
        ],
        dir,
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn records(o: &Output) -> Vec<CheckResult> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| CheckResult::from_json(l.as_bytes()).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `check_config_error(config text, expected message part)`: exit 3 and a precise message.
fn check_config_error(text: &str, expected: &str) {
    let dir = TempDir::new("cfgerr");
    let cfg = write(&dir, "agent.toml", text);
    for args in [
        vec!["--once", "--config", cfg.to_str().unwrap()],
        vec!["check-config", "--config", cfg.to_str().unwrap()],
    ] {
        let o = run(&args, dir.path());
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains(expected),
            "{args:?}\n got: {err}\nwant: {expected}"
        );
        assert!(o.stdout.is_empty(), "nothing on stdout for a bad config");
    }
}

#[test]
fn bad_configs_refuse_to_start_with_a_precise_message() {
    let t = "[[target]]\nid = \"shop\"\nurl = \"http://127.0.0.1:1/\"\n";
    check_config_error(
        &format!("{t}intervall = \"30s\"\n"),
        "agent.toml: line 4, column 1: unknown field `intervall`",
    );
    check_config_error(
        &format!("{t}interval = \"5x\"\n"),
        "agent.toml: target \"shop\": interval \"5x\": expected a duration like \"30s\"",
    );
    check_config_error(
        &format!("{t}regex = \"(a\"\n"),
        "target \"shop\": regex \"(a\": invalid regex",
    );
    check_config_error("[agent\n", "agent.toml: line 1");
    // Out of range is refused, not clamped (config.rs lists every such key).
    check_config_error(
        &format!("{t}retries = 50\n"),
        "agent.toml: target \"shop\": retries 50: expected 0 to 10",
    );
}

#[test]
fn missing_config_file_is_named() {
    let dir = TempDir::new("nocfg");
    let o = run(&["--once", "--config", "nope.toml"], dir.path());
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("nope.toml: cannot read"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_3() {
    let dir = TempDir::new("usage");
    for (args, expected) in [
        (vec![], "no command given"),
        (vec!["--bogus"], "unknown argument \"--bogus\""),
        (
            vec!["--once", "--format", "xml"],
            "--format \"xml\": expected json or table",
        ),
        (vec!["agent", "sink"], "two commands given"),
    ] {
        let o = run(&args, dir.path());
        assert_eq!(o.status.code(), Some(3), "{args:?}");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
    let o = run(&["--version"], dir.path());
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("sitewatch "));
}

#[test]
fn check_config_prints_effective_config_with_secrets_masked() {
    let dir = TempDir::new("checkcfg");
    let cfg = write(
        &dir,
        "agent.toml",
        "[agent]\nid = \"edge-1\"\n[postgres]\nurl = \"postgres://u:pg-secret-1@127.0.0.1/db\"\n\
         [kafka]\nbrokers = [\"127.0.0.1:9092\"]\n[kafka.sasl]\nusername = \"u\"\n\
         [[target]]\nid = \"a\"\nurl = \"http://127.0.0.1:1/\"\nheaders = { Authorization = \"Bearer tok-secret-2\" }\n\
         [[target]]\nid = \"b\"\nurl = \"http://admin:url-secret-4@127.0.0.1:1/\"\n\
         headers = { X-Password = \"hdr-secret-5\", Apikey = \"hdr-secret-6\" }\n",
    );
    let o = sitewatch()
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .env("SITEWATCH_KAFKA_SASL_PASSWORD", "sasl-secret-3")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    for secret in [
        "pg-secret-1",
        "tok-secret-2",
        "sasl-secret-3",
        "url-secret-4",
        "hdr-secret-5",
        "hdr-secret-6",
    ] {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
    assert!(all.contains("id = \"edge-1\""), "{all}");
    assert!(all.contains("url = \"postgres://u@127.0.0.1/db\""), "{all}");
    assert!(all.contains("url = \"http://admin@127.0.0.1:1/\""), "{all}");
    assert!(
        all.contains("interval = \"30s\""),
        "defaults are shown: {all}"
    );
}

/// The every-key fixture and the files it names, in `dir`.
fn every_key_config(dir: &TempDir) -> PathBuf {
    write(dir, "sasl-password", "sasl-secret-2\n");
    write(dir, "pg-password", "pg-secret-3\n");
    write(dir, "target-ca.pem", "not read at load");
    write(
        dir,
        "hook-url",
        "http://127.0.0.1:9/hook?token=hook-url-secret-4\n",
    );
    write(dir, "hook-secret", "hook-secret-5\n");
    write(
        dir,
        "slack-url",
        "http://127.0.0.1:9/services/T0/B0/slack-secret-6\n",
    );
    write(dir, "pd-url", "http://127.0.0.1:9/v2/enqueue\n");
    write(dir, "pd-key", "pd-secret-7\n");
    let mut text = std::fs::read_to_string(fixture("config/every-key.toml")).unwrap();
    if !cfg!(feature = "wasm") {
        // Without the rule engine a `rule` is refused.
        text = text.replace("rule = \"status_ok.wasm\"\n", "");
    }
    if !cfg!(feature = "serve") {
        // Without the status page `[serve]` is refused.
        text = text.replace(
            "[serve]\nlisten = \"127.0.0.1:9782\"\nconnections = 7\n",
            "",
        );
    }
    if !cfg!(feature = "alerts") {
        // Without alerts `[alerts]` is refused; its tables come just before `[metrics]`.
        if let (Some(a), Some(m)) = (text.find("\n[alerts]"), text.find("\n[metrics]")) {
            text.replace_range(a..m, "");
        }
    }
    if !cfg!(feature = "metrics") {
        // Without the listener `[metrics]` is refused; it is the file's last table.
        text.truncate(text.find("\n[metrics]").unwrap_or(text.len()) + 1);
    }
    if !cfg!(feature = "fleet") {
        // Without the fleet `[fleet]` is refused.
        let start = text.find("[fleet]\n").unwrap_or(0);
        let end = start + text[start..].find("\n\n").map_or(0, |i| i + 2);
        text.replace_range(start..end, "");
    }
    write(dir, "agent.toml", &text)
}

#[test]
fn check_config_output_is_a_config_that_prints_back_to_itself() {
    let dir = TempDir::new("checkcfg-again");
    let original = every_key_config(&dir);
    let check_config = |path: &Path| {
        let o = run(
            &["check-config", "--config", path.to_str().unwrap()],
            dir.path(),
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let first = check_config(&original);
    for secret in [
        "key-secret-1",
        "sasl-secret-2",
        "pg-secret-3",
        "hook-url-secret-4",
        "hook-secret-5",
        "slack-secret-6",
        "pd-secret-7",
    ] {
        assert!(!first.contains(secret), "{secret} shown:\n{first}");
    }
    let printed = write(&dir, "printed.toml", &first);
    let second = check_config(&printed);
    // The same text, but for the line naming the file and the masked header, which is a
    // comment and so not part of the printed config.
    let body = |text: &str| -> Vec<String> {
        (text.lines())
            .filter(|l| !l.starts_with("# effective configuration from "))
            .filter(|l| !l.starts_with("# headers."))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(body(&second), body(&first));
    // And the same values.
    let no_env = |_: &str| None;
    let mut want = Config::load_with_env(&original, &no_env).unwrap();
    let got = Config::load_with_env(&printed, &no_env).unwrap();
    want.source = got.source.clone();
    std::sync::Arc::make_mut(&mut want.targets[0])
        .headers
        .retain(|(name, _)| name != "X-Api-Key");
    assert_eq!(want, got, "printed:\n{first}");
}

#[test]
fn a_postgres_password_in_the_url_query_is_never_printed() {
    let dir = TempDir::new("pg-query-password");
    let port = free_port();
    let cfg = write(
        &dir,
        "agent.toml",
        &format!(
            "[postgres]\nurl = \"postgres://sitewatch@127.0.0.1:{port}/db?password=query-secret-7&connect_timeout=5\"\n\
             sslmode = \"disable\"\n"
        ),
    );
    let shown = format!("postgres://sitewatch@127.0.0.1:{port}/db?connect_timeout=5");
    for (command, code) in [("check-config", 0), ("init-db", 3)] {
        let o = run(&[command, "--config", cfg.to_str().unwrap()], dir.path());
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert_eq!(o.status.code(), Some(code), "{command}: {all}");
        assert!(!all.contains("query-secret-7"), "{command}: {all}");
        assert!(all.contains(&shown), "{command}: {all}");
    }
}

#[test]
fn once_all_down_exits_2_with_a_full_failure_record() {
    let dir = TempDir::new("once-down");
    let port = free_port();
    let cfg = write(
        &dir,
        "agent.toml",
        &format!(
            "[agent]\nid = \"t\"\ntimeout = \"3s\"\n[[target]]\nid = \"closed\"\nurl = \"http://127.0.0.1:{port}/\"\ntags = [\"x\"]\n"
        ),
    );
    let o = once_json(&cfg, dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let recs = records(&o);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.target, "closed");
    assert_eq!(r.agent, "t");
    assert!(!r.up);
    assert_eq!(r.failure, Some(FailureReason::Connect), "{r:?}");
    assert!(r.error.as_deref().is_some_and(|e| !e.is_empty()));
    assert_eq!(r.status, None);
    assert_eq!(r.tags, vec!["x".to_string()]);
    assert!(r.timings.total > 0.0);
}

#[test]
fn once_goes_straight_to_the_target_whatever_proxy_the_environment_names() {
    let server = crate::support::http::HttpServer::start(|_, _| {
        crate::support::http::Reply::status(200, "direct")
    });
    let dir = TempDir::new("once-proxy-env");
    let cfg = write(
        &dir,
        "agent.toml",
        &format!(
            "[[target]]\nid = \"direct\"\nurl = {:?}\nregex = \"direct\"\n",
            server.url("/")
        ),
    );
    // A proxy that does not exist: a check that used it would fail.
    let proxy = format!("http://127.0.0.1:{}", free_port());
    let mut cmd = sitewatch();
    cmd.args([
        "--once",
        "--config",
        cfg.to_str().unwrap(),
        "--format",
        "json",
    ])
    .current_dir(dir.path());
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env(var, &proxy);
    }
    cmd.env_remove("NO_PROXY").env_remove("no_proxy");
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let recs = records(&o);
    assert_eq!(recs.len(), 1);
    assert!(recs[0].up, "{:?}", recs[0]);
    assert_eq!(recs[0].regex_matched, Some(true));
    assert_eq!(server.requests().len(), 1, "the request reached the target");
}

#[test]
fn once_table_format_is_readable() {
    let dir = TempDir::new("once-table");
    let port = free_port();
    let cfg = write(
        &dir,
        "agent.toml",
        &format!("[[target]]\nid = \"closed\"\nurl = \"http://127.0.0.1:{port}/\"\n"),
    );
    let o = run(
        &[
            "--once",
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "table",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("TARGET"));
    assert!(
        lines[1].starts_with("closed") && lines[1].contains("NO") && lines[1].contains("connect"),
        "{text}"
    );
}

pub fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[cfg(feature = "wasm")]
#[test]
fn once_with_a_dropped_in_rule_shows_its_verdict_and_reason() {
    // As a user would: copy an example rule into the rules directory, point targets at it.
    let dir = TempDir::new("once-rule");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::copy(
        crate::rules::examples().join("json_health.wasm"),
        rules.join("json_health.wasm"),
    )
    .unwrap();
    let site = crate::support::http::HttpServer::start(|req, _| match req.path.as_str() {
        "/ok" => crate::support::http::Reply::status(200, r#"{"status":"ok"}"#),
        _ => crate::support::http::Reply::status(200, r#"{"status":"degraded"}"#),
    });
    let cfg = write(
        &dir,
        "agent.toml",
        &format!(
            "[rules]\ndir = \"rules\"\n\
             [[target]]\nid = \"healthy\"\nurl = \"{}\"\nrule = \"json_health.wasm\"\n\
             [[target]]\nid = \"degraded\"\nurl = \"{}\"\nrule = \"json_health.wasm\"\n",
            site.url("/ok"),
            site.url("/bad")
        ),
    );
    let o = once_json(&cfg, dir.path());
    assert_eq!(o.status.code(), Some(1), "one up, one down: {}", stderr(&o));
    let recs = records(&o);
    let get = |id: &str| recs.iter().find(|r| r.target == id).unwrap();
    let (ok, bad) = (get("healthy"), get("degraded"));
    assert!(ok.up && ok.rule_verdict.as_deref() == Some("up"), "{ok:?}");
    assert_eq!(ok.rule.as_deref(), Some("json_health.wasm"));
    assert_eq!(ok.rule_hash.as_ref().map(String::len), Some(16));
    assert!(ok.rule_ms.is_some());
    assert!(
        !bad.up && bad.failure == Some(FailureReason::Rule),
        "{bad:?}"
    );
    assert_eq!(bad.rule_verdict.as_deref(), Some("down"));
    assert!(
        bad.rule_reason
            .as_deref()
            .is_some_and(|r| r.contains("degraded")),
        "{bad:?}"
    );
}

#[test]
fn daemons_refuse_configs_they_cannot_run_with_exit_78() {
    let dir = TempDir::new("daemon-cfg");
    let t = "[[target]]\nid = \"a\"\nurl = \"http://127.0.0.1:1/\"\n";
    let check = |args: &[&str], text: &str, expected: &str| {
        let cfg = write(&dir, "agent.toml", text);
        let mut all = args.to_vec();
        all.extend(["--config", cfg.to_str().unwrap()]);
        let o = run(&all, dir.path());
        assert_eq!(o.status.code(), Some(78), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    };
    check(
        &["agent"],
        &format!("{t}interval = \"5x\"\n"),
        "target \"a\": interval \"5x\"",
    );
    check(&["agent"], t, "`sitewatch agent` needs a [kafka] section");
    check(
        &["sink"],
        t,
        "the sink needs [kafka] and [postgres] sections",
    );
    check(
        &["run"],
        "[kafka]\nbrokers = [\"127.0.0.1:1\"]\n",
        "the sink needs [kafka] and [postgres] sections",
    );
}
