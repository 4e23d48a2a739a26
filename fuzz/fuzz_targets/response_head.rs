//! The response path the probe takes, as a pure function: ureq 3 parses responses with the
//! sans-IO `ureq-proto` state machine, fed here as ureq feeds it (a growing buffer for the head,
//! then the body through `read`). Arbitrary server bytes must give a response, "need more" or an
//! error, never a panic or a loop that consumes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ureq_proto::client::{Call, RecvBodyResult, RecvResponseResult, SendRequestResult};
use ureq_proto::http::Request;

fuzz_target!(|data: &[u8]| {
    // The first byte is the read size (1..=256): heads and chunk lines split anywhere.
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(step) + 1;
    let request = Request::get("http://127.0.0.1/").body(()).unwrap();
    let mut call = Call::new(request).unwrap().proceed();
    let mut out = vec![0u8; 4096];
    call.write(&mut out).unwrap();
    let Ok(Some(SendRequestResult::RecvResponse(mut call))) = call.proceed() else {
        panic!("a GET without body goes straight to the response");
    };

    // The head: try on what has arrived so far, as ureq does after each read.
    let (mut pos, mut end) = (0, 0);
    loop {
        end = (end + step).min(input.len());
        match call.try_response(&input[pos..end], false) {
            Err(_) => return,
            Ok((used, response)) => {
                pos += used;
                if response.is_some() {
                    break;
                }
                if end == input.len() && used == 0 {
                    return; // EOF inside the head
                }
            }
        }
    }
    let Some(RecvResponseResult::RecvBody(mut body)) = call.proceed() else {
        return;
    };

    // The body: what has arrived so far, `step` more bytes each time, until it ends, fails or
    // the input runs out (EOF).
    let mut end = pos;
    while !body.can_proceed() {
        end = (end + step).min(input.len());
        match body.read(&input[pos..end], &mut out) {
            Err(_) => return,
            Ok((used, produced)) => {
                pos += used;
                if used == 0 && produced == 0 && end == input.len() {
                    break;
                }
            }
        }
    }
    if let Some(RecvBodyResult::Cleanup(_) | RecvBodyResult::Redirect(_)) = body.proceed() {}
});
