//! The one integration-test binary: runs the real `sitewatch` binary and the library against
//! real servers started by the tests on 127.0.0.1 (HTTP, TLS, a Kafka-protocol broker,
//! PostgreSQL). One module per area; shared harness code lives in `support/`.

mod support;

mod agent;
mod alerts;
mod apache_kafka;
mod bench;
mod cli;
mod cluster;
#[cfg(feature = "fleet")]
mod fleet;
mod kafka;
mod llhttp;
mod metrics;
mod probe;
mod rules;
#[cfg(feature = "serve")]
mod serve;
mod service;
mod sink;
