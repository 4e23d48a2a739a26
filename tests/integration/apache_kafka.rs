//! Our Kafka client, and `sitewatch agent`, against Apache Kafka itself (4.x, KRaft, from the
//! jars `scripts/setup-kafka` caches): records cross both ways with Kafka's own console
//! producer and consumer; TLS with a required client certificate; SASL_SSL with SCRAM-SHA-512,
//! SCRAM-SHA-256 and PLAIN; the refusals each say what is wrong; `sitewatch agent` and
//! `sitewatch sink` over TLS with a client certificate.
//!
//! A compatibility subset (version negotiation and a round trip, TLS client certificates,
//! SASL, agent and sink over TLS) runs against 3.9 too: `apache_kafka::kafka_4::NAME` and
//! `apache_kafka::kafka_3_9::NAME`. The certificates are made by each test's broker
//! (`support::certs`).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sitewatch::config::{Compression, Config, KafkaConfig, KafkaTls, Sasl, SaslMechanism, Secret};
use sitewatch::kafka::{Client, KafkaError, ProduceRecord, partition_for_key};
use sitewatch::result::CheckResult;

use crate::kafka::{check_topic_content, fetch_all, record};
use crate::support::apache_kafka::{ApacheKafka, Options, java, run_ok};
use crate::support::broker::kafka_config;
use crate::support::http::{HttpServer, Reply};
use crate::support::pg::TestDb;
use crate::support::{TempDir, wait_for};

/// One record as Kafka's console consumer prints it with timestamp, partition, headers, key.
#[derive(Debug)]
struct ConsoleRecord {
    timestamp_ms: i64,
    partition: i32,
    headers: String,
    key: String,
    value: String,
}

/// Reads `n` records of `topic` from the beginning with Kafka's ConsoleConsumer.
fn java_consume(bootstrap: &str, topic: &str, n: usize) -> Vec<ConsoleRecord> {
    let out = run_ok(
        "ConsoleConsumer",
        java("org.apache.kafka.tools.consumer.ConsoleConsumer")
            .args(["--bootstrap-server", bootstrap, "--topic", topic])
            .args(["--from-beginning", "--max-messages", &n.to_string()])
            .args(["--timeout-ms", "60000"])
            .args(["--property", "print.timestamp=true"])
            .args(["--property", "print.partition=true"])
            .args(["--property", "print.headers=true"])
            .args(["--property", "print.key=true"]),
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, '\t').collect();
            assert_eq!(f.len(), 5, "{l}");
            ConsoleRecord {
                timestamp_ms: f[0].strip_prefix("CreateTime:").expect(l).parse().unwrap(),
                partition: f[1].strip_prefix("Partition:").expect(l).parse().unwrap(),
                headers: f[2].to_string(),
                key: f[3].to_string(),
                value: f[4].to_string(),
            }
        })
        .collect()
}

/// Produces `headers \t key \t value` lines with Kafka's ConsoleProducer.
fn java_produce(bootstrap: &str, topic: &str, lines: &str, gzip: bool) {
    let mut cmd = java("org.apache.kafka.tools.ConsoleProducer");
    cmd.args(["--bootstrap-server", bootstrap, "--topic", topic])
        .args(["--property", "parse.key=true"])
        .args(["--property", "parse.headers=true"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if gzip {
        cmd.args(["--compression-codec", "gzip"]);
    }
    let mut child = cmd.spawn().expect("start ConsoleProducer");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .expect("feed ConsoleProducer");
    let out = child.wait_with_output().expect("ConsoleProducer");
    assert!(
        out.status.success(),
        "ConsoleProducer: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn index_of(value: &str) -> usize {
    value[5..value.find(',').unwrap()].parse().unwrap()
}

/// `on_kafka_4_and_3_9!(NAME, ...)`: for each `fn NAME(version: Option<&'static str>)`, the
/// tests `kafka_4::NAME` (the default version, `None`) and `kafka_3_9::NAME` (3.9.x).
macro_rules! on_kafka_4_and_3_9 {
    ($($name:ident),* $(,)?) => {
        mod kafka_4 {
            $(#[test]
            fn $name() {
                super::$name(None);
            })*
        }
        mod kafka_3_9 {
            $(#[test]
            fn $name() {
                super::$name(Some(crate::support::apache_kafka::KAFKA_3_9));
            })*
        }
    };
}

on_kafka_4_and_3_9!(
    version_negotiation_and_round_trip,
    tls_client_certificate,
    sasl_ssl_scram_and_plain,
    agent_and_sink_over_tls_client_certificate,
);

/// Starts a broker of `version` (`None`: the default), with TLS listeners or not.
fn start(version: Option<&'static str>, tls: bool) -> ApacheKafka {
    ApacheKafka::start(Options { tls, version })
}

/// The versions we pick against this broker, logged at debug by the client and printed here;
/// every API the agent and sink use is there (a broker lacking one is refused at connect,
/// naming it: see `kafka::conn`'s unit tests). Then records cross plain and gzip.
fn version_negotiation_and_round_trip(version: Option<&'static str>) {
    let kafka = start(version, false);
    let addr = kafka.addr();
    let mut c = Client::connect(&kafka_config(vec![addr.clone()], "x")).expect("connect");
    let versions = sitewatch::kafka::conn::Versions {
        broker: c.broker_versions().expect("ApiVersions"),
    };
    let picked = versions.negotiated(&addr).expect("every API we need");
    eprintln!("Apache Kafka {}: we use {picked:?}", kafka.version);
    for api in [
        "Produce",
        "Fetch",
        "ListOffsets",
        "Metadata",
        "CreateTopics",
        "SaslHandshake",
        "SaslAuthenticate",
    ] {
        assert!(
            picked.iter().any(|(name, _)| *name == api),
            "{api} missing: {picked:?}"
        );
    }
    for (topic, codec) in [
        ("rt-plain", Compression::None),
        ("rt-gzip", Compression::Gzip),
    ] {
        let mut cfg = kafka_config(vec![addr.clone()], topic);
        cfg.compression = codec;
        round_trip(&cfg, topic);
    }
}

#[test]
fn records_cross_both_ways_with_kafkas_own_console_clients() {
    let kafka = ApacheKafka::start(Options::default());
    let addr = kafka.addr();
    let mut c = Client::connect(&kafka_config(vec![addr.clone()], "x")).expect("connect");
    let mut versions: Vec<_> = c.broker_versions().unwrap().into_iter().collect();
    versions.sort();
    eprintln!("Apache Kafka advertises (api key, (min, max)): {versions:?}");
    let n = 500;
    for (topic, codec) in [
        ("ours-plain", Compression::None),
        ("ours-gzip", Compression::Gzip),
    ] {
        let mut cfg = kafka_config(vec![addr.clone()], topic);
        cfg.compression = codec;
        let mut ours = Client::connect(&cfg).expect("connect");
        ours.ensure_topic(topic, 3, 1).expect("create");
        let recs: Vec<ProduceRecord> = (0..n).map(record).collect();
        for chunk in recs.chunks(100) {
            ours.produce(topic, chunk).expect("produce");
        }
        check_topic_content(&fetch_all(&mut ours, topic), n, 3);
        let mut seen = BTreeSet::new();
        for r in java_consume(&addr, topic, n) {
            let i = index_of(&r.value);
            let want = record(i);
            assert_eq!(r.key.as_bytes(), &want.key[..], "{topic}: key of {i}");
            assert_eq!(r.value.as_bytes(), &want.value[..], "{topic}: value of {i}");
            assert_eq!(r.timestamp_ms, want.timestamp_ms, "{topic}: timestamp");
            assert_eq!(r.partition, partition_for_key(&want.key, 3), "{topic}");
            // We write no headers, and Kafka reads none.
            assert_eq!(r.headers, "NO_HEADERS", "{topic}");
            assert!(seen.insert(i), "{topic}: {i} twice");
        }
        assert_eq!(seen.len(), n, "{topic}: the console consumer read all");
    }

    // The other way: Kafka's producer (its default partitioner is murmur2 on the key, as
    // ours), with headers, which our decoder must step over to reach key and value.
    let input: String = (0..n)
        .map(|i| {
            let r = record(i);
            format!(
                "trace:t{i},origin:java\t{}\t{}\n",
                String::from_utf8(r.key).unwrap(),
                String::from_utf8(r.value).unwrap()
            )
        })
        .collect();
    for (topic, gzip) in [("theirs-plain", false), ("theirs-gzip", true)] {
        c.ensure_topic(topic, 3, 1).expect("create");
        java_produce(&addr, topic, &input, gzip);
        let got = fetch_all(&mut c, topic);
        let mut seen = BTreeSet::new();
        for (p, recs) in &got {
            for r in recs {
                let key = r.key.clone().expect("key");
                let value = String::from_utf8(r.value.clone().expect("value")).unwrap();
                let i = index_of(&value);
                assert_eq!(key, record(i).key, "{topic}");
                assert_eq!(value.as_bytes(), &record(i).value[..], "{topic}");
                assert_eq!(partition_for_key(&key, 3), *p, "{topic}: Java's partition");
                assert!(seen.insert(i), "{topic}: {i} twice");
            }
        }
        assert_eq!(
            seen.len(),
            n,
            "{topic}: we read all the Java producer wrote"
        );
    }
}

/// TLS settings trusting the broker's test CA, with a client certificate and key from the
/// broker's test set (see `support::certs`) or none.
fn tls(kafka: &ApacheKafka, cert: Option<(&str, &str)>) -> KafkaTls {
    KafkaTls {
        ca_file: Some(kafka.cert("ca.pem")),
        cert_file: cert.map(|c| kafka.cert(c.0)),
        key_file: cert.map(|c| kafka.cert(c.1)),
        verify_hostname: true,
    }
}

fn connect_err(cfg: &KafkaConfig) -> KafkaError {
    match Client::connect(cfg) {
        Err(e) => e,
        Ok(_) => panic!("connected, but expected a refusal"),
    }
}

/// Creates `topic`, produces 200 records and reads them back, all over `cfg`'s connection.
fn round_trip(cfg: &KafkaConfig, topic: &str) {
    let mut c = Client::connect(cfg).unwrap_or_else(|e| panic!("connect: {e}"));
    c.ensure_topic(topic, 2, 1).expect("create");
    let recs: Vec<ProduceRecord> = (0..200).map(record).collect();
    c.produce(topic, &recs).expect("produce");
    check_topic_content(&fetch_all(&mut c, topic), 200, 2);
}

fn tls_client_certificate(version: Option<&'static str>) {
    let kafka = start(version, true);
    let at_port = |host: &str, port: u16, t: KafkaTls| {
        let mut cfg = kafka_config(vec![format!("{host}:{port}")], "tls");
        cfg.tls = Some(t);
        cfg.request_timeout = Duration::from_secs(10);
        cfg
    };
    let ssl = kafka.ssl_port.unwrap();
    let at = |host: &str, t: KafkaTls| at_port(host, ssl, t);
    let client = Some(("client.pem", "client.key"));
    // PKCS#8 and PKCS#1 keys, hostname checked (the broker advertises localhost).
    for (key, topic) in [("client.key", "tls-pkcs8"), ("client-rsa.key", "tls-pkcs1")] {
        round_trip(
            &at("localhost", tls(&kafka, Some(("client.pem", key)))),
            topic,
        );
    }
    // The server certificate names 127.0.0.1 too.
    Client::connect(&at("127.0.0.1", tls(&kafka, client)))
        .unwrap_or_else(|e| panic!("127.0.0.1 is in the certificate: {e}"));

    let mut refusals = Vec::new();
    // Hostname verification is on by default: this listener's certificate (same CA) names
    // elsewhere.invalid.
    let wrong_host = kafka.wrong_host_port.unwrap();
    let err = connect_err(&at_port("localhost", wrong_host, tls(&kafka, client)));
    refusals.push(("hostname", err.to_string()));
    assert!(matches!(err, KafkaError::Tls { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("certificate does not name localhost"),
        "{err}"
    );
    // ... which verify_hostname = false accepts (the CA is still checked).
    let mut lax = tls(&kafka, client);
    lax.verify_hostname = false;
    Client::connect(&at_port("localhost", wrong_host, lax))
        .unwrap_or_else(|e| panic!("verify_hostname = false: {e}"));
    // A client certificate from another CA.
    let err = connect_err(&at(
        "localhost",
        tls(&kafka, Some(("other-client.pem", "other-client.key"))),
    ));
    refusals.push(("other CA", err.to_string()));
    assert!(matches!(err, KafkaError::Tls { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("does not trust our client certificate"),
        "{err}"
    );
    // A server certificate from a CA we do not trust.
    let mut distrust = tls(&kafka, client);
    distrust.ca_file = Some(kafka.cert("other-ca.pem"));
    let err = connect_err(&at("localhost", distrust));
    refusals.push(("server from another CA", err.to_string()));
    assert!(matches!(err, KafkaError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("TLS handshake failed"), "{err}");
    // No client certificate and key at all.
    let err = connect_err(&at("localhost", tls(&kafka, None)));
    refusals.push(("no client certificate", err.to_string()));
    assert!(matches!(err, KafkaError::Tls { .. }), "{err}");
    assert!(
        err.to_string().contains("requires a client certificate"),
        "{err}"
    );
    // A certificate without its key: refused before any connection.
    let mut half = tls(&kafka, client);
    half.key_file = None;
    let err = connect_err(&at("localhost", half));
    refusals.push(("no key_file", err.to_string()));
    assert!(err.to_string().contains("key_file"), "{err}");
    // A key file that is not there: named.
    let mut gone = tls(&kafka, client);
    gone.key_file = Some(kafka.dir.path().join("no-such-client.key"));
    let err = connect_err(&at("localhost", gone));
    refusals.push(("key file missing", err.to_string()));
    assert!(matches!(err, KafkaError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("no-such-client.key"), "{err}");
    // Plaintext against the TLS listener.
    let mut plain = at("localhost", tls(&kafka, None));
    plain.tls = None;
    let err = connect_err(&plain);
    refusals.push(("plaintext to TLS", err.to_string()));
    assert!(err.to_string().contains("TLS listener"), "{err}");
    for (case, text) in refusals {
        eprintln!("Apache Kafka {}: {case}: {text}", kafka.version);
    }
}

fn sasl(mechanism: SaslMechanism, user: &str, password: &str) -> Sasl {
    Sasl {
        mechanism,
        username: user.into(),
        password: Secret(password.into()),
    }
}

fn sasl_ssl_scram_and_plain(version: Option<&'static str>) {
    let kafka = start(version, true);
    let port = kafka.sasl_ssl_port.unwrap();
    let at = |s: Sasl| {
        let mut cfg = kafka_config(vec![format!("localhost:{port}")], "sasl");
        cfg.tls = Some(tls(&kafka, None));
        cfg.sasl = Some(s);
        cfg.request_timeout = Duration::from_secs(10);
        cfg
    };
    use SaslMechanism::{Plain, ScramSha256, ScramSha512};
    for (mechanism, user) in [
        (ScramSha512, "alice"),
        (ScramSha256, "bob"),
        (Plain, "alice"),
    ] {
        let topic = format!("sasl-{mechanism:?}").to_lowercase();
        round_trip(
            &at(sasl(mechanism, user, &format!("{user}-secret"))),
            &topic,
        );
        let wrong = "not-the-password-42";
        let err = connect_err(&at(sasl(mechanism, user, wrong)));
        let text = err.to_string();
        eprintln!("{mechanism:?} wrong password: {text}");
        assert!(
            matches!(err, KafkaError::Auth(_)) && !err.is_retriable(),
            "{mechanism:?}: {text}"
        );
        assert!(text.contains("authentication failed"), "{text}");
        assert!(!text.contains(wrong) && !format!("{err:?}").contains(wrong));
    }
}

/// `sitewatch agent` publishes and `sitewatch sink` consumes, both over TLS with a client
/// certificate: every check the agent made is a row in PostgreSQL exactly once. No outage is
/// logged: `spool_after` is 5 s here, as a request of over a second (the default) is no
/// outage on this loaded machine (3.9.1 once took 1.01 s for its first produce).
fn agent_and_sink_over_tls_client_certificate(version: Option<&'static str>) {
    let kafka = start(version, true);
    let up = HttpServer::start(|_, _| Reply::status(200, "hello"));
    let db = TestDb::create();
    let dir = TempDir::new("agent-apache-kafka");
    let config = dir.path().join("agent.toml");
    let text = format!(
        "[agent]\nid = \"ak\"\ninterval = \"300ms\"\ntimeout = \"2s\"\njitter = \"0%\"\n\
         drain_timeout = \"10s\"\nstate_dir = \"{state}\"\n\
         [kafka]\nbrokers = [\"localhost:{port}\"]\ntopic = \"checks.ak\"\npartitions = 2\n\
         linger = \"20ms\"\nspool_after = \"5s\"\n\
         [kafka.tls]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
         [postgres]\nurl = \"{pg}\"\nsslmode = \"disable\"\n\
         [[target]]\nid = \"up\"\nurl = \"{url}\"\n",
        state = dir.path().join("state").display(),
        port = kafka.ssl_port.unwrap(),
        ca = kafka.cert("ca.pem").display(),
        cert = kafka.cert("client.pem").display(),
        key = kafka.cert("client.key").display(),
        pg = db.url(),
        url = up.url("/"),
    );
    std::fs::write(&config, &text).unwrap();
    let parsed = Config::parse(&text, &config, &|_| None).expect("config");
    sitewatch::sink::init_db(&parsed).expect("init-db");

    let agent = crate::agent::start_agent(&config);
    let reader = kafka_config(vec![kafka.addr()], "checks.ak");
    let count = || -> usize {
        let Ok(mut c) = Client::connect(&reader) else {
            return 0;
        };
        if c.partitions("checks.ak").is_err() {
            return 0;
        }
        fetch_all(&mut c, "checks.ak").values().map(Vec::len).sum()
    };
    let t = Instant::now();
    wait_for(
        "three checks in Apache Kafka",
        Duration::from_secs(60),
        || count() >= 3,
    );
    eprintln!("first three checks arrived after {:?}", t.elapsed());
    let stderr = crate::agent::stop_agent(agent, Duration::from_secs(20));
    let made = crate::agent::checks_made(&stderr);
    assert!(!stderr.contains("Kafka unavailable"), "{stderr}");
    let mut c = Client::connect(&reader).expect("connect");
    let mut ids = BTreeSet::new();
    for recs in fetch_all(&mut c, "checks.ak").values() {
        for r in recs {
            let rec = CheckResult::from_json(r.value.as_deref().unwrap()).expect("JSON");
            assert_eq!(r.key.as_deref(), Some(&b"up"[..]));
            assert!(rec.up && rec.status == Some(200), "{rec:?}");
            ids.insert(rec.check_id);
        }
    }
    assert_eq!(
        ids.len(),
        made,
        "every check arrived, once per check_id\n{stderr}"
    );

    let sink_log = dir.path().join("sink.log");
    let log = std::fs::File::create(&sink_log).expect("sink log");
    let mut sink = crate::support::sitewatch()
        .args(["sink", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "sitewatch=info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start sitewatch sink");
    let mut pg = db.client();
    let rows = |pg: &mut postgres::Client| -> i64 {
        pg.query_one("SELECT count(*) FROM checks", &[])
            .expect("count")
            .get(0)
    };
    wait_for(
        "every check stored by the sink",
        Duration::from_secs(60),
        || rows(&mut pg) >= made as i64,
    );
    let _ = sink.kill();
    let _ = sink.wait();
    let stored = crate::sink::stored_records(&mut pg);
    let stored_ids: BTreeSet<String> = stored.iter().map(|r| r.check_id.clone()).collect();
    assert_eq!(stored.len(), made, "one row per check");
    assert_eq!(stored_ids, ids, "the rows are the checks in the topic");
    let log = std::fs::read_to_string(&sink_log).unwrap_or_default();
    assert!(!log.contains("Kafka unavailable"), "{log}");
}

/// Runs `sitewatch ROLE` with `config` and the SASL password in the environment, with a
/// notify socket; returns its exit code, its stderr and the sd_notify messages it sent.
fn run_daemon_to_exit(
    role: &str,
    config: &std::path::Path,
    password: &str,
) -> (Option<i32>, String, Vec<String>) {
    use std::os::unix::net::UnixDatagram;
    let sock_path = config.with_extension("sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_nonblocking(true).unwrap();
    let mut child = crate::support::sitewatch()
        .args([role, "--config", config.to_str().unwrap()])
        .env("SITEWATCH_KAFKA_SASL_PASSWORD", password)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "sitewatch=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sitewatch");
    let mut status = None;
    wait_for(
        &format!("sitewatch {role} to exit"),
        Duration::from_secs(60),
        || {
            status = child.try_wait().expect("wait");
            status.is_some()
        },
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    (status.and_then(|s| s.code()), stderr, messages)
}

/// Issue 13, item 2: a wrong SASL password is a config that can never work. `sitewatch
/// agent` and `sitewatch sink` stop at start with exit 78 (EX_CONFIG, systemd does not
/// restart), say so in an error line and the STATUS line naming the mechanism and the user,
/// and never print the password. (They used to warn once and retry every 30 s for ever.)
#[test]
fn a_wrong_sasl_password_stops_agent_and_sink_with_exit_78_against_apache_kafka() {
    let kafka = start(None, true);
    let dir = TempDir::new("sasl-wrong");
    let site = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let closed_pg = crate::support::free_port();
    let wrong = "wrong-Passw0rd-8731";
    for (role, mechanism) in [
        ("agent", "SCRAM-SHA-512"),
        ("agent", "PLAIN"),
        ("sink", "SCRAM-SHA-256"),
    ] {
        let config = dir.path().join(format!("{role}-{mechanism}.toml"));
        // PostgreSQL is down for the sink: that is retried, so the refusal is Kafka's.
        std::fs::write(
            &config,
            format!(
                "[agent]\nid = \"sasl\"\ninterval = \"300ms\"\nstate_dir = \"{state}\"\n\
                 [kafka]\nbrokers = [\"localhost:{port}\"]\ntopic = \"checks.sasl\"\n\
                 request_timeout = \"10s\"\n\
                 [kafka.tls]\nca_file = \"{ca}\"\n\
                 [kafka.sasl]\nmechanism = \"{mechanism}\"\nusername = \"alice\"\n\
                 [postgres]\nurl = \"postgres://sink@127.0.0.1:{closed_pg}/checks\"\n\
                 sslmode = \"disable\"\n\
                 [[target]]\nid = \"up\"\nurl = \"{url}\"\n",
                state = dir.path().join(format!("state-{mechanism}")).display(),
                port = kafka.sasl_ssl_port.unwrap(),
                ca = kafka.cert("ca.pem").display(),
                url = site.url("/"),
            ),
        )
        .unwrap();
        let t = Instant::now();
        let (code, stderr, notes) = run_daemon_to_exit(role, &config, wrong);
        eprintln!(
            "{role} {mechanism}: exit {code:?} after {:?}\n{stderr}\n{notes:?}",
            t.elapsed()
        );
        assert_eq!(code, Some(78), "{role} {mechanism}: {stderr}");
        let error_line = stderr
            .lines()
            .find(|l| l.starts_with("sitewatch: "))
            .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
        for want in [mechanism, "authentication failed", "\"alice\""] {
            assert!(error_line.contains(want), "{want}: {error_line}");
        }
        let status = notes
            .iter()
            .flat_map(|m| m.lines())
            .find(|l| l.starts_with("STATUS=failed: "))
            .unwrap_or_else(|| panic!("no failed STATUS line: {notes:?}"));
        assert!(status.contains(mechanism), "{status}");
        assert!(!stderr.contains(wrong), "password in the log:\n{stderr}");
        assert!(notes.iter().all(|m| !m.contains(wrong)), "{notes:?}");
        assert_eq!(
            site.requests().len(),
            0,
            "no check is made with credentials Kafka refuses"
        );
    }
}

/// Issue 13, item 4: a topic with a small `max.message.bytes` (tansu enforces none). Batches
/// too large for it are split until they fit and every record that fits arrives; a record
/// that alone is over the limit is dropped, counted and logged with its target, never retried
/// for ever and never holding up the rest.
#[test]
fn batches_over_max_message_bytes_are_split_and_an_oversized_record_dropped_against_apache_kafka() {
    let kafka = ApacheKafka::start(Options::default());
    let topic = "checks.small";
    run_ok(
        "TopicCommand --create",
        java("org.apache.kafka.tools.TopicCommand").args([
            "--bootstrap-server",
            &kafka.addr(),
            "--create",
            "--topic",
            topic,
            "--partitions",
            "2",
            "--replication-factor",
            "1",
            "--config",
            "max.message.bytes=4096",
        ]),
    );
    let site = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let dir = TempDir::new("max-message-bytes");
    // A record carries its URL: this one's is longer than the topic takes in one message.
    let huge_url = format!("{}?pad={}", site.url("/huge"), "x".repeat(6000));
    let mut text = format!(
        "[agent]\nid = \"small\"\ninterval = \"200ms\"\ntimeout = \"2s\"\njitter = \"0%\"\n\
         state_dir = \"{}\"\n\
         [kafka]\nbrokers = [\"{}\"]\ntopic = \"{topic}\"\npartitions = 2\nlinger = \"100ms\"\n\
         [[target]]\nid = \"huge\"\nurl = \"{huge_url}\"\n",
        dir.path().join("state").display(),
        kafka.addr(),
    );
    for i in 0..12 {
        text.push_str(&format!(
            "[[target]]\nid = \"site-{i}\"\nurl = \"{}\"\n",
            site.url(&format!("/{i}"))
        ));
    }
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, text).unwrap();
    let agent = crate::agent::start_agent(&config);
    let reader = kafka_config(vec![kafka.addr()], topic);
    let ids_in_topic = || -> BTreeSet<(String, String)> {
        let Ok(mut c) = Client::connect(&reader) else {
            return BTreeSet::new();
        };
        let mut ids = BTreeSet::new();
        for recs in fetch_all(&mut c, topic).values() {
            for r in recs {
                let rec = CheckResult::from_json(r.value.as_deref().unwrap()).expect("JSON");
                ids.insert((rec.target, rec.check_id));
            }
        }
        ids
    };
    wait_for(
        "100 small checks in the topic",
        Duration::from_secs(90),
        || ids_in_topic().len() >= 100,
    );
    let stderr = crate::agent::stop_agent(agent, Duration::from_secs(30));
    let made = crate::agent::checks_made(&stderr);
    let huge_checks = site
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/huge"))
        .count();
    let ids = ids_in_topic();
    let refused: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("Kafka refused a record of target \"huge\""))
        .collect();
    eprintln!(
        "{made} checks, {huge_checks} of them oversized, {} in the topic; first refusal: {:?}",
        ids.len(),
        refused.first()
    );
    assert!(huge_checks >= 1, "the oversized target was checked");
    assert!(ids.iter().all(|(t, _)| t != "huge"), "no oversized record");
    assert_eq!(
        ids.len(),
        made - huge_checks,
        "every record that fits arrived\n{stderr}"
    );
    // Each refusal is a line and a count. (A copy of a record the spool also took, after a
    // request that went unanswered for `spool_after` on this loaded machine, is refused again.)
    assert!(refused.len() >= huge_checks, "one line per drop\n{stderr}");
    assert!(refused[0].contains("MESSAGE_TOO_LARGE"), "{}", refused[0]);
    assert!(
        stderr.contains(&format!("{} dropped", refused.len())),
        "every drop is counted\n{stderr}"
    );
    assert!(!stderr.contains("Kafka unavailable"), "{stderr}");
}
