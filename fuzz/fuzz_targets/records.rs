//! The RecordBatch v2 decoder on arbitrary fetch data: broker bytes are hostile. It must return
//! Ok or Err, never panic, never allocate by a count it was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sitewatch::kafka::records::decode_batches;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the fetch offset, so offset filtering is reached too.
    let (from, data) = match data.split_first() {
        Some((b, rest)) => (i64::from(*b) - 8, rest),
        None => (0, data),
    };
    if let Ok(decoded) = decode_batches(data, from) {
        assert!(decoded.next_offset >= from);
        assert!(decoded.records.iter().all(|r| r.offset >= from));
    }
});
