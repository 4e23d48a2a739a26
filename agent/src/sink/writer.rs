//! The transactional writer: one partition's batch of Kafka messages → one PostgreSQL
//! transaction holding the decoded rows, the dead letters and the partition's next offset.
//!
//! Architecture Invariant: rows and offset commit together or not at all, and the offset update
//! is a compare-and-set on the offset this writer started from. A sink that lost ownership of
//! the partition without noticing (its lock session died) therefore cannot skip or repeat
//! records: its transaction fails with [`SinkError::Fenced`] and it re-reads the offset.
//! Duplicates that still arrive (a producer retry) are dropped by the (check_id, started_at) key.
//!
//! Message content never fails a batch: anything that does not decode, validate or fit the
//! columns becomes a dead letter. A batch the server still rejects for its data is replayed one
//! record per savepoint, so the one bad record is found and dead-lettered.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use postgres::types::ToSql;
use postgres::{Client, Statement, Transaction};

use super::SinkError;
use super::db::{describe, is_data_error, system_time};
use super::rollup::{Rollups, Sample};
use super::schema::{ensure_partition, load_offset};
use crate::result::CheckResult;
use crate::util::parse_rfc3339_ms;

/// A record larger than this is dead-lettered unread: real records are a few KiB.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
/// At most this much of a dead message's key and value is stored.
pub const DEAD_LETTER_KEEP_BYTES: usize = 64 * 1024;
/// Records dated further ahead than this are refused (a broken agent clock, or hostile input
/// that would otherwise create partitions for arbitrary days).
pub const MAX_FUTURE: Duration = Duration::from_secs(86_400);
const MAX_ERROR_CHARS: usize = 2000;
const DAY_MS: i64 = 86_400_000;

/// One message as fetched from a partition: the Kafka fetcher's record.
pub use crate::kafka::FetchedRecord as Message;

/// What one committed batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// New rows in `checks`.
    pub inserted: u64,
    /// Valid records already present (redelivered): skipped.
    pub duplicates: u64,
    pub dead_letters: u64,
    /// The stored next offset after the commit.
    pub next_offset: i64,
}

/// A decoded, validated record ready for the `checks` row.
#[derive(Debug)]
struct Row<'a> {
    record: CheckResult,
    message: &'a Message,
    started_ms: i64,
    cert_not_after_ms: Option<i64>,
}

#[derive(Debug)]
struct DeadLetter<'a> {
    message: &'a Message,
    error: String,
}

/// Decodes and validates one message. `now_ms` and `retention` bound `started_at`: a record
/// older than the retention would land in a partition that is (or is about to be) dropped.
fn decode(message: &Message, now_ms: i64, retention: Duration) -> Result<Row<'_>, String> {
    let Some(value) = &message.value else {
        return Err("message has no value (tombstone)".into());
    };
    if value.len() > MAX_RECORD_BYTES {
        return Err(format!(
            "record is {} bytes, over the {MAX_RECORD_BYTES}-byte limit",
            value.len()
        ));
    }
    let record = CheckResult::from_json(value)?;
    // from_json validated the format; parse again for the number.
    let started_ms = parse_rfc3339_ms(&record.started_at)
        .ok_or_else(|| format!("started_at {:?} is not RFC 3339", record.started_at))?;
    let oldest = now_ms.saturating_sub(retention.as_millis() as i64);
    if started_ms < oldest {
        return Err(format!(
            "started_at {} is older than the retention ({}s)",
            record.started_at,
            retention.as_secs()
        ));
    }
    if started_ms > now_ms + MAX_FUTURE.as_millis() as i64 {
        return Err(format!(
            "started_at {} is more than a day in the future (agent clock?)",
            record.started_at
        ));
    }
    let cert_not_after_ms = match &record.cert_not_after {
        Some(text) => Some(
            parse_rfc3339_ms(text)
                .ok_or_else(|| format!("cert_not_after {text:?} is not RFC 3339"))?,
        ),
        None => None,
    };
    if i64::try_from(record.body_bytes).is_err() {
        return Err(format!("body_bytes {} is out of range", record.body_bytes));
    }
    if let Some(field) = field_with_nul(&record) {
        return Err(format!(
            "field {field} contains a NUL character, which PostgreSQL text cannot store"
        ));
    }
    Ok(Row {
        message,
        started_ms,
        cert_not_after_ms,
        record,
    })
}

/// [`decode`] for the fuzz target in `fuzz/` (the row type stays private).
#[doc(hidden)]
pub fn decode_for_fuzzing(m: &Message, now_ms: i64, retention: Duration) -> Result<(), String> {
    decode(m, now_ms, retention).map(drop)
}

/// The name of the first text field holding U+0000 (PostgreSQL refuses it in text and jsonb).
fn field_with_nul(r: &CheckResult) -> Option<&'static str> {
    let texts: [(&'static str, Option<&str>); 21] = [
        ("check_id", Some(&r.check_id)),
        ("target", Some(&r.target)),
        ("url", Some(&r.url)),
        ("agent", Some(&r.agent)),
        ("location", r.location.as_deref()),
        ("agent_version", Some(&r.agent_version)),
        ("started_at", Some(&r.started_at)),
        ("error", r.error.as_deref()),
        ("method", Some(&r.method)),
        ("http_version", r.http_version.as_deref()),
        ("final_url", r.final_url.as_deref()),
        ("remote_ip", r.remote_ip.as_deref()),
        ("tls_version", r.tls_version.as_deref()),
        ("cert_not_after", r.cert_not_after.as_deref()),
        ("cert_issuer", r.cert_issuer.as_deref()),
        ("regex", r.regex.as_deref()),
        ("rule", r.rule.as_deref()),
        ("rule_hash", r.rule_hash.as_deref()),
        ("rule_verdict", r.rule_verdict.as_deref()),
        ("rule_reason", r.rule_reason.as_deref()),
        ("failure", r.failure.map(|f| f.as_str())),
    ];
    if let Some((name, _)) = texts
        .iter()
        .find(|(_, t)| t.is_some_and(|t| t.contains('\0')))
    {
        return Some(name);
    }
    if r.tags.iter().any(|t| t.contains('\0')) {
        return Some("tags");
    }
    // serde_json writes U+0000 as the escape \u0000 (a raw NUL cannot appear in JSON text).
    if r.rule_extra
        .as_ref()
        .is_some_and(|v| v.to_string().contains("\\u0000"))
    {
        return Some("rule_extra");
    }
    None
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The `checks` columns in insert order: (column, array type sent, select expression). The
/// rows travel as one array per column (`unnest`), so a batch is one statement with a fixed
/// number of parameters whatever its size.
const CHECK_COLUMNS: [(&str, &str, &str); 40] = [
    ("check_id", "text", ""),
    ("started_at", "timestamptz", ""),
    ("target", "text", ""),
    ("url", "text", ""),
    ("agent", "text", ""),
    ("location", "text", ""),
    ("agent_version", "text", ""),
    ("v", "int4", ""),
    ("up", "bool", ""),
    ("failure", "text", ""),
    ("error", "text", ""),
    ("attempt", "int8", ""),
    ("method", "text", ""),
    ("status", "int4", ""),
    ("http_version", "text", ""),
    ("final_url", "text", ""),
    ("redirects", "int8", ""),
    ("remote_ip", "text", ""),
    ("body_bytes", "int8", ""),
    ("body_truncated", "bool", ""),
    ("total_ms", "float8", ""),
    ("dns_ms", "float8", ""),
    ("connect_ms", "float8", ""),
    ("tls_ms", "float8", ""),
    ("ttfb_ms", "float8", ""),
    ("transfer_ms", "float8", ""),
    ("tls_version", "text", ""),
    ("cert_not_after", "timestamptz", ""),
    ("cert_days_left", "float8", ""),
    ("cert_issuer", "text", ""),
    ("regex", "text", ""),
    ("regex_matched", "bool", ""),
    ("rule", "text", ""),
    ("rule_hash", "text", ""),
    ("rule_verdict", "text", ""),
    ("rule_reason", "text", ""),
    ("rule_extra", "text", "u.rule_extra::jsonb"),
    ("rule_ms", "float8", ""),
    // A ragged text[][] cannot be unnested, so each row's tags travel as a JSON array.
    (
        "tags",
        "text",
        "ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb))",
    ),
    ("kafka_offset", "int8", ""),
];

fn insert_checks_sql() -> String {
    let n = CHECK_COLUMNS.len();
    let names: Vec<&str> = CHECK_COLUMNS.iter().map(|c| c.0).collect();
    let selects: Vec<String> = CHECK_COLUMNS
        .iter()
        .map(|(name, _, expr)| {
            if expr.is_empty() {
                format!("u.{name}")
            } else {
                expr.to_string()
            }
        })
        .collect();
    let arrays: Vec<String> = CHECK_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, ty, _))| format!("${}::{ty}[]", i + 1))
        .collect();
    format!(
        "INSERT INTO checks ({}, kafka_partition) SELECT {}, ${} FROM unnest({}) AS u({}) \
         ON CONFLICT (check_id, started_at) DO NOTHING RETURNING check_id, started_at",
        names.join(", "),
        selects.join(", "),
        n + 1,
        arrays.join(", "),
        names.join(", ")
    )
}

const INSERT_DEAD_LETTERS: &str = "INSERT INTO dead_letters \
    (topic, partition, \"offset\", kafka_ts, key, value, value_bytes, error) \
    SELECT $1, $2, u.o, u.ts, u.k, u.v, u.n, u.e \
    FROM unnest($3::int8[], $4::timestamptz[], $5::bytea[], $6::bytea[], $7::int4[], $8::text[]) \
    AS u(o, ts, k, v, n, e) ON CONFLICT DO NOTHING";

// Tags travel as JSON arrays, as in the checks insert (a ragged text[][] cannot be unnested).
const UPSERT_TARGETS: &str = "INSERT INTO targets (id, url, first_seen, last_seen, last_agent, tags) \
    SELECT u.id, u.url, u.seen, u.seen, u.agent, ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb)) \
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) \
    AS u(id, url, seen, agent, tags) \
    ON CONFLICT (id) DO UPDATE SET url = EXCLUDED.url, last_seen = EXCLUDED.last_seen, \
    last_agent = EXCLUDED.last_agent, tags = EXCLUDED.tags WHERE targets.last_seen < EXCLUDED.last_seen";

const ADVANCE_OFFSET: &str = "UPDATE sink_offsets SET next_offset = $3, updated_at = now() \
    WHERE topic = $1 AND partition = $2 AND next_offset = $4";

const FIRST_OFFSET: &str = "INSERT INTO sink_offsets (topic, partition, next_offset) \
    VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

/// The column arrays of one `checks` insert.
#[derive(Default)]
struct CheckColumns {
    check_id: Vec<String>,
    started_at: Vec<SystemTime>,
    target: Vec<String>,
    url: Vec<String>,
    agent: Vec<String>,
    location: Vec<Option<String>>,
    agent_version: Vec<String>,
    v: Vec<i32>,
    up: Vec<bool>,
    failure: Vec<Option<&'static str>>,
    error: Vec<Option<String>>,
    attempt: Vec<i64>,
    method: Vec<String>,
    status: Vec<Option<i32>>,
    http_version: Vec<Option<String>>,
    final_url: Vec<Option<String>>,
    redirects: Vec<i64>,
    remote_ip: Vec<Option<String>>,
    body_bytes: Vec<i64>,
    body_truncated: Vec<bool>,
    total_ms: Vec<f64>,
    dns_ms: Vec<Option<f64>>,
    connect_ms: Vec<Option<f64>>,
    tls_ms: Vec<Option<f64>>,
    ttfb_ms: Vec<Option<f64>>,
    transfer_ms: Vec<Option<f64>>,
    tls_version: Vec<Option<String>>,
    cert_not_after: Vec<Option<SystemTime>>,
    cert_days_left: Vec<Option<f64>>,
    cert_issuer: Vec<Option<String>>,
    regex: Vec<Option<String>>,
    regex_matched: Vec<Option<bool>>,
    rule: Vec<Option<String>>,
    rule_hash: Vec<Option<String>>,
    rule_verdict: Vec<Option<String>>,
    rule_reason: Vec<Option<String>>,
    rule_extra: Vec<Option<String>>,
    rule_ms: Vec<Option<f64>>,
    tags: Vec<String>,
    kafka_offset: Vec<i64>,
}

impl CheckColumns {
    fn from_rows<'r, 'm: 'r>(rows: impl IntoIterator<Item = &'r Row<'m>>) -> CheckColumns {
        let mut c = CheckColumns::default();
        for row in rows {
            let r = &row.record;
            c.check_id.push(r.check_id.clone());
            c.started_at.push(system_time(row.started_ms));
            c.target.push(r.target.clone());
            c.url.push(r.url.clone());
            c.agent.push(r.agent.clone());
            c.location.push(r.location.clone());
            c.agent_version.push(r.agent_version.clone());
            // v is SCHEMA_VERSION here: from_json refuses any other.
            c.v.push(r.v as i32);
            c.up.push(r.up);
            c.failure.push(r.failure.map(|f| f.as_str()));
            c.error.push(r.error.clone());
            c.attempt.push(i64::from(r.attempt));
            c.method.push(r.method.clone());
            c.status.push(r.status.map(i32::from));
            c.http_version.push(r.http_version.clone());
            c.final_url.push(r.final_url.clone());
            c.redirects.push(i64::from(r.redirects));
            c.remote_ip.push(r.remote_ip.clone());
            // decode() refused values above i64::MAX.
            c.body_bytes.push(r.body_bytes as i64);
            c.body_truncated.push(r.body_truncated);
            c.total_ms.push(r.timings.total);
            c.dns_ms.push(r.timings.dns);
            c.connect_ms.push(r.timings.connect);
            c.tls_ms.push(r.timings.tls);
            c.ttfb_ms.push(r.timings.ttfb);
            c.transfer_ms.push(r.timings.transfer);
            c.tls_version.push(r.tls_version.clone());
            c.cert_not_after
                .push(row.cert_not_after_ms.map(system_time));
            c.cert_days_left.push(r.cert_days_left);
            c.cert_issuer.push(r.cert_issuer.clone());
            c.regex.push(r.regex.clone());
            c.regex_matched.push(r.regex_matched);
            c.rule.push(r.rule.clone());
            c.rule_hash.push(r.rule_hash.clone());
            c.rule_verdict.push(r.rule_verdict.clone());
            c.rule_reason.push(r.rule_reason.clone());
            c.rule_extra
                .push(r.rule_extra.as_ref().map(|v| v.to_string()));
            c.rule_ms.push(r.rule_ms);
            c.tags
                .push(serde_json::Value::from(r.tags.clone()).to_string());
            c.kafka_offset.push(row.message.offset);
        }
        c
    }

    /// The parameters in [`CHECK_COLUMNS`] order, then the partition.
    fn params<'a>(&'a self, partition: &'a i32) -> [&'a (dyn ToSql + Sync); 41] {
        [
            &self.check_id,
            &self.started_at,
            &self.target,
            &self.url,
            &self.agent,
            &self.location,
            &self.agent_version,
            &self.v,
            &self.up,
            &self.failure,
            &self.error,
            &self.attempt,
            &self.method,
            &self.status,
            &self.http_version,
            &self.final_url,
            &self.redirects,
            &self.remote_ip,
            &self.body_bytes,
            &self.body_truncated,
            &self.total_ms,
            &self.dns_ms,
            &self.connect_ms,
            &self.tls_ms,
            &self.ttfb_ms,
            &self.transfer_ms,
            &self.tls_version,
            &self.cert_not_after,
            &self.cert_days_left,
            &self.cert_issuer,
            &self.regex,
            &self.regex_matched,
            &self.rule,
            &self.rule_hash,
            &self.rule_verdict,
            &self.rule_reason,
            &self.rule_extra,
            &self.rule_ms,
            &self.tags,
            &self.kafka_offset,
            partition,
        ]
    }
}

/// Writes batches of one (topic, partition) over its own connection.
pub struct Writer {
    client: Client,
    prepared: Prepared,
    retention: Duration,
    /// Days (since the epoch) whose `checks` partition is known to exist.
    days_ready: HashSet<i64>,
    /// Decides alert transitions inside each batch's transaction (`[alerts]`).
    #[cfg(feature = "alerts")]
    alerts: Option<crate::alerts::eval::Evaluator>,
}

impl Writer {
    pub fn new(
        mut client: Client,
        topic: &str,
        partition: i32,
        retention: Duration,
    ) -> Result<Writer, SinkError> {
        let prepare = |client: &mut Client, sql: &str| client.prepare(sql).map_err(SinkError::from);
        let insert_checks = prepare(&mut client, &insert_checks_sql())?;
        let insert_dead = prepare(&mut client, INSERT_DEAD_LETTERS)?;
        let upsert_targets = prepare(&mut client, UPSERT_TARGETS)?;
        let rollups = Rollups::prepare(&mut client)?;
        Ok(Writer {
            client,
            prepared: Prepared {
                topic: topic.to_string(),
                partition,
                insert_checks,
                insert_dead,
                upsert_targets,
                rollups,
            },
            retention,
            days_ready: HashSet::new(),
            #[cfg(feature = "alerts")]
            alerts: None,
        })
    }

    /// Evaluates alerts for every batch, in its transaction.
    #[cfg(feature = "alerts")]
    pub fn with_alerts(mut self, cfg: std::sync::Arc<crate::alerts::AlertsConfig>) -> Writer {
        self.alerts = Some(crate::alerts::eval::Evaluator::new(cfg));
        self
    }

    /// The stored next offset of this partition, `None` when the sink never committed one.
    pub fn stored_offset(&mut self) -> Result<Option<i64>, SinkError> {
        load_offset(
            &mut self.client,
            &self.prepared.topic,
            self.prepared.partition,
        )
    }

    /// Writes `messages` (in offset order, all from this partition, at or after `from`) and
    /// moves the stored offset from `from` to `next_offset` (one past the last message, or
    /// further when the fetch skipped control batches), in one transaction. `from` is what
    /// [`Writer::stored_offset`] returned, or the previous batch's `next_offset`; when the
    /// stored offset is no longer `from`, nothing is written and the result is
    /// [`SinkError::Fenced`].
    pub fn write(
        &mut self,
        from: Option<i64>,
        messages: &[Message],
        next_offset: i64,
    ) -> Result<BatchOutcome, SinkError> {
        let next_offset = match messages.last() {
            Some(last) => next_offset.max(last.offset + 1),
            None if from == Some(next_offset) => {
                return Ok(BatchOutcome {
                    next_offset,
                    ..BatchOutcome::default()
                });
            }
            None => next_offset,
        };
        let now_ms = crate::util::unix_ms_now();
        let mut rows = Vec::with_capacity(messages.len());
        let mut dead = Vec::new();
        for message in messages {
            match decode(message, now_ms, self.retention) {
                Ok(row) => rows.push(row),
                Err(error) => dead.push(DeadLetter { message, error }),
            }
        }
        self.ensure_partitions(&rows)?;
        match self.commit(from, next_offset, &rows, &dead, false) {
            Err(e) if e.is_data_error() => {
                log::warn!(
                    target: "sitewatch::sink",
                    "{}/{}: batch at offset {} rejected ({e}); retrying record by record",
                    self.prepared.topic, self.prepared.partition, from.unwrap_or(0)
                );
                // A partition may have been dropped under us: forget what we knew.
                self.days_ready.clear();
                self.ensure_partitions(&rows)?;
                self.commit(from, next_offset, &rows, &dead, true)
            }
            other => other,
        }
    }

    /// Creates the daily partitions the rows need, outside the batch transaction (DDL takes a
    /// strong lock on `checks`; holding it inside the batch would stall other sinks).
    fn ensure_partitions(&mut self, rows: &[Row]) -> Result<(), SinkError> {
        let days: HashSet<i64> = rows
            .iter()
            .map(|r| r.started_ms.div_euclid(DAY_MS))
            .filter(|d| !self.days_ready.contains(d))
            .collect();
        for day in days {
            ensure_partition(&mut self.client, day)?;
            self.days_ready.insert(day);
        }
        Ok(())
    }

    fn commit(
        &mut self,
        from: Option<i64>,
        next_offset: i64,
        rows: &[Row],
        dead: &[DeadLetter],
        isolate: bool,
    ) -> Result<BatchOutcome, SinkError> {
        let p = &self.prepared;
        let mut tx = self.client.transaction()?;
        // The offset first: it takes the row lock that serializes writers of this partition,
        // and it fences a writer that lost ownership before it writes anything.
        let advanced = match from {
            Some(old) => tx.execute(
                ADVANCE_OFFSET,
                &[&p.topic, &p.partition, &next_offset, &old],
            ),
            None => tx.execute(FIRST_OFFSET, &[&p.topic, &p.partition, &next_offset]),
        }?;
        if advanced != 1 {
            return Err(SinkError::Fenced {
                topic: p.topic.clone(),
                partition: p.partition,
                expected: from,
            });
        }
        let partition = p.partition;
        let mut late_dead: Vec<DeadLetter> = Vec::new();
        let mut landed: Vec<&Row> = Vec::with_capacity(rows.len());
        // The rows this transaction added (not the redelivered ones): what the rollups count.
        let mut fresh: Vec<&Row> = Vec::with_capacity(rows.len());
        if !isolate {
            let columns = CheckColumns::from_rows(rows);
            let keys = tx.query(&p.insert_checks, &columns.params(&partition))?;
            let mut keys: HashSet<(String, SystemTime)> =
                keys.iter().map(|k| (k.get(0), k.get(1))).collect();
            // A key the batch holds twice was inserted once: the first copy is the fresh one.
            fresh.extend(
                rows.iter().filter(|r| {
                    keys.remove(&(r.record.check_id.clone(), system_time(r.started_ms)))
                }),
            );
            landed.extend(rows);
        } else {
            for (i, row) in rows.iter().enumerate() {
                let mut sp = tx.savepoint(format!("r{i}"))?;
                let columns = CheckColumns::from_rows([row]);
                match sp.execute(&p.insert_checks, &columns.params(&partition)) {
                    Ok(n) => {
                        sp.commit()?;
                        if n > 0 {
                            fresh.push(row);
                        }
                        landed.push(row);
                    }
                    Err(e) if is_data_error(&e) => {
                        sp.rollback()?;
                        late_dead.push(DeadLetter {
                            message: row.message,
                            error: format!("rejected by PostgreSQL: {}", describe(&e)),
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let all_dead: Vec<&DeadLetter> = dead.iter().chain(late_dead.iter()).collect();
        if !all_dead.is_empty() {
            p.insert_dead_letters(&mut tx, &all_dead)?;
        }
        p.upsert_targets(&mut tx, &landed)?;
        p.rollups.add(
            &mut tx,
            fresh.iter().map(|r| Sample::of(&r.record, r.started_ms)),
        )?;
        #[cfg(feature = "alerts")]
        let events = match &self.alerts {
            Some(alerts) => {
                let checks: Vec<crate::alerts::eval::Landed> = (fresh.iter())
                    .map(|r| crate::alerts::eval::Landed {
                        record: &r.record,
                        started_ms: r.started_ms,
                    })
                    .collect();
                alerts.evaluate(&mut tx, &checks)?
            }
            None => 0,
        };
        tx.commit()?;
        #[cfg(feature = "alerts")]
        if events > 0
            && let Err(e) = crate::alerts::eval::wake(&mut self.client)
        {
            log::warn!(
                target: "sitewatch::sink",
                "{}/{}: waking the alert notifiers: {e} (they look again within 500 ms)",
                self.prepared.topic, self.prepared.partition
            );
        }
        let inserted = fresh.len() as u64;
        Ok(BatchOutcome {
            inserted,
            duplicates: landed.len() as u64 - inserted,
            dead_letters: all_dead.len() as u64,
            next_offset,
        })
    }
}

/// The partition's identity and its prepared statements (valid for the writer's connection).
struct Prepared {
    topic: String,
    partition: i32,
    insert_checks: Statement,
    insert_dead: Statement,
    upsert_targets: Statement,
    rollups: Rollups,
}

impl Prepared {
    fn insert_dead_letters(
        &self,
        tx: &mut Transaction,
        dead: &[&DeadLetter],
    ) -> Result<(), SinkError> {
        let keep = |b: &Option<Vec<u8>>| {
            b.as_ref()
                .map(|b| b[..b.len().min(DEAD_LETTER_KEEP_BYTES)].to_vec())
        };
        let offsets: Vec<i64> = dead.iter().map(|d| d.message.offset).collect();
        let times: Vec<Option<SystemTime>> = dead
            .iter()
            .map(|d| (d.message.timestamp_ms >= 0).then(|| system_time(d.message.timestamp_ms)))
            .collect();
        let keys: Vec<Option<Vec<u8>>> = dead.iter().map(|d| keep(&d.message.key)).collect();
        let values: Vec<Option<Vec<u8>>> = dead.iter().map(|d| keep(&d.message.value)).collect();
        let lens: Vec<Option<i32>> = dead
            .iter()
            .map(|d| {
                d.message
                    .value
                    .as_ref()
                    .map(|v| i32::try_from(v.len()).unwrap_or(i32::MAX))
            })
            .collect();
        let errors: Vec<String> = dead
            .iter()
            .map(|d| truncate_chars(&d.error, MAX_ERROR_CHARS))
            .collect();
        tx.execute(
            &self.insert_dead,
            &[
                &self.topic,
                &self.partition,
                &offsets,
                &times,
                &keys,
                &values,
                &lens,
                &errors,
            ],
        )?;
        for d in dead {
            log::warn!(
                target: "sitewatch::sink",
                "{}/{} offset {}: dead letter: {}",
                self.topic, self.partition, d.message.offset, truncate_chars(&d.error, 200)
            );
        }
        Ok(())
    }

    /// One row per target seen in the batch: its latest record's url, time and agent. Sorted
    /// by id so two sinks touching the same targets lock them in the same order.
    fn upsert_targets(&self, tx: &mut Transaction, rows: &[&Row]) -> Result<(), SinkError> {
        let mut latest: BTreeMap<&str, &Row> = BTreeMap::new();
        for row in rows {
            let entry = latest.entry(&row.record.target).or_insert(row);
            if row.started_ms > entry.started_ms {
                *entry = row;
            }
        }
        if latest.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = latest.keys().copied().collect();
        let urls: Vec<&str> = latest.values().map(|r| r.record.url.as_str()).collect();
        let seen: Vec<SystemTime> = latest.values().map(|r| system_time(r.started_ms)).collect();
        let agents: Vec<&str> = latest.values().map(|r| r.record.agent.as_str()).collect();
        let tags: Vec<String> = (latest.values())
            .map(|r| serde_json::Value::from(r.record.tags.clone()).to_string())
            .collect();
        tx.execute(&self.upsert_targets, &[&ids, &urls, &seen, &agents, &tags])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn message(value: Option<&[u8]>) -> Message {
        Message {
            offset: 7,
            timestamp_ms: 0,
            key: None,
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn decode_refuses_what_postgres_cannot_or_should_not_store() {
        let now = 1_800_000_000_000;
        let retention = Duration::from_secs(7 * 86_400);
        let check = |edit: &dyn Fn(&mut CheckResult), expected: Result<(), &str>| {
            let mut r = CheckResult::new("t", "http://127.0.0.1/", "a", "GET");
            r.started_at = crate::util::format_rfc3339_ms(now - 1000);
            edit(&mut r);
            let json = r.to_json();
            let m = message(Some(json.as_bytes()));
            let got = decode(&m, now, retention);
            match (got, expected) {
                (Ok(row), Ok(())) => assert_eq!(row.record, r),
                (Err(e), Err(want)) => assert!(e.contains(want), "{e:?} lacks {want:?}"),
                (got, want) => panic!("got {got:?}, want {want:?}"),
            }
        };
        check(&|_| {}, Ok(()));
        check(
            &|r| r.started_at = crate::util::format_rfc3339_ms(now - 7 * DAY + 1),
            Ok(()),
        );
        check(
            &|r| r.started_at = crate::util::format_rfc3339_ms(now - 8 * DAY),
            Err("older than the retention"),
        );
        check(
            &|r| r.started_at = crate::util::format_rfc3339_ms(now + 2 * DAY),
            Err("in the future"),
        );
        check(&|r| r.url = "a\0b".into(), Err("field url contains a NUL"));
        check(&|r| r.tags = vec!["\0".into()], Err("field tags"));
        check(
            &|r| r.rule_extra = Some(serde_json::json!({"k": "\u{0}"})),
            Err("field rule_extra"),
        );
        check(&|r| r.body_bytes = u64::MAX, Err("body_bytes"));
        check(
            &|r| r.cert_not_after = Some("never".into()),
            Err("cert_not_after \"never\""),
        );
        let tombstone = decode(&message(None), now, retention).unwrap_err();
        assert!(tombstone.contains("tombstone"), "{tombstone}");
        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        let err = decode(&message(Some(&huge)), now, retention).unwrap_err();
        assert!(err.contains("over the 262144-byte limit"), "{err}");
    }

    #[test]
    fn insert_statement_has_one_array_per_column_and_the_partition() {
        let sql = insert_checks_sql();
        assert!(sql.contains(&format!("${}::int8[]", CHECK_COLUMNS.len())));
        assert!(sql.contains(&format!("${} FROM unnest", CHECK_COLUMNS.len() + 1)));
        let columns = CheckColumns::default();
        assert_eq!(columns.params(&0).len(), CHECK_COLUMNS.len() + 1);
    }

    #[test]
    fn error_texts_are_cut_on_a_char_boundary() {
        assert_eq!(truncate_chars("abc", 5), "abc");
        assert_eq!(truncate_chars("äöüß", 2), "äö…");
    }
}
