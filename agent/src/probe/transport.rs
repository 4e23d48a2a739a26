//! The ureq plumbing that lets the probe measure: a [`Resolver`], a [`Connector`] and a
//! [`Transport`] that do what ureq's defaults do (getaddrinfo, TCP, native-tls) while writing
//! each phase's duration and the connection's facts (remote address, TLS version, leaf
//! certificate) into a [`HopLog`] shared with the probe.
//!
//! Why not ureq's own connectors: they do not say how long each step took, which address
//! answered, or which certificate the server showed, and ureq's native-tls connector does not
//! expose the TLS stream. Owning the socket also lets every read and write be bounded by a hard
//! deadline ([`DeadlineStream`]), including the TLS handshake, so a server that trickles bytes
//! cannot stretch a check past its timeout.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use native_tls::{HandshakeError, TlsConnector, TlsStream};
use ureq::config::Config as UreqConfig;
use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

use super::buffers::PooledBuffers;
use super::x509::{self, CertFacts};
use crate::config::IpFamily;
use crate::result::FailureReason;

/// What one hop (one request and its response) measured. The probe resets it before each hop
/// and reads it after; the resolver, connector and transport write into it.
#[derive(Debug, Default, Clone)]
pub struct HopLog {
    /// Name lookup; `None` for an IP literal (no lookup happened).
    pub dns: Option<Duration>,
    /// TCP connect; `None` when a kept-alive connection was reused.
    pub connect: Option<Duration>,
    /// TLS handshake; `None` on plain HTTP or a reused connection.
    pub tls: Option<Duration>,
    /// When the last byte of the request was written.
    pub request_sent: Option<Instant>,
    /// Size of the request head, once it is written (ureq writes it in one transmit, before
    /// any body).
    pub head_bytes: Option<u64>,
    /// Request body bytes written so far, for a timeout's "N of M bytes sent".
    pub body_sent: u64,
    /// When the first byte of the response arrived after that.
    pub first_byte: Option<Instant>,
    /// The connection that carried the request.
    pub conn: Option<Arc<ConnFacts>>,
    /// A failure our plumbing classified itself (ureq only sees a generic error for it).
    pub failure: Option<(FailureReason, String)>,
    /// A read or write hit the deadline.
    pub timed_out: bool,
}

/// The log one ureq agent writes into.
pub type SharedLog = Arc<Mutex<HopLog>>;

pub fn with_log<T>(log: &SharedLog, f: impl FnOnce(&mut HopLog) -> T) -> T {
    // A poisoned lock only means a panic elsewhere mid-update; the values are plain data.
    let mut guard = log.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

/// Facts about one connection, kept with the transport so a reused (keep-alive) connection
/// still reports them.
#[derive(Debug)]
pub struct ConnFacts {
    pub remote: SocketAddr,
    pub tls_version: Option<&'static str>,
    pub cert: Option<CertFacts>,
}

/// The remaining budget of a ureq timeout as a deadline; `None` when ureq has none.
fn deadline_from(timeout: NextTimeout) -> Option<Instant> {
    if timeout.after.is_not_happening() {
        None
    } else {
        Some(Instant::now() + *timeout.after)
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Host (without IPv6 brackets) and port of a URI.
pub fn host_port(uri: &Uri) -> Option<(String, u16)> {
    let authority = uri.authority()?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let default = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    Some((host.to_string(), authority.port_u16().unwrap_or(default)))
}

// ---------------------------------------------------------------------------------------------
// Resolver

/// getaddrinfo with a deadline, timed, filtered by the target's IP family.
#[derive(Debug)]
pub struct ProbeResolver {
    pub family: IpFamily,
    pub log: SharedLog,
}

impl ProbeResolver {
    fn fail(&self, reason: FailureReason, text: String) {
        with_log(&self.log, |l| l.failure = Some((reason, text)));
    }
}

impl Resolver for ProbeResolver {
    fn resolve(
        &self,
        uri: &Uri,
        _config: &UreqConfig,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let Some((host, port)) = host_port(uri) else {
            return Err(ureq::Error::BadUri(format!("no host in {uri}")));
        };
        let found = match host.parse::<IpAddr>() {
            // An IP literal needs no lookup: the dns phase did not happen.
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let started = Instant::now();
                let budget = timeout.not_zero().map(|d| *d);
                let result = lookup(&host, port, budget);
                let elapsed = started.elapsed();
                with_log(&self.log, |l| l.dns = Some(elapsed));
                match result {
                    Ok(addrs) => addrs,
                    Err(None) => {
                        self.fail(
                            FailureReason::Timeout,
                            format!("DNS lookup of {host} timed out after {}", secs(elapsed)),
                        );
                        return Err(ureq::Error::Timeout(timeout.reason));
                    }
                    Err(Some(e)) => {
                        self.fail(FailureReason::Dns, format!("cannot resolve {host}: {e}"));
                        return Err(ureq::Error::HostNotFound);
                    }
                }
            }
        };
        let wanted: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| match self.family {
                IpFamily::Any => true,
                IpFamily::V4 => a.is_ipv4(),
                IpFamily::V6 => a.is_ipv6(),
            })
            .collect();
        if wanted.is_empty() {
            let family = if self.family == IpFamily::V4 {
                "IPv4"
            } else {
                "IPv6"
            };
            let list: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
            self.fail(
                FailureReason::Dns,
                format!(
                    "{host} has no {family} address (ip = {:?}; found {})",
                    if self.family == IpFamily::V4 {
                        "v4"
                    } else {
                        "v6"
                    },
                    if list.is_empty() {
                        "none".to_string()
                    } else {
                        list.join(", ")
                    }
                ),
            );
            return Err(ureq::Error::HostNotFound);
        }
        let mut out = self.empty();
        // ureq keeps at most 16 addresses.
        for addr in wanted.into_iter().take(16) {
            out.push(addr);
        }
        Ok(out)
    }
}

/// `Err(None)` is a timeout. The lookup runs on its own thread because getaddrinfo cannot be
/// interrupted; a lookup that outlives its budget finishes (or hangs) there, detached, and its
/// answer is dropped.
fn lookup(
    host: &str,
    port: u16,
    budget: Option<Duration>,
) -> Result<Vec<SocketAddr>, Option<io::Error>> {
    let Some(budget) = budget else {
        return (host, port)
            .to_socket_addrs()
            .map(|a| a.collect())
            .map_err(Some);
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let name = host.to_string();
    let spawned = std::thread::Builder::new()
        .name("sitewatch-dns".into())
        .spawn(move || {
            let _ = tx.send(
                (name.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>()),
            );
        });
    if let Err(e) = spawned {
        return Err(Some(e));
    }
    match rx.recv_timeout(budget) {
        Ok(result) => result.map_err(Some),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(None),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(Some(io::Error::other(
            "the lookup thread ended without an answer",
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Connector

/// CA file and `insecure_skip_verify`: what a TLS connector is built from.
pub type TlsKey = (Option<PathBuf>, bool);

/// TLS connectors by [`TlsKey`]. Building one loads the root store (85-250 ms measured), so the
/// ones a config needs are built with the prober, when the config is loaded or reloaded, and
/// are then read without a lock. A key that was not foreseen (the insecure connector that
/// re-reads a refused certificate, a prober built without targets) is built on first use, outside
/// the lock, and its time falls in the check's `tls` phase.
#[derive(Default)]
pub struct TlsConnectors {
    prebuilt: HashMap<TlsKey, Result<TlsConnector, String>>,
    later: Mutex<HashMap<TlsKey, Result<TlsConnector, String>>>,
    built: AtomicUsize,
}

impl TlsConnectors {
    /// Builds the connector of every key in `keys` now.
    pub fn for_keys(keys: impl IntoIterator<Item = TlsKey>) -> TlsConnectors {
        let connectors = TlsConnectors::default();
        let mut prebuilt = HashMap::new();
        for key in keys {
            if let Entry::Vacant(slot) = prebuilt.entry(key) {
                let built = connectors.build(slot.key());
                slot.insert(built);
            }
        }
        TlsConnectors {
            prebuilt,
            ..connectors
        }
    }

    /// The connector for `key`, or why it cannot be built (a bad CA file).
    pub fn get(&self, key: &TlsKey) -> Result<TlsConnector, String> {
        if let Some(found) = self.prebuilt.get(key) {
            return found.clone();
        }
        let lock = || self.later.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = lock().get(key) {
            return found.clone();
        }
        // Built without the lock, so checks needing other keys do not queue behind it; two
        // checks racing here may both build, and one result is kept.
        let built = self.build(key);
        lock().entry(key.clone()).or_insert(built).clone()
    }

    /// How many connectors were built so far.
    pub fn built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    fn build(&self, key: &TlsKey) -> Result<TlsConnector, String> {
        self.built.fetch_add(1, Ordering::Relaxed);
        build_tls(key.0.as_deref(), key.1)
    }
}

fn build_tls(ca_file: Option<&std::path::Path>, insecure: bool) -> Result<TlsConnector, String> {
    let mut builder = TlsConnector::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("tls ca_file {}: cannot read: {e}", path.display()))?;
        let certs = native_tls::Certificate::stack_from_pem(&pem)
            .map_err(|e| format!("tls ca_file {}: not PEM certificates: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "tls ca_file {}: no certificate in it",
                path.display()
            ));
        }
        for cert in certs {
            builder.add_root_certificate(cert);
        }
    }
    if insecure {
        builder.danger_accept_invalid_certs(true);
        builder.danger_accept_invalid_hostnames(true);
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up TLS: {e}"))
}

/// TCP connect (each resolved address in turn) and, for https, a native-tls handshake.
pub struct ProbeConnector {
    pub tls: Arc<TlsConnectors>,
    pub tls_key: TlsKey,
    pub log: SharedLog,
}

impl fmt::Debug for ProbeConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeConnector").finish_non_exhaustive()
    }
}

impl ProbeConnector {
    fn fail(&self, reason: FailureReason, text: String) {
        with_log(&self.log, |l| l.failure = Some((reason, text)));
    }
}

impl Connector<()> for ProbeConnector {
    type Out = ProbeTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<ProbeTransport>, ureq::Error> {
        let deadline = deadline_from(details.timeout);
        let started = Instant::now();
        let connected = connect_any(&details.addrs, deadline);
        let connect_time = started.elapsed();
        with_log(&self.log, |l| l.connect = Some(connect_time));
        let (tcp, remote) = match connected {
            Ok(v) => v,
            Err((addr, e)) if e.kind() == io::ErrorKind::TimedOut => {
                self.fail(
                    FailureReason::Timeout,
                    format!("connect to {addr} timed out after {}", secs(connect_time)),
                );
                with_log(&self.log, |l| l.timed_out = true);
                return Err(ureq::Error::Timeout(details.timeout.reason));
            }
            Err((addr, e)) => {
                self.fail(FailureReason::Connect, format!("connect to {addr}: {e}"));
                return Err(ureq::Error::Io(e));
            }
        };
        // Small requests: do not let Nagle delay them (and the ttfb measurement).
        let _ = tcp.set_nodelay(true);
        let stream = DeadlineStream::new(tcp);
        let buffers = PooledBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        let poolable = details.config.max_idle_connections_per_host() > 0;
        let (conn, facts) = if details.needs_tls() {
            self.handshake(details, stream, remote, deadline)?
        } else {
            let facts = ConnFacts {
                remote,
                tls_version: None,
                cert: None,
            };
            (Conn::Plain(stream), facts)
        };
        Ok(Some(ProbeTransport::new(
            conn,
            buffers,
            facts,
            self.log.clone(),
            poolable,
        )))
    }
}

impl ProbeConnector {
    /// The TLS handshake over a connected `stream`, timed into the `tls` phase. On failure the
    /// log still gets the connection's facts: the address, and after a verification failure
    /// the certificate that was refused ([`Self::reread_certificate`]).
    fn handshake(
        &self,
        details: &ConnectionDetails,
        mut stream: DeadlineStream,
        remote: SocketAddr,
        deadline: Option<Instant>,
    ) -> Result<(Conn, ConnFacts), ureq::Error> {
        let bare = ConnFacts {
            remote,
            tls_version: None,
            cert: None,
        };
        // The phase starts before the connector is fetched: should it have to be built here,
        // that time is the check's too, and belongs in no other phase.
        let tls_started = Instant::now();
        let connector = match self.tls.get(&self.tls_key) {
            Ok(c) => c,
            Err(text) => {
                let tls_time = tls_started.elapsed();
                with_log(&self.log, |l| {
                    l.tls = Some(tls_time);
                    l.conn = Some(Arc::new(bare));
                });
                self.fail(FailureReason::Tls, text);
                return Err(ureq::Error::Tls("TLS setup failed"));
            }
        };
        let host = host_port(details.uri).map(|h| h.0).unwrap_or_default();
        stream.deadline = deadline;
        stream.sniff = Some(Vec::new());
        let result = connector.connect(&host, stream);
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        let failure = match result {
            Ok(mut tls) => {
                let tls_time = tls_started.elapsed();
                with_log(&self.log, |l| l.tls = Some(tls_time));
                let (tls_version, cert) = read_facts(&mut tls);
                let facts = ConnFacts {
                    remote,
                    tls_version,
                    cert,
                };
                return Ok((Conn::Tls(Box::new(tls)), facts));
            }
            Err(HandshakeError::Failure(e)) if !expired => {
                let facts = self
                    .reread_certificate(&host, remote, deadline)
                    .unwrap_or(bare);
                let text = format!("TLS handshake with {host} ({remote}) failed: {e}");
                (facts, FailureReason::Tls, text, false)
            }
            // A deadline hit inside the handshake surfaces as a failure or as WouldBlock.
            Err(_) => {
                let text = format!(
                    "TLS handshake with {host} ({remote}) timed out after {}",
                    secs(tls_started.elapsed())
                );
                (bare, FailureReason::Timeout, text, true)
            }
        };
        let (facts, reason, text, timed_out) = failure;
        // The phase covers the failed handshake and any re-read of the certificate.
        let tls_time = tls_started.elapsed();
        with_log(&self.log, |l| {
            l.tls = Some(tls_time);
            l.conn = Some(Arc::new(facts));
            l.timed_out |= timed_out;
        });
        self.fail(reason, text);
        Err(if timed_out {
            ureq::Error::Timeout(details.timeout.reason)
        } else {
            ureq::Error::Tls("TLS handshake failed")
        })
    }

    /// After a failed handshake, what the server showed: a second handshake with verification
    /// off, on a new connection to the same address, within what is left of the deadline.
    /// native-tls drops the certificate with a failed handshake, so this is the only way to
    /// record the facts of the certificate that was refused (the expiry of an expired one). If
    /// this one succeeds, verification was what failed the first; `None` when it fails too
    /// (the server does not speak TLS, or no protocol or cipher in common) or when the target
    /// does not verify anyway.
    fn reread_certificate(
        &self,
        host: &str,
        remote: SocketAddr,
        deadline: Option<Instant>,
    ) -> Option<ConnFacts> {
        if self.tls_key.1 {
            return None;
        }
        let connector = self.tls.get(&(None, true)).ok()?;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let tcp = match left {
            Some(left) if left.is_zero() => return None,
            Some(left) => TcpStream::connect_timeout(&remote, left).ok()?,
            None => TcpStream::connect(remote).ok()?,
        };
        let mut stream = DeadlineStream::new(tcp);
        stream.deadline = deadline;
        stream.sniff = Some(Vec::new());
        let mut tls = connector.connect(host, stream).ok()?;
        let (tls_version, cert) = read_facts(&mut tls);
        let _ = tls.shutdown();
        Some(ConnFacts {
            remote,
            tls_version,
            cert,
        })
    }
}

/// The TLS version (from the ServerHello kept by the handshake) and the leaf certificate.
fn read_facts(tls: &mut TlsStream<DeadlineStream>) -> (Option<&'static str>, Option<CertFacts>) {
    let sniffed = tls.get_mut().sniff.take().unwrap_or_default();
    let cert = tls
        .peer_certificate()
        .ok()
        .flatten()
        .and_then(|c| c.to_der().ok())
        .and_then(|der| x509::cert_facts(&der));
    (server_hello_version(&sniffed), cert)
}

/// Tries each address until one connects. Each address but the last gets half of what is left
/// of the budget, so one black-holed address cannot eat the whole check.
fn connect_any(
    addrs: &[SocketAddr],
    deadline: Option<Instant>,
) -> Result<(TcpStream, SocketAddr), (String, io::Error)> {
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let remaining = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                Some(if i + 1 == addrs.len() { left } else { left / 2 })
            }
            None => None,
        };
        let result = match remaining {
            Some(t) => TcpStream::connect_timeout(addr, t.max(Duration::from_millis(1))),
            None => TcpStream::connect(addr),
        };
        match result {
            Ok(s) => return Ok((s, *addr)),
            Err(e) => {
                let e = if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(io::ErrorKind::TimedOut, "connection timed out")
                } else {
                    e
                };
                last = Some((addr.to_string(), e));
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        let what = addrs
            .first()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "no address".into());
        (
            what,
            io::Error::new(io::ErrorKind::TimedOut, "no time left to connect"),
        )
    }))
}

// ---------------------------------------------------------------------------------------------
// The socket with a hard deadline

/// A TCP stream whose every read and write ends by `deadline`: the socket timeout is set to
/// what is left before each call, so a peer sending one byte a second cannot extend it.
/// During the TLS handshake it also keeps a copy of what the server sent (`sniff`), to read the
/// negotiated version from the ServerHello.
pub struct DeadlineStream {
    tcp: TcpStream,
    deadline: Option<Instant>,
    sniff: Option<Vec<u8>>,
    timed_out: bool,
}

/// The ServerHello comes first from the server; this is plenty and bounds the copy.
const SNIFF_LIMIT: usize = 16 * 1024;

impl DeadlineStream {
    fn new(tcp: TcpStream) -> DeadlineStream {
        DeadlineStream {
            tcp,
            deadline: None,
            sniff: None,
            timed_out: false,
        }
    }

    /// Sets the socket timeout for the next call to what is left; errors once nothing is.
    fn arm(&mut self, write: bool) -> io::Result<()> {
        let left = match self.deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.timed_out = true;
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline reached"));
                }
                Some(left)
            }
        };
        if write {
            self.tcp.set_write_timeout(left)
        } else {
            self.tcp.set_read_timeout(left)
        }
    }

    fn map_err(&mut self, e: io::Error) -> io::Error {
        // A socket timeout shows as WouldBlock (EAGAIN) on Unix.
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            self.timed_out = true;
            io::Error::new(io::ErrorKind::TimedOut, "deadline reached")
        } else {
            e
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.arm(false)?;
            match self.tcp.read(buf) {
                Ok(n) => {
                    if let Some(s) = &mut self.sniff {
                        let room = SNIFF_LIMIT.saturating_sub(s.len());
                        s.extend_from_slice(&buf[..n.min(room)]);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.map_err(e)),
            }
        }
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.arm(true)?;
            match self.tcp.write(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.map_err(e)),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

impl fmt::Debug for DeadlineStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineStream")
            .field("peer", &self.tcp.peer_addr().ok())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Transport

enum Conn {
    Plain(DeadlineStream),
    Tls(Box<TlsStream<DeadlineStream>>),
}

impl Conn {
    fn stream(&mut self) -> &mut DeadlineStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_mut(),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => &s.tcp,
            Conn::Tls(s) => &s.get_ref().tcp,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// One connection as ureq sees it; notes when the request went out and the first response
/// byte came back.
pub struct ProbeTransport {
    conn: Conn,
    buffers: PooledBuffers,
    facts: Arc<ConnFacts>,
    log: SharedLog,
    awaiting_first_byte: bool,
    /// Whether the agent keeps idle connections at all (a `keep_alive` target). When not, the
    /// pool's "still open?" probe before reuse is skipped: it cost three syscalls per check
    /// (two fcntl, one peek) on a connection that is closed right after anyway.
    poolable: bool,
}

impl ProbeTransport {
    fn new(
        conn: Conn,
        buffers: PooledBuffers,
        facts: ConnFacts,
        log: SharedLog,
        poolable: bool,
    ) -> ProbeTransport {
        ProbeTransport {
            conn,
            buffers,
            facts: Arc::new(facts),
            log,
            awaiting_first_byte: false,
            poolable,
        }
    }

    fn error(&mut self, e: io::Error, timeout: NextTimeout) -> ureq::Error {
        let stream = self.conn.stream();
        if stream.timed_out {
            stream.timed_out = false;
            with_log(&self.log, |l| l.timed_out = true);
            ureq::Error::Timeout(timeout.reason)
        } else {
            ureq::Error::Io(e)
        }
    }
}

impl Transport for ProbeTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        self.conn.stream().deadline = deadline_from(timeout);
        // `write_all` by hand, to know how much went out before a timeout.
        let output = &self.buffers.output()[..amount];
        let mut written = 0;
        let mut result = Ok(());
        while written < amount {
            match self.conn.write(&output[written..]) {
                Ok(0) => {
                    result = Err(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let result = result.and_then(|_| self.conn.flush());
        let done = result.is_ok();
        let facts = self.facts.clone();
        with_log(&self.log, |l| {
            l.conn = Some(facts);
            match l.head_bytes {
                None if done => l.head_bytes = Some(amount as u64),
                None => {}
                Some(_) => l.body_sent += written as u64,
            }
            if done {
                l.request_sent = Some(Instant::now());
            }
        });
        if let Err(e) = result {
            return Err(self.error(e, timeout));
        }
        self.awaiting_first_byte = true;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        self.conn.stream().deadline = deadline_from(timeout);
        let input = self.buffers.input_append_buf();
        let amount = match self.conn.read(input) {
            Ok(n) => n,
            Err(e) => return Err(self.error(e, timeout)),
        };
        self.buffers.input_appended(amount);
        if amount > 0 && self.awaiting_first_byte {
            self.awaiting_first_byte = false;
            with_log(&self.log, |l| l.first_byte = Some(Instant::now()));
        }
        Ok(amount > 0)
    }

    /// For keep-alive: a pooled connection is reusable only if the peer has not closed it and
    /// has sent nothing unasked.
    fn is_open(&mut self) -> bool {
        if !self.poolable {
            return false;
        }
        let tcp = self.conn.tcp();
        if tcp.set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 1];
        let open = matches!(tcp.peek(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        tcp.set_nonblocking(false).is_ok() && open
    }

    fn is_tls(&self) -> bool {
        matches!(self.conn, Conn::Tls(_))
    }
}

impl fmt::Debug for ProbeTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeTransport")
            .field("remote", &self.facts.remote)
            .field("tls", &self.is_tls())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// TLS version from the ServerHello

/// The TLS version the server chose, read from the start of what it sent during the
/// handshake: the ServerHello's `supported_versions` extension (TLS 1.3), else its
/// legacy_version field. native-tls does not expose the negotiated version, so we look.
pub fn server_hello_version(bytes: &[u8]) -> Option<&'static str> {
    // Reassemble the first handshake message from the handshake records (type 22) it spans.
    let mut hs: Vec<u8> = Vec::new();
    let mut rest = bytes;
    loop {
        if hs.len() >= 4 {
            let len = u24(&hs[1..4]);
            if hs.len() >= 4 + len {
                break;
            }
        }
        if rest.len() < 5 || rest[0] != 22 {
            return None;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        let fragment = rest.get(5..5 + len)?;
        hs.extend_from_slice(fragment);
        rest = &rest[5 + len..];
    }
    if hs[0] != 2 {
        return None; // not a ServerHello
    }
    let body = &hs[4..4 + u24(&hs[1..4])];
    let legacy = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut pos = 2 + 32; // version, random
    let sid_len = *body.get(pos)? as usize;
    pos += 1 + sid_len + 2 + 1; // session id, cipher suite, compression method
    let mut version = legacy;
    if let Some(ext_len) = body.get(pos..pos + 2) {
        let ext_len = u16::from_be_bytes([ext_len[0], ext_len[1]]) as usize;
        let mut exts = body.get(pos + 2..pos + 2 + ext_len)?;
        while exts.len() >= 4 {
            let kind = u16::from_be_bytes([exts[0], exts[1]]);
            let len = u16::from_be_bytes([exts[2], exts[3]]) as usize;
            let data = exts.get(4..4 + len)?;
            if kind == 43 && len == 2 {
                version = u16::from_be_bytes([data[0], data[1]]);
            }
            exts = &exts[4 + len..];
        }
    }
    match version {
        0x0304 => Some("TLSv1.3"),
        0x0303 => Some("TLSv1.2"),
        0x0302 => Some("TLSv1.1"),
        0x0301 => Some("TLSv1.0"),
        0x0300 => Some("SSLv3"),
        _ => None,
    }
}

fn u24(b: &[u8]) -> usize {
    ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ServerHello record: legacy_version 0x0303, a 32-byte session id, then extensions.
    fn server_hello(extensions: &[u8], split_at: Option<usize>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0xAB; 32]); // random
        body.push(32);
        body.extend_from_slice(&[0xCD; 32]); // session id
        body.extend_from_slice(&[0x13, 0x01, 0x00]); // cipher, compression
        if !extensions.is_empty() {
            body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
            body.extend_from_slice(extensions);
        }
        let mut hs = vec![2];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let record = |frag: &[u8]| {
            let mut r = vec![22, 0x03, 0x03];
            r.extend_from_slice(&(frag.len() as u16).to_be_bytes());
            r.extend_from_slice(frag);
            r
        };
        match split_at {
            None => record(&hs),
            Some(at) => [record(&hs[..at]), record(&hs[at..])].concat(),
        }
    }

    #[test]
    fn reads_the_version_from_a_server_hello() {
        let check = |bytes: &[u8], want: Option<&str>| {
            assert_eq!(server_hello_version(bytes), want, "{bytes:02x?}");
        };
        // key_share (51) then supported_versions (43) = TLS 1.3.
        let tls13 = [0, 51, 0, 2, 0, 29, 0, 43, 0, 2, 3, 4];
        check(&server_hello(&tls13, None), Some("TLSv1.3"));
        check(&server_hello(&tls13, Some(10)), Some("TLSv1.3"));
        check(&server_hello(&[0xff, 0x01, 0, 1, 0], None), Some("TLSv1.2"));
        check(&server_hello(&[], None), Some("TLSv1.2"));
        // An alert, garbage, truncation: no version, no panic.
        check(&[21, 3, 3, 0, 2, 2, 40], None);
        check(b"HTTP/1.1 400 Bad Request\r\n", None);
        let full = server_hello(&tls13, None);
        for len in 0..full.len() {
            assert_eq!(server_hello_version(&full[..len]), None, "prefix {len}");
        }
    }

    #[test]
    fn host_port_strips_brackets_and_defaults_ports() {
        let check = |uri: &str, host: &str, port: u16| {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(host_port(&uri), Some((host.to_string(), port)));
        };
        check("http://[::1]:8080/x", "::1", 8080);
        check("https://example.invalid/", "example.invalid", 443);
        check("http://127.0.0.1/", "127.0.0.1", 80);
    }
}
