//! Membership of a classic Kafka consumer group (protocol type `consumer`, assignor `range`):
//! FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup. The fleet uses it to split
//! the targets topic's partitions between the live agents of a location; because it speaks
//! the standard consumer protocol, a librdkafka or Java consumer with the range assignor can
//! be a member of the same group.
//!
//! Eager rebalancing, as the range assignor implies: a member that learns of a rebalance
//! gives up every partition before it rejoins, so two members never own one partition in the
//! same generation. The [`Member`] is the state (one blocking call per protocol step);
//! [`run`] is the loop the `fleet-group` thread runs: join, then heartbeat every
//! `heartbeat_interval` until the coordinator asks for a rebalance, the member is fenced or
//! shutdown comes (then LeaveGroup, so the others take over at once instead of after the
//! session timeout).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedPartitions;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, FindCoordinatorRequest, GroupId,
    HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::conn::{self, Conn};
use super::{Client, KafkaError};
use crate::backoff::Backoff;
use crate::service::Shutdown;

/// The protocol type every Kafka consumer uses; members of other types cannot share a group.
pub const PROTOCOL_TYPE: &str = "consumer";
/// The assignor's name, as Java and librdkafka spell it.
pub const RANGE: &str = "range";

const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
const COORDINATOR_NOT_AVAILABLE: i16 = 15;
const NOT_COORDINATOR: i16 = 16;
const ILLEGAL_GENERATION: i16 = 22;
const UNKNOWN_MEMBER_ID: i16 = 25;
const REBALANCE_IN_PROGRESS: i16 = 27;
const MEMBER_ID_REQUIRED: i16 = 79;
const FENCED_INSTANCE_ID: i16 = 82;

/// What a member needs to know about its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSettings {
    pub group_id: String,
    /// The one topic this member subscribes to.
    pub topic: String,
    pub session_timeout: Duration,
    /// How long the coordinator waits for members to rejoin; ours rejoin within one
    /// heartbeat, so the session timeout is plenty.
    pub rebalance_timeout: Duration,
    pub heartbeat_interval: Duration,
}

/// Why a group step failed. Each keeps its cause.
#[derive(Debug)]
#[non_exhaustive]
pub enum GroupError {
    /// Talking to Kafka failed (connection, timeout, an error code we do not handle here).
    Kafka(KafkaError),
    /// The coordinator moved or is loading: find it again.
    CoordinatorMoved { api: &'static str, code: i16 },
    /// The generation is over (a rebalance started) or we were removed from the group:
    /// give up the partitions and join again.
    Rejoin { api: &'static str, code: i16 },
    /// A member's subscription or our assignment does not decode.
    Decode { what: String, error: String },
}

impl GroupError {
    fn from_code(api: i16, code: i16, group: &str) -> GroupError {
        let api_name = super::api_name(api);
        match code {
            COORDINATOR_LOAD_IN_PROGRESS | COORDINATOR_NOT_AVAILABLE | NOT_COORDINATOR => {
                GroupError::CoordinatorMoved {
                    api: api_name,
                    code,
                }
            }
            ILLEGAL_GENERATION | UNKNOWN_MEMBER_ID | REBALANCE_IN_PROGRESS | FENCED_INSTANCE_ID => {
                GroupError::Rejoin {
                    api: api_name,
                    code,
                }
            }
            _ => GroupError::Kafka(KafkaError::broker(
                api,
                code,
                &format!("group {group}"),
                None,
            )),
        }
    }

    /// Whether our member id is unknown to the coordinator (join again with none).
    fn forgets_member(&self) -> bool {
        matches!(self, GroupError::Rejoin { code, .. } if *code == UNKNOWN_MEMBER_ID || *code == FENCED_INSTANCE_ID)
    }

    /// Whether the coordinator connection should be dropped and the coordinator found again.
    fn lost_coordinator(&self) -> bool {
        match self {
            GroupError::CoordinatorMoved { .. } => true,
            GroupError::Kafka(e) => e.breaks_connection(),
            _ => false,
        }
    }
}

impl fmt::Display for GroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupError::Kafka(e) => e.fmt(f),
            GroupError::CoordinatorMoved { api, code } | GroupError::Rejoin { api, code } => {
                write!(f, "{api}: {} ({code})", super::error_name(*code))
            }
            GroupError::Decode { what, error } => write!(f, "cannot decode {what}: {error}"),
        }
    }
}

impl std::error::Error for GroupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GroupError::Kafka(e) => Some(e),
            _ => None,
        }
    }
}

impl From<KafkaError> for GroupError {
    fn from(e: KafkaError) -> GroupError {
        GroupError::Kafka(e)
    }
}

/// One member's subscription as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub member_id: String,
    /// Java sorts by this when set (static membership), else by member id.
    pub group_instance_id: Option<String>,
    pub topics: Vec<String>,
}

/// Kafka's `RangeAssignor`: per topic, the members subscribed to it sorted by (instance id or)
/// member id, the partitions sorted by number; each member gets a consecutive range of
/// `partitions / members`, and the first `partitions % members` get one more. Returns, per
/// member id, topic → partitions (members with nothing get an empty map).
pub fn range_assign(
    members: &[Subscription],
    partitions: &BTreeMap<String, Vec<i32>>,
) -> BTreeMap<String, BTreeMap<String, Vec<i32>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<i32>>> = members
        .iter()
        .map(|m| (m.member_id.clone(), BTreeMap::new()))
        .collect();
    for (topic, parts) in partitions {
        let mut subscribed: Vec<&Subscription> = members
            .iter()
            .filter(|m| m.topics.iter().any(|t| t == topic))
            .collect();
        if subscribed.is_empty() {
            continue;
        }
        subscribed.sort_by(|a, b| {
            let key = |m: &Subscription| m.group_instance_id.clone().unwrap_or_default();
            (key(a), &a.member_id).cmp(&(key(b), &b.member_id))
        });
        let mut parts = parts.clone();
        parts.sort_unstable();
        let per = parts.len() / subscribed.len();
        let extra = parts.len() % subscribed.len();
        for (i, m) in subscribed.iter().enumerate() {
            let start = per * i + i.min(extra);
            let len = per + usize::from(i < extra);
            if len > 0 {
                out.entry(m.member_id.clone())
                    .or_default()
                    .insert(topic.clone(), parts[start..start + len].to_vec());
            }
        }
    }
    out
}

/// `i16 version` + the body, as every consumer-protocol blob is framed.
fn framed<T: Encodable>(msg: &T, version: i16) -> Result<Bytes, GroupError> {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&version.to_be_bytes());
    msg.encode(&mut buf, version)
        .map_err(|e| GroupError::Decode {
            what: "our own consumer-protocol message".into(),
            error: e.to_string(),
        })?;
    Ok(buf.freeze())
}

/// Reads a framed consumer-protocol blob written by any version (a newer one than we know is
/// read as the newest we know: the format only ever appends fields).
fn unframe<T: Decodable>(mut bytes: Bytes, what: &str, newest: i16) -> Result<T, GroupError> {
    let bad = |error: String| GroupError::Decode {
        what: what.to_string(),
        error,
    };
    if bytes.len() < 2 {
        return Err(bad(format!("{} bytes", bytes.len())));
    }
    let version = i16::from_be_bytes([bytes[0], bytes[1]]);
    let _ = bytes.split_to(2);
    if version < 0 {
        return Err(bad(format!("version {version}")));
    }
    T::decode(&mut bytes, version.min(newest)).map_err(|e| bad(e.to_string()))
}

/// Our subscription to `topic` (version 0: topics only; every client reads it).
pub fn encode_subscription(topic: &str) -> Result<Bytes, GroupError> {
    let mut s = ConsumerProtocolSubscription::default();
    s.topics = vec![StrBytes::from_string(topic.to_string())];
    framed(&s, 0)
}

/// A member's subscription blob → its topics.
pub fn decode_subscription(bytes: Bytes, member: &str) -> Result<Vec<String>, GroupError> {
    let s: ConsumerProtocolSubscription =
        unframe(bytes, &format!("the subscription of member {member}"), 3)?;
    Ok(s.topics.iter().map(|t| t.to_string()).collect())
}

/// An assignment (topic → partitions) as a version-0 blob.
pub fn encode_assignment(topics: &BTreeMap<String, Vec<i32>>) -> Result<Bytes, GroupError> {
    let mut a = ConsumerProtocolAssignment::default();
    a.assigned_partitions = topics
        .iter()
        .map(|(t, ps)| {
            let mut tp = AssignedPartitions::default();
            tp.topic = TopicName(StrBytes::from_string(t.clone()));
            tp.partitions = ps.clone();
            tp
        })
        .collect();
    framed(&a, 0)
}

/// Our assignment blob → our partitions of `topic`, sorted. An empty blob is no partitions
/// (what a coordinator sends a member the leader left out).
pub fn decode_assignment(bytes: Bytes, topic: &str) -> Result<Vec<i32>, GroupError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let a: ConsumerProtocolAssignment = unframe(bytes, "our assignment", 3)?;
    let mut parts: Vec<i32> = a
        .assigned_partitions
        .iter()
        .filter(|tp| tp.topic.0.as_str() == topic)
        .flat_map(|tp| tp.partitions.iter().copied())
        .collect();
    parts.sort_unstable();
    parts.dedup();
    Ok(parts)
}

/// One generation's outcome for this member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub generation: i32,
    /// Our partitions of the subscribed topic, sorted.
    pub partitions: Vec<i32>,
    /// Whether we led this generation (computed the assignment).
    pub leader: bool,
    /// Members in the group (known to the leader only; 0 for followers).
    pub members: usize,
}

/// A member of one group: its client (for metadata and FindCoordinator), its coordinator
/// connection, its member id and generation.
pub struct Member {
    client: Client,
    settings: GroupSettings,
    coordinator: Option<Conn>,
    member_id: String,
    generation: i32,
    /// As leader: how many partitions each subscribed topic had when this generation was
    /// assigned (0: the topic did not exist). See [`Member::topics_changed`].
    assigned_counts: BTreeMap<String, usize>,
}

impl Member {
    pub fn new(client: Client, settings: GroupSettings) -> Member {
        Member {
            client,
            settings,
            coordinator: None,
            member_id: String::new(),
            assigned_counts: BTreeMap::new(),
            generation: -1,
        }
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    pub fn settings(&self) -> &GroupSettings {
        &self.settings
    }

    /// The coordinator's connection, found (FindCoordinator on any broker) and dialed when
    /// there is none.
    fn coordinator(&mut self) -> Result<&mut Conn, GroupError> {
        if self.coordinator.is_none() {
            let group = self.settings.group_id.clone();
            let (code, host, port) = self.client.with_any_broker(|c| {
                let v = c.versions.pick(conn::API_FIND_COORDINATOR, &c.addr)?;
                let mut req = FindCoordinatorRequest::default();
                req.key_type = 0;
                if v >= 4 {
                    req.coordinator_keys = vec![StrBytes::from_string(group.clone())];
                } else {
                    req.key = StrBytes::from_string(group.clone());
                }
                let resp = c.call(&req, v)?;
                Ok(match resp.coordinators.first() {
                    Some(k) if v >= 4 => (k.error_code, k.host.to_string(), k.port),
                    _ => (resp.error_code, resp.host.to_string(), resp.port),
                })
            })?;
            if code != 0 {
                return Err(GroupError::from_code(
                    conn::API_FIND_COORDINATOR,
                    code,
                    &group,
                ));
            }
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let c = Conn::open(&addr, self.client.conn_settings())?;
            log::debug!(target: "sitewatch::fleet", "group {group}: coordinator {addr}");
            self.coordinator = Some(c);
        }
        self.coordinator
            .as_mut()
            .ok_or_else(|| GroupError::Kafka(KafkaError::Protocol("no coordinator".into())))
    }

    /// Runs one request on the coordinator; a broken connection is dropped.
    fn on_coordinator<T>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<T, KafkaError>,
    ) -> Result<T, GroupError> {
        let c = self.coordinator()?;
        let result = f(c);
        if let Err(e) = &result
            && e.breaks_connection()
        {
            self.coordinator = None;
        }
        Ok(result?)
    }

    /// Drops what we know of the coordinator (it moved or its connection broke).
    pub fn forget_coordinator(&mut self) {
        self.coordinator = None;
    }

    /// JoinGroup then SyncGroup: this member's partitions for the new generation. The leader
    /// computes the range assignment for every member.
    pub fn join(&mut self) -> Result<Assignment, GroupError> {
        let group = self.settings.group_id.clone();
        let subscription = encode_subscription(&self.settings.topic)?;
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        let mut req = JoinGroupRequest::default();
        req.group_id = GroupId(StrBytes::from_string(group.clone()));
        req.session_timeout_ms = ms(self.settings.session_timeout);
        req.rebalance_timeout_ms = ms(self.settings.rebalance_timeout);
        req.protocol_type = StrBytes::from_static_str(PROTOCOL_TYPE);
        let mut proto = JoinGroupRequestProtocol::default();
        proto.name = StrBytes::from_static_str(RANGE);
        proto.metadata = subscription;
        req.protocols = vec![proto];
        // The coordinator holds the answer until every member has rejoined (at most the
        // rebalance timeout).
        let wait = self.settings.rebalance_timeout;
        let mut tries = 0;
        let resp = loop {
            tries += 1;
            req.member_id = StrBytes::from_string(self.member_id.clone());
            let (resp, v) = self.on_coordinator(|c| {
                let v = c.versions.pick(conn::API_JOIN_GROUP, &c.addr)?;
                Ok((c.call_with_wait(&req, v, wait)?, v))
            })?;
            // v4+: the first join only hands out a member id, to be used in a second one.
            if resp.error_code == MEMBER_ID_REQUIRED && tries < 3 {
                self.member_id = resp.member_id.to_string();
                continue;
            }
            if resp.error_code == UNKNOWN_MEMBER_ID && tries < 3 {
                self.member_id.clear();
                continue;
            }
            if resp.error_code != 0 {
                return Err(GroupError::from_code(
                    conn::API_JOIN_GROUP,
                    resp.error_code,
                    &group,
                ));
            }
            log::debug!(target: "sitewatch::fleet", "group {group}: JoinGroup v{v}: generation {}", resp.generation_id);
            break resp;
        };
        self.member_id = resp.member_id.to_string();
        self.generation = resp.generation_id;
        let leader = resp.leader.as_str() == self.member_id;
        let members = resp.members.len();
        self.assigned_counts.clear();
        let assignments = if leader {
            let subs = resp
                .members
                .iter()
                .map(|m| {
                    Ok(Subscription {
                        member_id: m.member_id.to_string(),
                        group_instance_id: m.group_instance_id.as_ref().map(|s| s.to_string()),
                        topics: decode_subscription(m.metadata.clone(), m.member_id.as_str())?,
                    })
                })
                .collect::<Result<Vec<_>, GroupError>>()?;
            self.leader_assignments(&subs)?
        } else {
            Vec::new()
        };
        let partitions = self.sync(resp.protocol_name.as_ref(), assignments)?;
        Ok(Assignment {
            generation: self.generation,
            partitions,
            leader,
            members,
        })
    }

    /// The leader's work: the partitions of every subscribed topic, split by the range
    /// assignor, encoded per member.
    fn leader_assignments(
        &mut self,
        subs: &[Subscription],
    ) -> Result<Vec<SyncGroupRequestAssignment>, GroupError> {
        let mut partitions = BTreeMap::new();
        for topic in subs.iter().flat_map(|s| s.topics.iter()) {
            if partitions.contains_key(topic) {
                continue;
            }
            // A topic another member subscribes to that does not exist gets no partitions.
            match self.client.partitions_now(topic) {
                Ok(p) => {
                    partitions.insert(topic.clone(), p);
                }
                Err(KafkaError::UnknownTopic(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.assigned_counts = subs
            .iter()
            .flat_map(|s| s.topics.iter())
            .map(|t| (t.clone(), partitions.get(t).map_or(0, Vec::len)))
            .collect();
        range_assign(subs, &partitions)
            .into_iter()
            .map(|(member, topics)| {
                let mut a = SyncGroupRequestAssignment::default();
                a.member_id = StrBytes::from_string(member);
                a.assignment = encode_assignment(&topics)?;
                Ok(a)
            })
            .collect()
    }

    fn sync(
        &mut self,
        protocol_name: Option<&StrBytes>,
        assignments: Vec<SyncGroupRequestAssignment>,
    ) -> Result<Vec<i32>, GroupError> {
        let group = self.settings.group_id.clone();
        let mut req = SyncGroupRequest::default();
        req.group_id = GroupId(StrBytes::from_string(group.clone()));
        req.generation_id = self.generation;
        req.member_id = StrBytes::from_string(self.member_id.clone());
        req.protocol_type = Some(StrBytes::from_static_str(PROTOCOL_TYPE));
        req.protocol_name = Some(
            protocol_name
                .cloned()
                .unwrap_or_else(|| StrBytes::from_static_str(RANGE)),
        );
        req.assignments = assignments;
        // Followers wait for the leader's SyncGroup (bounded by the rebalance timeout).
        let wait = self.settings.rebalance_timeout;
        let resp = self.on_coordinator(|c| {
            let v = c.versions.pick(conn::API_SYNC_GROUP, &c.addr)?;
            c.call_with_wait(&req, v, wait)
        })?;
        if resp.error_code != 0 {
            return Err(GroupError::from_code(
                conn::API_SYNC_GROUP,
                resp.error_code,
                &group,
            ));
        }
        decode_assignment(resp.assignment, &self.settings.topic)
    }

    /// One heartbeat of the current generation.
    /// As leader: whether a subscribed topic's partition count differs from the one this
    /// generation was assigned with (a topic created after the group formed, or grown), as
    /// the Java consumer's leader watches its metadata. The leader then joins again, which
    /// starts a new generation for every member. A follower has nothing to compare.
    pub fn topics_changed(&mut self) -> Result<bool, GroupError> {
        let topics: Vec<(String, usize)> = self
            .assigned_counts
            .iter()
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        for (topic, assigned) in topics {
            let now = match self.client.partitions_now(&topic) {
                Ok(p) => p.len(),
                Err(KafkaError::UnknownTopic(_)) => 0,
                Err(e) => return Err(e.into()),
            };
            if now != assigned {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn heartbeat(&mut self) -> Result<(), GroupError> {
        let group = self.settings.group_id.clone();
        let mut req = HeartbeatRequest::default();
        req.group_id = GroupId(StrBytes::from_string(group.clone()));
        req.generation_id = self.generation;
        req.member_id = StrBytes::from_string(self.member_id.clone());
        let resp = self.on_coordinator(|c| {
            let v = c.versions.pick(conn::API_HEARTBEAT, &c.addr)?;
            c.call(&req, v)
        })?;
        match resp.error_code {
            0 => Ok(()),
            code => Err(GroupError::from_code(conn::API_HEARTBEAT, code, &group)),
        }
    }

    /// Leaves the group, so a rebalance starts now rather than after the session timeout.
    pub fn leave(&mut self) -> Result<(), GroupError> {
        if self.member_id.is_empty() {
            return Ok(());
        }
        let group = self.settings.group_id.clone();
        let member_id = StrBytes::from_string(std::mem::take(&mut self.member_id));
        let resp = self.on_coordinator(|c| {
            let v = c.versions.pick(conn::API_LEAVE_GROUP, &c.addr)?;
            let mut req = LeaveGroupRequest::default();
            req.group_id = GroupId(StrBytes::from_string(group.clone()));
            if v >= 3 {
                let mut m = MemberIdentity::default();
                m.member_id = member_id;
                m.reason = Some(StrBytes::from_static_str("sitewatch agent stopping"));
                req.members = vec![m];
            } else {
                req.member_id = member_id;
            }
            c.call(&req, v)
        })?;
        let code = if resp.error_code != 0 {
            resp.error_code
        } else {
            resp.members.first().map(|m| m.error_code).unwrap_or(0)
        };
        match code {
            0 | UNKNOWN_MEMBER_ID => Ok(()),
            code => Err(GroupError::from_code(conn::API_LEAVE_GROUP, code, &group)),
        }
    }
}

/// The `fleet-group` thread's loop: join, report the assignment on `assigned`, heartbeat;
/// on a rebalance or fencing report no partitions (revoke) and join again; on shutdown leave
/// the group and report no partitions. A coordinator that moves or does not answer is looked
/// up again; the partitions are kept until a session timeout has passed without a
/// successful heartbeat (by then the group has moved on without us).
pub fn run(mut member: Member, shutdown: &Shutdown, assigned: &Sender<Assignment>) {
    let s = member.settings().clone();
    let mut backoff = Backoff::new(Duration::from_millis(250), s.session_timeout);
    let revoke = |generation| Assignment {
        generation,
        partitions: Vec::new(),
        leader: false,
        members: 0,
    };
    while !shutdown.is_triggered() {
        let a = match member.join() {
            Ok(a) => a,
            Err(e) => {
                if e.forgets_member() {
                    member.member_id.clear();
                }
                if e.lost_coordinator() {
                    member.forget_coordinator();
                }
                log::warn!(target: "sitewatch::fleet", "group {}: cannot join: {e}", s.group_id);
                shutdown.sleep(backoff.next_delay());
                continue;
            }
        };
        backoff.reset();
        log::info!(
            target: "sitewatch::fleet",
            "group {}: generation {}: partitions {:?} of {}{}",
            s.group_id,
            a.generation,
            a.partitions,
            s.topic,
            if a.leader { format!(" (leader of {} members)", a.members) } else { String::new() }
        );
        let (generation, leader) = (a.generation, a.leader);
        if assigned.send(a).is_err() {
            break;
        }
        let mut last_ok = Instant::now();
        while !shutdown.sleep(s.heartbeat_interval) {
            if leader && leader_sees_new_partitions(&mut member) {
                let _ = assigned.send(revoke(generation));
                break;
            }
            match member.heartbeat() {
                Ok(()) => last_ok = Instant::now(),
                Err(e) if e.lost_coordinator() && last_ok.elapsed() < s.session_timeout => {
                    log::debug!(target: "sitewatch::fleet", "group {}: heartbeat: {e}; finding the coordinator", s.group_id);
                    member.forget_coordinator();
                }
                Err(e) => {
                    log::info!(target: "sitewatch::fleet", "group {}: rebalance ({e})", s.group_id);
                    if e.forgets_member() {
                        member.member_id.clear();
                    }
                    if e.lost_coordinator() {
                        member.forget_coordinator();
                    }
                    let _ = assigned.send(revoke(generation));
                    break;
                }
            }
        }
    }
    let _ = assigned.send(revoke(member.generation));
    match member.leave() {
        Ok(()) => log::info!(target: "sitewatch::fleet", "group {}: left", s.group_id),
        Err(e) => log::warn!(target: "sitewatch::fleet", "group {}: LeaveGroup: {e}", s.group_id),
    }
}

/// The leader's metadata check between heartbeats: true when it must join again because the
/// topic's partitions changed (one Metadata request per heartbeat interval, by the leader only).
/// A failed check changes nothing; the next interval asks again.
fn leader_sees_new_partitions(member: &mut Member) -> bool {
    let group = member.settings().group_id.clone();
    match member.topics_changed() {
        Ok(changed) => {
            if changed {
                log::info!(target: "sitewatch::fleet",
                    "group {group}: the subscribed topic's partitions changed; rebalancing");
            }
            changed
        }
        Err(e) => {
            log::debug!(target: "sitewatch::fleet", "group {group}: metadata check: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: &str, topics: &[&str]) -> Subscription {
        Subscription {
            member_id: id.into(),
            group_instance_id: None,
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn parts(spec: &[(&str, i32)]) -> BTreeMap<String, Vec<i32>> {
        spec.iter()
            .map(|(t, n)| (t.to_string(), (0..*n).collect()))
            .collect()
    }

    /// The example of Kafka's RangeAssignor javadoc: C0 and C1 subscribed to t0 and t1 of
    /// three partitions each get C0: [t0p0, t0p1, t1p0, t1p1], C1: [t0p2, t1p2].
    #[test]
    fn range_matches_the_kafka_javadoc_example() {
        let a = range_assign(
            &[sub("C1", &["t0", "t1"]), sub("C0", &["t0", "t1"])],
            &parts(&[("t0", 3), ("t1", 3)]),
        );
        assert_eq!(a["C0"]["t0"], vec![0, 1]);
        assert_eq!(a["C0"]["t1"], vec![0, 1]);
        assert_eq!(a["C1"]["t0"], vec![2]);
        assert_eq!(a["C1"]["t1"], vec![2]);
    }

    #[test]
    fn range_splits_consecutively_with_the_remainder_first() {
        let a = range_assign(
            &[sub("b", &["t"]), sub("c", &["t"]), sub("a", &["t"])],
            &parts(&[("t", 7)]),
        );
        assert_eq!(a["a"]["t"], vec![0, 1, 2]);
        assert_eq!(a["b"]["t"], vec![3, 4]);
        assert_eq!(a["c"]["t"], vec![5, 6]);
        // More members than partitions: the last ones get nothing, but are in the answer (a
        // member must receive an assignment, even an empty one).
        let a = range_assign(
            &[sub("a", &["t"]), sub("b", &["t"]), sub("c", &["t"])],
            &parts(&[("t", 2)]),
        );
        assert_eq!(a["a"]["t"], vec![0]);
        assert_eq!(a["b"]["t"], vec![1]);
        assert!(a["c"].is_empty());
    }

    #[test]
    fn range_only_counts_members_subscribed_to_the_topic_and_prefers_instance_ids() {
        let mut s = vec![sub("m1", &["t", "u"]), sub("m2", &["u"]), sub("m0", &["t"])];
        let a = range_assign(&s, &parts(&[("t", 4), ("u", 2)]));
        assert_eq!(a["m0"]["t"], vec![0, 1]);
        assert_eq!(a["m1"]["t"], vec![2, 3]);
        assert_eq!(a["m1"]["u"], vec![0]);
        assert_eq!(a["m2"]["u"], vec![1]);
        // Static members sort by their instance id (as Java's MemberInfo compares).
        s[2].group_instance_id = Some("z".into());
        s[0].group_instance_id = Some("a".into());
        let a = range_assign(&s, &parts(&[("t", 4)]));
        assert_eq!(a["m1"]["t"], vec![0, 1]);
        assert_eq!(a["m0"]["t"], vec![2, 3]);
    }

    #[test]
    fn consumer_protocol_blobs_round_trip_and_refuse_garbage() {
        let sub = encode_subscription("sitewatch.targets").unwrap();
        // Java's layout: version 0, one topic (i32 count, i16 length + name), null user data.
        assert_eq!(&sub[..2], &[0, 0]);
        assert_eq!(
            decode_subscription(sub, "m").unwrap(),
            vec!["sitewatch.targets".to_string()]
        );
        let mut topics = BTreeMap::new();
        topics.insert("a".to_string(), vec![2, 0]);
        topics.insert("b".to_string(), vec![1]);
        let blob = encode_assignment(&topics).unwrap();
        assert_eq!(decode_assignment(blob, "a").unwrap(), vec![0, 2]);
        assert_eq!(
            decode_assignment(Bytes::new(), "a").unwrap(),
            Vec::<i32>::new()
        );
        let err = decode_subscription(Bytes::from_static(&[0]), "m-1").unwrap_err();
        assert!(err.to_string().contains("member m-1"), "{err}");
        assert!(decode_assignment(Bytes::from_static(&[0, 0, 0, 0, 0, 9]), "a").is_err());
    }

    #[test]
    fn error_codes_sort_into_rejoin_and_coordinator_moves() {
        let e = GroupError::from_code(conn::API_HEARTBEAT, REBALANCE_IN_PROGRESS, "g");
        assert!(matches!(e, GroupError::Rejoin { .. }) && !e.forgets_member());
        assert!(e.to_string().contains("REBALANCE_IN_PROGRESS"), "{e}");
        let e = GroupError::from_code(conn::API_HEARTBEAT, UNKNOWN_MEMBER_ID, "g");
        assert!(e.forgets_member());
        let e = GroupError::from_code(conn::API_HEARTBEAT, NOT_COORDINATOR, "g");
        assert!(e.lost_coordinator());
        let e = GroupError::from_code(conn::API_JOIN_GROUP, 23, "g");
        assert!(matches!(e, GroupError::Kafka(_)), "{e}");
        assert!(e.to_string().contains("group g"), "{e}");
    }
}
