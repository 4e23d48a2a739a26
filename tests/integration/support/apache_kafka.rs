//! A throwaway Apache Kafka broker per test, run straight from the jars `scripts/setup-kafka`
//! puts in a local cache: KRaft, one node that is broker and controller, its own data dir
//! formatted first, free 127.0.0.1 ports, a small heap. Killed on drop.
//!
//! The jars are `$SITEWATCH_KAFKA_HOME/$SITEWATCH_KAFKA_VERSION/libs` (defaults
//! `/opt/sitewatch-kafka`, `4.1.1`, as the script). Missing jars fail the test (never skip):
//! CI runs `scripts/setup` first.
//!
//! Listeners: PLAINTEXT always; with `tls`, SSL requiring a client certificate signed by the
//! test CA (`tests/fixtures/kafka-tls`, whose server certificate names `localhost` only) and
//! SASL_SSL offering SCRAM-SHA-256, SCRAM-SHA-512 (users created at format time) and PLAIN
//! (users in the listener's JAAS config), all with the password `USER-secret`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::broker::{TempDir, free_port};

/// The SASL users every TLS broker knows (password: `{user}-secret`).
pub const SASL_USERS: &[&str] = &["alice", "bob"];

/// How long a broker may take to format and start on a loaded 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Also the SSL (client certificate required) and SASL_SSL listeners.
    pub tls: bool,
}

pub struct ApacheKafka {
    pub plaintext_port: u16,
    pub ssl_port: Option<u16>,
    pub sasl_ssl_port: Option<u16>,
    child: Option<Child>,
    pub dir: TempDir,
    /// How long format + start took (reported by the tests).
    pub startup: Duration,
}

pub fn kafka_libs() -> PathBuf {
    let home = std::env::var_os("SITEWATCH_KAFKA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/sitewatch-kafka"));
    let version = std::env::var("SITEWATCH_KAFKA_VERSION").unwrap_or_else(|_| "4.1.1".into());
    let dir = home.join(version);
    assert!(
        dir.join(".complete").is_file(),
        "Apache Kafka jars not found in {}: run scripts/setup-kafka (scripts/setup does)",
        dir.display()
    );
    dir.join("libs")
}

/// `java -cp 'libs/*' -Xmx.. CLASS`, with a small heap and one GC thread: five of these share
/// two cores with the tests.
pub fn java(class: &str) -> Command {
    let mut c = Command::new("java");
    c.arg("-Xmx256m")
        .arg("-Xss512k")
        .arg("-XX:+UseSerialGC")
        .arg("-XX:TieredStopAtLevel=1")
        .arg("-Djava.awt.headless=true")
        .arg("-cp")
        .arg(format!("{}/*", kafka_libs().display()))
        .arg(class)
        .stdin(Stdio::null());
    c
}

/// `tests/fixtures/kafka-tls/NAME`.
pub fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/kafka-tls")
        .join(name)
}

/// Runs `cmd` to completion; panics with its output on failure.
pub fn run_ok(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr), 60)
    );
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl ApacheKafka {
    pub fn start(opts: Options) -> ApacheKafka {
        let t = Instant::now();
        let dir = TempDir::new("apache-kafka");
        let plaintext_port = free_port();
        let controller_port = free_port();
        let (ssl_port, sasl_ssl_port) = if opts.tls {
            (Some(free_port()), Some(free_port()))
        } else {
            (None, None)
        };
        let tls_ports = ssl_port.zip(sasl_ssl_port);
        let mut props = base_properties(dir.path(), controller_port);
        props.push_str(&listeners(plaintext_port, controller_port, tls_ports));
        if tls_ports.is_some() {
            props.push_str(&tls_properties(dir.path()));
        }
        let props_file = dir.path().join("server.properties");
        std::fs::write(&props_file, props).expect("write server.properties");
        format_storage(&props_file, opts.tls);
        let log = std::fs::File::create(dir.path().join("broker.log")).expect("broker log");
        let child = java("kafka.Kafka")
            .arg(&props_file)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start java (a JDK 17+ is needed)");
        let mut k = ApacheKafka {
            plaintext_port,
            ssl_port,
            sasl_ssl_port,
            child: Some(child),
            dir,
            startup: Duration::ZERO,
        };
        k.wait_started(t + START_DEADLINE);
        k.startup = t.elapsed();
        eprintln!("Apache Kafka started in {:?}", k.startup);
        k
    }

    /// Waits for the broker's "Kafka Server started" line (it accepts TCP earlier than it
    /// answers requests) and for every listener to accept.
    fn wait_started(&mut self, deadline: Instant) {
        let ports: Vec<u16> = [Some(self.plaintext_port), self.ssl_port, self.sasl_ssl_port]
            .into_iter()
            .flatten()
            .collect();
        loop {
            let started = self.log().contains("Kafka Server started");
            if started
                && ports.iter().all(|p| {
                    TcpStream::connect_timeout(&([127, 0, 0, 1], *p).into(), Duration::from_secs(1))
                        .is_ok()
                })
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "Apache Kafka exited ({status}) while starting; log tail:\n{}",
                    tail(&self.log(), 60)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "Apache Kafka did not start within {START_DEADLINE:?}; log tail:\n{}",
                    tail(&self.log(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:PORT` of the PLAINTEXT listener.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.plaintext_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log(), 60)
    }
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One combined broker + controller (node 1, a static one-voter quorum), sized for tests:
/// replication factor 1 for the internal topics, no rebalance delay, two network and I/O
/// threads, no automatic topic creation (our CreateTopics is what creates topics).
fn base_properties(dir: &Path, controller: u16) -> String {
    format!(
        "process.roles=broker,controller\n\
         node.id=1\n\
         controller.quorum.voters=1@127.0.0.1:{controller}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         log.dirs={data}\n\
         offsets.topic.replication.factor=1\n\
         offsets.topic.num.partitions=3\n\
         transaction.state.log.replication.factor=1\n\
         transaction.state.log.min.isr=1\n\
         share.coordinator.state.topic.replication.factor=1\n\
         share.coordinator.state.topic.min.isr=1\n\
         group.initial.rebalance.delay.ms=0\n\
         auto.create.topics.enable=false\n\
         num.network.threads=2\n\
         num.io.threads=2\n\
         num.recovery.threads.per.data.dir=1\n\
         log.cleaner.enable=false\n",
        data = dir.join("data").display()
    )
}

fn listeners(plaintext: u16, controller: u16, tls: Option<(u16, u16)>) -> String {
    let (extra, extra_adv, extra_map) = match tls {
        // Advertised as localhost: the server certificate names localhost only.
        Some((ssl, sasl)) => (
            format!(",SSL://127.0.0.1:{ssl},SASL_SSL://127.0.0.1:{sasl}"),
            format!(",SSL://localhost:{ssl},SASL_SSL://localhost:{sasl}"),
            ",SSL:SSL,SASL_SSL:SASL_SSL",
        ),
        None => (String::new(), String::new(), ""),
    };
    format!(
        "listeners=PLAINTEXT://127.0.0.1:{plaintext},CONTROLLER://127.0.0.1:{controller}{extra}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{plaintext}{extra_adv}\n\
         listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{extra_map}\n"
    )
}

/// The SSL and SASL_SSL listeners. The server key and certificate go into a PKCS#12 keystore
/// made with openssl (no keytool, no JKS); the truststore is the CA's PEM file, which Java
/// reads directly. Client certificates are required on SSL only: on SASL_SSL the password is
/// the credential.
fn tls_properties(dir: &Path) -> String {
    let keystore = dir.join("server.p12");
    run_ok(
        "openssl pkcs12 -export",
        Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:keystore-pass", "-in"])
            .arg(tls_fixture("server.pem"))
            .arg("-inkey")
            .arg(tls_fixture("server.key"))
            .arg("-out")
            .arg(&keystore),
    );
    let plain_users: String = SASL_USERS
        .iter()
        .map(|u| format!(" user_{u}=\"{u}-secret\""))
        .collect();
    format!(
        "ssl.keystore.type=PKCS12\n\
         ssl.keystore.location={keystore}\n\
         ssl.keystore.password=keystore-pass\n\
         ssl.key.password=keystore-pass\n\
         ssl.truststore.type=PEM\n\
         ssl.truststore.location={ca}\n\
         listener.name.ssl.ssl.client.auth=required\n\
         sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN\n\
         listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN\n\
         listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
         listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
         listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required{plain_users};\n",
        keystore = keystore.display(),
        ca = tls_fixture("ca.pem").display(),
    )
}

/// `StorageTool format` with a fixed cluster id (each broker has its own data dir) and, for a
/// TLS broker, the SCRAM users.
fn format_storage(props: &Path, scram_users: bool) {
    let mut cmd = java("kafka.tools.StorageTool");
    cmd.args(["format", "-t", "c2l0ZXdhdGNoLXRlc3RzMQ", "-c"])
        .arg(props);
    if scram_users {
        for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
            for u in SASL_USERS {
                cmd.arg("--add-scram")
                    .arg(format!("{mechanism}=[name={u},password={u}-secret]"));
            }
        }
    }
    run_ok("kafka.tools.StorageTool format", &mut cmd);
}
