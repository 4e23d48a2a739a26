//! Config parsing (agent.toml text → typed config) on arbitrary text: every bad input is a
//! ConfigError, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sitewatch::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // No environment: the fuzzer must not pick up the developer's SITEWATCH_* variables.
    let _ = Config::parse(text, Path::new("/nonexistent/fuzz/agent.toml"), &|_| None);
});
