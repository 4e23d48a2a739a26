//! The sink against real PostgreSQL: schema and `init-db`, the transactional writer (rows,
//! offsets, dead letters, dedupe, fencing), retention, partition ownership, TLS `sslmode`s.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sitewatch::config::{Config, SslMode};
use sitewatch::result::{CheckResult, FailureReason};
use sitewatch::sink::owner::Ownership;
use sitewatch::sink::{self, Message, SinkError, Writer, db, schema};
use sitewatch::util::{format_rfc3339_ms, unix_ms_now};

use crate::support::pg::{Cluster, ClusterOptions, Server, TestDb};

const TOPIC: &str = "sitewatch.checks";

/// A config whose only section is `[postgres]` pointing at `db`.
fn config_for(db: &TestDb) -> Config {
    let text = format!(
        "[postgres]\nurl = \"{}\"\nsslmode = \"disable\"\nretention = \"7d\"\n",
        db.url()
    );
    Config::parse(&text, std::path::Path::new("test.toml"), &|_| None).expect("config")
}

/// A database with the schema applied.
pub(crate) fn fresh_db() -> TestDb {
    let db = TestDb::create();
    sink::init_db(&config_for(&db)).expect("init-db");
    db
}

fn writer(db: &TestDb, partition: i32) -> Writer {
    let cfg = db.pg_config();
    let client = db::connect(&cfg, "sitewatch-test-writer").expect("connect");
    Writer::new(client, TOPIC, partition, cfg.retention).expect("writer")
}

/// A record for `target` started `ago_ms` before now, up or failing with `failure`.
pub(crate) fn record(
    target: &str,
    ago_ms: i64,
    failure: Option<FailureReason>,
    total: f64,
) -> CheckResult {
    let mut r = CheckResult::new(
        target,
        &format!("http://127.0.0.1/{target}"),
        "test-agent",
        "GET",
    );
    r.started_at = format_rfc3339_ms(unix_ms_now() - ago_ms);
    r.timings.total = total;
    match failure {
        None => {
            r.up = true;
            r.status = Some(200);
        }
        Some(reason) => r.fail(reason, format!("{reason} failure")),
    }
    r
}

/// A record with every optional field set.
fn full_record(n: u32) -> CheckResult {
    let mut r = record("full", 1000 + i64::from(n), None, 12.5 + f64::from(n));
    r.attempt = 2;
    r.http_version = Some("HTTP/1.1".into());
    r.final_url = Some("http://127.0.0.1/full/final".into());
    r.redirects = 1;
    r.remote_ip = Some("127.0.0.1".into());
    r.body_bytes = 1234;
    r.body_truncated = true;
    r.timings.dns = Some(0.25);
    r.timings.connect = Some(0.5);
    r.timings.tls = Some(3.75);
    r.timings.ttfb = Some(4.0);
    r.timings.transfer = Some(1.5);
    r.tls_version = Some("TLSv1.3".into());
    r.cert_not_after = Some("2027-01-02T03:04:05.000Z".into());
    r.cert_days_left = Some(35.5);
    r.cert_issuer = Some("CN=Test CA".into());
    r.regex = Some("Welcome".into());
    r.regex_matched = Some(true);
    r.rule = Some("status_ok.wasm".into());
    r.rule_hash = Some("0123456789abcdef".into());
    r.rule_verdict = Some("up".into());
    r.rule_reason = Some("fine ✓".into());
    r.rule_extra = Some(serde_json::json!({"db": "slow", "n": 3}));
    r.rule_ms = Some(0.75);
    r.tags = vec!["prod".into(), "eu".into()];
    // Every other record as an agent without `[agent] location` writes it.
    r.location = n.is_multiple_of(2).then(|| "lab-1".to_string());
    r
}

fn messages(values: &[Vec<u8>], first_offset: i64) -> Vec<Message> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Message {
            offset: first_offset + i as i64,
            timestamp_ms: unix_ms_now(),
            key: Some(b"key".to_vec()),
            value: Some(v.clone()),
        })
        .collect()
}

fn json(records: &[CheckResult]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.to_json().into_bytes()).collect()
}

fn ms_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Every row of `checks` rebuilt as a record, ordered by kafka offset.
pub fn stored_records(client: &mut postgres::Client) -> Vec<CheckResult> {
    let rows = client
        .query(
            "SELECT check_id, started_at, target, url, agent, agent_version, v, up, failure, error, \
             attempt, method, status, http_version, final_url, redirects, remote_ip, body_bytes, \
             body_truncated, total_ms, dns_ms, connect_ms, tls_ms, ttfb_ms, transfer_ms, \
             tls_version, cert_not_after, cert_days_left, cert_issuer, regex, regex_matched, \
             rule, rule_hash, rule_verdict, rule_reason, rule_extra::text, rule_ms, tags, \
             location FROM checks ORDER BY kafka_partition, kafka_offset",
            &[],
        )
        .expect("select checks");
    rows.iter()
        .map(|row| {
            let failure: Option<String> = row.get(8);
            let extra: Option<String> = row.get(35);
            let cert: Option<SystemTime> = row.get(26);
            let status: Option<i32> = row.get(12);
            CheckResult {
                check_id: row.get(0),
                started_at: format_rfc3339_ms(ms_of(row.get(1))),
                target: row.get(2),
                url: row.get(3),
                agent: row.get(4),
                location: row.get(38),
                agent_version: row.get(5),
                v: row.get::<_, i32>(6) as u32,
                up: row.get(7),
                failure: failure.map(|f| {
                    serde_json::from_value(serde_json::Value::String(f)).expect("failure name")
                }),
                error: row.get(9),
                attempt: row.get::<_, i64>(10) as u32,
                method: row.get(11),
                status: status.map(|s| s as u16),
                http_version: row.get(13),
                final_url: row.get(14),
                redirects: row.get::<_, i64>(15) as u32,
                remote_ip: row.get(16),
                body_bytes: row.get::<_, i64>(17) as u64,
                body_truncated: row.get(18),
                timings: sitewatch::result::Timings {
                    total: row.get(19),
                    dns: row.get(20),
                    connect: row.get(21),
                    tls: row.get(22),
                    ttfb: row.get(23),
                    transfer: row.get(24),
                },
                tls_version: row.get(25),
                cert_not_after: cert.map(|t| format_rfc3339_ms(ms_of(t))),
                cert_days_left: row.get(27),
                cert_issuer: row.get(28),
                regex: row.get(29),
                regex_matched: row.get(30),
                rule: row.get(31),
                rule_hash: row.get(32),
                rule_verdict: row.get(33),
                rule_reason: row.get(34),
                rule_extra: extra.map(|t| serde_json::from_str(&t).expect("jsonb")),
                rule_ms: row.get(36),
                tags: row.get(37),
            }
        })
        .collect()
}

fn count(client: &mut postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).expect(sql).get(0)
}

fn stored_offset(client: &mut postgres::Client, partition: i32) -> Option<i64> {
    schema::load_offset(client, TOPIC, partition).expect("offset")
}

#[test]
fn init_db_twice_is_fine_and_the_sink_refuses_a_database_without_it() {
    let db = TestDb::create();
    let cfg = config_for(&db);
    let mut client = db.client();
    let err = schema::require(&mut client, &db.url()).unwrap_err();
    assert!(matches!(err, SinkError::SchemaMissing { .. }), "{err}");
    assert!(err.to_string().contains("sitewatch init-db"), "{err}");
    sink::init_db(&cfg).expect("first init-db");
    sink::init_db(&cfg).expect("second init-db");
    schema::require(&mut client, &db.url()).expect("schema present");
    assert_eq!(
        count(
            &mut client,
            "SELECT max(version)::int8 FROM sitewatch_schema"
        ),
        i64::from(schema::SCHEMA_VERSION)
    );
    // Partitions from yesterday to DAYS_AHEAD days ahead exist after init-db.
    let parts = count(
        &mut client,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'checks'::regclass",
    );
    assert_eq!(parts, 2 + schema::DAYS_AHEAD);
}

#[test]
fn init_db_adds_the_location_column_to_a_version_1_database() {
    let db = fresh_db();
    let mut client = db.client();
    // The database as version 1 left it (no location column, none of version 3's fleet
    // objects), with a row in it.
    client
        .batch_execute(
            "DROP VIEW target_quorum, target_status_by_location, agent_liveness; \
             DROP TABLE agent_status, quorum_settings; \
             ALTER TABLE checks DROP COLUMN location; \
             DELETE FROM sitewatch_schema WHERE version > 1;",
        )
        .unwrap();
    let err = schema::require(&mut client, &db.url()).unwrap_err();
    assert!(err.to_string().contains("sitewatch init-db"), "{err}");
    client
        .batch_execute(
            "INSERT INTO checks (check_id, started_at, target, url, agent, agent_version, v, up, \
             attempt, method, redirects, body_bytes, body_truncated, total_ms, kafka_partition, \
             kafka_offset) VALUES ('old', now(), 't', 'http://x/', 'a', '0.1.0', 1, true, 1, \
             'GET', 0, 0, false, 1.0, 0, 0)",
        )
        .unwrap();

    sink::init_db(&config_for(&db)).expect("init-db on version 1");
    schema::require(&mut client, &db.url()).expect("migrated");
    let mut r = record("t", 0, None, 1.0);
    r.location = Some("lab-1".into());
    w_write(&db, &[r]);
    let rows = client
        .query(
            "SELECT check_id, location FROM checks ORDER BY kafka_offset, check_id",
            &[],
        )
        .unwrap();
    let got: Vec<(String, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got[0], ("old".to_string(), None));
    assert_eq!(got[1].1.as_deref(), Some("lab-1"));
}

/// Writes `records` at offset 1000 of partition 0.
fn w_write(db: &TestDb, records: &[CheckResult]) {
    let mut w = writer(db, 0);
    let outcome = w
        .write(None, &messages(&json(records), 1000), 0)
        .expect("write");
    assert_eq!(outcome.inserted, records.len() as u64);
}

#[test]
fn writer_stores_every_field_and_dead_letters_what_does_not_decode() {
    let db = fresh_db();
    let mut w = writer(&db, 3);
    assert_eq!(w.stored_offset().unwrap(), None);
    let good: Vec<CheckResult> = (0..5).map(full_record).collect();
    let mut wrong_version = record("x", 0, None, 1.0);
    wrong_version.v = 7;
    let mut nul = record("x", 0, None, 1.0);
    nul.error = Some("a\0b".into());
    let mut future = record("x", -3 * 86_400_000, None, 1.0);
    future.started_at = format_rfc3339_ms(unix_ms_now() + 3 * 86_400_000);
    let old = record("x", 30 * 86_400_000, None, 1.0);
    let mut bad_cert = record("x", 0, None, 1.0);
    bad_cert.cert_not_after = Some("soon".into());
    let huge = format!("{{\"v\":1,\"pad\":\"{}\"}}", "x".repeat(300 * 1024)).into_bytes();
    // (value, expected error text) in offset order, interleaved with the good records.
    let garbage: Vec<(Option<Vec<u8>>, &str)> = vec![
        (Some(b"not json at all".to_vec()), "not a check record"),
        (Some(b"{\"v\":1}".to_vec()), "missing field"),
        (
            Some(wrong_version.to_json().into_bytes()),
            "unsupported record version v=7",
        ),
        (
            Some(nul.to_json().into_bytes()),
            "field error contains a NUL",
        ),
        (Some(future.to_json().into_bytes()), "in the future"),
        (Some(old.to_json().into_bytes()), "older than the retention"),
        (
            Some(bad_cert.to_json().into_bytes()),
            "cert_not_after \"soon\"",
        ),
        (Some(huge.clone()), "over the 262144-byte limit"),
        (None, "tombstone"),
    ];
    let mut batch = Vec::new();
    let mut offset = 100;
    let mut dead_offsets = Vec::new();
    for (i, (value, _)) in garbage.iter().enumerate() {
        if let Some(r) = good.get(i) {
            batch.push(Message {
                offset,
                timestamp_ms: 1_700_000_000_000,
                key: Some(r.target.as_bytes().to_vec()),
                value: Some(r.to_json().into_bytes()),
            });
            offset += 1;
        }
        batch.push(Message {
            offset,
            timestamp_ms: 1_700_000_000_000,
            key: None,
            value: value.clone(),
        });
        dead_offsets.push(offset);
        offset += 1;
    }
    let outcome = w.write(None, &batch, 0).expect("write");
    assert_eq!(outcome.inserted, 5);
    assert_eq!(outcome.duplicates, 0);
    assert_eq!(outcome.dead_letters, garbage.len() as u64);
    assert_eq!(outcome.next_offset, offset);

    let mut client = db.client();
    assert_eq!(stored_records(&mut client), good);
    assert_eq!(stored_offset(&mut client, 3), Some(offset));
    let dead = client
        .query(
            "SELECT \"offset\", error, value, value_bytes, kafka_ts FROM dead_letters \
             WHERE topic = $1 AND partition = 3 ORDER BY \"offset\"",
            &[&TOPIC],
        )
        .unwrap();
    assert_eq!(dead.len(), garbage.len());
    for (row, ((value, want), off)) in dead.iter().zip(garbage.iter().zip(&dead_offsets)) {
        let error: String = row.get(1);
        assert_eq!(row.get::<_, i64>(0), *off);
        assert!(
            error.contains(want),
            "offset {off}: {error:?} lacks {want:?}"
        );
        let stored: Option<Vec<u8>> = row.get(2);
        let len: Option<i32> = row.get(3);
        match value {
            Some(v) => {
                let keep = v.len().min(sink::writer::DEAD_LETTER_KEEP_BYTES);
                assert_eq!(stored.as_deref(), Some(&v[..keep]));
                assert_eq!(len, Some(v.len() as i32));
            }
            None => assert_eq!((stored, len), (None, None)),
        }
        assert_eq!(ms_of(row.get(4)), 1_700_000_000_000);
    }
    // The target row reflects the latest record of the batch.
    let t = client
        .query_one(
            "SELECT url, last_agent, last_seen FROM targets WHERE id = 'full'",
            &[],
        )
        .unwrap();
    assert_eq!(t.get::<_, String>(0), "http://127.0.0.1/full");
    assert_eq!(t.get::<_, String>(1), "test-agent");
    assert_eq!(format_rfc3339_ms(ms_of(t.get(2))), good[0].started_at);
}

#[test]
fn redelivered_records_are_not_duplicated_and_a_stale_writer_is_fenced() {
    let db = fresh_db();
    let records: Vec<CheckResult> = (0..50).map(|i| record("t", i, None, 1.0)).collect();
    let mut a = writer(&db, 0);
    let mut b = writer(&db, 0);
    let first = a
        .write(None, &messages(&json(&records), 0), 0)
        .expect("write");
    assert_eq!((first.inserted, first.next_offset), (50, 50));
    // b still believes nothing was stored: it must not write.
    let check_fenced =
        |result: Result<sink::BatchOutcome, SinkError>, expected: Option<i64>| match result {
            Err(SinkError::Fenced {
                partition: 0,
                expected: e,
                ..
            }) => assert_eq!(e, expected),
            other => panic!("expected Fenced, got {other:?}"),
        };
    check_fenced(b.write(None, &messages(&json(&records), 0), 0), None);
    check_fenced(
        b.write(Some(10), &messages(&json(&records[10..]), 10), 0),
        Some(10),
    );
    // A producer retry: the same records again at later offsets are skipped, offset advances.
    let again = b
        .write(Some(50), &messages(&json(&records), 50), 0)
        .expect("redelivery");
    assert_eq!((again.inserted, again.duplicates), (0, 50));
    assert_eq!(again.next_offset, 100);
    let mut client = db.client();
    assert_eq!(count(&mut client, "SELECT count(*) FROM checks"), 50);
    assert_eq!(stored_offset(&mut client, 0), Some(100));
    assert_eq!(stored_records(&mut client), records);
}

#[test]
fn a_record_postgres_rejects_becomes_a_dead_letter_and_a_dropped_partition_is_recreated() {
    let db = fresh_db();
    let mut client = db.client();
    // A rule only the test knows: the writer finds the offending record by itself.
    client
        .batch_execute("ALTER TABLE checks ADD CONSTRAINT no_teapots CHECK (status <> 418)")
        .unwrap();
    let mut records: Vec<CheckResult> = (0..10).map(|i| record("t", i, None, 1.0)).collect();
    records[4].status = Some(418);
    let mut w = writer(&db, 1);
    let outcome = w
        .write(None, &messages(&json(&records), 0), 0)
        .expect("write");
    assert_eq!((outcome.inserted, outcome.dead_letters), (9, 1));
    let error: String = client
        .query_one("SELECT error FROM dead_letters WHERE \"offset\" = 4", &[])
        .unwrap()
        .get(0);
    assert!(
        error.contains("rejected by PostgreSQL") && error.contains("no_teapots"),
        "{error}"
    );
    let mut expected = records.clone();
    expected.remove(4);
    assert_eq!(stored_records(&mut client), expected);

    // Someone drops today's partition under the writer (which remembers it as present).
    let today = format_rfc3339_ms(unix_ms_now())[..10].replace('-', "");
    client
        .batch_execute(&format!("DROP TABLE checks_p{today}"))
        .unwrap();
    let more: Vec<CheckResult> = (0..3).map(|i| record("t", i, None, 2.0)).collect();
    let outcome = w
        .write(Some(10), &messages(&json(&more), 10), 0)
        .expect("write");
    assert_eq!((outcome.inserted, outcome.dead_letters), (3, 0));
    assert_eq!(stored_records(&mut client), more);
    assert_eq!(stored_offset(&mut client, 1), Some(13));
}

#[test]
fn views_say_whether_a_target_is_up_and_since_when() {
    let db = fresh_db();
    let min = 60_000;
    // shop: up, up, down, down (now down since the first down); api: down then up.
    let shop = [
        record("shop", 40 * min, None, 10.0),
        record("shop", 30 * min, None, 20.0),
        record("shop", 20 * min, Some(FailureReason::HttpStatus), 30.0),
        record("shop", 10 * min, Some(FailureReason::Timeout), 40.0),
        // Two days old: only in the 7d window.
        record("shop", 2 * 86_400_000, None, 1000.0),
    ];
    let api = [
        record("api", 50 * min, Some(FailureReason::Connect), 5.0),
        record("api", 5 * min, None, 7.0),
    ];
    let mut w = writer(&db, 0);
    let all: Vec<CheckResult> = shop.iter().chain(&api).cloned().collect();
    w.write(None, &messages(&json(&all), 0), 0).expect("write");
    let mut client = db.client();
    let rows = client
        .query(
            "SELECT target, up, failure, since, last_check FROM target_status ORDER BY target",
            &[],
        )
        .unwrap();
    let status: Vec<(String, bool, Option<String>, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                format_rfc3339_ms(ms_of(r.get(3))),
                format_rfc3339_ms(ms_of(r.get(4))),
            )
        })
        .collect();
    assert_eq!(
        status,
        vec![
            (
                "api".into(),
                true,
                None,
                api[1].started_at.clone(),
                api[1].started_at.clone()
            ),
            (
                "shop".into(),
                false,
                Some("timeout".into()),
                shop[2].started_at.clone(),
                shop[3].started_at.clone()
            ),
        ]
    );
    let rows = client
        .query(
            "SELECT target, period, checks, up_checks, uptime_pct::float8, p50_ms, p95_ms, p99_ms \
             FROM target_uptime ORDER BY target, period",
            &[],
        )
        .unwrap();
    type Uptime = (String, String, i64, i64, f64, f64, f64, f64);
    let got: Vec<Uptime> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect();
    let row = |t: &str, p: &str, n, up, pct, p50, p95, p99| -> Uptime {
        (t.into(), p.into(), n, up, pct, p50, p95, p99)
    };
    // percentile_cont interpolates: over 10,20,30,40 p50 = 25, p95 = 38.5, p99 = 39.7.
    let expected = vec![
        row("api", "1h", 2, 1, 50.0, 6.0, 6.9, 6.98),
        row("api", "24h", 2, 1, 50.0, 6.0, 6.9, 6.98),
        row("api", "7d", 2, 1, 50.0, 6.0, 6.9, 6.98),
        row("shop", "1h", 4, 2, 50.0, 25.0, 38.5, 39.7),
        row("shop", "24h", 4, 2, 50.0, 25.0, 38.5, 39.7),
        row("shop", "7d", 5, 3, 60.0, 30.0, 808.0, 961.6),
    ];
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!((&g.0, &g.1, g.2, g.3), (&e.0, &e.1, e.2, e.3));
        for (a, b) in [(g.4, e.4), (g.5, e.5), (g.6, e.6), (g.7, e.7)] {
            assert!((a - b).abs() < 1e-6, "{g:?} vs {e:?}");
        }
    }
}

#[test]
fn retention_drops_expired_partitions_and_dead_letters_and_creates_days_ahead() {
    let db = fresh_db();
    let mut client = db.client();
    let day_ms = 86_400_000;
    let now = unix_ms_now();
    let today = now.div_euclid(day_ms);
    for d in [today - 20, today - 9, today - 8] {
        schema::ensure_partition(&mut client, d).unwrap();
    }
    client
        .batch_execute(
            "INSERT INTO dead_letters (topic, partition, \"offset\", error, received_at) VALUES \
             ('t', 0, 1, 'old', now() - interval '30 days'), ('t', 0, 2, 'new', now())",
        )
        .unwrap();
    // Rollups have their own retention: daily ones 50 days here, hourly ones 35 days at most.
    client
        .batch_execute(
            "INSERT INTO check_rollups_daily SELECT 't', NULL, now() - d * interval '1 day', \
               1, 1, 1.0, '{1}' FROM unnest(ARRAY[10, 49, 51]) d; \
             INSERT INTO check_rollups_hourly SELECT 't', NULL, now() - d * interval '1 day', \
               1, 1, 1.0, '{1}' FROM unnest(ARRAY[10, 34, 36, 51]) d;",
        )
        .unwrap();
    let keep = (
        Duration::from_secs(8 * 86_400),
        Duration::from_secs(50 * 86_400),
    );
    let done = schema::maintain(&mut client, keep.0, keep.1, now).unwrap();
    assert_eq!(done.rollups_deleted, 3);
    assert_eq!(
        count(&mut client, "SELECT count(*) FROM check_rollups_daily"),
        2
    );
    assert_eq!(
        count(&mut client, "SELECT count(*) FROM check_rollups_hourly"),
        2
    );
    let name = |d: i64| {
        format!(
            "checks_p{}",
            format_rfc3339_ms(d * day_ms)[..10].replace('-', "")
        )
    };
    // Day today-8 still holds records newer than the cutoff (now - 8 days) and stays.
    assert_eq!(
        done.dropped_partitions,
        vec![name(today - 20), name(today - 9)]
    );
    assert_eq!(done.dead_letters_deleted, 1);
    let mut parts: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'checks'::regclass ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    parts.sort();
    let mut want: Vec<String> = (today - 1..=today + schema::DAYS_AHEAD).map(name).collect();
    want.insert(0, name(today - 8));
    assert_eq!(parts, want);
    // A second pass has nothing left to do.
    let again = schema::maintain(&mut client, keep.0, keep.1, now).unwrap();
    assert_eq!(again, schema::Maintenance::default());
}

#[test]
fn a_partition_has_one_owner_and_passes_on_when_its_session_dies() {
    let db = fresh_db();
    let cfg = db.pg_config();
    let mut a = Ownership::new(db::connect(&cfg, "sitewatch-owner-a").unwrap(), TOPIC);
    let mut b = Ownership::new(db::connect(&cfg, "sitewatch-owner-b").unwrap(), TOPIC);
    // Another topic's partition 0 is a different lock.
    let mut other = Ownership::new(db::connect(&cfg, "sitewatch-owner-c").unwrap(), "other");
    assert!(a.try_acquire(0).unwrap());
    assert!(a.try_acquire(1).unwrap());
    assert!(!b.try_acquire(0).unwrap());
    assert!(b.try_acquire(2).unwrap());
    assert!(other.try_acquire(0).unwrap());
    a.release(1).unwrap();
    assert!(b.try_acquire(1).unwrap());
    assert_eq!(b.held().iter().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(db.terminate_sessions("sitewatch-owner-a"), 1);
    assert!(a.check_alive().is_err());
    // The server releases a dead session's locks as soon as the backend exits.
    let end = Instant::now() + Duration::from_secs(30);
    while !b.try_acquire(0).unwrap() {
        assert!(Instant::now() < end, "partition 0 never became free");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_throwaway_cluster_serves_init_db_and_writes() {
    // Runs even where a server exists at 5432, so the throwaway path is always exercised.
    let server = Arc::new(Server::throwaway(ClusterOptions::default()));
    let db = TestDb::create_on(server.clone());
    sink::init_db(&config_for(&db)).expect("init-db");
    let records: Vec<CheckResult> = (0..20).map(|i| record("t", i, None, 1.0)).collect();
    writer(&db, 0)
        .write(None, &messages(&json(&records), 0), 0)
        .expect("write");
    assert_eq!(stored_records(&mut db.client()), records);
    drop(db);
    let dir = server.cluster.as_ref().unwrap().dir.clone();
    drop(server);
    assert!(!dir.exists(), "cluster dir removed");
}

#[test]
fn writer_throughput_20k_records() {
    let db = fresh_db();
    let mut w = writer(&db, 0);
    let records: Vec<CheckResult> = (0..20_000).map(|i| full_record(i % 1000)).collect();
    let values = json(&records);
    let start = Instant::now();
    let mut from = None;
    for (i, chunk) in values.chunks(1000).enumerate() {
        let outcome = w
            .write(from, &messages(chunk, (i * 1000) as i64), 0)
            .expect("write");
        from = Some(outcome.next_offset);
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "writer: 20000 rows in {secs:.2}s = {:.0} rows/s (batches of 1000)",
        20_000.0 / secs
    );
    let mut client = db.client();
    assert_eq!(count(&mut client, "SELECT count(*) FROM checks"), 20_000);
    assert_eq!(stored_offset(&mut client, 0), Some(20_000));
}

/// Makes a CA and a server certificate for `localhost` (no IP in the SAN) with openssl:
/// (CA certificate, server certificate, server key), named after `name`.
fn make_certs(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use crate::support::certs;
    let (ca, server) = (format!("{name}-ca"), format!("{name}-server"));
    certs::ca(dir, &ca, &format!("{name} test CA"));
    certs::sign(
        dir,
        &server,
        "/CN=localhost",
        &ca,
        "subjectAltName=DNS:localhost",
    );
    (
        dir.join(format!("{ca}.pem")),
        dir.join(format!("{server}.pem")),
        dir.join(format!("{server}.key")),
    )
}

#[test]
fn sslmodes_against_a_tls_only_server() {
    let tmp =
        std::env::temp_dir().join(format!("sitewatch-tls-{}", sitewatch::util::new_check_id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (ca, crt, key) = make_certs(&tmp, "good");
    let (other_ca, _, _) = make_certs(&tmp, "other");
    let cluster = Cluster::start(ClusterOptions {
        ssl: Some((crt, key)),
    });
    let port = cluster.port;
    // (host, sslmode, CA file, expected: Ok(()) or an error text)
    let check = |host: &str,
                 mode: SslMode,
                 ca_file: Option<&std::path::Path>,
                 expected: Result<(), &str>| {
        let cfg = sitewatch::config::PostgresConfig {
            url: format!("postgres://postgres@{host}:{port}/postgres"),
            password: Some(sitewatch::config::Secret("not-shown".into())),
            sslmode: mode,
            ca_file: ca_file.map(|p| p.to_path_buf()),
            retention: Duration::from_secs(86_400),
            rollup_retention: Duration::from_secs(86_400),
            batch_size: 10,
        };
        let got = db::connect(&cfg, "sitewatch-tls-test").and_then(|mut c| {
            let on: bool = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .map_err(SinkError::from)?
                .get(0);
            assert!(on, "{host} {mode:?}: connected without TLS");
            Ok(())
        });
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(want)) => {
                let text = e.to_string();
                assert!(
                    text.contains(want),
                    "{host} {mode:?} {ca_file:?}: {text:?} lacks {want:?}"
                );
                assert!(!text.contains("not-shown"), "password leaked: {text}");
            }
            (got, want) => panic!("{host} {mode:?} {ca_file:?}: got {got:?}, want {want:?}"),
        }
    };
    let ca = Some(ca.as_path());
    let other = Some(other_ca.as_path());
    // pg_hba allows TCP only with TLS.
    check("127.0.0.1", SslMode::Disable, None, Err("no encryption"));
    check("127.0.0.1", SslMode::Prefer, None, Ok(()));
    check("127.0.0.1", SslMode::Require, None, Ok(()));
    // libpq: require with a CA file verifies the chain.
    check(
        "127.0.0.1",
        SslMode::Require,
        other,
        Err("certificate verify failed"),
    );
    check("127.0.0.1", SslMode::VerifyCa, ca, Ok(()));
    check(
        "127.0.0.1",
        SslMode::VerifyCa,
        other,
        Err("certificate verify failed"),
    );
    check("localhost", SslMode::VerifyFull, ca, Ok(()));
    // The certificate names localhost, not 127.0.0.1.
    check(
        "127.0.0.1",
        SslMode::VerifyFull,
        ca,
        Err("certificate verify failed"),
    );
    check(
        "localhost",
        SslMode::VerifyFull,
        other,
        Err("certificate verify failed"),
    );

    // The password comes from PostgresConfig.password (env or file in real configs) and never
    // shows in an error.
    let admin_cfg = sitewatch::config::PostgresConfig {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        password: None,
        sslmode: SslMode::Require,
        ca_file: None,
        retention: Duration::from_secs(86_400),
        rollup_retention: Duration::from_secs(86_400),
        batch_size: 10,
    };
    db::connect(&admin_cfg, "sitewatch-tls-test")
        .expect("admin")
        .batch_execute("CREATE ROLE sitewatch LOGIN PASSWORD 'right-horse-battery'")
        .expect("create role");
    let login = |password: &str| sitewatch::config::PostgresConfig {
        url: format!("postgres://sitewatch@127.0.0.1:{port}/postgres"),
        password: Some(sitewatch::config::Secret(password.into())),
        ..admin_cfg.clone()
    };
    let mut c = db::connect(&login("right-horse-battery"), "sitewatch-tls-test").expect("login");
    let user: String = c
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, "sitewatch");
    let Err(e) = db::connect(&login("wrong-staple"), "sitewatch-tls-test") else {
        panic!("a wrong password was accepted");
    };
    let text = e.to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(
        !text.contains("wrong-staple") && !text.contains("right-horse"),
        "{text}"
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---------------------------------------------------------------------------------------------
// With a broker: the consume loop.

/// A broker, a database with the schema, and a topic with `partitions` partitions.
pub(crate) struct Pipeline {
    broker: Box<dyn crate::support::TestBroker>,
    pub(crate) db: TestDb,
    topic: String,
    partitions: i32,
}

impl Pipeline {
    pub(crate) fn new(partitions: i32) -> Pipeline {
        Pipeline::on(partitions, fresh_db())
    }

    fn on(partitions: i32, db: TestDb) -> Pipeline {
        Pipeline::with_broker(
            partitions,
            db,
            Box::new(crate::support::broker::Broker::start()),
        )
    }

    /// A pipeline whose clients reach the broker through a proxy that can be cut: the broker
    /// advertises the proxy's port.
    fn behind_proxy(partitions: i32) -> (Pipeline, crate::support::proxy::Proxy) {
        let proxy_port = crate::support::free_port();
        let broker_port = crate::support::free_port();
        let broker = crate::support::broker::Broker::start_with(
            broker_port,
            format!("127.0.0.1:{proxy_port}"),
            &[],
        );
        let proxy = crate::support::proxy::Proxy::start_on(proxy_port, broker_port);
        (
            Pipeline::with_broker(partitions, fresh_db(), Box::new(broker)),
            proxy,
        )
    }

    fn with_broker(
        partitions: i32,
        db: TestDb,
        broker: Box<dyn crate::support::TestBroker>,
    ) -> Pipeline {
        // RUST_LOG=sitewatch=info shows the sink's retries when a test fails.
        let _ = env_logger::builder().is_test(true).try_init();
        let topic = "sitewatch.checks".to_string();
        let p = Pipeline {
            broker,
            db,
            topic,
            partitions,
        };
        p.kafka()
            .ensure_topic(&p.topic, partitions, 1)
            .expect("create topic");
        p
    }

    fn kafka(&self) -> sitewatch::kafka::Client {
        sitewatch::kafka::Client::connect(&self.broker.config(&self.topic)).expect("kafka")
    }

    pub(crate) fn config_text(&self) -> String {
        format!(
            "[kafka]\nbrokers = [\"{}\"]\ntopic = \"{}\"\npartitions = {}\n\n\
             [postgres]\nurl = \"{}\"\nsslmode = \"disable\"\nbatch_size = 500\n",
            self.broker.addr(),
            self.topic,
            self.partitions,
            self.db.url()
        )
    }

    fn config(&self) -> Config {
        Config::parse(
            &self.config_text(),
            std::path::Path::new("test.toml"),
            &|_| None,
        )
        .expect("config")
    }

    fn start_sink(&self) -> (sink::Sink, sitewatch::service::Shutdown) {
        let shutdown = sitewatch::service::Shutdown::new();
        let s = sink::Sink::start(&self.config(), &shutdown).expect("sink starts");
        (s, shutdown)
    }

    pub(crate) fn produce(&self, records: &[CheckResult]) {
        self.produce_raw(
            &records
                .iter()
                .map(|r| (r.target.clone().into_bytes(), r.to_json().into_bytes()))
                .collect::<Vec<_>>(),
        );
    }

    fn produce_raw(&self, messages: &[(Vec<u8>, Vec<u8>)]) {
        let mut k = self.kafka();
        for chunk in messages.chunks(500) {
            let batch: Vec<sitewatch::kafka::ProduceRecord> = chunk
                .iter()
                .map(|(key, value)| sitewatch::kafka::ProduceRecord {
                    key: key.clone(),
                    value: value.clone(),
                    timestamp_ms: unix_ms_now(),
                })
                .collect();
            k.produce(&self.topic, &batch).expect("produce");
        }
    }

    /// Per partition: the high watermark (from a fetch: exact, unlike ListOffsets on tansu).
    fn high_watermarks(&self) -> Vec<(i32, i64)> {
        let mut k = self.kafka();
        (0..self.partitions)
            .map(|p| {
                let f = k
                    .fetch(&self.topic, p, 0, 1024, Duration::from_millis(1))
                    .expect("fetch");
                (p, f.high_watermark.expect("a high watermark"))
            })
            .collect()
    }

    fn stored_offsets(&self) -> Vec<(i32, i64)> {
        let mut c = self.db.client();
        (0..self.partitions)
            .map(|p| {
                (
                    p,
                    schema::load_offset(&mut c, &self.topic, p)
                        .expect("offset")
                        .unwrap_or(0),
                )
            })
            .collect()
    }

    /// Waits until `checks` + `dead_letters` hold `n` rows (generous: the machine is shared).
    fn wait_rows(&self, n: i64, within: Duration) -> Duration {
        let start = Instant::now();
        let mut c = self.db.client();
        loop {
            let have = count(
                &mut c,
                "SELECT (SELECT count(*) FROM checks) + (SELECT count(*) FROM dead_letters)",
            );
            if have >= n {
                assert_eq!(have, n, "more rows than records");
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "only {have} of {n} rows after {within:?}; {}",
                self.diagnose()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Offsets, high watermarks and the offset ranges missing from `checks`, for a failure
    /// message.
    fn diagnose(&self) -> String {
        let mut c = self.db.client();
        let gaps: Vec<String> = c
            .query(
                "SELECT p, min(o), max(o) FROM ( \
                   SELECT p, o, o - row_number() OVER (PARTITION BY p ORDER BY o) AS grp \
                   FROM (SELECT kafka_partition AS p, kafka_offset AS o FROM checks \
                         UNION ALL SELECT partition, \"offset\" FROM dead_letters) x) y \
                 GROUP BY p, grp ORDER BY p, min(o)",
                &[],
            )
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        format!(
                            "p{} {}..={}",
                            r.get::<_, i32>(0),
                            r.get::<_, i64>(1),
                            r.get::<_, i64>(2)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "stored offsets {:?}, high watermarks {:?}, stored ranges {gaps:?}",
            self.stored_offsets(),
            self.high_watermarks()
        )
    }

    /// Waits until every partition's stored offset is its high watermark.
    pub(crate) fn wait_offsets_at_end(&self) {
        crate::support::wait_for("offsets to reach the end", Duration::from_secs(120), || {
            self.stored_offsets() == self.high_watermarks()
        });
    }

    /// No duplicates, every record stored, offsets at the high watermarks.
    fn assert_exactly_once(&self, records: &[CheckResult]) {
        let mut c = self.db.client();
        assert_eq!(
            count(&mut c, "SELECT count(*) FROM checks"),
            records.len() as i64
        );
        assert_eq!(
            count(&mut c, "SELECT count(DISTINCT check_id) FROM checks"),
            records.len() as i64
        );
        let mut stored = stored_records(&mut c);
        stored.sort_by(|a, b| a.check_id.cmp(&b.check_id));
        let mut want = records.to_vec();
        want.sort_by(|a, b| a.check_id.cmp(&b.check_id));
        assert!(stored == want, "stored rows differ from the records");
        assert_eq!(self.stored_offsets(), self.high_watermarks());
    }
}

/// `n` records over 20 targets with every kind of outcome, started within the last hour.
fn varied_records(n: usize) -> Vec<CheckResult> {
    let failures = [
        None,
        None,
        None,
        Some(FailureReason::Dns),
        Some(FailureReason::Connect),
        Some(FailureReason::Tls),
        Some(FailureReason::Timeout),
        Some(FailureReason::HttpStatus),
        Some(FailureReason::BodyMismatch),
        Some(FailureReason::Rule),
    ];
    (0..n)
        .map(|i| {
            let target = format!("site-{}", i % 20);
            let mut r = record(
                &target,
                (i % 3_600_000) as i64,
                failures[i % failures.len()],
                (i % 997) as f64 + 0.5,
            );
            if i % 4 == 0 {
                r.regex = Some("ok".into());
                r.regex_matched = Some(i % 8 == 0);
            }
            if r.failure == Some(FailureReason::HttpStatus) {
                r.status = Some(503);
            }
            r.timings.ttfb = Some(1.25);
            r
        })
        .collect()
}

#[test]
fn published_records_land_exactly_once_with_every_field() {
    let p = Pipeline::new(4);
    let records = varied_records(4000);
    p.produce(&records);
    let (sink, shutdown) = p.start_sink();
    let took = p.wait_rows(4000, Duration::from_secs(300));
    eprintln!(
        "sink: 4000 records from 4 partitions in {:.2}s = {:.0} rows/s",
        took.as_secs_f64(),
        4000.0 / took.as_secs_f64()
    );
    crate::support::wait_for("status to show no lag", Duration::from_secs(60), || {
        let s = sink.status();
        s.partitions.len() == 4 && s.lag() == 0
    });
    let status = sink.status();
    assert_eq!(
        status.partitions.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(
        status.partitions.values().map(|s| s.rows).sum::<u64>(),
        4000
    );
    assert!(
        status
            .line()
            .contains("partitions 0,1,2,3 lag 0; 4000 rows"),
        "{}",
        status.line()
    );
    shutdown.trigger();
    sink.join().expect("clean stop");
    p.assert_exactly_once(&records);
    // Targets and the status view know every target.
    let mut c = p.db.client();
    assert_eq!(count(&mut c, "SELECT count(*) FROM targets"), 20);
    assert_eq!(count(&mut c, "SELECT count(*) FROM target_status"), 20);
}

#[test]
fn two_sinks_share_the_partitions_and_one_takes_all_when_the_other_stops() {
    let p = Pipeline::new(4);
    let (a, stop_a) = p.start_sink();
    crate::support::wait_for("sink A to own all 4", Duration::from_secs(60), || {
        a.status().partitions.len() == 4
    });
    let (b, stop_b) = p.start_sink();
    crate::support::wait_for("A and B to own 2 each", Duration::from_secs(60), || {
        a.status().partitions.len() == 2 && b.status().partitions.len() == 2
    });
    let first = varied_records(2000);
    p.produce(&first);
    p.wait_rows(2000, Duration::from_secs(300));
    let rows_a: u64 = a.status().partitions.values().map(|s| s.rows).sum();
    let rows_b: u64 = b.status().partitions.values().map(|s| s.rows).sum();
    assert!(
        rows_a > 0 && rows_b > 0,
        "both work: A {rows_a}, B {rows_b}"
    );
    assert_eq!(rows_a + rows_b, 2000);
    stop_a.trigger();
    a.join().expect("A stops");
    let start = Instant::now();
    crate::support::wait_for("B to own all 4", Duration::from_secs(60), || {
        b.status().partitions.len() == 4
    });
    eprintln!(
        "takeover after a clean stop: {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let second = varied_records(2000);
    p.produce(&second);
    p.wait_rows(4000, Duration::from_secs(300));
    stop_b.trigger();
    b.join().expect("B stops");
    let all: Vec<CheckResult> = first.into_iter().chain(second).collect();
    p.assert_exactly_once(&all);
}

#[test]
fn garbage_from_librdkafka_becomes_dead_letters_and_good_records_land() {
    let p = Pipeline::new(1);
    let good = varied_records(300);
    let garbage: Vec<Vec<u8>> = vec![
        b"\x01\x02 not json".to_vec(),
        b"{\"hello\": \"world\"}".to_vec(),
        format!("{{\"v\":1,\"pad\":\"{}\"}}", "x".repeat(400 * 1024)).into_bytes(),
    ];
    // Through the librdkafka peer: one "key<TAB>value" line per message.
    let mut input = Vec::new();
    for (i, r) in good.iter().enumerate() {
        input.extend_from_slice(format!("{}\t{}\n", r.target, r.to_json()).as_bytes());
        if i % 100 == 50 {
            input.extend_from_slice(b"junk\t");
            input.extend_from_slice(&garbage[i / 100]);
            input.push(b'\n');
        }
    }
    let out = crate::support::broker::kpeer(&["produce", &p.broker.addr(), &p.topic], &input);
    assert_eq!(out.trim(), "produced 303");
    let (sink, shutdown) = p.start_sink();
    p.wait_rows(303, Duration::from_secs(300));
    p.wait_offsets_at_end();
    shutdown.trigger();
    sink.join().expect("stop");
    p.assert_exactly_once(&good);
    let mut c = p.db.client();
    let dead: Vec<(String, Vec<u8>, i32, Vec<u8>)> = c
        .query(
            "SELECT error, key, value_bytes, value FROM dead_letters ORDER BY \"offset\"",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let expected = [
        "not a check record",
        "missing field",
        "over the 262144-byte limit",
    ];
    assert_eq!(dead.len(), expected.len());
    for ((error, key, len, value), (want, sent)) in dead.iter().zip(expected.iter().zip(&garbage)) {
        assert!(error.contains(want), "{error:?} lacks {want:?}");
        assert_eq!(key.as_slice(), b"junk");
        assert_eq!(*len as usize, sent.len());
        assert_eq!(
            value.as_slice(),
            &sent[..sent.len().min(sink::writer::DEAD_LETTER_KEEP_BYTES)]
        );
    }
}

#[test]
fn killed_database_sessions_mid_stream_lose_nothing_and_duplicate_nothing() {
    let p = Pipeline::new(2);
    let records = varied_records(20_000);
    p.produce(&records);
    let (sink, shutdown) = p.start_sink();
    let mut kills = 0;
    let mut c = p.db.client();
    let end = Instant::now() + Duration::from_secs(600);
    let mut last = 0;
    loop {
        // Let it make some progress between kills, then kill every sink session: the writers
        // (mid-transaction or between batches) and the lock session.
        let have = count(&mut c, "SELECT count(*) FROM checks");
        if have >= 20_000 {
            break;
        }
        assert!(
            Instant::now() < end,
            "stalled at {have} rows after {kills} kills"
        );
        if have >= last + 1000 {
            last = have;
            kills += p.db.terminate_sessions("sitewatch sink");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(kills >= 5, "only {kills} sessions killed");
    p.wait_offsets_at_end();
    shutdown.trigger();
    sink.join().expect("stop");
    eprintln!("{kills} sink sessions killed during 20000 records");
    p.assert_exactly_once(&records);
}

#[test]
fn postgres_restarting_mid_stream_loses_nothing() {
    let server = Arc::new(Server::throwaway(ClusterOptions::default()));
    let db = TestDb::create_on(server.clone());
    sink::init_db(&config_for(&db)).expect("init-db");
    let p = Pipeline::on(2, db);
    let (sink, shutdown) = p.start_sink();
    let records = varied_records(6000);
    p.produce(&records[..3000]);
    crate::support::wait_for("some rows", Duration::from_secs(120), || {
        count(&mut p.db.client(), "SELECT count(*) FROM checks") > 0
    });
    let cluster = server.cluster.as_ref().expect("throwaway");
    cluster.stop_server("immediate");
    // Records keep arriving while the database is down; the sink fails and retries (twice
    // per partition at least) before it comes back.
    let retries = sink.status().retries;
    p.produce(&records[3000..]);
    crate::support::wait_for("the sink retrying", Duration::from_secs(60), || {
        sink.status().retries >= retries + 4
    });
    cluster.start_server();
    p.wait_rows(6000, Duration::from_secs(300));
    p.wait_offsets_at_end();
    shutdown.trigger();
    sink.join().expect("stop");
    p.assert_exactly_once(&records);
}

// ---------------------------------------------------------------------------------------------
// The real `sitewatch sink` process, killed with SIGKILL.

/// A `sitewatch sink --config F` process, SIGKILLed on drop.
pub(crate) struct SinkProcess {
    child: std::process::Child,
}

impl SinkProcess {
    pub(crate) fn start(config: &std::path::Path, log: &std::path::Path) -> SinkProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("sink log");
        let child = crate::support::sitewatch()
            .arg("sink")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "sitewatch=info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start sitewatch sink");
        SinkProcess { child }
    }

    /// SIGKILL: no shutdown code runs, transactions in flight are cut off.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pipeline {
    fn config_file(&self, dir: &crate::support::TempDir) -> std::path::PathBuf {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, self.config_text()).expect("write config");
        path
    }

    /// Which lock session holds which partitions: backend pid → partitions (one lock session
    /// per sink process).
    fn owners(&self) -> std::collections::BTreeMap<i32, Vec<i64>> {
        let mut c = self.db.client();
        let mut out: std::collections::BTreeMap<i32, Vec<i64>> = Default::default();
        for row in c
            .query(
                "SELECT pid, objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND mode = 'ExclusiveLock' AND classid = hashtext($1)::oid AND objsubid = 2 \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 ORDER BY 1, 2",
                &[&self.topic],
            )
            .expect("pg_locks")
        {
            out.entry(row.get(0)).or_default().push(row.get(1));
        }
        out
    }
}

#[test]
fn exactly_once_while_the_sink_process_is_killed_repeatedly() {
    let p = Pipeline::new(4);
    let dir = crate::support::TempDir::new("sink-kill");
    let config = p.config_file(&dir);
    let log = dir.path().join("sink.log");
    let records = varied_records(20_000);
    p.produce(&records);
    let mut c = p.db.client();
    let mut kills = 0;
    let end = Instant::now() + Duration::from_secs(900);
    let sink = loop {
        let before = count(&mut c, "SELECT count(*) FROM checks");
        let sink = SinkProcess::start(&config, &log);
        // Let this life make progress, then SIGKILL it wherever it is.
        loop {
            let have = count(&mut c, "SELECT count(*) FROM checks");
            if have >= 20_000 || have >= before + 1500 {
                break;
            }
            assert!(
                Instant::now() < end,
                "stalled at {have} rows after {kills} kills; {}\nsink log:\n{}",
                p.diagnose(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if count(&mut c, "SELECT count(*) FROM checks") >= 20_000 {
            break sink;
        }
        sink.kill();
        kills += 1;
    };
    p.wait_offsets_at_end();
    sink.kill();
    eprintln!("sink process SIGKILLed {kills} times during 20000 records");
    assert!(kills >= 5, "only {kills} kills");
    p.assert_exactly_once(&records);
}

#[test]
fn two_sink_processes_share_partitions_and_the_survivor_of_a_kill_takes_all() {
    let p = Pipeline::new(4);
    let dir = crate::support::TempDir::new("sink-two");
    let config = p.config_file(&dir);
    let a = SinkProcess::start(&config, &dir.path().join("a.log"));
    crate::support::wait_for(
        "A to own all 4 partitions",
        Duration::from_secs(120),
        || p.owners().values().map(Vec::len).collect::<Vec<_>>() == vec![4],
    );
    let b = SinkProcess::start(&config, &dir.path().join("b.log"));
    crate::support::wait_for(
        "two sinks with 2 partitions each",
        Duration::from_secs(120),
        || p.owners().values().map(Vec::len).collect::<Vec<_>>() == vec![2, 2],
    );
    let first = varied_records(4000);
    p.produce(&first);
    p.wait_rows(4000, Duration::from_secs(300));
    // Both wrote: each partition's rows came through its owner, and each owns two.
    let mut c = p.db.client();
    let per_partition: Vec<i64> = (0..4)
        .map(|i| {
            c.query_one(
                "SELECT count(*) FROM checks WHERE kafka_partition = $1",
                &[&i],
            )
            .unwrap()
            .get(0)
        })
        .collect();
    assert!(per_partition.iter().all(|&n| n > 0), "{per_partition:?}");
    a.kill();
    let start = Instant::now();
    crate::support::wait_for(
        "B to own all 4 partitions",
        Duration::from_secs(120),
        || p.owners().values().map(Vec::len).collect::<Vec<_>>() == vec![4],
    );
    eprintln!(
        "takeover after SIGKILL: {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let second = varied_records(4000);
    p.produce(&second);
    p.wait_rows(8000, Duration::from_secs(300));
    p.wait_offsets_at_end();
    b.kill();
    let all: Vec<CheckResult> = first.into_iter().chain(second).collect();
    p.assert_exactly_once(&all);
}

// ---------------------------------------------------------------------------------------------
// End to end: HTTP targets → `sitewatch run` (agent and sink in one process) → PostgreSQL.

/// Every record in the topic, read with our client from offset 0 to each high watermark.
fn topic_records(p: &Pipeline) -> Vec<CheckResult> {
    let mut k = p.kafka();
    let mut out = Vec::new();
    for part in 0..p.partitions {
        let mut offset = 0;
        loop {
            let f = k
                .fetch(&p.topic, part, offset, 4 << 20, Duration::from_millis(10))
                .expect("fetch");
            offset = f.next_offset.max(offset);
            for r in f.records {
                let value = r.value.expect("value");
                out.push(CheckResult::from_json(&value).expect("a check record"));
            }
            if f.high_watermark.is_some_and(|hw| offset >= hw) {
                break;
            }
        }
    }
    out
}

// The agent → Kafka → sink path end to end, on both brokers: `sink::tansu::NAME` and
// `sink::apache::NAME`.
crate::support::on_both_brokers!(
    http_targets_through_sitewatch_run_land_as_rows_equal_to_the_records
);

fn http_targets_through_sitewatch_run_land_as_rows_equal_to_the_records(
    broker: Box<dyn crate::support::TestBroker>,
) {
    use crate::support::http::{HttpServer, Reply};
    let p = Pipeline::with_broker(3, fresh_db(), broker);
    let up = HttpServer::start(|_, _| Reply::status(200, "hello world"));
    let missing = HttpServer::start(|_, _| Reply::status(404, "nope"));
    let dir = crate::support::TempDir::new("sink-e2e");
    let metrics_port = crate::support::free_port();
    let text = format!(
        "[agent]\nid = \"e2e\"\nlocation = \"lab-1\"\ninterval = \"300ms\"\ntimeout = \"2s\"\njitter = \"0%\"\n\
         state_dir = \"{state}\"\n\n{pipeline}\n\
         [[target]]\nid = \"up\"\nurl = \"{up}\"\nregex = \"hello\"\n\
         [[target]]\nid = \"mismatch\"\nurl = \"{up}\"\nregex = \"goodbye\"\n\
         [[target]]\nid = \"notfound\"\nurl = \"{missing}\"\n\
         [[target]]\nid = \"closed\"\nurl = \"http://127.0.0.1:{closed}/\"\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
        state = dir.path().join("state").display(),
        metrics = metrics_port,
        pipeline = p.config_text(),
        up = up.url("/"),
        missing = missing.url("/missing"),
        closed = crate::support::free_port(),
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("run.log");
    let mut run = crate::support::sitewatch()
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "sitewatch=info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start sitewatch run");
    // Rows appear while it runs: at least 3 checks of every target.
    let mut c = p.db.client();
    crate::support::wait_for("3 rows per target", Duration::from_secs(120), || {
        count(
            &mut c,
            "SELECT count(*) FROM (SELECT target FROM checks GROUP BY target \
             HAVING count(*) >= 3) t",
        ) == 4
    });
    assert_sink_metrics_per_partition(metrics_port);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = run.wait().unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(exit.code(), Some(0), "sitewatch run exit; log:\n{log_text}");
    // What the agent flushed at shutdown after the sink stopped: a sink started now drains it.
    let (sink, shutdown) = p.start_sink();
    p.wait_offsets_at_end();
    shutdown.trigger();
    sink.join().expect("stop");

    let records = topic_records(&p);
    assert!(records.len() >= 12, "{} records", records.len());
    p.assert_exactly_once(&records);
    assert_rows_match_each_target_kind(&mut c);
}

/// The sink's side of /metrics on `sitewatch run`: lag and rows for each partition of the topic.
fn assert_sink_metrics_per_partition(metrics_port: u16) {
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let series = |name: &str, partition: i32| {
        format!("{name}{{topic=\"sitewatch.checks\",partition=\"{partition}\"}}")
    };
    let mut body = String::new();
    crate::support::wait_for("sink rows on /metrics", Duration::from_secs(120), || {
        body = crate::metrics::get(metrics, "/metrics", "").1;
        let rows: f64 = (0..3)
            .filter_map(|p| crate::metrics::sample(&body, &series("sitewatch_sink_rows_total", p)))
            .sum();
        rows >= 12.0
    });
    for p in 0..3 {
        let lag = crate::metrics::sample(&body, &series("sitewatch_sink_lag_records", p));
        assert!(lag.is_some_and(|l| l >= 0.0), "partition {p}:\n{body}");
    }
}

/// The rows of the four kinds of target the end-to-end test probes, and `target_status`.
fn assert_rows_match_each_target_kind(c: &mut postgres::Client) {
    // The fields the rows must carry for each kind of target.
    for r in stored_records(c) {
        let t = &r.timings;
        assert!(t.total > 0.0, "{r:?}");
        // The agent's `[agent] location`, carried by the record into its row.
        assert_eq!(r.location.as_deref(), Some("lab-1"), "{r:?}");
        match r.target.as_str() {
            "up" => {
                assert_eq!(
                    (r.up, r.status, r.regex_matched, r.failure),
                    (true, Some(200), Some(true), None)
                );
                assert!(
                    t.connect.is_some() && t.ttfb.is_some() && t.transfer.is_some(),
                    "{t:?}"
                );
            }
            "mismatch" => assert_eq!(
                (r.up, r.status, r.regex_matched, r.failure),
                (
                    false,
                    Some(200),
                    Some(false),
                    Some(FailureReason::BodyMismatch)
                )
            ),
            "notfound" => assert_eq!(
                (r.up, r.status, r.failure),
                (false, Some(404), Some(FailureReason::HttpStatus))
            ),
            "closed" => {
                assert_eq!(
                    (r.up, r.status, r.failure),
                    (false, None, Some(FailureReason::Connect))
                );
                assert!(t.ttfb.is_none(), "{t:?}");
            }
            other => panic!("unexpected target {other}"),
        }
    }
    // The view answers "is my site up, and since when".
    let rows = c
        .query(
            "SELECT target, up, since <= last_check FROM target_status ORDER BY target",
            &[],
        )
        .unwrap();
    let got: Vec<(String, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("closed".to_string(), false, true),
            ("mismatch".to_string(), false, true),
            ("notfound".to_string(), false, true),
            ("up".to_string(), true, true),
        ]
    );
}

#[test]
fn a_sink_started_while_postgres_is_down_waits_then_refuses_a_database_without_schema() {
    let server = Arc::new(Server::throwaway(ClusterOptions::default()));
    let db = TestDb::create_on(server.clone());
    let cluster = server.cluster.as_ref().expect("throwaway");
    cluster.stop_server("fast");
    let text = format!(
        "[kafka]\nbrokers = [\"127.0.0.1:{}\"]\n[postgres]\nurl = \"{}\"\nsslmode = \"disable\"\n",
        crate::support::free_port(),
        db.url()
    );
    let cfg = Config::parse(&text, std::path::Path::new("test.toml"), &|_| None).unwrap();
    let shutdown = sitewatch::service::Shutdown::new();
    // Down is not an error: the sink retries.
    let sink = sink::Sink::start(&cfg, &shutdown).expect("starts while the database is down");
    crate::support::wait_for("the sink retrying", Duration::from_secs(60), || {
        sink.status().retries >= 1
    });
    cluster.start_server();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sink.join());
    });
    let result = rx.recv_timeout(Duration::from_secs(120));
    shutdown.trigger();
    match result {
        Ok(Err(e @ SinkError::SchemaMissing { .. })) => {
            assert!(
                e.to_string().contains("run `sitewatch init-db` first"),
                "{e}"
            )
        }
        other => panic!("expected SchemaMissing, got {other:?}"),
    }
}

#[test]
fn init_db_command_runs_twice_and_reports_an_unreachable_database_without_the_password() {
    let db = TestDb::create();
    let dir = crate::support::TempDir::new("sink-initdb");
    let init_db = |url: &str| {
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!("[postgres]\nurl = \"{url}\"\nsslmode = \"disable\"\n"),
        )
        .unwrap();
        let out = crate::support::sitewatch()
            .args(["init-db", "--config", config.to_str().unwrap()])
            .env("SITEWATCH_PG_PASSWORD", "pw-never-printed")
            .output()
            .expect("run sitewatch init-db");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for _ in 0..2 {
        let (code, stderr) = init_db(&db.url());
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("schema is up to date"), "{stderr}");
    }
    schema::require(&mut db.client(), &db.url()).expect("schema");
    let closed = crate::support::free_port();
    let (code, stderr) = init_db(&format!("postgres://sitewatch@127.0.0.1:{closed}/x"));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot connect to PostgreSQL at postgres://sitewatch@127.0.0.1:{closed}/x"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("pw-never-printed"), "{stderr}");
}

#[test]
fn kafka_unreachable_mid_stream_loses_nothing() {
    let (p, mut proxy) = Pipeline::behind_proxy(2);
    let records = varied_records(6000);
    p.produce(&records[..3000]);
    let (sink, shutdown) = p.start_sink();
    crate::support::wait_for("some rows", Duration::from_secs(120), || {
        count(&mut p.db.client(), "SELECT count(*) FROM checks") > 0
    });
    let retries = sink.status().retries;
    proxy.cut();
    crate::support::wait_for("the sink retrying", Duration::from_secs(60), || {
        sink.status().retries >= retries + 2
    });
    proxy.resume();
    p.produce(&records[3000..]);
    p.wait_rows(6000, Duration::from_secs(300));
    p.wait_offsets_at_end();
    shutdown.trigger();
    sink.join().expect("stop");
    p.assert_exactly_once(&records);
}

/// Issue 12: 3,000 records, `batch_size = 500`, one partition. A sink behind the high watermark
/// fetches with no wait; the post-0.6.0 tansu answers such a fetch with no partition in it.
/// That used to be "no answer": the worker reconnected and sent the same zero-wait fetch
/// forever, stuck at 1,000 rows. Both builds must deliver every record, exactly once.
fn a_backlog_drains_on(build: crate::support::broker::Tansu) {
    let broker = crate::support::broker::Broker::start_build(build);
    let p = Pipeline::with_broker(1, fresh_db(), Box::new(broker));
    let records = varied_records(3000);
    p.produce(&records);
    let (sink, shutdown) = p.start_sink();
    let mut c = p.db.client();
    crate::support::wait_for(
        "all 3,000 rows in PostgreSQL",
        Duration::from_secs(300),
        || count(&mut c, "SELECT count(*) FROM checks") >= 3000,
    );
    p.wait_offsets_at_end();
    shutdown.trigger();
    sink.join().expect("clean stop");
    p.assert_exactly_once(&records);
}

#[test]
fn a_backlog_drains_on_tansu_next() {
    a_backlog_drains_on(crate::support::broker::Tansu::Next);
}

#[test]
fn a_backlog_drains_on_tansu_0_6() {
    a_backlog_drains_on(crate::support::broker::Tansu::V0_6);
}

// ---------------------------------------------------------------------------------------------
// Rollups (check_rollups_hourly, check_rollups_daily) against the raw checks.

/// Per target over a window: checks, successes, sum of total_ms, histogram of total_ms.
type WindowAggregate = std::collections::BTreeMap<String, (i64, i64, f64, Vec<i64>)>;

/// The aggregate of the raw `checks` rows started in [from, to).
fn window_from_raw(c: &mut postgres::Client, from: SystemTime, to: SystemTime) -> WindowAggregate {
    let bounds = sink::rollup::TOTAL_MS_BOUNDS.to_vec();
    let mut out = WindowAggregate::new();
    for row in c
        .query(
            "SELECT target, count(*), count(*) FILTER (WHERE up), sum(total_ms) \
             FROM checks WHERE started_at >= $1 AND started_at < $2 GROUP BY target",
            &[&from, &to],
        )
        .unwrap()
    {
        let hist = vec![0; sink::rollup::BUCKETS];
        out.insert(row.get(0), (row.get(1), row.get(2), row.get(3), hist));
    }
    // A check's bucket is the number of bounds below its total (the first bound >= it).
    for row in c
        .query(
            "SELECT target, b, count(*) FROM checks, \
             LATERAL (SELECT count(*) FROM unnest($3::float8[]) x WHERE x < total_ms) AS k(b) \
             WHERE started_at >= $1 AND started_at < $2 GROUP BY target, b",
            &[&from, &to, &bounds],
        )
        .unwrap()
    {
        let target: String = row.get(0);
        let bucket: i64 = row.get(1);
        out.get_mut(&target).unwrap().3[bucket as usize] = row.get(2);
    }
    out
}

/// The sum of `table`'s rollups whose period starts in [from, to).
fn window_from_rollups(
    c: &mut postgres::Client,
    table: &str,
    from: SystemTime,
    to: SystemTime,
) -> WindowAggregate {
    let mut out = WindowAggregate::new();
    for row in c
        .query(
            &format!(
                "SELECT target, sum(checks)::int8, sum(successes)::int8, sum(total_ms_sum), \
                 (SELECT array_agg(s ORDER BY i) FROM (SELECT i, sum(h)::int8 AS s \
                   FROM {table} r2, unnest(r2.total_ms_hist) WITH ORDINALITY AS u(h, i) \
                   WHERE r2.target = r.target AND r2.period_start >= $1 AND r2.period_start < $2 \
                   GROUP BY i) per_bucket) \
                 FROM {table} r WHERE period_start >= $1 AND period_start < $2 GROUP BY target"
            ),
            &[&from, &to],
        )
        .unwrap()
    {
        out.insert(row.get(0), (row.get(1), row.get(2), row.get(3), row.get(4)));
    }
    out
}

/// Rollups equal the raw aggregate over the whole range and over random hour- and day-aligned
/// windows within the last `days` days.
fn assert_rollups_match_raw(c: &mut postgres::Client, days: i64) {
    let seed = unix_ms_now() as u64 | 1;
    let mut x = seed;
    let mut next = move |n: i64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as i64
    };
    const HOUR: i64 = 3_600_000;
    let now_hour = unix_ms_now() / HOUR + 1;
    let span = (days + 1) * 24;
    let mut windows = vec![("check_rollups_hourly", now_hour - span, now_hour, HOUR)];
    for _ in 0..20 {
        let (a, b) = (next(span), next(span));
        windows.push((
            "check_rollups_hourly",
            now_hour - a.max(b),
            now_hour - a.min(b),
            HOUR,
        ));
    }
    let now_day = now_hour / 24 + 1;
    for _ in 0..6 {
        let (a, b) = (next(days + 2), next(days + 2));
        windows.push((
            "check_rollups_daily",
            now_day - a.max(b),
            now_day - a.min(b),
            24 * HOUR,
        ));
    }
    let ts = |ms: i64| UNIX_EPOCH + Duration::from_millis(ms as u64);
    for (table, from, to, unit) in windows {
        let (from, to) = (ts(from * unit), ts(to * unit));
        let raw = window_from_raw(c, from, to);
        let rolled = window_from_rollups(c, table, from, to);
        let keys = |m: &WindowAggregate| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            keys(&raw),
            keys(&rolled),
            "seed {seed}: {table} {from:?}..{to:?}"
        );
        for (target, (n, up, sum, hist)) in &raw {
            let (rn, rup, rsum, rhist) = &rolled[target];
            let what = format!("seed {seed}: {table} {from:?}..{to:?} target {target}");
            assert_eq!((n, up, hist), (rn, rup, rhist), "{what}");
            assert!(
                (sum - rsum).abs() <= 1e-9 * sum.abs().max(1.0),
                "{what}: {sum} {rsum}"
            );
        }
    }
}

/// `n` records over 7 targets, started within the last `days` days, every third one down,
/// totals spread over every histogram bucket.
fn spread_records(n: usize, days: i64) -> Vec<CheckResult> {
    (0..n)
        .map(|i| {
            let ago = (i as i64 * 7_919_111) % (days * 86_400_000);
            let failure = (i % 3 == 0).then_some(FailureReason::Timeout);
            let total = ((i * 37) % 12_000) as f64 + 0.25;
            record(&format!("site-{}", i % 7), ago, failure, total)
        })
        .collect()
}

#[test]
fn rollups_equal_the_raw_checks_with_redeliveries_and_rejected_records() {
    let db = fresh_db();
    let mut client = db.client();
    client
        .batch_execute("ALTER TABLE checks ADD CONSTRAINT no_teapots CHECK (status <> 418)")
        .unwrap();
    let mut records = spread_records(3000, 5);
    records[17].status = Some(418);
    let mut writers = [writer(&db, 0), writer(&db, 1)];
    let mut offsets = [None, None];
    for (i, chunk) in records.chunks(250).enumerate() {
        let p = i % 2;
        let from = offsets[p].unwrap_or(0);
        // Each batch is written, then half of it again (a producer retry): no double count.
        let mut values = json(chunk);
        values.extend(json(&chunk[..chunk.len() / 2]));
        let out = writers[p]
            .write(offsets[p], &messages(&values, from), 0)
            .expect("write");
        // The teapot's second copy is a dead letter too, not a duplicate.
        let teapots = u64::from(i == 0);
        assert_eq!(out.duplicates + teapots, (chunk.len() / 2) as u64);
        assert_eq!(out.dead_letters, 2 * teapots);
        offsets[p] = Some(out.next_offset);
    }
    assert_eq!(count(&mut client, "SELECT count(*) FROM checks"), 2999);
    assert_eq!(
        count(
            &mut client,
            "SELECT sum(checks)::int8 FROM check_rollups_hourly"
        ),
        2999
    );
    assert_rollups_match_raw(&mut client, 5);
}

#[test]
fn rollups_equal_the_raw_checks_after_the_sink_process_is_killed() {
    let p = Pipeline::new(2);
    let dir = crate::support::TempDir::new("sink-rollup-kill");
    let config = p.config_file(&dir);
    let log = dir.path().join("sink.log");
    let records = spread_records(6000, 3);
    p.produce(&records);
    let mut c = p.db.client();
    let mut kills = 0;
    let sink = loop {
        let before = count(&mut c, "SELECT count(*) FROM checks");
        let sink = SinkProcess::start(&config, &log);
        let target = (before + 1000).min(6000);
        crate::support::wait_for(
            "the sink to write 1000 more rows",
            Duration::from_secs(300),
            || count(&mut c, "SELECT count(*) FROM checks") >= target,
        );
        if target == 6000 {
            break sink;
        }
        // SIGKILL wherever it is: a batch in flight is cut off with its rollups.
        sink.kill();
        kills += 1;
    };
    p.wait_offsets_at_end();
    sink.kill();
    assert!(kills >= 3, "only {kills} kills");
    p.assert_exactly_once(&records);
    assert_rollups_match_raw(&mut c, 3);
}

/// Every SQL text of `packaging/grafana/sitewatch.json` (panels and variables).
fn grafana_queries() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana/sitewatch.json"
    );
    let dash: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("dashboard")).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            let sql = t["rawSql"].as_str().expect("rawSql");
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                sql.to_string(),
            ));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("variables") {
        out.push((
            format!("${}", var["name"].as_str().unwrap()),
            var["query"].as_str().unwrap().into(),
        ));
    }
    out
}

/// Grafana's macros and the `$target` variable as Grafana expands them for a 7-day range.
fn expand_grafana(sql: &str, targets: &[&str]) -> String {
    let mut sql = sql.to_string();
    while let Some(start) = sql.find("$__timeFilter(") {
        let end = sql[start..].find(')').unwrap() + start;
        let column = sql[start + "$__timeFilter(".len()..end].to_string();
        sql.replace_range(
            start..=end,
            &format!("{column} BETWEEN now() - interval '7 days' AND now() + interval '1 hour'"),
        );
    }
    let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    sql.replace("$target", &quoted.join(","))
}

#[test]
fn grafana_dashboard_queries_run_against_real_postgres_and_return_rows() {
    let db = fresh_db();
    let mut w = writer(&db, 0);
    let records = spread_records(2000, 5);
    w.write(None, &messages(&json(&records), 0), 0)
        .expect("write");
    let mut c = db.client();
    let queries = grafana_queries();
    assert!(queries.len() >= 7, "{queries:?}");
    for (title, sql) in queries {
        let sql = expand_grafana(&sql, &["site-1", "site-2"]);
        assert!(!sql.contains('$'), "{title}: unexpanded macro in {sql}");
        let mut tx = c.build_transaction().read_only(true).start().unwrap();
        let rows = tx
            .query(&sql, &[])
            .unwrap_or_else(|e| panic!("{title}: {}\n{sql}", db::describe(&e)));
        assert!(!rows.is_empty(), "{title}: no rows\n{sql}");
    }
}

#[test]
fn the_sql_histogram_quantile_agrees_with_the_rust_one() {
    let db = fresh_db();
    let mut c = db.client();
    let mut hists: Vec<Vec<i64>> = vec![vec![0; sink::rollup::BUCKETS]];
    for i in 0..40usize {
        hists.push(
            (0..sink::rollup::BUCKETS)
                .map(|b| ((i * 7 + b * 13) % 5) as i64 * ((i + b) % 3) as i64)
                .collect(),
        );
    }
    for hist in hists {
        for q in [0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let sql: Option<f64> = c
                .query_one("SELECT sitewatch_hist_quantile($1, $2)", &[&hist, &q])
                .unwrap()
                .get(0);
            assert_eq!(sql, sink::rollup::quantile(&hist, q), "{hist:?} q={q}");
        }
    }
}
