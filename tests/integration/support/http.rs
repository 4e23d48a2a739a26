//! A small threaded HTTP/1.1 test server with scripted behaviours, on 127.0.0.1 or ::1, plain or
//! TLS (native-tls acceptor with the fixtures in `tests/fixtures/tls/`).
//!
//! Each accepted connection gets its own thread; the script (a closure) sees the parsed request
//! and its index and returns a [`Reply`]. Every request is recorded for assertions. Dropping
//! the server stops it: the accept loop ends and connection threads notice the stop flag
//! within ~50 ms, so hanging and trickling replies do not outlive their test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as the server read it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// What the server does with a request.
pub enum Reply {
    /// A normal response with `Content-Length`.
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// These bytes exactly, then close.
    Raw(Vec<u8>),
    /// The head at once, then the body one byte per `every` (until done or the client leaves).
    Trickle {
        head: Vec<u8>,
        body: Vec<u8>,
        every: Duration,
    },
    /// Say nothing, hold the connection until the server stops.
    Hang,
    /// The reply after holding the request this long (a slow server: the wait is the
    /// client's time to first byte). One level: a `Late` inside a `Late` closes the connection.
    Late(Duration, Box<Reply>),
}

impl Reply {
    pub fn status(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::Response {
            status,
            headers: vec![("Location".into(), location.into())],
            body: b"moved".to_vec(),
        }
    }
}

pub type Script = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// Which certificate a TLS server shows (files in `tests/fixtures/tls/`).
#[derive(Clone, Copy, Debug)]
pub enum Cert {
    /// localhost + 127.0.0.1 + ::1, signed by the test CA.
    Localhost,
    /// wrong.invalid only, signed by the test CA.
    WrongHost,
    /// localhost, signed by the test CA, expired in 2021.
    Expired,
    /// localhost, self-signed.
    SelfSigned,
}

impl Cert {
    fn stem(self) -> &'static str {
        match self {
            Cert::Localhost => "localhost",
            Cert::WrongHost => "wrong-host",
            Cert::Expired => "expired",
            Cert::SelfSigned => "self-signed",
        }
    }
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
    tls: bool,
}

/// How a server treats a connection after its first response.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Persist {
    /// `Connection: close` after one response (the default: every check connects anew).
    Close,
    /// Answer requests on the connection until the client closes it.
    KeepAlive,
}

impl HttpServer {
    /// A plain server on 127.0.0.1.
    pub fn start(script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> HttpServer {
        HttpServer::bind("127.0.0.1:0", None, Persist::Close, Arc::new(script))
    }

    /// A plain server on 127.0.0.1 that keeps connections open between requests.
    pub fn start_keep_alive(
        script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> HttpServer {
        HttpServer::bind("127.0.0.1:0", None, Persist::KeepAlive, Arc::new(script))
    }

    /// A plain server on [::1].
    pub fn start_v6(
        script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> HttpServer {
        HttpServer::bind("[::1]:0", None, Persist::Close, Arc::new(script))
    }

    /// A TLS server on 127.0.0.1 showing `cert`.
    pub fn start_tls(
        cert: Cert,
        script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> HttpServer {
        let pem = std::fs::read(fixture(&format!("tls/{}.pem", cert.stem()))).expect("cert");
        let key = std::fs::read(fixture(&format!("tls/{}.key", cert.stem()))).expect("key");
        let identity = native_tls::Identity::from_pkcs8(&pem, &key).expect("identity");
        let acceptor = native_tls::TlsAcceptor::new(identity).expect("acceptor");
        HttpServer::bind(
            "127.0.0.1:0",
            Some(Arc::new(acceptor)),
            Persist::Close,
            Arc::new(script),
        )
    }

    fn bind(
        addr: &str,
        tls: Option<Arc<native_tls::TlsAcceptor>>,
        persist: Persist,
        script: Arc<Script>,
    ) -> HttpServer {
        let listener = TcpListener::bind(addr).expect("bind test server");
        let addr = listener.local_addr().expect("local addr");
        let shared = Shared {
            script,
            stop: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(Mutex::new(Vec::new())),
            counter: Arc::new(AtomicUsize::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
            persist,
        };
        let mut server = HttpServer {
            addr,
            stop: shared.stop.clone(),
            accept: None,
            requests: shared.requests.clone(),
            connections: shared.connections.clone(),
            tls: tls.is_some(),
        };
        server.accept = Some(
            std::thread::Builder::new()
                .name("test-http-accept".into())
                .spawn(move || accept_loop(listener, tls, shared))
                .expect("spawn"),
        );
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` + path (or `https://`, or `[::1]`).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// What every connection thread of one server shares.
#[derive(Clone)]
struct Shared {
    script: Arc<Script>,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Requests answered (the script's index).
    counter: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    persist: Persist,
}

fn accept_loop(listener: TcpListener, tls: Option<Arc<native_tls::TlsAcceptor>>, shared: Shared) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let (tls, shared) = (tls.clone(), shared.clone());
        let _ = std::thread::Builder::new()
            .name("test-http-conn".into())
            .spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                match tls {
                    None => serve(stream, &shared),
                    Some(acceptor) => {
                        // A client that rejects our certificate ends the handshake: fine.
                        if let Ok(mut tls) = acceptor.accept(stream) {
                            serve(&mut tls, &shared);
                            let _ = tls.shutdown();
                        }
                    }
                }
            });
    }
}

/// Answers requests on one connection: one, or (keep-alive) until the client leaves.
fn serve(mut stream: impl Read + Write, shared: &Shared) {
    while let Some(request) = read_request(&mut stream) {
        let index = shared.counter.fetch_add(1, Ordering::SeqCst);
        shared.requests.lock().unwrap().push(request.clone());
        let keep = shared.persist == Persist::KeepAlive;
        let reply = match (shared.script)(&request, index) {
            Reply::Late(wait, reply) => {
                if sleep_unless_stopped(wait, &shared.stop) {
                    return;
                }
                *reply
            }
            reply => reply,
        };
        match reply {
            Reply::Response {
                status,
                headers,
                body,
            } => {
                let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
                for (k, v) in &headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                if !keep {
                    head.push_str("Connection: close\r\n");
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                if request.method != "HEAD" {
                    let _ = stream.write_all(&body);
                }
                let _ = stream.flush();
                if keep {
                    continue;
                }
            }
            Reply::Raw(bytes) => {
                let _ = stream.write_all(&bytes);
                let _ = stream.flush();
            }
            Reply::Trickle { head, body, every } => {
                if stream
                    .write_all(&head)
                    .and_then(|_| stream.flush())
                    .is_err()
                {
                    return;
                }
                for b in body {
                    if sleep_unless_stopped(every, &shared.stop)
                        || stream.write_all(&[b]).and_then(|_| stream.flush()).is_err()
                    {
                        return;
                    }
                }
            }
            Reply::Hang => while !sleep_unless_stopped(Duration::from_secs(3600), &shared.stop) {},
            Reply::Late(..) => {}
        }
        return;
    }
}

/// Sleeps `d` in small steps; true when the server was stopped meanwhile.
fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
    stop.load(Ordering::SeqCst)
}

fn read_request(stream: &mut impl Read) -> Option<Request> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 64 * 1024 || stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(16 * 1024 * 1024)];
    stream.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

/// A server on 127.0.0.1 that accepts connections and never reads from them: a client's
/// writes block once the socket buffers are full. The connections are held until it is dropped.
pub struct DeafServer {
    port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl DeafServer {
    pub fn start() -> DeafServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind deaf server");
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let accept = std::thread::Builder::new()
            .name("test-deaf-accept".into())
            .spawn(move || {
                let mut held = Vec::new();
                for stream in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    held.extend(stream.ok());
                }
            })
            .expect("spawn");
        DeafServer {
            port,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for DeafServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// `openssl s_server -www` on 127.0.0.1 with the localhost leaf, TLS 1.3 only: a second,
/// independent TLS stack (native-tls's acceptor stops at TLS 1.2) that answers every request
/// with an HTTP/1.0 status page. Killed on drop.
pub struct OpensslServer {
    child: std::process::Child,
    pub port: u16,
}

impl OpensslServer {
    pub fn start() -> OpensslServer {
        let port = super::free_port();
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-tls1_3", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(fixture("tls/localhost.pem"))
            .arg("-key")
            .arg(fixture("tls/localhost.key"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the openssl CLI is needed for this test (apt-get install openssl)");
        let server = OpensslServer { child, port };
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < until,
                "openssl s_server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
