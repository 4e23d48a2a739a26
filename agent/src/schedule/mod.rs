//! The scheduler: a time-ordered queue of targets, a pool of worker threads, bounded channels
//! between them, no drift, no overlap of one target with itself.
//!
//! ```text
//!  scheduler (caller's thread) ──jobs (bounded)──► worker-0..N ──results (bounded)──► output
//!        ▲                                            │
//!        └──────────── done (target id) ──────────────┘
//! ```
//! The [`Scheduler`] owns the target table, the queue and the "in flight" set, all keyed by
//! target id: a reload may reorder, shorten or rewrite the list, and a check that finishes
//! afterwards still books back to its own target (or to none, if it was removed). A worker runs
//! one check at a time and reports the target back as done, so a target is never checked twice
//! at once; a slow target holds one worker and nothing else. The output thread owns the
//! [`Output`] and is the only reader of the results channel.
//!
//! `concurrency` is a cap, not a cost. `--once` starts every worker at once (it is a burst);
//! a long run starts one and adds another only when a check is waiting and no worker has taken
//! a job for [`GROW_AFTER`], and a worker idle for [`IDLE_EXIT`] ends (the last one stays). 100 fast
//! targets every 10 s then run on one or two workers, while slow or hung targets still get up
//! to `concurrency` checks in flight within milliseconds.

mod output_thread;
mod pool;
mod queue;

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, Jitter, Target};
use crate::output::{Output, OutputError};
use crate::probe::Prober;
use crate::result::CheckResult;
use crate::service::{Health, Heartbeat, Shutdown};
use pool::{Done, Job, Pool, join_until, spawn};
use queue::{Queue, TargetId};

/// How long a due check waits, with no worker taking any job, before the pool grows by one.
pub const GROW_AFTER: Duration = Duration::from_millis(10);
/// How late checks may be handed to workers, for this long of their due times, before the
/// pool grows by one (see `Pool::grow_if_late`: a round due at one instant grows nothing, as
/// bench section 6 counts every worker's memory); well below the hundreds of ms a sustained
/// burst piled up on one worker.
pub const LATE_GROW: Duration = Duration::from_millis(10);
/// How long a worker waits for a job before it ends (long runs; the last worker stays).
pub const IDLE_EXIT: Duration = Duration::from_secs(60);
/// A round is over once no check has run for this long; then, if the next one is at least this
/// far away, the pooled connection buffers are freed ([`crate::probe::release_pooled_buffers`]:
/// ~100 KB each, one or two for every worker the round used) and the heap memory the round
/// freed goes back to the kernel ([`crate::service::release_free_heap`]). With 100 targets every 10 s, strace saw 19
/// `madvise(MADV_DONTNEED)` calls of 12-20 KiB in 12 s, and the agent's heap and anonymous
/// memory measured 820-844 KiB against 964 KiB without the trim.
pub const TRIM_AFTER: Duration = Duration::from_millis(500);
/// How long the scheduler naps, while every worker is busy and checks keep finishing, before it
/// collects the finished ones. With `concurrency` jobs queued, a nap this short never leaves a
/// worker without one at the rates measured here (about 20 checks per millisecond).
const DONE_NAP: Duration = Duration::from_micros(200);
/// How often the status callback runs (sd_notify `STATUS=`).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// One round or forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every target exactly once, as soon as a worker is free (`--once`).
    Once,
    /// Each target every `interval`, until shutdown.
    Forever,
}

/// What a finished run saw.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Targets in the current configuration (it changes on reload).
    pub targets: usize,
    pub checks: u64,
    pub up: u64,
    pub down: u64,
    /// Rounds skipped because the previous check of the same target was still running.
    pub skipped_overlaps: u64,
    /// Times the heap was handed back to the kernel between rounds (see [`TRIM_AFTER`]).
    pub heap_trims: u64,
    /// Configurations applied by reload.
    pub reloads: u64,
    /// An output error that lost records (e.g. stdout closed), if any.
    pub output_error: Option<Arc<OutputError>>,
}

/// Receives the run's counters and the output's status line (sd_notify `STATUS=`).
pub type StatusCallback = Box<dyn Fn(&Summary, &str) + Send>;

/// A change of configuration delivered to a running scheduler (SIGHUP).
pub struct Reload {
    pub config: Arc<Config>,
    pub prober: Arc<Prober>,
}

/// The pieces a run needs. `reloads` may be `None` when the config never changes (`--once`).
pub struct Run {
    pub mode: Mode,
    pub targets: Vec<Arc<Target>>,
    pub prober: Arc<Prober>,
    pub concurrency: usize,
    /// Spread of each target's first round (Forever mode only).
    pub jitter: Jitter,
    pub drain_timeout: Duration,
    pub shutdown: Shutdown,
    pub health: Health,
    pub reloads: Option<Receiver<Reload>>,
    /// Called with the output's status line every few seconds (sd_notify STATUS=).
    pub on_status: Option<StatusCallback>,
}

/// Runs the scheduler on the calling thread until the mode's end (or shutdown), then drains the
/// workers and closes the output within `drain_timeout`.
pub fn run(run: Run, output: Box<dyn Output>) -> Summary {
    let drain_timeout = run.drain_timeout;
    let (mut scheduler, output_thread) = Scheduler::start(run, output);
    scheduler.run_until_done();
    scheduler.drain(output_thread, drain_timeout)
}

/// Shortcut used by `--once` and tests: one round of `config`'s targets into `output`.
pub fn run_once(config: &Config, prober: Arc<Prober>, output: Box<dyn Output>) -> Summary {
    run(
        Run {
            mode: Mode::Once,
            targets: config.targets.clone(),
            prober,
            concurrency: config.agent.concurrency.min(config.targets.len().max(1)),
            jitter: Jitter::Fixed(Duration::ZERO),
            drain_timeout: config.agent.drain_timeout,
            shutdown: Shutdown::new(),
            health: Health::new(),
            reloads: None,
            on_status: None,
        },
        output,
    )
}

/// The scheduler thread's state. Each method owns one duty: dispatching due targets
/// ([`Scheduler::dispatch`]), booking finished checks ([`Scheduler::collect_done`]), applying a
/// reload ([`Scheduler::apply_reload`]), the heap trim between rounds
/// ([`Scheduler::trim_heap_if_quiet`]), the status line ([`Scheduler::report_status`]) and the
/// drain at the end ([`Scheduler::drain`]).
struct Scheduler {
    mode: Mode,
    jitter: Jitter,
    shutdown: Shutdown,
    reloads: Option<Receiver<Reload>>,
    on_status: Option<StatusCallback>,
    hb: Heartbeat,
    /// The current target table.
    targets: HashMap<TargetId, Arc<Target>>,
    prober: Arc<Prober>,
    queue: Queue,
    /// Targets with a check running. Kept apart from the table, so a target that a reload
    /// removes and a later one brings back while its check runs still never overlaps itself.
    in_flight: HashSet<TargetId>,
    pool: Pool,
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    summary: Arc<Mutex<Summary>>,
    status_line: Arc<Mutex<String>>,
    last_status: Instant,
    /// When the last check in flight finished, and how many jobs had been sent at the last
    /// heap trim: a round's freed memory is handed back once per quiet spell.
    quiet_since: Option<Instant>,
    trimmed_at_sent: u64,
    /// Whether checks were finishing the last time every worker was busy (see [`DONE_NAP`]).
    streaming: bool,
}

impl Scheduler {
    /// Starts the output thread and the first workers, and queues every target: at once for
    /// `--once` (in config order), within its jitter for a long run.
    fn start(run: Run, output: Box<dyn Output>) -> (Scheduler, JoinHandle<()>) {
        let concurrency = run.concurrency.max(1);
        // Room for a round's burst without making workers wait on a briefly busy output.
        let (result_tx, result_rx) = mpsc::sync_channel::<CheckResult>(concurrency * 4 + 64);
        let summary = Arc::new(Mutex::new(Summary::default()));
        let status_line = Arc::new(Mutex::new(String::new()));
        let output_thread = {
            let (summary, status_line) = (summary.clone(), status_line.clone());
            let hb = run.health.register("output");
            let drain = run.drain_timeout;
            spawn("output", move || {
                output_thread::output_loop(output, result_rx, summary, status_line, hb, drain)
            })
        };
        let (initial, idle_exit) = match run.mode {
            Mode::Once => (concurrency, None),
            Mode::Forever => (1, Some(IDLE_EXIT)),
        };
        let (pool, channels) = Pool::start(
            concurrency,
            initial,
            idle_exit,
            result_tx,
            run.health.clone(),
        );
        let mut scheduler = Scheduler {
            mode: run.mode,
            jitter: run.jitter,
            shutdown: run.shutdown,
            reloads: run.reloads,
            on_status: run.on_status,
            hb: run.health.register("scheduler"),
            targets: HashMap::new(),
            prober: run.prober,
            queue: Queue::new(),
            in_flight: HashSet::new(),
            pool,
            jobs: channels.jobs,
            done: channels.done,
            summary,
            status_line,
            last_status: Instant::now(),
            quiet_since: None,
            trimmed_at_sent: 0,
            streaming: false,
        };
        scheduler.set_targets(run.targets);
        // The config's parsing is over: what it freed goes back before the first round (see
        // apply_reload).
        crate::service::release_free_heap();
        (scheduler, output_thread)
    }

    /// Makes `new` the target table. A target whose id survives keeps its due time (and its
    /// in-flight mark, which is by id anyway); a new one starts within its jitter (at once for
    /// `--once`); a removed one leaves the queue, and its check in flight, if any, finishes
    /// and books to nothing.
    fn set_targets(&mut self, new: Vec<Arc<Target>>) {
        let now = Instant::now();
        let mut table = HashMap::with_capacity(new.len());
        for target in new {
            let id: TargetId = match self.targets.get_key_value(target.id.as_str()) {
                Some((id, _)) => id.clone(),
                None => Arc::from(target.id.as_str()),
            };
            if self.queue.due(&id).is_none() {
                let offset = match self.mode {
                    Mode::Once => Duration::ZERO,
                    Mode::Forever => random_below(self.jitter.max_for(target.interval)),
                };
                self.queue.set(&id, now + offset);
            }
            table.insert(id, target);
        }
        for id in self.targets.keys() {
            if !table.contains_key(id) {
                self.queue.remove(id);
            }
        }
        self.targets = table;
        self.lock_summary().targets = self.targets.len();
    }

    fn lock_summary(&self) -> std::sync::MutexGuard<'_, Summary> {
        self.summary.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The main loop: until shutdown, or until `--once` has run every target.
    fn run_until_done(&mut self) {
        loop {
            self.hb.beat();
            self.collect_done();
            if !self.in_flight.is_empty() {
                self.quiet_since = None;
            } else if self.quiet_since.is_none() {
                self.quiet_since = Some(Instant::now());
            }
            if self.shutdown.is_triggered() {
                return;
            }
            if self.mode == Mode::Once && self.queue.is_empty() && self.in_flight.is_empty() {
                return;
            }
            self.apply_reload();
            self.report_status();
            let now = Instant::now();
            match self.queue.pop_due(now) {
                Some((id, due)) => {
                    if !self.dispatch(id, due, now) {
                        return;
                    }
                }
                None => self.wait_for_work(now),
            }
        }
    }

    /// Hands the due target `id` to a worker, or skips this round of it when its previous
    /// check still runs; in a long run, queues its next round. Returns false when shutdown
    /// came while waiting for a worker.
    fn dispatch(&mut self, id: TargetId, due: Instant, now: Instant) -> bool {
        let Some(target) = self.targets.get(&id).cloned() else {
            // Not in the table: removed by a reload after its entry was queued.
            return true;
        };
        if self.in_flight.contains(&id) {
            // The previous check is still running: skip this slot rather than queue up.
            log::warn!(
                "target {}: previous check still running, skipping this round",
                target.id
            );
            self.lock_summary().skipped_overlaps += 1;
            self.queue.reschedule(&id, due, target.interval, now);
            return true;
        }
        let job = Job {
            id: id.clone(),
            target: target.clone(),
            prober: self.prober.clone(),
        };
        self.pool.grow_if_late(due, now);
        if !self.hand_to_worker(job) {
            return false;
        }
        self.pool.sent_one();
        self.in_flight.insert(id.clone());
        if self.mode == Mode::Forever {
            self.queue.reschedule(&id, due, target.interval, now);
        }
        true
    }

    /// Puts `job` on the jobs channel, waiting for room while listening for shutdown and
    /// finished checks. Returns false (job not sent) on shutdown.
    fn hand_to_worker(&mut self, mut job: Job) -> bool {
        loop {
            match self.jobs.try_send(job) {
                Ok(()) => return true,
                Err(TrySendError::Full(j)) => job = j,
                // The pool holds the receiver: cannot happen while it lives.
                Err(TrySendError::Disconnected(_)) => return false,
            }
            if self.shutdown.is_triggered() {
                return false;
            }
            self.hb.beat();
            self.pool.grow_if_waiting();
            // A finished check means a worker is about to take the next job: wait for that
            // rather than sleeping blind (a fixed 2 ms sleep capped throughput at
            // `concurrency` checks per 2 ms; bench/README). While checks keep finishing, a
            // short nap collects several at once instead of a wake-up per check; a nap that
            // collects none (slow checks) goes back to waiting on the channel.
            if self.streaming {
                std::thread::sleep(DONE_NAP);
                self.streaming = self.collect_done();
            } else if let Ok((id, up)) = self.done.recv_timeout(Duration::from_millis(2)) {
                self.finished(&id, up);
                self.streaming = true;
            }
        }
    }

    /// Nothing is due: trims the heap if a round just ended, then sleeps on the done channel
    /// until the next due time (a finished check wakes it at once).
    fn wait_for_work(&mut self, now: Instant) {
        let next_due = self.queue.next_due();
        self.trim_heap_if_quiet(now, next_due);
        // A job still waiting for a worker is looked at again within GROW_AFTER.
        let most = if self.pool.grow_if_waiting() {
            GROW_AFTER
        } else {
            Duration::from_millis(100)
        };
        let wait = next_due
            .map(|due| due.saturating_duration_since(now))
            .unwrap_or(most)
            .min(most);
        match self.done.recv_timeout(wait) {
            Ok((id, up)) => self.finished(&id, up),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
        }
    }

    /// Once a round is over (no check for [`TRIM_AFTER`], the next one at least as far away),
    /// hands the heap memory the round freed back to the kernel, once per quiet spell.
    fn trim_heap_if_quiet(&mut self, now: Instant, next_due: Option<Instant>) {
        if self.mode == Mode::Forever
            && self.pool.sent() != self.trimmed_at_sent
            && self.quiet_since.is_some_and(|t| t.elapsed() >= TRIM_AFTER)
            && next_due.is_none_or(|due| due.saturating_duration_since(now) >= TRIM_AFTER)
        {
            self.trimmed_at_sent = self.pool.sent();
            crate::probe::release_pooled_buffers();
            crate::service::release_free_heap();
            self.lock_summary().heap_trims += 1;
        }
    }

    /// Books every finished check waiting on the done channel; says whether there was any.
    fn collect_done(&mut self) -> bool {
        let mut any = false;
        while let Ok((id, up)) = self.done.try_recv() {
            self.finished(&id, up);
            any = true;
        }
        any
    }

    /// Books a finished check: the target may run again, the counters move.
    fn finished(&mut self, id: &str, up: bool) {
        self.in_flight.remove(id);
        book(&mut self.lock_summary(), up);
    }

    /// Applies a configuration delivered by reload, if one waits.
    fn apply_reload(&mut self) {
        let Some(Reload { config, prober }) =
            self.reloads.as_ref().and_then(|rx| rx.try_recv().ok())
        else {
            return;
        };
        self.set_targets(config.targets.clone());
        self.prober = prober;
        drop(config);
        self.lock_summary().reloads += 1;
        log::info!("configuration reloaded: {} targets", self.targets.len());
        // What the old table and the reload's parsing freed goes back now: an agent whose
        // checks never pause (100,000 targets a minute) has no quiet spell to trim in.
        crate::service::release_free_heap();
    }

    /// Calls the status callback every [`STATUS_EVERY`].
    fn report_status(&mut self) {
        let Some(cb) = &self.on_status else { return };
        if self.last_status.elapsed() < STATUS_EVERY {
            return;
        }
        self.last_status = Instant::now();
        let summary = self.lock_summary().clone();
        let line = self
            .status_line
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        cb(&summary, &line);
    }

    /// No new jobs; in-flight checks finish (each is bounded by its own timeout); then the
    /// output closes. All within `drain_timeout`, after which stragglers are left behind.
    fn drain(self, output_thread: JoinHandle<()>, drain_timeout: Duration) -> Summary {
        let Scheduler {
            jobs,
            pool,
            done,
            summary,
            ..
        } = self;
        drop(jobs);
        let deadline = Instant::now() + drain_timeout;
        pool.stop(deadline);
        let mut s = summary.lock().unwrap_or_else(|e| e.into_inner());
        while let Ok((_, up)) = done.try_recv() {
            book(&mut s, up);
        }
        drop(s);
        join_until(output_thread, deadline + Duration::from_secs(1));
        summary.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Counts one finished check.
fn book(summary: &mut Summary, up: bool) {
    summary.checks += 1;
    if up {
        summary.up += 1
    } else {
        summary.down += 1
    }
}

/// A uniformly spread duration in `[0, max)`; jitter needs spread, not secrecy.
fn random_below(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let id = crate::util::new_check_id();
    let bits = u64::from_str_radix(&id.replace('-', "")[16..32], 16).unwrap_or(0);
    Duration::from_nanos(bits % (max.as_nanos() as u64).max(1))
}
