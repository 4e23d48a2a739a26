//! Rollups: the sink's hook that adds a batch's newly inserted checks to the hourly and daily
//! rollup tables (`check_rollups_hourly`, `check_rollups_daily`), inside the batch transaction.
//!
//! Architecture Invariant: a rollup row equals the aggregate of the `checks` rows it covers.
//! Only rows the insert actually added are rolled up (a redelivered record is skipped), and the
//! rollup commits or rolls back with them, so neither a crash nor a replay can count twice.
//!
//! Not here: reading rollups (the status page, `serve`), retention.

use std::collections::BTreeMap;
use std::time::SystemTime;

use postgres::{Client, Statement, Transaction};

use super::SinkError;
use super::db::system_time;
use crate::result::CheckResult;

/// Upper bounds (ms, inclusive) of the `timings.total` histogram buckets; one more bucket holds
/// everything slower. Chosen around what a status page shows: a few fast buckets to tell a CDN
/// from a backend, a few slow ones to tell slow from timing out (default timeout 10 s).
pub const TOTAL_MS_BOUNDS: [f64; 10] = [
    25.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
/// Buckets per histogram: one per bound and the open one above the last.
pub const BUCKETS: usize = TOTAL_MS_BOUNDS.len() + 1;

/// Hourly rollups are kept this long at most: the longest window read from them is the 30-day
/// uptime badge; older periods are read from the daily rollups.
pub const HOURLY_KEEP: std::time::Duration = std::time::Duration::from_secs(35 * 86_400);

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// The histogram bucket of one `timings.total`.
pub fn bucket_of(total_ms: f64) -> usize {
    TOTAL_MS_BOUNDS
        .iter()
        .position(|&bound| total_ms <= bound)
        .unwrap_or(TOTAL_MS_BOUNDS.len())
}

/// The `q` quantile (0..=1) of a histogram as its bucket's upper bound, `None` without checks.
/// The open bucket answers with the last bound: "at least this slow".
pub fn quantile(hist: &[i64], q: f64) -> Option<f64> {
    let total: i64 = hist.iter().sum();
    if total <= 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(TOTAL_MS_BOUNDS[i.min(TOTAL_MS_BOUNDS.len() - 1)]);
        }
    }
    Some(TOTAL_MS_BOUNDS[TOTAL_MS_BOUNDS.len() - 1])
}

/// What a rollup needs of one inserted check.
#[derive(Clone, Copy)]
pub(super) struct Sample<'a> {
    pub target: &'a str,
    pub location: Option<&'a str>,
    pub started_ms: i64,
    pub up: bool,
    pub total_ms: f64,
}

impl<'a> Sample<'a> {
    pub(super) fn of(record: &'a CheckResult, started_ms: i64) -> Sample<'a> {
        Sample {
            target: &record.target,
            location: record.location.as_deref().filter(|l| !l.is_empty()),
            started_ms,
            up: record.up,
            total_ms: record.timings.total,
        }
    }
}

#[derive(Default)]
struct Agg {
    checks: i64,
    successes: i64,
    total_ms_sum: f64,
    hist: [i64; BUCKETS],
}

/// The prepared upserts of one writer connection.
pub(super) struct Rollups {
    hourly: Statement,
    daily: Statement,
}

fn upsert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS r (target, location, period_start, checks, successes, \
         total_ms_sum, total_ms_hist) \
         SELECT u.t, u.l, u.p, u.c, u.s, u.m, \
         ARRAY(SELECT jsonb_array_elements_text(u.h::jsonb)::int8) \
         FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[], $5::int8[], \
         $6::float8[], $7::text[]) AS u(t, l, p, c, s, m, h) \
         ON CONFLICT (target, (COALESCE(location, '')), period_start) DO UPDATE SET \
         checks = r.checks + EXCLUDED.checks, successes = r.successes + EXCLUDED.successes, \
         total_ms_sum = r.total_ms_sum + EXCLUDED.total_ms_sum, \
         total_ms_hist = sitewatch_add_counts(r.total_ms_hist, EXCLUDED.total_ms_hist)"
    )
}

impl Rollups {
    pub(super) fn prepare(client: &mut Client) -> Result<Rollups, SinkError> {
        Ok(Rollups {
            hourly: client.prepare(&upsert_sql("check_rollups_hourly"))?,
            daily: client.prepare(&upsert_sql("check_rollups_daily"))?,
        })
    }

    /// Adds `samples` (the rows this transaction inserted) to both tables.
    pub(super) fn add<'a>(
        &self,
        tx: &mut Transaction,
        samples: impl Iterator<Item = Sample<'a>> + Clone,
    ) -> Result<(), SinkError> {
        for (statement, width) in [(&self.hourly, HOUR_MS), (&self.daily, DAY_MS)] {
            let groups = aggregate(samples.clone(), width);
            if groups.is_empty() {
                return Ok(());
            }
            let mut cols = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
            // BTreeMap order: two sinks upserting the same rows lock them in the same order.
            for ((target, location, start), agg) in &groups {
                cols.0.push(*target);
                cols.1.push(*location);
                cols.2.push(system_time(*start));
                cols.3.push(agg.checks);
                cols.4.push(agg.successes);
                cols.5.push(agg.total_ms_sum);
                cols.6
                    .push(serde_json::Value::from(agg.hist.to_vec()).to_string());
            }
            let times: &Vec<SystemTime> = &cols.2;
            tx.execute(
                statement,
                &[&cols.0, &cols.1, times, &cols.3, &cols.4, &cols.5, &cols.6],
            )?;
        }
        Ok(())
    }
}

type Key<'a> = (&'a str, Option<&'a str>, i64);

fn aggregate<'a>(
    samples: impl Iterator<Item = Sample<'a>>,
    width_ms: i64,
) -> BTreeMap<Key<'a>, Agg> {
    let mut groups: BTreeMap<Key<'a>, Agg> = BTreeMap::new();
    for s in samples {
        let start = s.started_ms - s.started_ms.rem_euclid(width_ms);
        let agg = groups.entry((s.target, s.location, start)).or_default();
        agg.checks += 1;
        agg.successes += i64::from(s.up);
        agg.total_ms_sum += s.total_ms;
        agg.hist[bucket_of(s.total_ms)] += 1;
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(25.0), 0);
        assert_eq!(bucket_of(25.1), 1);
        assert_eq!(bucket_of(10_000.0), 9);
        assert_eq!(bucket_of(99_999.0), 10);
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
        let mut h = [0; BUCKETS];
        h[0] = 50;
        h[3] = 45;
        h[10] = 5;
        assert_eq!(quantile(&h, 0.5), Some(25.0));
        assert_eq!(quantile(&h, 0.51), Some(200.0));
        assert_eq!(quantile(&h, 0.95), Some(200.0));
        assert_eq!(quantile(&h, 0.99), Some(10_000.0));
    }

    #[test]
    fn samples_group_by_target_location_and_period() {
        let s = |target, location, started_ms, up, total_ms| Sample {
            target,
            location,
            started_ms,
            up,
            total_ms,
        };
        let samples = [
            s("a", None, HOUR_MS + 1, true, 10.0),
            s("a", None, 2 * HOUR_MS - 1, false, 60.0),
            s("a", Some("eu"), HOUR_MS + 5, true, 10.0),
            s("a", None, 2 * HOUR_MS, true, 10.0),
        ];
        let hourly = aggregate(samples.iter().copied(), HOUR_MS);
        assert_eq!(hourly.len(), 3);
        let first = &hourly[&("a", None, HOUR_MS)];
        assert_eq!((first.checks, first.successes), (2, 1));
        assert_eq!(first.total_ms_sum, 70.0);
        assert_eq!(first.hist[0] + first.hist[2], 2);
        let daily = aggregate(samples.iter().copied(), DAY_MS);
        assert_eq!(daily[&("a", None, 0)].checks, 3);
    }
}
