//! The scheduler: a time-ordered queue of targets, a pool of worker threads, bounded channels
//! between them, no drift, no overlap of one target with itself.
//!
//! ```text
//!  scheduler (caller's thread) ──jobs (bounded)──► worker-0..N ──results (bounded)──► output
//!        ▲                                            │
//!        └──────────── done (target index) ───────────┘
//! ```
//! The scheduler owns the queue and the "in flight" set. A worker runs one check at a time and
//! reports the target back as done, so a target is never checked twice at once; a slow target
//! holds one worker and nothing else. The output thread owns the [`Output`] and is the only
//! reader of the results channel.
//!
//! `concurrency` is a cap, not a cost. `--once` starts every worker at once (it is a burst);
//! a long run starts one and adds another only when a check is waiting and no worker has taken
//! a job for [`GROW_AFTER`], and a worker idle for [`IDLE_EXIT`] ends (the last one stays). 100 fast
//! targets every 10 s then run on one or two workers, while slow or hung targets still get up
//! to `concurrency` checks in flight within milliseconds.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, Jitter, Target};
use crate::output::Output;
use crate::probe::Prober;
use crate::result::CheckResult;
use crate::service::{Health, Heartbeat, Shutdown};

/// How long a due check waits, with no worker taking any job, before the pool grows by one.
pub const GROW_AFTER: Duration = Duration::from_millis(10);
/// How long a worker waits for a job before it ends (long runs; the last worker stays).
pub const IDLE_EXIT: Duration = Duration::from_secs(60);
/// A round is over once no check has run for this long; then, if the next one is at least this
/// far away, the heap memory the round freed goes back to the kernel
/// ([`crate::service::release_free_heap`]). With 100 targets every 10 s, strace saw 19
/// `madvise(MADV_DONTNEED)` calls of 12-20 KiB in 12 s, and the agent's heap and anonymous
/// memory measured 820-844 KiB against 964 KiB without the trim.
pub const TRIM_AFTER: Duration = Duration::from_millis(500);

/// One round or forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every target exactly once, as soon as a worker is free (`--once`).
    Once,
    /// Each target every `interval`, until shutdown.
    Forever,
}

/// What a finished run saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub checks: u64,
    pub up: u64,
    pub down: u64,
    /// Rounds skipped because the previous check of the same target was still running.
    pub skipped_overlaps: u64,
    /// Times the heap was handed back to the kernel between rounds (see [`TRIM_AFTER`]).
    pub heap_trims: u64,
    /// An output error that lost records (e.g. stdout closed), if any.
    pub output_error: Option<String>,
}

/// Receives the run's counters and the output's status line (sd_notify `STATUS=`).
pub type StatusCallback = Box<dyn Fn(&Summary, &str) + Send>;

/// A change of configuration delivered to a running scheduler (SIGHUP).
pub struct Reload {
    pub config: Arc<Config>,
    pub prober: Arc<Prober>,
}

struct Job {
    index: usize,
    target: Arc<Target>,
    prober: Arc<Prober>,
}

/// The pieces a run needs. `reloads` may be `None` when the config never changes (`--once`).
pub struct Run {
    pub mode: Mode,
    pub targets: Vec<Target>,
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
pub fn run(mut run: Run, output: Box<dyn Output>) -> Summary {
    let concurrency = run.concurrency.max(1);
    // Up to `concurrency` jobs wait in the channel, so a worker that finishes takes the next at
    // once. (With room for one, every hand-off went through the scheduler thread: `--once`
    // over 3000 targets took 0.58-0.79 s instead of 0.38-0.40 s.)
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(concurrency);
    // Room for a round's burst without making workers wait on a briefly busy output.
    let (result_tx, result_rx) = mpsc::sync_channel::<CheckResult>(concurrency * 4 + 64);
    let (done_tx, done_rx) = mpsc::channel::<(usize, bool)>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let summary = Arc::new(Mutex::new(Summary::default()));
    let status_line = Arc::new(Mutex::new(String::new()));

    let output_heartbeat = run.health.register("output");
    let output_thread = {
        let summary = summary.clone();
        let status_line = status_line.clone();
        let drain = run.drain_timeout;
        spawn("output", move || {
            output_loop(
                output,
                result_rx,
                summary,
                status_line,
                output_heartbeat,
                drain,
            )
        })
    };

    let mut pool = Pool {
        slots: (0..concurrency).map(|_| Slot::Empty).collect(),
        live: Arc::new(AtomicUsize::new(0)),
        idle_exit: (run.mode == Mode::Forever).then_some(IDLE_EXIT),
        sent: 0,
        taken: Arc::new(AtomicU64::new(0)),
        last_taken: 0,
        waiting_since: None,
        job_rx,
        result_tx,
        done_tx,
        health: run.health.clone(),
    };
    let initial = if run.mode == Mode::Once {
        concurrency
    } else {
        1
    };
    for _ in 0..initial {
        pool.grow();
    }

    let scheduler_hb = run.health.register("scheduler");
    let mut queue = Queue::new(&run.targets, run.mode, run.jitter);
    let mut targets: Vec<Arc<Target>> = run.targets.drain(..).map(Arc::new).collect();
    let mut prober = run.prober.clone();
    let mut in_flight: Vec<bool> = vec![false; targets.len()];
    let mut outstanding = 0usize;
    let mut last_status = Instant::now();
    // When the last check in flight finished, and how many jobs had been sent at the last heap
    // trim: a round's freed memory is handed back once per quiet spell (Forever mode only).
    let mut quiet_since: Option<Instant> = None;
    let mut trimmed_at_sent = 0u64;
    // Whether checks were finishing the last time every worker was busy (see DONE_NAP).
    let mut streaming = false;

    loop {
        scheduler_hb.beat();
        collect_done(&done_rx, &mut in_flight, &mut outstanding, &summary);
        if outstanding > 0 {
            quiet_since = None;
        } else if quiet_since.is_none() {
            quiet_since = Some(Instant::now());
        }
        if run.shutdown.is_triggered() {
            break;
        }
        if run.mode == Mode::Once && queue.is_empty() && outstanding == 0 {
            break;
        }
        if let Some(rx) = &run.reloads
            && let Ok(reload) = rx.try_recv()
        {
            let new_targets: Vec<Arc<Target>> = reload
                .config
                .targets
                .iter()
                .cloned()
                .map(Arc::new)
                .collect();
            let flights = queue.replace(&targets, &new_targets, &in_flight, run.jitter);
            in_flight = flights;
            targets = new_targets;
            prober = reload.prober;
            log::info!("configuration reloaded: {} targets", targets.len());
        }
        if let Some(cb) = &run.on_status
            && last_status.elapsed() >= Duration::from_secs(5)
        {
            last_status = Instant::now();
            let s = summary.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let line = status_line.lock().map(|l| l.clone()).unwrap_or_default();
            cb(&s, &line);
        }

        let now = Instant::now();
        match queue.pop_due(now) {
            Some((index, due)) => {
                let Some(target) = targets.get(index).cloned() else {
                    continue;
                };
                if in_flight[index] {
                    // The previous check is still running: skip this slot rather than queue up.
                    log::warn!(
                        "target {}: previous check still running, skipping this round",
                        target.id
                    );
                    summary
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .skipped_overlaps += 1;
                    queue.reschedule(index, due, target.interval, now);
                    continue;
                }
                let mut job = Job {
                    index,
                    target: target.clone(),
                    prober: prober.clone(),
                };
                // Wait for a free worker, but keep listening for shutdown and finished checks.
                loop {
                    match job_tx.try_send(job) {
                        Ok(()) => break,
                        Err(TrySendError::Full(j)) => {
                            job = j;
                            if run.shutdown.is_triggered() {
                                break;
                            }
                            scheduler_hb.beat();
                            pool.grow_if_waiting();
                            // A finished check means a worker is about to take the next job:
                            // wait for that rather than sleeping blind (a fixed 2 ms sleep
                            // capped throughput at `concurrency` checks per 2 ms; bench/README).
                            // While checks keep finishing, a short nap collects several at once
                            // instead of a wake-up per check; a nap that collects none (slow
                            // checks) goes back to waiting on the channel.
                            if streaming {
                                std::thread::sleep(DONE_NAP);
                                streaming = collect_done(
                                    &done_rx,
                                    &mut in_flight,
                                    &mut outstanding,
                                    &summary,
                                );
                            } else if let Ok((index, up)) =
                                done_rx.recv_timeout(Duration::from_millis(2))
                            {
                                finished(&mut in_flight, &mut outstanding, &summary, index, up);
                                streaming = true;
                            }
                        }
                        // The pool holds the receiver: cannot happen while it lives.
                        Err(TrySendError::Disconnected(_)) => break,
                    }
                }
                if run.shutdown.is_triggered() {
                    break;
                }
                pool.sent += 1;
                in_flight[index] = true;
                outstanding += 1;
                if run.mode == Mode::Forever {
                    queue.reschedule(index, due, target.interval, now);
                }
            }
            None => {
                let next_due = queue.next_due();
                if run.mode == Mode::Forever
                    && pool.sent != trimmed_at_sent
                    && quiet_since.is_some_and(|t| t.elapsed() >= TRIM_AFTER)
                    && next_due.is_none_or(|due| due.saturating_duration_since(now) >= TRIM_AFTER)
                {
                    trimmed_at_sent = pool.sent;
                    crate::service::release_free_heap();
                    summary.lock().unwrap_or_else(|e| e.into_inner()).heap_trims += 1;
                }
                // A job still waiting for a worker is looked at again within GROW_AFTER.
                let most = if pool.grow_if_waiting() {
                    GROW_AFTER
                } else {
                    Duration::from_millis(100)
                };
                let wait = next_due
                    .map(|due| due.saturating_duration_since(now))
                    .unwrap_or(most)
                    .min(most);
                // Sleep on the done channel so a finished check wakes us at once.
                match done_rx.recv_timeout(wait) {
                    Ok((index, up)) => {
                        finished(&mut in_flight, &mut outstanding, &summary, index, up)
                    }
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
                }
            }
        }
    }

    // Drain: no new jobs; in-flight checks finish (each is bounded by its own timeout); then the
    // output closes. All within drain_timeout, after which we give up on stragglers.
    drop(job_tx);
    let deadline = Instant::now() + run.drain_timeout;
    // The pool's result and done senders go first, so the output sees the end of the stream
    // once the last worker's are gone.
    let Pool {
        slots,
        result_tx,
        done_tx,
        ..
    } = pool;
    drop((result_tx, done_tx));
    for slot in slots {
        if let Slot::Running { thread, .. } = slot {
            join_until(thread, deadline);
        }
    }
    // Not `collect_done`: a job sent just as shutdown came was never counted in `outstanding`.
    while let Ok((_, up)) = done_rx.try_recv() {
        let mut s = summary.lock().unwrap_or_else(|e| e.into_inner());
        s.checks += 1;
        if up { s.up += 1 } else { s.down += 1 }
    }
    join_until(output_thread, deadline + Duration::from_secs(1));
    summary.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The worker threads: up to `slots.len()`, started on demand by [`Pool::grow`].
struct Pool {
    /// `worker-<i>` for slot `i`; a slot whose thread ended (idle) is reused.
    slots: Vec<Slot>,
    /// Workers running; an idle worker may end only while it is not the last.
    live: Arc<AtomicUsize>,
    /// `None`: workers never end on their own (`--once`).
    idle_exit: Option<Duration>,
    /// Jobs handed to the channel, and jobs taken from it by workers. A job waiting while no
    /// worker has taken one for [`GROW_AFTER`] means every worker is busy: the pool grows.
    /// (A burst of fast checks keeps `taken` moving and grows nothing.)
    sent: u64,
    taken: Arc<AtomicU64>,
    /// `taken` when last looked at, and since when it has not moved while a job waits.
    last_taken: u64,
    waiting_since: Option<Instant>,
    job_rx: Arc<Mutex<Receiver<Job>>>,
    result_tx: SyncSender<CheckResult>,
    done_tx: mpsc::Sender<(usize, bool)>,
    health: Health,
}

enum Slot {
    Empty,
    Running {
        thread: JoinHandle<()>,
        hb: Heartbeat,
    },
    /// Its worker panicked: left for the watchdog (see [`OnExit`]), never reused.
    Panicked,
}

impl Pool {
    /// Grows the pool when a job has waited [`GROW_AFTER`] for a worker. Returns whether a
    /// job is waiting.
    fn grow_if_waiting(&mut self) -> bool {
        let taken = self.taken.load(Ordering::SeqCst);
        if taken >= self.sent {
            self.waiting_since = None;
            return false;
        }
        if taken != self.last_taken {
            // A worker took a job since we last looked: the pool is keeping up.
            self.last_taken = taken;
            self.waiting_since = None;
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= GROW_AFTER && self.grow() {
            self.waiting_since = Some(Instant::now());
        }
        true
    }

    /// Starts one more worker if below the cap. Returns whether it did.
    fn grow(&mut self) -> bool {
        let mut free = None;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            match slot {
                Slot::Empty => {}
                Slot::Running { thread, .. } if thread.is_finished() => {}
                _ => continue,
            }
            // A slot keeps its heartbeat across restarts, so the registry does not grow.
            match std::mem::replace(slot, Slot::Empty) {
                Slot::Running { thread, hb } => {
                    if thread.join().is_ok() {
                        free = Some((i, Some(hb)));
                        break;
                    }
                    *slot = Slot::Panicked;
                }
                _ => {
                    free = Some((i, None));
                    break;
                }
            }
        }
        let Some((i, hb)) = free else {
            return false;
        };
        let name = format!("worker-{i}");
        let hb = hb.unwrap_or_else(|| self.health.register(&name));
        hb.beat();
        self.live.fetch_add(1, Ordering::SeqCst);
        let worker = Worker {
            jobs: self.job_rx.clone(),
            results: self.result_tx.clone(),
            done: self.done_tx.clone(),
            hb: hb.clone(),
            live: self.live.clone(),
            taken: self.taken.clone(),
            idle_exit: self.idle_exit,
        };
        let thread = spawn(&name, move || worker.run());
        log::debug!(
            "{name} started ({} running)",
            self.live.load(Ordering::SeqCst)
        );
        self.slots[i] = Slot::Running { thread, hb };
        true
    }
}

fn spawn<F: FnOnce() + Send + 'static>(name: &str, f: F) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

/// Joins `h` if it finishes before `deadline`; otherwise leaves it running (the process is
/// about to exit) and logs which thread was late.
fn join_until(h: JoinHandle<()>, deadline: Instant) {
    while !h.is_finished() {
        if Instant::now() >= deadline {
            log::warn!(
                "thread {} did not finish within the drain timeout",
                h.thread().name().unwrap_or("?")
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if h.join().is_err() {
        log::error!("a thread panicked during shutdown");
    }
}

/// Books every finished check waiting in `done`; says whether there was any.
fn collect_done(
    done: &Receiver<(usize, bool)>,
    in_flight: &mut [bool],
    outstanding: &mut usize,
    summary: &Mutex<Summary>,
) -> bool {
    let mut any = false;
    while let Ok((index, up)) = done.try_recv() {
        finished(in_flight, outstanding, summary, index, up);
        any = true;
    }
    any
}

/// Books a finished check: the target may run again, the counters move.
fn finished(
    in_flight: &mut [bool],
    outstanding: &mut usize,
    summary: &Mutex<Summary>,
    index: usize,
    up: bool,
) {
    if let Some(f) = in_flight.get_mut(index) {
        *f = false;
    }
    *outstanding -= 1;
    let mut s = summary.lock().unwrap_or_else(|e| e.into_inner());
    s.checks += 1;
    if up { s.up += 1 } else { s.down += 1 }
}

struct Worker {
    jobs: Arc<Mutex<Receiver<Job>>>,
    results: SyncSender<CheckResult>,
    done: mpsc::Sender<(usize, bool)>,
    hb: Heartbeat,
    live: Arc<AtomicUsize>,
    taken: Arc<AtomicU64>,
    idle_exit: Option<Duration>,
}

impl Worker {
    fn run(self) {
        // However this thread ends, it is no longer running (see OnExit for a panic).
        let mut gone = OnExit {
            live: self.live.clone(),
            hb: self.hb.clone(),
            counted: true,
        };
        loop {
            self.hb.idle();
            let job = {
                let rx = match self.jobs.lock() {
                    Ok(rx) => rx,
                    Err(_) => return,
                };
                match self.idle_exit {
                    None => match rx.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    },
                    Some(idle) => match rx.recv_timeout(idle) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => {
                            if self.leave() {
                                gone.counted = false;
                                return;
                            }
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    },
                }
            };
            self.taken.fetch_add(1, Ordering::SeqCst);
            // A check may take up to its timeout (times its tries); the watchdog allows for that.
            let budget = job.target.timeout * (job.target.retries + 1) + Duration::from_secs(5);
            self.hb.busy(budget);
            let record = job.prober.check(&job.target);
            let up = record.up;
            if self.results.send(record).is_err() {
                return;
            }
            if self.done.send((job.index, up)).is_err() {
                return;
            }
        }
    }

    /// Idle for `idle_exit`: ends unless this is the last worker (then keeps waiting).
    fn leave(&self) -> bool {
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > 1).then_some(n - 1)
            })
            .is_ok()
    }
}

/// Marks a worker gone when its thread ends: idle for the watchdog, and no longer counted as
/// running (unless [`Worker::leave`] already took it off the count). Not after a panic: the
/// check it held never reports done, so its target would never run again; the heartbeat stays
/// busy until the watchdog sees it stuck (and systemd restarts the agent), and [`Pool::grow`]
/// never reuses the slot.
struct OnExit {
    live: Arc<AtomicUsize>,
    hb: Heartbeat,
    counted: bool,
}

impl Drop for OnExit {
    fn drop(&mut self) {
        if self.counted {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
        if !std::thread::panicking() {
            self.hb.idle();
        }
    }
}

/// The output thread naps [`BURST_NAP`] instead of blocking after handling at least this many
/// records in a row. Under a stream of checks each blocking receive cost a futex wake-up and a
/// context switch per record (bench/README.md, third pass).
const BURST: usize = 2;
/// The output thread's nap during a burst: records wait at most this long to be written.
const BURST_NAP: Duration = Duration::from_millis(1);
/// How long the scheduler naps, while every worker is busy and checks keep finishing, before it
/// collects the finished ones. With `concurrency` jobs queued, a nap this short never leaves a
/// worker without one at the rates measured here (about 20 checks per millisecond).
const DONE_NAP: Duration = Duration::from_micros(200);

fn output_loop(
    mut output: Box<dyn Output>,
    results: Receiver<CheckResult>,
    summary: Arc<Mutex<Summary>>,
    status_line: Arc<Mutex<String>>,
    hb: Heartbeat,
    drain: Duration,
) {
    let mut failed = false;
    let record_error = |e: crate::output::OutputError, failed: &mut bool| {
        if !*failed {
            log::error!("output: {e}");
            summary
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .output_error = Some(e.to_string());
        }
        *failed = true;
    };
    let mut last_idle = Instant::now();
    // Records written since the output was last told that none is waiting.
    let mut pending = 0usize;
    loop {
        hb.beat();
        let next = match results.try_recv() {
            Ok(record) => Ok(record),
            Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            Err(TryRecvError::Empty) => {
                let burst = pending >= BURST;
                if pending > 0 {
                    pending = 0;
                    if !failed && let Err(e) = output.drained() {
                        record_error(e, &mut failed);
                    }
                }
                if burst {
                    // Records are arriving faster than one at a time: nap instead of blocking,
                    // so the workers' sends need not wake this thread for every record. The
                    // nap ends a burst's batch; a nap that brings fewer than BURST records
                    // ends the burst, and the thread blocks again.
                    std::thread::sleep(BURST_NAP);
                    continue;
                }
                results.recv_timeout(Duration::from_millis(100))
            }
        };
        match next {
            Ok(record) => {
                pending += 1;
                if !failed && let Err(e) = output.write(record) {
                    record_error(e, &mut failed);
                }
                // Under a steady stream recv never times out; still give the output its ticks.
                if last_idle.elapsed() >= Duration::from_millis(100) {
                    last_idle = Instant::now();
                    if !failed && let Err(e) = output.idle() {
                        record_error(e, &mut failed);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                last_idle = Instant::now();
                if !failed && let Err(e) = output.idle() {
                    record_error(e, &mut failed);
                }
                if let Ok(mut l) = status_line.lock() {
                    *l = output.status();
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if let Err(e) = output.close(Instant::now() + drain) {
        record_error(e, &mut failed);
    }
}

/// Due times per target: a min-heap of (due, generation, index). Entries whose generation is
/// stale (the target was rescheduled or removed by a reload) are skipped when popped.
struct Queue {
    heap: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    /// Current generation and due time per target index.
    slots: Vec<Option<(u64, Instant)>>,
    next_gen: u64,
}

impl Queue {
    fn new(targets: &[Target], mode: Mode, jitter: Jitter) -> Queue {
        let now = Instant::now();
        let mut q = Queue {
            heap: BinaryHeap::new(),
            slots: vec![None; targets.len()],
            next_gen: 0,
        };
        for (i, t) in targets.iter().enumerate() {
            let offset = match mode {
                Mode::Once => Duration::ZERO,
                Mode::Forever => random_below(jitter.max_for(t.interval)),
            };
            q.set(i, now + offset);
        }
        q
    }

    fn set(&mut self, index: usize, due: Instant) {
        self.next_gen += 1;
        let generation = self.next_gen;
        if index >= self.slots.len() {
            self.slots.resize(index + 1, None);
        }
        self.slots[index] = Some((generation, due));
        self.heap.push(Reverse((due, generation, index)));
    }

    fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    fn next_due(&mut self) -> Option<Instant> {
        while let Some(Reverse((due, generation, index))) = self.heap.peek().copied() {
            if self.slots.get(index).copied().flatten().map(|s| s.0) == Some(generation) {
                return Some(due);
            }
            self.heap.pop();
        }
        None
    }

    /// A target due at `now` and the time it was due, removed from the queue (reschedule to
    /// keep it).
    fn pop_due(&mut self, now: Instant) -> Option<(usize, Instant)> {
        let due = self.next_due()?;
        if due > now {
            return None;
        }
        let Reverse((_, _, index)) = self.heap.pop()?;
        self.slots[index] = None;
        Some((index, due))
    }

    /// Next due = previous due + interval (no drift). If we fell more than a whole interval
    /// behind (machine suspended, overload), skip the missed slots instead of bursting.
    fn reschedule(&mut self, index: usize, prev_due: Instant, interval: Duration, now: Instant) {
        let mut next = prev_due + interval;
        if next + interval <= now {
            let behind = now.duration_since(next).as_nanos() / interval.as_nanos().max(1);
            next += interval * (behind as u32);
        }
        self.set(index, next);
    }

    /// Rebuilds the queue for a new target list: a target whose id survives keeps its due time
    /// and in-flight state; new targets start within their jitter; removed ones disappear.
    fn replace(
        &mut self,
        old: &[Arc<Target>],
        new: &[Arc<Target>],
        in_flight: &[bool],
        jitter: Jitter,
    ) -> Vec<bool> {
        let old_index: HashMap<&str, usize> = old
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.as_str(), i))
            .collect();
        let old_slots = std::mem::take(&mut self.slots);
        self.heap.clear();
        self.slots = vec![None; new.len()];
        let now = Instant::now();
        let mut flights = vec![false; new.len()];
        for (i, t) in new.iter().enumerate() {
            let kept = old_index.get(t.id.as_str()).copied();
            let due = kept
                .and_then(|j| old_slots.get(j).copied().flatten().map(|s| s.1))
                .unwrap_or_else(|| now + random_below(jitter.max_for(t.interval)));
            if let Some(j) = kept {
                flights[i] = in_flight.get(j).copied().unwrap_or(false);
            }
            self.set(i, due);
        }
        flights
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

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Jitter = Jitter::Fixed(Duration::ZERO);

    fn targets(intervals_ms: &[u64]) -> Vec<Target> {
        let mut text = String::new();
        for (i, ms) in intervals_ms.iter().enumerate() {
            text.push_str(&format!(
                "[[target]]\nid = \"t{i}\"\nurl = \"http://127.0.0.1:9/\"\ninterval = \"{ms}ms\"\n"
            ));
        }
        Config::parse(&text, std::path::Path::new("t.toml"), &|_| None)
            .unwrap()
            .targets
    }

    #[test]
    fn queue_orders_by_due_time_without_drift() {
        let ts = targets(&[300, 100]);
        let mut q = Queue::new(&ts, Mode::Once, NONE);
        let start = q.next_due().unwrap();
        let (a, due_a) = q.pop_due(start + Duration::from_millis(1)).unwrap();
        let (b, due_b) = q.pop_due(start + Duration::from_millis(1)).unwrap();
        let mut both = vec![a, b];
        both.sort();
        assert_eq!(both, vec![0, 1]);
        assert!(q.is_empty(), "popped targets leave the queue");
        assert!(q.pop_due(start + Duration::from_secs(9)).is_none());
        // Reschedule both "late" by 20 ms: next due is prev due + interval, not now + interval.
        let late = start + Duration::from_millis(20);
        q.reschedule(a, due_a, ts[a].interval, late);
        q.reschedule(b, due_b, ts[b].interval, late);
        assert_eq!(
            q.next_due(),
            Some(due_a.min(due_b) + Duration::from_millis(100))
        );
        assert_eq!(
            q.pop_due(start + Duration::from_millis(100)).map(|p| p.0),
            Some(1)
        );
        assert_eq!(q.pop_due(start + Duration::from_millis(299)), None);
        assert_eq!(
            q.pop_due(start + Duration::from_millis(300)).map(|p| p.0),
            Some(0)
        );
    }

    #[test]
    fn queue_skips_whole_missed_intervals() {
        let ts = targets(&[100]);
        let mut q = Queue::new(&ts, Mode::Once, NONE);
        let start = q.next_due().unwrap();
        let (i, due) = q.pop_due(start).unwrap();
        // 1.05 s late: the next slot is the first one not yet passed by a whole interval.
        q.reschedule(i, due, ts[0].interval, start + Duration::from_millis(1050));
        let next = q.next_due().unwrap().duration_since(start).as_millis();
        assert!((1000..=1100).contains(&next), "{next}");
    }

    #[test]
    fn replace_keeps_surviving_targets() {
        let old: Vec<Arc<Target>> = targets(&[100, 200]).into_iter().map(Arc::new).collect();
        let mut q = Queue::new(
            &old.iter().map(|t| (**t).clone()).collect::<Vec<_>>(),
            Mode::Once,
            NONE,
        );
        let due_t1 = q.slots[1].unwrap().1;
        // New list: t1 survives (now at index 0), t0 is gone, t9 is new.
        let mut new_ts = targets(&[200, 100]);
        new_ts[0].id = "t1".into();
        new_ts[1].id = "t9".into();
        let new: Vec<Arc<Target>> = new_ts.into_iter().map(Arc::new).collect();
        let flights = q.replace(&old, &new, &[false, true], NONE);
        assert_eq!(flights, vec![true, false]);
        assert_eq!(q.slots[0].unwrap().1, due_t1);
        assert_eq!(q.slots.len(), 2);
    }
}
