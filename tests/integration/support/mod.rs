//! Test harness: servers and helpers shared by the integration tests.
#![allow(dead_code)]

pub mod broker;
pub mod http;
pub mod pg;
pub mod proxy;

pub use broker::TempDir;
