//! One connection to one broker: TCP (optionally TLS), the request/response framing, API
//! version negotiation and SASL authentication.
//!
//! A connection is strictly request → response (no pipelining), so a correlation id mismatch
//! is a protocol error, never a reordering to handle. Any I/O error leaves the stream in an
//! unknown state: the owner drops the connection and dials again.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiVersionsRequest, ApiVersionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    FetchRequest, FetchResponse, FindCoordinatorRequest, FindCoordinatorResponse, HeartbeatRequest,
    HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
    SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse, SyncGroupRequest,
    SyncGroupResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::sasl::{Scram, ScramHash, plain_message};
use super::{KafkaError, api_name, error_name};
use crate::config::{Sasl, SaslMechanism};

/// A response bigger than this is refused before reading it (a hostile or broken peer cannot
/// make us allocate more). Fetches are capped well below it.
pub const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// The API versions this client implements, as (key, min, max). Negotiation picks for each the
/// highest version inside both our range and the broker's.
pub const OUR_VERSIONS: &[(i16, i16, i16)] = &[
    (API_PRODUCE, 3, 11),
    // 12–15 are skipped at pick time (see `Versions::fetch`).
    (API_FETCH, 4, 17),
    (API_LIST_OFFSETS, 1, 9),
    (API_METADATA, 1, 12),
    (API_SASL_HANDSHAKE, 1, 1),
    (API_API_VERSIONS, 0, 3),
    (API_CREATE_TOPICS, 2, 7),
    (API_SASL_AUTHENTICATE, 0, 2),
    // The classic group protocol (the fleet). FindCoordinator from v1 (v0 has no key type),
    // JoinGroup from v2 (rebalance timeout; Kafka 4 refuses v0-1).
    (API_FIND_COORDINATOR, 1, 6),
    (API_JOIN_GROUP, 2, 9),
    (API_HEARTBEAT, 1, 4),
    (API_LEAVE_GROUP, 1, 5),
    (API_SYNC_GROUP, 1, 5),
];

/// The APIs a connection is refused without: every command needs them.
const REQUIRED_APIS: [i16; 4] = [API_METADATA, API_PRODUCE, API_FETCH, API_LIST_OFFSETS];

pub const API_PRODUCE: i16 = 0;
pub const API_FETCH: i16 = 1;
pub const API_LIST_OFFSETS: i16 = 2;
pub const API_METADATA: i16 = 3;
pub const API_FIND_COORDINATOR: i16 = 10;
pub const API_JOIN_GROUP: i16 = 11;
pub const API_HEARTBEAT: i16 = 12;
pub const API_LEAVE_GROUP: i16 = 13;
pub const API_SYNC_GROUP: i16 = 14;
pub const API_SASL_HANDSHAKE: i16 = 17;
pub const API_API_VERSIONS: i16 = 18;
pub const API_CREATE_TOPICS: i16 = 19;
pub const API_SASL_AUTHENTICATE: i16 = 36;

/// A request we send, tied to its API key and response type. (kafka-protocol has this as
/// `protocol::Request` only with its `broker` feature, which would compile the other half of
/// every message for nothing.)
pub trait Request: Encodable + HeaderVersion {
    const KEY: i16;
    type Response: Decodable + HeaderVersion;
}

macro_rules! requests {
    ($($req:ident => $resp:ident = $key:expr),* $(,)?) => {
        $(impl Request for $req {
            const KEY: i16 = $key;
            type Response = $resp;
        })*
    };
}

requests! {
    ProduceRequest => ProduceResponse = API_PRODUCE,
    FetchRequest => FetchResponse = API_FETCH,
    ListOffsetsRequest => ListOffsetsResponse = API_LIST_OFFSETS,
    MetadataRequest => MetadataResponse = API_METADATA,
    SaslHandshakeRequest => SaslHandshakeResponse = API_SASL_HANDSHAKE,
    ApiVersionsRequest => ApiVersionsResponse = API_API_VERSIONS,
    CreateTopicsRequest => CreateTopicsResponse = API_CREATE_TOPICS,
    SaslAuthenticateRequest => SaslAuthenticateResponse = API_SASL_AUTHENTICATE,
    FindCoordinatorRequest => FindCoordinatorResponse = API_FIND_COORDINATOR,
    JoinGroupRequest => JoinGroupResponse = API_JOIN_GROUP,
    HeartbeatRequest => HeartbeatResponse = API_HEARTBEAT,
    LeaveGroupRequest => LeaveGroupResponse = API_LEAVE_GROUP,
    SyncGroupRequest => SyncGroupResponse = API_SYNC_GROUP,
}

/// Settings shared by every connection of a client.
#[derive(Clone)]
pub struct ConnSettings {
    pub client_id: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub tls: Option<Arc<native_tls::TlsConnector>>,
    pub sasl: Option<Sasl>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The broker's version ranges, and our pick for each API.
#[derive(Clone, Debug, Default)]
pub struct Versions {
    /// api key → (broker min, broker max), as advertised.
    pub broker: HashMap<i16, (i16, i16)>,
}

impl Versions {
    /// The highest version of `api` both sides support, or `BrokerTooOld`.
    pub fn pick(&self, api: i16, addr: &str) -> Result<i16, KafkaError> {
        let (_, ours_min, ours_max) = OUR_VERSIONS
            .iter()
            .copied()
            .find(|(k, _, _)| *k == api)
            .unwrap_or((api, 0, -1));
        let theirs = self.broker.get(&api).copied();
        match theirs {
            Some((min, max)) if max.min(ours_max) >= min.max(ours_min) => Ok(max.min(ours_max)),
            _ => Err(KafkaError::BrokerTooOld {
                broker: addr.to_string(),
                api: api_name(api),
                ours: (ours_min, ours_max),
                theirs,
            }),
        }
    }

    /// The version we will use of every API we implement, by name. An API every command needs
    /// (Metadata, Produce, Fetch, ListOffsets) that the broker lacks is `BrokerTooOld` naming
    /// it; the others (CreateTopics, SASL) are left out and fail only when used.
    pub fn negotiated(&self, addr: &str) -> Result<Vec<(&'static str, i16)>, KafkaError> {
        let mut picked = Vec::with_capacity(OUR_VERSIONS.len());
        for &(api, _, _) in OUR_VERSIONS {
            let v = if api == API_FETCH {
                self.fetch(addr)
            } else {
                self.pick(api, addr)
            };
            match v {
                Ok(v) => picked.push((api_name(api), v)),
                Err(e) if REQUIRED_APIS.contains(&api) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(picked)
    }

    /// Fetch version: as `pick`, but never 12–15. tansu answers those with a field that only
    /// exists from v16 (DESIGN.md), and v11 carries everything we read, so skipping them costs
    /// nothing against a real Kafka.
    pub fn fetch(&self, addr: &str) -> Result<i16, KafkaError> {
        let v = self.pick(API_FETCH, addr)?;
        Ok(if (12..=15).contains(&v) { 11 } else { v })
    }
}

/// A connected, negotiated and authenticated broker connection.
pub struct Conn {
    stream: Stream,
    /// A handle on the socket for changing timeouts under TLS.
    socket: TcpStream,
    pub addr: String,
    correlation: i32,
    client_id: StrBytes,
    pub versions: Versions,
    request_timeout: Duration,
}

impl Conn {
    /// Dials `addr` (`host:port`), does TLS when configured, ApiVersions, then SASL.
    pub fn open(addr: &str, s: &ConnSettings) -> Result<Conn, KafkaError> {
        let (host, _) = split_host_port(addr)?;
        let io_err = |e: io::Error| KafkaError::io(addr, e);
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| KafkaError::Io {
                broker: addr.to_string(),
                error: io::Error::new(e.kind(), format!("cannot resolve: {e}")),
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, s.connect_timeout) {
                Ok(t) => {
                    tcp = Some(t);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or_else(|| io_err(last))?;
        tcp.set_nodelay(true).map_err(io_err)?;
        tcp.set_read_timeout(Some(s.request_timeout))
            .map_err(io_err)?;
        tcp.set_write_timeout(Some(s.request_timeout))
            .map_err(io_err)?;
        let socket = tcp.try_clone().map_err(io_err)?;
        let stream = match &s.tls {
            None => Stream::Plain(tcp),
            Some(connector) => {
                let tls = connector.connect(host, tcp).map_err(|e| match e {
                    native_tls::HandshakeError::Failure(e) => {
                        // OpenSSL ends with "(hostname mismatch)" / "(IP address mismatch)".
                        let hint = if e.to_string().contains("mismatch)") {
                            format!(
                                " (the broker's certificate does not name {host}; \
                                 kafka.tls.verify_hostname is on)"
                            )
                        } else {
                            String::new()
                        };
                        KafkaError::tls(format!("broker {addr}: TLS handshake failed{hint}"), e)
                    }
                    // The socket's timeout ended the handshake half-way: a silent broker, not
                    // a refusal (retried like any timeout).
                    native_tls::HandshakeError::WouldBlock(_) => KafkaError::Timeout {
                        broker: addr.to_string(),
                    },
                })?;
                Stream::Tls(Box::new(tls))
            }
        };
        let mut conn = Conn {
            stream,
            socket,
            addr: addr.to_string(),
            correlation: 0,
            client_id: StrBytes::from_string(s.client_id.clone()),
            versions: Versions::default(),
            request_timeout: s.request_timeout,
        };
        let tls = s.tls.is_some();
        conn.negotiate().map_err(|e| match e {
            // Under TLS 1.3 the server checks our certificate after the handshake, so its
            // refusal arrives on the first read as an OpenSSL error (ErrorKind::Other).
            KafkaError::Io { broker, error } if tls && error.kind() == io::ErrorKind::Other => {
                KafkaError::tls(
                    format!(
                        "broker {broker}: refused after the TLS handshake ({})",
                        client_cert_refusal(&error.to_string())
                    ),
                    error,
                )
            }
            // A TLS listener takes our plaintext request for a broken handshake and hangs up
            // without a word; say the likely cause instead of "failed to fill whole buffer".
            KafkaError::Io { broker, error }
                if !tls
                    && matches!(
                        error.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
            {
                KafkaError::Io {
                    broker,
                    error: io::Error::new(
                        error.kind(),
                        format!(
                            "closed by the broker on our first request ({error}); \
                             is it a TLS listener? (then set [kafka.tls])"
                        ),
                    ),
                }
            }
            e => e,
        })?;
        if let Some(sasl) = &s.sasl {
            conn.authenticate(sasl)?;
        }
        Ok(conn)
    }

    /// ApiVersions v3, falling back to v0 for brokers older than 2.4 (they answer an
    /// unsupported ApiVersions with error 35 in the v0 layout).
    fn negotiate(&mut self) -> Result<(), KafkaError> {
        let mut req = ApiVersionsRequest::default();
        req.client_software_name = StrBytes::from_static_str("sitewatch");
        req.client_software_version = StrBytes::from_static_str(env!("CARGO_PKG_VERSION"));
        let resp = match self.call(&req, 3) {
            Ok(r) if r.error_code == 0 => r,
            Ok(r) if r.error_code != 35 => {
                return Err(KafkaError::broker(
                    API_API_VERSIONS,
                    r.error_code,
                    &self.addr,
                    None,
                ));
            }
            Err(e @ (KafkaError::Io { .. } | KafkaError::Timeout { .. })) => return Err(e),
            _ => self.call(&ApiVersionsRequest::default(), 0)?,
        };
        if resp.error_code != 0 {
            return Err(KafkaError::broker(
                API_API_VERSIONS,
                resp.error_code,
                &self.addr,
                None,
            ));
        }
        self.versions.broker = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        // Fail now, with the API named, rather than at the first produce.
        let picked = self.versions.negotiated(&self.addr)?;
        log::debug!(
            target: "sitewatch::kafka",
            "broker {}: negotiated {}",
            self.addr,
            picked
                .iter()
                .map(|(api, v)| format!("{api} v{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }

    fn authenticate(&mut self, sasl: &Sasl) -> Result<(), KafkaError> {
        let mechanism = match sasl.mechanism {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => ScramHash::Sha256.mechanism(),
            SaslMechanism::ScramSha512 => ScramHash::Sha512.mechanism(),
        };
        let v = self.versions.pick(API_SASL_HANDSHAKE, &self.addr)?;
        let mut hs = SaslHandshakeRequest::default();
        hs.mechanism = StrBytes::from_static_str(mechanism);
        let resp = self.call(&hs, v)?;
        if resp.error_code != 0 {
            let offered: Vec<&str> = resp.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(KafkaError::Auth(format!(
                "broker {}: SASL {mechanism} refused ({}); broker offers {offered:?}",
                self.addr,
                error_name(resp.error_code)
            )));
        }
        let password = sasl.password.expose();
        match sasl.mechanism {
            SaslMechanism::Plain => {
                self.sasl_round(mechanism, sasl, &plain_message(&sasl.username, password))?;
            }
            SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
                let hash = if sasl.mechanism == SaslMechanism::ScramSha256 {
                    ScramHash::Sha256
                } else {
                    ScramHash::Sha512
                };
                let mut scram = Scram::new(hash, &sasl.username, password);
                let server_first = self.sasl_round(mechanism, sasl, &scram.client_first())?;
                let fin = scram.client_final(&server_first)?;
                let server_final = self.sasl_round(mechanism, sasl, &fin)?;
                scram.verify_server_final(&server_final)?;
            }
        }
        log::debug!(target: "sitewatch::kafka", "broker {}: SASL {mechanism} as {:?} ok", self.addr, sasl.username);
        Ok(())
    }

    /// One SaslAuthenticate exchange; the bytes sent may hold the password, so they are never
    /// put in an error. A refusal names the mechanism and the user, so the operator knows
    /// which credentials to check.
    fn sasl_round(
        &mut self,
        mechanism: &str,
        sasl: &Sasl,
        auth: &[u8],
    ) -> Result<Vec<u8>, KafkaError> {
        let v = self.versions.pick(API_SASL_AUTHENTICATE, &self.addr)?;
        let mut req = SaslAuthenticateRequest::default();
        req.auth_bytes = Bytes::copy_from_slice(auth);
        let resp = self.call(&req, v)?;
        if resp.error_code != 0 {
            return Err(KafkaError::Auth(format!(
                "broker {}: {mechanism} authentication failed for user {:?} ({}){}",
                self.addr,
                sasl.username,
                error_name(resp.error_code),
                resp.error_message
                    .map(|m| format!(": {}", m.as_str()))
                    .unwrap_or_default()
            )));
        }
        Ok(resp.auth_bytes.to_vec())
    }

    /// Sends `req` as `version` and reads its response. `extra_wait` lengthens the read
    /// timeout for requests the broker may legitimately hold (Fetch max wait, Produce acks).
    pub fn call_with_wait<R: Request>(
        &mut self,
        req: &R,
        version: i16,
        extra_wait: Duration,
    ) -> Result<R::Response, KafkaError> {
        self.socket
            .set_read_timeout(Some(self.request_timeout + extra_wait))
            .map_err(|e| KafkaError::io(&self.addr, e))?;
        self.exchange(req, version)
    }

    /// Sends `req` as `version` and reads its response within the request timeout.
    pub fn call<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response, KafkaError> {
        self.call_with_wait(req, version, Duration::ZERO)
    }

    fn exchange<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response, KafkaError> {
        self.correlation = self.correlation.wrapping_add(1);
        let mut header = RequestHeader::default();
        header.request_api_key = R::KEY;
        header.request_api_version = version;
        header.correlation_id = self.correlation;
        header.client_id = Some(self.client_id.clone());
        let api = api_name(R::KEY);
        let enc = |e: String| KafkaError::Protocol(format!("{api} v{version}: encode: {e}"));
        let mut buf = BytesMut::with_capacity(256);
        buf.extend_from_slice(&[0, 0, 0, 0]);
        header
            .encode(&mut buf, R::header_version(version))
            .map_err(|e| enc(e.to_string()))?;
        req.encode(&mut buf, version)
            .map_err(|e| enc(e.to_string()))?;
        let len = i32::try_from(buf.len() - 4).map_err(|_| enc("request too large".into()))?;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        self.stream
            .write_all(&buf)
            .and_then(|_| self.stream.flush())
            .map_err(|e| KafkaError::io(&self.addr, e))?;

        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .map_err(|e| KafkaError::io(&self.addr, e))?;
        let len = i32::from_be_bytes(len);
        if len < 4 || len as usize > MAX_RESPONSE {
            return Err(KafkaError::Protocol(format!(
                "{api} v{version}: broker {} sent a response of {len} bytes",
                self.addr
            )));
        }
        // Read incrementally: a peer that announces a big frame and sends nothing costs no
        // memory.
        let mut body = Vec::new();
        (&mut self.stream)
            .take(len as u64)
            .read_to_end(&mut body)
            .map_err(|e| KafkaError::io(&self.addr, e))?;
        if body.len() != len as usize {
            return Err(KafkaError::io(
                &self.addr,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                ),
            ));
        }
        let mut body = Bytes::from(body);
        let dec = |e: String| {
            KafkaError::Protocol(format!(
                "{api} v{version}: cannot decode the response of {}: {e}",
                self.addr
            ))
        };
        let rh = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .map_err(|e| dec(e.to_string()))?;
        if rh.correlation_id != self.correlation {
            return Err(dec(format!(
                "correlation id {} (expected {})",
                rh.correlation_id, self.correlation
            )));
        }
        R::Response::decode(&mut body, version).map_err(|e| dec(e.to_string()))
    }
}

/// What the TLS alert a broker sends after the handshake says about our client certificate.
/// Java sends `bad certificate` (OpenSSL: `certificate required`) when we sent none, and
/// `certificate unknown` (OpenSSL: `unknown ca`) for one it does not trust.
fn client_cert_refusal(alert: &str) -> &'static str {
    if alert.contains("certificate required") || alert.contains("bad certificate") {
        "the broker requires a client certificate: none sent? set kafka.tls cert_file and key_file"
    } else if alert.contains("certificate unknown") || alert.contains("unknown ca") {
        "the broker does not trust our client certificate: signed by a CA it does not know?"
    } else {
        "client certificate?"
    }
}

/// `host:port` or `[v6]:port` → (host without brackets, port).
pub fn split_host_port(addr: &str) -> Result<(&str, u16), KafkaError> {
    let bad = || KafkaError::Config(format!("broker address {addr:?}: expected host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_pick() {
        let mut v = Versions::default();
        v.broker.insert(API_PRODUCE, (0, 9));
        v.broker.insert(API_FETCH, (4, 13));
        v.broker.insert(API_METADATA, (0, 0));
        assert_eq!(v.pick(API_PRODUCE, "b").unwrap(), 9);
        assert_eq!(v.fetch("b").unwrap(), 11);
        let old = v.pick(API_METADATA, "b:1").unwrap_err().to_string();
        assert!(
            old.contains("Metadata") && old.contains("b:1") && old.contains("too old"),
            "{old}"
        );
        assert!(v.pick(API_LIST_OFFSETS, "b").is_err());
        v.broker.insert(API_FETCH, (4, 17));
        assert_eq!(v.fetch("b").unwrap(), 17);
    }

    /// What Kafka 4.1 advertises for the APIs we use (ApiVersions of a 4.1.1 broker).
    fn kafka_4_1() -> Versions {
        let mut v = Versions::default();
        for (api, min, max) in [
            (API_PRODUCE, 3, 12),
            (API_FETCH, 4, 17),
            (API_LIST_OFFSETS, 1, 10),
            (API_METADATA, 0, 13),
            (API_SASL_HANDSHAKE, 0, 1),
            (API_API_VERSIONS, 0, 4),
            (API_CREATE_TOPICS, 2, 7),
            (API_SASL_AUTHENTICATE, 0, 2),
        ] {
            v.broker.insert(api, (min, max));
        }
        v
    }

    #[test]
    fn negotiation_names_each_version_and_refuses_a_broker_without_one_we_need() {
        let v = kafka_4_1();
        let picked = v.negotiated("b:1").unwrap();
        assert_eq!(
            picked,
            vec![
                ("Produce", 11),
                ("Fetch", 17),
                ("ListOffsets", 9),
                ("Metadata", 12),
                ("SaslHandshake", 1),
                ("ApiVersions", 3),
                ("CreateTopics", 7),
                ("SaslAuthenticate", 2),
            ]
        );
        // A broker without an optional API still connects; one without a needed API is
        // refused with the API named, whether it lacks it or only has versions we do not.
        let mut no_create = kafka_4_1();
        no_create.broker.remove(&API_CREATE_TOPICS);
        assert!(no_create.negotiated("b:1").is_ok());
        for (api, name, range) in [
            (API_PRODUCE, "Produce", None),
            (API_LIST_OFFSETS, "ListOffsets", Some((0, 0))),
            (API_FETCH, "Fetch", Some((0, 3))),
        ] {
            let mut v = kafka_4_1();
            match range {
                None => v.broker.remove(&api),
                Some(r) => v.broker.insert(api, r),
            };
            let err = v.negotiated("b:1").unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, KafkaError::BrokerTooOld { .. }), "{text}");
            assert!(text.contains(&format!("we need {name} v")), "{text}");
            assert!(text.contains("broker b:1"), "{text}");
            if range.is_none() {
                assert!(
                    text.contains(&format!("does not support {name} at all")),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn client_certificate_refusals_say_which() {
        for (alert, want) in [
            (
                "ssl3_read_bytes:sslv3 alert bad certificate:..:SSL alert number 42",
                "none sent",
            ),
            ("tls alert certificate required ... number 116", "none sent"),
            (
                "sslv3 alert certificate unknown ... number 46",
                "does not trust",
            ),
            ("tlsv1 alert unknown ca ... number 48", "does not trust"),
            ("tlsv1 alert internal error", "client certificate?"),
        ] {
            assert!(client_cert_refusal(alert).contains(want), "{alert}");
        }
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a.b:9092").unwrap(), ("a.b", 9092));
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1", 9));
        assert!(split_host_port("nohost").is_err());
        assert!(split_host_port(":9").is_err());
    }
}
