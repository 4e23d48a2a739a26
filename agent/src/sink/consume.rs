//! The consume loop: a coordinator thread that owns partitions (advisory locks) and one worker
//! thread per owned partition that fetches, decodes and writes.
//!
//! Threads: `sink` (the coordinator: lock session, partition list, maintenance) and
//! `sink-p<N>` (one per owned partition, each with its own Kafka client and PostgreSQL
//! connection). Shutdown: the coordinator stops the workers, each finishes the batch it is
//! writing (commit or rollback), and the coordinator joins them; the lock session closes last.
//!
//! Architecture Invariant: the position a worker fetches from is always re-read from
//! `sink_offsets` after any PostgreSQL error, so an in-doubt commit (connection lost during
//! COMMIT) can neither skip nor repeat records.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::owner::Ownership;
use super::writer::Writer;
use super::{SinkError, db, schema};
use crate::backoff::Backoff;
use crate::config::{Config, KafkaConfig, PostgresConfig};
use crate::kafka::{self, Fetched, KafkaError};
use crate::service::{Health, Heartbeat, Shutdown};

/// How often unowned partitions are retried: the bound on takeover after a sink dies.
pub const TAKEOVER_INTERVAL: Duration = Duration::from_secs(2);
/// How often the partition list is re-read (a topic can grow).
const PARTITIONS_REFRESH: Duration = Duration::from_secs(30);
/// How often partitions are created ahead and expired ones dropped.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a fetch waits for new records: also the bound on a worker's reaction to stop.
/// Only when the worker has caught up: with records still to read past the last fetch, the
/// next fetch asks with no wait at all. Kafka answers at once either way, but tansu sleeps
/// half the wait after every fetch that found records (`FetchService::fetch` in
/// tansu-storage 0.6), which made each 5 MB fetch of a backlog take 250 ms.
const FETCH_WAIT: Duration = Duration::from_millis(500);

/// The fetch size for a transaction of about `batch_size` records (~1 KiB each), within
/// 64 KiB..16 MiB. A Kafka batch larger than this still comes whole (the broker always returns
/// the first batch).
pub fn fetch_max_bytes(batch_size: usize) -> i32 {
    (batch_size.saturating_mul(1024)).clamp(64 * 1024, 16 * 1024 * 1024) as i32
}

/// Retry delays of the coordinator and the workers (PostgreSQL or Kafka down).
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Progress of one owned partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStatus {
    /// The committed next offset (`None` before the first commit).
    pub next_offset: Option<i64>,
    /// The partition's high watermark at the last fetch.
    pub high_watermark: i64,
    pub rows: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
}

/// What the sink is doing, for `STATUS=` and the tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkStatus {
    pub topic: String,
    /// Owned partitions.
    pub partitions: BTreeMap<i32, PartitionStatus>,
    /// Passes that failed and were retried after a backoff (database or Kafka unreachable,
    /// a lost lock session), by the coordinator and every worker since start.
    pub retries: u64,
    /// Why Kafka refuses the sink as configured (credentials, certificates), while it does.
    pub kafka_refusal: Option<String>,
    /// Alert channels by name (`[alerts]`): deliveries and failures.
    pub alert_channels: BTreeMap<String, crate::alerts::ChannelStatus>,
}

impl SinkStatus {
    /// Records in Kafka not yet committed to PostgreSQL, over the owned partitions.
    pub fn lag(&self) -> i64 {
        self.partitions
            .values()
            .map(|p| (p.high_watermark - p.next_offset.unwrap_or(0)).max(0))
            .sum()
    }

    /// One line: `sink: sitewatch.checks partitions 0,1 lag 0; 2000 rows, 1 dead letter`.
    pub fn line(&self) -> String {
        let parts: Vec<String> = self.partitions.keys().map(|p| p.to_string()).collect();
        let (rows, dead) = self
            .partitions
            .values()
            .fold((0, 0), |(r, d), p| (r + p.rows, d + p.dead_letters));
        let refusal = self
            .kafka_refusal
            .as_ref()
            .map(|e| format!("; Kafka refuses us: {e}"))
            .unwrap_or_default();
        // A failing alert channel must be visible where the operator looks first.
        let failing: String = (self.alert_channels.iter())
            .filter(|(_, c)| c.failures > 0)
            .map(|(name, c)| {
                format!(
                    "; alert channel {name} failing ({} tries: {})",
                    c.failures,
                    c.last_error.as_deref().unwrap_or("?")
                )
            })
            .collect();
        format!(
            "sink: {} partitions {} lag {}; {rows} rows, {dead} dead letters{refusal}{failing}",
            self.topic,
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(",")
            },
            self.lag()
        )
    }
}

type SharedStatus = Arc<Mutex<SinkStatus>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut SinkStatus)) {
    // A poisoned lock only means a worker panicked mid-update; the numbers are still usable.
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut s);
}

/// Logs a failed Kafka call that will be retried: an error when Kafka refuses us as
/// configured (credentials rotated while running: loud at every retry, and in the status line
/// until it passes), a warning when it is an outage.
fn kafka_failed(status: &SharedStatus, what: std::fmt::Arguments<'_>, e: &KafkaError) {
    if e.is_config() {
        log::error!(target: "sitewatch::sink", "{what}: {e}; Kafka refuses our configuration, retrying");
        update(status, |s| s.kafka_refusal = Some(e.to_string()));
    } else {
        log::warn!(target: "sitewatch::sink", "{what}: {e}; retrying");
    }
}

/// A running sink: the coordinator thread and its workers.
pub struct Sink {
    coordinator: JoinHandle<Result<(), SinkError>>,
    status: SharedStatus,
    #[cfg(feature = "alerts")]
    notifier: Option<crate::alerts::notify::Notifier>,
    /// Fleet agents' liveness into `agent_status` ([`super::agents`]).
    /// Its stop: the sink's shutdown, or the coordinator stopping on its own.
    #[cfg(feature = "fleet")]
    agents: (JoinHandle<()>, Shutdown),
}

impl Sink {
    /// Checks what retrying cannot fix (missing config sections, TLS setup, missing schema)
    /// and starts the coordinator. A database or broker that is down is not an error here: the
    /// sink retries until it answers.
    pub fn start(cfg: &Config, shutdown: &Shutdown) -> Result<Sink, SinkError> {
        Sink::start_with_health(cfg, shutdown, &Health::new())
    }

    /// As [`Sink::start`], registering the coordinator and every partition worker with
    /// `health`, so the systemd watchdog sees a stuck sink thread.
    pub fn start_with_health(
        cfg: &Config,
        shutdown: &Shutdown,
        health: &Health,
    ) -> Result<Sink, SinkError> {
        let pg = cfg.postgres.clone().ok_or(SinkError::NotConfigured {
            section: "postgres",
        })?;
        let kafka = cfg
            .kafka
            .clone()
            .ok_or(SinkError::NotConfigured { section: "kafka" })?;
        // Without the feature the type is `Infallible`, which is Copy.
        #[allow(clippy::clone_on_copy)]
        let alerts = cfg.alerts.clone().map(Arc::new);
        match db::connect(&pg, "sitewatch sink") {
            Ok(mut client) => {
                schema::require(&mut client, &pg.url)?;
                if alerts.is_some() {
                    schema::require_alerts(&mut client, &pg.url)?;
                }
            }
            Err(e @ (SinkError::Tls { .. } | SinkError::CaFile { .. })) => return Err(e),
            Err(e) => log::warn!(target: "sitewatch::sink", "{e}; retrying"),
        }
        // Credentials or certificates Kafka refuses do not start working by retrying: stop
        // now (exit 78) rather than warn for ever. A broker that is down is waited for.
        if let Err(e) = kafka::Client::connect(&kafka) {
            if e.is_config() {
                return Err(SinkError::Kafka(e));
            }
            log::warn!(target: "sitewatch::sink", "{e}; retrying");
        }
        let status = Arc::new(Mutex::new(SinkStatus {
            topic: kafka.topic.clone(),
            ..SinkStatus::default()
        }));
        let coordinator = Coordinator {
            pg,
            kafka,
            shutdown: shutdown.clone(),
            status: status.clone(),
            workers: BTreeMap::new(),
            hb: health.register("sink"),
            health: health.clone(),
            worker_beats: BTreeMap::new(),
            alerts: alerts.clone(),
            #[cfg(feature = "alerts")]
            removed_channels_checked: std::cell::Cell::new(false),
        };
        #[cfg(feature = "alerts")]
        let notifier = match &alerts {
            Some(a) if !a.channels.is_empty() => Some(crate::alerts::notify::Notifier::start(
                a,
                &coordinator.pg,
                shutdown,
                health,
            )?),
            _ => None,
        };
        #[cfg(feature = "fleet")]
        let agents = {
            let ended = Shutdown::new();
            let thread = super::agents::start(
                coordinator.pg.clone(),
                coordinator.kafka.clone(),
                [shutdown.clone(), ended.clone()],
                health.register("sink-agents"),
            )?;
            (thread, ended)
        };
        let thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || coordinator.run())
            .map_err(|source| SinkError::Thread { source })?;
        Ok(Sink {
            coordinator: thread,
            status,
            #[cfg(feature = "alerts")]
            notifier,
            #[cfg(feature = "fleet")]
            agents,
        })
    }

    /// A snapshot of the owned partitions and their progress.
    pub fn status(&self) -> SinkStatus {
        #[allow(unused_mut)]
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        #[cfg(feature = "alerts")]
        if let Some(n) = &self.notifier {
            s.alert_channels = n.status();
        }
        s
    }

    /// True once the sink has stopped (shutdown, or an error retrying cannot fix).
    pub fn is_finished(&self) -> bool {
        self.coordinator.is_finished()
    }

    /// Waits until the sink stops (after the shutdown it was started with is triggered).
    pub fn join(self) -> Result<(), SinkError> {
        let result = self.coordinator.join().unwrap_or(Err(SinkError::Panicked));
        #[cfg(feature = "alerts")]
        if let Some(n) = self.notifier {
            n.join();
        }
        // The coordinator may stop on its own (a schema it refuses): so does the reader.
        #[cfg(feature = "fleet")]
        {
            self.agents.1.trigger();
            let _ = self.agents.0.join();
        }
        result
    }
}

/// `sitewatch sink`: consumes until `shutdown` is triggered.
pub fn run(cfg: &Config, shutdown: &Shutdown) -> Result<(), SinkError> {
    Sink::start(cfg, shutdown)?.join()
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

struct WorkerHandle {
    stop: Shutdown,
    thread: JoinHandle<Result<(), SinkError>>,
}

struct Coordinator {
    pg: PostgresConfig,
    kafka: KafkaConfig,
    shutdown: Shutdown,
    status: SharedStatus,
    workers: BTreeMap<i32, WorkerHandle>,
    health: Health,
    hb: Heartbeat,
    /// One heartbeat per partition ever owned, reused when a partition comes back.
    worker_beats: BTreeMap<i32, Heartbeat>,
    alerts: Option<Arc<crate::alerts::AlertsConfig>>,
    /// Whether `maintain` has ended the deliveries of removed alert channels since start.
    #[cfg(feature = "alerts")]
    removed_channels_checked: std::cell::Cell<bool>,
}

impl Coordinator {
    fn run(mut self) -> Result<(), SinkError> {
        let topic = self.kafka.topic.clone();
        let mut owner: Option<Ownership> = None;
        let mut meta: Option<kafka::Client> = None;
        let mut partitions: Vec<i32> = Vec::new();
        let mut partitions_at: Option<Instant> = None;
        let mut maintained_at: Option<Instant> = None;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        while !self.shutdown.is_triggered() {
            self.hb.beat();
            self.reap(&mut owner);
            let session = match owner.as_mut() {
                Some(o) => o,
                None => match db::connect(&self.pg, "sitewatch sink locks") {
                    Ok(mut c) => {
                        // Started while the database was down: check now what start() could
                        // not. A missing schema is not something retrying fixes.
                        let required = schema::require(&mut c, &self.pg.url).and_then(|()| {
                            match self.alerts.is_some() {
                                true => schema::require_alerts(&mut c, &self.pg.url),
                                false => Ok(()),
                            }
                        });
                        if let Err(e @ SinkError::SchemaMissing { .. }) = required {
                            self.stop_all();
                            return Err(e);
                        }
                        owner.insert(Ownership::new(c, &topic))
                    }
                    Err(e) => {
                        log::warn!(target: "sitewatch::sink", "lock session: {e}");
                        update(&self.status, |s| s.retries += 1);
                        self.shutdown.sleep(backoff.next_delay());
                        continue;
                    }
                },
            };
            if let Err(e) = session.check_alive() {
                // Every lock went with the session: another sink may own our partitions now.
                log::warn!(target: "sitewatch::sink", "lock session lost ({e}); stopping workers");
                update(&self.status, |s| s.retries += 1);
                self.stop_all();
                owner = None;
                self.shutdown.sleep(backoff.next_delay());
                continue;
            }
            if partitions_at.is_none_or(|t| t.elapsed() >= PARTITIONS_REFRESH) {
                match self.partitions(&mut meta) {
                    Ok(list) => {
                        if list != partitions {
                            log::info!(target: "sitewatch::sink", "topic {topic}: partitions {list:?}");
                        }
                        partitions = list;
                        partitions_at = Some(Instant::now());
                        update(&self.status, |s| s.kafka_refusal = None);
                    }
                    Err(e) => {
                        kafka_failed(&self.status, format_args!("topic {topic}"), &e);
                        meta = None;
                    }
                }
            }
            match self.balance(session, &partitions) {
                Ok(()) => {}
                Err(e) => {
                    log::warn!(target: "sitewatch::sink", "lock session: {e}");
                    self.stop_all();
                    owner = None;
                    continue;
                }
            }
            if maintained_at.is_none_or(|t| t.elapsed() >= MAINTENANCE_INTERVAL) {
                match self.maintain() {
                    Ok(()) => maintained_at = Some(Instant::now()),
                    // Retried on a later pass; partitions are also created on demand.
                    Err(e) => log::warn!(target: "sitewatch::sink", "maintenance: {e}"),
                }
            }
            backoff.reset();
            self.shutdown.sleep(TAKEOVER_INTERVAL);
        }
        self.stop_all();
        self.hb.idle();
        Ok(())
    }

    /// Takes free partitions up to this sink's fair share, or gives one up when it holds more
    /// than its share (another sink joined). One release per pass keeps the hand-over gradual.
    fn balance(&mut self, session: &mut Ownership, partitions: &[i32]) -> Result<(), SinkError> {
        if partitions.is_empty() {
            // Not joined before the partition list is known: a sink that cannot reach Kafka
            // must not count as a member and shrink the others' share.
            return Ok(());
        }
        session.join_group()?;
        let members = session.members()?.max(1) as usize;
        let share = partitions.len().div_ceil(members);
        if self.workers.len() > share {
            if let Some((&p, _)) = self.workers.iter().next_back() {
                self.stop_worker(p);
                session.release(p)?;
                log::info!(target: "sitewatch::sink", "{}/{p}: released to another sink ({members} sinks)", self.kafka.topic);
            }
            return Ok(());
        }
        for &p in partitions {
            if self.workers.len() >= share {
                break;
            }
            if !self.workers.contains_key(&p) && session.try_acquire(p)? {
                self.spawn(p);
            }
        }
        Ok(())
    }

    fn stop_worker(&mut self, partition: i32) {
        if let Some(w) = self.workers.remove(&partition) {
            w.stop.trigger();
            self.join_worker(partition, w);
        }
    }

    /// Waits for a worker that was told to stop (or ended) and logs how it ended.
    fn join_worker(&self, partition: i32, w: WorkerHandle) {
        match w.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!(target: "sitewatch::sink", "partition {partition}: {e}"),
            Err(_) => {
                log::error!(target: "sitewatch::sink", "partition {partition}: worker panicked")
            }
        }
        update(&self.status, |s| {
            s.partitions.remove(&partition);
        });
    }

    fn partitions(&self, meta: &mut Option<kafka::Client>) -> Result<Vec<i32>, KafkaError> {
        let client = match meta {
            Some(c) => c,
            None => meta.insert(kafka::Client::connect(&self.kafka)?),
        };
        if self.kafka.create_topic {
            client.ensure_topic(
                &self.kafka.topic,
                self.kafka.partitions,
                self.kafka.replication_factor,
            )?;
        }
        client.partitions(&self.kafka.topic)
    }

    fn maintain(&self) -> Result<(), SinkError> {
        let mut client = db::connect(&self.pg, "sitewatch sink maintenance")?;
        // Once per start, on the first pass that reaches the database: the pending deliveries
        // of alert channels removed from the config end as `abandoned`.
        #[cfg(feature = "alerts")]
        if let Some(a) = &self.alerts
            && !self.removed_channels_checked.get()
        {
            crate::alerts::notify::abandon_removed_channels(&mut client, a)?;
            self.removed_channels_checked.set(true);
        }
        let done = schema::maintain(
            &mut client,
            self.pg.retention,
            self.pg.rollup_retention,
            crate::util::unix_ms_now(),
        )?;
        for name in &done.dropped_partitions {
            log::info!(target: "sitewatch::sink", "retention: dropped {name}");
        }
        Ok(())
    }

    fn spawn(&mut self, partition: i32) {
        let stop = Shutdown::new();
        let health = &self.health;
        let hb = self
            .worker_beats
            .entry(partition)
            .or_insert_with(|| health.register(&format!("sink-p{partition}")))
            .clone();
        hb.beat();
        let worker = Worker {
            hb,
            partition,
            pg: self.pg.clone(),
            kafka: self.kafka.clone(),
            stop: stop.clone(),
            status: self.status.clone(),
            alerts: self.alerts.clone(),
        };
        update(&self.status, |s| {
            s.partitions.insert(partition, PartitionStatus::default());
        });
        match std::thread::Builder::new()
            .name(format!("sink-p{partition}"))
            .spawn(move || worker.run())
        {
            Ok(thread) => {
                log::info!(target: "sitewatch::sink", "{}/{partition}: owned", self.kafka.topic);
                self.workers
                    .insert(partition, WorkerHandle { stop, thread });
            }
            Err(e) => {
                log::error!(target: "sitewatch::sink", "cannot start a worker thread: {e}");
                update(&self.status, |s| {
                    s.partitions.remove(&partition);
                });
            }
        }
    }

    /// Joins workers that ended on their own (fenced, or a panic) and gives their partitions
    /// up, so they are retried (here or by another sink).
    fn reap(&mut self, owner: &mut Option<Ownership>) {
        let done: Vec<i32> = self
            .workers
            .iter()
            .filter(|(_, w)| w.thread.is_finished())
            .map(|(&p, _)| p)
            .collect();
        for p in done {
            let Some(w) = self.workers.remove(&p) else {
                continue;
            };
            self.join_worker(p, w);
            if let Some(o) = owner.as_mut()
                && o.release(p).is_err()
            {
                *owner = None;
                self.stop_all();
                return;
            }
        }
    }

    fn stop_all(&mut self) {
        for w in self.workers.values() {
            w.stop.trigger();
        }
        for (p, w) in std::mem::take(&mut self.workers) {
            self.join_worker(p, w);
        }
    }
}

struct Worker {
    hb: Heartbeat,
    partition: i32,
    pg: PostgresConfig,
    kafka: KafkaConfig,
    stop: Shutdown,
    status: SharedStatus,
    /// Without the feature `[alerts]` is refused by the config, so this is always `None`.
    #[cfg_attr(not(feature = "alerts"), allow(dead_code))]
    alerts: Option<Arc<crate::alerts::AlertsConfig>>,
}

/// What a worker carries from one pass to the next. Every failure drops the part that failed
/// and sets `caught_up`, so no retry repeats the failed request as it was sent (issue 12: a
/// zero-wait fetch kept after a failure was sent again forever).
struct WorkerState {
    writer: Option<Writer>,
    client: Option<kafka::Client>,
    /// The stored offset as last read or committed: the writer's compare-and-set base.
    from: Option<i64>,
    /// Where to fetch next; `None` until read from PostgreSQL or, without one, from Kafka.
    position: Option<i64>,
    /// Whether the next fetch long-polls (see [`long_poll_next`]).
    caught_up: bool,
    backoff: Backoff,
}

/// Whether the fetch after `fetched` should wait for data: when it found nothing new (so a
/// broker that keeps answering empty cannot make the loop spin, and "nothing yet" is asked
/// again with a wait, not as it was), when it reached the high watermark, or when the broker
/// did not say where that is.
fn long_poll_next(fetched: &Fetched, found_records: bool) -> bool {
    !found_records
        || fetched
            .high_watermark
            .is_none_or(|hw| fetched.next_offset >= hw)
}

impl Worker {
    fn run(self) -> Result<(), SinkError> {
        // Idle (never "stuck") once this worker ends, whatever the way out.
        let hb = self.hb.clone();
        let _idle_on_exit = OnDrop(move || hb.idle());
        let mut st = WorkerState {
            writer: None,
            client: None,
            from: None,
            position: None,
            caught_up: true,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        };
        // About `batch_size` records of ~1 KiB per fetch (a fetch is one transaction).
        let max_bytes = fetch_max_bytes(self.pg.batch_size);
        while !self.stop.is_triggered() {
            // Every pass is bounded (fetch wait, statement and socket timeouts, backoff ≤ 10 s).
            self.hb.beat();
            let Some(pos) = self.prepare(&mut st) else {
                continue;
            };
            let Some(fetched) = self.fetch(&mut st, pos, max_bytes) else {
                continue;
            };
            self.commit(&mut st, pos, fetched)?;
        }
        Ok(())
    }

    /// After any failure: say so, long-poll next time and wait out the backoff.
    fn back_off(&self, st: &mut WorkerState, why: std::fmt::Arguments<'_>) {
        log::warn!(target: "sitewatch::sink", "{}/{}: {why}", self.kafka.topic, self.partition);
        self.pause(st);
    }

    /// Long-poll next time and wait out the backoff (the failure is already logged).
    fn pause(&self, st: &mut WorkerState) {
        update(&self.status, |s| s.retries += 1);
        st.caught_up = true;
        self.stop.sleep(st.backoff.next_delay());
    }

    fn set_status(&self, f: impl FnOnce(&mut PartitionStatus)) {
        update(&self.status, |s| {
            if let Some(st) = s.partitions.get_mut(&self.partition) {
                f(st);
            }
        });
    }

    /// Opens what is missing (the writer, which re-reads the stored offset; the Kafka client;
    /// the position) and returns where to fetch; `None` after a failure (already backed off).
    fn prepare(&self, st: &mut WorkerState) -> Option<i64> {
        if st.writer.is_none() {
            match self.open_writer() {
                Ok((w, stored)) => {
                    st.writer = Some(w);
                    st.from = stored;
                    st.position = stored;
                    self.set_status(|s| s.next_offset = stored);
                }
                Err(e) => {
                    self.back_off(st, format_args!("{e}; retrying"));
                    return None;
                }
            }
        }
        let k = match st.client.as_mut() {
            Some(k) => k,
            None => match kafka::Client::connect(&self.kafka) {
                Ok(k) => st.client.insert(k),
                Err(e) => {
                    let what = format_args!("{}/{}", self.kafka.topic, self.partition);
                    kafka_failed(&self.status, what, &e);
                    self.pause(st);
                    return None;
                }
            },
        };
        if st.position.is_none() {
            match k.earliest_offset(&self.kafka.topic, self.partition) {
                Ok(o) => st.position = Some(o),
                Err(e) => {
                    st.client = None;
                    self.back_off(st, format_args!("{e}; retrying"));
                }
            }
        }
        st.position
    }

    /// One fetch from `pos`; `None` when there is nothing to write (the position was moved,
    /// or a failure was backed off).
    fn fetch(&self, st: &mut WorkerState, pos: i64, max_bytes: i32) -> Option<Fetched> {
        let (topic, p) = (self.kafka.topic.as_str(), self.partition);
        let k = st.client.as_mut()?;
        let wait = if st.caught_up {
            FETCH_WAIT
        } else {
            Duration::ZERO
        };
        match k.fetch(topic, p, pos, max_bytes, wait) {
            Ok(f) => {
                log::trace!(
                    target: "sitewatch::sink",
                    "{topic}/{p}: fetch at {pos}: {} records {:?}..{:?}, next {}, high watermark {:?}",
                    f.records.len(), f.records.first().map(|r| r.offset),
                    f.records.last().map(|r| r.offset), f.next_offset, f.high_watermark
                );
                Some(f)
            }
            Err(KafkaError::OffsetOutOfRange { .. }) => {
                // Retention removed records we never read, or the topic was recreated.
                match k.earliest_offset(topic, p) {
                    Ok(o) => {
                        log::warn!(target: "sitewatch::sink", "{topic}/{p}: offset {pos} out of range; resuming at {o}");
                        st.position = Some(o);
                    }
                    Err(e) => {
                        st.client = None;
                        self.back_off(st, format_args!("{e}; retrying"));
                    }
                }
                None
            }
            Err(e) => {
                st.client = None;
                self.back_off(st, format_args!("fetch: {e}; retrying"));
                None
            }
        }
    }

    /// Writes what a fetch from `pos` returned, with the new offset, in one transaction.
    /// Returns an error only when this worker must end (fenced by another sink).
    fn commit(&self, st: &mut WorkerState, pos: i64, fetched: Fetched) -> Result<(), SinkError> {
        if let Some(hw) = fetched.high_watermark {
            self.set_status(|s| s.high_watermark = hw);
        }
        let found = fetched.records.iter().any(|r| r.offset >= pos);
        st.caught_up = long_poll_next(&fetched, found);
        let mut records = fetched.records;
        records.retain(|r| r.offset >= pos);
        let Some(last) = records.last().map(|r| r.offset) else {
            // Only control batches (or nothing): move past them without a write.
            if fetched.next_offset > pos {
                st.position = Some(fetched.next_offset);
            }
            return Ok(());
        };
        let Some(w) = st.writer.as_mut() else {
            return Ok(());
        };
        // One fetch, one transaction, committed at the end of the fetch's last complete
        // batch. Never split a fetch: resuming in the middle of a Kafka record batch is
        // legal, but tansu then answers from the *next* batch, silently skipping the rest
        // of the one we were in (seen in the PostgreSQL-restart test). The fetch size
        // (from `batch_size`) bounds the transaction instead.
        let end = fetched.next_offset.max(last + 1);
        match w.write(st.from, &records, end) {
            Ok(outcome) => {
                log::debug!(
                    target: "sitewatch::sink",
                    "{}/{}: committed {:?}..{}: {} rows, {} duplicates, {} dead letters",
                    self.kafka.topic, self.partition, st.from,
                    outcome.next_offset, outcome.inserted, outcome.duplicates, outcome.dead_letters
                );
                st.from = Some(outcome.next_offset);
                st.position = Some(outcome.next_offset);
                st.backoff.reset();
                self.set_status(|s| {
                    s.next_offset = Some(outcome.next_offset);
                    s.rows += outcome.inserted;
                    s.duplicates += outcome.duplicates;
                    s.dead_letters += outcome.dead_letters;
                });
                Ok(())
            }
            Err(e @ SinkError::Fenced { .. }) => Err(e),
            Err(e) => {
                // The commit may or may not have happened: reconnect and re-read.
                st.writer = None;
                self.back_off(st, format_args!("{e}; reconnecting"));
                Ok(())
            }
        }
    }

    fn open_writer(&self) -> Result<(Writer, Option<i64>), SinkError> {
        let client = db::connect(&self.pg, &format!("sitewatch sink p{}", self.partition))?;
        let mut w = Writer::new(client, &self.kafka.topic, self.partition, self.pg.retention)?;
        #[cfg(feature = "alerts")]
        if let Some(a) = &self.alerts {
            w = w.with_alerts(a.clone());
        }
        let stored = w.stored_offset()?;
        Ok((w, stored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_and_lag() {
        let mut s = SinkStatus {
            topic: "checks".into(),
            ..SinkStatus::default()
        };
        assert_eq!(
            s.line(),
            "sink: checks partitions none lag 0; 0 rows, 0 dead letters"
        );
        let part = |next: Option<i64>, hw: i64, rows: u64, dead: u64| PartitionStatus {
            next_offset: next,
            high_watermark: hw,
            rows,
            duplicates: 0,
            dead_letters: dead,
        };
        s.partitions.insert(0, part(Some(90), 100, 80, 1));
        s.partitions.insert(2, part(None, 5, 0, 0));
        s.partitions.insert(3, part(Some(7), 7, 7, 0));
        assert_eq!(s.lag(), 15);
        assert_eq!(
            s.line(),
            "sink: checks partitions 0,2,3 lag 15; 87 rows, 1 dead letters"
        );
    }

    #[test]
    fn fetch_size_follows_batch_size_within_bounds() {
        let check = |batch: usize, bytes: i32| assert_eq!(fetch_max_bytes(batch), bytes, "{batch}");
        check(1, 64 * 1024);
        check(5000, 5000 * 1024);
        check(100_000, 16 * 1024 * 1024);
    }

    /// Issue 12: after an answer that said nothing (no records, no high watermark) the next
    /// fetch waits; a zero-wait fetch is sent only while records keep coming below the end.
    #[test]
    fn the_next_fetch_waits_unless_records_keep_coming_below_the_end() {
        let check = |high_watermark: Option<i64>, next_offset: i64, found: bool, want: bool| {
            let f = Fetched {
                records: Vec::new(),
                high_watermark,
                next_offset,
            };
            assert_eq!(
                long_poll_next(&f, found),
                want,
                "{high_watermark:?} {next_offset} {found}"
            );
        };
        check(None, 1000, false, true);
        check(Some(3000), 1000, false, true);
        check(Some(3000), 1500, true, false);
        check(Some(3000), 3000, true, true);
        // Records, but the broker did not say where the end is: do not hammer it.
        check(None, 1500, true, true);
    }
}
