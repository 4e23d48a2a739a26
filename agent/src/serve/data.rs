//! What the pages read, and how: every query runs in a READ ONLY transaction on a session that
//! is itself `default_transaction_read_only`, under a statement timeout, and every list is
//! capped ([`MAX_TARGETS`], [`RECENT_CHECKS`]). A page of [`PARALLEL_FROM`] targets or more
//! reads its daily rollups on a second such session, in the first one's snapshot. Uptime and latency come from the rollup tables,
//! never from scanning raw checks; only a target's current state and its recent checks read
//! `checks`, through its (target, started_at) index.

use std::collections::HashMap;
use std::time::SystemTime;

use postgres::types::{FromSql, Type};
use postgres::{Client, IsolationLevel, Transaction};

use crate::sink::rollup::BUCKETS;

/// Targets on one page unless `?per_page=` says otherwise (sorted by id); `?page=N` shows the
/// next ones. Each target is up to about 9 KB of HTML (90 day cells with their figures, when
/// no two days in a row show the same; 24 hourly bars), so a page stays under 2 MB; past a
/// few hundred targets, `?tag=` is the way to find one.
pub const MAX_TARGETS: i64 = 200;
/// `?per_page=` at most: a page of 1,000 targets is up to about 9 MB of HTML.
pub const MAX_PER_PAGE: i64 = 1000;
/// Checks listed on `/target/<id>`.
pub const RECENT_CHECKS: i64 = 50;
/// Days in the uptime bar.
pub const BAR_DAYS: i64 = 90;
/// No statement of a request runs longer: the page is bounded work, whatever the data.
pub const STATEMENT_TIMEOUT: &str = "5s";

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;
/// Hours in the response time chart.
pub const CHART_HOURS: i64 = 24;

/// Start (unix ms) of the uptime bar's first day as of `now_ms`: [`TargetView::days`]`[0]`.
pub fn first_day_ms(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(DAY_MS) - (BAR_DAYS - 1) * DAY_MS
}

/// Start (unix ms) of the chart's first hour as of `now_ms`: [`TargetView::hours`]`[0]`.
pub fn first_hour_ms(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(HOUR_MS) - (CHART_HOURS - 1) * HOUR_MS
}

/// One target as the status page shows it.
#[derive(Debug, Clone, Default)]
pub struct TargetView {
    pub id: String,
    pub url: String,
    pub up: bool,
    /// Since when it has been in its current state (unix ms).
    pub since_ms: i64,
    pub last_check_ms: i64,
    pub failure: Option<String>,
    pub error: Option<String>,
    pub status: Option<i32>,
    pub total_ms: f64,
    pub cert_not_after_ms: Option<i64>,
    pub tags: Vec<String>,
    /// (checks, successes) of each of the last [`BAR_DAYS`] days, oldest first (today last;
    /// no checks: no data); empty when none was read. Arrays, not maps: a page of 1,000
    /// targets reads 90,000 of them.
    pub days: Vec<(i64, i64)>,
    /// Histogram of timings.total of each of the last 24 hours, oldest first (the current
    /// hour last; all zero: no data); empty when none was read.
    pub hours: Vec<[i64; BUCKETS]>,
    pub checks_24h: i64,
    pub successes_24h: i64,
    /// Each location's latest check, for a target seen from several locations in the last day
    /// (empty otherwise); unnamed locations (`None`) first, then by name.
    pub locations: Vec<LocationView>,
    /// Set when the locations' quorum decided `up` and `since_ms` (see [`decide`]).
    pub quorum: Option<Quorum>,
}

/// What one location sees of a target: its latest check within the last day, as
/// `target_status_by_location` has it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocationView {
    /// `None`: agents without an `[agent] location`.
    pub location: Option<String>,
    pub up: bool,
    /// Since when this location has seen the target in its current state (unix ms).
    pub since_ms: i64,
    pub last_check_ms: i64,
    pub failure: Option<String>,
    pub error: Option<String>,
    pub status: Option<i32>,
    pub total_ms: f64,
    /// Whether it counts for the quorum: `target_quorum`'s rule (a fresh latest check, and
    /// an alive agent where the location has fleet agents).
    pub counted: bool,
}

/// How the quorum stands: `down` of `counted` locations see the target down; `min_down`
/// make it down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    pub counted: usize,
    pub down: usize,
    pub min_down: i64,
}

impl TargetView {
    /// The 24-hour histogram over every hour.
    pub fn hist_24h(&self) -> [i64; BUCKETS] {
        let mut sum = [0; BUCKETS];
        for hist in &self.hours {
            for (s, n) in sum.iter_mut().zip(hist) {
                *s += n;
            }
        }
        sum
    }
}

/// One row of `/target/<id>`'s recent checks.
#[derive(Debug, Clone)]
pub struct CheckView {
    pub started_ms: i64,
    pub agent: String,
    pub up: bool,
    pub failure: Option<String>,
    pub error: Option<String>,
    pub status: Option<i32>,
    pub total_ms: f64,
    /// dns, connect, tls, ttfb, transfer.
    pub phases: [Option<f64>; 5],
}

/// Opens the read-only session of `sitewatch serve`.
pub fn prepare_session(client: &mut Client) -> Result<(), postgres::Error> {
    client.batch_execute(&format!(
        "SET default_transaction_read_only = on; SET statement_timeout = '{STATEMENT_TIMEOUT}'"
    ))
}

/// Runs `read` in a READ ONLY transaction (rolled back: nothing to commit), REPEATABLE READ so
/// that all of a page's statements, and a helper session's (`pg_export_snapshot`), see one
/// snapshot.
pub fn read_only<T>(
    client: &mut Client,
    read: impl FnOnce(&mut Transaction) -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    read(&mut tx)
}

/// The page is picked from `targets` alone (an index-only scan of its primary key in order, or
/// the GIN index on its tags), and only the page's targets are looked up in `target_status` and `checks`: a page
/// costs its own targets' index lookups, whatever the number of targets (OFFSET skips index
/// entries of `targets`, not status lookups). A target without checks (expired) is skipped but
/// still counts for `more`. `since` is null in `target_status` when the last check and the
/// last one in the other state started at the same instant (two locations, one millisecond):
/// the state then holds since that check.
const STATUS_SQL: &str = "\
WITH page AS (
    SELECT t.id FROM targets t
    WHERE ($1::text IS NULL OR t.tags @> ARRAY[$1::text]) AND ($2::text IS NULL OR t.id = $2)
    ORDER BY t.id LIMIT $3 OFFSET $4
)
SELECT p.id, s.url, s.up, (extract(epoch FROM COALESCE(s.since, s.last_check)) * 1000)::int8,
       (extract(epoch FROM s.last_check) * 1000)::int8, s.failure, s.error, s.status, s.total_ms,
       (extract(epoch FROM l.cert_not_after) * 1000)::int8, COALESCE(t.tags, '{}')
FROM page p
JOIN targets t ON t.id = p.id
LEFT JOIN target_status s ON s.target = p.id
LEFT JOIN LATERAL (
    SELECT c.cert_not_after FROM checks c WHERE c.target = p.id
    ORDER BY c.started_at DESC LIMIT 1
) l ON true
ORDER BY p.id";

/// Which targets a request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selection {
    pub tag: Option<String>,
    pub target: Option<String>,
    /// 0-based page of [`Selection::per_page`] targets.
    pub page: i64,
    /// `?per_page=` (1 to [`MAX_PER_PAGE`]); [`MAX_TARGETS`] without it.
    pub per_page: Option<i64>,
}

impl Selection {
    pub fn per_page(&self) -> i64 {
        self.per_page.unwrap_or(MAX_TARGETS)
    }
}

/// The targets of `selection` (at most [`Selection::per_page`]; `more` says whether others
/// follow), with their rollups, as of `now_ms`. With a `helper` session and a page of
/// [`PARALLEL_FROM`] targets or more, the daily rollups are read on it while `tx` reads the
/// hourly ones, in `tx`'s snapshot (see [`read_only`]): the two are most of a large page's
/// time, and PostgreSQL and the decoding then use both cores.
pub fn targets(
    tx: &mut Transaction,
    helper: Option<&mut Client>,
    selection: &Selection,
    now_ms: i64,
) -> Result<(Vec<TargetView>, bool), postgres::Error> {
    let begun = std::time::Instant::now();
    let per_page = selection.per_page();
    let rows = tx.query(
        STATUS_SQL,
        &[
            &selection.tag,
            &selection.target,
            &(per_page + 1),
            &(selection.page * per_page),
        ],
    )?;
    let more = rows.len() as i64 > per_page;
    let mut views: Vec<TargetView> = rows
        .iter()
        .take(per_page as usize)
        .filter_map(|r| {
            let url: Option<String> = r.get(1);
            Some((r, url?))
        })
        .map(|(r, url)| TargetView {
            id: r.get(0),
            url,
            up: r.get(2),
            since_ms: r.get(3),
            last_check_ms: r.get(4),
            failure: r.get(5),
            error: r.get(6),
            status: r.get(7),
            total_ms: r.get(8),
            cert_not_after_ms: r.get(9),
            tags: r.get(10),
            ..TargetView::default()
        })
        .collect();
    let ids: Vec<String> = views.iter().map(|v| v.id.clone()).collect();
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let started = std::time::Instant::now();
    let beside = match helper {
        Some(h) if views.len() >= PARALLEL_FROM => export_snapshot(tx)?.map(|id| (h, id)),
        _ => None,
    };
    let parallel = beside.is_some();
    let (days, hours) = match beside {
        Some((helper, snapshot)) => std::thread::scope(|s| {
            let days =
                s.spawn(|| in_snapshot(helper, &snapshot, |t| read_days(t, &ids, &index, now_ms)));
            let hours = read_hours(tx, &ids, &index, now_ms);
            let days = days.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (days, hours)
        }),
        None => (
            read_days(tx, &ids, &index, now_ms),
            read_hours(tx, &ids, &index, now_ms),
        ),
    };
    for (view, days) in views.iter_mut().zip(days?) {
        view.days = days;
    }
    let Hours { per_view, several } = hours?;
    for (view, (hours, checks, successes)) in views.iter_mut().zip(per_view) {
        (view.hours, view.checks_24h, view.successes_24h) = (hours, checks, successes);
    }
    let rollups_read = started.elapsed();
    if !several.is_empty() {
        add_locations(tx, &mut views, &several, &index)?;
    }
    log::debug!(target: "sitewatch::serve",
        "{} targets read: status {} ms, rollups {} ms ({}), {} with several locations {} ms",
        views.len(), (started - begun).as_millis(), rollups_read.as_millis(),
        if parallel { "daily and hourly at once" } else { "one after the other" },
        several.len(), (started.elapsed() - rollups_read).as_millis());
    Ok((views, more))
}

/// Pages of at least this many targets read their daily rollups on a second session.
pub const PARALLEL_FROM: usize = 100;

/// The snapshot of `tx` for another session to read in (`None` if PostgreSQL answers with
/// something that is not a snapshot id: then one session reads everything).
fn export_snapshot(tx: &mut Transaction) -> Result<Option<String>, postgres::Error> {
    let id: String = tx.query_one("SELECT pg_export_snapshot()", &[])?.get(0);
    // Pasted into SET TRANSACTION SNAPSHOT, which takes no parameter: hex digits and dashes.
    Ok((!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(id))
}

/// Runs `read` in a READ ONLY transaction of `client` that sees `snapshot`.
fn in_snapshot<T>(
    client: &mut Client,
    snapshot: &str,
    read: impl FnOnce(&mut Transaction) -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    read_only(client, |tx| {
        tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))?;
        read(tx)
    })
}

/// The daily rollups of the bar's days: [`TargetView::days`] of each target of `ids`.
fn read_days(
    tx: &mut Transaction,
    ids: &[String],
    index: &HashMap<&str, usize>,
    now_ms: i64,
) -> Result<Vec<Vec<(i64, i64)>>, postgres::Error> {
    let first_day_ms = first_day_ms(now_ms);
    let first_day = crate::sink::db::system_time(first_day_ms);
    let rows = tx.query(
        "SELECT target, period_start, checks, successes \
         FROM check_rollups_daily WHERE target = ANY($1) AND period_start >= $2",
        &[&ids, &first_day],
    )?;
    let mut days: Vec<Vec<(i64, i64)>> = vec![Vec::new(); ids.len()];
    for r in &rows {
        // One row per location: they add up (a GROUP BY here cost more than this loop).
        let series = &mut days[index[r.get::<_, &str>(0)]];
        let start = unix_ms(r.get(1));
        let Some(day) = slot(series, BAR_DAYS, first_day_ms, DAY_MS, start) else {
            continue;
        };
        day.0 += r.get::<_, i64>(2);
        day.1 += r.get::<_, i64>(3);
    }
    Ok(days)
}

/// What [`read_hours`] found: per target of `ids`, [`TargetView::hours`], checks and
/// successes in the last 24 hours; and the targets seen from several locations.
struct Hours {
    per_view: Vec<(Vec<[i64; BUCKETS]>, i64, i64)>,
    several: Vec<String>,
}

/// The hourly rollups of the last 24 hours into [`TargetView::hours`] and the 24-hour counts;
/// returns the targets seen from two or more locations in them (and the hour before, the
/// window of `LOCATIONS_SQL`): only those need [`add_locations`], whose query costs as much
/// as this one for a page that has none.
fn read_hours(
    tx: &mut Transaction,
    ids: &[String],
    index: &HashMap<&str, usize>,
    now_ms: i64,
) -> Result<Hours, postgres::Error> {
    let first_hour_ms = first_hour_ms(now_ms);
    let from = crate::sink::db::system_time(first_hour_ms - HOUR_MS);
    let rows = tx.query(
        "SELECT target, period_start, checks, successes, \
         total_ms_hist, location FROM check_rollups_hourly \
         WHERE target = ANY($1) AND period_start >= $2",
        &[&ids, &from],
    )?;
    let mut per_view: Vec<(Vec<[i64; BUCKETS]>, i64, i64)> = vec![(Vec::new(), 0, 0); ids.len()];
    // Per target: the first location seen, and whether another one followed.
    let mut first: Vec<Option<Option<String>>> = vec![None; ids.len()];
    let mut several = vec![false; ids.len()];
    for r in &rows {
        let i = index[r.get::<_, &str>(0)];
        let location: Option<&str> = r.get(5);
        match &first[i] {
            None => first[i] = Some(location.map(str::to_string)),
            Some(seen) if seen.as_deref() != location => several[i] = true,
            Some(_) => {}
        }
        let start = unix_ms(r.get(1));
        if start < first_hour_ms {
            continue;
        }
        let (hours, checks, successes) = &mut per_view[i];
        *checks += r.get::<_, i64>(2);
        *successes += r.get::<_, i64>(3);
        let Some(hist) = slot(hours, CHART_HOURS, first_hour_ms, HOUR_MS, start) else {
            continue;
        };
        // Locations of one hour add up; a histogram of another length adds what it has.
        r.get::<_, Int8Array>(4).add_to(hist);
    }
    let several = (ids.iter().zip(several))
        .filter(|&(_, several)| several)
        .map(|(id, _)| id.clone())
        .collect();
    Ok(Hours { per_view, several })
}

/// An `int8[]` as PostgreSQL sends it (binary), read in place: the page's 24,000 hourly
/// histograms added up without a `Vec` each.
struct Int8Array<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Int8Array<'a> {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<Int8Array<'a>, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Int8Array(raw))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INT8_ARRAY
    }
}

impl Int8Array<'_> {
    /// Adds element `i` (of a one-dimensional array; nulls count 0) to `sum[i]`, as far as
    /// both go. Anything malformed adds nothing more.
    fn add_to(&self, sum: &mut [i64]) {
        let be32 = |at: usize| -> Option<i32> {
            Some(i32::from_be_bytes(self.0.get(at..at + 4)?.try_into().ok()?))
        };
        // Header: dimensions, a has-nulls flag, the element type; then length and lower
        // bound per dimension; then each element as its length (-1: null) and bytes.
        let Some(1) = be32(0) else {
            return;
        };
        let Some(len) = be32(12) else {
            return;
        };
        let mut at = 20;
        for slot in sum.iter_mut().take(len.max(0) as usize) {
            let Some(n) = be32(at) else {
                return;
            };
            at += 4;
            if n < 0 {
                continue;
            }
            let Some(bytes) = self.0.get(at..at + n as usize) else {
                return;
            };
            if let Ok(b) = <[u8; 8]>::try_from(bytes) {
                *slot += i64::from_be_bytes(b);
            }
            at += n as usize;
        }
    }
}

/// A timestamp as unix ms. The rollup queries return `period_start` as it is stored, not
/// `extract(epoch ...) * 1000`: that is numeric arithmetic, and for the 90,000 daily rows of a
/// page of 1,000 targets it was most of PostgreSQL's time (18 ms without it, 109 ms with).
fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The entry of `series` (`len` periods of `period_ms` from `first_ms`, made on first use)
/// for the period starting at `start_ms`; `None` outside them (a row written after `now`).
fn slot<T: Default + Clone>(
    series: &mut Vec<T>,
    len: i64,
    first_ms: i64,
    period_ms: i64,
    start_ms: i64,
) -> Option<&mut T> {
    let i = (start_ms - first_ms).div_euclid(period_ms);
    if !(0..len).contains(&i) {
        return None;
    }
    if series.is_empty() {
        series.resize(len as usize, T::default());
    }
    series.get_mut(i as usize)
}

/// Each location's latest check (within a day) and since when it holds, for the targets of
/// `ids` seen from two or more locations; `min_down` from `quorum_settings` and `counted` the
/// way `target_quorum` decides them. The (target, location) pairs come from the hourly rollups
/// of the last day (rows the sink writes with the checks), so a target's own checks are
/// read through its index a few rows each, never a day of every target's checks.
const LOCATIONS_SQL: &str = "\
WITH s AS (SELECT min_down, fresh_for FROM quorum_settings),
pairs AS (
    SELECT DISTINCT target, location FROM check_rollups_hourly
    WHERE target = ANY($1) AND period_start >= date_trunc('hour', now() - interval '1 day')
),
several AS (SELECT target, location FROM pairs
            WHERE target IN (SELECT target FROM pairs GROUP BY target HAVING count(*) > 1))
SELECT p.target, p.location, l.up, (extract(epoch FROM l.started_at) * 1000)::int8,
       (extract(epoch FROM COALESCE(since.started_at, first.started_at, l.started_at)) * 1000)::int8,
       l.failure, l.error, l.status, l.total_ms,
       l.started_at >= now() - s.fresh_for
         AND (NOT EXISTS (SELECT 1 FROM agent_liveness a WHERE a.location = p.location)
              OR EXISTS (SELECT 1 FROM agent_liveness a
                         WHERE a.location = p.location AND a.state = 'alive')),
       s.min_down::int8
FROM several p CROSS JOIN s
CROSS JOIN LATERAL (
    SELECT c.started_at, c.up, c.failure, c.error, c.status, c.total_ms FROM checks c
    WHERE c.target = p.target AND c.location IS NOT DISTINCT FROM p.location
      AND c.started_at >= now() - interval '1 day'
    ORDER BY c.started_at DESC LIMIT 1
) l
LEFT JOIN LATERAL (
    SELECT c.started_at FROM checks c
    WHERE c.target = p.target AND c.location IS NOT DISTINCT FROM p.location AND c.up = NOT l.up
    ORDER BY c.started_at DESC LIMIT 1
) flip ON true
LEFT JOIN LATERAL (
    SELECT c.started_at FROM checks c
    WHERE c.target = p.target AND c.location IS NOT DISTINCT FROM p.location
      AND c.started_at > flip.started_at
    ORDER BY c.started_at ASC LIMIT 1
) since ON true
LEFT JOIN LATERAL (
    SELECT c.started_at FROM checks c
    WHERE c.target = p.target AND c.location IS NOT DISTINCT FROM p.location
      AND flip.started_at IS NULL
    ORDER BY c.started_at ASC LIMIT 1
) first ON true
ORDER BY p.target, p.location NULLS FIRST";

/// Fills in [`TargetView::locations`] and lets the quorum decide the state of the targets
/// seen from several locations.
fn add_locations(
    tx: &mut Transaction,
    views: &mut [TargetView],
    ids: &[String],
    index: &HashMap<&str, usize>,
) -> Result<(), postgres::Error> {
    let mut min_down = HashMap::new();
    for r in tx.query(LOCATIONS_SQL, &[&ids])? {
        let i = index[r.get::<_, &str>(0)];
        views[i].locations.push(LocationView {
            location: r.get(1),
            up: r.get(2),
            last_check_ms: r.get(3),
            since_ms: r.get(4),
            failure: r.get(5),
            error: r.get(6),
            status: r.get(7),
            total_ms: r.get(8),
            counted: r.get(9),
        });
        min_down.insert(i, r.get::<_, i64>(10));
    }
    for (i, min_down) in min_down {
        decide(&mut views[i], min_down);
    }
    Ok(())
}

/// The target's state as `target_quorum` decides it from the locations that count: down when
/// at least `min_down` of them see it down, up otherwise (so with fewer counted locations than
/// `min_down` it is never down). Since when: the `min_down`-th location to go down, or the
/// recovery that took the count below `min_down` (the locations' own since). With no location
/// counting the latest check stands, as before.
pub fn decide(view: &mut TargetView, min_down: i64) {
    let counted: Vec<&LocationView> = view.locations.iter().filter(|l| l.counted).collect();
    if counted.is_empty() {
        return;
    }
    let need = min_down.max(1) as usize;
    let mut down: Vec<&LocationView> = counted.iter().copied().filter(|l| !l.up).collect();
    let mut ups: Vec<i64> = counted
        .iter()
        .filter(|l| l.up)
        .map(|l| l.since_ms)
        .collect();
    view.quorum = Some(Quorum {
        counted: counted.len(),
        down: down.len(),
        min_down,
    });
    if down.len() >= need {
        down.sort_by_key(|l| l.since_ms);
        view.up = false;
        view.since_ms = down[need - 1].since_ms;
        // The reason shown is the newest failure a down location saw.
        if let Some(newest) = down.iter().max_by_key(|l| l.last_check_ms) {
            view.failure = newest.failure.clone();
            view.error = newest.error.clone();
            view.status = newest.status;
        }
    } else {
        ups.sort_unstable_by(|a, b| b.cmp(a));
        let earliest = counted
            .iter()
            .map(|l| l.since_ms)
            .min()
            .unwrap_or(view.since_ms);
        view.up = true;
        view.since_ms = ups.get(need - down.len() - 1).copied().unwrap_or(earliest);
    }
}

/// Checks and successes of `target` in the hours starting after `since_ms`.
pub fn uptime(
    tx: &mut Transaction,
    target: &str,
    since_ms: i64,
) -> Result<(i64, i64), postgres::Error> {
    let since = crate::sink::db::system_time(since_ms);
    let row = tx.query_one(
        "SELECT COALESCE(sum(checks), 0)::int8, COALESCE(sum(successes), 0)::int8 \
         FROM check_rollups_hourly WHERE target = $1 AND period_start >= $2",
        &[&target, &since],
    )?;
    Ok((row.get(0), row.get(1)))
}

/// The last [`RECENT_CHECKS`] checks of `target`, newest first.
pub fn recent_checks(
    tx: &mut Transaction,
    target: &str,
) -> Result<Vec<CheckView>, postgres::Error> {
    let rows = tx.query(
        "SELECT (extract(epoch FROM started_at) * 1000)::int8, agent, up, failure, error, status, \
         total_ms, dns_ms, connect_ms, tls_ms, ttfb_ms, transfer_ms FROM checks \
         WHERE target = $1 ORDER BY started_at DESC LIMIT $2",
        &[&target, &RECENT_CHECKS],
    )?;
    Ok(rows
        .iter()
        .map(|r| CheckView {
            started_ms: r.get(0),
            agent: r.get(1),
            up: r.get(2),
            failure: r.get(3),
            error: r.get(4),
            status: r.get(5),
            total_ms: r.get(6),
            phases: [r.get(7), r.get(8), r.get(9), r.get(10), r.get(11)],
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(location: &str, up: bool, since_ms: i64, counted: bool) -> LocationView {
        LocationView {
            location: Some(location.into()),
            up,
            since_ms,
            last_check_ms: since_ms + 5,
            failure: (!up).then(|| format!("connect in {location}")),
            counted,
            ..LocationView::default()
        }
    }

    fn decided(locations: Vec<LocationView>, min_down: i64) -> TargetView {
        let mut view = TargetView {
            up: true,
            since_ms: 1,
            locations,
            ..TargetView::default()
        };
        decide(&mut view, min_down);
        view
    }

    #[test]
    fn the_quorum_decides_the_state_and_since_when() {
        // Down in 2 of 3 with min_down 2: down since the second went down.
        let v = decided(
            vec![
                at("a", false, 300, true),
                at("b", false, 100, true),
                at("c", true, 50, true),
            ],
            2,
        );
        assert_eq!((v.up, v.since_ms), (false, 300));
        assert_eq!(v.failure.as_deref(), Some("connect in a"));
        let q = v.quorum.unwrap();
        assert_eq!((q.counted, q.down, q.min_down), (3, 2, 2));
        // Down in 1 of 3: up since the recovery that took the count below 2.
        let v = decided(
            vec![
                at("a", false, 300, true),
                at("b", true, 200, true),
                at("c", true, 100, true),
            ],
            2,
        );
        assert_eq!((v.up, v.since_ms), (true, 200));
        // A location that does not count is not part of it: one counted down location is
        // not a quorum of 2.
        let v = decided(
            vec![at("a", false, 300, true), at("b", false, 100, false)],
            2,
        );
        assert_eq!((v.up, v.since_ms), (true, 300));
        assert_eq!(v.quorum.unwrap().counted, 1);
        // No location counts: the latest check stands.
        let v = decided(vec![at("a", false, 300, false)], 1);
        assert_eq!((v.up, v.since_ms, v.quorum), (true, 1, None));
    }
}
