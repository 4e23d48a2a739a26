//! `sitewatch agent` end to end, as a process: real HTTP targets on 127.0.0.1, a real broker,
//! records read back by librdkafka (a client we did not write). Also the scheduler's promises
//! (interval, no overlap, a slow target delays no other) and SIGTERM draining.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sitewatch::config::Config;
use sitewatch::output::Collector;
use sitewatch::probe::Prober;
use sitewatch::result::{CheckResult, FailureReason};
use sitewatch::rules::RuleSet;
use sitewatch::schedule::{self, Mode, Run};
use sitewatch::service::{Health, Shutdown};

use crate::support::TempDir;
use crate::support::broker::{Broker, kpeer};
use crate::support::http::{HttpServer, Reply, closed_port};
use crate::support::proxy::Proxy;

fn start_agent(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sitewatch"))
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sitewatch agent")
}

/// SIGTERM, then wait (bounded) for a clean exit; returns stderr.
fn stop_agent(mut child: Child, within: Duration) -> String {
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + within;
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent did not exit within {within:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(code, Some(0), "agent exit code; stderr:\n{err}");
    err
}

/// "agent stopped after N checks" from the agent's log.
fn checks_made(stderr: &str) -> usize {
    let line = stderr
        .lines()
        .find(|l| l.contains("agent stopped after"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    let n = line
        .split("after ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    n.parse().unwrap()
}

/// Every record in the topic, read by librdkafka. The count comes from the high watermarks.
fn topic_records(broker_addr: &str, topic: &str) -> Vec<(String, CheckResult)> {
    let cfg = crate::support::broker::kafka_config(vec![broker_addr.to_string()], topic);
    let mut client = sitewatch::kafka::Client::connect(&cfg).unwrap();
    let mut total = 0i64;
    for p in client.partitions(topic).unwrap() {
        total += client
            .fetch(topic, p, 0, 1, Duration::from_millis(10))
            .unwrap()
            .high_watermark
            .expect("the broker says the high watermark");
    }
    let out = kpeer(
        &[
            "consume",
            broker_addr,
            topic,
            &total.to_string(),
            "--timeout",
            "60",
        ],
        b"",
    );
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, '\t').collect();
            let rec =
                CheckResult::from_json(f[3].as_bytes()).unwrap_or_else(|e| panic!("{e}: {l}"));
            (f[2].to_string(), rec)
        })
        .collect()
}

fn agent_config(dir: &TempDir, brokers: &str, topic: &str, targets: &str) -> std::path::PathBuf {
    let text = format!(
        "[agent]\nid = \"e2e\"\ninterval = \"300ms\"\ntimeout = \"2s\"\nconcurrency = 4\n\
         jitter = \"0%\"\ndrain_timeout = \"10s\"\nstate_dir = \"{state}\"\n\
         [kafka]\nbrokers = [\"{brokers}\"]\ntopic = \"{topic}\"\npartitions = 3\nlinger = \"20ms\"\n\
         {targets}",
        state = dir.path().join("state").display()
    );
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn three_targets(up: &HttpServer, down: &HttpServer) -> String {
    format!(
        "[[target]]\nid = \"up\"\nurl = \"{}\"\nregex = \"hello\"\n\
         [[target]]\nid = \"notfound\"\nurl = \"{}\"\n\
         [[target]]\nid = \"closed\"\nurl = \"http://127.0.0.1:{}/\"\n",
        up.url("/"),
        down.url("/missing"),
        closed_port()
    )
}

#[test]
fn agent_publishes_every_check_read_back_by_librdkafka() {
    let broker = Broker::start();
    let up = HttpServer::start(|_, _| Reply::status(200, "hello world"));
    let down = HttpServer::start(|_, _| Reply::status(404, "nope"));
    let dir = TempDir::new("agent-e2e");
    let cfg = agent_config(
        &dir,
        &broker.addr(),
        "checks.e2e",
        &three_targets(&up, &down),
    );

    let agent = start_agent(&cfg);
    std::thread::sleep(Duration::from_secs(3));
    let stderr = stop_agent(agent, Duration::from_secs(15));
    let made = checks_made(&stderr);
    assert!(
        made >= 9,
        "3 targets every 300 ms for 3 s: {made} checks\n{stderr}"
    );

    let records = topic_records(&broker.addr(), "checks.e2e");
    let ids: HashSet<&str> = records.iter().map(|(_, r)| r.check_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        made,
        "every check is in the topic, once per check_id"
    );
    let mut by_target: HashMap<&str, Vec<&CheckResult>> = HashMap::new();
    for (key, r) in &records {
        assert_eq!(key, &r.target, "Kafka key = target id");
        assert_eq!(r.agent, "e2e");
        by_target.entry(r.target.as_str()).or_default().push(r);
    }
    for r in &by_target["up"] {
        assert!(
            r.up && r.status == Some(200) && r.regex_matched == Some(true),
            "{r:?}"
        );
    }
    for r in &by_target["notfound"] {
        assert_eq!(
            (r.up, r.failure, r.status),
            (false, Some(FailureReason::HttpStatus), Some(404))
        );
    }
    for r in &by_target["closed"] {
        assert_eq!((r.up, r.failure), (false, Some(FailureReason::Connect)));
    }
    // About one check per interval per target: no drift, no bursts.
    for (t, rs) in &by_target {
        assert!(
            (5..=15).contains(&rs.len()),
            "{t}: {} checks in ~3 s at 300 ms",
            rs.len()
        );
    }
}

#[test]
fn broker_outage_loses_nothing() {
    // The agent talks to the broker through a proxy we can cut, so the broker (memory storage)
    // keeps what it acknowledged while the agent sees a dead broker.
    let proxy_port = crate::support::broker::free_port();
    let broker_port = crate::support::broker::free_port();
    let broker = Broker::start_with(broker_port, format!("127.0.0.1:{proxy_port}"), &[]);
    let mut proxy = Proxy::start_on(proxy_port, broker.port);
    let up = HttpServer::start(|_, _| Reply::status(200, "hello"));
    let down = HttpServer::start(|_, _| Reply::status(404, "nope"));
    let dir = TempDir::new("agent-outage");
    let brokers = format!("127.0.0.1:{proxy_port}");
    let cfg = agent_config(&dir, &brokers, "checks.outage", &three_targets(&up, &down));

    let agent = start_agent(&cfg);
    std::thread::sleep(Duration::from_secs(2));
    proxy.cut();
    // Checks go on while the broker is unreachable: they land in the spool.
    std::thread::sleep(Duration::from_secs(6));
    let spool = dir.path().join("state/spool");
    let spooled: u64 = std::fs::read_dir(&spool)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    assert!(
        spooled > 0,
        "records are spooled while the broker is unreachable"
    );
    proxy.resume();
    std::thread::sleep(Duration::from_secs(6));
    let stderr = stop_agent(agent, Duration::from_secs(20));
    let made = checks_made(&stderr);

    let records = topic_records(&brokers, "checks.outage");
    let ids: HashSet<&str> = records.iter().map(|(_, r)| r.check_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        made,
        "checks made = distinct records in the topic (at-least-once)\n{stderr}"
    );
    assert!(made >= 3 * 10, "{made}");
}

fn config_text(text: &str) -> Config {
    Config::parse(text, std::path::Path::new("t.toml"), &|_| None).unwrap()
}

#[test]
fn a_slow_target_delays_no_other_and_never_overlaps_itself() {
    // `slow` answers after 1.5 s with a 500 ms interval: its rounds overlap and are skipped;
    // `fast` keeps its 200 ms rhythm regardless.
    let slow = HttpServer::start(|_, _| {
        std::thread::sleep(Duration::from_millis(1500));
        Reply::status(200, "slow")
    });
    let fast = HttpServer::start(|_, _| Reply::status(200, "fast"));
    let cfg = config_text(&format!(
        "[agent]\nconcurrency = 2\ntimeout = \"5s\"\n\
         [[target]]\nid = \"slow\"\nurl = \"{}\"\ninterval = \"500ms\"\n\
         [[target]]\nid = \"fast\"\nurl = \"{}\"\ninterval = \"200ms\"\n",
        slow.url("/"),
        fast.url("/")
    ));
    let (summary, recs, _) = run_for(
        &cfg,
        2,
        sitewatch::config::Jitter::Fixed(Duration::ZERO),
        4.0,
    );
    let fast_n = recs.iter().filter(|r| r.target == "fast").count();
    let slow_n = recs.iter().filter(|r| r.target == "slow").count();
    assert!(
        (14..=22).contains(&fast_n),
        "fast: {fast_n} checks in 4 s at 200 ms"
    );
    assert!(
        (2..=3).contains(&slow_n),
        "slow: {slow_n} checks of 1.5 s each in 4 s"
    );
    assert!(summary.skipped_overlaps >= 3, "{summary:?}");
    // Never two slow checks at once: each starts after the previous one (1.5 s) ended.
    let starts: Vec<i64> = recs
        .iter()
        .filter(|r| r.target == "slow")
        .map(|r| sitewatch::util::parse_rfc3339_ms(&r.started_at).unwrap())
        .collect();
    for w in starts.windows(2) {
        assert!(w[1] - w[0] >= 1450, "slow checks overlapped: {starts:?}");
    }
    assert_eq!(summary.checks as usize, recs.len());
    assert!(
        recs.iter().all(|r| r.up),
        "every check completed, none cut by shutdown"
    );
}

#[test]
fn the_heap_is_trimmed_once_per_quiet_spell_between_rounds() {
    let server = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let fleet = |interval: &str| {
        config_text(
            &(0..3)
                .map(|i| {
                    format!(
                        "[[target]]\nid = \"t{i}\"\nurl = \"{}\"\ninterval = \"{interval}\"\n",
                        server.url("/")
                    )
                })
                .collect::<String>(),
        )
    };
    // Rounds at 0, 1.5 and 3 s, each over in a few ms: a trim after the first two (the third
    // is cut short by the stop at 4 s or trimmed just before it).
    let (summary, recs, _) = run_for(
        &fleet("1500ms"),
        2,
        sitewatch::config::Jitter::Fixed(Duration::ZERO),
        4.0,
    );
    assert_eq!(recs.len(), 9, "three rounds of three");
    assert!(
        (2..=3).contains(&summary.heap_trims),
        "one trim per quiet spell: {summary:?}"
    );
    // A check every 200 ms leaves no quiet spell of 500 ms: nothing to trim.
    let (summary, recs, _) = run_for(
        &fleet("200ms"),
        2,
        sitewatch::config::Jitter::Fixed(Duration::ZERO),
        2.0,
    );
    assert!(recs.len() >= 20, "{}", recs.len());
    assert_eq!(summary.heap_trims, 0, "{summary:?}");
}

/// Runs the scheduler in Forever mode for `secs` and returns the summary, the records and the
/// worker threads it started (their heartbeats: one per pool slot ever used).
fn run_for(
    cfg: &Config,
    concurrency: usize,
    jitter: sitewatch::config::Jitter,
    secs: f64,
) -> (schedule::Summary, Vec<CheckResult>, usize) {
    let collector = Collector::new();
    let shutdown = Shutdown::new();
    let health = Health::new();
    let stopper = {
        let s = shutdown.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs));
            s.trigger();
        })
    };
    let summary = schedule::run(
        Run {
            mode: Mode::Forever,
            targets: cfg.targets.clone(),
            prober: Arc::new(Prober::new(&cfg.agent, RuleSet::default())),
            concurrency,
            jitter,
            drain_timeout: Duration::from_secs(5),
            shutdown,
            health: health.clone(),
            reloads: None,
            on_status: None,
        },
        Box::new(collector.clone()),
    );
    stopper.join().unwrap();
    let workers = health
        .names()
        .iter()
        .filter(|n| n.starts_with("worker-"))
        .count();
    (summary, collector.records(), workers)
}

/// A config of `n` targets `<prefix>0..` at one URL and interval, after `agent` lines.
fn fleet(agent: &str, prefix: &str, n: usize, url: &str, interval: &str) -> Config {
    let mut text = format!("[agent]\n{agent}");
    for i in 0..n {
        text += &format!(
            "[[target]]\nid = \"{prefix}{i}\"\nurl = \"{url}\"\ninterval = \"{interval}\"\n"
        );
    }
    config_text(&text)
}

#[test]
fn the_worker_pool_grows_to_its_cap_only_when_checks_wait() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Slow targets: 8 checks of 300 ms due at once, cap 4. The pool grows to exactly 4 and
    // the server sees 4 requests at once, never more.
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let slow = {
        let (now, peak) = (now.clone(), peak.clone());
        HttpServer::start(move |_, _| {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            now.fetch_sub(1, Ordering::SeqCst);
            Reply::status(200, "slow")
        })
    };
    let cfg = fleet("timeout = \"5s\"\n", "s", 8, &slow.url("/"), "10s");
    let (_, recs, workers) = run_for(
        &cfg,
        4,
        sitewatch::config::Jitter::Fixed(Duration::ZERO),
        1.0,
    );
    assert_eq!(peak.load(Ordering::SeqCst), 4, "requests in flight at once");
    assert_eq!(workers, 4, "the pool grew to its cap");
    assert_eq!(recs.len(), 8, "every due check ran (two waves of 4)");

    // Fast targets spread over their interval: checks never wait for one another, so the
    // pool stays at one or two workers of its 16 (slack for a loaded machine; a fixed pool
    // would show 16).
    let fast = HttpServer::start(|_, _| Reply::status(200, "fast"));
    let cfg = fleet("", "f", 10, &fast.url("/"), "500ms");
    let (_, recs, workers) = run_for(&cfg, 16, sitewatch::config::Jitter::Fraction(1.0), 2.0);
    assert!(
        workers <= 4,
        "{workers} workers started for 10 fast targets"
    );
    for i in 0..10 {
        let n = recs.iter().filter(|r| r.target == format!("f{i}")).count();
        assert!(n >= 2, "target f{i}: {n} checks in 2 s at 500 ms");
    }

    // A burst: 40 fast targets due at once. A worker keeps taking jobs, so the pool does not
    // grow for the queue of due checks (growth counting merely "a job waiting" reached 16).
    let cfg = fleet("", "b", 40, &fast.url("/"), "500ms");
    let (_, recs, workers) = run_for(
        &cfg,
        16,
        sitewatch::config::Jitter::Fixed(Duration::ZERO),
        2.0,
    );
    assert!(
        workers <= 6,
        "{workers} workers started for bursts of 40 fast checks"
    );
    assert!(
        recs.len() >= 120,
        "{} checks: 40 targets every 500 ms for 2 s",
        recs.len()
    );
}
