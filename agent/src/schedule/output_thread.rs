//! The `output` thread: the only reader of the results channel and the owner of the
//! [`Output`]. It writes each record, tells the output when none is waiting (so stdout is
//! flushed once per burst), ticks it while idle, and closes it when the stream ends.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Summary;
use crate::output::Output;
use crate::result::CheckResult;
use crate::service::Heartbeat;

/// The output thread naps [`BURST_NAP`] instead of blocking after handling at least this many
/// records in a row. Under a stream of checks each blocking receive cost a futex wake-up and a
/// context switch per record (bench/README.md, third pass).
const BURST: usize = 2;
/// The output thread's nap during a burst: records wait at most this long to be written.
const BURST_NAP: Duration = Duration::from_millis(1);

pub(crate) fn output_loop(
    mut output: Box<dyn Output>,
    results: Receiver<CheckResult>,
    summary: Arc<Mutex<Summary>>,
    status_line: Arc<Mutex<String>>,
    hb: Heartbeat,
    drain: Duration,
) {
    let mut failed = false;
    let record_error = |e: crate::output::OutputError, failed: &mut bool| {
        if !*failed {
            if e.is_broken_pipe() {
                log::debug!("output: {e}");
            } else {
                log::error!("output: {e}");
            }
            summary
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .output_error = Some(Arc::new(e));
        }
        *failed = true;
    };
    let mut last_idle = Instant::now();
    // Records written since the output was last told that none is waiting.
    let mut pending = 0usize;
    loop {
        hb.beat();
        let next = match results.try_recv() {
            Ok(record) => Ok(record),
            Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            Err(TryRecvError::Empty) => {
                let burst = pending >= BURST;
                if pending > 0 {
                    pending = 0;
                    if !failed && let Err(e) = output.drained() {
                        record_error(e, &mut failed);
                    }
                }
                if burst {
                    // Records are arriving faster than one at a time: nap instead of blocking,
                    // so the workers' sends need not wake this thread for every record. The
                    // nap ends a burst's batch; a nap that brings fewer than BURST records
                    // ends the burst, and the thread blocks again.
                    std::thread::sleep(BURST_NAP);
                    continue;
                }
                results.recv_timeout(Duration::from_millis(100))
            }
        };
        match next {
            Ok(record) => {
                pending += 1;
                if !failed && let Err(e) = output.write(record) {
                    record_error(e, &mut failed);
                }
                // Under a steady stream recv never times out; still give the output its ticks.
                if last_idle.elapsed() >= Duration::from_millis(100) {
                    last_idle = Instant::now();
                    if !failed && let Err(e) = output.idle() {
                        record_error(e, &mut failed);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                last_idle = Instant::now();
                if !failed && let Err(e) = output.idle() {
                    record_error(e, &mut failed);
                }
                if let Ok(mut l) = status_line.lock() {
                    *l = output.status();
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if let Err(e) = output.close(Instant::now() + drain) {
        record_error(e, &mut failed);
    }
}
