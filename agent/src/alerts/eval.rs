//! The evaluator: each fetch's checks → state changes → outbox events, inside the sink's batch
//! transaction (called by `sink::writer` before it commits).
//!
//! Architecture Invariant: `alert_state`, `alert_events` and `alert_deliveries` change only in
//! the transaction that stores the same records' rows and moves the partition's offset. A
//! sink killed at any point either committed the rows, the transitions and the offset, or
//! none of them; the next owner re-reads the batch and decides the same transitions once.
//! Only records this transaction inserted are evaluated (a producer's duplicate, dropped by
//! the `checks` key, never counts twice), and only when newer than the target's `last_check`.
//!
//! Cost: counters saturate at their threshold, so a target that stays up (or down) leaves its
//! state row as it was, and only changed rows are written: a steady fleet costs one SELECT
//! per batch. `last_check` is written with the other changes (it guards against late records,
//! not duplicates), so after a restart it may be older than the last check evaluated.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use postgres::Transaction;

use super::config::{AlertsConfig, Policy};
use crate::result::CheckResult;
use crate::sink::db::system_time;

/// The state of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
    Degraded,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Degraded => "degraded",
        }
    }

    fn parse(s: &str) -> Health {
        match s {
            "down" => Health::Down,
            "degraded" => Health::Degraded,
            _ => Health::Up,
        }
    }
}

/// A target's row of `alert_state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub health: Health,
    pub fails: i32,
    pub oks: i32,
    pub slows: i32,
    pub cert_level: Option<i32>,
    pub since_ms: i64,
    pub last_check_ms: i64,
    pub incident: Option<String>,
    pub alerted: bool,
    pub muted: Option<String>,
    pub last_event_ms: Option<i64>,
    pub reason: Option<String>,
}

impl State {
    /// A target seen for the first time counts as up from `t_ms`.
    pub fn new(t_ms: i64) -> State {
        State {
            health: Health::Up,
            fails: 0,
            oks: 0,
            slows: 0,
            cert_level: None,
            since_ms: t_ms,
            last_check_ms: i64::MIN,
            incident: None,
            alerted: false,
            muted: None,
            last_event_ms: None,
            reason: None,
        }
    }
}

/// What one check says, judged by the target's policy.
#[derive(Debug, PartialEq)]
enum Class {
    Failed(String),
    /// Up, but the certificate expires within this warning level (days).
    CertExpiring(i32, String),
    Slow(String),
    Good,
}

fn classify(r: &CheckResult, p: &Policy) -> Class {
    if !r.up {
        let why = r.failure.map(|f| f.as_str()).unwrap_or("down");
        return Class::Failed(match &r.error {
            Some(e) => format!("{why}: {e}"),
            None => why.to_string(),
        });
    }
    if let Some(days) = r.cert_days_left
        && let Some(level) = p
            .cert_expiry_days
            .iter()
            .rev()
            .find(|&&l| days <= f64::from(l))
    {
        return Class::CertExpiring(
            *level as i32,
            format!("certificate expires in {days:.1} days (warning level {level} days)"),
        );
    }
    if let Some(budget) = p.latency_budget
        && r.timings.total > crate::util::ms(budget)
    {
        return Class::Slow(format!(
            "total {:.0} ms over the {} budget",
            r.timings.total,
            crate::util::format_duration(budget)
        ));
    }
    Class::Good
}

/// An event to write to the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub kind: &'static str,
    pub previous: Health,
    pub state: Health,
    pub reason: String,
    pub incident: String,
}

/// One check applied to `st`. `muted` says whether (and why) an alert must not be created now
/// (an open maintenance window, a parent that is down); it is asked only when one would be.
pub fn step(
    st: &mut State,
    p: &Policy,
    r: &CheckResult,
    t_ms: i64,
    muted: &dyn Fn() -> Option<String>,
) -> Option<Draft> {
    if t_ms <= st.last_check_ms {
        return None; // a duplicate, or older than what was already decided
    }
    st.last_check_ms = t_ms;
    let class = classify(r, p);
    let (ft, okt) = (p.failure_threshold as i32, p.success_threshold as i32);
    match class {
        Class::Failed(reason) => {
            st.fails = (st.fails + 1).min(ft);
            st.oks = 0;
            st.slows = 0;
            if st.health != Health::Down && st.fails >= ft {
                return enter(st, Health::Down, reason, t_ms, muted);
            }
            if st.health == Health::Down {
                st.reason = Some(reason);
            }
        }
        _ if st.health == Health::Down => {
            // Any answering check counts toward recovery; degradation is judged once up.
            st.fails = 0;
            st.oks = (st.oks + 1).min(okt);
            if st.oks >= okt {
                return leave(st, p, t_ms);
            }
        }
        Class::Good => {
            st.fails = 0;
            st.slows = 0;
            st.oks = (st.oks + 1).min(okt);
            if st.health == Health::Degraded && st.oks >= okt {
                return leave(st, p, t_ms);
            }
        }
        Class::Slow(reason) => {
            st.fails = 0;
            st.oks = 0;
            st.slows = (st.slows + 1).min(ft);
            if st.health == Health::Up && st.slows >= ft {
                return enter(st, Health::Degraded, reason, t_ms, muted);
            }
        }
        Class::CertExpiring(level, reason) => {
            st.fails = 0;
            st.oks = 0;
            // Each lower level crossed is news, once per episode.
            if st.cert_level.is_none_or(|l| level < l) {
                st.cert_level = Some(level);
                return enter(st, Health::Degraded, reason, t_ms, muted);
            }
        }
    }
    reminder(st, p, t_ms)
}

fn reminder(st: &mut State, p: &Policy, t_ms: i64) -> Option<Draft> {
    let every = p.remind_every?.as_millis() as i64;
    if st.health == Health::Up || !st.alerted || t_ms - st.last_event_ms? < every {
        return None;
    }
    st.last_event_ms = Some(t_ms);
    Some(Draft {
        kind: "reminder",
        previous: st.health,
        state: st.health,
        reason: st.reason.clone().unwrap_or_default(),
        incident: st.incident.clone().unwrap_or_default(),
    })
}

fn enter(
    st: &mut State,
    to: Health,
    reason: String,
    t_ms: i64,
    muted: &dyn Fn() -> Option<String>,
) -> Option<Draft> {
    let previous = st.health;
    if previous == Health::Up {
        st.since_ms = t_ms;
        st.incident = Some(crate::util::new_check_id());
        st.alerted = false;
    } else if previous != to {
        st.since_ms = t_ms;
    }
    st.health = to;
    st.oks = 0;
    st.reason = Some(reason.clone());
    if let Some(why) = muted() {
        st.muted = Some(why);
        return None;
    }
    st.muted = None;
    st.alerted = true;
    st.last_event_ms = Some(t_ms);
    Some(Draft {
        kind: to.as_str(),
        previous,
        state: to,
        reason,
        incident: st.incident.clone().unwrap_or_default(),
    })
}

fn leave(st: &mut State, p: &Policy, t_ms: i64) -> Option<Draft> {
    let previous = st.health;
    let send = st.alerted && p.send_resolved;
    let incident = st.incident.take().unwrap_or_default();
    *st = State {
        last_check_ms: st.last_check_ms,
        ..State::new(t_ms)
    };
    send.then(|| Draft {
        kind: "resolved",
        previous,
        state: Health::Up,
        reason: format!("{} checks in a row up", p.success_threshold),
        incident,
    })
}

/// No `FOR UPDATE`: the batch transaction already holds the partition's offset row (its
/// first statement), which serializes the writers of the partition, and so of its targets.
const SELECT_STATES: &str = "SELECT target, state, fails, oks, slows, cert_level, since, last_check, \
     incident, alerted, muted, last_event, reason FROM alert_state WHERE target = ANY($1)";

const UPSERT_STATES: &str = "INSERT INTO alert_state (target, state, fails, oks, slows, cert_level, \
     since, last_check, incident, alerted, muted, last_event, reason) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::int4[], $5::int4[], $6::int4[], \
     $7::timestamptz[], $8::timestamptz[], $9::text[], $10::bool[], $11::text[], \
     $12::timestamptz[], $13::text[]) \
     ON CONFLICT (target) DO UPDATE SET state = EXCLUDED.state, fails = EXCLUDED.fails, \
     oks = EXCLUDED.oks, slows = EXCLUDED.slows, cert_level = EXCLUDED.cert_level, \
     since = EXCLUDED.since, last_check = EXCLUDED.last_check, incident = EXCLUDED.incident, \
     alerted = EXCLUDED.alerted, muted = EXCLUDED.muted, last_event = EXCLUDED.last_event, \
     reason = EXCLUDED.reason";

/// Every event of a batch and one pending delivery per channel, in one statement: the ids
/// follow the drafts' order (decided per target in time order), so a channel sends them in
/// that order.
const INSERT_EVENTS: &str = "WITH e AS (INSERT INTO alert_events (key, target, url, kind, state, \
     previous, reason, incident, check_id, at) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
     $7::text[], $8::text[], $9::text[], $10::timestamptz[]) RETURNING id) \
     INSERT INTO alert_deliveries (event_id, channel) \
     SELECT e.id, c.name FROM e CROSS JOIN unnest($11::text[]) AS c(name)";

fn ms_of(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// One check the writer's transaction inserted into `checks` (never a row that was already
/// there: a record Kafka delivered twice counts once).
#[derive(Clone, Copy, Debug)]
pub struct Landed<'a> {
    pub record: &'a CheckResult,
    pub started_ms: i64,
}

/// Whether two states differ in more than `last_check`.
fn changed(before: Option<&State>, after: &State) -> bool {
    before.is_none_or(|b| {
        State {
            last_check_ms: after.last_check_ms,
            ..b.clone()
        } != *after
    })
}

/// Decides alerts for the batches of one partition's writer.
#[derive(Clone, Debug)]
pub struct Evaluator {
    cfg: Arc<AlertsConfig>,
}

impl Evaluator {
    pub fn new(cfg: Arc<AlertsConfig>) -> Evaluator {
        Evaluator { cfg }
    }

    /// Applies the checks this transaction inserted in time order per target, writes the
    /// changed states and one outbox event (with a pending delivery per channel) per
    /// transition. Returns the number of events: when there are any, call [`wake`] once
    /// the transaction committed.
    pub fn evaluate(
        &self,
        tx: &mut Transaction,
        landed: &[Landed],
    ) -> Result<u64, postgres::Error> {
        let mut by_target: BTreeMap<&str, Vec<(&CheckResult, i64)>> = BTreeMap::new();
        for l in landed {
            let list = by_target.entry(l.record.target.as_str()).or_default();
            list.push((l.record, l.started_ms));
        }
        if by_target.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = by_target.keys().copied().collect();
        let mut states = load(tx, SELECT_STATES, &ids)?;
        let before = states.clone();
        let parents = self.parent_states(tx, &by_target, &states)?;
        let mut drafts: Vec<(Draft, &CheckResult, i64)> = Vec::new();
        for (target, list) in &mut by_target {
            list.sort_by_key(|&(_, t)| t);
            let st = states
                .entry(target.to_string())
                .or_insert_with(|| State::new(list[0].1));
            // One policy per target and batch (from its latest record's tags), not per record.
            let policy = self.cfg.policy(target, &list[list.len() - 1].0.tags);
            for &(r, t) in list.iter() {
                let muted = || self.muted(&policy, target, &r.tags, t, &parents);
                if let Some(d) = step(st, &policy, r, t, &muted) {
                    drafts.push((d, r, t));
                }
            }
        }
        let dirty: Vec<&str> = (ids.iter().copied())
            .filter(|id| changed(before.get(*id), &states[*id]))
            .collect();
        if !dirty.is_empty() {
            store(tx, &dirty, &states)?;
        }
        if !drafts.is_empty() {
            self.insert_events(tx, &drafts)?;
        }
        Ok(drafts.len() as u64)
    }

    /// Writes the batch's events and their deliveries (one statement, whatever their number:
    /// a statement per event cost the sink a round trip each).
    fn insert_events<'a>(
        &self,
        tx: &mut Transaction,
        drafts: &'a [(Draft, &'a CheckResult, i64)],
    ) -> Result<(), postgres::Error> {
        let keys: Vec<String> = drafts.iter().map(|_| crate::util::new_check_id()).collect();
        let col = |f: fn(&'a (Draft, &'a CheckResult, i64)) -> &'a str| -> Vec<&'a str> {
            drafts.iter().map(f).collect()
        };
        let targets = col(|(_, r, _)| &r.target);
        let urls = col(|(_, r, _)| &r.url);
        let kinds = col(|(d, _, _)| d.kind);
        let states = col(|(d, _, _)| d.state.as_str());
        let previous = col(|(d, _, _)| d.previous.as_str());
        let reasons = col(|(d, _, _)| &d.reason);
        let incidents = col(|(d, _, _)| &d.incident);
        let check_ids = col(|(_, r, _)| &r.check_id);
        let at: Vec<SystemTime> = drafts.iter().map(|(_, _, t)| system_time(*t)).collect();
        let channels: Vec<&str> = self.cfg.channels.iter().map(|c| c.name.as_str()).collect();
        tx.execute(
            INSERT_EVENTS,
            &[
                &keys, &targets, &urls, &kinds, &states, &previous, &reasons, &incidents,
                &check_ids, &at, &channels,
            ],
        )?;
        Ok(())
    }

    /// Why an alert for `target` must not be created at `t_ms`, if it must not.
    fn muted(
        &self,
        p: &Policy,
        target: &str,
        tags: &[String],
        t_ms: i64,
        parents: &HashMap<String, Health>,
    ) -> Option<String> {
        if self.cfg.in_maintenance(target, tags, t_ms) {
            return Some("maintenance".into());
        }
        let parent = p.depends_on.as_ref()?;
        (parents.get(parent) == Some(&Health::Down)).then(|| format!("depends_on {parent} (down)"))
    }

    /// The states of the parents (`depends_on`) of the batch's targets. A parent owned by
    /// another partition is read as last committed; one in this batch is evaluated first
    /// (its state after this batch is what counts when the child's checks ran close to it).
    fn parent_states(
        &self,
        tx: &mut Transaction,
        batch: &BTreeMap<&str, Vec<(&CheckResult, i64)>>,
        states: &HashMap<String, State>,
    ) -> Result<HashMap<String, Health>, postgres::Error> {
        let mut wanted: Vec<String> = batch
            .iter()
            .filter_map(|(t, list)| self.cfg.policy(t, &list[0].0.tags).depends_on)
            .collect();
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        wanted.sort();
        wanted.dedup();
        let mut out: HashMap<String, Health> = HashMap::new();
        let outside: Vec<&str> = (wanted.iter())
            .filter(|p| !batch.contains_key(p.as_str()))
            .map(String::as_str)
            .collect();
        if !outside.is_empty() {
            let rows = tx.query(
                "SELECT target, state FROM alert_state WHERE target = ANY($1)",
                &[&outside],
            )?;
            for row in rows {
                out.insert(row.get(0), Health::parse(row.get(1)));
            }
        }
        for p in wanted.iter().filter(|p| batch.contains_key(p.as_str())) {
            // Evaluate the parent's checks of this batch on a copy to know its state after.
            let list = &batch[p.as_str()];
            let mut st = states
                .get(p)
                .cloned()
                .unwrap_or_else(|| State::new(list[0].1));
            let mut sorted = list.clone();
            sorted.sort_by_key(|&(_, t)| t);
            for &(r, t) in &sorted {
                step(&mut st, &self.cfg.policy(p, &r.tags), r, t, &|| None);
            }
            out.insert(p.clone(), st.health);
        }
        Ok(out)
    }
}

/// Wakes the notifiers once a batch with events committed. Not inside the batch transaction:
/// PostgreSQL serializes the commits of transactions that NOTIFY (one lock, held through
/// their WAL flush), which queued the partitions' writers behind each other. This one waits
/// for no flush. A wake-up that fails, or never comes because the sink died right after its
/// commit, only delays the delivery to the notifier's next look (within 500 ms).
pub fn wake(client: &mut postgres::Client) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL synchronous_commit = off; NOTIFY sitewatch_alerts")?;
    tx.commit()
}

fn load(
    tx: &mut Transaction,
    sql: &str,
    ids: &[&str],
) -> Result<HashMap<String, State>, postgres::Error> {
    let rows = tx.query(sql, &[&ids])?;
    Ok(rows
        .iter()
        .map(|row| {
            let st = State {
                health: Health::parse(row.get(1)),
                fails: row.get(2),
                oks: row.get(3),
                slows: row.get(4),
                cert_level: row.get(5),
                since_ms: ms_of(row.get(6)),
                last_check_ms: ms_of(row.get(7)),
                incident: row.get(8),
                alerted: row.get(9),
                muted: row.get(10),
                last_event_ms: row.get::<_, Option<SystemTime>>(11).map(ms_of),
                reason: row.get(12),
            };
            (row.get(0), st)
        })
        .collect())
}

fn store(
    tx: &mut Transaction,
    ids: &[&str],
    states: &HashMap<String, State>,
) -> Result<(), postgres::Error> {
    let list: Vec<&State> = ids.iter().map(|id| &states[*id]).collect();
    let health: Vec<&str> = list.iter().map(|s| s.health.as_str()).collect();
    let fails: Vec<i32> = list.iter().map(|s| s.fails).collect();
    let oks: Vec<i32> = list.iter().map(|s| s.oks).collect();
    let slows: Vec<i32> = list.iter().map(|s| s.slows).collect();
    let levels: Vec<Option<i32>> = list.iter().map(|s| s.cert_level).collect();
    let since: Vec<SystemTime> = list.iter().map(|s| system_time(s.since_ms)).collect();
    let last: Vec<SystemTime> = list.iter().map(|s| system_time(s.last_check_ms)).collect();
    let incident: Vec<Option<&str>> = list.iter().map(|s| s.incident.as_deref()).collect();
    let alerted: Vec<bool> = list.iter().map(|s| s.alerted).collect();
    let muted: Vec<Option<&str>> = list.iter().map(|s| s.muted.as_deref()).collect();
    let last_event: Vec<Option<SystemTime>> = list
        .iter()
        .map(|s| s.last_event_ms.map(system_time))
        .collect();
    let reason: Vec<Option<&str>> = list.iter().map(|s| s.reason.as_deref()).collect();
    tx.execute(
        UPSERT_STATES,
        &[
            &ids,
            &health,
            &fails,
            &oks,
            &slows,
            &levels,
            &since,
            &last,
            &incident,
            &alerted,
            &muted,
            &last_event,
            &reason,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::FailureReason;
    use std::time::Duration;

    fn policy() -> Policy {
        Policy {
            failure_threshold: 3,
            success_threshold: 2,
            remind_every: None,
            send_resolved: true,
            latency_budget: Some(Duration::from_millis(500)),
            cert_expiry_days: vec![21, 14, 7],
            depends_on: None,
        }
    }

    fn check(up: bool, total: f64, cert_days: Option<f64>) -> CheckResult {
        let mut r = CheckResult::new("t", "http://127.0.0.1/", "a", "GET");
        r.timings.total = total;
        r.cert_days_left = cert_days;
        if up {
            r.up = true;
        } else {
            r.fail(FailureReason::Connect, "refused");
        }
        r
    }

    /// Runs the checks through `step`; the kinds of the events.
    fn run(st: &mut State, p: &Policy, checks: &[CheckResult], muted: bool) -> Vec<&'static str> {
        let start = st.last_check_ms.max(0);
        (checks.iter().enumerate())
            .filter_map(|(i, r)| {
                step(st, p, r, start + 1 + i as i64, &|| {
                    muted.then(|| "m".into())
                })
            })
            .map(|d| d.kind)
            .collect()
    }

    #[test]
    fn thresholds_decide_down_and_up_once_and_flapping_decides_nothing() {
        let p = policy();
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut st = State::new(0);
        let flapping = [&bad, &bad, &ok, &bad, &bad, &ok].map(Clone::clone);
        assert!(run(&mut st, &p, &flapping, false).is_empty());
        let kinds = run(
            &mut st,
            &p,
            &[bad.clone(), bad.clone(), bad.clone(), bad.clone()],
            false,
        );
        assert_eq!(kinds, ["down"]);
        assert_eq!(st.health, Health::Down);
        assert!(run(&mut st, &p, &[ok.clone(), bad.clone(), ok.clone()], false).is_empty());
        assert_eq!(
            run(&mut st, &p, std::slice::from_ref(&ok), false),
            ["resolved"]
        );
        assert_eq!(st.health, Health::Up);
        assert!(st.incident.is_none());
    }

    #[test]
    fn a_muted_episode_sends_neither_trigger_nor_resolve() {
        let p = policy();
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut st = State::new(0);
        assert!(run(&mut st, &p, &[bad.clone(), bad.clone(), bad.clone()], true).is_empty());
        assert_eq!(st.health, Health::Down);
        assert_eq!(st.muted.as_deref(), Some("m"));
        assert!(run(&mut st, &p, &[ok.clone(), ok.clone()], false).is_empty());
        assert_eq!(st.health, Health::Up);
    }

    #[test]
    fn slow_checks_and_each_certificate_level_degrade_with_their_own_event() {
        let p = policy();
        let slow = check(true, 900.0, None);
        let ok = check(true, 10.0, None);
        let mut st = State::new(0);
        assert_eq!(
            run(
                &mut st,
                &p,
                &[slow.clone(), slow.clone(), slow.clone()],
                false
            ),
            ["degraded"]
        );
        assert_eq!(
            run(&mut st, &p, &[ok.clone(), ok.clone()], false),
            ["resolved"]
        );
        let certs = [20.0, 19.0, 13.5, 13.0, 6.0].map(|d| check(true, 10.0, Some(d)));
        assert_eq!(
            run(&mut st, &p, &certs, false),
            ["degraded", "degraded", "degraded"]
        );
        assert_eq!(st.cert_level, Some(7));
    }

    #[test]
    fn duplicates_and_older_checks_are_not_counted() {
        let p = policy();
        let bad = check(false, 10.0, None);
        let mut st = State::new(0);
        for _ in 0..5 {
            step(&mut st, &p, &bad, 100, &|| None);
        }
        assert_eq!(st.fails, 1);
        assert!(step(&mut st, &p, &bad, 50, &|| None).is_none());
        assert_eq!(st.fails, 1);
    }

    #[test]
    fn a_steady_target_leaves_its_state_row_unchanged() {
        let p = policy();
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut st = State::new(0);
        run(&mut st, &p, &[ok.clone(), ok.clone(), ok.clone()], false);
        let before = st.clone();
        run(&mut st, &p, &[ok.clone(), ok.clone()], false);
        assert!(!changed(Some(&before), &st), "{before:?} {st:?}");
        run(&mut st, &p, &vec![bad.clone(); 4], false);
        let before = st.clone();
        run(&mut st, &p, &vec![bad.clone(); 4], false);
        assert!(!changed(Some(&before), &st), "{before:?} {st:?}");
        assert!(changed(None, &st));
        run(&mut st, &p, std::slice::from_ref(&ok), false);
        assert!(changed(Some(&before), &st));
    }

    #[test]
    fn without_send_resolved_recovery_is_silent() {
        let mut p = policy();
        p.send_resolved = false;
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut st = State::new(0);
        let checks = [&bad, &bad, &bad, &ok, &ok].map(Clone::clone);
        assert_eq!(run(&mut st, &p, &checks, false), ["down"]);
        assert_eq!(st.health, Health::Up);
    }

    #[test]
    fn reminders_repeat_while_down() {
        let mut p = policy();
        p.remind_every = Some(Duration::from_millis(10));
        let bad = check(false, 10.0, None);
        let mut st = State::new(0);
        let kinds: Vec<&str> = (1..=30)
            .filter_map(|t| step(&mut st, &p, &bad, t, &|| None).map(|d| d.kind))
            .collect();
        assert_eq!(kinds, ["down", "reminder", "reminder"]);
    }
}
