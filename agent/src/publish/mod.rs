//! The publisher: takes check records from the output stage, batches them to Kafka
//! (acks=all), and spools them to disk when the broker is unreachable, replaying them in order
//! before new records once it is back.
//!
//! Threads: [`Publisher::write`] runs on the output thread and only ever does a bounded-queue
//! `try_send` or, when that queue is full, a local disk append to the [`spool`]
//! (Architecture Invariant: the probe never blocks on Kafka). One sender thread
//! (`kafka-publisher`) owns the Kafka [`Client`]: it connects (creating the topic when
//! `create_topic`), replays the spool, batches queued records by size (`batch_max`) and time
//! (`linger`), and on a failed send puts the batch in the spool and reconnects with backoff.
//! When a request goes unanswered for `kafka.spool_after`, the output thread's idle tick
//! ([`Publisher::guard`]) copies that request's records and the queue to the spool and `write`
//! appends there directly until it returns, so a crash during an outage loses at most
//! `spool_after` of records.
//!
//! Delivery is at-least-once: a record leaves the spool only after Kafka acknowledged it with
//! acks=all, and a batch whose outcome is unknown (timeout) is sent again, so the topic can
//! hold duplicates; the sink dedupes by `check_id`. Order: records of one run reach Kafka in
//! the order they were written, except that records spilled by `write` while the queue was
//! full may overtake the (at most queue-size) records still queued. Every record is counted:
//! `accepted == acked + in spool + queued/in flight + dropped` (see [`PublisherStats`]).

pub mod spool;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SendError, Sender as ChannelSender, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, KafkaConfig};
use crate::kafka::{Client, KafkaError, ProduceRecord};
use crate::output::{Output, OutputError};
use crate::result::CheckResult;
use spool::{Spool, SpoolError};

/// Records queued between `write` and the sender thread before `write` spills to disk.
///
/// The queue is an unbounded channel with this bound kept by a counter: a
/// `sync_channel(10_000)` allocates and writes all its slots up front, ~640 KB of RSS on an
/// agent that usually has a handful of records queued.
pub const QUEUE_CAPACITY: usize = 10_000;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Kafka error codes meaning "this record can never be accepted as it is".
const MESSAGE_TOO_LARGE: i16 = 10;
const RECORD_LIST_TOO_LARGE: i16 = 18;
const INVALID_TIMESTAMP: i16 = 32;
const INVALID_RECORD: i16 = 87;

/// The publisher could not start.
#[derive(Debug)]
pub enum PublishError {
    Spool(SpoolError),
    Thread(std::io::Error),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Spool(e) => e.fmt(f),
            PublishError::Thread(e) => write!(f, "cannot start the publisher thread: {e}"),
        }
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Displayed as the spool error itself: its cause comes next, not itself again.
            PublishError::Spool(e) => std::error::Error::source(e),
            PublishError::Thread(e) => Some(e),
        }
    }
}

impl From<SpoolError> for PublishError {
    fn from(e: SpoolError) -> Self {
        PublishError::Spool(e)
    }
}

/// Counters since start. `accepted` = `acked` + `spooled` + (queued or in flight) + `dropped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Records given to `write`.
    pub accepted: u64,
    /// Records Kafka acknowledged (including replays from the spool of an earlier run, so this
    /// can exceed `accepted`).
    pub acked: u64,
    /// Records in the spool now.
    pub spooled: u64,
    /// Bytes the spool's segment files take on disk now (what `agent.spool_max` bounds).
    pub spool_bytes: u64,
    /// Records waiting in the in-memory queue for the sender thread (at most
    /// [`QUEUE_CAPACITY`]).
    pub queued: u64,
    /// Records lost: deleted from a full spool, or refused by Kafka as invalid.
    pub dropped: u64,
    /// Whether the sender has a working connection.
    pub connected: bool,
}

/// A live view of a publisher's counters (see [`Publisher::stats_source`]).
pub type StatsSource = Box<dyn Fn() -> PublisherStats + Send>;

#[derive(Default)]
struct Shared {
    accepted: AtomicU64,
    acked: AtomicU64,
    spooled: AtomicU64,
    spool_bytes: AtomicU64,
    dropped: AtomicU64,
    connected: AtomicBool,
    /// Set while `write` spills because the queue is full (to log once per episode).
    spilling: AtomicBool,
    /// Records in the queue (sent and not yet received): the bound of [`QUEUE_CAPACITY`].
    queued: AtomicUsize,
    /// The sender's network call in progress, and a copy of the records only in its memory.
    inflight: Mutex<Inflight>,
    /// Set while the sender's call has gone unanswered for longer than `spool_after`: new
    /// records go straight to the spool (see [`Publisher::guard`]).
    stalled: AtomicBool,
    /// Why Kafka refuses us as configured (credentials, certificates), while it does.
    refusal: Mutex<Option<String>>,
    /// The outcome of the sender's first connection, for the daemon's start (see
    /// [`Publisher::first_connect`]).
    first: Mutex<FirstConnect>,
    first_done: Condvar,
}

/// The sender's current network call (connect, produce, replay), as the output thread sees it.
#[derive(Default)]
struct Inflight {
    /// When the call began; `None` between calls.
    since: Option<Instant>,
    /// The records that live only in the sender's memory during the call (the batch being
    /// gathered or sent).
    recs: Vec<ProduceRecord>,
    /// Set when the output thread copied `recs` to the spool because the call took too long:
    /// the sender must not spool them again.
    saved: bool,
}

#[derive(Default)]
enum FirstConnect {
    #[default]
    Pending,
    /// Connected, or failed in a way a retry may fix.
    Done,
    /// Refused as configured.
    Refused(KafkaError),
}

impl Shared {
    fn snapshot(&self) -> PublisherStats {
        PublisherStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            spooled: self.spooled.load(Ordering::Relaxed),
            spool_bytes: self.spool_bytes.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed) as u64,
            dropped: self.dropped.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
        }
    }

    /// One record taken off the queue.
    fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// Copies the spool's size after a change, under the spool's lock (so the two agree).
    fn spool_changed(&self, spool: &Spool) {
        self.spooled.store(spool.len(), Ordering::Relaxed);
        self.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
    }

    fn inflight(&self) -> MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Cmd {
    Record(ProduceRecord),
    Close(Instant, SyncSender<()>),
}

/// The Kafka output. See the module docs.
pub struct Publisher {
    tx: Option<ChannelSender<Cmd>>,
    /// Shared with the sender, which locks it only to receive (never across a network call),
    /// so `close` can empty the queue into the spool if the sender is stuck in a request.
    rx: Arc<Mutex<Receiver<Cmd>>>,
    thread: Option<JoinHandle<()>>,
    spool: Arc<Mutex<Spool>>,
    shared: Arc<Shared>,
    /// `kafka.spool_after`, or `request_timeout` when shorter.
    spool_after: Duration,
}

fn lock(spool: &Mutex<Spool>) -> MutexGuard<'_, Spool> {
    // A panic while holding the lock leaves a consistent spool (every method updates its
    // bookkeeping after the disk), so a poisoned lock is still usable.
    spool.lock().unwrap_or_else(|p| p.into_inner())
}

impl Publisher {
    /// Opens the spool (`agent.state_dir/spool`, at most `agent.spool_max_bytes`) and starts
    /// the sender thread. Does not touch the network: an unreachable broker is not an error
    /// here, records just go to the spool until it is back.
    pub fn start(kafka: &KafkaConfig, agent: &AgentConfig) -> Result<Publisher, PublishError> {
        Publisher::start_with_spool(kafka, agent.state_dir.join("spool"), agent.spool_max_bytes)
    }

    /// As [`Publisher::start`] with an explicit spool directory and size.
    pub fn start_with_spool(
        kafka: &KafkaConfig,
        spool_dir: PathBuf,
        spool_max_bytes: u64,
    ) -> Result<Publisher, PublishError> {
        let spool = Spool::open(&spool_dir, spool_max_bytes)?;
        let shared = Arc::new(Shared::default());
        shared.spool_changed(&spool);
        let spool = Arc::new(Mutex::new(spool));
        let (tx, rx) = std::sync::mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let sender = Sender {
            cfg: kafka.clone(),
            client: None,
            rx: rx.clone(),
            spool: spool.clone(),
            shared: shared.clone(),
            batch: Vec::new(),
            batch_bytes: 0,
            batch_since: None,
            next_connect: Instant::now(),
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        };
        let thread = std::thread::Builder::new()
            .name("kafka-publisher".into())
            .spawn(move || sender.run())
            .map_err(PublishError::Thread)?;
        Ok(Publisher {
            tx: Some(tx),
            rx,
            thread: Some(thread),
            spool,
            shared,
            spool_after: kafka.spool_after.min(kafka.request_timeout),
        })
    }

    /// Waits at most `wait` for the sender's first connection. Returns the error when Kafka
    /// refused us as configured ([`KafkaError::is_config`]: credentials, certificates); `Ok`
    /// when it connected, failed in a way a retry may fix, or has not answered yet.
    pub fn first_connect(&self, wait: Duration) -> Result<(), KafkaError> {
        let first = self.shared.first.lock().unwrap_or_else(|p| p.into_inner());
        let (mut first, _) = self
            .shared
            .first_done
            .wait_timeout_while(first, wait, |f| matches!(f, FirstConnect::Pending))
            .unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *first, FirstConnect::Done) {
            FirstConnect::Refused(e) => Err(e),
            FirstConnect::Pending | FirstConnect::Done => Ok(()),
        }
    }

    pub fn stats(&self) -> PublisherStats {
        self.shared.snapshot()
    }

    /// Reads [`Publisher::stats`] from elsewhere after the publisher has moved into the
    /// scheduler's output (the fleet's liveness records carry checks per second and spool
    /// depth).
    pub fn stats_source(&self) -> StatsSource {
        let shared = self.shared.clone();
        Box::new(move || shared.snapshot())
    }

    /// Takes one ready-made record (key, value, timestamp): what `write` does after encoding.
    pub fn send(&mut self, rec: ProduceRecord) -> Result<(), OutputError> {
        self.shared.accepted.fetch_add(1, Ordering::Relaxed);
        if self.shared.stalled.load(Ordering::Relaxed) {
            // Kafka has not answered for `spool_after`: a record queued now would wait in
            // memory, and a crash would lose it.
            return spool_append(&self.spool, &self.shared, &[rec]).map_err(OutputError::Spool);
        }
        let queued = &self.shared.queued;
        let rec = match &self.tx {
            Some(tx) if queued.fetch_add(1, Ordering::AcqRel) < QUEUE_CAPACITY => {
                match tx.send(Cmd::Record(rec)) {
                    Ok(()) => {
                        self.shared.spilling.store(false, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(SendError(cmd)) => {
                        queued.fetch_sub(1, Ordering::AcqRel);
                        match cmd {
                            Cmd::Record(r) => r,
                            Cmd::Close(..) => return Ok(()),
                        }
                    }
                }
            }
            Some(_) => {
                // Full.
                queued.fetch_sub(1, Ordering::AcqRel);
                rec
            }
            None => rec,
        };
        if !self.shared.spilling.swap(true, Ordering::Relaxed) {
            log::warn!(
                target: "sitewatch::publish",
                "publisher queue full ({QUEUE_CAPACITY} records): spilling to the spool"
            );
        }
        spool_append(&self.spool, &self.shared, &[rec]).map_err(OutputError::Spool)
    }
}

impl Publisher {
    /// Bounds how long a record lives only in memory: once the sender's network call has gone
    /// unanswered for `spool_after` (a broker that hangs rather than refuses), this thread
    /// copies the records of that call and the whole queue to the spool, and `send` appends
    /// new records there directly until the call returns. Runs on the output thread at its idle
    /// ticks (≤ 100 ms apart, also under a stream of records); costs a lock and a clock read.
    fn guard(&self) {
        let mut inflight = self.shared.inflight();
        let Some(since) = inflight.since else {
            return;
        };
        let waited = since.elapsed();
        if waited < self.spool_after {
            return;
        }
        if !self.shared.stalled.swap(true, Ordering::Relaxed) {
            self.shared.connected.store(false, Ordering::Relaxed);
            log::warn!(
                target: "sitewatch::publish",
                "Kafka unavailable: no answer for {waited:?}; new records go to the spool until it answers"
            );
        }
        let mut saved = Vec::new();
        if !inflight.saved {
            inflight.saved = true;
            saved = std::mem::take(&mut inflight.recs);
        }
        // The lock is free while the sender is in its call; if the sender holds it, it is
        // receiving, not stuck.
        if let Ok(rx) = self.rx.try_lock() {
            while let Ok(cmd) = rx.try_recv() {
                if let Cmd::Record(r) = cmd {
                    self.shared.dequeued();
                    saved.push(r);
                }
            }
        }
        if !saved.is_empty() {
            // Errors are logged and counted inside.
            let _ = spool_append(&self.spool, &self.shared, &saved);
        }
    }

    /// The sender did not finish closing in time (stuck in a request): move what only lives
    /// in memory (the queue, the batch in flight) to the spool from this thread.
    fn rescue(&self) {
        let mut saved: Vec<ProduceRecord> = {
            let mut inflight = self.shared.inflight();
            if inflight.saved {
                Vec::new()
            } else {
                inflight.saved = true;
                std::mem::take(&mut inflight.recs)
            }
        };
        if let Ok(rx) = self.rx.lock() {
            while let Ok(cmd) = rx.try_recv() {
                if let Cmd::Record(r) = cmd {
                    self.shared.dequeued();
                    saved.push(r);
                }
            }
        }
        log::warn!(
            target: "sitewatch::publish",
            "publisher still busy with Kafka at the shutdown deadline: {} records saved to the spool (may be delivered twice)",
            saved.len()
        );
        let _ = spool_append(&self.spool, &self.shared, &saved);
    }
}

/// Appends records to the spool and updates the counters.
fn spool_append(
    spool: &Mutex<Spool>,
    shared: &Shared,
    recs: &[ProduceRecord],
) -> Result<(), SpoolError> {
    let mut s = lock(spool);
    let mut result = Ok(());
    for r in recs {
        match s.append(r) {
            Ok(o) => {
                shared.dropped.fetch_add(o.dropped, Ordering::Relaxed);
            }
            Err(e) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                log::error!(target: "sitewatch::publish", "record lost: {e}");
                result = Err(e);
            }
        }
    }
    let flushed = s.flush();
    shared.spool_changed(&s);
    result.and(flushed)
}

impl Output for Publisher {
    fn write(&mut self, record: CheckResult) -> Result<(), OutputError> {
        let timestamp_ms = crate::util::parse_rfc3339_ms(&record.started_at)
            .unwrap_or_else(crate::util::unix_ms_now);
        self.send(ProduceRecord {
            key: record.target.clone().into_bytes(),
            value: record.to_json_bytes(),
            timestamp_ms,
        })
    }

    /// Persists everything not yet acknowledged to the spool, then tries to deliver the spool
    /// until `deadline`. What is left stays in the spool for the next start. Returns by about
    /// `deadline` + 1 s even when the sender is stuck in a request: then this thread saves the
    /// queue and the batch in flight to the spool itself (they may be sent twice).
    fn close(&mut self, deadline: Instant) -> Result<(), OutputError> {
        if let Some(tx) = self.tx.take() {
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
            let delivered = tx.send(Cmd::Close(deadline, done_tx)).is_ok();
            let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
            if delivered && done_rx.recv_timeout(wait).is_ok() {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            } else {
                self.rescue();
            }
        }
        let mut s = lock(&self.spool);
        let synced = s.sync();
        let left = s.len();
        drop(s);
        let st = self.stats();
        log::info!(
            target: "sitewatch::publish",
            "publisher closed: {} records acknowledged, {left} left in the spool, {} dropped",
            st.acked,
            st.dropped
        );
        synced.map_err(OutputError::Spool)
    }

    fn idle(&mut self) -> Result<(), OutputError> {
        self.guard();
        Ok(())
    }

    fn status(&self) -> String {
        let st = self.stats();
        let mut s = format!("spool {} records", st.spooled);
        let refusal = self
            .shared
            .refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(e) = refusal {
            s.push_str(&format!(", Kafka refuses us: {e}"));
        } else if !st.connected {
            s.push_str(", Kafka unreachable");
        }
        if st.dropped > 0 {
            s.push_str(&format!(", {} dropped", st.dropped));
        }
        s
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let _ = self.close(Instant::now() + Duration::from_secs(1));
        }
    }
}

/// The sender thread's state.
struct Sender {
    cfg: KafkaConfig,
    client: Option<Client>,
    rx: Arc<Mutex<Receiver<Cmd>>>,
    spool: Arc<Mutex<Spool>>,
    shared: Arc<Shared>,
    batch: Vec<ProduceRecord>,
    batch_bytes: usize,
    batch_since: Option<Instant>,
    next_connect: Instant,
    backoff: Backoff,
}

/// How a send went.
enum Sent {
    /// Kafka has them (some may have been dropped as invalid; counted).
    Done,
    /// Kafka did not take them; keep them.
    Failed,
}

impl Sender {
    fn run(mut self) {
        loop {
            // The batch being gathered lives only in memory: publish a copy for `rescue`
            // while this thread is in a network call.
            if self.client.is_none() && Instant::now() >= self.next_connect {
                self.begin_call(&self.batch);
                self.connect();
                self.end_call_keeping_batch();
            }
            if self.client.is_some() && self.spool_len() > 0 {
                self.begin_call(&self.batch);
                self.replay_one();
                self.end_call_keeping_batch();
            }
            let timeout = self.wait_time();
            // Receive under the queue lock, act (close) after releasing it.
            let mut closing: Option<(Instant, Option<SyncSender<()>>)> = None;
            {
                let rx = self.rx.clone();
                let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                match rx.recv_timeout(timeout) {
                    Ok(Cmd::Record(r)) => {
                        self.shared.dequeued();
                        self.push(r);
                        // Take whatever else is queued, up to a batch.
                        while self.batch_bytes < self.cfg.batch_max_bytes {
                            match rx.try_recv() {
                                Ok(Cmd::Record(r)) => {
                                    self.shared.dequeued();
                                    self.push(r)
                                }
                                Ok(Cmd::Close(deadline, done)) => {
                                    closing = Some((deadline, Some(done)));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Ok(Cmd::Close(deadline, done)) => closing = Some((deadline, Some(done))),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        closing = Some((Instant::now() + Duration::from_secs(1), None));
                    }
                }
            }
            if let Some((deadline, done)) = closing {
                self.close(deadline);
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
            let lingered = self
                .batch_since
                .is_some_and(|t| t.elapsed() >= self.cfg.linger);
            if self.batch_bytes >= self.cfg.batch_max_bytes || lingered {
                self.flush_batch();
            }
        }
    }

    fn spool_len(&self) -> u64 {
        self.shared.spooled.load(Ordering::Relaxed)
    }

    /// How long to wait for the next record.
    fn wait_time(&self) -> Duration {
        if self.client.is_some() && self.spool_len() > 0 {
            return Duration::ZERO; // replay as fast as Kafka takes it
        }
        let mut t = Duration::from_millis(200);
        if let Some(since) = self.batch_since {
            t = t.min(self.cfg.linger.saturating_sub(since.elapsed()));
        }
        if self.client.is_none() {
            t = t.min(self.next_connect.saturating_duration_since(Instant::now()));
        }
        t
    }

    fn push(&mut self, r: ProduceRecord) {
        self.batch_bytes += r.key.len() + r.value.len() + 32;
        self.batch.push(r);
        self.batch_since.get_or_insert_with(Instant::now);
    }

    fn connect(&mut self) {
        let result = Client::connect(&self.cfg).and_then(|mut c| {
            if self.cfg.create_topic {
                c.ensure_topic(
                    &self.cfg.topic,
                    self.cfg.partitions,
                    self.cfg.replication_factor,
                )?;
            } else {
                c.partitions(&self.cfg.topic)?;
            }
            Ok(c)
        });
        let first = match &result {
            Err(e) if e.is_config() => None,
            _ => Some(FirstConnect::Done),
        };
        match result {
            Ok(c) => {
                *self
                    .shared
                    .refusal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                log::info!(
                    target: "sitewatch::publish",
                    "connected to Kafka ({}), topic {}; {} spooled records to replay",
                    self.cfg.brokers.join(","),
                    self.cfg.topic,
                    self.spool_len()
                );
                self.client = Some(c);
                self.backoff.reset();
                self.shared.connected.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                self.disconnected(&e);
                if first.is_none() {
                    self.first_connect_done(FirstConnect::Refused(e));
                }
            }
        }
        if let Some(f) = first {
            self.first_connect_done(f);
        }
    }

    /// Records the outcome of the first connection (later ones change nothing).
    fn first_connect_done(&self, outcome: FirstConnect) {
        let mut first = self.shared.first.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*first, FirstConnect::Pending) {
            *first = outcome;
            self.shared.first_done.notify_all();
        }
    }

    /// Drops the client and schedules a reconnect with growing backoff.
    fn disconnected(&mut self, e: &KafkaError) {
        let was = self.client.take().is_some();
        self.shared.connected.store(false, Ordering::Relaxed);
        let first = self.backoff.is_reset();
        let backoff = self.backoff.next_delay();
        if e.is_config() {
            // Credentials rotated (or a certificate expired) while running: no retry will
            // fix it, but the operator may; say so at every retry, keep every record.
            log::error!(
                target: "sitewatch::publish",
                "Kafka refuses us ({e}): fix [kafka] credentials/certificates and restart; records kept in the spool, retry in {backoff:?}"
            );
            *self
                .shared
                .refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        } else if was || first {
            log::warn!(
                target: "sitewatch::publish",
                "Kafka unavailable ({e}); spooling, retry in {backoff:?}"
            );
        } else {
            log::debug!(target: "sitewatch::publish", "Kafka still unavailable ({e}); retry in {backoff:?}");
        }
        self.next_connect = Instant::now() + backoff;
    }

    /// Sends `recs`; a batch Kafka refuses as invalid is split to find and drop the bad
    /// records, so one oversized record cannot block the rest forever.
    fn send(&mut self, recs: &[ProduceRecord]) -> Sent {
        let Some(client) = self.client.as_mut() else {
            return Sent::Failed;
        };
        let result = client.produce(&self.cfg.topic, recs);
        // Kafka answered: a split batch's many requests are not one stall.
        self.shared.inflight().since = Some(Instant::now());
        match result {
            Ok(()) => {
                self.shared
                    .acked
                    .fetch_add(recs.len() as u64, Ordering::Relaxed);
                Sent::Done
            }
            Err(KafkaError::Broker { code, .. })
                if matches!(
                    code,
                    MESSAGE_TOO_LARGE | RECORD_LIST_TOO_LARGE | INVALID_TIMESTAMP | INVALID_RECORD
                ) =>
            {
                if recs.len() == 1 {
                    log::error!(
                        target: "sitewatch::publish",
                        "Kafka refused a record of target {:?} ({} bytes): {}; dropped",
                        String::from_utf8_lossy(&recs[0].key),
                        recs[0].value.len(),
                        crate::kafka::error_name(code)
                    );
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    return Sent::Done;
                }
                let (a, b) = recs.split_at(recs.len() / 2);
                match self.send(a) {
                    Sent::Done => self.send(b),
                    Sent::Failed => Sent::Failed,
                }
            }
            Err(e) => {
                self.disconnected(&e);
                Sent::Failed
            }
        }
    }

    /// Sends the current batch, or spools it when Kafka is down or the spool must go first.
    fn flush_batch(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.batch_since = None;
        if batch.is_empty() {
            return;
        }
        if self.client.is_some() && self.spool_len() == 0 {
            self.begin_call(&batch);
            let sent = self.send(&batch);
            let saved = self.end_call();
            match sent {
                Sent::Failed if !saved => self.spill(&batch),
                // Kafka took them after all: the spool's copy will be delivered again.
                Sent::Done if saved => log::debug!(
                    target: "sitewatch::publish",
                    "{} records acknowledged after they were spooled (sent twice)",
                    batch.len()
                ),
                _ => {}
            }
            return;
        }
        self.spill(&batch);
    }

    /// A network call begins: `recs` (records only in this thread's memory) become visible to
    /// the output thread, which spools them if the call outlasts `spool_after`.
    fn begin_call(&self, recs: &[ProduceRecord]) {
        let mut f = self.shared.inflight();
        f.recs.clear();
        f.recs.extend_from_slice(recs);
        f.since = Some(Instant::now());
        f.saved = false;
    }

    /// The call ended; returns whether the output thread spooled its records meanwhile.
    fn end_call(&self) -> bool {
        let mut f = self.shared.inflight();
        f.recs.clear();
        f.since = None;
        let saved = std::mem::replace(&mut f.saved, false);
        drop(f);
        if self.shared.stalled.swap(false, Ordering::Relaxed) {
            // The guard marked us unreachable; the call's outcome decides now.
            self.shared
                .connected
                .store(self.client.is_some(), Ordering::Relaxed);
            log::info!(target: "sitewatch::publish", "the stalled Kafka request ended; records queue in memory again");
        }
        saved
    }

    /// `end_call` for a call around which `self.batch` was being gathered: a batch the output
    /// thread spooled meanwhile is dropped here (it is in the spool).
    fn end_call_keeping_batch(&mut self) {
        if self.end_call() {
            self.batch.clear();
            self.batch_bytes = 0;
            self.batch_since = None;
        }
    }

    fn spill(&mut self, recs: &[ProduceRecord]) {
        // Errors are logged and counted inside; the thread carries on.
        let _ = spool_append(&self.spool, &self.shared, recs);
    }

    /// Sends one batch from the head of the spool; acknowledges it on success.
    fn replay_one(&mut self) -> bool {
        let peeked = lock(&self.spool).peek(usize::MAX, self.cfg.batch_max_bytes);
        let (recs, pos) = match peeked {
            Ok(x) => x,
            Err(e) => {
                log::error!(target: "sitewatch::publish", "{e}");
                self.next_connect = Instant::now() + BACKOFF_MAX;
                return false;
            }
        };
        if recs.is_empty() {
            let s = lock(&self.spool);
            self.shared.spool_changed(&s);
            return false;
        }
        match self.send(&recs) {
            Sent::Done => {
                let mut s = lock(&self.spool);
                if let Err(e) = s.ack(pos) {
                    log::error!(target: "sitewatch::publish", "{e}");
                }
                self.shared.spool_changed(&s);
                if s.is_empty() {
                    log::info!(target: "sitewatch::publish", "spool replayed");
                }
                true
            }
            Sent::Failed => false,
        }
    }

    /// Shutdown: everything to the spool first (so giving up loses nothing), then deliver the
    /// spool until the deadline.
    fn close(&mut self, deadline: Instant) {
        let rx = self.rx.clone();
        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        while let Ok(cmd) = rx.try_recv() {
            if let Cmd::Record(r) = cmd {
                self.shared.dequeued();
                self.push(r);
            }
        }
        drop(rx);
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.batch_since = None;
        if !batch.is_empty() {
            self.spill(&batch);
        }
        if let Err(e) = lock(&self.spool).sync() {
            log::error!(target: "sitewatch::publish", "{e}");
        }
        if self.client.is_none() && self.spool_len() > 0 && Instant::now() < deadline {
            self.connect();
        }
        while self.client.is_some() && self.spool_len() > 0 && Instant::now() < deadline {
            if !self.replay_one() {
                break;
            }
        }
    }
}
