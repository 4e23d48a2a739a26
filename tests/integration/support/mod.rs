//! Test harness: servers and helpers shared by the integration tests.
#![allow(dead_code)]

pub mod apache_kafka;
pub mod broker;
pub mod certs;
pub mod http;
pub mod pg;
pub mod proxy;

pub use broker::TempDir;

/// A broker a test can run against, whichever implementation: tansu ([`broker::Broker`]) or
/// Apache Kafka ([`apache_kafka::ApacheKafka`]). The core Kafka tests take one of these and run
/// once per implementation (see [`on_both_brokers`]), so a difference between brokers shows
/// up as one test failing under one name.
pub trait TestBroker {
    /// Which broker and version, for messages: "tansu 0.6.0", "Apache Kafka 4.1.1".
    fn name(&self) -> String;
    /// `127.0.0.1:PORT` of its plaintext listener, for `brokers = [...]`.
    fn addr(&self) -> String;
    /// Kills it (SIGKILL): it goes away without a word, as in a crash.
    fn kill(&mut self);
    /// Starts it again on the same port(s) with the same storage, and waits until it serves.
    fn restart(&mut self);
    /// Whether topics and records survive `kill` + `restart` (tansu's memory storage does
    /// not keep them; Apache Kafka's log does).
    fn keeps_data(&self) -> bool;
    /// A `[kafka]` config for this broker and `topic` (defaults like the config module's).
    fn config(&self, topic: &str) -> sitewatch::config::KafkaConfig {
        broker::kafka_config(vec![self.addr()], topic)
    }
}

/// `on_both_brokers!(NAME, ...)`: for each function `fn NAME(broker: Box<dyn TestBroker>)` in
/// the calling module, the tests `tansu::NAME` (tansu 0.6.0) and `apache::NAME` (one Apache
/// Kafka 4.x node, plaintext), each with a fresh broker.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        mod tansu {
            $(#[test]
            fn $name() {
                super::$name(Box::new(crate::support::broker::Broker::start()));
            })*
        }
        mod apache {
            $(#[test]
            fn $name() {
                super::$name(Box::new(crate::support::apache_kafka::ApacheKafka::start(
                    Default::default(),
                )));
            })*
        }
    };
}
pub(crate) use on_both_brokers;

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
