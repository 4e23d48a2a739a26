//! The metrics listener: a minimal HTTP/1.1 server for `GET /metrics` and `GET /probe`.
//!
//! Hand-written rather than a crate: it answers two GET paths to one client (Prometheus), one
//! request per connection, and every bound is ours to state. Each bound is here:
//! - at most `connections` connections are served at once; one more is closed unanswered
//!   (so 10,000 connections opened at once cost one accept each, not a thread each);
//! - the request head is at most [`MAX_HEAD`] bytes and must arrive within [`HEAD_DEADLINE`]
//!   (a slow client holds one connection slot for at most that long);
//! - writing the answer gives up after [`WRITE_TIMEOUT`];
//! - every answer closes the connection (`Connection: close`), so no connection idles.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use super::probe::{ProbeEndpoint, Slot, acquire};
use super::{Registry, expo};

/// The request line and headers together; Prometheus sends about 300 bytes.
const MAX_HEAD: usize = 8 * 1024;
/// The whole request head must arrive within this.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding the address failed (in use, not local, no permission).
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The accept thread could not start.
    Thread(std::io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind { addr, source } => {
                write!(f, "metrics: cannot listen on {addr}: {source}")
            }
            ServerError::Thread(e) => write!(f, "metrics: cannot start the listener thread: {e}"),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Bind { source, .. } => Some(source),
            ServerError::Thread(e) => Some(e),
        }
    }
}

/// What the connection threads share.
struct Shared {
    registry: Arc<Registry>,
    probe: Option<Arc<ProbeEndpoint>>,
    open: AtomicUsize,
    connections: usize,
}

/// The running listener. Its `metrics` thread accepts until the process ends: it holds no
/// state that shutdown must save.
pub struct Server {
    pub addr: SocketAddr,
}

impl Server {
    /// Binds `addr` and starts the `metrics` accept thread. `/probe` answers 404 without a
    /// `probe` endpoint (the sink has no prober).
    pub fn start(
        addr: SocketAddr,
        connections: usize,
        registry: Arc<Registry>,
        probe: Option<Arc<ProbeEndpoint>>,
    ) -> Result<Server, ServerError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        let shared = Arc::new(Shared {
            registry,
            probe,
            open: AtomicUsize::new(0),
            connections,
        });
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(&listener, &shared))
            .map_err(ServerError::Thread)?;
        log::info!("metrics: listening on http://{addr}/metrics");
        Ok(Server { addr })
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // EMFILE and the like: back off instead of spinning on the error.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        // Over the cap: the connection is closed unanswered (dropped here).
        if !acquire(&shared.open, shared.connections) {
            continue;
        }
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                let _slot = Slot::adopt(&conn_shared.open);
                serve(stream, &conn_shared);
            });
        if spawned.is_err() {
            // The slot was taken for a thread that never ran.
            drop(Slot::adopt(&shared.open));
        }
    }
}

/// One request, one answer, then close.
fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let (status, content_type, body) = match read_head(&mut stream) {
        Err(HeadError::Io) => return,
        Err(HeadError::TooLarge) => (431, "text/plain", "request head too large\n".to_string()),
        Err(HeadError::Malformed) => (400, "text/plain", "bad request\n".to_string()),
        Ok(head) => answer(&head, shared),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

fn answer(head: &Head, shared: &Shared) -> (u16, &'static str, String) {
    if head.method != "GET" {
        return (405, "text/plain", "only GET\n".into());
    }
    let (path, query) = (head.target.split_once('?')).unwrap_or((head.target.as_str(), ""));
    match (path, &shared.probe) {
        ("/metrics", _) => (200, expo::CONTENT_TYPE, shared.registry.render()),
        ("/probe", Some(probe)) => match probe.probe(query, head.scrape_timeout.as_deref()) {
            Ok(text) => (200, expo::CONTENT_TYPE, text),
            Err(r) => (r.status, "text/plain", r.message + "\n"),
        },
        ("/", _) => (
            200,
            "text/plain",
            "sitewatch: /metrics, /probe?target=URL&module=NAME\n".into(),
        ),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// The parts of a request we use.
#[derive(Debug, PartialEq)]
struct Head {
    method: String,
    target: String,
    scrape_timeout: Option<String>,
}

#[derive(Debug, PartialEq)]
enum HeadError {
    /// The client went away, or was too slow: nothing to answer.
    Io,
    TooLarge,
    Malformed,
}

/// Reads until the blank line ending the head, within [`HEAD_DEADLINE`] and [`MAX_HEAD`].
fn read_head(stream: &mut TcpStream) -> Result<Head, HeadError> {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&buf) {
            return parse_head(&buf[..end]);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(HeadError::Io);
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(HeadError::Io),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

fn parse_head(bytes: &[u8]) -> Result<Head, HeadError> {
    let text = std::str::from_utf8(bytes).map_err(|_| HeadError::Malformed)?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(HeadError::Malformed);
    }
    let mut scrape_timeout = None;
    for header in lines {
        let (name, value) = header.split_once(':').ok_or(HeadError::Malformed)?;
        if name.eq_ignore_ascii_case("X-Prometheus-Scrape-Timeout-Seconds") {
            scrape_timeout = Some(value.trim().to_string());
        }
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        scrape_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_or_are_refused() {
        let ok = parse_head(
            b"GET /probe?target=x HTTP/1.1\r\nHost: a\r\nX-Prometheus-Scrape-Timeout-Seconds: 9.5",
        )
        .unwrap();
        assert_eq!(
            ok,
            Head {
                method: "GET".into(),
                target: "/probe?target=x".into(),
                scrape_timeout: Some("9.5".into())
            }
        );
        for bad in [
            &b"GET /metrics"[..],
            b"GET  /metrics HTTP/1.1",
            b"GET metrics HTTP/1.1",
            b"GET /metrics SPDY/3",
            b"GET /metrics HTTP/1.1\r\nno colon",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_head(bad), Err(HeadError::Malformed), "{bad:?}");
        }
    }
}
