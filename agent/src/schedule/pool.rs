//! The worker pool: up to `concurrency` `worker-<i>` threads, started on demand, each running
//! one check at a time from the jobs channel and reporting it on the results and done channels.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::queue::TargetId;
use super::{GROW_AFTER, LATE_GROW};
use crate::config::Target;
use crate::probe::Prober;
use crate::result::CheckResult;
use crate::service::{Health, Heartbeat};

/// One check to run: the target as it was when the check became due, and the prober of the
/// configuration it was due under.
pub(crate) struct Job {
    pub(crate) id: TargetId,
    pub(crate) target: Arc<Target>,
    pub(crate) prober: Arc<Prober>,
}

/// A finished check, reported back to the scheduler by target id.
pub(crate) type Done = (TargetId, bool);

/// The worker threads: up to `slots.len()`, started on demand by [`Pool::grow`].
pub(crate) struct Pool {
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
    /// When the pool last grew because checks started late, and the due time of the first
    /// of the checks late since ([`Pool::grow_if_late`]).
    grew_late_at: Option<Instant>,
    late_from: Option<Instant>,
    job_rx: Arc<Mutex<Receiver<Job>>>,
    result_tx: SyncSender<CheckResult>,
    done_tx: mpsc::Sender<Done>,
    health: Health,
}

/// The channels a pool is driven through, held by the scheduler.
pub(crate) struct PoolChannels {
    /// Up to `concurrency` jobs wait here, so a worker that finishes takes the next at once.
    /// (With room for one, every hand-off went through the scheduler thread: `--once` over
    /// 3000 targets took 0.58-0.79 s instead of 0.38-0.40 s.)
    pub(crate) jobs: SyncSender<Job>,
    pub(crate) done: Receiver<Done>,
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
    /// A pool of at most `cap` workers with `initial` of them started; workers end after
    /// `idle_exit` without a job (never, with `None`). Records go to `results`.
    pub(crate) fn start(
        cap: usize,
        initial: usize,
        idle_exit: Option<Duration>,
        results: SyncSender<CheckResult>,
        health: Health,
    ) -> (Pool, PoolChannels) {
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(cap);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let mut pool = Pool {
            slots: (0..cap).map(|_| Slot::Empty).collect(),
            live: Arc::new(AtomicUsize::new(0)),
            idle_exit,
            sent: 0,
            taken: Arc::new(AtomicU64::new(0)),
            last_taken: 0,
            waiting_since: None,
            grew_late_at: None,
            late_from: None,
            job_rx: Arc::new(Mutex::new(job_rx)),
            result_tx: results,
            done_tx,
            health,
        };
        for _ in 0..initial {
            pool.grow();
        }
        let channels = PoolChannels {
            jobs: job_tx,
            done: done_rx,
        };
        (pool, channels)
    }

    /// Counts a job handed to the jobs channel.
    pub(crate) fn sent_one(&mut self) {
        self.sent += 1;
    }

    /// Jobs handed to the jobs channel so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent
    }

    /// Lets every worker finish the check in hand and end (the jobs sender must be gone),
    /// waiting until `deadline` at most. The pool's own result and done senders go first, so
    /// the output sees the end of the stream once the last worker's are gone.
    pub(crate) fn stop(self, deadline: Instant) {
        let Pool {
            slots,
            result_tx,
            done_tx,
            ..
        } = self;
        drop((result_tx, done_tx));
        for slot in slots {
            if let Slot::Running { thread, .. } = slot {
                join_until(thread, deadline);
            }
        }
    }

    /// Grows the pool when a job has waited [`GROW_AFTER`] for a worker. Returns whether a
    /// job is waiting.
    pub(crate) fn grow_if_waiting(&mut self) -> bool {
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

    /// Grows the pool by one when checks come due faster than the workers run them, although
    /// each worker keeps taking jobs (which [`Pool::grow_if_waiting`] cannot see): the check
    /// due at `due`, handed out at `now`, is [`LATE_GROW`] or more late, and so was every check
    /// since one due at least [`LATE_GROW`] before it (a rate, not one instant: a round of
    /// checks due at the same moment, as with jitter 0, grows nothing, and bench section 6
    /// counts every worker's memory), and it came due after the pool last grew (checks
    /// already due then say nothing about the new worker). A burst of 100,000 targets every
    /// 60 s spread over 6 s (the default 10% jitter), ~16,700 checks a second, was served by
    /// one worker 280 ms late at the median (bench/slip-ab).
    pub(crate) fn grow_if_late(&mut self, due: Instant, now: Instant) {
        if now.saturating_duration_since(due) < LATE_GROW {
            self.late_from = None;
            return;
        }
        let from = *self.late_from.get_or_insert(due);
        if due.saturating_duration_since(from) >= LATE_GROW
            && self.grew_late_at.is_none_or(|at| due > at)
        {
            self.grew_late_at = Some(now);
            self.grow();
        }
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

pub(crate) fn spawn<F: FnOnce() + Send + 'static>(name: &str, f: F) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

/// Joins `h` if it finishes before `deadline`; otherwise leaves it running (the process is
/// about to exit) and logs which thread was late.
pub(crate) fn join_until(h: JoinHandle<()>, deadline: Instant) {
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

struct Worker {
    jobs: Arc<Mutex<Receiver<Job>>>,
    results: SyncSender<CheckResult>,
    done: mpsc::Sender<Done>,
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
            if self.done.send((job.id, up)).is_err() {
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
