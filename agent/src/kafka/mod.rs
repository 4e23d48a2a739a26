//! A small synchronous Kafka client on top of the `kafka-protocol` crate (encode/decode only):
//! blocking sockets, TLS and SASL, version negotiation, a producer and a fetcher.
//!
//! What it owns: broker connections ([`conn`]), the record format ([`records`]), SASL
//! ([`sasl`]), TLS setup ([`tls`]), the metadata cache (who leads which partition) and the
//! retry policy around it; with the `fleet` feature, consumer-group membership ([`group`]) for
//! the fleet's targets topic. What it is not: a committer of consumer offsets (the sink
//! assigns itself partitions with PostgreSQL advisory locks and keeps its offsets there),
//! transactional or idempotent (delivery is at-least-once; the sink dedupes by `check_id`).
//!
//! Works with Kafka 2.x–4.x and tansu: ApiVersions picks, per API, the highest version inside
//! both our range ([`conn::OUR_VERSIONS`]) and the broker's. Retries: a request that fails
//! because leadership moved (NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC_OR_PARTITION, ...) or the
//! connection dropped refreshes the metadata and is tried again, [`MAX_ATTEMPTS`] times in all
//! with growing backoff; after that the error goes to the caller. Produce, Fetch and
//! ListOffsets then also wait (bounded by the request timeout) for a partition whose leader
//! died to get a new one, as long as some broker answers (see `Client::with_leader_retry`).

pub mod conn;
#[cfg(feature = "fleet")]
pub mod group;
pub mod records;
pub mod sasl;
pub mod tls;

pub use records::FetchedRecord;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, FetchRequest, FetchResponse, ListOffsetsRequest,
    MetadataRequest, MetadataResponse, ProduceRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::backoff::Backoff;
use crate::config::{Compression, KafkaConfig};
use conn::{Conn, ConnSettings};
use records::Codec;
pub use records::RecordRef;

/// Tries per request (the first plus retries) before a retriable error is returned.
pub const MAX_ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubles each time (200, 400, 800 ms within
/// [`MAX_ATTEMPTS`]; the cap is never reached).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(200);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a request whose partition lost its leader asks the cluster again, after the
/// quick tries (see `Client::with_leader_retry`).
pub const LEADER_POLL: Duration = Duration::from_millis(250);

/// Kafka error codes we branch on.
const OFFSET_OUT_OF_RANGE: i16 = 1;
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const LEADER_NOT_AVAILABLE: i16 = 5;
const NOT_LEADER_OR_FOLLOWER: i16 = 6;
const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const TOPIC_ALREADY_EXISTS: i16 = 36;
const SASL_AUTHENTICATION_FAILED: i16 = 58;
const NOT_CONTROLLER: i16 = 41;
const FENCED_LEADER_EPOCH: i16 = 74;
const UNKNOWN_LEADER_EPOCH: i16 = 75;
const UNKNOWN_TOPIC_ID: i16 = 100;
const OFFSET_NOT_AVAILABLE: i16 = 78;

/// True while a partition's leadership is moving: the metadata may still name a leader that
/// is gone, or the new leader does not yet know its high watermark (OFFSET_NOT_AVAILABLE
/// right after an election). Waiting and asking again is the cure for both.
fn leader_in_transition(e: &KafkaError) -> bool {
    e.stale_metadata()
        || matches!(e, KafkaError::Broker { code, .. } if *code == OFFSET_NOT_AVAILABLE)
}

/// Everything that can go wrong talking to Kafka. Texts name the broker, API and topic; they
/// never hold a password or key material.
#[derive(Debug)]
#[non_exhaustive]
pub enum KafkaError {
    /// The connection failed or broke (refused, reset, closed mid-response).
    Io {
        broker: String,
        error: std::io::Error,
    },
    /// No answer within the request timeout.
    Timeout { broker: String },
    /// TLS setup or handshake failed (bad CA, hostname mismatch, unreadable key).
    Tls {
        /// What failed, naming the broker or the file.
        what: String,
        /// The TLS library's or the file system's error, when there is one.
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// SASL refused or failed.
    Auth(String),
    /// The broker sent something we cannot decode, or we could not encode a request.
    Protocol(String),
    /// The broker answered with an error code.
    Broker {
        /// API name, e.g. `Produce`.
        api: &'static str,
        code: i16,
        /// What the request was about: `topic/partition` or the broker address.
        context: String,
        message: Option<String>,
    },
    /// The broker does not support any version of `api` that we implement.
    BrokerTooOld {
        broker: String,
        api: &'static str,
        ours: (i16, i16),
        theirs: Option<(i16, i16)>,
    },
    /// The fetch offset is before the log start or after the end (retention removed it).
    OffsetOutOfRange {
        topic: String,
        partition: i32,
        offset: i64,
        /// The high watermark of a successful answer the offset was past (tansu's answer past
        /// the end; also a new Kafka leader's while it lags: see [`Client::fetch`]); `None`
        /// when the broker said OFFSET_OUT_OF_RANGE or the offset is before the log start.
        high_watermark: Option<i64>,
    },
    /// The topic does not exist (and was not created).
    UnknownTopic(String),
    /// None of the bootstrap brokers could be reached; `last` is why the last one failed.
    NoBroker {
        tried: Vec<String>,
        last: Option<Box<KafkaError>>,
    },
    /// Invalid client settings.
    Config(String),
}

impl KafkaError {
    pub(crate) fn io(broker: &str, error: std::io::Error) -> KafkaError {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        if matches!(error.kind(), WouldBlock | TimedOut) {
            KafkaError::Timeout {
                broker: broker.to_string(),
            }
        } else {
            KafkaError::Io {
                broker: broker.to_string(),
                error,
            }
        }
    }

    /// A TLS failure: `what` names the broker or file, `source` is the underlying error.
    pub(crate) fn tls(
        what: String,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> KafkaError {
        KafkaError::Tls {
            what,
            source: Some(source.into()),
        }
    }

    /// A TLS failure found by us (no PEM block, a key format we do not take).
    pub(crate) fn tls_refused(what: String) -> KafkaError {
        KafkaError::Tls { what, source: None }
    }

    pub(crate) fn broker(api: i16, code: i16, context: &str, message: Option<String>) -> Self {
        KafkaError::Broker {
            api: api_name(api),
            code,
            context: context.to_string(),
            message,
        }
    }

    /// Whether trying again later (after a metadata refresh, a reconnect, a pause) can
    /// succeed. The publisher keeps records for retriable errors and reports the others.
    pub fn is_retriable(&self) -> bool {
        match self {
            KafkaError::Io { .. }
            | KafkaError::Timeout { .. }
            | KafkaError::NoBroker { .. }
            | KafkaError::UnknownTopic(_) => true,
            KafkaError::Broker { code, .. } => {
                kafka_protocol::ResponseError::try_from_code(*code)
                    .is_some_and(|e| e.is_retriable())
                    || *code == NOT_CONTROLLER
            }
            _ => false,
        }
    }

    /// Whether the broker refuses us as we are configured: credentials (SASL), certificates
    /// (TLS), permissions (ACLs), a broker too old, invalid settings. Retrying with the same
    /// config cannot help; the daemons stop at start (exit 78) and shout while running.
    pub fn is_config(&self) -> bool {
        match self {
            KafkaError::Auth(_) | KafkaError::BrokerTooOld { .. } | KafkaError::Config(_) => true,
            // A handshake cut by a broker that is going away is not about us.
            KafkaError::Tls { source, .. } => !source.as_ref().is_some_and(|e| {
                let text = e.to_string();
                ["unexpected EOF", "Connection reset", "Broken pipe"]
                    .iter()
                    .any(|s| text.contains(s))
            }),
            KafkaError::Broker { code, .. } => matches!(
                *code,
                TOPIC_AUTHORIZATION_FAILED
                    | CLUSTER_AUTHORIZATION_FAILED
                    | UNSUPPORTED_SASL_MECHANISM
                    | SASL_AUTHENTICATION_FAILED
            ),
            KafkaError::NoBroker { last: Some(e), .. } => e.is_config(),
            _ => false,
        }
    }

    /// True when the connection the error came from is unusable.
    fn breaks_connection(&self) -> bool {
        matches!(
            self,
            KafkaError::Io { .. } | KafkaError::Timeout { .. } | KafkaError::Protocol(_)
        )
    }

    /// True when the metadata (leaders, topic ids) may be stale.
    fn stale_metadata(&self) -> bool {
        match self {
            KafkaError::Broker { code, .. } => matches!(
                *code,
                UNKNOWN_TOPIC_OR_PARTITION
                    | LEADER_NOT_AVAILABLE
                    | NOT_LEADER_OR_FOLLOWER
                    | FENCED_LEADER_EPOCH
                    | UNKNOWN_LEADER_EPOCH
                    | UNKNOWN_TOPIC_ID
            ),
            KafkaError::UnknownTopic(_) => true,
            e => e.breaks_connection(),
        }
    }
}

impl fmt::Display for KafkaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KafkaError::Io { broker, error } => write!(f, "broker {broker}: {error}"),
            KafkaError::Timeout { broker } => write!(f, "broker {broker}: request timed out"),
            KafkaError::Tls { what, source } => {
                write!(f, "TLS: {what}")?;
                match source {
                    Some(e) => write!(f, ": {e}"),
                    None => Ok(()),
                }
            }
            KafkaError::Auth(m) => write!(f, "SASL: {m}"),
            KafkaError::Protocol(m) => write!(f, "Kafka protocol: {m}"),
            KafkaError::Broker {
                api,
                code,
                context,
                message,
            } => {
                write!(f, "{api} {context}: {} ({code})", error_name(*code))?;
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                Ok(())
            }
            KafkaError::BrokerTooOld {
                broker,
                api,
                ours,
                theirs,
            } => {
                write!(
                    f,
                    "broker {broker} is too old: we need {api} v{}..=v{}, ",
                    ours.0, ours.1
                )?;
                match theirs {
                    Some((lo, hi)) => write!(f, "it supports v{lo}..=v{hi}"),
                    None => write!(f, "it does not support {api} at all"),
                }?;
                f.write_str(" (Kafka 0.11 or newer is required; 2.x–4.x are tested)")
            }
            KafkaError::OffsetOutOfRange {
                topic,
                partition,
                offset,
                ..
            } => write!(
                f,
                "Fetch {topic}/{partition}: offset {offset} is out of range (deleted by retention?)"
            ),
            KafkaError::UnknownTopic(t) => write!(f, "topic {t:?} does not exist"),
            KafkaError::NoBroker { tried, last } => {
                write!(f, "no Kafka broker reachable (tried {})", tried.join(", "))?;
                match last {
                    Some(e) => write!(f, ": {e}"),
                    None => Ok(()),
                }
            }
            KafkaError::Config(m) => write!(f, "Kafka config: {m}"),
        }
    }
}

impl std::error::Error for KafkaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KafkaError::Io { error, .. } => Some(error),
            KafkaError::Tls {
                source: Some(e), ..
            } => Some(e.as_ref()),
            KafkaError::NoBroker { last: Some(e), .. } => Some(e.as_ref()),
            _ => None,
        }
    }
}

/// `NOT_LEADER_OR_FOLLOWER`-style name of a Kafka error code.
pub fn error_name(code: i16) -> String {
    match kafka_protocol::ResponseError::try_from_code(code) {
        None => "NONE".into(),
        Some(kafka_protocol::ResponseError::Unknown(c)) => format!("UNKNOWN_ERROR_CODE_{c}"),
        Some(e) => {
            let camel = format!("{e:?}");
            let mut out = String::with_capacity(camel.len() + 8);
            for (i, ch) in camel.chars().enumerate() {
                if ch.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            out
        }
    }
}

/// Human name of an API key.
pub fn api_name(key: i16) -> &'static str {
    match key {
        conn::API_PRODUCE => "Produce",
        conn::API_FETCH => "Fetch",
        conn::API_LIST_OFFSETS => "ListOffsets",
        conn::API_METADATA => "Metadata",
        conn::API_SASL_HANDSHAKE => "SaslHandshake",
        conn::API_API_VERSIONS => "ApiVersions",
        conn::API_CREATE_TOPICS => "CreateTopics",
        conn::API_SASL_AUTHENTICATE => "SaslAuthenticate",
        conn::API_FIND_COORDINATOR => "FindCoordinator",
        conn::API_JOIN_GROUP => "JoinGroup",
        conn::API_HEARTBEAT => "Heartbeat",
        conn::API_LEAVE_GROUP => "LeaveGroup",
        conn::API_SYNC_GROUP => "SyncGroup",
        _ => "(other API)",
    }
}

/// One record to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub timestamp_ms: i64,
}

/// The result of one fetch of one partition.
#[derive(Clone, Debug, Default)]
pub struct Fetched {
    pub records: Vec<FetchedRecord>,
    /// The partition's high watermark, or `None` when the answer did not say (it left the
    /// partition out: nothing to read yet, see [`Client::fetch`]).
    pub high_watermark: Option<i64>,
    /// Where the next fetch should start: one past the last complete batch returned (which
    /// may be past the last record, when the batch was a transaction marker).
    pub next_offset: i64,
}

/// The partition a key goes to, as the Java client's default partitioner computes it:
/// `toPositive(murmur2(key)) % partitions`. Same key, same partition, whichever client wrote.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    ((murmur2(key) & 0x7fff_ffff) as i32) % partitions
}

/// Kafka's murmur2 (seed 0x9747b28c), bit for bit as `org.apache.kafka.common.utils.Utils`.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// What a Fetch response says about `topic`/`partition` read from `offset`.
///
/// An answer that leaves our partition out is "nothing yet", not an error: a tansu newer than
/// 0.6.0 answers every zero-wait fetch with `responses: []` (issue 12). Treating that as a
/// broken answer made the sink reconnect and send the very same fetch forever.
fn read_fetch_response(
    resp: &FetchResponse,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Fetched, KafkaError> {
    let context = || format!("{topic}/{partition}");
    if resp.error_code != 0 {
        return Err(KafkaError::broker(
            conn::API_FETCH,
            resp.error_code,
            &context(),
            None,
        ));
    }
    let Some(p) = resp
        .responses
        .iter()
        .flat_map(|t| t.partitions.iter())
        .find(|p| p.partition_index == partition)
    else {
        return Ok(Fetched {
            records: Vec::new(),
            high_watermark: None,
            next_offset: offset,
        });
    };
    // Kafka answers OFFSET_OUT_OF_RANGE for an offset past the end or before the log
    // start; tansu answers an empty success. Decide here so both look the same.
    let past_high_watermark = p.high_watermark >= 0 && offset > p.high_watermark;
    let outside = past_high_watermark || (p.log_start_offset >= 0 && offset < p.log_start_offset);
    let code = if p.error_code == 0 && outside {
        OFFSET_OUT_OF_RANGE
    } else {
        p.error_code
    };
    match code {
        0 => {}
        OFFSET_OUT_OF_RANGE => {
            return Err(KafkaError::OffsetOutOfRange {
                topic: topic.to_string(),
                partition,
                offset,
                high_watermark: (p.error_code == 0 && past_high_watermark)
                    .then_some(p.high_watermark),
            });
        }
        _ => return Err(KafkaError::broker(conn::API_FETCH, code, &context(), None)),
    }
    let decoded = match &p.records {
        Some(bytes) => records::decode_batches(bytes, offset)?,
        None => records::Decoded {
            records: Vec::new(),
            next_offset: offset,
        },
    };
    Ok(Fetched {
        records: decoded.records,
        // Negative: the broker does not know it (an error answer); say so, never a number.
        high_watermark: (p.high_watermark >= 0).then_some(p.high_watermark),
        next_offset: decoded.next_offset,
    })
}

#[derive(Clone, Debug)]
struct TopicMeta {
    id: uuid::Uuid,
    /// (partition, leader broker id), sorted by partition.
    partitions: Vec<(i32, i32)>,
}

/// A client for one cluster. Not thread-safe by design: each thread that talks to Kafka owns
/// its client (the publisher thread, each sink worker).
pub struct Client {
    bootstrap: Vec<String>,
    settings: ConnSettings,
    codec: Codec,
    /// Open connections by broker id; `BOOTSTRAP` for the one used before ids are known.
    conns: HashMap<i32, Conn>,
    brokers: HashMap<i32, String>,
    controller: i32,
    topics: HashMap<String, TopicMeta>,
}

const BOOTSTRAP: i32 = i32::MIN;

impl Client {
    /// Connects to the first reachable bootstrap broker and reads the cluster metadata.
    pub fn connect(cfg: &KafkaConfig) -> Result<Client, KafkaError> {
        let tls = match &cfg.tls {
            Some(t) => Some(Arc::new(tls::connector(t)?)),
            None => None,
        };
        let mut client = Client {
            bootstrap: cfg.brokers.clone(),
            settings: ConnSettings {
                client_id: cfg.client_id.clone(),
                connect_timeout: cfg.request_timeout.min(Duration::from_secs(10)),
                request_timeout: cfg.request_timeout,
                tls,
                sasl: cfg.sasl.clone(),
            },
            codec: match cfg.compression {
                Compression::None => Codec::None,
                Compression::Gzip => Codec::Gzip,
            },
            conns: HashMap::new(),
            brokers: HashMap::new(),
            controller: -1,
            topics: HashMap::new(),
        };
        client.refresh_metadata(&[])?;
        Ok(client)
    }

    /// The broker's advertised version range per API (key → (min, max)), from the first
    /// connection; for diagnostics and the tests.
    pub fn broker_versions(&mut self) -> Result<HashMap<i16, (i16, i16)>, KafkaError> {
        Ok(self.any_conn()?.versions.broker.clone())
    }

    /// Creates `topic` when it does not exist (TOPIC_ALREADY_EXISTS is success), then waits
    /// until its partitions have leaders.
    pub fn ensure_topic(
        &mut self,
        topic: &str,
        partitions: i32,
        replication_factor: i16,
    ) -> Result<(), KafkaError> {
        self.ensure_topic_with(topic, partitions, replication_factor, &[])
    }

    /// [`Client::ensure_topic`] with topic configs for a topic it creates (e.g.
    /// `cleanup.policy=compact`); an existing topic is left as it is.
    pub fn ensure_topic_with(
        &mut self,
        topic: &str,
        partitions: i32,
        replication_factor: i16,
        configs: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        match self.refresh_metadata(&[topic]) {
            Ok(()) if self.topics.contains_key(topic) => return Ok(()),
            Ok(()) | Err(KafkaError::UnknownTopic(_)) => {}
            Err(e) => return Err(e),
        }
        let mut t = CreatableTopic::default();
        t.name = TopicName(StrBytes::from_string(topic.to_string()));
        t.num_partitions = partitions;
        t.replication_factor = replication_factor;
        t.configs = configs
            .iter()
            .map(|(k, v)| {
                let mut c = CreatableTopicConfig::default();
                c.name = StrBytes::from_string(k.to_string());
                c.value = Some(StrBytes::from_string(v.to_string()));
                c
            })
            .collect();
        let mut req = CreateTopicsRequest::default();
        req.topics = vec![t];
        req.timeout_ms = self.timeout_ms();
        // KRaft brokers forward to the controller; ZooKeeper-era ones want the controller.
        let target = if self.brokers.contains_key(&self.controller) {
            Some(self.controller)
        } else {
            None
        };
        let resp = self.with_conn(target, |c| {
            let v = c.versions.pick(conn::API_CREATE_TOPICS, &c.addr)?;
            c.call(&req, v)
        })?;
        for r in &resp.topics {
            if r.error_code != 0 && r.error_code != TOPIC_ALREADY_EXISTS {
                // Name what was asked for: the broker's reason alone (e.g. "only 3 broker(s)
                // are registered") does not say which setting to change.
                return Err(KafkaError::broker(
                    conn::API_CREATE_TOPICS,
                    r.error_code,
                    &format!(
                        "{topic} ({partitions} partitions, replication factor {replication_factor})"
                    ),
                    r.error_message.as_ref().map(|m| m.to_string()),
                ));
            }
        }
        log::info!(target: "sitewatch::kafka", "topic {topic}: created ({partitions} partitions, replication {replication_factor}) or already there");
        // Leaders are elected asynchronously: wait for them, bounded by the request timeout.
        let deadline = Instant::now() + self.settings.request_timeout;
        loop {
            match self.refresh_metadata(&[topic]) {
                Ok(()) if self.topics.contains_key(topic) => return Ok(()),
                Ok(()) | Err(KafkaError::UnknownTopic(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(()) => return Err(KafkaError::UnknownTopic(topic.to_string())),
                Err(e) => return Err(e),
            }
        }
    }

    /// The topic's partition numbers, sorted.
    pub fn partitions(&mut self, topic: &str) -> Result<Vec<i32>, KafkaError> {
        Ok(self.topic(topic)?.partitions.iter().map(|p| p.0).collect())
    }

    /// As [`Client::partitions`], asking the broker now instead of the cache: for a topic
    /// that may have been created or grown since it was last read.
    pub fn partitions_now(&mut self, topic: &str) -> Result<Vec<i32>, KafkaError> {
        self.refresh_metadata(&[topic])?;
        self.partitions(topic)
    }

    /// The first offset still stored in the partition (ListOffsets, timestamp -2).
    pub fn earliest_offset(&mut self, topic: &str, partition: i32) -> Result<i64, KafkaError> {
        self.list_offset(topic, partition, -2)
    }

    /// The offset the next produced record will get (ListOffsets, timestamp -1). Note: tansu
    /// can get this wrong when several batches land in one millisecond; the high watermark of
    /// a fetch is exact.
    pub fn latest_offset(&mut self, topic: &str, partition: i32) -> Result<i64, KafkaError> {
        self.list_offset(topic, partition, -1)
    }

    fn list_offset(&mut self, topic: &str, partition: i32, ts: i64) -> Result<i64, KafkaError> {
        let timeout_ms = self.timeout_ms();
        self.with_leader_retry(topic, partition, |c, _| {
            let v = c.versions.pick(conn::API_LIST_OFFSETS, &c.addr)?;
            let mut p = ListOffsetsPartition::default();
            p.partition_index = partition;
            p.timestamp = ts;
            let mut t = ListOffsetsTopic::default();
            t.name = TopicName(StrBytes::from_string(topic.to_string()));
            t.partitions = vec![p];
            let mut req = ListOffsetsRequest::default();
            req.replica_id = BrokerId(-1);
            req.topics = vec![t];
            req.timeout_ms = timeout_ms;
            let resp = c.call(&req, v)?;
            let p = resp
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition_index == partition)
                .ok_or_else(|| {
                    KafkaError::Protocol(format!("ListOffsets: no answer for {topic}/{partition}"))
                })?;
            if p.error_code != 0 {
                return Err(KafkaError::broker(
                    conn::API_LIST_OFFSETS,
                    p.error_code,
                    &format!("{topic}/{partition}"),
                    None,
                ));
            }
            Ok(p.offset)
        })
    }

    /// Reads records of one partition from `offset`, waiting up to `max_wait` for data.
    /// Returns the records at or after `offset` (possibly none) and the high watermark. An
    /// answer without the partition is an empty `Fetched` with no high watermark: brokers do
    /// that for "nothing yet" (a newer tansu for every zero-wait fetch), so a caller that gets
    /// it should wait before asking again (a non-zero `max_wait`).
    ///
    /// An offset past the high watermark of a successful answer is out of range only when it
    /// stays so for the request timeout (asked again every [`LEADER_POLL`]): a Kafka leader
    /// just elected answers with a high watermark that can lag behind the records it holds
    /// (an offset between the two reads as nothing), until its followers catch up. Taking
    /// that for the end made the sink start the partition over from its first offset after
    /// a leader change (measured against a 3-node Apache Kafka). tansu answers an offset past
    /// its end the same way; there the wait only delays the error.
    pub fn fetch(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: i32,
        max_wait: Duration,
    ) -> Result<Fetched, KafkaError> {
        let max_bytes = max_bytes.clamp(1024, (conn::MAX_RESPONSE / 2) as i32);
        let max_wait_ms = i32::try_from(max_wait.as_millis()).unwrap_or(i32::MAX);
        let deadline = Instant::now() + self.settings.request_timeout;
        loop {
            let result = self.with_leader_retry(topic, partition, |c, meta| {
                let mut v = c.versions.fetch(&c.addr)?;
                // v13+ names topics by id; without an id (older metadata) stay on v11.
                if v >= 13 && meta.id.is_nil() {
                    v = 11;
                }
                let mut p = FetchPartition::default();
                p.partition = partition;
                p.fetch_offset = offset;
                p.partition_max_bytes = max_bytes;
                let mut t = FetchTopic::default();
                t.topic = TopicName(StrBytes::from_string(topic.to_string()));
                t.topic_id = meta.id;
                t.partitions = vec![p];
                let mut req = FetchRequest::default();
                req.max_wait_ms = max_wait_ms;
                req.min_bytes = 1;
                req.max_bytes = max_bytes;
                req.topics = vec![t];
                let resp = c.call_with_wait(&req, v, max_wait)?;
                read_fetch_response(&resp, topic, partition, offset)
            });
            match result {
                Err(KafkaError::OffsetOutOfRange {
                    high_watermark: Some(hw),
                    ..
                }) if Instant::now() + LEADER_POLL < deadline => {
                    log::debug!(target: "sitewatch::kafka", "{topic}/{partition}: offset {offset} is past the high watermark {hw}; asking again");
                    std::thread::sleep(LEADER_POLL);
                    // Ignore errors here: the next attempt reports them.
                    let _ = self.refresh_metadata(&[topic]);
                }
                other => return other,
            }
        }
    }

    /// Writes `records` with acks=all, each to the partition of its key
    /// ([`partition_for_key`]). Returns `Ok` only when every record is acknowledged; on error
    /// some partitions may have been written (at-least-once: the caller sends all again).
    pub fn produce(&mut self, topic: &str, records: &[ProduceRecord]) -> Result<(), KafkaError> {
        let refs: Vec<RecordRef<'_>> = records
            .iter()
            .map(|r| RecordRef {
                key: &r.key,
                value: Some(&r.value),
                timestamp_ms: r.timestamp_ms,
            })
            .collect();
        self.produce_refs(topic, &refs)
    }

    /// [`Client::produce`] of borrowed records, which may be tombstones (null values).
    pub fn produce_refs(
        &mut self,
        topic: &str,
        records: &[RecordRef<'_>],
    ) -> Result<(), KafkaError> {
        if records.is_empty() {
            return Ok(());
        }
        let n = self.topic(topic)?.partitions.len() as i32;
        let mut by_partition: HashMap<i32, Vec<RecordRef<'_>>> = HashMap::new();
        for r in records {
            by_partition
                .entry(partition_for_key(r.key, n))
                .or_default()
                .push(*r);
        }
        let mut pending: Vec<(i32, Bytes)> = Vec::with_capacity(by_partition.len());
        for (p, refs) in by_partition {
            pending.push((p, Bytes::from(records::encode_batch(&refs, self.codec)?)));
        }
        let mut attempt = 0;
        let mut backoff = Backoff::new(RETRY_BACKOFF, RETRY_BACKOFF_MAX);
        let deadline = Instant::now() + self.settings.request_timeout;
        loop {
            attempt += 1;
            match self.produce_once(topic, &mut pending) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retriable() && attempt < MAX_ATTEMPTS => {
                    log::debug!(target: "sitewatch::kafka", "produce {topic}: {e}; retrying ({attempt}/{MAX_ATTEMPTS})");
                    std::thread::sleep(backoff.next_delay());
                    if e.stale_metadata() {
                        // Ignore errors here: the next attempt reports them.
                        let _ = self.refresh_metadata(&[topic]);
                    }
                }
                // Out of quick tries with a leader still moving: follow it as the reads do
                // (`with_leader_retry`), polling the metadata while some broker answers,
                // bounded by the request timeout. Giving up here made the publisher drop its
                // client and reconnect with a growing backoff, so it followed the new leader
                // seconds after the cluster had one. The publisher's caller never waits on
                // this: records made meanwhile go to the spool after `spool_after`. A topic
                // the cluster does not know is no leader change: the publisher creates it.
                Err(e)
                    if leader_in_transition(&e)
                        && !matches!(e, KafkaError::UnknownTopic(_))
                        && Instant::now() + LEADER_POLL < deadline =>
                {
                    log::debug!(target: "sitewatch::kafka", "produce {topic}: {e}; waiting for a new leader");
                    std::thread::sleep(LEADER_POLL);
                    if self.refresh_metadata(&[topic]).is_err() {
                        return Err(e); // no broker answers: not a leader change
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One round: a ProduceRequest per leader for the pending partitions. Acknowledged
    /// partitions are removed from `pending`; the first error is returned.
    fn produce_once(
        &mut self,
        topic: &str,
        pending: &mut Vec<(i32, Bytes)>,
    ) -> Result<(), KafkaError> {
        let meta = self.topic(topic)?;
        let mut by_leader: HashMap<i32, Vec<(i32, Bytes)>> = HashMap::new();
        for (p, b) in pending.iter() {
            let leader = meta
                .partitions
                .iter()
                .find(|x| x.0 == *p)
                .map(|x| x.1)
                .unwrap_or(-1);
            by_leader.entry(leader).or_default().push((*p, b.clone()));
        }
        let timeout = self.settings.request_timeout;
        let mut first_err = None;
        for (leader, parts) in by_leader {
            if leader < 0 {
                first_err.get_or_insert(KafkaError::broker(
                    conn::API_PRODUCE,
                    LEADER_NOT_AVAILABLE,
                    topic,
                    None,
                ));
                continue;
            }
            let mut tp = TopicProduceData::default();
            tp.name = TopicName(StrBytes::from_string(topic.to_string()));
            tp.partition_data = parts
                .iter()
                .map(|(p, b)| {
                    let mut d = PartitionProduceData::default();
                    d.index = *p;
                    d.records = Some(b.clone());
                    d
                })
                .collect();
            let mut req = ProduceRequest::default();
            req.acks = -1;
            req.timeout_ms = self.timeout_ms();
            req.topic_data = vec![tp];
            let result = self.with_conn(Some(leader), |c| {
                let v = c.versions.pick(conn::API_PRODUCE, &c.addr)?;
                c.call_with_wait(&req, v, timeout)
            });
            let resp = match result {
                Ok(r) => r,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            for tr in &resp.responses {
                for pr in &tr.partition_responses {
                    if pr.error_code == 0 {
                        pending.retain(|(p, _)| *p != pr.index);
                    } else {
                        first_err.get_or_insert(KafkaError::broker(
                            conn::API_PRODUCE,
                            pr.error_code,
                            &format!("{topic}/{}", pr.index),
                            pr.error_message.as_ref().map(|m| m.to_string()),
                        ));
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None if pending.is_empty() => Ok(()),
            None => Err(KafkaError::Protocol(format!(
                "Produce {topic}: no answer for partitions {:?}",
                pending.iter().map(|p| p.0).collect::<Vec<_>>()
            ))),
        }
    }

    fn timeout_ms(&self) -> i32 {
        i32::try_from(self.settings.request_timeout.as_millis()).unwrap_or(i32::MAX)
    }

    /// Cached metadata of `topic`, fetched when missing.
    fn topic(&mut self, topic: &str) -> Result<TopicMeta, KafkaError> {
        if let Some(t) = self.topics.get(topic) {
            return Ok(t.clone());
        }
        self.refresh_metadata(&[topic])?;
        self.topics
            .get(topic)
            .cloned()
            .ok_or_else(|| KafkaError::UnknownTopic(topic.to_string()))
    }

    /// Runs `f` on the partition leader's connection, refreshing metadata and retrying on
    /// leadership changes and connection loss: [`MAX_ATTEMPTS`] quick tries, then, while the
    /// partition's leader is gone but some broker answers, a metadata poll every
    /// [`LEADER_POLL`] until the cluster names a leader that answers, bounded by the request
    /// timeout.
    ///
    /// Why the poll: a leader that dies without a word (kill -9, a crash, a lost host) stays
    /// in the metadata until the cluster notices (`broker.session.timeout.ms`, 9 s by
    /// default), longer than the quick tries. Giving up then made the sink drop its client
    /// and start over with its own backoff, which had grown by the time the new leader was
    /// there: 8 to 10 s more before it followed (measured against a 3-node Apache Kafka).
    fn with_leader_retry<T>(
        &mut self,
        topic: &str,
        partition: i32,
        mut f: impl FnMut(&mut Conn, &TopicMeta) -> Result<T, KafkaError>,
    ) -> Result<T, KafkaError> {
        let mut attempt = 0;
        let mut backoff = Backoff::new(RETRY_BACKOFF, RETRY_BACKOFF_MAX);
        let deadline = Instant::now() + self.settings.request_timeout;
        loop {
            attempt += 1;
            let result = self.topic(topic).and_then(|meta| {
                let leader = meta
                    .partitions
                    .iter()
                    .find(|p| p.0 == partition)
                    .map(|p| p.1)
                    .ok_or_else(|| {
                        KafkaError::broker(
                            conn::API_METADATA,
                            UNKNOWN_TOPIC_OR_PARTITION,
                            &format!("{topic}/{partition}"),
                            None,
                        )
                    })?;
                if leader < 0 {
                    return Err(KafkaError::broker(
                        conn::API_METADATA,
                        LEADER_NOT_AVAILABLE,
                        &format!("{topic}/{partition}"),
                        None,
                    ));
                }
                self.with_conn(Some(leader), |c| f(c, &meta))
            });
            let e = match result {
                Err(e) if e.is_retriable() => e,
                other => return other,
            };
            if attempt < MAX_ATTEMPTS {
                log::debug!(target: "sitewatch::kafka", "{topic}/{partition}: {e}; retrying ({attempt}/{MAX_ATTEMPTS})");
                std::thread::sleep(backoff.next_delay());
                if e.stale_metadata() {
                    let _ = self.refresh_metadata(&[topic]);
                }
                continue;
            }
            // Out of quick tries: wait for a new leader only while the cluster answers (a
            // refresh that fails means no broker is there: report that now).
            if !(leader_in_transition(&e) && Instant::now() + LEADER_POLL < deadline) {
                return Err(e);
            }
            log::debug!(target: "sitewatch::kafka", "{topic}/{partition}: {e}; waiting for a new leader");
            std::thread::sleep(LEADER_POLL);
            if self.refresh_metadata(&[topic]).is_err() {
                return Err(e);
            }
        }
    }

    /// Runs `f` on the connection to broker `id` (any broker when `None`), dialing it when
    /// needed. A connection whose request failed at the I/O or framing level is dropped.
    fn with_conn<T>(
        &mut self,
        id: Option<i32>,
        f: impl FnOnce(&mut Conn) -> Result<T, KafkaError>,
    ) -> Result<T, KafkaError> {
        let key = match id {
            Some(id) => {
                if !self.conns.contains_key(&id) {
                    let addr = self.brokers.get(&id).cloned().ok_or_else(|| {
                        KafkaError::Protocol(format!("broker id {id} is not in the metadata"))
                    })?;
                    let c = Conn::open(&addr, &self.settings)?;
                    self.conns.insert(id, c);
                }
                id
            }
            None => {
                self.any_conn()?;
                *self
                    .conns
                    .keys()
                    .next()
                    .ok_or_else(|| KafkaError::Protocol("no connection".into()))?
            }
        };
        let conn = self
            .conns
            .get_mut(&key)
            .ok_or_else(|| KafkaError::Protocol("no connection".into()))?;
        let result = f(conn);
        if let Err(e) = &result
            && e.breaks_connection()
        {
            self.conns.remove(&key);
        }
        result
    }

    /// Runs `f` on some broker's connection (FindCoordinator: any broker answers it).
    #[cfg(feature = "fleet")]
    pub(crate) fn with_any_broker<T>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<T, KafkaError>,
    ) -> Result<T, KafkaError> {
        self.with_conn(None, f)
    }

    /// The settings every connection of this client uses (the group coordinator's too).
    #[cfg(feature = "fleet")]
    pub(crate) fn conn_settings(&self) -> &ConnSettings {
        &self.settings
    }

    /// Some open connection: an existing one, else the first bootstrap broker that answers.
    fn any_conn(&mut self) -> Result<&mut Conn, KafkaError> {
        if self.conns.is_empty() {
            let mut last = None;
            for addr in &self.bootstrap {
                match Conn::open(addr, &self.settings) {
                    Ok(c) => {
                        self.conns.insert(BOOTSTRAP, c);
                        break;
                    }
                    // Misconfiguration is the same on every broker: report it as it is.
                    Err(
                        e @ (KafkaError::Tls { .. }
                        | KafkaError::Auth(_)
                        | KafkaError::BrokerTooOld { .. }
                        | KafkaError::Config(_)),
                    ) => return Err(e),
                    Err(e) => {
                        log::debug!(target: "sitewatch::kafka", "bootstrap {addr}: {e}");
                        last = Some(e);
                    }
                }
            }
            if self.conns.is_empty() {
                return Err(KafkaError::NoBroker {
                    tried: self.bootstrap.clone(),
                    last: last.map(Box::new),
                });
            }
        }
        self.conns
            .values_mut()
            .next()
            .ok_or_else(|| KafkaError::Protocol("no connection".into()))
    }

    /// Reads brokers and the given topics' partitions and leaders. A topic the broker does
    /// not know is dropped from the cache and reported as `UnknownTopic`.
    fn refresh_metadata(&mut self, topics: &[&str]) -> Result<(), KafkaError> {
        self.refresh_metadata_answer(topics).map(|_| ())
    }

    /// [`Client::refresh_metadata`], returning the broker's answer too.
    fn refresh_metadata_answer(&mut self, topics: &[&str]) -> Result<MetadataResponse, KafkaError> {
        let mut req = MetadataRequest::default();
        req.allow_auto_topic_creation = false;
        req.topics = Some(
            topics
                .iter()
                .map(|t| {
                    let mut x = MetadataRequestTopic::default();
                    x.name = Some(TopicName(StrBytes::from_string(t.to_string())));
                    x
                })
                .collect(),
        );
        let resp: MetadataResponse = self.with_conn(None, |c| {
            let v = c.versions.pick(conn::API_METADATA, &c.addr)?;
            c.call(&req, v)
        })?;
        let brokers: HashMap<i32, String> = resp
            .brokers
            .iter()
            .map(|b| {
                let host = b.host.as_str();
                let addr = if host.contains(':') {
                    format!("[{host}]:{}", b.port)
                } else {
                    format!("{host}:{}", b.port)
                };
                (b.node_id.0, addr)
            })
            .collect();
        // Drop connections to brokers that moved or left.
        self.conns
            .retain(|id, c| *id == BOOTSTRAP || brokers.get(id).is_some_and(|a| *a == c.addr));
        self.brokers = brokers;
        self.controller = resp.controller_id.0;
        let mut missing = None;
        for t in &resp.topics {
            let Some(name) = t.name.as_ref().map(|n| n.0.to_string()) else {
                continue;
            };
            match t.error_code {
                0 => {
                    let mut partitions: Vec<(i32, i32)> = t
                        .partitions
                        .iter()
                        .map(|p| {
                            // A partition with an error has no usable leader right now.
                            let leader = if p.error_code == 0 || p.leader_id.0 >= 0 {
                                p.leader_id.0
                            } else {
                                -1
                            };
                            (p.partition_index, leader)
                        })
                        .collect();
                    partitions.sort_unstable();
                    if partitions.is_empty() {
                        self.topics.remove(&name);
                        missing = Some(name);
                    } else {
                        self.topics.insert(
                            name,
                            TopicMeta {
                                id: t.topic_id,
                                partitions,
                            },
                        );
                    }
                }
                UNKNOWN_TOPIC_OR_PARTITION | LEADER_NOT_AVAILABLE => {
                    self.topics.remove(&name);
                    missing = Some(name);
                }
                code => {
                    return Err(KafkaError::broker(conn::API_METADATA, code, &name, None));
                }
            }
        }
        match missing {
            Some(t) => Err(KafkaError::UnknownTopic(t)),
            None => Ok(resp),
        }
    }

    /// Who leads, replicates and is in sync for each partition of `topic`, read fresh from
    /// the cluster (and kept as the new leaders). For operators' diagnostics and the tests
    /// that kill leaders.
    pub fn describe_topic(&mut self, topic: &str) -> Result<Vec<PartitionInfo>, KafkaError> {
        let resp = self.refresh_metadata_answer(&[topic])?;
        let ids = |v: &[BrokerId]| v.iter().map(|b| b.0).collect::<Vec<i32>>();
        let mut out: Vec<PartitionInfo> = resp
            .topics
            .iter()
            .filter(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == topic))
            .flat_map(|t| t.partitions.iter())
            .map(|p| PartitionInfo {
                partition: p.partition_index,
                leader: p.leader_id.0,
                replicas: ids(&p.replica_nodes),
                in_sync: ids(&p.isr_nodes),
            })
            .collect();
        out.sort_by_key(|p| p.partition);
        Ok(out)
    }
}

/// One partition as the cluster describes it ([`Client::describe_topic`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: i32,
    /// The leader's broker id; negative while there is none.
    pub leader: i32,
    pub replicas: Vec<i32>,
    /// The in-sync replicas.
    pub in_sync: Vec<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Kafka's `UtilsTest.testMurmur2` (Java signed ints).
    #[test]
    fn murmur2_matches_java() {
        for (key, want) in [
            (&b"21"[..], -973932308i32),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ] {
            assert_eq!(
                murmur2(key) as i32,
                want,
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn partitions_are_positive_and_stable() {
        for key in [&b""[..], b"a", b"shop", b"\xff\xff\xff\xff\xff"] {
            let p = partition_for_key(key, 7);
            assert!((0..7).contains(&p));
            assert_eq!(p, partition_for_key(key, 7));
        }
        // Java: toPositive(-790332482) % 3 == 1357151166 % 3 == 0
        assert_eq!(partition_for_key(b"foobar", 3), 1357151166 % 3);
        assert_eq!(partition_for_key(b"x", 0), 0);
    }

    /// A Fetch response with `partitions` (index, error code, high watermark) of topic `t`.
    fn fetch_response(partitions: &[(i32, i16, i64)]) -> FetchResponse {
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        let mut t = FetchableTopicResponse::default();
        t.topic = TopicName(StrBytes::from_static_str("t"));
        t.partitions = partitions
            .iter()
            .map(|&(index, code, hw)| {
                let mut p = PartitionData::default();
                p.partition_index = index;
                p.error_code = code;
                p.high_watermark = hw;
                p.log_start_offset = 0;
                p
            })
            .collect();
        let mut resp = FetchResponse::default();
        resp.responses = vec![t];
        resp
    }

    /// Issue 12: an answer without our partition (a newer tansu's answer to every zero-wait
    /// fetch) is "nothing yet": no records, no high watermark, the same offset next time.
    #[test]
    fn a_fetch_answer_without_our_partition_is_nothing_yet() {
        let nothing = |resp: &FetchResponse| {
            let f = read_fetch_response(resp, "t", 1, 1000).expect("nothing yet, not an error");
            assert!(f.records.is_empty());
            assert_eq!((f.high_watermark, f.next_offset), (None, 1000));
        };
        nothing(&FetchResponse::default());
        nothing(&fetch_response(&[]));
        nothing(&fetch_response(&[(0, 0, 3000), (2, 0, 3000)]));
    }

    #[test]
    fn a_fetch_answer_for_our_partition_says_where_it_ends_or_what_went_wrong() {
        let read = |parts: &[(i32, i16, i64)], offset| {
            read_fetch_response(&fetch_response(parts), "t", 1, offset)
        };
        let f = read(&[(1, 0, 3000)], 1000).expect("empty but fine");
        assert_eq!((f.high_watermark, f.next_offset), (Some(3000), 1000));
        assert!(f.records.is_empty());
        // An unknown (negative) high watermark is not a number to compute lag with.
        assert_eq!(read(&[(1, 0, -1)], 0).unwrap().high_watermark, None);
        assert!(matches!(
            read(&[(1, 0, 3000)], 3001),
            Err(KafkaError::OffsetOutOfRange {
                offset: 3001,
                high_watermark: Some(3000),
                ..
            })
        ));
        let e = read(&[(1, NOT_LEADER_OR_FOLLOWER, -1)], 0).unwrap_err();
        assert!(e.is_retriable() && e.stale_metadata(), "{e}");
        let mut top = fetch_response(&[(1, 0, 3000)]);
        top.error_code = UNKNOWN_TOPIC_ID;
        let e = read_fetch_response(&top, "t", 1, 0).unwrap_err();
        assert_eq!(e.to_string(), "Fetch t/1: UNKNOWN_TOPIC_ID (100)");
    }

    /// Found against a 3-node Apache Kafka: right after an election the new leader answers
    /// ListOffsets with OFFSET_NOT_AVAILABLE until it knows its high watermark; that, like a
    /// leader that is gone, is worth waiting out. No broker at all is not.
    #[test]
    fn leadership_moving_is_told_apart_from_no_cluster() {
        let broker = |api, code| KafkaError::broker(api, code, "t/0", None);
        assert!(leader_in_transition(&broker(conn::API_LIST_OFFSETS, 78)));
        assert!(leader_in_transition(&broker(
            conn::API_FETCH,
            NOT_LEADER_OR_FOLLOWER
        )));
        assert!(leader_in_transition(&KafkaError::io(
            "b:1",
            std::io::ErrorKind::ConnectionRefused.into()
        )));
        assert!(!leader_in_transition(&broker(conn::API_FETCH, 10)));
        let nobody = KafkaError::NoBroker {
            tried: vec!["b:1".into()],
            last: None,
        };
        assert!(!leader_in_transition(&nobody));
    }

    #[test]
    fn error_names_and_retriability() {
        assert_eq!(error_name(6), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(error_name(3), "UNKNOWN_TOPIC_OR_PARTITION");
        assert_eq!(error_name(1234), "UNKNOWN_ERROR_CODE_1234");
        let e = KafkaError::broker(conn::API_PRODUCE, 6, "t/1", None);
        assert_eq!(e.to_string(), "Produce t/1: NOT_LEADER_OR_FOLLOWER (6)");
        assert!(e.is_retriable());
        assert!(!KafkaError::broker(conn::API_PRODUCE, 10, "t/1", None).is_retriable());
        assert!(
            !KafkaError::OffsetOutOfRange {
                topic: "t".into(),
                partition: 0,
                offset: 5,
                high_watermark: None,
            }
            .is_retriable()
        );
        assert!(KafkaError::Timeout { broker: "b".into() }.is_retriable());
        // Causes are kept: the I/O error, and why the last bootstrap broker failed.
        use std::error::Error;
        let refused = || KafkaError::io("b:1", std::io::ErrorKind::ConnectionRefused.into());
        let io_kind = |e: &KafkaError| {
            e.source()
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map(|e| e.kind())
        };
        assert_eq!(
            io_kind(&refused()),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        let none = KafkaError::NoBroker {
            tried: vec!["b:1".into()],
            last: Some(Box::new(refused())),
        };
        let last = none.source().and_then(|s| s.downcast_ref::<KafkaError>());
        assert_eq!(
            last.and_then(io_kind),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        assert!(
            none.to_string()
                .starts_with("no Kafka broker reachable (tried b:1): broker b:1:")
        );
        assert!(!KafkaError::Auth("x".into()).is_retriable());
    }

    /// What a daemon stops for at start (exit 78) and what it waits out.
    #[test]
    fn config_errors_are_refusals_of_us_not_outages() {
        let broker = |code| KafkaError::broker(conn::API_PRODUCE, code, "t/0", None);
        for e in [
            KafkaError::Auth("broker b:1: SCRAM-SHA-512 authentication failed".into()),
            KafkaError::tls_refused("broker b:1: refused after the TLS handshake".into()),
            KafkaError::tls("broker b:1: TLS handshake failed".into(), "unknown ca"),
            broker(TOPIC_AUTHORIZATION_FAILED),
            broker(SASL_AUTHENTICATION_FAILED),
        ] {
            assert!(e.is_config() && !e.is_retriable(), "{e}");
        }
        let none = KafkaError::NoBroker {
            tried: vec!["b:1".into()],
            last: Some(Box::new(KafkaError::Auth("x".into()))),
        };
        assert!(none.is_config());
        for e in [
            KafkaError::Timeout { broker: "b".into() },
            KafkaError::io("b:1", std::io::ErrorKind::ConnectionRefused.into()),
            KafkaError::tls("broker b:1: TLS handshake failed".into(), "unexpected EOF"),
            broker(NOT_LEADER_OR_FOLLOWER),
            broker(10),
            KafkaError::UnknownTopic("t".into()),
        ] {
            assert!(!e.is_config(), "{e}");
        }
    }
}
