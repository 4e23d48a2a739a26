//! The evaluator: each fetch's checks → state changes → outbox events, inside the sink's batch
//! transaction (called by `sink::writer` before it commits).
//!
//! Architecture Invariant: `alert_state`, `alert_locations`, `alert_events` and
//! `alert_deliveries` change only in the transaction that stores the same records' rows and
//! moves the partition's offset. A sink killed at any point either committed the rows, the
//! transitions and the offset, or none of them; the next owner re-reads the batch and decides
//! the same transitions once. Only records this transaction inserted are evaluated (a
//! producer's duplicate, dropped by the `checks` key, never counts twice), and only when newer
//! than the location's `last_check`.
//!
//! Two levels. Each location that checks a target (`''` for records without a location) has
//! its own health, decided by the thresholds from that location's checks alone (a [`Seen`]).
//! The target's alertable state (a [`State`], what `open_alerts` shows and events are about)
//! follows the quorum: down when at least `[alerts] quorum` (default 1) of the locations that
//! count see it down, degraded when that many see it down or degraded, up otherwise. A location
//! counts when its latest check started within `quorum_settings.fresh_for` of the check being
//! judged (record time, not the clock: a re-run decides the same), so a silent location stops
//! counting. Records are keyed by target, so every location's checks of a target reach the
//! same partition and one sink decides. A target checked from one location only behaves
//! exactly as one without locations did: its state is that location's.
//!
//! Cost: counters saturate at their threshold, so a target that stays up (or down) leaves its
//! state row as it was, and only changed rows are written: a steady fleet without locations
//! costs two SELECTs per batch. `last_check` is written with the other changes (it guards
//! against late records, not duplicates), so after a restart it may be older than the last
//! check evaluated; except for a target with a named location, whose locations' rows are
//! written whenever they were checked, since whether a location counts depends on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use postgres::Transaction;

use super::config::{AlertsConfig, Policy};
use crate::result::CheckResult;
use crate::sink::db::system_time;

/// How long a location counts after its latest check when `quorum_settings` has no row.
pub const DEFAULT_FRESH_MS: i64 = 90_000;

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

/// A target's row of `alert_state`: its alertable state. The counters are those of the
/// location checked last (for a target without locations, its own).
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

/// One location's view of a target: the thresholds applied to that location's checks alone
/// (a row of `alert_locations`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub health: Health,
    pub fails: i32,
    pub oks: i32,
    pub slows: i32,
    pub cert_level: Option<i32>,
    pub since_ms: i64,
    pub last_check_ms: i64,
    pub reason: Option<String>,
}

impl Seen {
    pub fn new(t_ms: i64) -> Seen {
        Seen {
            health: Health::Up,
            fails: 0,
            oks: 0,
            slows: 0,
            cert_level: None,
            since_ms: t_ms,
            last_check_ms: i64::MIN,
            reason: None,
        }
    }

    /// The only location of a target stored before locations were (schema version 4), or
    /// stored without one: its state is the target's.
    fn of(st: &State) -> Seen {
        Seen {
            health: st.health,
            fails: st.fails,
            oks: st.oks,
            slows: st.slows,
            cert_level: st.cert_level,
            since_ms: st.since_ms,
            last_check_ms: st.last_check_ms,
            reason: st.reason.clone(),
        }
    }

    fn become_(&mut self, to: Health, reason: String, t_ms: i64) {
        if self.health != to {
            self.since_ms = t_ms;
        }
        self.health = to;
        self.oks = 0;
        self.reason = Some(reason);
    }

    /// One check from this location; false when it is not newer than the last one seen (a
    /// duplicate, or a late record), which changes nothing.
    fn observe(&mut self, p: &Policy, r: &CheckResult, t_ms: i64) -> bool {
        if t_ms <= self.last_check_ms {
            return false;
        }
        self.last_check_ms = t_ms;
        let (ft, okt) = (p.failure_threshold as i32, p.success_threshold as i32);
        match classify(r, p) {
            Class::Failed(reason) => {
                self.fails = (self.fails + 1).min(ft);
                self.oks = 0;
                self.slows = 0;
                if self.health != Health::Down && self.fails >= ft {
                    self.become_(Health::Down, reason, t_ms);
                } else if self.health == Health::Down {
                    self.reason = Some(reason);
                }
            }
            _ if self.health == Health::Down => {
                // Any answering check counts toward recovery; degradation is judged once up.
                self.fails = 0;
                self.oks = (self.oks + 1).min(okt);
                if self.oks >= okt {
                    self.recover(t_ms);
                }
            }
            Class::Good => {
                self.fails = 0;
                self.slows = 0;
                self.oks = (self.oks + 1).min(okt);
                if self.health == Health::Degraded && self.oks >= okt {
                    self.recover(t_ms);
                }
            }
            Class::Slow(reason) => {
                self.fails = 0;
                self.oks = 0;
                self.slows = (self.slows + 1).min(ft);
                if self.health == Health::Up && self.slows >= ft {
                    self.become_(Health::Degraded, reason, t_ms);
                }
            }
            Class::CertExpiring(level, reason) => {
                self.fails = 0;
                self.oks = 0;
                // Each lower level crossed is news, once per episode.
                if self.cert_level.is_none_or(|l| level < l) {
                    self.cert_level = Some(level);
                    self.become_(Health::Degraded, reason, t_ms);
                }
            }
        }
        true
    }

    fn recover(&mut self, t_ms: i64) {
        *self = Seen {
            last_check_ms: self.last_check_ms,
            ..Seen::new(t_ms)
        };
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

/// The quorum: how many of the locations that count must see a target down (or degraded),
/// and for how long after its latest check a location counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quorum {
    /// At least 1 (`[alerts] quorum`).
    pub min: usize,
    pub fresh_ms: i64,
}

impl Quorum {
    /// One location is enough: a target without locations, as before the quorum.
    pub const ONE: Quorum = Quorum {
        min: 1,
        fresh_ms: DEFAULT_FRESH_MS,
    };
}

/// What the locations that count say about a target after a check from `here`.
#[derive(Debug)]
struct Verdict<'a> {
    health: Health,
    /// The certificate warning level at least `min` of the counting locations crossed.
    cert_level: Option<i32>,
    /// Why: `here`'s reason when it sees the verdict's state, else the first one that does.
    reason: Option<&'a str>,
    counted: usize,
    down: usize,
    /// Down or degraded.
    bad: usize,
}

fn verdict<'a>(
    locations: &'a BTreeMap<String, Seen>,
    here: &str,
    q: Quorum,
    t_ms: i64,
) -> Verdict<'a> {
    let oldest = t_ms.saturating_sub(q.fresh_ms);
    let counting = || {
        (locations.iter())
            .filter(move |(name, l)| name.as_str() == here || l.last_check_ms >= oldest)
    };
    let (mut counted, mut down, mut bad) = (0, 0, 0);
    let mut levels: Vec<i32> = Vec::new();
    for (_, l) in counting() {
        counted += 1;
        down += usize::from(l.health == Health::Down);
        bad += usize::from(l.health != Health::Up);
        if l.health != Health::Up
            && let Some(level) = l.cert_level
        {
            levels.push(level);
        }
    }
    let health = if down >= q.min {
        Health::Down
    } else if bad >= q.min {
        Health::Degraded
    } else {
        Health::Up
    };
    levels.sort_unstable();
    let sees = |l: &Seen| match health {
        Health::Down => l.health == Health::Down,
        _ => l.health != Health::Up,
    };
    let reason = match (health, locations.get(here)) {
        (Health::Up, _) => None,
        (_, Some(l)) if sees(l) => l.reason.as_deref(),
        _ => counting()
            .find(|(_, l)| sees(l))
            .and_then(|(_, l)| l.reason.as_deref()),
    };
    Verdict {
        health,
        cert_level: levels.get(q.min - 1).copied(),
        reason,
        counted,
        down,
        bad,
    }
}

/// An event to write to the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub kind: &'static str,
    pub previous: Health,
    pub state: Health,
    pub reason: String,
    pub incident: String,
    /// The named locations that see the target down (degraded, for a degraded event); empty
    /// for a resolve and for records without a location.
    pub locations: Vec<String>,
}

/// A target's alertable state and its locations' states (`''`: records without a location).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub state: State,
    pub locations: BTreeMap<String, Seen>,
}

impl Target {
    pub fn new(t_ms: i64) -> Target {
        Target {
            state: State::new(t_ms),
            locations: BTreeMap::new(),
        }
    }

    /// Whether the target has a named location: then its locations are stored (and their
    /// `last_check`, which decides whether they count), and reasons name them.
    pub fn located(&self) -> bool {
        self.locations.keys().any(|l| !l.is_empty())
    }

    /// One check applied: to its location's state, then to the target's as the quorum
    /// decides. `muted` says whether (and why) an alert must not be created now (an open
    /// maintenance window, a parent that is down); it is asked only when one would be.
    pub fn step(
        &mut self,
        p: &Policy,
        q: Quorum,
        r: &CheckResult,
        t_ms: i64,
        muted: &dyn Fn() -> Option<String>,
    ) -> Option<Draft> {
        let here = r.location.as_deref().unwrap_or("");
        if !self.locations.contains_key(here) {
            // The first location starts with the target (its row is the target's when unnamed).
            let since = match self.locations.is_empty() {
                true => self.state.since_ms,
                false => t_ms,
            };
            self.locations.insert(here.to_string(), Seen::new(since));
        }
        let seen = self.locations.get_mut(here)?;
        if !seen.observe(p, r, t_ms) {
            return None;
        }
        let (fails, oks, slows) = (seen.fails, seen.oks, seen.slows);
        // This check itself was bad (a failure; for degraded, not a good one).
        let bad_now = match seen.health {
            Health::Down => fails > 0,
            Health::Degraded => oks == 0,
            Health::Up => false,
        };
        let v = verdict(&self.locations, here, q, t_ms);
        let located = self.located();
        let names = match v.health {
            Health::Up => Vec::new(),
            h if located => self.names(h, here, q, t_ms),
            _ => Vec::new(),
        };
        let why = v.reason.unwrap_or_default();
        let reason = match v.health {
            Health::Up => String::new(),
            _ if !located => why.to_string(),
            h => format!(
                "{} in {} ({} of {} locations, quorum {}): {why}",
                h.as_str(),
                names.join(", "),
                if h == Health::Down { v.down } else { v.bad },
                v.counted,
                q.min
            ),
        };
        let st = &mut self.state;
        st.last_check_ms = st.last_check_ms.max(t_ms);
        let draft = match v.health {
            Health::Down if st.health != Health::Down => {
                enter(st, Health::Down, reason, t_ms, muted)
            }
            Health::Degraded if st.health != Health::Degraded => {
                st.cert_level = v.cert_level;
                enter(st, Health::Degraded, reason, t_ms, muted)
            }
            // Each lower certificate level crossed is news, once per episode.
            Health::Degraded
                if v.cert_level
                    .is_some_and(|l| st.cert_level.is_none_or(|s| l < s)) =>
            {
                st.cert_level = v.cert_level;
                enter(st, Health::Degraded, reason, t_ms, muted)
            }
            Health::Up if st.health != Health::Up => {
                let why = located.then(|| {
                    format!(
                        "down in {} of {} locations, under the quorum of {}",
                        v.down, v.counted, q.min
                    )
                });
                leave(st, p, t_ms, why)
            }
            health => {
                if health == Health::Down {
                    st.reason = Some(reason);
                }
                match st.muted.is_some() && bad_now {
                    true => unmuted(st, t_ms, muted),
                    false => reminder(st, p, t_ms),
                }
            }
        };
        (st.fails, st.oks, st.slows) = (fails, oks, slows);
        let mut d = draft?;
        if d.state != Health::Up {
            d.locations = names;
        }
        Some(d)
    }

    /// The named locations that count and see the target `health` (down; or not up).
    fn names(&self, health: Health, here: &str, q: Quorum, t_ms: i64) -> Vec<String> {
        let oldest = t_ms.saturating_sub(q.fresh_ms);
        (self.locations.iter())
            .filter(|(name, l)| name.as_str() == here || l.last_check_ms >= oldest)
            .filter(|(_, l)| match health {
                Health::Down => l.health == Health::Down,
                _ => l.health != Health::Up,
            })
            .filter(|(name, _)| !name.is_empty())
            .map(|(name, _)| name.clone())
            .collect()
    }
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
        locations: Vec::new(),
    })
}

/// An episode entered while muted (a maintenance window, a parent down) that is still bad at
/// a check once nothing mutes it: its event goes out then, and so its resolve later. Uptime
/// Kuma alerts a monitor still down when its maintenance ends, and a muted start must not hide
/// an outage that outlives the window. An episode alerted before a window opened is not muted,
/// so it is not alerted again when the window closes (what Kuma's users ask for, #7148).
fn unmuted(st: &mut State, t_ms: i64, muted: &dyn Fn() -> Option<String>) -> Option<Draft> {
    if let Some(why) = muted() {
        st.muted = Some(why);
        return None;
    }
    let was = st.muted.take().unwrap_or_default();
    st.alerted = true;
    st.last_event_ms = Some(t_ms);
    Some(Draft {
        kind: st.health.as_str(),
        previous: Health::Up,
        state: st.health,
        reason: format!(
            "{} (held back until now: {was})",
            st.reason.as_deref().unwrap_or_default()
        ),
        incident: st.incident.clone().unwrap_or_default(),
        locations: Vec::new(),
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
        locations: Vec::new(),
    })
}

/// Back to up: a resolve when the episode was alerted. `why` replaces the default reason
/// (the quorum's count, for a target with locations).
fn leave(st: &mut State, p: &Policy, t_ms: i64, why: Option<String>) -> Option<Draft> {
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
        reason: why.unwrap_or_else(|| format!("{} checks in a row up", p.success_threshold)),
        incident,
        locations: Vec::new(),
    })
}

/// No `FOR UPDATE`: the batch transaction already holds the partition's offset row (its
/// first statement), which serializes the writers of the partition, and so of its targets.
const SELECT_STATES: &str = "SELECT target, state, fails, oks, slows, cert_level, since, last_check, \
     reason, incident, alerted, muted, last_event FROM alert_state WHERE target = ANY($1)";

const SELECT_LOCATIONS: &str = "SELECT target, location, state, fails, oks, slows, cert_level, \
     since, last_check, reason FROM alert_locations WHERE target = ANY($1)";

/// The quorum's window, shared with the `target_quorum` view.
const SELECT_FRESH_FOR: &str =
    "SELECT (extract(epoch FROM fresh_for) * 1000)::int8 FROM quorum_settings";

const UPSERT_STATES: &str = "INSERT INTO alert_state (target, state, fails, oks, slows, cert_level, \
     since, last_check, reason, incident, alerted, muted, last_event) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::int4[], $5::int4[], $6::int4[], \
     $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::bool[], $12::text[], \
     $13::timestamptz[]) \
     ON CONFLICT (target) DO UPDATE SET state = EXCLUDED.state, fails = EXCLUDED.fails, \
     oks = EXCLUDED.oks, slows = EXCLUDED.slows, cert_level = EXCLUDED.cert_level, \
     since = EXCLUDED.since, last_check = EXCLUDED.last_check, incident = EXCLUDED.incident, \
     alerted = EXCLUDED.alerted, muted = EXCLUDED.muted, last_event = EXCLUDED.last_event, \
     reason = EXCLUDED.reason";

const UPSERT_LOCATIONS: &str = "INSERT INTO alert_locations (target, location, state, fails, oks, \
     slows, cert_level, since, last_check, reason) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int4[], $6::int4[], \
     $7::int4[], $8::timestamptz[], $9::timestamptz[], $10::text[]) \
     ON CONFLICT (target, location) DO UPDATE SET state = EXCLUDED.state, \
     fails = EXCLUDED.fails, oks = EXCLUDED.oks, slows = EXCLUDED.slows, \
     cert_level = EXCLUDED.cert_level, since = EXCLUDED.since, last_check = EXCLUDED.last_check, \
     reason = EXCLUDED.reason";

/// Every event of a batch and one pending delivery per channel, in one statement: the ids
/// follow the drafts' order (decided per target in time order), so a channel sends them in
/// that order. A ragged text[][] cannot be unnested, so each event's locations travel as a
/// JSON array.
const INSERT_EVENTS: &str = "WITH e AS (INSERT INTO alert_events (key, target, url, kind, state, \
     previous, reason, incident, check_id, at, locations) \
     SELECT u.key, u.target, u.url, u.kind, u.state, u.previous, u.reason, u.incident, \
     u.check_id, u.at, ARRAY(SELECT jsonb_array_elements_text(u.locations::jsonb)) \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
     $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::text[]) \
     AS u(key, target, url, kind, state, previous, reason, incident, check_id, at, locations) \
     RETURNING id) \
     INSERT INTO alert_deliveries (event_id, channel) \
     SELECT e.id, c.name FROM e CROSS JOIN unnest($12::text[]) AS c(name)";

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

/// A batch's checks by target, each target's in the order they were inserted.
type Batch<'a> = BTreeMap<&'a str, Vec<(&'a CheckResult, i64)>>;

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
        let mut by_target: Batch = BTreeMap::new();
        for l in landed {
            let list = by_target.entry(l.record.target.as_str()).or_default();
            list.push((l.record, l.started_ms));
        }
        if by_target.is_empty() {
            return Ok(0);
        }
        for list in by_target.values_mut() {
            list.sort_by_key(|&(_, t)| t);
        }
        let ids: Vec<&str> = by_target.keys().copied().collect();
        let mut targets = load(tx, &ids)?;
        let before = targets.clone();
        let q = self.quorum(tx, &by_target, &targets)?;
        let parents = self.parent_states(tx, &by_target, &targets, q)?;
        let mut drafts: Vec<(Draft, &CheckResult, i64)> = Vec::new();
        for (target, list) in &by_target {
            let tg = targets
                .entry(target.to_string())
                .or_insert_with(|| Target::new(list[0].1));
            // One policy per target and batch (from its latest record's tags), not per record.
            let policy = self.cfg.policy(target, &list[list.len() - 1].0.tags);
            for &(r, t) in list.iter() {
                let muted = || self.muted(&policy, target, &r.tags, t, &parents);
                if let Some(d) = tg.step(&policy, q, r, t, &muted) {
                    drafts.push((d, r, t));
                }
            }
        }
        store(tx, &ids, &before, &targets)?;
        if !drafts.is_empty() {
            self.insert_events(tx, &drafts)?;
        }
        Ok(drafts.len() as u64)
    }

    /// `[alerts] quorum`, and `quorum_settings.fresh_for`, read only when a target of the
    /// batch has several locations (with one, that one always counts).
    fn quorum(
        &self,
        tx: &mut Transaction,
        batch: &Batch,
        targets: &HashMap<String, Target>,
    ) -> Result<Quorum, postgres::Error> {
        let several = batch.iter().any(|(t, list)| {
            let known = targets.get(*t).map(|tg| &tg.locations);
            let mut names = (known.into_iter().flat_map(|l| l.keys().map(String::as_str))).chain(
                list.iter()
                    .map(|(r, _)| r.location.as_deref().unwrap_or("")),
            );
            let first = names.next();
            names.any(|n| Some(n) != first)
        });
        let fresh_ms = match several {
            true => (tx.query_opt(SELECT_FRESH_FOR, &[])?)
                .and_then(|row| row.get::<_, Option<i64>>(0))
                .unwrap_or(DEFAULT_FRESH_MS),
            false => DEFAULT_FRESH_MS,
        };
        Ok(Quorum {
            min: self.cfg.quorum as usize,
            fresh_ms,
        })
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
        let locations: Vec<String> = (drafts.iter())
            .map(|(d, _, _)| serde_json::Value::from(d.locations.clone()).to_string())
            .collect();
        let channels: Vec<&str> = self.cfg.channels.iter().map(|c| c.name.as_str()).collect();
        tx.execute(
            INSERT_EVENTS,
            &[
                &keys, &targets, &urls, &kinds, &states, &previous, &reasons, &incidents,
                &check_ids, &at, &locations, &channels,
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
        batch: &Batch,
        targets: &HashMap<String, Target>,
        q: Quorum,
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
            let mut tg = (targets.get(p).cloned()).unwrap_or_else(|| Target::new(list[0].1));
            for &(r, t) in list {
                tg.step(&self.cfg.policy(p, &r.tags), q, r, t, &|| None);
            }
            out.insert(p.clone(), tg.state.health);
        }
        Ok(out)
    }
}

/// The stored states of `ids`. A target stored without locations (no named one ever, or
/// before schema version 6) gets its one location `''` back from its own row.
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

/// The columns both tables share, from `first` on: state, fails, oks, slows, cert_level,
/// since, last_check, reason.
fn seen_at(row: &postgres::Row, first: usize) -> Seen {
    Seen {
        health: Health::parse(row.get(first)),
        fails: row.get(first + 1),
        oks: row.get(first + 2),
        slows: row.get(first + 3),
        cert_level: row.get(first + 4),
        since_ms: ms_of(row.get(first + 5)),
        last_check_ms: ms_of(row.get(first + 6)),
        reason: row.get(first + 7),
    }
}

fn load(tx: &mut Transaction, ids: &[&str]) -> Result<HashMap<String, Target>, postgres::Error> {
    let mut out: HashMap<String, Target> = HashMap::new();
    for row in tx.query(SELECT_STATES, &[&ids])? {
        let s = seen_at(&row, 1);
        let state = State {
            health: s.health,
            fails: s.fails,
            oks: s.oks,
            slows: s.slows,
            cert_level: s.cert_level,
            since_ms: s.since_ms,
            last_check_ms: s.last_check_ms,
            incident: row.get(9),
            alerted: row.get(10),
            muted: row.get(11),
            last_event_ms: row.get::<_, Option<SystemTime>>(12).map(ms_of),
            reason: s.reason,
        };
        let target = Target {
            state,
            locations: BTreeMap::new(),
        };
        out.insert(row.get(0), target);
    }
    for row in tx.query(SELECT_LOCATIONS, &[&ids])? {
        // Written with its target's row, in the same transaction: never without one.
        if let Some(t) = out.get_mut(row.get::<_, &str>(0)) {
            t.locations.insert(row.get(1), seen_at(&row, 2));
        }
    }
    for t in out.values_mut() {
        if t.locations.is_empty() {
            t.locations.insert(String::new(), Seen::of(&t.state));
        }
    }
    Ok(out)
}

/// Writes what changed: a target's row when more than its `last_check` did; its locations'
/// rows, for a target with a named location, whenever they changed at all.
fn store(
    tx: &mut Transaction,
    ids: &[&str],
    before: &HashMap<String, Target>,
    targets: &HashMap<String, Target>,
) -> Result<(), postgres::Error> {
    let dirty: Vec<(&str, &State)> = (ids.iter())
        .map(|id| (*id, &targets[*id]))
        .filter(|(id, t)| changed(before.get(*id).map(|b| &b.state), &t.state))
        .map(|(id, t)| (id, &t.state))
        .collect();
    if !dirty.is_empty() {
        store_states(tx, &dirty)?;
    }
    let mut seen: Vec<(&str, &str, &Seen)> = Vec::new();
    for id in ids {
        let t = &targets[*id];
        if !t.located() {
            continue;
        }
        let old = before.get(*id).map(|b| &b.locations);
        for (name, s) in &t.locations {
            if old.and_then(|o| o.get(name)) != Some(s) {
                seen.push((id, name, s));
            }
        }
    }
    if !seen.is_empty() {
        store_locations(tx, &seen)?;
    }
    Ok(())
}

/// The columns both tables share, one array each for `unnest`.
struct Shared<'a> {
    health: Vec<&'static str>,
    fails: Vec<i32>,
    oks: Vec<i32>,
    slows: Vec<i32>,
    levels: Vec<Option<i32>>,
    since: Vec<SystemTime>,
    last: Vec<SystemTime>,
    reason: Vec<Option<&'a str>>,
}

impl<'a> Shared<'a> {
    fn of(list: &[&'a Seen]) -> Shared<'a> {
        Shared {
            health: list.iter().map(|s| s.health.as_str()).collect(),
            fails: list.iter().map(|s| s.fails).collect(),
            oks: list.iter().map(|s| s.oks).collect(),
            slows: list.iter().map(|s| s.slows).collect(),
            levels: list.iter().map(|s| s.cert_level).collect(),
            since: list.iter().map(|s| system_time(s.since_ms)).collect(),
            last: list.iter().map(|s| system_time(s.last_check_ms)).collect(),
            reason: list.iter().map(|s| s.reason.as_deref()).collect(),
        }
    }
}

fn store_states(tx: &mut Transaction, list: &[(&str, &State)]) -> Result<(), postgres::Error> {
    let ids: Vec<&str> = list.iter().map(|(id, _)| *id).collect();
    let seen: Vec<Seen> = list.iter().map(|(_, s)| Seen::of(s)).collect();
    let c = Shared::of(&seen.iter().collect::<Vec<_>>());
    let incident: Vec<Option<&str>> = list.iter().map(|(_, s)| s.incident.as_deref()).collect();
    let alerted: Vec<bool> = list.iter().map(|(_, s)| s.alerted).collect();
    let muted: Vec<Option<&str>> = list.iter().map(|(_, s)| s.muted.as_deref()).collect();
    let last_event: Vec<Option<SystemTime>> = (list.iter())
        .map(|(_, s)| s.last_event_ms.map(system_time))
        .collect();
    tx.execute(
        UPSERT_STATES,
        &[
            &ids,
            &c.health,
            &c.fails,
            &c.oks,
            &c.slows,
            &c.levels,
            &c.since,
            &c.last,
            &c.reason,
            &incident,
            &alerted,
            &muted,
            &last_event,
        ],
    )?;
    Ok(())
}

fn store_locations(
    tx: &mut Transaction,
    list: &[(&str, &str, &Seen)],
) -> Result<(), postgres::Error> {
    let ids: Vec<&str> = list.iter().map(|(id, _, _)| *id).collect();
    let names: Vec<&str> = list.iter().map(|(_, n, _)| *n).collect();
    let c = Shared::of(&list.iter().map(|(_, _, s)| *s).collect::<Vec<_>>());
    tx.execute(
        UPSERT_LOCATIONS,
        &[
            &ids, &names, &c.health, &c.fails, &c.oks, &c.slows, &c.levels, &c.since, &c.last,
            &c.reason,
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

    /// Runs the checks through `Target::step` (one location, no name); the kinds of the
    /// events.
    fn run(tg: &mut Target, p: &Policy, checks: &[CheckResult], muted: bool) -> Vec<&'static str> {
        let start = tg.state.last_check_ms.max(0);
        (checks.iter().enumerate())
            .filter_map(|(i, r)| {
                tg.step(p, Quorum::ONE, r, start + 1 + i as i64, &|| {
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
        let mut tg = Target::new(0);
        let flapping = [&bad, &bad, &ok, &bad, &bad, &ok].map(Clone::clone);
        assert!(run(&mut tg, &p, &flapping, false).is_empty());
        let kinds = run(
            &mut tg,
            &p,
            &[bad.clone(), bad.clone(), bad.clone(), bad.clone()],
            false,
        );
        assert_eq!(kinds, ["down"]);
        assert_eq!(tg.state.health, Health::Down);
        assert!(run(&mut tg, &p, &[ok.clone(), bad.clone(), ok.clone()], false).is_empty());
        assert_eq!(
            run(&mut tg, &p, std::slice::from_ref(&ok), false),
            ["resolved"]
        );
        assert_eq!(tg.state.health, Health::Up);
        assert!(tg.state.incident.is_none());
    }

    #[test]
    fn a_muted_episode_sends_neither_trigger_nor_resolve() {
        let p = policy();
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut tg = Target::new(0);
        assert!(run(&mut tg, &p, &[bad.clone(), bad.clone(), bad.clone()], true).is_empty());
        assert_eq!(tg.state.health, Health::Down);
        assert_eq!(tg.state.muted.as_deref(), Some("m"));
        assert!(run(&mut tg, &p, &[ok.clone(), ok.clone()], false).is_empty());
        assert_eq!(tg.state.health, Health::Up);
    }

    #[test]
    fn an_episode_muted_at_its_start_alerts_when_unmuted_while_still_down() {
        let p = policy();
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut tg = Target::new(0);
        assert!(run(&mut tg, &p, &[bad.clone(), bad.clone(), bad.clone()], true).is_empty());
        assert!(run(&mut tg, &p, std::slice::from_ref(&bad), true).is_empty());
        let got: Vec<Draft> = [&bad, &bad]
            .iter()
            .enumerate()
            .filter_map(|(i, r)| tg.step(&p, Quorum::ONE, r, 10 + i as i64, &|| None))
            .collect();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].kind, got[0].previous), ("down", Health::Up));
        assert_eq!(got[0].reason, "connect: refused (held back until now: m)");
        assert!(tg.state.alerted && tg.state.muted.is_none());
        assert_eq!(
            run(&mut tg, &p, &[ok.clone(), ok.clone()], false),
            ["resolved"]
        );
    }

    #[test]
    fn slow_checks_and_each_certificate_level_degrade_with_their_own_event() {
        let p = policy();
        let slow = check(true, 900.0, None);
        let ok = check(true, 10.0, None);
        let mut tg = Target::new(0);
        assert_eq!(
            run(
                &mut tg,
                &p,
                &[slow.clone(), slow.clone(), slow.clone()],
                false
            ),
            ["degraded"]
        );
        assert_eq!(
            run(&mut tg, &p, &[ok.clone(), ok.clone()], false),
            ["resolved"]
        );
        let certs = [20.0, 19.0, 13.5, 13.0, 6.0].map(|d| check(true, 10.0, Some(d)));
        assert_eq!(
            run(&mut tg, &p, &certs, false),
            ["degraded", "degraded", "degraded"]
        );
        assert_eq!(tg.state.cert_level, Some(7));
    }

    #[test]
    fn duplicates_and_older_checks_are_not_counted() {
        let p = policy();
        let bad = check(false, 10.0, None);
        let mut tg = Target::new(0);
        for _ in 0..5 {
            tg.step(&p, Quorum::ONE, &bad, 100, &|| None);
        }
        assert_eq!(tg.state.fails, 1);
        assert!(tg.step(&p, Quorum::ONE, &bad, 50, &|| None).is_none());
        assert_eq!(tg.state.fails, 1);
    }

    #[test]
    fn a_steady_target_leaves_its_state_row_unchanged() {
        let p = policy();
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut tg = Target::new(0);
        run(&mut tg, &p, &[ok.clone(), ok.clone(), ok.clone()], false);
        let before = tg.state.clone();
        run(&mut tg, &p, &[ok.clone(), ok.clone()], false);
        assert!(!changed(Some(&before), &tg.state), "{before:?} {tg:?}");
        run(&mut tg, &p, &vec![bad.clone(); 4], false);
        let before = tg.state.clone();
        run(&mut tg, &p, &vec![bad.clone(); 4], false);
        assert!(!changed(Some(&before), &tg.state), "{before:?} {tg:?}");
        assert!(changed(None, &tg.state));
        run(&mut tg, &p, std::slice::from_ref(&ok), false);
        assert!(changed(Some(&before), &tg.state));
    }

    /// A target without locations keeps its one location in its own row: what `load` rebuilds
    /// from that row equals the location it came from, whatever state it is in.
    #[test]
    fn the_one_unnamed_location_is_rebuilt_from_the_target_row() {
        let p = policy();
        let slow = check(true, 900.0, None);
        let cert = check(true, 10.0, Some(13.0));
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut tg = Target::new(0);
        for r in [
            &ok, &slow, &slow, &slow, &cert, &bad, &bad, &bad, &ok, &bad, &ok, &ok,
        ] {
            run(&mut tg, &p, std::slice::from_ref(r), false);
            assert_eq!(Seen::of(&tg.state), tg.locations[""], "{tg:?}");
        }
    }

    #[test]
    fn without_send_resolved_recovery_is_silent() {
        let mut p = policy();
        p.send_resolved = false;
        let (ok, bad) = (check(true, 10.0, None), check(false, 10.0, None));
        let mut tg = Target::new(0);
        let checks = [&bad, &bad, &bad, &ok, &ok].map(Clone::clone);
        assert_eq!(run(&mut tg, &p, &checks, false), ["down"]);
        assert_eq!(tg.state.health, Health::Up);
    }

    #[test]
    fn reminders_repeat_while_down() {
        let mut p = policy();
        p.remind_every = Some(Duration::from_millis(10));
        let bad = check(false, 10.0, None);
        let mut tg = Target::new(0);
        let kinds: Vec<&str> = (1..=30)
            .filter_map(|t| tg.step(&p, Quorum::ONE, &bad, t, &|| None).map(|d| d.kind))
            .collect();
        assert_eq!(kinds, ["down", "reminder", "reminder"]);
    }

    /// Checks of `(location, up)` one second apart from `t0_s`; the events.
    fn from(tg: &mut Target, q: Quorum, t0_s: i64, checks: &[(&str, bool)]) -> Vec<Draft> {
        let p = policy();
        (checks.iter().enumerate())
            .filter_map(|(i, (loc, up))| {
                let mut r = check(*up, 10.0, None);
                r.location = Some(loc.to_string());
                tg.step(&p, q, &r, (t0_s + i as i64) * 1000, &|| None)
            })
            .collect()
    }

    #[test]
    fn the_quorum_of_locations_decides_down_and_up_and_names_them() {
        let q = Quorum {
            min: 2,
            fresh_ms: 30_000,
        };
        let mut tg = Target::new(0);
        let a_down: Vec<(&str, bool)> = [("a", false), ("b", true), ("c", true)].repeat(3);
        assert!(from(&mut tg, q, 1, &a_down).is_empty(), "one of three down");
        assert_eq!(tg.locations["a"].health, Health::Down);
        assert_eq!(tg.state.health, Health::Up);
        let b_down: Vec<(&str, bool)> = [("a", false), ("b", false), ("c", true)].repeat(3);
        let got = from(&mut tg, q, 10, &b_down);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].kind, &got[0].locations[..]),
            ("down", &["a".to_string(), "b".into()][..])
        );
        assert!(
            got[0]
                .reason
                .starts_with("down in a, b (2 of 3 locations, quorum 2): "),
            "{}",
            got[0].reason
        );
        let up: Vec<(&str, bool)> = [("a", true), ("b", true), ("c", true)].repeat(2);
        let got = from(&mut tg, q, 20, &up);
        assert_eq!(got.iter().map(|d| d.kind).collect::<Vec<_>>(), ["resolved"]);
        assert_eq!(
            got[0].reason,
            "down in 1 of 3 locations, under the quorum of 2"
        );
        assert_eq!(tg.state.health, Health::Up);
    }

    #[test]
    fn a_silent_location_does_not_count() {
        let q = Quorum {
            min: 2,
            fresh_ms: 10_000,
        };
        let mut tg = Target::new(0);
        let a_down: Vec<(&str, bool)> = [("a", false), ("b", true)].repeat(3);
        assert!(from(&mut tg, q, 1, &a_down).is_empty());
        // a says nothing more; b goes down 30 s later: a's down no longer counts.
        let b_down: Vec<(&str, bool)> = [("b", false), ("c", true)].repeat(3);
        assert!(from(&mut tg, q, 40, &b_down).is_empty());
        assert_eq!(tg.locations["a"].health, Health::Down);
        assert_eq!(tg.state.health, Health::Up);
        // a reports again, still down: two of three count as down.
        let got = from(&mut tg, q, 47, &[("a", false)]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].locations, ["a", "b"]);
    }
}
