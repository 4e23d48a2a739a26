//! The fleet (cargo feature `fleet`, `[fleet]`): agents share the targets of a compacted
//! Kafka topic ([`topic`]) through a classic consumer group ([`crate::kafka::group`]). Each
//! agent probes the targets of the partitions the group assigns it, alongside those of its
//! own `agent.toml`.
//!
//! Two threads. `fleet-group` is the group member: join, heartbeat, rebalance, LeaveGroup on
//! shutdown; it sends each generation's partitions to `fleet`. `fleet` reads the assigned
//! partitions from their start, follows them (a pushed change is read within
//! [`FOLLOW_WAIT`]), and hands the scheduler the file's targets plus the fleet's as one
//! [`Reload`], on the channel SIGHUP reloads use; the `reload` thread sends its reloads
//! here instead, so both sets stay merged. The scheduler keys everything by target id: a
//! revoked target leaves its queue (a check in flight finishes), a kept one keeps its due
//! time, a new one starts within its jitter.

pub mod topic;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::{Config, FleetConfig, KafkaConfig, RawTarget, Target};
use crate::kafka::group::{self, Assignment, GroupSettings, Member};
use crate::kafka::{Client, FetchedRecord, KafkaError};
use crate::probe::Prober;
use crate::publish::StatsSource;
use crate::schedule::Reload;
use crate::service::Shutdown;

/// How long one round of fetches over the assigned partitions may wait for new records: the
/// delay before a pushed change is seen, and before a revocation is acted on.
pub const FOLLOW_WAIT: Duration = Duration::from_millis(200);
const FETCH_BYTES: i32 = 4 << 20;
/// Where each fleet agent publishes its liveness record (compacted, key = agent id).
pub const AGENTS_TOPIC: &str = "sitewatch.agents";
/// How often it does: three missed records (15 s) say the agent is silent.
pub const AGENT_RECORD_EVERY: Duration = Duration::from_secs(5);

/// Told of every target set the fleet hands the scheduler (the `[metrics]` registry keeps
/// those targets' series and lets `/probe` check their URLs).
pub type OnTargets = Box<dyn Fn(&Config, &Arc<Prober>) + Send>;

/// The running fleet threads.
pub struct Fleet {
    threads: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Waits for both threads (they stop on shutdown; the member leaves the group first).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts the fleet when `cfg` has `[fleet]` and `[kafka]`. Returns the sender the SIGHUP
/// reloader must use (the fleet's, which merges; or `to_scheduler` itself without a fleet).
pub fn start_if_configured(
    cfg: &Arc<Config>,
    prober: &Arc<Prober>,
    to_scheduler: Sender<Reload>,
    shutdown: &Shutdown,
    on_targets: OnTargets,
    stats: StatsSource,
) -> (Sender<Reload>, Option<Fleet>) {
    let (Some(fleet), Some(kafka)) = (cfg.fleet.clone(), cfg.kafka.clone()) else {
        return (to_scheduler, None);
    };
    log::info!(
        target: "sitewatch::fleet",
        "fleet: group {}, targets from topic {}",
        fleet.group_id(),
        fleet.targets_topic
    );
    let (reload_tx, reload_rx) = channel();
    let (assign_tx, assign_rx) = channel();
    let group = {
        let (kafka, fleet, stop) = (kafka.clone(), fleet.clone(), shutdown.clone());
        spawn("fleet-group", move || {
            if let Some(mut client) = connect(&kafka, &stop) {
                ensure_targets_topic(&mut client, &kafka, &fleet);
                let member = Member::new(client, settings(&fleet));
                group::run(member, &stop, &assign_tx);
            }
        })
    };
    let follower = Follower {
        agent_id: cfg.agent.id.clone(),
        group: fleet.group_id(),
        location: fleet.location.clone(),
        stats,
        rate: Rate::new(std::time::Instant::now(), 0),
        generation: -1,
        last_record: None,
        topic: fleet.targets_topic.clone(),
        kafka,
        client: None,
        file: cfg.clone(),
        prober: prober.clone(),
        parts: BTreeMap::new(),
        to_scheduler,
        on_targets,
        shutdown: shutdown.clone(),
    };
    let follow = spawn("fleet", move || follower.run(&reload_rx, &assign_rx));
    (
        reload_tx,
        Some(Fleet {
            threads: vec![group, follow],
        }),
    )
}

/// Creates the targets topic as `targets push` would (when `[kafka] create_topic` allows), so
/// that an agent started before the first push joins a group whose topic exists: the group's
/// first generation then splits its partitions. Without it, that generation assigned nothing,
/// and only a broker that starts a new generation when the leader rejoins (Apache Kafka, not
/// tansu 0.6) let the leader's metadata check repair it once the topic appeared. A refusal
/// (no CreateTopics permission) is logged; the leader's check still applies.
fn ensure_targets_topic(client: &mut Client, kafka: &KafkaConfig, fleet: &FleetConfig) {
    if !kafka.create_topic {
        return;
    }
    if let Err(e) = topic::ensure(client, fleet, kafka.replication_factor) {
        log::warn!(target: "sitewatch::fleet",
            "fleet: cannot create the targets topic {}: {e}; waiting for `sitewatch targets push`",
            fleet.targets_topic);
    }
}

/// The group settings of `[fleet]`: the rebalance timeout is the session timeout (our
/// members rejoin within a heartbeat).
pub fn settings(fleet: &FleetConfig) -> GroupSettings {
    GroupSettings {
        group_id: fleet.group_id(),
        topic: fleet.targets_topic.clone(),
        session_timeout: fleet.session_timeout,
        rebalance_timeout: fleet.session_timeout,
        heartbeat_interval: fleet.heartbeat_interval,
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

/// A client, retried with backoff until it connects or shutdown (`None`).
fn connect(kafka: &KafkaConfig, shutdown: &Shutdown) -> Option<Client> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    while !shutdown.is_triggered() {
        match Client::connect(kafka) {
            Ok(c) => return Some(c),
            Err(e) => {
                log::warn!(target: "sitewatch::fleet", "fleet: cannot connect to Kafka: {e}");
                shutdown.sleep(backoff.next_delay());
            }
        }
    }
    None
}

/// One assigned partition: where reading continues, and the targets it holds by id.
struct Part {
    /// `None` until the first read, which starts at the earliest offset.
    offset: Option<i64>,
    targets: HashMap<String, Arc<Target>>,
}

/// The `fleet` thread's state.
struct Follower {
    agent_id: String,
    group: String,
    location: Option<String>,
    /// The publisher's counters: checks per second and spool depth for the liveness record.
    stats: StatsSource,
    rate: Rate,
    /// The group generation of the current assignment.
    generation: i32,
    /// When the last liveness record went out (`None`: never; the topic is ensured first).
    last_record: Option<std::time::Instant>,
    topic: String,
    kafka: KafkaConfig,
    client: Option<Client>,
    /// The file's config (targets and defaults), as the last SIGHUP left it.
    file: Arc<Config>,
    prober: Arc<Prober>,
    parts: BTreeMap<i32, Part>,
    to_scheduler: Sender<Reload>,
    on_targets: OnTargets,
    shutdown: Shutdown,
}

impl Follower {
    fn run(mut self, reloads: &Receiver<Reload>, assignments: &Receiver<Assignment>) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        while !self.shutdown.is_triggered() {
            let mut dirty = false;
            while let Ok(r) = reloads.try_recv() {
                self.file = r.config;
                self.prober = r.prober;
                dirty = true;
            }
            while let Ok(a) = assignments.try_recv() {
                self.generation = a.generation;
                dirty |= self.assign(&a.partitions);
            }
            self.publish_liveness();
            if self.parts.is_empty() {
                if dirty && !self.send() {
                    return;
                }
                // Nothing to follow: wait for an assignment (or a reload) instead of spinning.
                if let Ok(a) = assignments.recv_timeout(FOLLOW_WAIT) {
                    self.generation = a.generation;
                    self.assign(&a.partitions);
                    if !self.send() {
                        return;
                    }
                }
                continue;
            }
            match self.poll() {
                Ok(changed) => {
                    backoff.reset();
                    if (dirty || changed) && !self.send() {
                        return;
                    }
                }
                Err(e) => {
                    log::warn!(target: "sitewatch::fleet", "fleet: reading {}: {e}", self.topic);
                    self.client = None;
                    if dirty && !self.send() {
                        return;
                    }
                    self.shutdown.sleep(backoff.next_delay());
                }
            }
        }
    }

    /// Takes a new assignment: revoked partitions' targets go now, new partitions are read
    /// from their start. Whether anything changed.
    fn assign(&mut self, partitions: &[i32]) -> bool {
        let wanted: HashSet<i32> = partitions.iter().copied().collect();
        let before = self.parts.len();
        self.parts.retain(|p, _| wanted.contains(p));
        let mut changed = self.parts.len() != before;
        for p in partitions {
            self.parts.entry(*p).or_insert_with(|| {
                changed = true;
                Part {
                    offset: None,
                    targets: HashMap::new(),
                }
            });
        }
        changed
    }

    /// One fetch per assigned partition: new partitions are read to their end first, the
    /// others long-poll (together at most [`FOLLOW_WAIT`]). Whether any target changed.
    fn poll(&mut self) -> Result<bool, KafkaError> {
        if self.client.is_none() {
            self.client = Some(Client::connect(&self.kafka)?);
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(false);
        };
        let wait = (FOLLOW_WAIT / self.parts.len().max(1) as u32).max(Duration::from_millis(5));
        let mut changed = false;
        for (&p, part) in self.parts.iter_mut() {
            let (start, end) = match part.offset {
                Some(o) => (o, None),
                None => {
                    let e = client.earliest_offset(&self.topic, p)?;
                    (e, Some(client.latest_offset(&self.topic, p)?))
                }
            };
            let mut offset = start;
            loop {
                let f = match client.fetch(&self.topic, p, offset, FETCH_BYTES, wait) {
                    Err(KafkaError::OffsetOutOfRange { .. }) => {
                        // Compaction or retention moved the start: read it all again.
                        part.targets.clear();
                        part.offset = None;
                        changed = true;
                        break;
                    }
                    other => other?,
                };
                for r in f.records {
                    changed |= apply(&self.file, &self.topic, p, part, r);
                }
                offset = offset.max(f.next_offset);
                part.offset = Some(offset);
                // A new partition is read to the end it had when we started, so its targets
                // arrive in one reload rather than batch by batch.
                match end {
                    Some(end) if offset < end && f.high_watermark.is_none_or(|hw| offset < hw) => {}
                    _ => break,
                }
            }
        }
        Ok(changed)
    }

    /// Every [`AGENT_RECORD_EVERY`], this agent's liveness record to [`AGENTS_TOPIC`]: id,
    /// location, group, version, generation, partitions, fleet targets owned, checks per
    /// second since the previous record and spool depth. A failure is logged and
    /// retried at the next one; it never holds up following the targets.
    fn publish_liveness(&mut self) {
        if self
            .last_record
            .is_some_and(|t| t.elapsed() < AGENT_RECORD_EVERY)
        {
            return;
        }
        if self.client.is_none() {
            match Client::connect(&self.kafka) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    log::warn!(target: "sitewatch::fleet", "fleet: liveness record: {e}");
                    self.last_record = Some(std::time::Instant::now());
                    return;
                }
            }
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        if self.last_record.is_none()
            && let Err(e) = client.ensure_topic_with(
                AGENTS_TOPIC,
                1,
                self.kafka.replication_factor,
                &[("cleanup.policy", "compact")],
            )
        {
            log::warn!(target: "sitewatch::fleet", "fleet: topic {AGENTS_TOPIC}: {e}");
            return;
        }
        let stats = (self.stats)();
        let now = std::time::Instant::now();
        let record = serde_json::json!({
            "v": 1,
            "agent_id": self.agent_id,
            "location": self.location,
            "group": self.group,
            "version": env!("CARGO_PKG_VERSION"),
            "ts": crate::util::rfc3339_now(),
            "every_ms": AGENT_RECORD_EVERY.as_millis() as u64,
            "generation": self.generation,
            "partitions": self.parts.keys().collect::<Vec<_>>(),
            "targets_owned": self.parts.values().map(|p| p.targets.len()).sum::<usize>(),
            // Every check is one record given to the publisher.
            "checks_per_second": self.rate.per_second(now, stats.accepted),
            "spool_records": stats.spooled,
            "spool_bytes": stats.spool_bytes,
        });
        let r = crate::kafka::ProduceRecord {
            key: self.agent_id.as_bytes().to_vec(),
            value: record.to_string().into_bytes(),
            timestamp_ms: crate::util::unix_ms_now(),
        };
        self.last_record = Some(std::time::Instant::now());
        if let Err(e) = client.produce(AGENTS_TOPIC, &[r]) {
            log::warn!(target: "sitewatch::fleet", "fleet: liveness record to {AGENTS_TOPIC}: {e}");
        }
    }

    /// The file's targets plus the fleet's (a fleet target with the id of a file target is
    /// left out: the file wins) to the scheduler. False when the scheduler is gone.
    fn send(&self) -> bool {
        let mut config = (*self.file).clone();
        let own: HashSet<&str> = self.file.targets.iter().map(|t| t.id.as_str()).collect();
        let mut fleet: Vec<&Arc<Target>> = self
            .parts
            .values()
            .flat_map(|p| p.targets.values())
            .filter(|t| !own.contains(t.id.as_str()))
            .collect();
        fleet.sort_by(|a, b| a.id.cmp(&b.id));
        let n = fleet.len();
        config.targets.extend(fleet.into_iter().cloned());
        log::info!(
            target: "sitewatch::fleet",
            "fleet: {n} targets from partitions {:?} of {}",
            self.parts.keys().collect::<Vec<_>>(),
            self.topic
        );
        (self.on_targets)(&config, &self.prober);
        self.to_scheduler
            .send(Reload {
                config: Arc::new(config),
                prober: self.prober.clone(),
            })
            .is_ok()
    }
}

/// Checks per second between two readings of the publisher's `accepted` counter.
struct Rate {
    at: std::time::Instant,
    count: u64,
}

impl Rate {
    fn new(at: std::time::Instant, count: u64) -> Rate {
        Rate { at, count }
    }

    /// The rate since the previous reading (rounded to 0.01), which `now` then replaces.
    fn per_second(&mut self, now: std::time::Instant, count: u64) -> f64 {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        let n = count.saturating_sub(self.count) as f64;
        *self = Rate::new(now, count);
        if secs <= 0.0 {
            return 0.0;
        }
        (n / secs * 100.0).round() / 100.0
    }
}

/// Applies one record of partition `p`: a tombstone removes its target, a value replaces it
/// when it is a valid target whose id is the key. A bad value is skipped with an error
/// naming where it is (the previous definition, if any, stays). Whether anything changed.
fn apply(file: &Config, topic: &str, p: i32, part: &mut Part, r: FetchedRecord) -> bool {
    let Some(key) = r.key.and_then(|k| String::from_utf8(k).ok()) else {
        log::error!(target: "sitewatch::fleet", "topic {topic} partition {p} offset {}: no UTF-8 key; skipped", r.offset);
        return false;
    };
    let Some(value) = r.value else {
        return part.targets.remove(&key).is_some();
    };
    let at = format!(
        "topic {topic} partition {p} offset {} key {key:?}",
        r.offset
    );
    let parsed = String::from_utf8(value)
        .map_err(|_| "value is not UTF-8".to_string())
        .and_then(|text| {
            toml::from_str::<RawTarget>(&text).map_err(|e| e.message().trim().to_string())
        })
        .and_then(|raw| file.validate_target(&at, &raw).map_err(|e| e.message));
    match parsed {
        Ok(t) if t.id == key => {
            let t = Arc::new(t);
            let same = part.targets.get(&key).is_some_and(|old| **old == *t);
            part.targets.insert(key, t);
            !same
        }
        Ok(t) => {
            log::error!(target: "sitewatch::fleet", "{at}: target id {:?} is not the key; skipped", t.id);
            false
        }
        Err(e) => {
            log::error!(target: "sitewatch::fleet", "{at}: {e}; skipped");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn checks_per_second_is_the_rate_since_the_previous_record() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0, 0);
        assert_eq!(r.per_second(t0 + Duration::from_secs(5), 50), 10.0);
        assert_eq!(r.per_second(t0 + Duration::from_secs(10), 53), 0.6);
        // No time passed (or a counter that went back): no division by zero, no wrap.
        assert_eq!(r.per_second(t0 + Duration::from_secs(10), 60), 0.0);
        assert_eq!(r.per_second(t0 + Duration::from_secs(12), 10), 0.0);
    }
}
