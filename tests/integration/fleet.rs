//! The fleet (issue 14): agents share the targets topic's partitions through a classic Kafka
//! consumer group. Group membership is checked against tansu 0.6 and Apache Kafka 4.1 (and a
//! librdkafka member); the agent tests count requests per path at a real HTTP server.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sitewatch::config::{Config, KafkaConfig};
use sitewatch::kafka::Client;
use sitewatch::kafka::group::{self, Assignment, GroupSettings, Member};
use sitewatch::service::Shutdown;

use crate::support::apache_kafka::{ApacheKafka, Options};
use crate::support::broker::Broker;
use crate::support::http::{HttpServer, Reply};
use crate::support::pg::TestDb;
use crate::support::{TempDir, wait_for};

/// One overall deadline for every wait (a loaded 2-core machine, Kafka rebalances).
const DEADLINE: Duration = Duration::from_secs(90);

/// A group member on its own thread, as the agent runs it.
struct TestMember {
    shutdown: Shutdown,
    rx: Receiver<Assignment>,
    latest: Option<Assignment>,
    thread: Option<JoinHandle<()>>,
}

impl TestMember {
    fn start(cfg: &KafkaConfig, settings: &GroupSettings) -> TestMember {
        let client = Client::connect(cfg).expect("connect");
        let member = Member::new(client, settings.clone());
        let shutdown = Shutdown::new();
        let (tx, rx) = channel();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || group::run(member, &stop, &tx));
        TestMember {
            shutdown,
            rx,
            latest: None,
            thread: Some(thread),
        }
    }

    fn partitions(&mut self) -> Vec<i32> {
        while let Ok(a) = self.rx.try_recv() {
            self.latest = Some(a);
        }
        self.latest
            .as_ref()
            .map(|a| a.partitions.clone())
            .unwrap_or_default()
    }

    fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            t.join().expect("member thread");
        }
    }
}

impl Drop for TestMember {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Whether the members' latest assignments split `0..n` with no partition twice.
fn split_exactly(members: &mut [TestMember], n: i32, each_has_some: bool) -> bool {
    let mut all: Vec<i32> = Vec::new();
    for m in members.iter_mut() {
        let p = m.partitions();
        if each_has_some && p.is_empty() {
            return false;
        }
        all.extend(p);
    }
    all.sort_unstable();
    all == (0..n).collect::<Vec<_>>()
}

fn settings(topic: &str, group: &str) -> GroupSettings {
    GroupSettings {
        group_id: group.into(),
        topic: topic.into(),
        session_timeout: Duration::from_secs(6),
        rebalance_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
    }
}

/// Three members split six partitions; one leaves (LeaveGroup) and the other two take all.
/// With `silent`, a member that joins and then falls silent (as under kill -9) is evicted
/// after the session timeout and the other two take its share.
fn three_members_split_and_hand_over(cfg: &KafkaConfig, silent: bool) {
    let _ = env_logger::builder().is_test(true).try_init();
    let topic = "fleet.group";
    Client::connect(cfg)
        .expect("connect")
        .ensure_topic(topic, 6, 1)
        .expect("topic");
    let s = settings(topic, "sitewatch.fleet.test");
    let mut members: Vec<TestMember> = (0..3).map(|_| TestMember::start(cfg, &s)).collect();
    wait_for("three members to split six partitions", DEADLINE, || {
        split_exactly(&mut members, 6, true)
    });
    for m in members.iter_mut() {
        assert_eq!(m.partitions().len(), 2, "range gives 6/3 each");
    }
    let leaving = members.pop().expect("three");
    leaving.stop();
    wait_for("two members to take all six partitions", DEADLINE, || {
        split_exactly(&mut members, 6, true)
    });
    if silent {
        silent_member_is_evicted(cfg, &s, &mut members);
    }
    for m in members {
        m.stop();
    }
}

fn silent_member_is_evicted(cfg: &KafkaConfig, s: &GroupSettings, members: &mut [TestMember]) {
    let mut silent = Member::new(Client::connect(cfg).expect("connect"), s.clone());
    let t = Instant::now();
    let got = silent.join().expect("silent member joins");
    assert!(!got.partitions.is_empty(), "{got:?}");
    wait_for("the two to split with the silent one", DEADLINE, || {
        let mut all: Vec<i32> = members.iter_mut().flat_map(|m| m.partitions()).collect();
        all.extend(&got.partitions);
        all.sort_unstable();
        all == (0..6).collect::<Vec<_>>()
    });
    wait_for(
        "two members to take the silent one's partitions",
        DEADLINE,
        || split_exactly(members, 6, true),
    );
    eprintln!(
        "a silent member's partitions moved {:?} after it joined (session timeout 6 s)",
        t.elapsed()
    );
}

/// tansu 0.6 evicts a silent member but keeps the generation number: the survivors' next
/// join gets the old generation's assignment back and the evicted member's partitions stay
/// unowned, so the silent-member half runs against Apache Kafka only.
#[test]
fn group_members_split_partitions_and_hand_over_on_tansu() {
    let broker = Broker::start();
    three_members_split_and_hand_over(&broker.config("unused"), false);
}

#[test]
fn group_members_split_partitions_and_hand_over_on_apache_kafka() {
    let kafka = ApacheKafka::start(Options::default());
    let cfg = crate::support::broker::kafka_config(vec![kafka.addr()], "unused");
    three_members_split_and_hand_over(&cfg, true);
}

/// Two members form their group before the targets topic exists (an agent started before the
/// first `targets push`): the first generation gives no one anything. When the topic is
/// created, the leader sees it in its metadata and rebalances, and the two split it. (They kept
/// their empty assignment for good before: one location's agents probed nothing.)
fn a_topic_created_after_the_group_formed_is_split(cfg: &KafkaConfig) {
    let _ = env_logger::builder().is_test(true).try_init();
    let topic = "fleet.later";
    let s = settings(topic, "sitewatch.fleet.later");
    let mut members: Vec<TestMember> = (0..2).map(|_| TestMember::start(cfg, &s)).collect();
    wait_for("both members in a generation", DEADLINE, || {
        members.iter_mut().all(|m| {
            m.partitions();
            m.latest.is_some()
        })
    });
    assert!(
        members.iter_mut().all(|m| m.partitions().is_empty()),
        "no topic, no partitions"
    );
    Client::connect(cfg)
        .expect("connect")
        .ensure_topic(topic, 4, 1)
        .expect("topic");
    wait_for("the two to split the new topic", DEADLINE, || {
        split_exactly(&mut members, 4, true)
    });
    for m in members {
        m.stop();
    }
}

/// Apache Kafka only: tansu 0.6 answers the leader's new JoinGroup with the same generation and
/// the old (empty) assignment, the limit the silent-member test meets too. Agents do not depend
/// on this repair: each creates the targets topic before it joins (see
/// `two_locations_probe_every_target_and_a_killed_agent_turns_silent`, on tansu, whose agents
/// start before the first push).
#[test]
fn a_topic_created_after_the_group_formed_is_split_on_apache_kafka() {
    let kafka = ApacheKafka::start(Options::default());
    let cfg = crate::support::broker::kafka_config(vec![kafka.addr()], "unused");
    a_topic_created_after_the_group_formed_is_split(&cfg);
}

// ---------------------------------------------------------------------------------------------
// Agents: real `sitewatch agent` processes, a real HTTP server that records (path, agent) for
// every request (each agent's user_agent is its name).

type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An HTTP server answering 200 to everything, recording (path, User-Agent).
fn recording_server() -> (HttpServer, Seen) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let server = HttpServer::start(move |req, _| {
        let ua = req.header("user-agent").unwrap_or("").to_string();
        log.lock().unwrap().push((req.path.clone(), ua));
        Reply::status(200, "ok")
    });
    (server, seen)
}

fn seen_len(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

/// Requests from index `from` on.
fn seen_since(seen: &Seen, from: usize) -> Vec<(String, String)> {
    seen.lock().unwrap()[from..].to_vec()
}

/// Waits until every path of `paths` was requested at least `n` times after index `from`;
/// returns the index where that became true.
fn wait_rounds(seen: &Seen, from: usize, paths: &HashSet<String>, n: usize, what: &str) -> usize {
    let mut at = 0;
    wait_for(what, DEADLINE, || {
        let log = seen.lock().unwrap();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for (p, _) in &log[from..] {
            *count.entry(p.as_str()).or_default() += 1;
        }
        at = log.len();
        paths
            .iter()
            .all(|p| count.get(p.as_str()).copied().unwrap_or(0) >= n)
    });
    at
}

/// path → the agents that requested it, from index `from` to `to`.
fn owners(seen: &Seen, from: usize, to: usize) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (p, ua) in &seen.lock().unwrap()[from..to] {
        out.entry(p.clone()).or_default().insert(ua.clone());
    }
    out
}

/// `n` targets `t0..` at `/t0..`, every 2 s, as a targets file.
fn targets_file(dir: &TempDir, name: &str, server: &HttpServer, ids: &[String]) -> PathBuf {
    let mut text = String::new();
    for id in ids {
        text.push_str(&format!(
            "[[target]]\nid = \"{id}\"\nurl = \"{}\"\ninterval = \"2s\"\n\n",
            server.url(&format!("/{id}"))
        ));
    }
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i}")).collect()
}

fn paths(ids: &[String]) -> HashSet<String> {
    ids.iter().map(|i| format!("/{i}")).collect()
}

/// One fleet agent process (stderr to a file: a pipe nobody reads would stall it).
struct Agent {
    name: String,
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &TempDir, name: &str, brokers: &str, group: &str, fleet_extra: &str) -> Agent {
        Agent::start_with(dir, name, brokers, group, "", fleet_extra)
    }

    /// As [`Agent::start`], with `agent_extra` in `[agent]` (a location).
    fn start_with(
        dir: &TempDir,
        name: &str,
        brokers: &str,
        group: &str,
        agent_extra: &str,
        fleet_extra: &str,
    ) -> Agent {
        let state = dir.path().join(format!("state-{name}"));
        let text = format!(
            "[agent]\nid = \"{name}\"\nuser_agent = \"{name}\"\ninterval = \"2s\"\ntimeout = \"2s\"\n\
             concurrency = 8\njitter = \"10%\"\ndrain_timeout = \"5s\"\nstate_dir = \"{}\"\n{agent_extra}\
             [kafka]\nbrokers = [\"{brokers}\"]\ntopic = \"fleet.checks\"\npartitions = 1\n\
             [fleet]\ntargets_topic = \"fleet.targets\"\ngroup = \"{group}\"\npartitions = 12\n{fleet_extra}",
            state.display()
        );
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let child = crate::support::sitewatch()
            .args(["agent", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sitewatch agent");
        Agent {
            name: name.into(),
            child,
            config,
            log,
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let mut code = None;
        wait_for(&format!("{} to exit", self.name), DEADLINE, || {
            match self.child.try_wait().unwrap() {
                Some(s) => {
                    code = s.code();
                    true
                }
                None => false,
            }
        });
        code
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(config: &Path, file: &Path, dry_run: bool) -> String {
    let mut args = vec![
        "targets",
        "push",
        file.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    if dry_run {
        args.push("--dry-run");
    }
    let out = crate::support::sitewatch().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "targets push: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Agents of one group sharing `n` targets every 2 s, pushed to the topic, each request
/// recorded with the agent that made it.
struct SharedFleet {
    seen: Seen,
    wanted: HashSet<String>,
    agents: Vec<Agent>,
    // Kept for the agents' configs and logs, and the targets' server.
    dir: TempDir,
    _server: HttpServer,
}

impl SharedFleet {
    fn start(brokers: &str, group: &str, names: &[&str], n: usize) -> SharedFleet {
        let (server, seen) = recording_server();
        let dir = TempDir::new(group);
        let all = ids(n);
        let file = targets_file(&dir, "targets.toml", &server, &all);
        let agents: Vec<Agent> = (names.iter())
            .map(|name| Agent::start(&dir, name, brokers, group, ""))
            .collect();
        let out = push(&agents[0].config, &file, false);
        assert!(out.contains(&format!("{n} added")), "{out}");
        SharedFleet {
            seen,
            wanted: paths(&all),
            agents,
            dir,
            _server: server,
        }
    }

    fn names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name.clone()).collect()
    }

    /// Waits until every agent probes, then for a round (the rebalances of the joins end
    /// within it), then for two more; checks that in those two each target was requested, by
    /// exactly one agent, at most once a round, and that every agent has a share. Returns
    /// path → its agent.
    fn settled_owners(&self) -> BTreeMap<String, String> {
        let names = self.names();
        wait_for(&format!("all of {names:?} probing"), DEADLINE, || {
            let log = self.seen.lock().unwrap();
            let since = log.len().saturating_sub(2 * self.wanted.len());
            (names.iter()).all(|n| log[since..].iter().any(|(_, ua)| ua == n))
        });
        let seen = &self.seen;
        let settled = wait_rounds(seen, seen_len(seen), &self.wanted, 1, "a settling round");
        let end = wait_rounds(seen, settled, &self.wanted, 2, "two full rounds");
        let owned = owners(seen, settled, end);
        assert_eq!(owned.len(), self.wanted.len(), "every target requested");
        let shared: Vec<_> = owned.iter().filter(|(_, o)| o.len() != 1).collect();
        assert!(
            shared.is_empty(),
            "targets requested by more than one agent: {shared:?}"
        );
        let counts: Vec<usize> = (names.iter())
            .map(|n| owned.values().filter(|o| o.contains(n)).count())
            .collect();
        eprintln!("targets per agent {names:?} (12 partitions, range): {counts:?}");
        assert!(
            counts.iter().all(|&c| c > 0),
            "every agent a share: {counts:?}"
        );
        // Exactly once per round: no path more often than the busiest round allows (two rounds
        // waited for, a third may have begun for some).
        let mut per_path: HashMap<String, usize> = HashMap::new();
        for (p, _) in &seen.lock().unwrap()[settled..end] {
            *per_path.entry(p.clone()).or_default() += 1;
        }
        assert!(
            per_path.values().all(|&n| n <= 3),
            "some target probed more than once a round"
        );
        (owned.into_iter())
            .map(|(p, o)| (p, o.into_iter().next().unwrap_or_default()))
            .collect()
    }

    /// Signals agent `name` (removed from the fleet) and waits until every path it owned is
    /// requested by another agent; how long that took.
    fn take_over(
        &mut self,
        name: &str,
        owned: &BTreeMap<String, String>,
        sig: &str,
    ) -> (Agent, Duration) {
        let orphans: HashSet<&String> = (owned.iter())
            .filter(|(_, o)| *o == name)
            .map(|(p, _)| p)
            .collect();
        assert!(!orphans.is_empty(), "{name} owned targets");
        let i = self.agents.iter().position(|a| a.name == name).unwrap();
        let agent = self.agents.remove(i);
        let from = seen_len(&self.seen);
        let t = Instant::now();
        agent.signal(sig);
        wait_for(
            &format!("the others to probe {name}'s targets"),
            DEADLINE,
            || {
                let by: HashSet<String> = seen_since(&self.seen, from)
                    .into_iter()
                    .filter(|(_, ua)| ua != name)
                    .map(|(p, _)| p)
                    .collect();
                orphans.iter().all(|p| by.contains(*p))
            },
        );
        let took = t.elapsed();
        eprintln!(
            "{sig} of {name}: its {} targets probed by the others within {took:?} \
             (session timeout 10 s, heartbeat 1 s, interval 2 s, jitter 10%)",
            orphans.len()
        );
        (agent, took)
    }

    /// SIGTERM to every agent left: each leaves the group and exits 0.
    fn stop(self) {
        for mut a in self.agents {
            a.signal("-TERM");
            assert_eq!(a.wait_exit(), Some(0), "log:\n{}", a.log());
        }
    }
}

/// Three agents, 600 targets every 2 s: each target requested by exactly one agent per round
/// and none missed; SIGTERM one: the others take its targets (hand-over measured); kill -9
/// another: the last takes all (failover measured, default session timeout).
#[test]
fn three_agents_share_600_targets_and_take_over_from_a_dead_one() {
    let kafka = ApacheKafka::start(Options::default());
    three_agents_share_600_targets(&kafka.addr(), true);
}

/// The same on tansu 0.6, without kill -9 (see the group test above for why).
#[test]
fn three_agents_share_600_targets_and_hand_over_on_sigterm_on_tansu() {
    let broker = Broker::start();
    three_agents_share_600_targets(&broker.addr(), false);
}

fn three_agents_share_600_targets(brokers: &str, kill: bool) {
    let mut fleet = SharedFleet::start(brokers, "fleet-600", &["a", "b", "c"], 600);
    let owned = fleet.settled_owners();
    // SIGTERM c: a and b take its targets; c left the group on its way out.
    let (mut c, _) = fleet.take_over("c", &owned, "-TERM");
    assert_eq!(c.wait_exit(), Some(0), "c's log:\n{}", c.log());
    assert!(c.log().contains("left"), "c left the group:\n{}", c.log());
    if !kill {
        fleet.stop();
        return;
    }
    // kill -9 b: a takes everything after the session timeout (10 s default).
    let owned = fleet.settled_owners();
    let (b, _) = fleet.take_over("b", &owned, "-KILL");
    drop(b);
    fleet.stop();
}

/// A fourth agent that joins a running fleet of three takes a share at the next rebalance,
/// and once that settles every target is still requested by exactly one agent per round.
#[test]
fn a_fourth_agent_joins_a_running_fleet_of_three_and_takes_a_share() {
    let broker = Broker::start();
    let mut fleet = SharedFleet::start(&broker.addr(), "fleet-join", &["a", "b", "c"], 600);
    fleet.settled_owners();
    let d = Agent::start(&fleet.dir, "d", &broker.addr(), "fleet-join", "");
    fleet.agents.push(d);
    let owned = fleet.settled_owners();
    let of_d = owned.values().filter(|o| *o == "d").count();
    assert!(of_d > 0, "d probes a share");
    fleet.stop();
}

fn list(config: &Path) -> String {
    let out = crate::support::sitewatch()
        .args(["targets", "list", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `targets push` adds, changes and removes targets of a running fleet (measured: how long
/// until each takes effect); a bad target is refused at push with file, line and field; a
/// bad value written to the topic behind our back is skipped by the agent that reads it,
/// naming it, and the rest keep running.
#[test]
fn targets_push_adds_changes_and_removes_targets_of_a_running_fleet() {
    let broker = Broker::start();
    let (server, seen) = recording_server();
    let dir = TempDir::new("fleet-push");
    let first: Vec<String> = ids(20);
    let file = targets_file(&dir, "v1.toml", &server, &first);
    let mut agents: Vec<Agent> = ["a", "b"]
        .iter()
        .map(|n| Agent::start(&dir, n, &broker.addr(), "fleet-push", ""))
        .collect();
    let config = agents[0].config.clone();
    assert!(push(&config, &file, false).contains("20 added"));
    wait_rounds(&seen, 0, &paths(&first), 1, "the first 20 targets probed");

    let kept = push_v2_and_check(&dir, &server, &seen, &config);
    bad_target_is_refused_at_push(&dir, &server, &config);

    // A bad value in the topic (not through push): skipped with an error naming it.
    let mut client = Client::connect(&broker.config("fleet.targets")).unwrap();
    let evil = format!(
        "id = \"evil\"\nurl = \"{}\"\ntimeout = \"soon\"\n",
        server.url("/evil")
    );
    let record = sitewatch::kafka::ProduceRecord {
        key: b"evil".to_vec(),
        value: evil.into_bytes(),
        timestamp_ms: 0,
    };
    client.produce("fleet.targets", &[record]).unwrap();
    wait_for(
        "an agent to skip the bad target, naming it",
        DEADLINE,
        || {
            agents.iter().any(|a| {
                a.log().lines().any(|l| {
                    l.contains("key \"evil\"")
                        && l.contains("timeout \"soon\"")
                        && l.contains("skipped")
                })
            })
        },
    );
    let after = seen_len(&seen);
    wait_rounds(&seen, after, &kept, 1, "the others still probed");

    liveness_records_cover(&mut client, "fleet-push", 2, 20);
    for a in agents.iter_mut() {
        a.signal("-TERM");
        assert_eq!(a.wait_exit(), Some(0), "log:\n{}", a.log());
    }
}

/// v2 of the targets: t5 removed, t3 moved to /t3-v2, t20 added. Its dry run says so and
/// writes nothing; its push takes effect (measured), the removed and moved paths are no
/// longer probed, `targets list` shows it. Returns the paths v2 probes.
fn push_v2_and_check(
    dir: &TempDir,
    server: &HttpServer,
    seen: &Seen,
    config: &Path,
) -> HashSet<String> {
    let v2 = targets_file(dir, "v2.toml", server, &ids(21));
    let text = std::fs::read_to_string(&v2).unwrap();
    let t5 = format!(
        "[[target]]\nid = \"t5\"\nurl = \"{}\"\ninterval = \"2s\"\n\n",
        server.url("/t5")
    );
    let text = text
        .replace(
            &format!("{}\"", server.url("/t3")),
            &format!("{}\"", server.url("/t3-v2")),
        )
        .replace(&t5, "");
    std::fs::write(&v2, text).unwrap();
    let dry = push(config, &v2, true);
    assert!(
        dry.contains("+ t20\n~ t3\n- t5\n1 added, 1 changed, 1 removed, 18 unchanged (dry run"),
        "{dry}"
    );
    assert!(
        list(config).contains(&server.url("/t5")),
        "a dry run writes nothing"
    );
    let from = seen_len(seen);
    let t = Instant::now();
    assert!(push(config, &v2, false).contains("1 added, 1 changed, 1 removed, 18 unchanged"));
    let new: HashSet<String> = ["/t20".to_string(), "/t3-v2".to_string()].into();
    let what = "the added and the changed target probed";
    wait_rounds(seen, from, &new, 1, what);
    eprintln!(
        "targets push: added and changed targets probed {:?} after the push (interval 2 s)",
        t.elapsed()
    );
    let kept: HashSet<String> = paths(&ids(21))
        .into_iter()
        .filter(|p| p != "/t5" && p != "/t3")
        .chain(["/t3-v2".to_string()])
        .collect();
    let settled = wait_rounds(seen, from, &kept, 1, "a round of v2");
    let end = wait_rounds(seen, settled, &kept, 1, "another round of v2");
    let gone: Vec<_> = seen.lock().unwrap()[settled..end]
        .iter()
        .filter(|(p, _)| p == "/t5" || p == "/t3")
        .cloned()
        .collect();
    assert!(
        gone.is_empty(),
        "removed or moved targets still probed: {gone:?}"
    );
    let listed = list(config);
    assert!(
        listed.contains("id = \"t20\"") && !listed.contains("id = \"t5\""),
        "{listed}"
    );
    kept
}

/// A file with a bad target is refused at push: file, line, target, field.
fn bad_target_is_refused_at_push(dir: &TempDir, server: &HttpServer, config: &Path) {
    let bad = dir.path().join("bad.toml");
    let text = format!(
        "[[target]]\nid = \"ok\"\nurl = \"{}\"\n\n[[target]]\nid = \"bad\"\nurl = \"{}\"\ninterval = \"5x\"\n",
        server.url("/ok"),
        server.url("/bad")
    );
    std::fs::write(&bad, text).unwrap();
    let out = crate::support::sitewatch()
        .args(["targets", "push", bad.to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.toml: line 5: target \"bad\": interval \"5x\""),
        "{err}"
    );
}

/// Each agent's liveness record (the latest per agent): `agents` of `group`, whose targets
/// owned add up to `targets`.
fn liveness_records_cover(client: &mut Client, group: &str, agents: usize, targets: u64) {
    let mut owned: HashMap<String, u64> = HashMap::new();
    let what = format!("{agents} agents' liveness records to cover the {targets} targets");
    wait_for(&what, DEADLINE, || {
        let latest = sitewatch::fleet::topic::read_all(client, "sitewatch.agents").unwrap();
        owned = latest
            .iter()
            .map(|(id, v)| {
                let r: serde_json::Value = serde_json::from_str(v).unwrap();
                assert_eq!(r["agent_id"], id.as_str());
                assert_eq!(r["group"], group);
                (id.clone(), r["targets_owned"].as_u64().unwrap())
            })
            .collect();
        owned.len() == agents && owned.values().sum::<u64>() == targets
    });
    eprintln!("liveness records: targets owned {owned:?}");
}

/// A librdkafka consumer (range assignor) joins the agents' group: it gets a share of the
/// partitions, the agents stop probing the targets of its share; when it leaves they take
/// them back.
#[test]
fn a_librdkafka_consumer_in_the_group_gets_a_share_and_the_agents_adjust() {
    let kafka = ApacheKafka::start(Options::default());
    let (server, seen) = recording_server();
    let dir = TempDir::new("fleet-peer");
    let all = ids(60);
    let file = targets_file(&dir, "targets.toml", &server, &all);
    let mut agents: Vec<Agent> = ["a", "b"]
        .iter()
        .map(|n| Agent::start(&dir, n, &kafka.addr(), "fleet-peer", ""))
        .collect();
    assert!(push(&agents[0].config, &file, false).contains("60 added"));
    wait_rounds(
        &seen,
        0,
        &paths(&all),
        1,
        "every target probed by the agents",
    );

    let mut peer = Command::new(crate::support::broker::peer_python())
        .arg(crate::support::broker::peer_script("kpeer.py"))
        .args(["group", &kafka.addr(), "fleet.targets", "fleet-peer"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the librdkafka peer");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let out = peer.stdout.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let mut share: Vec<i32> = Vec::new();
    wait_for("the librdkafka member to get partitions", DEADLINE, || {
        let l = lines.lock().unwrap();
        if let Some(last) = l.iter().rev().find(|l| l.starts_with("assigned ")) {
            share = last["assigned ".len()..]
                .split(',')
                .filter_map(|p| p.parse().ok())
                .collect();
        }
        !share.is_empty()
    });
    eprintln!("librdkafka member's share: partitions {share:?} of 12");
    let (peers, ours): (Vec<String>, Vec<String>) = all
        .iter()
        .cloned()
        .partition(|id| share.contains(&sitewatch::kafka::partition_for_key(id.as_bytes(), 12)));
    assert!(!peers.is_empty(), "the peer's partitions hold targets");
    let from = seen_len(&seen);
    let settled = wait_rounds(
        &seen,
        from,
        &paths(&ours),
        1,
        "a round without the peer's share",
    );
    let end = wait_rounds(&seen, settled, &paths(&ours), 1, "another round");
    let peer_paths = paths(&peers);
    let probed: Vec<_> = seen.lock().unwrap()[settled..end]
        .iter()
        .filter(|(p, _)| peer_paths.contains(p))
        .cloned()
        .collect();
    assert!(
        probed.is_empty(),
        "the peer's targets are still probed by agents: {probed:?}"
    );

    drop(peer.stdin.take());
    wait_for("the peer to leave", DEADLINE, || {
        lines.lock().unwrap().iter().any(|l| l == "left")
    });
    let _ = peer.wait();
    let from = seen_len(&seen);
    wait_rounds(
        &seen,
        from,
        &peer_paths,
        1,
        "the agents to take the peer's share back",
    );
    for a in agents.iter_mut() {
        a.signal("-TERM");
        assert_eq!(a.wait_exit(), Some(0), "log:\n{}", a.log());
    }
}

/// `GET /metrics` from an agent's listener.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// An agent's `[metrics]` follows its fleet targets: after a rebalance hands some to another
/// agent, their series leave this agent's `/metrics` (no stale `probe_success` for targets
/// it no longer probes).
#[test]
fn metrics_keep_only_the_fleet_targets_an_agent_still_owns() {
    let broker = Broker::start();
    let (server, seen) = recording_server();
    let dir = TempDir::new("fleet-metrics");
    let all = ids(20);
    let file = targets_file(&dir, "targets.toml", &server, &all);
    let port = crate::support::free_port();
    let metrics = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut a = Agent::start(&dir, "a", &broker.addr(), "fleet-metrics", &metrics);
    assert!(push(&a.config, &file, false).contains("20 added"));
    wait_for("a's /metrics to hold all 20 targets", DEADLINE, || {
        let m = scrape(port);
        all.iter()
            .all(|id| m.contains(&format!("{}\"", server.url(&format!("/{id}")))))
    });
    let mut b = Agent::start(&dir, "b", &broker.addr(), "fleet-metrics", "");
    wait_for("b probing", DEADLINE, || {
        seen.lock().unwrap().iter().any(|(_, ua)| ua == "b")
    });
    let from = seen_len(&seen);
    let settled = wait_rounds(&seen, from, &paths(&all), 1, "a round with both");
    let end = wait_rounds(&seen, settled, &paths(&all), 1, "another round with both");
    let b_paths: Vec<String> = owners(&seen, settled, end)
        .into_iter()
        .filter(|(_, o)| o.contains("b"))
        .map(|(p, _)| p)
        .collect();
    assert!(!b_paths.is_empty());
    wait_for("b's targets to leave a's /metrics", DEADLINE, || {
        let m = scrape(port);
        !m.is_empty()
            && b_paths
                .iter()
                .all(|p| !m.contains(&format!("{}\"", server.url(p))))
    });
    for x in [&mut a, &mut b] {
        x.signal("-TERM");
        assert_eq!(x.wait_exit(), Some(0), "log:\n{}", x.log());
    }
}

/// A sink of the fleet tests' check topic into `db`, in this process.
fn start_sink(db: &TestDb, brokers: &str) -> (sitewatch::sink::Sink, Shutdown) {
    let text = format!(
        "[kafka]\nbrokers = [\"{brokers}\"]\ntopic = \"fleet.checks\"\npartitions = 1\n\
         [postgres]\nurl = \"{}\"\nsslmode = \"disable\"\n",
        db.url()
    );
    let cfg = Config::parse(&text, Path::new("sink.toml"), &|_| None).expect("sink config");
    sitewatch::sink::init_db(&cfg).expect("init-db");
    let shutdown = Shutdown::new();
    let sink = sitewatch::sink::Sink::start(&cfg, &shutdown).expect("sink starts");
    (sink, shutdown)
}

/// `(agent, location, state, targets_owned, checks_per_second, spool_records)` per agent.
type Liveness = Vec<(String, Option<String>, String, i64, f64, i64)>;

fn liveness(pg: &mut postgres::Client) -> Liveness {
    pg.query(
        "SELECT agent_id, location, state, targets_owned, checks_per_second, spool_records \
         FROM agent_liveness ORDER BY agent_id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
    .collect()
}

/// Two locations on one targets topic: each location's agent probes every target, the rows
/// carry the location, `agent_status` has both agents (location, targets owned, checks per
/// second, spool depth) and shows the one killed with -9 as silent after three missed
/// liveness records.
#[test]
fn two_locations_probe_every_target_and_a_killed_agent_turns_silent() {
    let broker = Broker::start();
    let (server, seen) = recording_server();
    let db = TestDb::create();
    let dir = TempDir::new("fleet-locations");
    let (sink, stop_sink) = start_sink(&db, &broker.addr());
    let all = ids(10);
    let file = targets_file(&dir, "targets.toml", &server, &all);
    let mut agents: Vec<Agent> = [("eu", "eu-west"), ("us", "us-east")]
        .iter()
        .map(|(n, loc)| {
            let extra = format!("location = \"{loc}\"\n");
            Agent::start_with(&dir, n, &broker.addr(), "fleet-loc", &extra, "")
        })
        .collect();
    assert!(push(&agents[0].config, &file, false).contains("10 added"));

    wait_for("every target probed from both locations", DEADLINE, || {
        let o = owners(&seen, 0, seen_len(&seen));
        paths(&all).iter().all(|p| {
            o.get(p)
                .is_some_and(|by| by.contains("eu") && by.contains("us"))
        })
    });
    let mut pg = db.client();
    let per_location = |pg: &mut postgres::Client| -> Vec<(String, String, i64)> {
        pg.query(
            "SELECT location, agent, count(DISTINCT target) FROM checks \
             GROUP BY location, agent ORDER BY location",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    };
    let want = vec![
        ("eu-west".to_string(), "eu".to_string(), 10),
        ("us-east".to_string(), "us".to_string(), 10),
    ];
    wait_for("every target's rows from both locations", DEADLINE, || {
        per_location(&mut pg) == want
    });
    let latest: i64 = pg
        .query_one(
            "SELECT count(*) FROM target_status_by_location \
             WHERE location IN ('eu-west', 'us-east')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        latest, 20,
        "target_status_by_location: each target from each location"
    );

    wait_for(
        "both agents alive in agent_status, owning all targets",
        DEADLINE,
        || {
            let l = liveness(&mut pg);
            l.len() == 2
                && l.iter().all(|(_, _, state, owned, cps, spooled)| {
                    state == "alive" && *owned == 10 && *cps > 0.0 && *spooled == 0
                })
        },
    );
    let l = liveness(&mut pg);
    assert_eq!(l[0].1.as_deref(), Some("eu-west"), "{l:?}");
    assert_eq!(l[1].1.as_deref(), Some("us-east"), "{l:?}");

    let mut us = agents.pop().unwrap();
    let t = Instant::now();
    us.signal("-KILL");
    us.wait_exit();
    wait_for("the killed agent silent", DEADLINE, || {
        let l = liveness(&mut pg);
        l[1].2 == "silent"
    });
    eprintln!(
        "agent_status: a killed agent turned silent {:?} after kill -9 (records every 5 s)",
        t.elapsed()
    );
    assert_eq!(
        liveness(&mut pg)[0].2,
        "alive",
        "the other agent stays alive"
    );
    stop_sink.trigger();
    sink.join().expect("sink stops cleanly");
}

/// One check row of `target` from `location`, `ago` seconds ago.
fn insert_check(pg: &mut postgres::Client, target: &str, location: &str, up: bool, ago: f64) {
    pg.execute(
        "INSERT INTO checks (check_id, started_at, target, url, agent, agent_version, v, up, \
         attempt, method, redirects, body_bytes, body_truncated, total_ms, kafka_partition, \
         kafka_offset, location) \
         VALUES (md5(random()::text), now() - make_interval(secs => $4), $1, 'http://x/', \
         $2, '0', 1, $3, 1, 'GET', 0, 0, false, 1.0, 0, 0, $2)",
        &[&target, &location, &up, &ago],
    )
    .unwrap();
}

/// `(locations counted, locations down, down)` of `target` in `target_quorum`.
fn quorum(pg: &mut postgres::Client, target: &str) -> (i64, i64, bool) {
    let r = pg
        .query_one(
            "SELECT locations, locations_down, down FROM target_quorum WHERE target = $1",
            &[&target],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The quorum view over three locations (rows written directly): 1 of 3 down is up, 2 of 3
/// is down, a location whose agents are silent or whose latest check is stale does not count,
/// and N comes from `quorum_settings`.
#[test]
fn quorum_view_needs_n_fresh_locations_with_live_agents() {
    let db = TestDb::create();
    let text = format!(
        "[postgres]\nurl = \"{}\"\nsslmode = \"disable\"\n",
        db.url()
    );
    let cfg = Config::parse(&text, Path::new("db.toml"), &|_| None).expect("config");
    sitewatch::sink::init_db(&cfg).expect("init-db");
    let mut pg = db.client();
    for loc in ["eu", "us", "ap"] {
        pg.execute(
            "INSERT INTO agent_status (agent_id, location, \"group\", version, last_seen, \
             record_every, targets_owned, checks_per_second, spool_records, spool_bytes) \
             VALUES ($1, $1, 'g', '0', now(), interval '5 seconds', 1, 1, 0, 0)",
            &[&loc],
        )
        .unwrap();
    }
    insert_check(&mut pg, "t", "eu", false, 2.0);
    insert_check(&mut pg, "t", "us", false, 9.0);
    insert_check(&mut pg, "t", "us", true, 2.0);
    insert_check(&mut pg, "t", "ap", true, 2.0);
    assert_eq!(quorum(&mut pg, "t"), (3, 1, false), "1 of 3 down: up");
    let latest: Vec<(String, bool)> = pg
        .query(
            "SELECT location, up FROM target_status_by_location WHERE target = 't' \
             ORDER BY location",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want = [("ap", true), ("eu", false), ("us", true)].map(|(l, u)| (l.to_string(), u));
    assert_eq!(latest, want, "the latest check per location");

    insert_check(&mut pg, "t", "us", false, 1.0);
    assert_eq!(quorum(&mut pg, "t"), (3, 2, true), "2 of 3 down: down");

    // us's only agent missed three liveness records: its checks no longer count.
    pg.execute(
        "UPDATE agent_status SET last_seen = now() - interval '16 seconds' WHERE agent_id = 'us'",
        &[],
    )
    .unwrap();
    assert_eq!(
        quorum(&mut pg, "t"),
        (2, 1, false),
        "a silent location does not count"
    );
    // ap's latest check is older than fresh_for: it does not count either.
    insert_check(&mut pg, "u", "eu", false, 1.0);
    insert_check(&mut pg, "u", "ap", false, 600.0);
    assert_eq!(
        quorum(&mut pg, "u"),
        (1, 1, false),
        "a stale location does not count"
    );

    pg.execute("UPDATE quorum_settings SET min_down = 1", &[])
        .unwrap();
    assert_eq!(
        quorum(&mut pg, "t"),
        (2, 1, true),
        "N = 1 from quorum_settings"
    );
}
