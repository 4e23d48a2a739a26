//! `sitewatch agent` end to end, as a process: real HTTP targets on 127.0.0.1, a real broker,
//! records read back by librdkafka (a client we did not write). Also the scheduler's promises
//! (interval, no overlap, a slow target delays no other) and SIGTERM draining.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sitewatch::config::Config;
use sitewatch::output::Collector;
use sitewatch::probe::Prober;
use sitewatch::result::{CheckResult, FailureReason};
use sitewatch::rules::RuleSet;
use sitewatch::schedule::{self, Mode, Reload, Run};
use sitewatch::service::{Health, Shutdown};

use crate::support::broker::{Broker, kpeer};
use crate::support::http::{HttpServer, Reply};
use crate::support::proxy::Proxy;
use crate::support::{TempDir, wait_for};

pub(crate) fn start_agent(config: &std::path::Path) -> Child {
    crate::support::sitewatch()
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sitewatch agent")
}

/// SIGTERM, then wait (bounded) for a clean exit; returns stderr.
pub(crate) fn stop_agent(mut child: Child, within: Duration) -> String {
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
pub(crate) fn checks_made(stderr: &str) -> usize {
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

/// Records in the topic: the sum of its partitions' high watermarks (0 before it exists).
fn topic_total(broker_addr: &str, topic: &str) -> i64 {
    let cfg = crate::support::broker::kafka_config(vec![broker_addr.to_string()], topic);
    let Ok(mut client) = sitewatch::kafka::Client::connect(&cfg) else {
        return 0;
    };
    let Ok(partitions) = client.partitions(topic) else {
        return 0;
    };
    partitions
        .into_iter()
        .map(|p| {
            client
                .fetch(topic, p, 0, 1, Duration::from_millis(10))
                .ok()
                .and_then(|f| f.high_watermark)
                .unwrap_or(0)
        })
        .sum()
}

/// Every record in the topic, read by librdkafka. The count comes from the high watermarks.
fn topic_records(broker_addr: &str, topic: &str) -> Vec<(String, CheckResult)> {
    let total = topic_total(broker_addr, topic);
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
        crate::support::free_port()
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
    wait_for("three rounds in the topic", Duration::from_secs(30), || {
        topic_total(&broker.addr(), "checks.e2e") >= 9
    });
    let stderr = stop_agent(agent, Duration::from_secs(15));
    let made = checks_made(&stderr);
    assert!(made >= 9, "{made} checks\n{stderr}");

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
    // One check per interval per target: no bursts (a check is never started early; half an
    // interval leaves room for one that started late on a loaded machine).
    for (t, rs) in &by_target {
        assert!(rs.len() >= 2, "{t}: {} checks", rs.len());
        let mut starts: Vec<i64> = rs
            .iter()
            .map(|r| sitewatch::util::parse_rfc3339_ms(&r.started_at).unwrap())
            .collect();
        starts.sort();
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= 150, "{t}: checks {starts:?} burst");
        }
    }
}

#[test]
fn broker_outage_loses_nothing() {
    // The agent talks to the broker through a proxy we can cut, so the broker (memory storage)
    // keeps what it acknowledged while the agent sees a dead broker.
    let proxy_port = crate::support::free_port();
    let broker_port = crate::support::free_port();
    let broker = Broker::start_with(broker_port, format!("127.0.0.1:{proxy_port}"), &[]);
    let mut proxy = Proxy::start_on(proxy_port, broker.port);
    let up = HttpServer::start(|_, _| Reply::status(200, "hello"));
    let down = HttpServer::start(|_, _| Reply::status(404, "nope"));
    let dir = TempDir::new("agent-outage");
    let brokers = format!("127.0.0.1:{proxy_port}");
    let cfg = agent_config(&dir, &brokers, "checks.outage", &three_targets(&up, &down));

    let agent = start_agent(&cfg);
    wait_for("a round in the topic", Duration::from_secs(30), || {
        topic_total(&brokers, "checks.outage") >= 3
    });
    let at_cut = topic_total(&brokers, "checks.outage");
    proxy.cut();
    // Checks go on while the broker is unreachable: they land in the spool. Five rounds of
    // the `up` target are made in the dark.
    let rounds_before = up.requests().len();
    let spool = dir.path().join("state/spool");
    let spooled = || -> u64 {
        std::fs::read_dir(&spool)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    wait_for("five rounds spooled", Duration::from_secs(60), || {
        up.requests().len() >= rounds_before + 5 && spooled() > 0
    });
    proxy.resume();
    // The spool is replayed before new records: 15 more records mean the dark rounds are in.
    wait_for("the spool replayed", Duration::from_secs(60), || {
        topic_total(&brokers, "checks.outage") >= at_cut + 15
    });
    let stderr = stop_agent(agent, Duration::from_secs(20));
    let made = checks_made(&stderr);

    let records = topic_records(&brokers, "checks.outage");
    let ids: HashSet<&str> = records.iter().map(|(_, r)| r.check_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        made,
        "checks made = distinct records in the topic (at-least-once)\n{stderr}"
    );
    assert!(made as i64 >= at_cut + 15, "{made}");
}

fn config_text(text: &str) -> Config {
    Config::parse(text, std::path::Path::new("t.toml"), &|_| None).unwrap()
}

/// A server whose first request waits until the test opens the gate; later ones answer at
/// once. Counts requests now in flight and the most at once.
struct GatedServer {
    server: HttpServer,
    open: std::sync::mpsc::Sender<()>,
    peak: Arc<AtomicUsize>,
}

impl GatedServer {
    fn start() -> GatedServer {
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let server = {
            let (now, peak) = (now.clone(), peak.clone());
            HttpServer::start(move |_, i| {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                if i == 0 {
                    let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(60));
                }
                now.fetch_sub(1, Ordering::SeqCst);
                Reply::status(200, "slow")
            })
        };
        GatedServer { server, open, peak }
    }

    fn requests(&self) -> usize {
        self.server.requests().len()
    }
}

#[test]
fn a_slow_target_delays_no_other_and_never_overlaps_itself() {
    // `slow` holds its first check until the gate opens, with a 100 ms interval: its rounds
    // meanwhile are skipped, not queued, and `fast` keeps its rhythm regardless.
    let slow = GatedServer::start();
    let fast = HttpServer::start(|_, _| Reply::status(200, "fast"));
    let cfg = config_text(&format!(
        "[agent]\nconcurrency = 2\ntimeout = \"30s\"\n\
         [[target]]\nid = \"slow\"\nurl = \"{}\"\ninterval = \"100ms\"\n\
         [[target]]\nid = \"fast\"\nurl = \"{}\"\ninterval = \"100ms\"\n",
        slow.server.url("/"),
        fast.url("/")
    ));
    let running = Running::start(&cfg, 2, NO_JITTER, None);
    running.wait_until("10 fast checks while slow is held", |recs| {
        recs.iter().filter(|r| r.target == "fast").count() >= 10
    });
    assert_eq!(
        slow.requests(),
        1,
        "slow's rounds are skipped while it runs"
    );
    slow.open.send(()).unwrap();
    running.wait_until("slow checked twice more", |recs| {
        recs.iter().filter(|r| r.target == "slow").count() >= 3
    });
    let (summary, recs, _) = running.stop();
    assert!(summary.skipped_overlaps >= 1, "{summary:?}");
    assert_eq!(
        slow.peak.load(Ordering::SeqCst),
        1,
        "two slow checks at once"
    );
    assert_eq!(summary.checks as usize, recs.len());
    assert!(recs.iter().all(|r| r.up), "every check completed");
}

#[test]
fn a_reload_that_reorders_targets_never_strands_one_in_flight() {
    // Issue 12, bug 1: targets a, b, slow, c; while slow's check runs the list becomes
    // slow, c. Jobs used to carry a position in the list, so the finished check booked to
    // the wrong slot and slow stayed "in flight" for ever: never probed again.
    let slow = GatedServer::start();
    let fast = HttpServer::start(|_, _| Reply::status(200, "fast"));
    let target = |id: &str, url: &str| {
        format!("[[target]]\nid = \"{id}\"\nurl = \"{url}\"\ninterval = \"100ms\"\n")
    };
    let agent = "[agent]\nconcurrency = 4\ntimeout = \"30s\"\n";
    let (a, b, c) = (fast.url("/a"), fast.url("/b"), fast.url("/c"));
    let s = slow.server.url("/slow");
    let before = config_text(&format!(
        "{agent}{}{}{}{}",
        target("a", &a),
        target("b", &b),
        target("slow", &s),
        target("c", &c)
    ));
    let after = config_text(&format!("{agent}{}{}", target("slow", &s), target("c", &c)));
    let (reload_tx, reload_rx) = std::sync::mpsc::channel();
    let running = Running::start(&before, 4, NO_JITTER, Some(reload_rx));
    running.wait_until("slow in flight", |_| slow.requests() == 1);
    reload_tx
        .send(Reload {
            prober: Arc::new(Prober::new(&after.agent, RuleSet::default())),
            config: Arc::new(after),
        })
        .unwrap();
    let count = |recs: &[CheckResult], ids: &[&str]| {
        recs.iter()
            .filter(|r| ids.contains(&r.target.as_str()))
            .count()
    };
    let c_then = count(&running.collector.records(), &["c"]);
    running.wait_until("c checked under the new config", |recs| {
        count(recs, &["c"]) >= c_then + 3
    });
    let removed = count(&running.collector.records(), &["a", "b"]);
    slow.open.send(()).unwrap();
    running.wait_until("slow checked again after its first check", |recs| {
        count(recs, &["slow"]) >= 3 && count(recs, &["c"]) >= c_then + 8
    });
    let (summary, recs, _) = running.stop();
    assert_eq!(summary.reloads, 1);
    assert_eq!(summary.targets, 2);
    assert_eq!(
        slow.peak.load(Ordering::SeqCst),
        1,
        "two slow checks at once"
    );
    assert_eq!(
        count(&recs, &["a", "b"]),
        removed,
        "removed targets are not checked"
    );
}

#[test]
fn the_heap_is_trimmed_once_per_quiet_spell_between_rounds() {
    let server = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let fleet = |interval: &str| fleet("", "t", 3, &server.url("/"), interval);
    // Rounds 1.5 s apart, each over in a few ms: a trim after each of the first two rounds
    // (the third may be stopped before its quiet spell ends), never more than one per round.
    let running = Running::start(&fleet("1500ms"), 2, NO_JITTER, None);
    running.wait_until("three rounds of three", |recs| recs.len() >= 9);
    let (summary, recs, _) = running.stop();
    assert_eq!(recs.len(), 9, "three rounds of three");
    assert!(
        (2..=3).contains(&summary.heap_trims),
        "one trim per quiet spell: {summary:?}"
    );
    // A round every 200 ms leaves no quiet spell of 500 ms: nothing to trim.
    let running = Running::start(&fleet("200ms"), 2, NO_JITTER, None);
    running.wait_until("ten rounds", |recs| recs.len() >= 30);
    let (summary, _, _) = running.stop();
    assert_eq!(summary.heap_trims, 0, "{summary:?}");
}

const NO_JITTER: sitewatch::config::Jitter = sitewatch::config::Jitter::Fixed(Duration::ZERO);

/// A scheduler in Forever mode on a thread of its own, stopped by [`Running::stop`].
struct Running {
    collector: Collector,
    shutdown: Shutdown,
    health: Health,
    thread: std::thread::JoinHandle<schedule::Summary>,
}

impl Running {
    fn start(
        cfg: &Config,
        concurrency: usize,
        jitter: sitewatch::config::Jitter,
        reloads: Option<std::sync::mpsc::Receiver<Reload>>,
    ) -> Running {
        let collector = Collector::new();
        let shutdown = Shutdown::new();
        let health = Health::new();
        let run = Run {
            mode: Mode::Forever,
            targets: cfg.targets.clone(),
            prober: Arc::new(Prober::new(&cfg.agent, RuleSet::default())),
            concurrency,
            jitter,
            drain_timeout: Duration::from_secs(5),
            shutdown: shutdown.clone(),
            health: health.clone(),
            reloads,
            on_status: None,
        };
        let output = Box::new(collector.clone());
        let thread = std::thread::spawn(move || schedule::run(run, output));
        Running {
            collector,
            shutdown,
            health,
            thread,
        }
    }

    /// Waits (30 s at most) until the records so far satisfy `cond`.
    fn wait_until(&self, what: &str, cond: impl Fn(&[CheckResult]) -> bool) {
        wait_for(what, Duration::from_secs(30), || {
            cond(&self.collector.records())
        });
    }

    /// Stops the run; returns its summary, its records and the worker threads it started
    /// (their heartbeats: one per pool slot ever used).
    fn stop(self) -> (schedule::Summary, Vec<CheckResult>, usize) {
        self.shutdown.trigger();
        let summary = self.thread.join().expect("the scheduler panicked");
        let workers = self
            .health
            .names()
            .iter()
            .filter(|n| n.starts_with("worker-"))
            .count();
        (summary, self.collector.records(), workers)
    }
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
    let running = Running::start(&cfg, 4, NO_JITTER, None);
    running.wait_until("8 slow checks", |recs| recs.len() >= 8);
    let (_, recs, workers) = running.stop();
    assert_eq!(peak.load(Ordering::SeqCst), 4, "requests in flight at once");
    assert_eq!(workers, 4, "the pool grew to its cap");
    assert_eq!(recs.len(), 8, "every due check ran (two waves of 4)");

    // Fast targets spread over their interval: checks never wait for one another, so the
    // pool stays at one or two workers of its 16 (slack for a loaded machine; a fixed pool
    // would show 16).
    let fast = HttpServer::start(|_, _| Reply::status(200, "fast"));
    let cfg = fleet("", "f", 10, &fast.url("/"), "500ms");
    let running = Running::start(&cfg, 16, sitewatch::config::Jitter::Fraction(1.0), None);
    running.wait_until("two checks of every target", |recs| {
        (0..10).all(|i| recs.iter().filter(|r| r.target == format!("f{i}")).count() >= 2)
    });
    let (_, _, workers) = running.stop();
    assert!(
        workers <= 4,
        "{workers} workers started for 10 fast targets"
    );

    // A burst: 40 fast targets due at once. A worker keeps taking jobs, and checks due at one
    // instant are no rate to grow for, so the pool grows little if at all (growth counting
    // merely "a job waiting" reached 16).
    let cfg = fleet("", "b", 40, &fast.url("/"), "500ms");
    let running = Running::start(&cfg, 16, NO_JITTER, None);
    running.wait_until("three rounds of 40", |recs| recs.len() >= 120);
    let (_, _, workers) = running.stop();
    assert!(
        workers <= 8,
        "{workers} workers started for bursts of 40 fast checks"
    );
}

#[test]
fn the_worker_pool_grows_when_checks_start_late_though_every_worker_keeps_taking_jobs() {
    // 2,000 fast targets coming due within 200 ms, faster than one worker runs them: it takes
    // job after job (so "a job waiting for a worker" never fires), but the checks start ever
    // later. The pool grows, and every check runs. (Due at one instant, as with jitter 0, they
    // grow nothing: the first test.)
    let fast = HttpServer::start(|_, _| Reply::status(200, "fast"));
    let cfg = fleet("", "l", 2000, &fast.url("/"), "1h");
    let spread = sitewatch::config::Jitter::Fixed(Duration::from_millis(200));
    let running = Running::start(&cfg, 16, spread, None);
    running.wait_until("a check of every target", |recs| recs.len() >= 2000);
    let (summary, _, workers) = running.stop();
    assert!(workers > 1, "one worker ran a backlog of 2,000 due checks");
    assert_eq!(summary.skipped_overlaps, 0);
}
