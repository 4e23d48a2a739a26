//! sitewatch: a synchronous website-availability agent.
//!
//! The library holds all the logic; `main.rs` only parses arguments and maps errors to exit
//! codes. See `ARCHITECTURE.md` at the top of the repository for the bird's-eye view, the code
//! map and the invariants. In one line: [`config`] is read once, [`schedule`] decides when each
//! target is due, [`probe`] makes one check into a [`result::CheckResult`], [`rules`] judges the
//! body, [`output`] / [`publish`] move records out (stdout, Kafka with a disk spool), and
//! [`sink`] persists them to PostgreSQL exactly once. [`service`] owns signals, sd_notify and
//! shutdown.

pub mod alerts;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "fleet")]
pub mod fleet;
#[cfg(any(feature = "metrics", feature = "serve"))]
pub mod httpd;
pub mod kafka;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod output;
pub mod probe;
pub mod publish;
pub mod result;
pub mod rules;
pub mod schedule;
#[cfg(feature = "serve")]
pub mod serve;
pub mod service;
pub mod sink;
pub mod util;
