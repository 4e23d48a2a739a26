//! Fleet agents' liveness (cargo feature `fleet`): a `sink-agents` thread reads the compacted
//! [`AGENTS_TOPIC`] and keeps the latest record of each agent in `agent_status`.
//!
//! Not a partition worker: the topic has one partition, and a liveness record is a state, not
//! an event, so exactly-once buys nothing. The thread reads the topic from its start (the
//! compacted topic holds about one record per agent) and upserts each record unless the row
//! already holds a newer one, so two sinks, a restart or a redelivery converge on the same
//! rows. `last_seen` is the agent's own timestamp of the record: a sink that was down and
//! reads old records never makes a dead agent look alive.

use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::{SinkError, db};
use crate::backoff::Backoff;
use crate::config::{KafkaConfig, PostgresConfig};
use crate::fleet::AGENTS_TOPIC;
use crate::kafka::{self, FetchedRecord, KafkaError};
use crate::service::{Heartbeat, Shutdown};

/// How long one fetch waits for new records: bounds how late shutdown is noticed.
const WAIT: Duration = Duration::from_millis(500);
const FETCH_BYTES: i32 = 1 << 20;

const UPSERT: &str = "\
INSERT INTO agent_status (agent_id, location, \"group\", version, last_seen, record_every, \
    generation, targets_owned, checks_per_second, spool_records, spool_bytes) \
VALUES ($1, $2, $3, $4, $5::text::timestamptz, make_interval(secs => $6::float8), $7, $8, $9, \
    $10, $11) \
ON CONFLICT (agent_id) DO UPDATE SET location = excluded.location, \"group\" = excluded.\"group\", \
    version = excluded.version, last_seen = excluded.last_seen, \
    record_every = excluded.record_every, generation = excluded.generation, \
    targets_owned = excluded.targets_owned, checks_per_second = excluded.checks_per_second, \
    spool_records = excluded.spool_records, spool_bytes = excluded.spool_bytes, \
    updated_at = now() \
WHERE agent_status.last_seen <= excluded.last_seen";

/// Starts the `sink-agents` thread; it stops when either of `stops` is triggered (the
/// sink's shutdown, and the sink's own end).
pub fn start(
    pg: PostgresConfig,
    kafka: KafkaConfig,
    stops: [Shutdown; 2],
    hb: Heartbeat,
) -> Result<JoinHandle<()>, SinkError> {
    let reader = Reader {
        pg,
        kafka,
        stops,
        hb,
        client: None,
        db: None,
        offset: None,
    };
    std::thread::Builder::new()
        .name("sink-agents".into())
        .spawn(move || reader.run())
        .map_err(|source| SinkError::Thread { source })
}

struct Reader {
    pg: PostgresConfig,
    kafka: KafkaConfig,
    stops: [Shutdown; 2],
    hb: Heartbeat,
    client: Option<kafka::Client>,
    db: Option<postgres::Client>,
    /// Where to fetch next; `None`: from the start.
    offset: Option<i64>,
}

impl Reader {
    fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        while !self.stopped() {
            self.hb.beat();
            match self.pass() {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    // No agent has started yet (or none is a fleet agent): nothing to report.
                    if matches!(e, SinkError::Kafka(KafkaError::UnknownTopic(_))) {
                        log::debug!(target: "sitewatch::sink", "agent liveness: {e}");
                    } else {
                        log::warn!(target: "sitewatch::sink", "agent liveness from {AGENTS_TOPIC}: {e}");
                    }
                    self.client = None;
                    self.db = None;
                    self.pause(backoff.next_delay());
                }
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stops.iter().any(Shutdown::is_triggered)
    }

    /// Sleeps `d`, or less when either stop is triggered.
    fn pause(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while !self.stopped() {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            self.stops[0].sleep(left.min(Duration::from_millis(100)));
        }
    }

    /// One fetch, its records upserted.
    fn pass(&mut self) -> Result<(), SinkError> {
        if self.db.is_none() {
            self.db = Some(db::connect(&self.pg, "sitewatch sink agents")?);
        }
        if self.client.is_none() {
            self.client = Some(kafka::Client::connect(&self.kafka).map_err(SinkError::Kafka)?);
        }
        let (Some(client), Some(pg)) = (self.client.as_mut(), self.db.as_mut()) else {
            return Ok(());
        };
        let offset = match self.offset {
            Some(o) => o,
            None => client
                .earliest_offset(AGENTS_TOPIC, 0)
                .map_err(SinkError::Kafka)?,
        };
        let fetched = match client.fetch(AGENTS_TOPIC, 0, offset, FETCH_BYTES, WAIT) {
            // Compaction moved the start: read what is there now.
            Err(KafkaError::OffsetOutOfRange { .. }) => {
                self.offset = None;
                return Ok(());
            }
            other => other.map_err(SinkError::Kafka)?,
        };
        for r in &fetched.records {
            upsert(pg, r)?;
        }
        self.offset = Some(offset.max(fetched.next_offset));
        Ok(())
    }
}

/// Stores one record: a liveness record replaces an older row of its agent, a tombstone
/// deletes the row (how an operator retires an agent), a record that does not decode is
/// skipped with a warning naming its offset.
fn upsert(pg: &mut postgres::Client, r: &FetchedRecord) -> Result<(), SinkError> {
    let key = r.key.as_deref().map(String::from_utf8_lossy);
    let Some(value) = &r.value else {
        if let Some(key) = key {
            pg.execute(
                "DELETE FROM agent_status WHERE agent_id = $1",
                &[&key.as_ref()],
            )?;
        }
        return Ok(());
    };
    let Some(s) = serde_json::from_slice::<Value>(value)
        .ok()
        .and_then(|v| Status::from_json(&v))
    else {
        log::warn!(
            target: "sitewatch::sink",
            "{AGENTS_TOPIC} offset {}: not a liveness record; skipped",
            r.offset
        );
        return Ok(());
    };
    pg.execute(
        UPSERT,
        &[
            &s.agent_id,
            &s.location,
            &s.group,
            &s.version,
            &s.ts,
            &s.every_s,
            &s.generation,
            &s.targets_owned,
            &s.checks_per_second,
            &s.spool_records,
            &s.spool_bytes,
        ],
    )?;
    Ok(())
}

/// The fields of a liveness record `agent_status` keeps (see `fleet::Follower`).
#[derive(Debug, PartialEq)]
struct Status {
    agent_id: String,
    location: Option<String>,
    group: String,
    version: String,
    ts: String,
    every_s: f64,
    generation: Option<i32>,
    targets_owned: i64,
    checks_per_second: f64,
    spool_records: i64,
    spool_bytes: i64,
}

impl Status {
    /// `None` unless the identity and timestamp are there; counters a version-1 record lacks
    /// (before checks per second and spool depth) read as 0.
    fn from_json(v: &Value) -> Option<Status> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let int = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
        let every_ms = v.get("every_ms").and_then(Value::as_u64);
        Some(Status {
            agent_id: text("agent_id")?,
            location: text("location"),
            group: text("group")?,
            version: text("version")?,
            ts: text("ts")?,
            every_s: every_ms.map_or(crate::fleet::AGENT_RECORD_EVERY.as_secs_f64(), |ms| {
                ms as f64 / 1000.0
            }),
            generation: v
                .get("generation")
                .and_then(Value::as_i64)
                .and_then(|g| i32::try_from(g).ok()),
            targets_owned: int("targets_owned"),
            checks_per_second: v
                .get("checks_per_second")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            spool_records: int("spool_records"),
            spool_bytes: int("spool_bytes"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_liveness_record_decodes_and_an_older_one_reads_its_missing_counters_as_zero() {
        let v = serde_json::json!({
            "v": 1, "agent_id": "a", "location": "eu-west", "group": "g.eu-west",
            "version": "0.1.0", "ts": "2026-11-29T13:00:00.000Z", "every_ms": 5000,
            "generation": 3, "partitions": [0, 1], "targets_owned": 7,
            "checks_per_second": 3.5, "spool_records": 2, "spool_bytes": 4096,
        });
        let s = Status::from_json(&v).unwrap();
        assert_eq!(s.location.as_deref(), Some("eu-west"));
        assert_eq!((s.every_s, s.generation), (5.0, Some(3)));
        assert_eq!(
            (s.targets_owned, s.spool_records, s.spool_bytes),
            (7, 2, 4096)
        );
        assert_eq!(s.checks_per_second, 3.5);

        let old = serde_json::json!({
            "v": 1, "agent_id": "a", "group": "g", "version": "0.1.0",
            "ts": "2026-11-29T13:00:00.000Z", "generation": 1, "targets_owned": 7,
        });
        let s = Status::from_json(&old).unwrap();
        assert_eq!((s.location, s.every_s, s.spool_bytes), (None, 5.0, 0));
        assert_eq!(s.checks_per_second, 0.0);

        assert_eq!(
            Status::from_json(&serde_json::json!({"agent_id": "a"})),
            None
        );
    }
}
