//! The sink's record decoder (JSON value of a Kafka message → validated `checks` row) on
//! arbitrary message values: anything that does not decode must be an Err (a dead letter).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sitewatch::sink::Message;
use sitewatch::sink::writer::decode_for_fuzzing;

/// 2026-06-01T00:00:00Z: a fixed "now" so a run is reproducible (the seeds are dated near it).
const NOW_MS: i64 = 1_780_272_000_000;
const RETENTION: Duration = Duration::from_secs(90 * 86_400);

fuzz_target!(|data: &[u8]| {
    let message = Message {
        offset: 0,
        timestamp_ms: NOW_MS,
        key: None,
        value: Some(data.to_vec()),
    };
    let _ = decode_for_fuzzing(&message, NOW_MS, RETENTION);
});
