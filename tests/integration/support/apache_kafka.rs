//! A throwaway Apache Kafka broker per test, run straight from the jars `scripts/setup-kafka`
//! puts in a local cache: KRaft, one node that is broker and controller, its own data dir
//! formatted first, free 127.0.0.1 ports, a small heap. Killed on drop.
//!
//! The jars are `$SITEWATCH_KAFKA_HOME/$SITEWATCH_KAFKA_VERSION/libs` (defaults
//! `/opt/sitewatch-kafka`, `4.1.1`, as the script). Missing jars fail the test (never skip):
//! CI runs `scripts/setup` first.
//!
//! Listeners: PLAINTEXT always; with `tls`, certificates made for the broker at start
//! ([`KafkaCerts`]) and three more: SSL requiring a client certificate signed by the test CA
//! (server certificate for localhost and 127.0.0.1); WRONGHOST, the same with a certificate
//! that names another host (for hostname verification); and SASL_SSL offering SCRAM-SHA-256,
//! SCRAM-SHA-512 (users created at format time) and PLAIN (users in the listener's JAAS
//! config), all with the password `USER-secret`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::broker::{TempDir, free_port};
use super::certs::KafkaCerts;

/// The SASL users every TLS broker knows (password: `{user}-secret`).
pub const SASL_USERS: &[&str] = &["alice", "bob"];

/// How long a broker may take to format and start on a loaded 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(240);

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Also the SSL and WRONGHOST (client certificate required) and SASL_SSL listeners, with
    /// certificates made at start.
    pub tls: bool,
    /// Which Apache Kafka (a version `scripts/setup-kafka` cached); `None`: [`kafka_version`].
    pub version: Option<&'static str>,
}

pub struct ApacheKafka {
    pub version: String,
    pub plaintext_port: u16,
    pub ssl_port: Option<u16>,
    pub sasl_ssl_port: Option<u16>,
    /// SSL, client certificate required, with a server certificate for `elsewhere.invalid`.
    pub wrong_host_port: Option<u16>,
    /// The certificates of the TLS listeners (and the clients' certificates).
    pub certs: Option<KafkaCerts>,
    child: Option<Child>,
    pub dir: TempDir,
    /// How long format + start took (reported by the tests).
    pub startup: Duration,
    /// Restarts so far (each keeps the log of the run before as `broker.log.N`).
    starts: u32,
}

/// The Apache Kafka version the tests run against unless one asks for another:
/// `$SITEWATCH_KAFKA_VERSION`, else 4.1.1 (as `scripts/setup-kafka`).
pub fn kafka_version() -> String {
    std::env::var("SITEWATCH_KAFKA_VERSION").unwrap_or_else(|_| "4.1.1".into())
}

/// The older line the compatibility subset also runs against (`scripts/setup-kafka` caches
/// it too): the last 3.x, which many managed services still run.
pub const KAFKA_3_9: &str = "3.9.1";

/// `$SITEWATCH_KAFKA_HOME/VERSION/libs` (default home `/opt/sitewatch-kafka`). Missing jars
/// fail the test (never skip): CI runs `scripts/setup` first.
pub fn kafka_libs(version: &str) -> PathBuf {
    let home = std::env::var_os("SITEWATCH_KAFKA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/sitewatch-kafka"));
    let dir = home.join(version);
    assert!(
        dir.join(".complete").is_file(),
        "Apache Kafka {version} jars not found in {}: run scripts/setup-kafka (scripts/setup does)",
        dir.display()
    );
    dir.join("libs")
}

/// `java -cp 'libs/*' -Xmx.. CLASS` with the default version's jars (see [`java_with`]).
pub fn java(class: &str) -> Command {
    java_with(&kafka_version(), class)
}

/// `java -cp 'libs/*' -Xmx.. CLASS` with `version`'s jars, a small heap and one GC thread:
/// five of these share two cores with the tests.
pub fn java_with(version: &str, class: &str) -> Command {
    let mut c = Command::new("java");
    c.arg("-Xmx256m")
        .arg("-Xss512k")
        .arg("-XX:+UseSerialGC")
        .arg("-XX:TieredStopAtLevel=1")
        .arg("-Djava.awt.headless=true")
        .arg("-cp")
        .arg(format!("{}/*", kafka_libs(version).display()))
        .arg(class)
        .stdin(Stdio::null());
    c
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
        let tls_ports = opts.tls.then(|| TlsPorts {
            ssl: free_port(),
            sasl_ssl: free_port(),
            wrong_host: free_port(),
        });
        let certs = opts.tls.then(KafkaCerts::make);
        let mut props = base_properties(dir.path(), 1, &voter(1, controller_port), 1);
        props.push_str(&listeners(plaintext_port, controller_port, tls_ports));
        if let Some(certs) = &certs {
            props.push_str(&tls_properties(dir.path(), certs));
        }
        let props_file = dir.path().join("server.properties");
        std::fs::write(&props_file, props).expect("write server.properties");
        let version = opts.version.map_or_else(kafka_version, String::from);
        format_storage(&version, &props_file, opts.tls);
        let child = spawn_broker(&version, &props_file, &dir.path().join("broker.log"));
        let mut k = ApacheKafka {
            version,
            plaintext_port,
            ssl_port: tls_ports.map(|t| t.ssl),
            sasl_ssl_port: tls_ports.map(|t| t.sasl_ssl),
            wrong_host_port: tls_ports.map(|t| t.wrong_host),
            certs,
            child: Some(child),
            dir,
            startup: Duration::ZERO,
            starts: 0,
        };
        k.wait_started(t + START_DEADLINE);
        k.startup = t.elapsed();
        eprintln!("Apache Kafka {} started in {:?}", k.version, k.startup);
        k
    }

    /// SIGKILL, as in a crash; the data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again (after `kill`) on the same ports and data, and waits until it serves.
    /// Its log goes on in the same file: `wait_started` looks for a second "started" line.
    pub fn restart(&mut self) {
        self.kill();
        let t = Instant::now();
        let props = self.dir.path().join("server.properties");
        let log = self.dir.path().join("broker.log");
        let old = std::fs::read_to_string(&log).unwrap_or_default();
        std::fs::write(
            self.dir.path().join(format!("broker.log.{}", self.starts)),
            old,
        )
        .expect("keep the previous log");
        self.starts += 1;
        self.child = Some(spawn_broker(&self.version, &props, &log));
        self.wait_started(t + START_DEADLINE);
        eprintln!(
            "Apache Kafka {} restarted in {:.1?}",
            self.version,
            t.elapsed()
        );
    }

    fn wait_started(&mut self, deadline: Instant) {
        let ports: Vec<u16> = [
            Some(self.plaintext_port),
            self.ssl_port,
            self.sasl_ssl_port,
            self.wrong_host_port,
        ]
        .into_iter()
        .flatten()
        .collect();
        let log = self.dir.path().join("broker.log");
        wait_started(self.child.as_mut(), &log, &ports, deadline);
    }

    /// `127.0.0.1:PORT` of the PLAINTEXT listener.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.plaintext_port)
    }

    /// The file `name` of the broker's test certificates (a broker started with `tls`).
    pub fn cert(&self, name: &str) -> PathBuf {
        self.certs
            .as_ref()
            .expect("a broker started with tls")
            .path(name)
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
        self.kill();
    }
}

impl super::TestBroker for ApacheKafka {
    fn name(&self) -> String {
        format!("Apache Kafka {}", self.version)
    }

    fn addr(&self) -> String {
        ApacheKafka::addr(self)
    }

    fn kill(&mut self) {
        ApacheKafka::kill(self);
    }

    fn restart(&mut self) {
        ApacheKafka::restart(self);
    }

    fn keeps_data(&self) -> bool {
        true
    }
}

/// `java kafka.Kafka PROPS`, its output to `log`.
fn spawn_broker(version: &str, props: &Path, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("broker log");
    java_with(version, "kafka.Kafka")
        .arg(props)
        .stdout(out.try_clone().expect("log fd"))
        .stderr(out)
        .spawn()
        .expect("start java (a JDK 17+ is needed)")
}

/// Waits for the broker's "Kafka Server started" line in `log` (it accepts TCP earlier than
/// it answers requests) and for every port in `ports` to accept; panics with the log's tail
/// when the process exits first or `deadline` passes.
fn wait_started(mut child: Option<&mut Child>, log: &Path, ports: &[u16], deadline: Instant) {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let wait = deadline.saturating_duration_since(Instant::now());
    let started = super::poll(wait, || {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!(
                "Apache Kafka ({}) exited ({status}) while starting; log tail:\n{}",
                log.display(),
                tail(&read(), 60)
            );
        }
        (read().contains("Kafka Server started")
            && ports.iter().all(|p| {
                TcpStream::connect_timeout(&([127, 0, 0, 1], *p).into(), Duration::from_secs(1))
                    .is_ok()
            }))
        .then_some(())
    });
    if started.is_none() {
        panic!(
            "Apache Kafka ({}) did not start within {START_DEADLINE:?}; log tail:\n{}",
            log.display(),
            tail(&read(), 60)
        );
    }
}

/// `ID@127.0.0.1:PORT`, one entry of `controller.quorum.voters`.
fn voter(id: u32, controller_port: u16) -> String {
    format!("{id}@127.0.0.1:{controller_port}")
}

/// One combined broker + controller (node `id` of the static quorum `voters`), sized for
/// tests: internal topics replicated `replicas` times, no rebalance delay, two network and
/// I/O threads, no automatic topic creation (our CreateTopics is what creates topics).
fn base_properties(dir: &Path, id: u32, voters: &str, replicas: usize) -> String {
    format!(
        "process.roles=broker,controller\n\
         node.id={id}\n\
         controller.quorum.voters={voters}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         log.dirs={data}\n\
         offsets.topic.replication.factor={replicas}\n\
         offsets.topic.num.partitions=3\n\
         transaction.state.log.replication.factor={replicas}\n\
         transaction.state.log.min.isr=1\n\
         share.coordinator.state.topic.replication.factor={replicas}\n\
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

/// The ports of the TLS listeners.
#[derive(Clone, Copy)]
struct TlsPorts {
    ssl: u16,
    sasl_ssl: u16,
    wrong_host: u16,
}

fn listeners(plaintext: u16, controller: u16, tls: Option<TlsPorts>) -> String {
    let (extra, extra_adv, extra_map) = match tls {
        // Advertised as localhost: what a client checks the certificate against.
        Some(TlsPorts {
            ssl,
            sasl_ssl,
            wrong_host,
        }) => (
            format!(
                ",SSL://127.0.0.1:{ssl},SASL_SSL://127.0.0.1:{sasl_ssl},\
                 WRONGHOST://127.0.0.1:{wrong_host}"
            ),
            format!(
                ",SSL://localhost:{ssl},SASL_SSL://localhost:{sasl_ssl},\
                 WRONGHOST://localhost:{wrong_host}"
            ),
            ",SSL:SSL,SASL_SSL:SASL_SSL,WRONGHOST:SSL",
        ),
        None => (String::new(), String::new(), ""),
    };
    format!(
        "listeners=PLAINTEXT://127.0.0.1:{plaintext},CONTROLLER://127.0.0.1:{controller}{extra}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{plaintext}{extra_adv}\n\
         listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{extra_map}\n"
    )
}

/// `NAME.pem` and `NAME.key` of `certs` as a PKCS#12 keystore made with openssl (no keytool,
/// no JKS), in `dir`.
fn keystore(dir: &Path, certs: &KafkaCerts, name: &str) -> PathBuf {
    let keystore = dir.join(format!("{name}.p12"));
    run_ok(
        "openssl pkcs12 -export",
        Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:keystore-pass", "-in"])
            .arg(certs.path(&format!("{name}.pem")))
            .arg("-inkey")
            .arg(certs.path(&format!("{name}.key")))
            .arg("-out")
            .arg(&keystore),
    );
    keystore
}

/// The SSL, WRONGHOST and SASL_SSL listeners. The truststore is the CA's PEM file, which Java
/// reads directly. Client certificates are required on SSL and WRONGHOST only: on SASL_SSL
/// the password is the credential.
fn tls_properties(dir: &Path, certs: &KafkaCerts) -> String {
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
         listener.name.wronghost.ssl.client.auth=required\n\
         listener.name.wronghost.ssl.keystore.type=PKCS12\n\
         listener.name.wronghost.ssl.keystore.location={wrong_host}\n\
         listener.name.wronghost.ssl.keystore.password=keystore-pass\n\
         listener.name.wronghost.ssl.key.password=keystore-pass\n\
         listener.name.wronghost.ssl.truststore.type=PEM\n\
         listener.name.wronghost.ssl.truststore.location={ca}\n\
         sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN\n\
         listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN\n\
         listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
         listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
         listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required{plain_users};\n",
        keystore = keystore(dir, certs, "server").display(),
        wrong_host = keystore(dir, certs, "wrong-host").display(),
        ca = certs.path("ca.pem").display(),
    )
}

/// `StorageTool format` with a fixed cluster id (each broker has its own data dir) and, for a
/// TLS broker, the SCRAM users.
fn format_storage(version: &str, props: &Path, scram_users: bool) {
    let mut cmd = java_with(version, "kafka.tools.StorageTool");
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

/// How quickly the cluster notices a node that died without a word (kill -9). The default
/// session timeout (9 s) alone would keep a dead leader in the metadata for 9 s: longer than
/// the 5 s our resumption goal allows. 3 s of silence (six missed 500 ms heartbeats) is
/// still far above the pauses a loaded 2-core machine makes.
/// Also: records carry the time the leader appended them (LogAppendTime), so a test can
/// read from the log itself how long a partition took no records.
const CLUSTER_LIVENESS: &str = "broker.session.timeout.ms=3000\n\
     broker.heartbeat.interval.ms=500\n\
     controller.quorum.fetch.timeout.ms=2000\n\
     controller.quorum.election.timeout.ms=1000\n\
     log.message.timestamp.type=LogAppendTime\n";

/// One node of an [`ApacheKafkaCluster`]: broker and controller in one process, its own data
/// dir and ports, which stay the same across restarts.
pub struct ClusterNode {
    pub id: i32,
    pub port: u16,
    controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// How many times it was started: each start logs to its own `broker-N.log`.
    starts: u32,
}

impl ClusterNode {
    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("broker-{}.log", self.starts))
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is running", self.id);
        self.starts += 1;
        self.child = Some(spawn_broker(
            &kafka_version(),
            &self.dir.join("server.properties"),
            &self.log_path(),
        ));
    }

    fn wait_started(&mut self, deadline: Instant) {
        let log = self.log_path();
        let ports = [self.port, self.controller_port];
        wait_started(self.child.as_mut(), &log, &ports, deadline);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `127.0.0.1:PORT` of the PLAINTEXT listener.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_tail(&self) -> String {
        tail(
            &std::fs::read_to_string(self.log_path()).unwrap_or_default(),
            60,
        )
    }
}

/// A KRaft cluster of `n` nodes, each broker and controller, one static quorum of all of
/// them, topics replicated `n` times by default with `min.insync.replicas = n - 1`. Nodes
/// can be killed (SIGKILL), stopped (SIGTERM: a controlled shutdown that hands leadership
/// over) and started again on the same ports and data. All killed on drop.
pub struct ApacheKafkaCluster {
    pub nodes: Vec<ClusterNode>,
    pub dir: TempDir,
    pub startup: Duration,
}

impl ApacheKafkaCluster {
    pub fn start(n: usize) -> ApacheKafkaCluster {
        assert!(n >= 2, "a cluster has at least two nodes");
        let t = Instant::now();
        let dir = TempDir::new("apache-kafka-cluster");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| voter(i as u32 + 1, p.1))
            .collect();
        let mut nodes: Vec<ClusterNode> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, controller_port))| {
                let id = i as u32 + 1;
                let node_dir = dir.path().join(format!("node-{id}"));
                std::fs::create_dir_all(&node_dir).expect("node dir");
                let mut props = base_properties(&node_dir, id, &voters.join(","), n);
                props.push_str(&listeners(port, controller_port, None));
                props.push_str(&format!(
                    "default.replication.factor={n}\nmin.insync.replicas={}\n{CLUSTER_LIVENESS}",
                    n - 1
                ));
                std::fs::write(node_dir.join("server.properties"), props)
                    .expect("write server.properties");
                ClusterNode {
                    id: id as i32,
                    port,
                    controller_port,
                    dir: node_dir,
                    child: None,
                    starts: 0,
                }
            })
            .collect();
        // Formatting is a JVM start each: do them side by side. The same cluster id for all.
        std::thread::scope(|s| {
            for node in &nodes {
                let props = node.dir.join("server.properties");
                s.spawn(move || format_storage(&kafka_version(), &props, false));
            }
        });
        // No node finishes starting before a quorum of controllers is up: start all, then wait.
        let mut cluster = ApacheKafkaCluster {
            nodes: Vec::new(),
            dir,
            startup: Duration::ZERO,
        };
        for node in &mut nodes {
            node.spawn();
        }
        cluster.nodes = nodes;
        let deadline = t + START_DEADLINE;
        for node in &mut cluster.nodes {
            node.wait_started(deadline);
        }
        cluster.startup = t.elapsed();
        eprintln!(
            "Apache Kafka cluster of {n} started in {:?}",
            cluster.startup
        );
        cluster
    }

    /// Every node's PLAINTEXT address: the bootstrap list.
    pub fn bootstrap(&self) -> Vec<String> {
        self.nodes.iter().map(ClusterNode::addr).collect()
    }

    pub fn node(&mut self, id: i32) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// SIGKILL: the node dies without a word, as in a crash.
    pub fn kill(&mut self, id: i32) {
        let mut child = self.node(id).child.take().expect("node is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM: a controlled shutdown (leadership handed over first). Returns at once; see
    /// [`ApacheKafkaCluster::wait_stopped`].
    pub fn terminate(&mut self, id: i32) {
        let node = self.node(id);
        let pid = node.child.as_ref().expect("node is running").id();
        run_ok(
            "kill -TERM",
            Command::new("kill").args(["-TERM", &pid.to_string()]),
        );
    }

    /// Waits for a terminated node to exit; SIGKILL and panic after `within`.
    pub fn wait_stopped(&mut self, id: i32, within: Duration) {
        let mut child = self.node(id).child.take().expect("node is running");
        if super::poll(within, || child.try_wait().expect("wait")).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("node {id} did not stop within {within:?} of SIGTERM");
        }
    }

    /// Starts a stopped or killed node again (same ports, same data) and waits until it
    /// serves.
    pub fn restart(&mut self, id: i32) {
        let t = Instant::now();
        let node = self.node(id);
        node.spawn();
        node.wait_started(t + START_DEADLINE);
        eprintln!("node {id} restarted in {:.1?}", t.elapsed());
    }
}

impl Drop for ApacheKafkaCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
