//! The database side that is not a batch: applying `schema.sql` (`init-db`), creating the
//! daily `checks` partitions ahead of time, dropping the expired ones (retention), and reading
//! a partition's stored offset.

use std::time::Duration;

use postgres::Client;

use super::SinkError;
use crate::util::format_rfc3339_ms;

/// The schema, compiled in so the installed binary and the schema never disagree.
pub const SCHEMA_SQL: &str = include_str!("../../../schema.sql");

/// The schema version `schema.sql` records; the sink refuses an older database.
pub const SCHEMA_VERSION: i32 = 6;

/// Partitions are created this many days ahead of today (UTC), so a day's first records never
/// wait for DDL.
pub const DAYS_AHEAD: i64 = 2;

const DAY_MS: i64 = 86_400_000;

/// Applies `schema.sql` in one transaction under an advisory lock: two concurrent `init-db`
/// runs serialize, and a failure leaves the database as it was.
pub fn apply(client: &mut Client) -> Result<(), SinkError> {
    let mut tx = client.transaction()?;
    // Quiet the "already exists, skipping" notices of a second run.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning; \
         SELECT pg_advisory_xact_lock(hashtext('sitewatch.init_db'));",
    )?;
    tx.batch_execute(SCHEMA_SQL)
        .map_err(|source| SinkError::Database {
            doing: Some("applying schema.sql"),
            source,
        })?;
    tx.commit().map_err(SinkError::from)
}

/// Fails with [`SinkError::SchemaMissing`] unless `init-db` has run (at this version or later).
pub fn require(client: &mut Client, url: &str) -> Result<(), SinkError> {
    let present = tables_exist(client, &["sitewatch_schema", "checks"])?;
    let version: Option<i32> = if present {
        client
            .query_one("SELECT max(version) FROM sitewatch_schema", &[])?
            .get(0)
    } else {
        None
    };
    if version.unwrap_or(0) < SCHEMA_VERSION {
        return Err(SinkError::SchemaMissing {
            url: url.to_string(),
        });
    }
    Ok(())
}

/// Fails with [`SinkError::SchemaMissing`] unless the alert tables exist (`init-db` of a
/// sitewatch with alerts). Checked only when `[alerts]` is configured, so an older database
/// keeps working for a sink without alerts.
pub fn require_alerts(client: &mut Client, url: &str) -> Result<(), SinkError> {
    let tables = [
        "alert_state",
        "alert_locations",
        "alert_events",
        "alert_deliveries",
    ];
    if !tables_exist(client, &tables)? {
        return Err(SinkError::SchemaMissing {
            url: url.to_string(),
        });
    }
    Ok(())
}

fn tables_exist(client: &mut Client, names: &[&str]) -> Result<bool, SinkError> {
    let row = client.query_one(
        "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest($1::text[]) AS n",
        &[&names],
    )?;
    Ok(row.get(0))
}

/// Creates the partition of `checks` for `day` (days since the epoch, UTC) unless it exists.
pub fn ensure_partition(client: &mut Client, day: i64) -> Result<(), SinkError> {
    let date = format_rfc3339_ms(day * DAY_MS)[..10].to_string();
    client.execute(
        "SELECT sitewatch_ensure_check_partition($1::text::date)",
        &[&date],
    )?;
    Ok(())
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintenance {
    pub dropped_partitions: Vec<String>,
    pub dead_letters_deleted: u64,
    /// Alert events older than the retention whose deliveries are all done (`[alerts]`).
    pub alert_events_deleted: u64,
    /// Hourly and daily rollup rows deleted.
    pub rollups_deleted: u64,
}

/// Creates partitions from yesterday to [`DAYS_AHEAD`] days ahead and drops every partition
/// (and dead letter) older than `retention`, and every daily rollup older than
/// `rollup_retention` (hourly: [`super::rollup::HOURLY_KEEP`] at most), relative to `now_ms`. DDL waits at most a few
/// seconds for its lock: a busy `checks` table makes this pass fail and the next one retry,
/// rather than queue every writer behind a waiting DROP.
pub fn maintain(
    client: &mut Client,
    retention: Duration,
    rollup_retention: Duration,
    now_ms: i64,
) -> Result<Maintenance, SinkError> {
    client.batch_execute("SET lock_timeout = '5s'")?;
    let today = now_ms.div_euclid(DAY_MS);
    for day in today - 1..=today + DAYS_AHEAD {
        ensure_partition(client, day)?;
    }
    let cutoff = super::db::system_time(now_ms.saturating_sub(retention.as_millis() as i64));
    let dropped = client
        .query("SELECT sitewatch_drop_check_partitions($1)", &[&cutoff])?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let dead_letters_deleted = client.execute(
        "DELETE FROM dead_letters WHERE received_at < $1",
        &[&cutoff],
    )?;
    // The outbox keeps what is still to deliver, whatever its age.
    let alert_events_deleted = if tables_exist(client, &["alert_events", "alert_deliveries"])? {
        client.execute(
            "DELETE FROM alert_events e WHERE e.created_at < $1 AND NOT EXISTS \
             (SELECT 1 FROM alert_deliveries d WHERE d.event_id = e.id AND d.state = 'pending')",
            &[&cutoff],
        )?
    } else {
        0
    };
    client.batch_execute("RESET lock_timeout")?;
    let before =
        |keep: Duration| super::db::system_time(now_ms.saturating_sub(keep.as_millis() as i64));
    let hourly_keep = rollup_retention.min(super::rollup::HOURLY_KEEP);
    let rollups_deleted = client.execute(
        "DELETE FROM check_rollups_hourly WHERE period_start < $1",
        &[&before(hourly_keep)],
    )? + client.execute(
        "DELETE FROM check_rollups_daily WHERE period_start < $1",
        &[&before(rollup_retention)],
    )?;
    Ok(Maintenance {
        dropped_partitions: dropped,
        dead_letters_deleted,
        alert_events_deleted,
        rollups_deleted,
    })
}

/// The stored next offset of (topic, partition), `None` when none was ever committed.
pub fn load_offset(
    client: &mut Client,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, SinkError> {
    let row = client.query_opt(
        "SELECT next_offset FROM sink_offsets WHERE topic = $1 AND partition = $2",
        &[&topic, &partition],
    )?;
    Ok(row.map(|r| r.get(0)))
}
