//! Process-level concerns: signals (SIGINT/SIGTERM/SIGHUP), sd_notify (READY, WATCHDOG, STATUS,
//! STOPPING), thread health for the watchdog, logging setup, and the [`Shutdown`] flag shared
//! by every thread.
//!
//! Architecture Invariant: `WATCHDOG=1` is sent only while every registered thread shows
//! progress (a heartbeat within its budget), so a stuck scheduler, worker, publisher or sink
//! makes systemd restart us instead of leaving a silent agent behind.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set once when the process should stop; every long-running loop polls it. Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself, for `signal_hook::flag::register`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Sleeps up to `d`, waking early (within ~50 ms) when shutdown is triggered. Returns true
    /// when shutdown was triggered.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.is_triggered() {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

/// Milliseconds on a monotonic clock local to this process.
fn mono_ms() -> i64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

/// Registry of thread heartbeats. Clones share the registry.
#[derive(Clone, Default)]
pub struct Health {
    beats: Arc<Mutex<Vec<Heartbeat>>>,
}

/// One thread's liveness. A thread either beats regularly, or declares itself idle (blocked
/// waiting for work: always healthy), or busy with a budget (healthy until the budget runs out).
#[derive(Clone)]
pub struct Heartbeat {
    name: Arc<str>,
    /// Deadline in `mono_ms`; `i64::MAX` while idle.
    deadline: Arc<AtomicI64>,
    budget_ms: i64,
}

impl Heartbeat {
    /// Progress now; healthy for the default budget (30 s) from now.
    pub fn beat(&self) {
        self.deadline
            .store(mono_ms() + self.budget_ms, Ordering::Relaxed);
    }

    /// Blocked waiting for work: healthy however long it waits.
    pub fn idle(&self) {
        self.deadline.store(i64::MAX, Ordering::Relaxed);
    }

    /// Starting something that may take up to `budget`.
    pub fn busy(&self, budget: Duration) {
        self.deadline
            .store(mono_ms() + budget.as_millis() as i64, Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// Registers a thread; it starts healthy.
    pub fn register(&self, name: &str) -> Heartbeat {
        let hb = Heartbeat {
            name: Arc::from(name),
            deadline: Arc::new(AtomicI64::new(i64::MAX)),
            budget_ms: 30_000,
        };
        hb.beat();
        if let Ok(mut v) = self.beats.lock() {
            v.push(hb.clone());
        }
        hb
    }

    /// Names of every registered thread, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.beats
            .lock()
            .map(|v| v.iter().map(|h| h.name.to_string()).collect())
            .unwrap_or_default()
    }

    /// Names of threads past their deadline; empty when all are healthy.
    pub fn stuck(&self) -> Vec<String> {
        let now = mono_ms();
        self.beats
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|h| h.deadline.load(Ordering::Relaxed) < now)
                    .map(|h| h.name.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Thin wrapper over `sd_notify`: every call is a no-op without `NOTIFY_SOCKET`.
pub mod notify {
    use sd_notify::NotifyState;

    fn send(states: &[NotifyState<'_>]) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            log::debug!("sd_notify: {e}");
        }
    }

    pub fn ready() {
        send(&[NotifyState::Ready]);
    }

    pub fn stopping() {
        send(&[NotifyState::Stopping]);
    }

    pub fn reloading() {
        send(&[NotifyState::Reloading]);
    }

    pub fn status(line: &str) {
        send(&[NotifyState::Status(line)]);
    }

    pub fn watchdog() {
        send(&[NotifyState::Watchdog]);
    }

    /// Half the systemd watchdog interval, when the unit has `WatchdogSec=`.
    pub fn watchdog_period() -> Option<std::time::Duration> {
        let mut usec = 0u64;
        if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
            Some(std::time::Duration::from_micros(usec / 2))
        } else {
            None
        }
    }
}

/// Starts the watchdog thread when systemd asked for one: it pings `WATCHDOG=1` every half
/// period while `health` reports no stuck thread, and logs (once per episode) which thread is
/// stuck otherwise, letting systemd's timer run out.
pub fn start_watchdog(health: Health, shutdown: Shutdown) {
    let Some(period) = notify::watchdog_period() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut warned = false;
            while !shutdown.sleep(period) {
                let stuck = health.stuck();
                if stuck.is_empty() {
                    notify::watchdog();
                    warned = false;
                } else if !warned {
                    log::error!(
                        "watchdog: no progress from {}; not pinging systemd",
                        stuck.join(", ")
                    );
                    warned = true;
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the watchdog thread: {e}");
    }
}

/// Signals the process reacts to.
pub struct Signals {
    pub shutdown: Shutdown,
    /// Set by SIGHUP; the reload loop clears it.
    pub reload: Arc<AtomicBool>,
}

/// Installs SIGINT/SIGTERM (→ shutdown; a second one exits at once) and SIGHUP (→ reload flag).
pub fn install_signals() -> std::io::Result<Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let shutdown = Shutdown::new();
    let reload = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // A second signal while draining exits immediately with 130/143-style urgency.
        signal_hook::flag::register_conditional_shutdown(sig, 1, shutdown.flag())?;
        signal_hook::flag::register(sig, shutdown.flag())?;
    }
    signal_hook::flag::register(SIGHUP, reload.clone())?;
    Ok(Signals { shutdown, reload })
}

/// Caps glibc's malloc arenas at one per core (at least two), unless the environment sets them
/// (`MALLOC_ARENA_MAX`, or `GLIBC_TUNABLES` with `arena_max`). Call first thing in `main`,
/// before any thread starts.
///
/// glibc gives threads that allocate concurrently their own arenas, up to 8 per core, and each
/// arena keeps memory freed by its threads for reuse. With 16 probe workers that was about
/// 2.2 MB of an agent's resident memory (100 targets every 10 s: 14,900 KiB by default,
/// 12,732 KiB with `MALLOC_ARENA_MAX=2`). Returns the cap when it was set.
pub fn limit_malloc_arenas() -> Option<usize> {
    let env = |name: &str| std::env::var_os(name);
    if env("MALLOC_ARENA_MAX").is_some()
        || env("GLIBC_TUNABLES").is_some_and(|t| t.to_string_lossy().contains("arena_max"))
    {
        return None;
    }
    let cap = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    set_arena_max(cap).then_some(cap)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(cap: usize) -> bool {
    // glibc's <malloc.h>: `int mallopt(int param, int value)`, M_ARENA_MAX = -8.
    unsafe extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_ARENA_MAX: std::ffi::c_int = -8;
    let cap = std::ffi::c_int::try_from(cap).unwrap_or(std::ffi::c_int::MAX);
    // SAFETY: mallopt only sets a malloc parameter; it is safe to call at any time.
    unsafe { mallopt(M_ARENA_MAX, cap) == 1 }
}

/// Other C libraries (musl) have no per-thread arenas to cap.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_cap: usize) -> bool {
    false
}

/// Hands the heap memory that is free right now back to the kernel (glibc `malloc_trim`), and
/// says whether any was. The scheduler calls it once a round is over and the agent has seconds
/// to wait: memory a round freed (bodies, ureq agents, encoded batches) otherwise stays
/// resident until the next round reuses it. A no-op elsewhere than glibc.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>: `int malloc_trim(size_t pad)`. It returns free memory at the top
        // of the heap and, since glibc 2.8, free whole pages inside every arena.
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes each arena's lock; it is safe to call from any thread.
        unsafe { malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Log targets whose records can carry secrets, with the most verbose level they may log at,
/// whatever `RUST_LOG` says. ureq-proto traces every request it writes and every response it
/// reads as a hex and ASCII dump: the `Authorization`, `Cookie` and API-key headers of our
/// targets. (ureq's own debug lines redact headers and paths themselves.)
const CAPPED_TARGETS: &[(&str, log::LevelFilter)] = &[("ureq_proto", log::LevelFilter::Info)];

/// Whether a record of `target` at `level` may be written, given [`CAPPED_TARGETS`].
fn allowed(target: &str, level: log::Level) -> bool {
    CAPPED_TARGETS.iter().all(|(capped, max)| {
        let inside = target
            .strip_prefix(capped)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"));
        !inside || level <= *max
    })
}

/// env_logger behind the [`CAPPED_TARGETS`] check: a directive in `RUST_LOG` (even
/// `ureq_proto::client=trace`) cannot bring their records back.
struct CappedLogger(env_logger::Logger);

impl log::Log for CappedLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        allowed(metadata.target(), metadata.level()) && self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if allowed(record.target(), record.level()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Sets up `env_logger` on stderr. Under systemd (`JOURNAL_STREAM` set) lines carry a syslog
/// priority prefix (`<3>`) instead of a timestamp, which journald turns into the entry's level.
/// Records that can carry secrets are capped ([`CAPPED_TARGETS`]).
pub fn init_logging(default_level: &str) {
    use std::io::Write;
    let env = env_logger::Env::default().default_filter_or(default_level);
    let mut b = env_logger::Builder::from_env(env);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.format(|f, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(f, "<{prio}>{}: {}", record.target(), record.args())
        });
    }
    let logger = b.build();
    let max = logger.filter();
    // Already set (a second call, or a test harness): keep the first, as `try_init` did.
    if log::set_boxed_logger(Box::new(CappedLogger(logger))).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_bearing_targets_are_capped_at_info() {
        use log::Level::{Debug, Info, Trace, Warn};
        assert!(!allowed("ureq_proto", Trace));
        assert!(!allowed("ureq_proto::util", Debug));
        assert!(allowed("ureq_proto::util", Info));
        assert!(allowed("ureq_proto", Warn));
        assert!(allowed("ureq", Trace));
        assert!(allowed("ureq_protocol_lookalike", Trace));
        assert!(allowed("sitewatch::probe", Trace));
    }

    #[test]
    fn freed_heap_memory_goes_back_to_the_kernel() {
        // 4 MiB in small blocks (below the mmap threshold, so from the heap), then freed.
        let blocks: Vec<Vec<u8>> = (0..1024).map(|i| vec![i as u8; 4096]).collect();
        assert_eq!(blocks.iter().map(Vec::len).sum::<usize>(), 4 << 20);
        drop(blocks);
        let released = release_free_heap();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(released, "malloc_trim released the freed pages");
        } else {
            assert!(!released);
        }
    }

    #[test]
    fn malloc_arenas_are_capped_unless_the_environment_says_otherwise() {
        let from_env = std::env::var_os("MALLOC_ARENA_MAX").is_some()
            || std::env::var_os("GLIBC_TUNABLES")
                .is_some_and(|t| t.to_string_lossy().contains("arena_max"));
        let cap = limit_malloc_arenas();
        if from_env {
            assert_eq!(cap, None, "the environment's setting wins");
        } else if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let cores = std::thread::available_parallelism().unwrap().get();
            assert_eq!(cap, Some(cores.max(2)), "mallopt accepted the cap");
        } else {
            assert_eq!(cap, None);
        }
    }

    #[test]
    fn health_reports_only_threads_past_their_budget() {
        let h = Health::new();
        let a = h.register("a");
        let b = h.register("b");
        a.busy(Duration::from_millis(0));
        b.idle();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(h.stuck(), vec!["a".to_string()]);
        a.beat();
        assert!(h.stuck().is_empty());
    }

    #[test]
    fn shutdown_sleep_wakes_early() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.trigger();
        });
        let start = Instant::now();
        assert!(s.sleep(Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }
}
