//! The small HTTP/1.1 listener shared by `[metrics]` and `[serve]`: GET only, one request per
//! connection, every bound ours to state. What each path answers is a [`Handler`]'s business.
//!
//! Hand-written rather than a crate: it answers a few GET paths, and each bound is here:
//! - at most `connections` connections are served at once; one more is closed unanswered
//!   (so 10,000 connections opened at once cost one accept each, not a thread each);
//! - the request head is at most [`MAX_HEAD`] bytes and must arrive within [`HEAD_DEADLINE`]
//!   (a slow client holds one connection slot for at most that long);
//! - writing the answer gives up after [`WRITE_TIMEOUT`];
//! - every answer closes the connection (`Connection: close`), so no connection idles.
//!
//! Architecture Invariant: a request costs at most one thread, [`MAX_HEAD`] bytes of head and
//! [`HEAD_DEADLINE`] of waiting before its handler runs.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The request line and headers together; Prometheus sends about 300 bytes, browsers about 1 KiB.
pub const MAX_HEAD: usize = 8 * 1024;
/// The whole request head must arrive within this.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener answers: called on the connection's thread for every well-formed head.
pub trait Handler: Send + Sync + 'static {
    fn answer(&self, head: &Head) -> Response;
}

/// The parts of a request a handler sees.
#[derive(Debug, PartialEq)]
pub struct Head {
    pub method: String,
    /// The request target as sent: path and query, still percent-encoded.
    pub target: String,
    /// Header names lowercased; values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v.as_str())
    }

    /// The path and the query (empty without `?`).
    pub fn path_and_query(&self) -> (&str, &str) {
        self.target.split_once('?').unwrap_or((&self.target, ""))
    }
}

/// One answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// Extra header lines (`Cache-Control`, ...), besides type, length and `Connection`.
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body.into())
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

/// `(key, value)` pairs of a query string, percent-decoded (`+` is a space).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, String)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key, crate::util::percent_decode(&value.replace('+', " ")))
    })
}

/// The listener could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding the address failed (in use, not local, no permission).
    Bind {
        name: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The accept thread could not start.
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind { name, addr, source } => {
                write!(f, "{name}: cannot listen on {addr}: {source}")
            }
            ServerError::Thread { name, source } => {
                write!(f, "{name}: cannot start the listener thread: {source}")
            }
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Bind { source, .. } | ServerError::Thread { source, .. } => Some(source),
        }
    }
}

/// What the connection threads share.
struct Shared {
    handler: Arc<dyn Handler>,
    open: AtomicUsize,
    connections: usize,
    name: &'static str,
}

/// Binds `addr` and starts the accept thread `name` (its connections run on `name-conn`). The
/// thread accepts until the process ends: it holds no state that shutdown must save. Returns
/// the bound address (port 0 becomes the real one).
pub fn start(
    name: &'static str,
    addr: SocketAddr,
    connections: usize,
    handler: Arc<dyn Handler>,
) -> Result<SocketAddr, ServerError> {
    let listener =
        TcpListener::bind(addr).map_err(|source| ServerError::Bind { name, addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let shared = Arc::new(Shared {
        handler,
        open: AtomicUsize::new(0),
        connections,
        name,
    });
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || accept_loop(&listener, &shared))
        .map_err(|source| ServerError::Thread { name, source })?;
    Ok(addr)
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
            .name(format!("{}-conn", shared.name))
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
    let response = match read_head(&mut stream) {
        Err(HeadError::Io) => return,
        Err(HeadError::TooLarge) => Response::text(431, "request head too large\n"),
        Err(HeadError::Malformed) => Response::text(400, "bad request\n"),
        Ok(head) if head.method != "GET" && head.method != "HEAD" => {
            Response::text(405, "only GET\n").with_header("Allow", "GET, HEAD")
        }
        Ok(head) => {
            let mut response = shared.handler.answer(&head);
            if head.method == "HEAD" {
                response.body.clear();
            }
            response
        }
    };
    let reason = match response.status {
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&response.body);
    let _ = stream.flush();
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
    let mut headers = Vec::new();
    for header in lines {
        let (name, value) = header.split_once(':').ok_or(HeadError::Malformed)?;
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    })
}

/// One of `cap` places, given back on drop.
pub struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    pub fn take(count: &'a AtomicUsize, cap: usize) -> Option<Slot<'a>> {
        acquire(count, cap).then(|| Slot::adopt(count))
    }

    /// The slot a successful [`acquire`] took, to be given back on drop.
    fn adopt(count: &'a AtomicUsize) -> Slot<'a> {
        Slot(count)
    }
}

/// Counts one more holder unless `cap` hold places already.
fn acquire(count: &AtomicUsize, cap: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .is_ok()
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
        assert_eq!(ok.method, "GET");
        assert_eq!(ok.path_and_query(), ("/probe", "target=x"));
        assert_eq!(
            ok.header("x-prometheus-scrape-timeout-seconds"),
            Some("9.5")
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

    #[test]
    fn query_pairs_are_decoded() {
        let pairs: Vec<_> = query_pairs("a=x%2Fy&b=m+1&&c").collect();
        assert_eq!(
            pairs,
            [
                ("a", "x/y".to_string()),
                ("b", "m 1".into()),
                ("c", "".into())
            ]
        );
    }

    #[test]
    fn slots_are_capped_and_given_back() {
        let n = AtomicUsize::new(0);
        let a = Slot::take(&n, 2).unwrap();
        let _b = Slot::take(&n, 2).unwrap();
        assert!(Slot::take(&n, 2).is_none());
        drop(a);
        assert!(Slot::take(&n, 2).is_some());
    }
}
