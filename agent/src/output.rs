//! Where check records go: stdout (JSON lines or a table), an in-memory collector for tests,
//! and (in [`crate::publish`]) Kafka. All behind the [`Output`] trait, driven by one output
//! thread that owns the receiving end of the results channel.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::publish::spool::SpoolError;
use crate::result::CheckResult;

/// An output failed in a way that loses records. Each variant keeps the real cause
/// ([`std::error::Error::source`]), so callers branch on kinds (a closed pipe), never on text.
/// It never holds record contents or secrets.
#[derive(Debug)]
#[non_exhaustive]
pub enum OutputError {
    /// Writing to stdout failed (a reader that went away is `ErrorKind::BrokenPipe`).
    Stdout(std::io::Error),
    /// The publisher's spool could not keep the records.
    Spool(SpoolError),
}

impl OutputError {
    /// Stdout was closed by its reader (`sitewatch --once | head`): records are lost on
    /// purpose, not by a fault of ours.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, OutputError::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputError::Stdout(e) => write!(f, "writing to stdout: {e}"),
            OutputError::Spool(e) => write!(f, "publisher: {e}"),
        }
    }
}

impl std::error::Error for OutputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OutputError::Stdout(e) => Some(e),
            OutputError::Spool(e) => Some(e),
        }
    }
}

/// A destination for check records.
///
/// Architecture Invariant: `write` returns quickly (at most a local disk append); it never waits
/// on the network, so a slow or dead Kafka never holds up the probes behind it.
pub trait Output: Send {
    /// Takes one record.
    fn write(&mut self, record: CheckResult) -> Result<(), OutputError>;
    /// Called when no further record is waiting after one or more writes: the moment to flush
    /// what `write` buffered, so a burst costs one flush and a lone record is not held back.
    fn drained(&mut self) -> Result<(), OutputError> {
        Ok(())
    }
    /// Called when no record arrived for a while (about every 100 ms), so an output can flush
    /// on a timer (linger) without a thread of its own.
    fn idle(&mut self) -> Result<(), OutputError> {
        Ok(())
    }
    /// Shutdown: deliver or persist everything taken so far, giving up at `deadline`.
    fn close(&mut self, deadline: Instant) -> Result<(), OutputError>;
    /// A short status for sd_notify `STATUS=` (e.g. spool depth); empty when nothing to say.
    fn status(&self) -> String {
        String::new()
    }
}

/// How `--once` prints records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Table,
}

/// Prints records to a writer (stdout in the binary): one JSON line each, or table rows.
pub struct Printer<W: Write + Send> {
    out: W,
    format: Format,
    header_done: bool,
}

impl<W: Write + Send> Printer<W> {
    pub fn new(out: W, format: Format) -> Printer<W> {
        Printer {
            out,
            format,
            header_done: false,
        }
    }
}

impl<W: Write + Send> Output for Printer<W> {
    fn write(&mut self, record: CheckResult) -> Result<(), OutputError> {
        let io = OutputError::Stdout;
        match self.format {
            Format::Json => {
                record.write_json(&mut self.out).map_err(io)?;
                self.out.write_all(b"\n").map_err(io)?;
            }
            Format::Table => {
                if !self.header_done {
                    writeln!(self.out, "{}", table_header()).map_err(io)?;
                    self.header_done = true;
                }
                writeln!(self.out, "{}", table_row(&record)).map_err(io)?;
            }
        }
        Ok(())
    }

    /// A pipe reader (jq, a test) sees each record as soon as no other is waiting behind it;
    /// a burst goes out in one write instead of one per line.
    fn drained(&mut self) -> Result<(), OutputError> {
        self.out.flush().map_err(OutputError::Stdout)
    }

    fn close(&mut self, _deadline: Instant) -> Result<(), OutputError> {
        self.out.flush().map_err(OutputError::Stdout)
    }
}

fn table_header() -> String {
    format!(
        "{:<20} {:<4} {:>6} {:>9} {:>8} {:>8} {:>8}  {}",
        "TARGET", "UP", "STATUS", "TOTAL ms", "CONN ms", "TLS ms", "TTFB ms", "FAILURE / URL"
    )
}

fn table_row(r: &CheckResult) -> String {
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let detail = match (&r.failure, &r.error) {
        (Some(f), Some(e)) => format!("{f}: {e}"),
        (Some(f), None) => f.to_string(),
        _ => r.url.clone(),
    };
    let mut target = r.target.clone();
    if target.chars().count() > 20 {
        target = target.chars().take(19).collect::<String>() + "…";
    }
    format!(
        "{:<20} {:<4} {:>6} {:>9.1} {:>8} {:>8} {:>8}  {}",
        target,
        if r.up { "yes" } else { "NO" },
        r.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        r.timings.total,
        opt(r.timings.connect),
        opt(r.timings.tls),
        opt(r.timings.ttfb),
        detail
    )
}

/// Keeps records in memory; clones share the same list. For tests and for `--once`'s summary.
#[derive(Clone, Default)]
pub struct Collector {
    records: Arc<Mutex<Vec<CheckResult>>>,
}

impl Collector {
    pub fn new() -> Collector {
        Collector::default()
    }

    /// A copy of everything written so far.
    pub fn records(&self) -> Vec<CheckResult> {
        self.records.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Output for Collector {
    fn write(&mut self, record: CheckResult) -> Result<(), OutputError> {
        if let Ok(mut v) = self.records.lock() {
            v.push(record);
        }
        Ok(())
    }

    fn close(&mut self, _deadline: Instant) -> Result<(), OutputError> {
        Ok(())
    }
}

/// Sends every record to several outputs in turn (e.g. stdout and a collector).
pub struct Tee(pub Vec<Box<dyn Output>>);

impl Output for Tee {
    fn write(&mut self, record: CheckResult) -> Result<(), OutputError> {
        let (last, rest) = match self.0.split_last_mut() {
            Some(x) => x,
            None => return Ok(()),
        };
        for o in rest {
            o.write(record.clone())?;
        }
        last.write(record)
    }

    fn drained(&mut self) -> Result<(), OutputError> {
        self.0.iter_mut().try_for_each(|o| o.drained())
    }

    fn idle(&mut self) -> Result<(), OutputError> {
        self.0.iter_mut().try_for_each(|o| o.idle())
    }

    fn close(&mut self, deadline: Instant) -> Result<(), OutputError> {
        self.0.iter_mut().try_for_each(|o| o.close(deadline))
    }

    fn status(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|o| o.status())
            .filter(|s| !s.is_empty())
            .collect();
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::FailureReason;

    #[test]
    fn printer_json_lines_and_table() {
        let mut up = CheckResult::new("home", "http://127.0.0.1/", "a", "GET");
        up.up = true;
        up.status = Some(200);
        let mut down = CheckResult::new("api", "http://127.0.0.1/api", "a", "GET");
        down.fail(FailureReason::Connect, "connection refused");

        let mut p = Printer::new(Vec::new(), Format::Json);
        p.write(up.clone()).unwrap();
        p.write(down.clone()).unwrap();
        let text = String::from_utf8(p.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(CheckResult::from_json(lines[1].as_bytes()).unwrap(), down);

        let mut t = Printer::new(Vec::new(), Format::Table);
        t.write(up).unwrap();
        t.write(down).unwrap();
        let text = String::from_utf8(t.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TARGET"), "{text}");
        assert!(
            lines[1].starts_with("home") && lines[1].contains("yes") && lines[1].contains("200"),
            "{text}"
        );
        assert!(
            lines[2].contains("NO") && lines[2].contains("connect: connection refused"),
            "{text}"
        );
    }

    /// Counts flushes, to see when the printer pushes its lines out.
    struct Flushes(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Write for Flushes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn printer_flushes_once_per_burst_and_at_close() {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flushes = || count.load(std::sync::atomic::Ordering::SeqCst);
        let mut p = Printer::new(Flushes(count.clone()), Format::Json);
        let r = CheckResult::new("home", "http://127.0.0.1/", "a", "GET");
        p.write(r.clone()).unwrap();
        p.write(r.clone()).unwrap();
        assert_eq!(flushes(), 0, "a write alone does not flush");
        p.drained().unwrap();
        assert_eq!(flushes(), 1, "the end of a burst flushes");
        p.write(r).unwrap();
        p.close(Instant::now()).unwrap();
        assert_eq!(flushes(), 2, "close flushes");
    }
}
