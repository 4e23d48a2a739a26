//! Test harness: servers and helpers shared by the integration tests.
#![allow(dead_code)]

pub mod apache_kafka;
pub mod broker;
pub mod http;
pub mod pg;
pub mod proxy;

pub use broker::TempDir;

/// The `sitewatch` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sitewatch");

/// A command running the `sitewatch` binary, with the developer's `SITEWATCH_*` and
/// `RUST_LOG` variables removed, so they cannot change what a test sees: the binary logs at its
/// own default level (warn for one-shot commands, info for daemons) unless the test sets one.
pub fn sitewatch() -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("SITEWATCH_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// A port on 127.0.0.1 where nothing listens right now (bound to port 0, read, released): for
/// a server to start on, or for a connection that must be refused.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let held = poll(timeout, || cond().then_some(()));
    assert!(held.is_some(), "timed out waiting for {what}");
}

/// Polls `f` every 50 ms until it gives a value, for at most `timeout`; `None` when it never
/// did (for callers that must clean up, e.g. kill a process, before they fail).
pub fn poll<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
