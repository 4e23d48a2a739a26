//! Alerts end to end: records produced to a real broker, a real sink deciding transitions in
//! PostgreSQL, real HTTP receivers on 127.0.0.1 for the webhook, Slack and PagerDuty channels.
#![cfg(feature = "alerts")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use sitewatch::config::Config;
use sitewatch::result::{CheckResult, FailureReason};
use sitewatch::service::Shutdown;
use sitewatch::sink::Sink;
use sitewatch::util::parse_rfc3339_ms;

use crate::sink::{Pipeline, SinkProcess, record};
use crate::support::http::{HttpServer, Reply, Request};
use crate::support::wait_for;

/// One generous deadline for everything a test waits on (the machine is shared).
const WITHIN: Duration = Duration::from_secs(120);
const HOOK_SECRET: &str = "hook-secret-for-tests";
const ROUTING_KEY: &str = "R0UT1NGKEY0123456789abcdefABCDEF";

/// The three receivers: a webhook that honours `Idempotency-Key` only in what the tests
/// count, a Slack and a PagerDuty stand-in answering as the real services do.
struct Receivers {
    hook: HttpServer,
    slack: HttpServer,
    pd: HttpServer,
}

impl Receivers {
    fn start() -> Receivers {
        Receivers::with_hook(HttpServer::start(|_, _| Reply::status(200, "")))
    }

    fn with_hook(hook: HttpServer) -> Receivers {
        Receivers {
            hook,
            slack: HttpServer::start(|_, _| Reply::status(200, "ok")),
            pd: HttpServer::start(|_, _| Reply::Response {
                status: 202,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: br#"{"status":"success","message":"Event processed"}"#.to_vec(),
            }),
        }
    }

    /// The channel secrets, as the sink's environment.
    fn env(&self) -> impl Fn(&str) -> Option<String> + use<> {
        let (hook, slack, pd) = (
            self.hook.url("/hook"),
            self.slack.url("/services/T0/B0/xyz"),
            self.pd.url("/v2/enqueue"),
        );
        move |k: &str| match k {
            "HOOK_URL" => Some(hook.clone()),
            "HOOK_SECRET" => Some(HOOK_SECRET.into()),
            "SLACK_URL" => Some(slack.clone()),
            "PD_URL" => Some(pd.clone()),
            "PD_KEY" => Some(ROUTING_KEY.into()),
            _ => None,
        }
    }
}

/// `[alerts]` with the three channels, then `extra` (overrides, windows).
fn alerts_text(defaults: &str, extra: &str) -> String {
    format!(
        "[alerts]\n{defaults}\n\
         [[alerts.channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl_env = \"HOOK_URL\"\n\
         secret_env = \"HOOK_SECRET\"\ntimeout = \"2s\"\n\
         [[alerts.channel]]\nname = \"slack\"\nkind = \"slack\"\nurl_env = \"SLACK_URL\"\n\
         [[alerts.channel]]\nname = \"pd\"\nkind = \"pagerduty\"\nurl_env = \"PD_URL\"\n\
         routing_key_env = \"PD_KEY\"\n\
         {extra}"
    )
}

fn config(p: &Pipeline, alerts: &str, env: &dyn Fn(&str) -> Option<String>) -> Config {
    let text = format!("{}\n{alerts}", p.config_text());
    Config::parse(&text, std::path::Path::new("test.toml"), env).expect("config")
}

fn start_sink(p: &Pipeline, alerts: &str, r: &Receivers) -> (Sink, Shutdown) {
    let shutdown = Shutdown::new();
    let sink = Sink::start(&config(p, alerts, &r.env()), &shutdown).expect("sink starts");
    (sink, shutdown)
}

/// `n` checks of `target`, failing or not, 1 s apart, the last one `end_ago_ms` ago.
fn checks(target: &str, pattern: &[bool], end_ago_ms: i64) -> Vec<CheckResult> {
    let n = pattern.len() as i64;
    (pattern.iter().enumerate())
        .map(|(i, &up)| {
            let failure = (!up).then_some(FailureReason::Connect);
            record(
                target,
                end_ago_ms + (n - 1 - i as i64) * 1000,
                failure,
                12.0,
            )
        })
        .collect()
}

/// `targets` targets checked in rounds (up or not per `pattern`), 1 s apart: round by round,
/// so every fetch carries part of each target's history.
fn rounds(prefix: &str, targets: usize, pattern: &[bool]) -> Vec<CheckResult> {
    let mut records = Vec::new();
    for (i, &up) in pattern.iter().enumerate() {
        for t in 0..targets {
            let ago = (pattern.len() - i) as i64 * 1000;
            let failure = (!up).then_some(FailureReason::Timeout);
            records.push(record(&format!("{prefix}{t:03}"), ago, failure, 5.0));
        }
    }
    records
}

/// (target, kind, reason) of every outbox event, oldest first.
fn events(p: &Pipeline) -> Vec<(String, String, String)> {
    let mut c = p.db.client();
    c.query(
        "SELECT target, kind, reason FROM alert_events ORDER BY id",
        &[],
    )
    .expect("events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).expect(sql).get(0)
}

/// Deliveries marked delivered, over every channel.
fn delivered(p: &Pipeline) -> i64 {
    let sql = "SELECT count(*) FROM alert_deliveries WHERE state = 'delivered'";
    count(&mut p.db.client(), sql)
}

fn json(r: &Request) -> Value {
    serde_json::from_slice(&r.body).expect("a JSON body")
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().expect("an object").keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn wait_requests(server: &HttpServer, n: usize, what: &str) {
    wait_for(what, WITHIN, || server.requests().len() >= n);
}

/// The webhook request: JSON with our fields, the HMAC-SHA256 signature of the exact body,
/// the event's key as the idempotency key.
fn check_webhook(r: &Request, target: &str, kind: &str) -> String {
    assert_eq!(r.method, "POST");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(&r.body);
    let hex: String = (mac.finalize().into_bytes().iter())
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        r.header("x-sitewatch-signature"),
        Some(format!("sha256={hex}").as_str())
    );
    let v = json(r);
    assert_eq!(v["target"], target);
    assert_eq!(v["kind"], kind);
    let key = v["id"].as_str().expect("id").to_string();
    assert_eq!(r.header("idempotency-key"), Some(key.as_str()));
    key
}

/// Slack incoming webhooks take `text` (the notification fallback, required when blocks are
/// given) and `blocks`; a `section` block's `text` is a text object (`mrkdwn`, at most 3000
/// characters).
fn check_slack(r: &Request, target: &str) {
    assert_eq!(r.path, "/services/T0/B0/xyz");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = json(r);
    assert_eq!(keys(&v), set(&["text", "blocks"]));
    let text = v["text"].as_str().expect("text is a string");
    assert!(text.contains(target), "{text}");
    let blocks = v["blocks"].as_array().expect("blocks is an array");
    assert_eq!(blocks.len(), 1);
    assert_eq!(keys(&blocks[0]), set(&["type", "text"]));
    assert_eq!(blocks[0]["type"], "section");
    assert_eq!(keys(&blocks[0]["text"]), set(&["type", "text"]));
    assert_eq!(blocks[0]["text"]["type"], "mrkdwn");
    let section = blocks[0]["text"]["text"].as_str().expect("section text");
    assert!(!section.is_empty() && section.chars().count() <= 3000);
}

/// PagerDuty Events API v2: a trigger has `routing_key`, `event_action`, `dedup_key` and a
/// `payload` with the required `summary` (≤ 1024 chars), `source` and `severity` (critical,
/// error, warning or info) and optional `timestamp` (ISO 8601), `component`, `group`,
/// `class`, `custom_details`; a resolve needs only `routing_key`, `event_action` and the
/// trigger's `dedup_key`. Returns the dedup key.
fn check_pagerduty(r: &Request, action: &str, target: &str, severity: &str) -> String {
    assert_eq!(r.path, "/v2/enqueue");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = json(r);
    assert_eq!(v["routing_key"], ROUTING_KEY);
    assert_eq!(v["event_action"], action);
    let dedup = v["dedup_key"].as_str().expect("dedup_key").to_string();
    assert!(!dedup.is_empty() && dedup.len() <= 255);
    if action == "resolve" {
        assert_eq!(keys(&v), set(&["routing_key", "event_action", "dedup_key"]));
        return dedup;
    }
    let top = keys(&v);
    let allowed = set(&[
        "routing_key",
        "event_action",
        "dedup_key",
        "payload",
        "client",
        "client_url",
        "links",
        "images",
    ]);
    assert!(top.is_subset(&allowed), "{top:?}");
    let p = &v["payload"];
    let fields = keys(p);
    let allowed = set(&[
        "summary",
        "source",
        "severity",
        "timestamp",
        "component",
        "group",
        "class",
        "custom_details",
    ]);
    assert!(fields.is_subset(&allowed), "{fields:?}");
    let summary = p["summary"].as_str().expect("summary");
    assert!(summary.contains(target) && summary.chars().count() <= 1024);
    assert!(!p["source"].as_str().expect("source").is_empty());
    assert_eq!(p["severity"], severity);
    assert!(parse_rfc3339_ms(p["timestamp"].as_str().expect("timestamp")).is_some());
    assert_eq!(p["component"], target);
    assert!(p["custom_details"].is_object());
    dedup
}

/// Issue 16, shown 1 and 5: three failures → one down event, delivered once to each
/// channel; two successes → one resolve; flapping below the thresholds, or one failure
/// delivered thrice by Kafka, → nothing. The
/// payloads match the webhook, Slack and PagerDuty formats field by field.
#[test]
fn three_failures_alert_once_two_successes_resolve_and_flapping_sends_nothing() {
    let p = Pipeline::new(2);
    let r = Receivers::start();
    let (sink, shutdown) = start_sink(&p, &alerts_text("", ""), &r);
    let mut first = checks("flappy", &[false, false, true, false, false, true], 60_000);
    first.extend(checks("shop", &[true, false, false, false, false], 50_000));
    // One failed check delivered three times (a producer retrying) counts once.
    let dup = checks("dup", &[false], 55_000).remove(0);
    first.extend([dup.clone(), dup.clone(), dup.clone()]);
    p.produce(&first);
    wait_requests(&r.hook, 1, "the down event at the webhook");
    wait_requests(&r.slack, 1, "the down event at Slack");
    wait_requests(&r.pd, 1, "the down event at PagerDuty");
    let mut second = checks("shop", &[true, false, true, true], 10_000);
    second.extend([dup.clone(), dup]);
    p.produce(&second);
    wait_requests(&r.hook, 2, "the resolve at the webhook");
    wait_requests(&r.slack, 2, "the resolve at Slack");
    wait_requests(&r.pd, 2, "the resolve at PagerDuty");
    p.wait_offsets_at_end();
    let kinds: Vec<(String, String)> = events(&p).into_iter().map(|(t, k, _)| (t, k)).collect();
    let want = [("shop", "down"), ("shop", "resolved")].map(|(t, k)| (t.into(), k.into()));
    assert_eq!(kinds, want);

    let hook = r.hook.requests();
    assert_eq!(hook.len(), 2, "once per event");
    let down_key = check_webhook(&hook[0], "shop", "down");
    let up_key = check_webhook(&hook[1], "shop", "resolved");
    assert_ne!(down_key, up_key);
    let slack = r.slack.requests();
    assert_eq!(slack.len(), 2);
    check_slack(&slack[0], "shop");
    check_slack(&slack[1], "shop");
    let pd = r.pd.requests();
    assert_eq!(pd.len(), 2);
    let trigger = check_pagerduty(&pd[0], "trigger", "shop", "critical");
    let resolve = check_pagerduty(&pd[1], "resolve", "shop", "");
    assert_eq!(
        trigger, resolve,
        "the resolve closes the trigger's incident"
    );
    let mut c = p.db.client();
    let undelivered = count(
        &mut c,
        "SELECT count(*) FROM alert_deliveries WHERE state <> 'delivered'",
    );
    assert_eq!(undelivered, 0);
    let open = count(&mut c, "SELECT count(*) FROM open_alerts");
    assert_eq!(open, 0);
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// Issue 16, shown 3: a receiver that answers 500 gets the event once it recovers; meanwhile
/// the channel shows as failing in the STATUS line and the `alert_channels` view, and the
/// retries carry the same idempotency key.
#[test]
fn a_failing_receiver_is_visible_and_gets_the_event_once_it_recovers() {
    let p = Pipeline::new(1);
    let recovered = Arc::new(AtomicBool::new(false));
    let flag = recovered.clone();
    let hook = HttpServer::start(move |_, _| match flag.load(Ordering::SeqCst) {
        true => Reply::status(200, ""),
        false => Reply::status(500, "upstream broken"),
    });
    let r = Receivers::with_hook(hook);
    let (sink, shutdown) = start_sink(&p, &alerts_text("", ""), &r);
    p.produce(&checks("api", &[false, false, false], 10_000));
    wait_for("the hook channel to show as failing", WITHIN, || {
        sink.status()
            .line()
            .contains("alert channel hook failing (")
    });
    assert!(
        sink.status().line().contains("HTTP 500: upstream broken"),
        "{}",
        sink.status().line()
    );
    let mut c = p.db.client();
    let row = c
        .query_one(
            "SELECT pending, last_error FROM alert_channels WHERE channel = 'hook'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert!(row.get::<_, String>(1).contains("HTTP 500"));
    // The other channels were not held up by the failing one.
    wait_requests(&r.slack, 1, "Slack");
    wait_requests(&r.pd, 1, "PagerDuty");
    // Nor is the sink: 5000 records while the hook fails, 5000 once it works.
    let rows = |prefix: &str| {
        let before = count(&mut p.db.client(), "SELECT count(*) FROM checks");
        let start = std::time::Instant::now();
        p.produce(&rounds(prefix, 50, &[true; 100]));
        wait_for("5000 rows", WITHIN, || {
            count(&mut p.db.client(), "SELECT count(*) FROM checks") == before + 5000
        });
        5000.0 / start.elapsed().as_secs_f64()
    };
    let failing = rows("f");
    assert!(
        sink.status()
            .line()
            .contains("alert channel hook failing (")
    );
    recovered.store(true, Ordering::SeqCst);
    wait_for("the event delivered to the hook", WITHIN, || {
        let delivered = count(
            &mut c,
            "SELECT count(*) FROM alert_deliveries WHERE channel = 'hook' AND state = 'delivered'",
        );
        delivered == 1
    });
    let requests = r.hook.requests();
    assert!(requests.len() >= 2, "{}", requests.len());
    let first_key = requests[0].header("idempotency-key").map(str::to_string);
    assert!(
        requests
            .iter()
            .all(|q| q.header("idempotency-key").map(str::to_string) == first_key)
    );
    wait_for("the status line to clear", WITHIN, || {
        !sink.status().line().contains("failing")
    });
    let working = rows("w");
    eprintln!(
        "sink rows/s (produce to stored) while a channel fails: {failing:.0}; after: {working:.0}"
    );
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// What `sitewatch alerts --config <path>` prints (it must succeed).
fn alerts_cli(path: &std::path::Path) -> String {
    let o = crate::support::sitewatch()
        .args(["alerts", "--config"])
        .arg(path)
        .output()
        .expect("sitewatch alerts");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}{err}");
    text
}

/// A config file for a sink process: the pipeline's, then `alerts` with every `*_env`
/// replaced by a `*_file` holding the same secret.
fn config_file(
    p: &Pipeline,
    r: &Receivers,
    dir: &crate::support::TempDir,
    alerts: &str,
) -> std::path::PathBuf {
    let env = r.env();
    let mut alerts = alerts.to_string();
    for var in ["HOOK_URL", "HOOK_SECRET", "SLACK_URL", "PD_URL", "PD_KEY"] {
        let file = dir.path().join(var.to_lowercase());
        std::fs::write(&file, env(var).unwrap()).unwrap();
        alerts = alerts.replace(
            &format!("_env = \"{var}\""),
            &format!("_file = {:?}", file.display().to_string()),
        );
    }
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, format!("{}\n{alerts}", p.config_text())).unwrap();
    path
}

/// Issue 16, shown 2: a sink killed (SIGKILL) after the transition committed and while its
/// delivery is in flight: after a restart the event is delivered again with the same key, so
/// a receiver that honours the key acts once; the outbox holds the transition once.
#[test]
fn a_sink_killed_mid_delivery_redelivers_after_restart_with_the_same_key() {
    let p = Pipeline::new(1);
    // The first delivery is received and never answered: the sink dies waiting.
    let hook = HttpServer::start(|_, i| match i {
        0 => Reply::Hang,
        _ => Reply::status(200, ""),
    });
    let r = Receivers::with_hook(hook);
    let dir = crate::support::TempDir::new("alerts-kill");
    let path = config_file(&p, &r, &dir, &alerts_text("", ""));
    let log = dir.path().join("sink.log");
    let sink = SinkProcess::start(&path, &log);
    p.produce(&checks("db", &[false, false, false], 10_000));
    wait_requests(&r.hook, 1, "the first delivery to arrive");
    // Slack and PagerDuty are done (marked), so only the hook's delivery is cut off.
    wait_for("Slack and PagerDuty marked delivered", WITHIN, || {
        delivered(&p) == 2
    });
    sink.kill();
    let sink = SinkProcess::start(&path, &log);
    wait_for("the redelivery after the restart", WITHIN, || {
        delivered(&p) == 3
    });
    sink.kill();
    let hook = r.hook.requests();
    assert_eq!(
        hook.len(),
        2,
        "one try cut off by the kill, one after the restart"
    );
    let keys: BTreeSet<Option<&str>> = hook.iter().map(|q| q.header("idempotency-key")).collect();
    assert_eq!(
        keys.len(),
        1,
        "the same event: a receiver honouring the key acts once"
    );
    assert_eq!(r.slack.requests().len(), 1);
    assert_eq!(r.pd.requests().len(), 1);
    assert_eq!(events(&p).len(), 1, "one transition in the outbox");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    for secret in [HOOK_SECRET, ROUTING_KEY, "/services/T0/B0/xyz"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// Issue 16, shown 4: while a parent is down its children's alerts are not created, nor are
/// alerts of a target in a maintenance window; a slow target and an expiring certificate
/// each degrade with their own event, the certificate once per warning level.
#[test]
fn depends_on_maintenance_and_degraded_states() {
    let p = Pipeline::new(2);
    let r = Receivers::start();
    let now = sitewatch::util::unix_ms_now();
    let extra = format!(
        "[[alerts.override]]\ntarget = \"app\"\ndepends_on = \"router\"\n\
         [[alerts.maintenance]]\ntargets = [\"quiet\"]\nstart = \"{}\"\nduration = \"2h\"\n",
        sitewatch::util::format_rfc3339_ms(now - 3_600_000)
    );
    let defaults = "latency_budget = \"500ms\"\ncert_expiry_days = [21, 14, 7]\n";
    let (sink, shutdown) = start_sink(&p, &alerts_text(defaults, &extra), &r);
    p.produce(&checks("router", &[false, false, false], 60_000));
    wait_for("router down in the outbox", WITHIN, || {
        !events(&p).is_empty()
    });
    let mut later = checks("app", &[false, false, false], 30_000);
    later.extend(checks("quiet", &[false, false, false], 30_000));
    let mut slow = checks("slow", &[true, true, true], 30_000);
    for c in &mut slow {
        c.timings.total = 900.0;
    }
    later.extend(slow);
    let mut cert = checks("cert", &[true, true, true], 30_000);
    for (c, days) in cert.iter_mut().zip([20.0, 19.0, 13.0]) {
        c.cert_days_left = Some(days);
    }
    later.extend(cert);
    p.produce(&later);
    p.wait_offsets_at_end();
    let got: Vec<(String, String)> = events(&p).into_iter().map(|(t, k, _)| (t, k)).collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    let want = [
        ("cert", "degraded"),
        ("cert", "degraded"),
        ("router", "down"),
        ("slow", "degraded"),
    ]
    .map(|(t, k)| (t.to_string(), k.to_string()));
    assert_eq!(got_sorted, want, "{got:?}");
    let reasons: Vec<String> = (events(&p).into_iter())
        .filter(|(t, _, _)| t == "cert")
        .map(|(_, _, r)| r)
        .collect();
    assert!(reasons[0].contains("warning level 21 days"), "{reasons:?}");
    assert!(reasons[1].contains("warning level 14 days"), "{reasons:?}");
    let mut c = p.db.client();
    let muted: Vec<(String, String, Option<String>)> = c
        .query(
            "SELECT target, state, muted FROM open_alerts WHERE target IN ('app', 'quiet') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        muted,
        [
            (
                "app".into(),
                "down".into(),
                Some("depends_on router (down)".into())
            ),
            ("quiet".into(), "down".into(), Some("maintenance".into())),
        ]
    );
    // Degraded events reach PagerDuty as warnings.
    wait_requests(&r.pd, 4, "four events at PagerDuty");
    let severities: BTreeSet<String> = (r.pd.requests().iter())
        .map(|q| {
            json(q)["payload"]["severity"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(severities, set(&["critical", "warning"]));
    wait_for("every delivery", WITHIN, || delivered(&p) == 12);
    // `sitewatch alerts` shows the same for a person at a terminal.
    let dir = crate::support::TempDir::new("alerts-cli");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, p.config_text()).unwrap();
    let text = alerts_cli(&path);
    for want in [
        "OPEN ALERTS",
        "muted: depends_on router (down)",
        "muted: maintenance",
        "RECENT EVENTS",
        "3 delivered, 0 pending, 0 failed",
        "warning level 14 days",
        "CHANNELS",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let router = text
        .lines()
        .find(|l| l.trim_start().starts_with("router"))
        .unwrap_or("");
    assert!(
        router.contains("down") && router.contains("alerted"),
        "{text}"
    );
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// Issue 16, shown 2: the sink process SIGKILLed again and again in the middle of fetches and
/// deliveries: the rows are exactly once, every target's transitions are in the outbox exactly
/// once and in order, and every event reaches the receiver (some twice, with the same key).
#[test]
fn transitions_are_decided_once_while_the_sink_is_killed_repeatedly() {
    let p = Pipeline::new(4);
    let r = Receivers::start();
    let dir = crate::support::TempDir::new("alerts-kills");
    let hook_only = "[alerts]\n[[alerts.channel]]\nname = \"hook\"\nkind = \"webhook\"\n\
                     url_env = \"HOOK_URL\"\ntimeout = \"2s\"\n";
    let path = config_file(&p, &r, &dir, hook_only);
    let log = dir.path().join("sink.log");
    // 400 targets, each down (3 failures) and up (2 successes) twice.
    const TARGETS: usize = 400;
    let pattern = [
        false, false, false, true, true, false, false, false, true, true,
    ];
    let records = rounds("t", TARGETS, &pattern);
    let total = records.len() as i64;
    let mut c = p.db.client();
    // The records arrive in waves, and the sink is killed once it has stored some of each
    // but the last: at least five kills however fast it is (a sink that stored 250 rows per
    // start was killed only twice once it took 4,000 in two batches). Where a kill lands in
    // a fetch, a transaction or a delivery is up to the machine.
    const WAVES: usize = 6;
    let mut kills = 0;
    let mut sink = None;
    for (i, wave) in records.chunks(records.len().div_ceil(WAVES)).enumerate() {
        let before = count(&mut c, "SELECT count(*) FROM checks");
        p.produce(wave);
        let started = SinkProcess::start(&path, &log);
        let last = i + 1 == WAVES;
        let progressed = crate::support::poll(WITHIN, || {
            let have = count(&mut c, "SELECT count(*) FROM checks");
            (if last { have >= total } else { have > before }).then_some(())
        });
        if progressed.is_none() {
            panic!(
                "stalled; sink log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if last {
            sink = Some(started);
        } else {
            started.kill();
            kills += 1;
        }
    }
    let sink = sink.expect("the last wave's sink");
    p.wait_offsets_at_end();
    let events_total = (TARGETS * 4) as i64;
    wait_for("every event delivered", WITHIN, || {
        delivered(&p) == events_total
    });
    sink.kill();
    eprintln!("sink SIGKILLed {kills} times");
    assert!(kills >= 3, "only {kills} kills");
    assert_eq!(count(&mut c, "SELECT count(*) FROM checks"), total);
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT check_id) FROM checks"),
        total
    );
    let per_target: Vec<(String, String)> = c
        .query(
            "SELECT target, string_agg(kind, ',' ORDER BY id) FROM alert_events GROUP BY 1 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(per_target.len(), TARGETS);
    for (target, kinds) in &per_target {
        assert_eq!(kinds, "down,resolved,down,resolved", "{target}");
    }
    let requests = r.hook.requests();
    let keys: BTreeSet<Option<&str>> = requests
        .iter()
        .map(|q| q.header("idempotency-key"))
        .collect();
    assert_eq!(
        keys.len() as i64,
        events_total,
        "every event reached the receiver"
    );
    eprintln!(
        "{} webhook requests for {events_total} events ({} repeated after a kill)",
        requests.len(),
        requests.len() as i64 - events_total
    );
}

/// The batch writer with the evaluator, on 20,000 records over 500 targets in batches of
/// 1,000 (every 10th target fails rounds 10..15): exactly one down and one resolve each. Its
/// cost is measured in bench section 4 (the sink with alerts on and off), not here.
#[test]
fn the_batch_writer_decides_one_down_and_one_resolve_per_failing_target() {
    let records: Vec<CheckResult> = (0..20_000)
        .map(|i| {
            let (round, t) = (i / 500, i % 500);
            let failing = t % 10 == 0 && (10..15).contains(&round);
            let failure = failing.then_some(FailureReason::Connect);
            record(
                &format!("site-{t}"),
                (40 - round) as i64 * 1000,
                failure,
                20.0,
            )
        })
        .collect();
    let values: Vec<Vec<u8>> = records.iter().map(|r| r.to_json().into_bytes()).collect();
    let cfg = Config::parse(
        "[alerts]\n[[alerts.channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl_env = \"U\"\n",
        std::path::Path::new("test.toml"),
        &|k| (k == "U").then(|| "http://127.0.0.1:9/".to_string()),
    )
    .expect("config");
    let db = crate::sink::fresh_db();
    let pg = db.pg_config();
    let client = sitewatch::sink::db::connect(&pg, "sitewatch-test-writer").expect("connect");
    let mut w = sitewatch::sink::Writer::new(client, "t", 0, pg.retention)
        .expect("writer")
        .with_alerts(Arc::new(cfg.alerts.expect("[alerts]")));
    let mut from = None;
    for (i, chunk) in values.chunks(1000).enumerate() {
        let messages: Vec<sitewatch::sink::Message> = (chunk.iter().enumerate())
            .map(|(j, v)| sitewatch::sink::Message {
                offset: (i * 1000 + j) as i64,
                timestamp_ms: 0,
                key: None,
                value: Some(v.clone()),
            })
            .collect();
        from = Some(w.write(from, &messages, 0).expect("write").next_offset);
    }
    let mut c = db.client();
    assert_eq!(count(&mut c, "SELECT count(*) FROM alert_events"), 100);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT target) FROM alert_events WHERE kind = 'down'"
        ),
        50
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT target) FROM alert_events WHERE kind = 'resolved'"
        ),
        50
    );
}

/// Issue 16, shown 3: two sinks share the partitions (and both run a notifier for every
/// channel): one event per transition, and each delivered exactly once, since a delivery is
/// leased by one notifier at a time.
#[test]
fn two_sinks_sharing_the_partitions_alert_once_per_transition() {
    let p = Pipeline::new(4);
    let r = Receivers::start();
    let (a, stop_a) = start_sink(&p, &alerts_text("", ""), &r);
    let (b, stop_b) = start_sink(&p, &alerts_text("", ""), &r);
    wait_for("both sinks to own partitions", WITHIN, || {
        !a.status().partitions.is_empty() && !b.status().partitions.is_empty()
    });
    const TARGETS: usize = 100;
    let pattern = [false, false, false, true, true];
    let records = rounds("s", TARGETS, &pattern);
    p.produce(&records);
    p.wait_offsets_at_end();
    let events_total = (TARGETS * 2) as i64;
    wait_for("every event delivered to each channel", WITHIN, || {
        delivered(&p) == events_total * 3
    });
    let mut c = p.db.client();
    let per_target = count(
        &mut c,
        "SELECT count(*) FROM (SELECT target FROM alert_events GROUP BY target \
         HAVING string_agg(kind, ',' ORDER BY id) = 'down,resolved') x",
    );
    assert_eq!(per_target, TARGETS as i64);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM alert_events"),
        events_total
    );
    for server in [&r.hook, &r.slack, &r.pd] {
        assert_eq!(server.requests().len() as i64, events_total, "once each");
    }
    stop_a.trigger();
    stop_b.trigger();
    a.join().expect("sink a stops");
    b.join().expect("sink b stops");
}

/// Retention also applies to the outbox: events older than it go once every channel is done
/// with them; one still waiting for a delivery stays, whatever its age.
#[test]
fn retention_drops_old_delivered_events_and_keeps_what_is_still_to_deliver() {
    let db = crate::sink::fresh_db();
    let mut c = db.client();
    c.batch_execute(
        "INSERT INTO alert_events (key, target, url, kind, state, previous, reason, incident, \
           check_id, at, created_at) \
         SELECT 'k' || n, 't', 'u', 'down', 'down', 'up', 'r', 'i', 'c', now(), \
                now() - (n || ' days')::interval \
         FROM (VALUES (10), (11), (1)) AS v(n); \
         INSERT INTO alert_deliveries (event_id, channel, state) \
         SELECT id, 'hook', CASE key WHEN 'k11' THEN 'pending' ELSE 'delivered' END \
         FROM alert_events;",
    )
    .expect("events");
    let done = sitewatch::sink::schema::maintain(
        &mut c,
        Duration::from_secs(7 * 86_400),
        Duration::from_secs(400 * 86_400),
        sitewatch::util::unix_ms_now(),
    )
    .expect("maintain");
    assert_eq!(done.alert_events_deleted, 1);
    let left: Vec<String> = c
        .query("SELECT key FROM alert_events ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["k1", "k11"]);
    assert_eq!(count(&mut c, "SELECT count(*) FROM alert_deliveries"), 2);
}

/// A sink with `[alerts]` on a database whose schema predates alerts refuses to start and
/// says to run `init-db`, rather than failing every batch.
#[test]
fn a_sink_with_alerts_needs_the_alert_tables() {
    let p = Pipeline::new(1);
    p.db.client()
        .batch_execute("DROP TABLE alert_deliveries, alert_events, alert_state CASCADE")
        .expect("drop");
    let r = Receivers::start();
    let cfg = config(&p, &alerts_text("", ""), &r.env());
    let e = Sink::start(&cfg, &Shutdown::new()).err().expect("refused");
    assert!(
        e.to_string().contains("run `sitewatch init-db` first"),
        "{e}"
    );
    sitewatch::sink::init_db(&cfg).expect("init-db adds them");
    let shutdown = Shutdown::new();
    let health = sitewatch::service::Health::new();
    let sink = Sink::start_with_health(&cfg, &shutdown, &health).expect("starts");
    // The watchdog sees the notifier threads too.
    let names = health.names();
    for channel in ["alerts-hook", "alerts-slack", "alerts-pd"] {
        assert!(names.iter().any(|n| n == channel), "{names:?}");
    }
    assert!(health.stuck().is_empty());
    shutdown.trigger();
    sink.join().expect("stops");
}

/// `depends_on` when parent and child fail in the same fetch (one partition): the parent's
/// checks of the batch decide, so the child's alert is still not created.
#[test]
fn depends_on_holds_when_parent_and_child_fail_in_one_batch() {
    let p = Pipeline::new(1);
    let r = Receivers::start();
    let extra = "[[alerts.override]]\ntag = \"behind-router\"\ndepends_on = \"router\"\n";
    let (sink, shutdown) = start_sink(&p, &alerts_text("", extra), &r);
    let mut records = Vec::new();
    for (router, mut app) in
        checks("router", &[false; 3], 5_000)
            .into_iter()
            .zip(checks("app", &[false; 3], 4_900))
    {
        app.tags = vec!["behind-router".into()];
        records.extend([router, app]);
    }
    p.produce(&records);
    p.wait_offsets_at_end();
    let got: Vec<(String, String)> = events(&p).into_iter().map(|(t, k, _)| (t, k)).collect();
    assert_eq!(got, [("router".to_string(), "down".to_string())]);
    let mut c = p.db.client();
    let muted: Option<String> = c
        .query_one("SELECT muted FROM open_alerts WHERE target = 'app'", &[])
        .unwrap()
        .get(0);
    assert_eq!(muted.as_deref(), Some("depends_on router (down)"));
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// A weekly window in a named zone mutes by that zone's clock. "quiet" and "loud" fail alike
/// under windows at the same wall-clock time, half an hour ago in Asia/Kolkata (UTC+05:30 all
/// year, so the test computes it without a tz library) for "quiet", in UTC for "loud": only
/// "loud" alerts. Read as UTC, "quiet"'s window would open in five hours.
#[test]
fn a_weekly_window_in_a_named_zone_mutes_by_that_zones_clock() {
    let p = Pipeline::new(1);
    let r = Receivers::start();
    let now = sitewatch::util::unix_ms_now();
    let kolkata = now + 330 * 60_000;
    let minute = (kolkata - 30 * 60_000).rem_euclid(86_400_000) / 60_000;
    let time = format!("{:02}:{:02}", minute / 60, minute % 60);
    let days = r#"["mon", "tue", "wed", "thu", "fri", "sat", "sun"]"#;
    let window = |target: &str, zone: &str| {
        format!(
            "[[alerts.maintenance]]\ntargets = [\"{target}\"]\ndays = {days}\n\
             time = \"{time}\"\nzone = \"{zone}\"\nduration = \"2h\"\n"
        )
    };
    let extra = window("quiet", "Asia/Kolkata") + &window("loud", "UTC");
    let (sink, shutdown) = start_sink(&p, &alerts_text("", &extra), &r);
    let mut records = checks("quiet", &[false; 3], 30_000);
    records.extend(checks("loud", &[false; 3], 30_000));
    p.produce(&records);
    p.wait_offsets_at_end();
    let got: Vec<(String, String)> = events(&p).into_iter().map(|(t, k, _)| (t, k)).collect();
    assert_eq!(got, [("loud".to_string(), "down".to_string())]);
    let mut c = p.db.client();
    let muted: Vec<(String, Option<String>)> = c
        .query("SELECT target, muted FROM open_alerts ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        muted,
        [
            ("loud".to_string(), None),
            ("quiet".to_string(), Some("maintenance".to_string()))
        ]
    );
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// `check-config` on a weekly window in a named zone: a misspelt zone stops it with the file,
/// line and field (never a fallback to UTC); the right one is printed back by name. (No tz
/// database at all is a unit test: jiff falls back from a bad `TZDIR` to /usr/share/zoneinfo,
/// which this machine has.)
#[test]
fn check_config_names_the_line_of_an_unknown_zone_and_prints_a_known_one() {
    let dir = crate::support::TempDir::new("alerts-zone");
    let path = dir.path().join("agent.toml");
    let check = |zone: &str| {
        let text = format!(
            "[alerts]\n\n[[alerts.maintenance]]\ndays = [\"sun\"]\nzone = \"{zone}\"\n\
             duration = \"1h\"\n"
        );
        std::fs::write(&path, text).unwrap();
        crate::support::sitewatch()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("sitewatch check-config")
    };
    let o = check("Europe/Berln");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let want = format!(
        "{}: line 5, column 8: alerts.maintenance: zone \"Europe/Berln\": \
         not a time zone of the tz database",
        path.display()
    );
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
    let o = check("Europe/Berlin");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("zone = \"Europe/Berlin\""), "{out}");
}

/// A channel removed from the config while it still had an event to deliver: the next sink
/// start marks that delivery `abandoned` with the reason, the views and `sitewatch alerts`
/// show it, the log says how many (naming the channel, never its URL), and the other
/// channels are untouched.
#[test]
fn a_removed_channels_pending_deliveries_are_abandoned_at_sink_start() {
    let p = Pipeline::new(1);
    let hook = HttpServer::start(|_, _| Reply::status(503, "down for now"));
    let r = Receivers::with_hook(hook);
    let (sink, shutdown) = start_sink(&p, &alerts_text("", ""), &r);
    p.produce(&checks("api", &[false, false, false], 10_000));
    wait_requests(&r.hook, 1, "a try at the hook");
    wait_for("Slack and PagerDuty delivered", WITHIN, || {
        delivered(&p) == 2
    });
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
    let mut c = p.db.client();
    let pending =
        "SELECT count(*) FROM alert_deliveries WHERE channel = 'hook' AND state = 'pending'";
    assert_eq!(count(&mut c, pending), 1);

    // The same config without the hook channel.
    let without_hook = alerts_text("", "").replacen(
        "[[alerts.channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl_env = \"HOOK_URL\"\n\
         secret_env = \"HOOK_SECRET\"\ntimeout = \"2s\"\n",
        "",
        1,
    );
    assert!(!without_hook.contains("HOOK_URL"), "{without_hook}");
    let dir = crate::support::TempDir::new("alerts-removed-channel");
    let path = config_file(&p, &r, &dir, &without_hook);
    let log = dir.path().join("sink.log");
    let sink = SinkProcess::start(&path, &log);
    let abandoned =
        "SELECT count(*) FROM alert_deliveries WHERE channel = 'hook' AND state = 'abandoned'";
    wait_for("the hook's delivery abandoned", WITHIN, || {
        count(&mut c, abandoned) == 1
    });
    let row = c
        .query_one(
            "SELECT pending, abandoned, last_error FROM alert_channels WHERE channel = 'hook'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(row.get::<_, String>(2), "channel no longer configured");
    let history = c
        .query_one(
            "SELECT delivered, pending, abandoned FROM alert_history",
            &[],
        )
        .unwrap();
    let h: (i64, i64, i64) = (history.get(0), history.get(1), history.get(2));
    assert_eq!(h, (2, 0, 1));
    let text = alerts_cli(&path);
    assert!(
        text.contains("2 delivered, 0 pending, 0 failed, 1 abandoned"),
        "{text}"
    );
    assert!(text.contains("channel no longer configured"), "{text}");
    wait_for("the log line", WITHIN, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains(
            "alert channel \"hook\" is no longer configured: 1 pending delivery abandoned",
        )
    });
    sink.kill();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!log.contains(&r.hook.url("/hook")), "{log}");
    // The other channels' deliveries were left as they were.
    let others =
        "SELECT count(*) FROM alert_deliveries WHERE channel <> 'hook' AND state = 'delivered'";
    assert_eq!(count(&mut c, others), 2);
}

/// Per channel, events go out in order, but a permanent refusal does not hold the rest back.
/// The webhook receiver refuses the "rejected" target's event with 400 (every time), answers
/// the "busy" target's event 425 Too Early once, and takes everything else: the 400 is marked
/// `failed` with its status and reason and not retried, the 425 (a 4xx that means "not now")
/// is retried before anything after it goes out, and the event after both is delivered.
#[test]
fn a_permanently_refused_event_is_failed_and_the_channel_moves_on() {
    let p = Pipeline::new(1);
    let busy_once = Arc::new(AtomicBool::new(true));
    let flag = busy_once.clone();
    let hook = HttpServer::start(move |q, _| {
        let target = json(q)["target"].as_str().unwrap_or("").to_string();
        match target.as_str() {
            "rejected" => Reply::status(400, "unknown field \"incident\""),
            "busy" if flag.swap(false, Ordering::SeqCst) => Reply::status(425, "too early"),
            _ => Reply::status(200, ""),
        }
    });
    let r = Receivers::with_hook(hook);
    let (sink, shutdown) = start_sink(&p, &alerts_text("", ""), &r);
    // One at a time, so that the events' order is rejected, busy, after.
    for (i, target) in ["rejected", "busy", "after"].into_iter().enumerate() {
        p.produce(&checks(target, &[false, false, false], 10_000));
        wait_for("the event in the outbox", WITHIN, || {
            events(&p).len() == i + 1
        });
    }
    wait_for("the hook done with every event", WITHIN, || {
        count(
            &mut p.db.client(),
            "SELECT count(*) FROM alert_deliveries WHERE channel = 'hook' AND state <> 'pending'",
        ) == 3
    });
    let seen: Vec<String> = (r.hook.requests().iter())
        .map(|q| json(q)["target"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        seen,
        ["rejected", "busy", "busy", "after"],
        "in order, 400 not retried"
    );
    let mut c = p.db.client();
    // target, state, attempts, last status, last error
    let rows: Vec<String> = c
        .query(
            "SELECT e.target, d.state, d.attempts, d.last_status, d.last_error \
             FROM alert_deliveries d JOIN alert_events e ON e.id = d.event_id \
             WHERE d.channel = 'hook' ORDER BY e.id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let (t, s, n): (String, String, i32) = (r.get(0), r.get(1), r.get(2));
            let (status, e): (Option<i32>, Option<String>) = (r.get(3), r.get(4));
            format!("{t} {s} {n} {status:?} {e:?}")
        })
        .collect();
    assert_eq!(
        rows,
        [
            r#"rejected failed 1 Some(400) Some("HTTP 400: unknown field \"incident\"")"#,
            "busy delivered 2 Some(200) None",
            "after delivered 1 Some(200) None",
        ]
    );
    let failed: i64 = c
        .query_one(
            "SELECT failed FROM alert_channels WHERE channel = 'hook'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(failed, 1);
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// A channel takes its due deliveries in batches: five events already in the outbox when the
/// sink starts are one batch. A retryable answer ends it there and the events after it go back
/// untried (their attempts not counted); a permanent refusal does not end it. Nothing is sent
/// out of order or twice.
#[test]
fn a_batch_of_deliveries_stops_at_a_retry_and_gives_back_the_rest_untried() {
    let p = Pipeline::new(1);
    p.db.client()
        .batch_execute(
            "INSERT INTO alert_events (key, target, url, kind, state, previous, reason, incident, \
               check_id, at) \
             SELECT 'k' || n, 'e' || n, 'http://127.0.0.1/', 'down', 'down', 'up', 'connect', \
                    'i' || n, 'c' || n, now() \
             FROM generate_series(1, 5) n ORDER BY n; \
             INSERT INTO alert_deliveries (event_id, channel) SELECT id, 'hook' FROM alert_events;",
        )
        .expect("outbox");
    let busy_once = Arc::new(AtomicBool::new(true));
    let flag = busy_once.clone();
    // While the first event is in flight, how many deliveries are leased: the batch's.
    let leased = Arc::new(std::sync::Mutex::new(None));
    let (seen_leased, url) = (leased.clone(), p.db.url());
    let hook = HttpServer::start(move |q, _| match json(q)["target"].as_str().unwrap_or("") {
        "e1" => {
            let mut c = crate::support::pg::connect_retrying(&url, WITHIN);
            *seen_leased.lock().unwrap() = Some(count(
                &mut c,
                "SELECT count(*) FROM alert_deliveries WHERE lease_until > now()",
            ));
            Reply::status(200, "")
        }
        "e2" if flag.swap(false, Ordering::SeqCst) => Reply::status(503, "busy"),
        "e4" => Reply::status(422, "no"),
        _ => Reply::status(200, ""),
    });
    let r = Receivers::with_hook(hook);
    let (sink, shutdown) = start_sink(&p, &alerts_text("", ""), &r);
    wait_for("the hook done with every event", WITHIN, || {
        count(
            &mut p.db.client(),
            "SELECT count(*) FROM alert_deliveries WHERE state <> 'pending'",
        ) == 5
    });
    let seen: Vec<String> = (r.hook.requests().iter())
        .map(|q| json(q)["target"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(seen, ["e1", "e2", "e2", "e3", "e4", "e5"]);
    assert_eq!(
        *leased.lock().unwrap(),
        Some(5),
        "one claim leased all five"
    );
    let rows: Vec<String> = (p.db.client())
        .query(
            "SELECT e.target, d.state, d.attempts, d.last_status, d.lease_until IS NULL \
             FROM alert_deliveries d JOIN alert_events e ON e.id = d.event_id ORDER BY e.id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let (t, s, n, status, free): (String, String, i32, Option<i32>, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            format!("{t} {s} {n} {status:?} {free}")
        })
        .collect();
    assert_eq!(
        rows,
        [
            "e1 delivered 1 Some(200) true",
            "e2 delivered 2 Some(200) true",
            "e3 delivered 1 Some(200) true",
            "e4 failed 1 Some(422) true",
            "e5 delivered 1 Some(200) true",
        ]
    );
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// Checks of `target` from `location`, failing or not, 1 s apart, the last `end_ago_ms` ago.
fn located(target: &str, location: &str, pattern: &[bool], end_ago_ms: i64) -> Vec<CheckResult> {
    let mut list = checks(target, pattern, end_ago_ms);
    for c in &mut list {
        c.location = Some(location.into());
    }
    list
}

/// (kind, reason, locations) of `target`'s outbox events, oldest first.
fn located_events(p: &Pipeline, target: &str) -> Vec<(String, String, Vec<String>)> {
    let mut c = p.db.client();
    c.query(
        "SELECT kind, reason, locations FROM alert_events WHERE target = $1 ORDER BY id",
        &[&target],
    )
    .expect("events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Issue 14 with issue 16: three locations check one target and `[alerts] quorum = 2`. One
/// location seeing it down creates no event; two do: one down event naming both; recovery:
/// one resolve. A location that went silent (no check within `quorum_settings.fresh_for`)
/// does not count, even though its last word was "down".
#[test]
fn the_quorum_of_locations_decides_the_target_state_and_a_silent_one_does_not_count() {
    let p = Pipeline::new(2);
    p.db.client()
        .batch_execute("UPDATE quorum_settings SET fresh_for = '20 seconds'")
        .expect("fresh_for");
    let r = Receivers::start();
    let (sink, shutdown) = start_sink(&p, &alerts_text("quorum = 2", ""), &r);
    // "web": a fails three times while b and c answer (checks 200..192 s ago, interleaved).
    let mut first = located("web", "a", &[false; 3], 192_000);
    first.extend(located("web", "b", &[true; 3], 192_300));
    first.extend(located("web", "c", &[true; 3], 192_600));
    // "quiet": a fails three times, then says nothing more; 60 s later b fails three times.
    first.extend(located("quiet", "a", &[false; 3], 190_000));
    first.extend(located("quiet", "b", &[true; 3], 190_300));
    first.extend(located("quiet", "c", &[true; 3], 190_600));
    first.extend(located("quiet", "b", &[false; 3], 130_000));
    first.extend(located("quiet", "c", &[true; 3], 130_300));
    p.produce(&first);
    p.wait_offsets_at_end();
    assert_eq!(located_events(&p, "web"), [], "one location of three");
    assert_eq!(
        located_events(&p, "quiet"),
        [],
        "a silent location does not count"
    );
    let mut c = p.db.client();
    let seen: Vec<(String, String)> = c
        .query(
            "SELECT location, state FROM alert_locations WHERE target = 'quiet' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want = [("a", "down"), ("b", "down"), ("c", "up")].map(|(l, s)| (l.into(), s.into()));
    assert_eq!(seen, want, "each location's own state");
    assert_eq!(count(&mut c, "SELECT count(*) FROM open_alerts"), 0);
    // b fails too, while a still does: down, once, naming a and b.
    let mut second = located("web", "a", &[false; 3], 182_000);
    second.extend(located("web", "b", &[false; 3], 182_300));
    second.extend(located("web", "c", &[true; 3], 182_600));
    p.produce(&second);
    wait_requests(&r.hook, 1, "the down event at the webhook");
    let got = located_events(&p, "web");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "down");
    assert!(
        got[0]
            .1
            .starts_with("down in a, b (2 of 3 locations, quorum 2): "),
        "{}",
        got[0].1
    );
    assert_eq!(got[0].2, ["a", "b"]);
    check_webhook(&r.hook.requests()[0], "web", "down");
    // Both answer again: one resolve.
    let mut third = located("web", "a", &[true; 2], 172_000);
    third.extend(located("web", "b", &[true; 2], 172_300));
    third.extend(located("web", "c", &[true; 2], 172_600));
    p.produce(&third);
    wait_requests(&r.hook, 2, "the resolve at the webhook");
    p.wait_offsets_at_end();
    let kinds: Vec<String> = located_events(&p, "web").into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["down", "resolved"]);
    check_webhook(&r.hook.requests()[1], "web", "resolved");
    assert_eq!(located_events(&p, "quiet"), []);
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}

/// A target that goes down inside a maintenance window (no event) and is still failing after
/// the window closed: its down event goes out at the first failing check after the window,
/// once, saying it was held back; a target that recovered within the window sends nothing.
#[test]
fn a_target_still_down_when_its_maintenance_window_ends_alerts_then() {
    let p = Pipeline::new(1);
    let r = Receivers::start();
    let now = sitewatch::util::unix_ms_now();
    // Open from 2 h ago to 1 h ago.
    let extra = format!(
        "[[alerts.maintenance]]\ntargets = [\"late\", \"fixed\"]\nstart = \"{}\"\nduration = \"1h\"\n",
        sitewatch::util::format_rfc3339_ms(now - 7_200_000)
    );
    let (sink, shutdown) = start_sink(&p, &alerts_text("", &extra), &r);
    let mut records = checks("late", &[false; 4], 5_400_000);
    records.extend(checks("late", &[false; 2], 1_800_000));
    records.extend(checks(
        "fixed",
        &[false, false, false, true, true],
        5_400_000,
    ));
    records.extend(checks("fixed", &[true; 2], 1_800_000));
    p.produce(&records);
    wait_requests(&r.hook, 1, "the held-back down event at the webhook");
    p.wait_offsets_at_end();
    let got = events(&p);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.as_str(), got[0].1.as_str()), ("late", "down"));
    assert!(
        got[0].2.ends_with("(held back until now: maintenance)"),
        "{}",
        got[0].2
    );
    check_webhook(&r.hook.requests()[0], "late", "down");
    shutdown.trigger();
    sink.join().expect("sink stops cleanly");
}
