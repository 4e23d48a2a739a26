//! The fleet (issue 14): agents share the targets topic's partitions through a classic Kafka
//! consumer group. Group membership is checked against tansu 0.6 and Apache Kafka 4.1 (and a
//! librdkafka member); the agent tests count requests per path at a real HTTP server.

use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use sitewatch::config::KafkaConfig;
use sitewatch::kafka::Client;
use sitewatch::kafka::group::{self, Assignment, GroupSettings, Member};
use sitewatch::service::Shutdown;

use crate::support::apache_kafka::{ApacheKafka, Options};
use crate::support::broker::Broker;
use crate::support::wait_for;

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
fn three_members_split_and_hand_over(cfg: &KafkaConfig) {
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
    for m in members {
        m.stop();
    }
}

#[test]
fn group_members_split_partitions_and_hand_over_on_tansu() {
    let broker = Broker::start();
    three_members_split_and_hand_over(&broker.config("unused"));
}

#[test]
fn group_members_split_partitions_and_hand_over_on_apache_kafka() {
    let kafka = ApacheKafka::start(Options::default());
    let cfg = crate::support::broker::kafka_config(vec![kafka.addr()], "unused");
    three_members_split_and_hand_over(&cfg);
}
