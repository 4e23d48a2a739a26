//! Test harness: servers and helpers shared by the integration tests.
#![allow(dead_code)]

pub mod apache_kafka;
pub mod broker;
pub mod http;
pub mod pg;
pub mod proxy;

pub use broker::TempDir;

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
