//! `sitewatch run` (agent and sink in one process) against a three-node Apache Kafka cluster
//! that loses the leader of every partition in turn, under load, and then restarts all three
//! one by one: every check is one row in PostgreSQL, publishing and the sink resume after each
//! leader change (times measured and printed). Also `create_topic` with replication factor 3
//! and a CreateTopics refusal that says why.
//!
//! Slow: three JVMs and six broker restarts. The test names start with `slow_cluster_`, so
//! `cargo test --test integration -- --skip slow_cluster_` leaves them out.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sitewatch::config::Config;
use sitewatch::kafka::{Client, KafkaError, PartitionInfo, ProduceRecord, partition_for_key};
use sitewatch::result::CheckResult;

use crate::support::apache_kafka::ApacheKafkaCluster;
use crate::support::broker::kafka_config;
use crate::support::http::{HttpServer, Reply};
use crate::support::pg::TestDb;
use crate::support::{TempDir, wait_for};

const TOPIC: &str = "checks.cluster";
const PARTITIONS: i32 = 3;
/// 100 targets every 100 ms: 1,000 checks/s asked for; the test prints what it got.
const TARGETS: usize = 100;
/// One generous deadline for each thing the test waits for.
const DEADLINE: Duration = Duration::from_secs(90);

fn config_text(dir: &TempDir, brokers: &[String], pg: &str, url: &str) -> String {
    let brokers: Vec<String> = brokers.iter().map(|b| format!("\"{b}\"")).collect();
    let mut text = format!(
        "[agent]\nid = \"cluster\"\ninterval = \"100ms\"\ntimeout = \"2s\"\njitter = \"0%\"\n\
         concurrency = 16\ndrain_timeout = \"20s\"\nstate_dir = \"{state}\"\n\
         [kafka]\nbrokers = [{brokers}]\ntopic = \"{TOPIC}\"\npartitions = {PARTITIONS}\n\
         replication_factor = 3\ncreate_topic = true\nlinger = \"20ms\"\nrequest_timeout = \"10s\"\n\
         [postgres]\nurl = \"{pg}\"\nsslmode = \"disable\"\n",
        state = dir.path().join("state").display(),
        brokers = brokers.join(", "),
    );
    for i in 0..TARGETS {
        text.push_str(&format!("[[target]]\nid = \"t{i:03}\"\nurl = \"{url}\"\n"));
    }
    text
}

/// A `sitewatch` process, killed if the test fails before it stops it.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `sitewatch ROLE --config CONFIG`, its log in `log`.
fn spawn(role: &str, config: &Path, log: &Path) -> Running {
    let out = std::fs::File::create(log).expect("log file");
    let child = crate::support::sitewatch()
        .args([role, "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start sitewatch {role}: {e}"));
    Running(Some(child))
}

/// SIGTERM, then a bounded wait for exit 0.
fn stop(mut running: Running, log: &Path) -> String {
    let mut child = running.0.take().expect("running");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let Some(status) = crate::support::poll(DEADLINE, || child.try_wait().unwrap()) else {
        let _ = child.kill();
        panic!("sitewatch did not exit within {DEADLINE:?} of SIGTERM");
    };
    let mut text = String::new();
    std::fs::File::open(log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("read log");
    assert!(status.success(), "sitewatch exited with {status}:\n{text}");
    text
}

/// The end offset of every partition, by partition (`None` while one cannot be read).
fn end_offsets(c: &mut Client) -> Option<BTreeMap<i32, i64>> {
    (0..PARTITIONS)
        .map(|p| c.latest_offset(TOPIC, p).ok().map(|o| (p, o)))
        .collect()
}

/// The sink's next offset of every partition, from PostgreSQL.
fn sink_offsets(pg: &mut postgres::Client) -> BTreeMap<i32, i64> {
    pg.query(
        "SELECT partition, next_offset FROM sink_offsets WHERE topic = $1",
        &[&TOPIC],
    )
    .expect("sink_offsets")
    .iter()
    .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
    .collect()
}

/// Waits until every partition has all three replicas in sync (a node just restarted has
/// caught up), and returns the partitions.
fn wait_in_sync(c: &mut Client) -> Vec<PartitionInfo> {
    let t = Instant::now();
    let mut parts = Vec::new();
    wait_for("every replica in sync", DEADLINE, || {
        parts = c.describe_topic(TOPIC).unwrap_or_default();
        parts.len() == PARTITIONS as usize
            && parts.iter().all(|p| p.in_sync.len() == 3 && p.leader > 0)
    });
    eprintln!("all replicas in sync after {:.1?}", t.elapsed());
    parts
}

/// How long one leader change took.
#[derive(Debug)]
struct Resumed {
    what: String,
    /// Until the metadata named a new leader for the partition that lost its own (polled).
    elected: Duration,
    /// From the change until every partition had a record appended after it, by the
    /// leaders' append times in the log itself: publishing resumed everywhere.
    published: Duration,
    /// The longest time a partition took no records, over the change: the publishing gap.
    silence: Duration,
    /// Until the sink stored, in every partition, the first record appended after the change.
    stored: Duration,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Partition `p` from offset `from - 1` on, as its log records it (the topic's timestamps
/// are the leaders' append times): the first record appended after `since_ms` as (offset,
/// append time), and the longest time between two consecutive records up to it. `None`
/// until there is such a record.
fn first_after(c: &mut Client, p: i32, from: i64, since_ms: i64) -> Option<((i64, i64), i64)> {
    let mut offset = (from - 1).max(0);
    let mut last: Option<i64> = None;
    let mut longest = 0;
    loop {
        let f = c.fetch(TOPIC, p, offset, 1 << 20, Duration::ZERO).ok()?;
        for r in f.records.iter().filter(|r| r.offset >= offset) {
            if let Some(l) = last {
                longest = longest.max(r.timestamp_ms - l);
            }
            last = Some(r.timestamp_ms);
            if r.timestamp_ms > since_ms {
                return Some(((r.offset, r.timestamp_ms), longest));
            }
        }
        if f.next_offset <= offset {
            return None; // nothing more yet
        }
        offset = f.next_offset;
    }
}

/// Measures from `t0` (at wall-clock `t0_ms`, when the node went away) until partition `p`,
/// which `gone` led, has a new leader, every partition took records again, and the sink
/// stored them.
fn measure_resumption(
    what: String,
    (t0, t0_ms): (Instant, i64),
    observer: &mut Client,
    pg: &mut postgres::Client,
    before: &BTreeMap<i32, i64>,
    (p, gone): (i32, i32),
) -> Resumed {
    let mut elected = None;
    let mut firsts: BTreeMap<i32, ((i64, i64), i64)> = BTreeMap::new();
    wait_for(&format!("{what}: publishing resumes"), DEADLINE, || {
        if elected.is_none()
            && observer.describe_topic(TOPIC).is_ok_and(|parts| {
                parts
                    .iter()
                    .any(|x| x.partition == p && x.leader > 0 && x.leader != gone)
            })
        {
            elected = Some(t0.elapsed());
        }
        for (&q, &from) in before {
            if !firsts.contains_key(&q)
                && let Some(found) = first_after(observer, q, from, t0_ms)
            {
                firsts.insert(q, found);
            }
        }
        elected.is_some() && firsts.len() == before.len()
    });
    wait_for(&format!("{what}: the sink follows"), DEADLINE, || {
        let stored = sink_offsets(pg);
        firsts
            .iter()
            .all(|(q, ((offset, _), _))| stored.get(q).is_some_and(|s| s > offset))
    });
    let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
    let r = Resumed {
        what,
        elected: elected.unwrap(),
        published: ms(firsts.values().map(|f| f.0.1).max().unwrap() - t0_ms),
        silence: ms(firsts.values().map(|f| f.1).max().unwrap()),
        stored: t0.elapsed(),
    };
    eprintln!("{r:?}");
    r
}

#[test]
fn slow_cluster_three_nodes_lose_every_leader_under_load_and_store_every_check_once() {
    let mut cluster = ApacheKafkaCluster::start(3);
    let brokers = cluster.bootstrap();

    assert_an_impossible_replication_factor_is_refused(&brokers);

    let up = HttpServer::start_keep_alive(|_, _| Reply::status(200, "ok"));
    let db = TestDb::create();
    let dir = TempDir::new("cluster");
    let config = dir.path().join("sitewatch.toml");
    let text = config_text(&dir, &brokers, &db.url(), &up.url("/"));
    std::fs::write(&config, &text).unwrap();
    let parsed = Config::parse(&text, &config, &|_| None).expect("config");
    sitewatch::sink::init_db(&parsed).expect("init-db");
    let log = dir.path().join("run.log");
    let t_run = Instant::now();
    let run = spawn("run", &config, &log);

    // `create_topic = true` with replication factor 3: three replicas, all in sync.
    let mut observing = kafka_config(brokers.clone(), TOPIC);
    observing.request_timeout = Duration::from_secs(30);
    let mut observer = Client::connect(&observing).expect("connect");
    wait_for("the agent creates its topic", DEADLINE, || {
        observer.partitions(TOPIC).is_ok()
    });
    for p in wait_in_sync(&mut observer) {
        assert_eq!(p.replicas.len(), 3, "{p:?}");
    }
    let mut pg = db.client();
    wait_for("the first rows in PostgreSQL", DEADLINE, || {
        sink_offsets(&mut pg).len() == PARTITIONS as usize
    });

    let mut resumed = Vec::new();
    // Three leaders killed, then a rolling restart; all replicas in sync before each step.
    for step in 0..6 {
        resumed.push(lose_a_leader(step, &mut cluster, &mut observer, &mut pg));
    }

    let stderr = stop(run, &log);
    let ran = t_run.elapsed();
    let made = crate::agent::checks_made(&stderr);
    // What the agent and the sink said about the leader changes.
    let said = |l: &&str| l.contains("WARN") && !l.contains("sitewatch::schedule");
    for l in stderr.lines().filter(said).take(60) {
        eprintln!("  run: {l}");
    }
    // The sink stopped with `run`; a sink of its own stores what it had not yet.
    let sink_log = dir.path().join("sink.log");
    let sink = spawn("sink", &config, &sink_log);
    wait_for("every check stored", DEADLINE, || {
        let n: i64 = pg
            .query_one("SELECT count(DISTINCT check_id) FROM checks", &[])
            .unwrap()
            .get(0);
        n > made as i64 // and the probe record
    });
    let _ = stop(sink, &sink_log);
    let row = pg
        .query_one("SELECT count(*), count(DISTINCT check_id) FROM checks", &[])
        .unwrap();
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    eprintln!(
        "{made} checks in {ran:.1?} ({:.0}/s asked 1000/s); {rows} rows, {distinct} distinct; \
         HTTP server saw {} requests",
        made as f64 / ran.as_secs_f64(),
        up.requests().len()
    );
    for r in &resumed {
        eprintln!(
            "{}: publishing gap (longest silence in a partition) {:.2?}; every partition took \
             records again after {:.2?}; new leader seen after {:.2?}; stored after {:.2?}",
            r.what, r.silence, r.published, r.elected, r.stored
        );
    }
    // The sink carried on from where it was after each change. It used to take a new
    // leader's lagging high watermark for the end of the partition and start it over from
    // offset 0 (5 of 6 changes in one run): no row twice, thanks to the dedupe, but the whole
    // partition read again.
    let restarted: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("out of range; resuming at"))
        .collect();
    assert!(restarted.is_empty(), "{restarted:#?}");
    // Every check one row, and the probe record of step 0 one more.
    assert_eq!(
        (rows, distinct),
        (made as i64 + 1, made as i64 + 1),
        "every check one row"
    );
}

/// Item 7 of issue 13: a replication factor the cluster cannot give is refused in words that
/// name the topic, the factor and the broker's reason.
fn assert_an_impossible_replication_factor_is_refused(brokers: &[String]) {
    let mut admin = Client::connect(&kafka_config(brokers.to_vec(), TOPIC)).expect("connect");
    let err = admin.ensure_topic("too-replicated", 3, 4).unwrap_err();
    let text = err.to_string();
    eprintln!("replication factor 4 on 3 brokers: {text}");
    assert!(matches!(err, KafkaError::Broker { .. }), "{text}");
    for part in [
        "too-replicated",
        "replication factor 4",
        "INVALID_REPLICATION_FACTOR",
        "only 3 broker(s)",
    ] {
        assert!(text.contains(part), "{part:?} missing in: {text}");
    }
}

/// Steps 0-2: kill -9 the leader of partition 0, 1, 2 in turn. Steps 3-5: a rolling restart,
/// each node stopped with SIGTERM (a controlled shutdown). The node is started again after the
/// measurement; `wait_in_sync` at the next step's start waits for its replicas.
fn lose_a_leader(
    step: i32,
    cluster: &mut ApacheKafkaCluster,
    observer: &mut Client,
    pg: &mut postgres::Client,
) -> Resumed {
    let kill = step < 3;
    let parts = wait_in_sync(observer);
    let before = end_offsets(observer).expect("end offsets");
    let (p, node, what) = if kill {
        let leader = parts[step as usize].leader;
        let what = format!("kill -9 node {leader} (leader of partition {step})");
        (step, leader, what)
    } else {
        let id = step - 2;
        let led = parts.iter().find(|x| x.leader == id);
        let what = format!("rolling restart: node {id} stopped");
        (led.map_or(0, |x| x.partition), id, what)
    };
    let t0 = (Instant::now(), unix_ms());
    if kill {
        cluster.kill(node);
    } else {
        cluster.terminate(node);
    }
    if step == 0 {
        // A produce to, then a read of, a partition whose leader just died wait for the
        // new leader (within the request timeout) instead of failing after the quick
        // retries: the cluster takes longer than those (3 s of silence here) to notice.
        // The observer's metadata still names the dead leader. (The produce used to give
        // up, and the publisher reconnected with a growing backoff.)
        let t = Instant::now();
        observer
            .produce(TOPIC, &[probe_record(p)])
            .expect("Produce rides out the leader change");
        eprintln!(
            "a produce to partition {p} rode out its leader's death in {:.2?}",
            t.elapsed()
        );
        observer
            .latest_offset(TOPIC, p)
            .expect("ListOffsets rides out the leader change");
    }
    let r = measure_resumption(what, t0, observer, pg, &before, (p, node));
    if !kill {
        cluster.wait_stopped(node, DEADLINE);
    }
    cluster.restart(node);
    r
}

/// A check record (not one the agent made: its target is no configured target) whose key
/// goes to partition `p`.
fn probe_record(p: i32) -> ProduceRecord {
    let target = (0..)
        .map(|i| format!("leader-probe-{i}"))
        .find(|t| partition_for_key(t.as_bytes(), PARTITIONS) == p)
        .expect("some key");
    let rec = CheckResult::new(&target, "http://127.0.0.1/", "cluster", "GET");
    ProduceRecord {
        key: target.into_bytes(),
        value: rec.to_json().into_bytes(),
        timestamp_ms: unix_ms(),
    }
}
