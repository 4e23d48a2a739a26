//! `[alerts]` in the sink's config: the raw TOML form, the validated [`AlertsConfig`], and its
//! effective TOML for `check-config`.
//!
//! Behind the `alerts` feature like the rest; without it `[alerts]` is refused by name (see
//! `alerts::validate`).
//!
//! Channel URLs, webhook secrets and PagerDuty routing keys are secrets: they are only read
//! from an environment variable (`url_env`) or a file (`url_file`), never written inline, so
//! the effective config shows where they come from and parses back to the same values.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Ctx;
use crate::config::Secret;
use crate::util::{format_duration, format_rfc3339_ms, parse_duration, parse_rfc3339_ms};

/// PagerDuty's Events API v2 endpoint, used when a `pagerduty` channel names no URL.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 2;
pub const DEFAULT_CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_THRESHOLD: u32 = 1000;
const DAY_MS: i64 = 86_400_000;
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub failure_threshold: Option<u32>,
    pub success_threshold: Option<u32>,
    /// A duration, or "off".
    pub remind_every: Option<String>,
    pub send_resolved: Option<bool>,
    /// A duration, or "off".
    pub latency_budget: Option<String>,
    pub cert_expiry_days: Option<Vec<u32>>,
    /// How many locations must see a target down (see `eval`).
    pub quorum: Option<u32>,
    #[serde(default, rename = "channel")]
    pub channels: Vec<RawChannel>,
    #[serde(default, rename = "override")]
    pub overrides: Vec<RawOverride>,
    #[serde(default)]
    pub maintenance: Vec<RawMaintenance>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawChannel {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub url_env: Option<String>,
    pub url_file: Option<String>,
    pub secret_env: Option<String>,
    pub secret_file: Option<String>,
    pub routing_key_env: Option<String>,
    pub routing_key_file: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    pub target: Option<String>,
    pub tag: Option<String>,
    pub failure_threshold: Option<u32>,
    pub success_threshold: Option<u32>,
    pub remind_every: Option<String>,
    pub send_resolved: Option<bool>,
    pub latency_budget: Option<String>,
    pub cert_expiry_days: Option<Vec<u32>>,
    pub depends_on: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawMaintenance {
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// One-off: an RFC 3339 UTC time.
    pub start: Option<String>,
    /// Weekly: day names and a `HH:MM` time in `zone`.
    pub days: Option<Vec<String>>,
    pub time: Option<String>,
    /// Resolved while parsing (the tz database is read here), so that an unknown zone is
    /// reported with its line and column.
    #[serde(default, deserialize_with = "deserialize_zone")]
    pub zone: Option<Zone>,
    pub duration: Option<String>,
}

/// The alert settings of one target: the defaults of `[alerts]` with the matching overrides
/// applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub remind_every: Option<Duration>,
    pub send_resolved: bool,
    /// `timings.total` above this is slow; `failure_threshold` slow checks in a row degrade.
    pub latency_budget: Option<Duration>,
    /// Warning levels in days, highest first: each level crossed is one `degraded` event.
    pub cert_expiry_days: Vec<u32>,
    pub depends_on: Option<String>,
}

/// Which targets an override or a window applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Target(String),
    Tag(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub selector: Selector,
    pub failure_threshold: Option<u32>,
    pub success_threshold: Option<u32>,
    /// `Some(None)`: set to off.
    pub remind_every: Option<Option<Duration>>,
    pub send_resolved: Option<bool>,
    pub latency_budget: Option<Option<Duration>>,
    pub cert_expiry_days: Option<Vec<u32>>,
    pub depends_on: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Webhook,
    Slack,
    PagerDuty,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 3] = [
        ChannelKind::Webhook,
        ChannelKind::Slack,
        ChannelKind::PagerDuty,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Webhook => "webhook",
            ChannelKind::Slack => "slack",
            ChannelKind::PagerDuty => "pagerduty",
        }
    }
}

/// Where a channel secret came from: what `check-config` prints instead of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFrom {
    Env(String),
    File(PathBuf),
}

/// A secret value and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretValue {
    pub value: Secret,
    pub from: SecretFrom,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    pub name: String,
    pub kind: ChannelKind,
    /// `None` only for PagerDuty, which then uses [`PAGERDUTY_EVENTS_URL`].
    pub url: Option<SecretValue>,
    /// Webhook: the HMAC-SHA256 key of `X-Sitewatch-Signature`.
    pub secret: Option<SecretValue>,
    /// PagerDuty: the integration's routing key.
    pub routing_key: Option<SecretValue>,
    pub timeout: Duration,
}

impl Channel {
    pub fn url(&self) -> &str {
        match &self.url {
            Some(u) => u.value.expose(),
            None => PAGERDUTY_EVENTS_URL,
        }
    }
}

/// The zone of a weekly window's days and time.
#[derive(Debug, Clone)]
pub enum Zone {
    /// Minutes east of UTC; `"UTC"` is 0.
    Fixed(i32),
    /// A tz database zone with its DST rules, read from the system copy when the config is
    /// loaded (a tzdata update applies at the next reload or restart).
    Named {
        name: String,
        tz: jiff::tz::TimeZone,
    },
}

/// By name: the same name from the same database is the same zone (what a config parsed back
/// from `check-config` must compare equal on).
impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        match (self, other) {
            (Zone::Fixed(a), Zone::Fixed(b)) => a == b,
            (Zone::Named { name: a, .. }, Zone::Named { name: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl Eq for Zone {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// From this instant (Unix ms).
    Once { start_ms: i64 },
    /// On these weekdays (0 = Monday) at `minute` of the day, local time in `zone`.
    Weekly {
        days: [bool; 7],
        minute: u32,
        zone: Zone,
    },
}

/// A maintenance window: no alert is created for its targets while it is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Empty targets and tags: every target.
    pub targets: Vec<String>,
    pub tags: Vec<String>,
    pub when: When,
    pub duration: Duration,
}

impl Window {
    pub fn applies_to(&self, target: &str, tags: &[String]) -> bool {
        (self.targets.is_empty() && self.tags.is_empty())
            || self.targets.iter().any(|t| t == target)
            || self.tags.iter().any(|t| tags.contains(t))
    }

    /// Whether the window is open at `t_ms` (Unix ms).
    pub fn is_open(&self, t_ms: i64) -> bool {
        let len = self.duration.as_millis() as i64;
        match &self.when {
            &When::Once { start_ms } => start_ms <= t_ms && t_ms < start_ms.saturating_add(len),
            When::Weekly {
                days,
                minute,
                zone: Zone::Named { tz, .. },
            } => weekly_open_in(tz, days, *minute, len, t_ms),
            &When::Weekly {
                days,
                minute,
                zone: Zone::Fixed(offset_minutes),
            } => {
                let local = t_ms + i64::from(offset_minutes) * 60_000;
                let today = local.div_euclid(DAY_MS);
                // A window that started on an earlier day may still be open.
                (0..=len / DAY_MS + 1).any(|back| {
                    let day = today - back;
                    // 1970-01-01 was a Thursday (index 3).
                    let weekday = (day + 3).rem_euclid(7) as usize;
                    let start = day * DAY_MS + i64::from(minute) * 60_000;
                    days[weekday] && start <= local && local < start + len
                })
            }
        }
    }
}

/// Whether a weekly window in the named zone `tz` is open at `t_ms`. Each window starts at
/// `minute` local time on its days and lasts `len_ms` of real time (a 2 h window across a DST
/// change is still 2 h long). A local start time that a DST change makes ambiguous is taken as
/// jiff's "compatible" disambiguation (RFC 5545, Temporal): in a spring-forward gap (02:30 on
/// the day Berlin goes from 02:00 to 03:00) the window starts after the gap, as far from it as
/// the time was from the gap's start (03:30 CEST); in a fall-back fold (02:30 happens twice) it
/// starts at the first 02:30, and once that day, not twice.
fn weekly_open_in(
    tz: &jiff::tz::TimeZone,
    days: &[bool; 7],
    minute: u32,
    len_ms: i64,
    t_ms: i64,
) -> bool {
    let Ok(now) = jiff::Timestamp::from_millisecond(t_ms) else {
        return false;
    };
    let mut day = tz.to_datetime(now).date();
    let (hour, min) = ((minute / 60) as i8, (minute % 60) as i8);
    // A window that started on an earlier local day may still be open; one day more than
    // for a fixed offset covers a local day shortened or lengthened by DST.
    for _ in 0..=len_ms / DAY_MS + 2 {
        if days[day.weekday().to_monday_zero_offset() as usize] {
            let start = tz
                .to_ambiguous_timestamp(day.at(hour, min, 0, 0))
                .compatible();
            if let Ok(start) = start.map(jiff::Timestamp::as_millisecond)
                && start <= t_ms
                && t_ms < start.saturating_add(len_ms)
            {
                return true;
            }
        }
        match day.yesterday() {
            Ok(d) => day = d,
            Err(_) => break,
        }
    }
    false
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertsConfig {
    pub defaults: Policy,
    /// A target is down (degraded) when at least this many of the locations that count see it
    /// so; 1 (the default): any one, which is the only one for agents without a location.
    pub quorum: u32,
    pub channels: Vec<Channel>,
    pub overrides: Vec<Override>,
    pub maintenance: Vec<Window>,
}

impl AlertsConfig {
    /// The settings of `target` (with `tags`): tag overrides in file order, then the target's
    /// own, so the most specific one wins.
    pub fn policy(&self, target: &str, tags: &[String]) -> Policy {
        let mut p = self.defaults.clone();
        let tag_first = self
            .overrides
            .iter()
            .filter(|o| matches!(&o.selector, Selector::Tag(t) if tags.contains(t)))
            .chain(
                self.overrides
                    .iter()
                    .filter(|o| matches!(&o.selector, Selector::Target(t) if t == target)),
            );
        for o in tag_first {
            if let Some(v) = o.failure_threshold {
                p.failure_threshold = v;
            }
            if let Some(v) = o.success_threshold {
                p.success_threshold = v;
            }
            if let Some(v) = o.remind_every {
                p.remind_every = v;
            }
            if let Some(v) = o.send_resolved {
                p.send_resolved = v;
            }
            if let Some(v) = o.latency_budget {
                p.latency_budget = v;
            }
            if let Some(v) = &o.cert_expiry_days {
                p.cert_expiry_days = v.clone();
            }
            if let Some(v) = &o.depends_on {
                p.depends_on = Some(v.clone());
            }
        }
        p
    }

    /// Whether a maintenance window covering `target` is open at `t_ms`.
    pub fn in_maintenance(&self, target: &str, tags: &[String], t_ms: i64) -> bool {
        self.maintenance
            .iter()
            .any(|w| w.applies_to(target, tags) && w.is_open(t_ms))
    }
}

/// Validates `[alerts]`; the error is the message after the file name.
pub fn validate(raw: &RawAlerts, cx: &Ctx) -> Result<AlertsConfig, String> {
    let ctx = "alerts: ";
    let defaults = Policy {
        failure_threshold: threshold(ctx, "failure_threshold", raw.failure_threshold)?
            .unwrap_or(DEFAULT_FAILURE_THRESHOLD),
        success_threshold: threshold(ctx, "success_threshold", raw.success_threshold)?
            .unwrap_or(DEFAULT_SUCCESS_THRESHOLD),
        remind_every: optional_duration(ctx, "remind_every", raw.remind_every.as_deref())?
            .flatten(),
        send_resolved: raw.send_resolved.unwrap_or(true),
        latency_budget: optional_duration(ctx, "latency_budget", raw.latency_budget.as_deref())?
            .flatten(),
        cert_expiry_days: levels(ctx, raw.cert_expiry_days.as_deref())?.unwrap_or_default(),
        depends_on: None,
    };
    let mut channels: Vec<Channel> = Vec::new();
    for (i, c) in raw.channels.iter().enumerate() {
        let ch = channel(i, c, cx)?;
        if channels.iter().any(|o| o.name == ch.name) {
            return Err(format!("alerts.channel {:?}: duplicate name", ch.name));
        }
        channels.push(ch);
    }
    let overrides = (raw.overrides.iter().enumerate())
        .map(|(i, o)| override_(i, o))
        .collect::<Result<Vec<_>, _>>()?;
    let maintenance = (raw.maintenance.iter().enumerate())
        .map(|(i, m)| window(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AlertsConfig {
        defaults,
        quorum: threshold(ctx, "quorum", raw.quorum)?.unwrap_or(1),
        channels,
        overrides,
        maintenance,
    })
}

fn threshold(ctx: &str, field: &str, v: Option<u32>) -> Result<Option<u32>, String> {
    match v {
        Some(n) if !(1..=MAX_THRESHOLD).contains(&n) => {
            Err(format!("{ctx}{field} {n}: expected 1 to {MAX_THRESHOLD}"))
        }
        other => Ok(other),
    }
}

/// `None`: not set; `Some(None)`: "off".
fn optional_duration(
    ctx: &str,
    field: &str,
    v: Option<&str>,
) -> Result<Option<Option<Duration>>, String> {
    match v {
        None => Ok(None),
        Some("off") => Ok(Some(None)),
        Some(text) => match parse_duration(text) {
            Some(d) if !d.is_zero() => Ok(Some(Some(d))),
            _ => Err(format!(
                "{ctx}{field} {text:?}: expected a duration like \"30s\", or \"off\""
            )),
        },
    }
}

fn levels(ctx: &str, v: Option<&[u32]>) -> Result<Option<Vec<u32>>, String> {
    let Some(v) = v else { return Ok(None) };
    let mut sorted = v.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    if sorted.len() != v.len() || sorted.as_slice() != v || v.iter().any(|&d| d == 0 || d > 3650) {
        return Err(format!(
            "{ctx}cert_expiry_days {v:?}: expected distinct days from 3650 down to 1, highest first"
        ));
    }
    Ok(Some(sorted))
}

fn secret(
    ctx: &str,
    what: &str,
    env_name: Option<&String>,
    file: Option<&String>,
    cx: &Ctx,
) -> Result<Option<SecretValue>, String> {
    match (env_name, file) {
        (Some(_), Some(_)) => Err(format!(
            "{ctx}{what}_env and {what}_file: give one, not both"
        )),
        (Some(var), None) => match (cx.env)(var).filter(|v| !v.is_empty()) {
            Some(v) => Ok(Some(SecretValue {
                value: Secret(v),
                from: SecretFrom::Env(var.clone()),
            })),
            None => Err(format!("{ctx}{what}_env {var:?}: the variable is not set")),
        },
        (None, Some(f)) => {
            let path = (cx.path)(f);
            let v = (cx.read_secret)(&path).map_err(|e| format!("{ctx}{what}_file {f:?}: {e}"))?;
            if v.is_empty() {
                return Err(format!("{ctx}{what}_file {f:?}: the file is empty"));
            }
            Ok(Some(SecretValue {
                value: Secret(v),
                from: SecretFrom::File(path),
            }))
        }
        (None, None) => Ok(None),
    }
}

fn channel(index: usize, raw: &RawChannel, cx: &Ctx) -> Result<Channel, String> {
    let name = match &raw.name {
        Some(n) if !n.trim().is_empty() => n.clone(),
        _ => return Err(format!("alerts.channel #{}: name: missing", index + 1)),
    };
    let ctx = format!("alerts.channel {name:?}: ");
    let kind_text = raw
        .kind
        .as_deref()
        .ok_or_else(|| format!("{ctx}kind: missing (webhook, slack or pagerduty)"))?;
    let kind = ChannelKind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind_text)
        .ok_or_else(|| format!("{ctx}kind {kind_text:?}: expected webhook, slack or pagerduty"))?;
    let url = secret(&ctx, "url", raw.url_env.as_ref(), raw.url_file.as_ref(), cx)?;
    if let Some(u) = &url {
        // The URL is a secret (Slack's carries its token): the message never shows it.
        let ok = crate::util::UrlParts::parse(u.value.expose())
            .is_some_and(|p| p.scheme == "http" || p.scheme == "https");
        if !ok {
            return Err(format!(
                "{ctx}url: not an http:// or https:// URL (not shown)"
            ));
        }
    } else if kind != ChannelKind::PagerDuty {
        return Err(format!("{ctx}url_env or url_file: missing"));
    }
    let secret_v = secret(
        &ctx,
        "secret",
        raw.secret_env.as_ref(),
        raw.secret_file.as_ref(),
        cx,
    )?;
    if secret_v.is_some() && kind != ChannelKind::Webhook {
        return Err(format!(
            "{ctx}secret: only a webhook channel signs its body"
        ));
    }
    let routing_key = secret(
        &ctx,
        "routing_key",
        raw.routing_key_env.as_ref(),
        raw.routing_key_file.as_ref(),
        cx,
    )?;
    match (kind, &routing_key) {
        (ChannelKind::PagerDuty, None) => {
            return Err(format!("{ctx}routing_key_env or routing_key_file: missing"));
        }
        (ChannelKind::Webhook | ChannelKind::Slack, Some(_)) => {
            return Err(format!(
                "{ctx}routing_key: only a pagerduty channel has one"
            ));
        }
        _ => {}
    }
    let timeout = match &raw.timeout {
        None => DEFAULT_CHANNEL_TIMEOUT,
        Some(t) => match parse_duration(t) {
            Some(d) if !d.is_zero() && d <= Duration::from_secs(300) => d,
            _ => {
                return Err(format!(
                    "{ctx}timeout {t:?}: expected a duration from 1ms to 5m"
                ));
            }
        },
    };
    Ok(Channel {
        name,
        kind,
        url,
        secret: secret_v,
        routing_key,
        timeout,
    })
}

fn override_(index: usize, raw: &RawOverride) -> Result<Override, String> {
    let selector = match (&raw.target, &raw.tag) {
        (Some(t), None) if !t.is_empty() => Selector::Target(t.clone()),
        (None, Some(t)) if !t.is_empty() => Selector::Tag(t.clone()),
        _ => {
            return Err(format!(
                "alerts.override #{}: give exactly one of target or tag",
                index + 1
            ));
        }
    };
    let ctx = match &selector {
        Selector::Target(t) => format!("alerts.override target {t:?}: "),
        Selector::Tag(t) => format!("alerts.override tag {t:?}: "),
    };
    if let (Selector::Target(t), Some(d)) = (&selector, &raw.depends_on)
        && t == d
    {
        return Err(format!(
            "{ctx}depends_on {d:?}: a target cannot depend on itself"
        ));
    }
    Ok(Override {
        failure_threshold: threshold(&ctx, "failure_threshold", raw.failure_threshold)?,
        success_threshold: threshold(&ctx, "success_threshold", raw.success_threshold)?,
        remind_every: optional_duration(&ctx, "remind_every", raw.remind_every.as_deref())?,
        send_resolved: raw.send_resolved,
        latency_budget: optional_duration(&ctx, "latency_budget", raw.latency_budget.as_deref())?,
        cert_expiry_days: levels(&ctx, raw.cert_expiry_days.as_deref())?,
        depends_on: raw.depends_on.clone().filter(|d| !d.is_empty()),
        selector,
    })
}

fn deserialize_zone<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Zone>, D::Error> {
    let text = String::deserialize(d)?;
    let zone = parse_zone("alerts.maintenance: ", &text, jiff::tz::db());
    zone.map(Some).map_err(serde::de::Error::custom)
}

/// `"UTC"`, `"Z"`, a fixed offset `"+02:00"`, or a tz database name (`"Europe/Berlin"`) looked
/// up in `db`. Never a silent UTC: an unknown name, or no database at all (no tzdata
/// installed), is an error that says so.
fn parse_zone(ctx: &str, zone: &str, db: &jiff::tz::TimeZoneDatabase) -> Result<Zone, String> {
    if zone == "UTC" || zone == "Z" {
        return Ok(Zone::Fixed(0));
    }
    if zone.starts_with(['+', '-']) {
        return zone_offset(ctx, zone).map(Zone::Fixed);
    }
    // `available()` also sees a directory that exists but holds no zones (TZDIR set wrong).
    if db.is_definitively_empty() || db.available().next().is_none() {
        return Err(format!(
            "{ctx}zone {zone:?}: no time zone database found (install tzdata: \
             /usr/share/zoneinfo, or set TZDIR); or use \"UTC\" or a fixed offset like \"+01:00\""
        ));
    }
    match db.get(zone) {
        // jiff answers "Etc/Unknown" without the database: it is UTC under another name.
        Ok(tz) if !tz.is_unknown() => Ok(Zone::Named {
            name: tz.iana_name().unwrap_or(zone).to_string(),
            tz,
        }),
        _ => Err(format!(
            "{ctx}zone {zone:?}: not a time zone of the tz database (like \"Europe/Berlin\"); \
             or use \"UTC\" or a fixed offset like \"+01:00\""
        )),
    }
}

/// A fixed offset `"+02:00"` → minutes east of UTC.
fn zone_offset(ctx: &str, zone: &str) -> Result<i32, String> {
    let bad = || format!("{ctx}zone {zone:?}: expected a fixed offset like \"+02:00\"");
    let (sign, rest) = match zone.as_bytes().first() {
        Some(b'+') => (1, &zone[1..]),
        Some(b'-') => (-1, &zone[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if rest.len() != 5 || h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m))
}

fn format_zone(zone: &Zone) -> String {
    let offset = match zone {
        Zone::Named { name, .. } => return name.clone(),
        &Zone::Fixed(offset) => offset,
    };
    if offset == 0 {
        return "UTC".into();
    }
    let sign = if offset < 0 { '-' } else { '+' };
    format!("{sign}{:02}:{:02}", offset.abs() / 60, offset.abs() % 60)
}

fn window(index: usize, raw: &RawMaintenance) -> Result<Window, String> {
    let ctx = format!("alerts.maintenance #{}: ", index + 1);
    let duration = match raw.duration.as_deref().map(|d| (d, parse_duration(d))) {
        Some((_, Some(d))) if d >= Duration::from_secs(60) => d,
        Some((text, _)) => {
            return Err(format!(
                "{ctx}duration {text:?}: expected a duration of at least 1m"
            ));
        }
        None => return Err(format!("{ctx}duration: missing")),
    };
    let when = match (&raw.start, &raw.days) {
        (Some(start), None) => {
            if raw.time.is_some() || raw.zone.is_some() {
                return Err(format!("{ctx}time and zone go with days, not with start"));
            }
            let start_ms = parse_rfc3339_ms(start)
                .ok_or_else(|| format!("{ctx}start {start:?}: expected an RFC 3339 time"))?;
            When::Once { start_ms }
        }
        (None, Some(names)) => {
            let mut days = [false; 7];
            for n in names {
                let i = DAYS
                    .iter()
                    .position(|d| d.eq_ignore_ascii_case(n))
                    .ok_or_else(|| format!("{ctx}days: {n:?}: expected mon, tue, ..., sun"))?;
                days[i] = true;
            }
            if names.is_empty() {
                return Err(format!("{ctx}days: list at least one day"));
            }
            let time = raw.time.as_deref().unwrap_or("00:00");
            let minute = time
                .split_once(':')
                .filter(|(h, m)| h.len() == 2 && m.len() == 2)
                .and_then(|(h, m)| Some((h.parse::<u32>().ok()?, m.parse::<u32>().ok()?)))
                .filter(|&(h, m)| h < 24 && m < 60)
                .map(|(h, m)| h * 60 + m)
                .ok_or_else(|| format!("{ctx}time {time:?}: expected HH:MM"))?;
            When::Weekly {
                days,
                minute,
                zone: raw.zone.clone().unwrap_or(Zone::Fixed(0)),
            }
        }
        _ => {
            return Err(format!(
                "{ctx}give start (one-off) or days (weekly), exactly one"
            ));
        }
    };
    Ok(Window {
        targets: raw.targets.clone(),
        tags: raw.tags.clone(),
        when,
        duration,
    })
}

// ---------------------------------------------------------------------------------------------
// The effective config.

/// `value` must already be a TOML string literal (see `config::toml_string`).
type Quote<'a> = &'a dyn Fn(&str) -> String;

fn list(items: &[String], q: Quote) -> String {
    let items: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", items.join(", "))
}

fn off_or(d: Option<Duration>) -> String {
    d.map(format_duration).unwrap_or_else(|| "off".into())
}

fn days_list(v: &[u32]) -> String {
    let items: Vec<String> = v.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// `[alerts]` as TOML (appended to `out`); secrets as where they come from
/// (`url_env`/`url_file`), which parses back to the same values.
pub fn write_toml(a: &AlertsConfig, out: &mut String, q: Quote) {
    a.write_toml(out, q)
}

impl AlertsConfig {
    fn write_toml(&self, out: &mut String, q: Quote) {
        let p = &self.defaults;
        let _ = writeln!(out, "\n[alerts]");
        let _ = writeln!(out, "failure_threshold = {}", p.failure_threshold);
        let _ = writeln!(out, "success_threshold = {}", p.success_threshold);
        let _ = writeln!(out, "remind_every = {}", q(&off_or(p.remind_every)));
        let _ = writeln!(out, "send_resolved = {}", p.send_resolved);
        let _ = writeln!(out, "latency_budget = {}", q(&off_or(p.latency_budget)));
        let _ = writeln!(out, "cert_expiry_days = {}", days_list(&p.cert_expiry_days));
        let _ = writeln!(out, "quorum = {}", self.quorum);
        for c in &self.channels {
            let _ = writeln!(out, "\n[[alerts.channel]]");
            let _ = writeln!(out, "name = {}", q(&c.name));
            let _ = writeln!(out, "kind = {}", q(c.kind.as_str()));
            for (what, v) in [
                ("url", &c.url),
                ("secret", &c.secret),
                ("routing_key", &c.routing_key),
            ] {
                match v.as_ref().map(|s| &s.from) {
                    Some(SecretFrom::Env(var)) => {
                        let _ = writeln!(out, "{what}_env = {}", q(var));
                    }
                    Some(SecretFrom::File(path)) => {
                        let _ = writeln!(out, "{what}_file = {}", q(&path.display().to_string()));
                    }
                    None => {}
                }
            }
            let _ = writeln!(out, "timeout = {}", q(&format_duration(c.timeout)));
        }
        for o in &self.overrides {
            let _ = writeln!(out, "\n[[alerts.override]]");
            match &o.selector {
                Selector::Target(t) => _ = writeln!(out, "target = {}", q(t)),
                Selector::Tag(t) => _ = writeln!(out, "tag = {}", q(t)),
            }
            if let Some(v) = o.failure_threshold {
                let _ = writeln!(out, "failure_threshold = {v}");
            }
            if let Some(v) = o.success_threshold {
                let _ = writeln!(out, "success_threshold = {v}");
            }
            if let Some(v) = o.remind_every {
                let _ = writeln!(out, "remind_every = {}", q(&off_or(v)));
            }
            if let Some(v) = o.send_resolved {
                let _ = writeln!(out, "send_resolved = {v}");
            }
            if let Some(v) = o.latency_budget {
                let _ = writeln!(out, "latency_budget = {}", q(&off_or(v)));
            }
            if let Some(v) = &o.cert_expiry_days {
                let _ = writeln!(out, "cert_expiry_days = {}", days_list(v));
            }
            if let Some(v) = &o.depends_on {
                let _ = writeln!(out, "depends_on = {}", q(v));
            }
        }
        for w in &self.maintenance {
            let _ = writeln!(out, "\n[[alerts.maintenance]]");
            let _ = writeln!(out, "targets = {}", list(&w.targets, q));
            let _ = writeln!(out, "tags = {}", list(&w.tags, q));
            match &w.when {
                &When::Once { start_ms } => {
                    let _ = writeln!(out, "start = {}", q(&format_rfc3339_ms(start_ms)));
                }
                When::Weekly { days, minute, zone } => {
                    let names: Vec<String> = (0..7)
                        .filter(|&i| days[i])
                        .map(|i| DAYS[i].to_string())
                        .collect();
                    let _ = writeln!(out, "days = {}", list(&names, q));
                    let time = format!("{:02}:{:02}", minute / 60, minute % 60);
                    let _ = writeln!(out, "time = {}", q(&time));
                    let _ = writeln!(out, "zone = {}", q(&format_zone(zone)));
                }
            }
            let _ = writeln!(out, "duration = {}", q(&format_duration(w.duration)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weekly(days: &[usize], minute: u32, zone: Zone, hours: u64) -> Window {
        let mut d = [false; 7];
        for &i in days {
            d[i] = true;
        }
        Window {
            targets: vec![],
            tags: vec![],
            when: When::Weekly {
                days: d,
                minute,
                zone,
            },
            duration: Duration::from_secs(hours * 3600),
        }
    }

    fn at(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    /// From the system tz database (tzdata; `scripts/setup` installs it).
    fn berlin() -> Zone {
        parse_zone("", "Europe/Berlin", jiff::tz::db()).expect("tzdata installed")
    }

    #[test]
    fn weekly_windows_open_on_their_days_in_their_zone() {
        // 2026-11-29 is a Sunday (index 6).
        let w = weekly(&[6], 2 * 60, Zone::Fixed(0), 1);
        assert!(!w.is_open(at("2026-11-29T01:59:59Z")));
        assert!(w.is_open(at("2026-11-29T02:00:00Z")));
        assert!(!w.is_open(at("2026-11-29T03:00:00Z")));
        assert!(!w.is_open(at("2026-11-30T02:30:00Z")), "Monday");
        // 02:00 at +02:00 is 00:00 UTC.
        let w = weekly(&[6], 2 * 60, Zone::Fixed(120), 1);
        assert!(w.is_open(at("2026-11-29T00:30:00Z")));
        assert!(!w.is_open(at("2026-11-29T02:30:00Z")));
        // Saturday 23:00 for 2h reaches into Sunday.
        let w = weekly(&[5], 23 * 60, Zone::Fixed(0), 2);
        assert!(w.is_open(at("2026-11-29T00:30:00Z")));
        assert!(!w.is_open(at("2026-11-29T01:00:00Z")));
    }

    #[test]
    fn named_zones_follow_daylight_saving_time() {
        // Sunday 02:00 in Berlin: 01:00 UTC in winter (CET), 00:00 UTC in summer (CEST).
        let w = weekly(&[6], 2 * 60, berlin(), 1);
        assert!(!w.is_open(at("2026-11-29T00:59:59Z")));
        assert!(w.is_open(at("2026-11-29T01:00:00Z")));
        assert!(!w.is_open(at("2026-11-29T02:00:00Z")));
        assert!(w.is_open(at("2026-07-05T00:00:00Z")));
        assert!(!w.is_open(at("2026-07-05T01:00:00Z")));
        // Saturday 23:00 for 5 h on the night clocks go forward: 5 real hours, to 05:00 CEST.
        let w = weekly(&[5], 23 * 60, berlin(), 5);
        assert!(!w.is_open(at("2026-03-28T21:59:59Z")));
        assert!(w.is_open(at("2026-03-28T22:00:00Z")));
        assert!(w.is_open(at("2026-03-29T02:59:59Z")));
        assert!(!w.is_open(at("2026-03-29T03:00:00Z")));
    }

    /// 2026-03-29: Berlin goes from 02:00 CET straight to 03:00 CEST, so 02:30 does not exist.
    /// The window starts after the gap, at 03:30 CEST (01:30 UTC), and still lasts its hour.
    #[test]
    fn a_window_in_the_spring_forward_gap_starts_after_it() {
        let w = weekly(&[6], 2 * 60 + 30, berlin(), 1);
        assert!(!w.is_open(at("2026-03-29T00:30:00Z")), "not at 02:30 CET");
        assert!(!w.is_open(at("2026-03-29T01:29:59Z")));
        assert!(w.is_open(at("2026-03-29T01:30:00Z")));
        assert!(w.is_open(at("2026-03-29T02:29:59Z")));
        assert!(!w.is_open(at("2026-03-29T02:30:00Z")));
        // The Sundays around it are ordinary: 02:30 CET, then 02:30 CEST.
        assert!(w.is_open(at("2026-03-22T01:30:00Z")));
        assert!(w.is_open(at("2026-04-05T00:30:00Z")));
    }

    /// 2026-10-25: Berlin goes back from 03:00 CEST to 02:00 CET, so 02:30 happens twice
    /// (00:30 and 01:30 UTC). The window opens at the first and does not open again.
    #[test]
    fn a_window_in_the_fall_back_fold_opens_once_at_the_first() {
        let w = weekly(&[6], 2 * 60 + 30, berlin(), 1);
        assert!(!w.is_open(at("2026-10-25T00:29:59Z")));
        assert!(w.is_open(at("2026-10-25T00:30:00Z")));
        assert!(w.is_open(at("2026-10-25T01:29:59Z")));
        assert!(
            !w.is_open(at("2026-10-25T01:30:00Z")),
            "not again at 02:30 CET"
        );
        assert!(!w.is_open(at("2026-10-25T02:00:00Z")));
    }

    #[test]
    fn zones_are_utc_fixed_offsets_or_tz_database_names() {
        let db = jiff::tz::db();
        assert_eq!(parse_zone("", "UTC", db), Ok(Zone::Fixed(0)));
        assert_eq!(parse_zone("", "+02:00", db), Ok(Zone::Fixed(120)));
        assert_eq!(parse_zone("", "-05:30", db), Ok(Zone::Fixed(-330)));
        assert_eq!(format_zone(&Zone::Fixed(-330)), "-05:30");
        assert_eq!(format_zone(&Zone::Fixed(0)), "UTC");
        let z = parse_zone("", "europe/berlin", db).unwrap();
        assert_eq!(format_zone(&z), "Europe/Berlin", "the database's spelling");
        assert_eq!(z, berlin());
        for bad in ["Europe/Berln", "Etc/Unknown", "Berlin", ""] {
            let e = parse_zone("x: ", bad, db).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "x: zone {bad:?}: not a time zone of the tz database"
                )),
                "{e}"
            );
        }
        let e = parse_zone("x: ", "+2", db).unwrap_err();
        assert!(e.contains("expected a fixed offset like \"+02:00\""), "{e}");
    }

    /// No tzdata (or TZDIR naming an empty directory): a named zone is an error saying so,
    /// never UTC; UTC and fixed offsets still work.
    #[test]
    fn a_missing_tz_database_is_an_error_not_utc() {
        let none = jiff::tz::TimeZoneDatabase::none();
        let dir =
            std::env::temp_dir().join(format!("sitewatch-tz-{}", crate::util::new_check_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = jiff::tz::TimeZoneDatabase::from_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        for db in [Some(&none), empty.as_ref().ok()].into_iter().flatten() {
            let e = parse_zone("x: ", "Europe/Berlin", db).unwrap_err();
            assert!(
                e.contains("no time zone database found (install tzdata"),
                "{e}"
            );
            assert_eq!(parse_zone("", "+01:00", db), Ok(Zone::Fixed(60)));
            assert_eq!(parse_zone("", "UTC", db), Ok(Zone::Fixed(0)));
        }
    }

    /// `check-config` prints the zone's name, which parses back to the same window.
    #[test]
    fn named_zones_round_trip_through_the_effective_config() {
        let text = "[[alerts.maintenance]]\ndays = [\"sun\"]\ntime = \"02:30\"\n\
                    zone = \"Europe/Berlin\"\nduration = \"1h\"\n";
        let cfg = parse(text, &|_| None).unwrap();
        let printed = cfg.effective();
        assert!(printed.contains("zone = \"Europe/Berlin\""), "{printed}");
        let again = parse(&printed, &|_| None).unwrap();
        assert_eq!(again.alerts, cfg.alerts);
        let w = &cfg.alerts.unwrap().maintenance[0];
        assert!(w.is_open(at("2026-11-29T01:45:00Z")), "02:45 CET");
    }

    #[test]
    fn overrides_by_tag_then_by_target() {
        let cfg = AlertsConfig {
            defaults: Policy {
                failure_threshold: 3,
                success_threshold: 2,
                remind_every: None,
                send_resolved: true,
                latency_budget: None,
                cert_expiry_days: vec![21, 14, 7],
                depends_on: None,
            },
            quorum: 1,
            channels: vec![],
            overrides: vec![
                Override {
                    selector: Selector::Target("a".into()),
                    failure_threshold: Some(5),
                    success_threshold: None,
                    remind_every: None,
                    send_resolved: None,
                    latency_budget: None,
                    cert_expiry_days: None,
                    depends_on: Some("router".into()),
                },
                Override {
                    selector: Selector::Tag("eu".into()),
                    failure_threshold: Some(1),
                    success_threshold: Some(4),
                    remind_every: Some(Some(Duration::from_secs(60))),
                    send_resolved: None,
                    latency_budget: None,
                    cert_expiry_days: None,
                    depends_on: None,
                },
            ],
            maintenance: vec![],
        };
        let p = cfg.policy("a", &["eu".into()]);
        assert_eq!(p.failure_threshold, 5, "the target's own override wins");
        assert_eq!(p.success_threshold, 4);
        assert_eq!(p.depends_on.as_deref(), Some("router"));
        assert_eq!(cfg.policy("b", &[]).failure_threshold, 3);
    }

    fn parse(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<crate::config::Config, String> {
        crate::config::Config::parse(text, std::path::Path::new("agent.toml"), env)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn channel_secrets_come_from_the_environment_and_are_never_printed() {
        let env = |k: &str| match k {
            "SLACK_URL" => Some("http://127.0.0.1:9/services/T/B/slack-env-secret".to_string()),
            "PD_KEY" => Some("pd-env-secret".to_string()),
            _ => None,
        };
        let text = "[alerts]\n\
            [[alerts.channel]]\nname = \"s\"\nkind = \"slack\"\nurl_env = \"SLACK_URL\"\n\
            [[alerts.channel]]\nname = \"p\"\nkind = \"pagerduty\"\nrouting_key_env = \"PD_KEY\"\n";
        let cfg = parse(text, &env).unwrap();
        let printed = cfg.effective();
        assert!(!printed.contains("env-secret"), "{printed}");
        assert!(printed.contains("url_env = \"SLACK_URL\""), "{printed}");
        assert!(!format!("{cfg:?}").contains("env-secret"));
        let again = parse(&printed, &env).unwrap();
        assert_eq!(again.alerts, cfg.alerts);
        let a = cfg.alerts.unwrap();
        assert_eq!(a.channels[1].url(), PAGERDUTY_EVENTS_URL);
        assert_eq!(a.defaults.failure_threshold, 3);
        assert_eq!(a.defaults.success_threshold, 2);
        assert!(a.defaults.send_resolved);
        assert_eq!(a.defaults.remind_every, None);
    }

    #[test]
    fn alert_errors_name_the_table_and_field_never_the_secret() {
        let env = |k: &str| (k == "BAD").then(|| "ftp://secret-host/x".to_string());
        let check = |text: &str, want: &str| {
            let e = parse(text, &env).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(!e.contains("secret-host"), "{e}");
        };
        let ch = |rest: &str| format!("[[alerts.channel]]\nname = \"c\"\n{rest}");
        check(
            "[alerts]\nfailure_threshold = 0\n",
            "agent.toml: alerts: failure_threshold 0: expected 1 to 1000",
        );
        check(
            "[alerts]\nremind_every = \"soon\"\n",
            "alerts: remind_every \"soon\"",
        );
        check(
            "[alerts]\ncert_expiry_days = [7, 14]\n",
            "alerts: cert_expiry_days [7, 14]",
        );
        check(
            &ch("kind = \"sms\"\n"),
            "alerts.channel \"c\": kind \"sms\"",
        );
        check(
            &ch("kind = \"slack\"\n"),
            "alerts.channel \"c\": url_env or url_file: missing",
        );
        check(
            &ch("kind = \"slack\"\nurl_env = \"BAD\"\n"),
            "url: not an http:// or https:// URL (not shown)",
        );
        check(
            &ch("kind = \"slack\"\nurl_env = \"UNSET\"\n"),
            "url_env \"UNSET\": the variable is not set",
        );
        check(
            &ch("kind = \"pagerduty\"\n"),
            "routing_key_env or routing_key_file: missing",
        );
        check(
            "[[alerts.override]]\nlatency_budget = \"1s\"\n",
            "alerts.override #1: give exactly one of target or tag",
        );
        check(
            "[[alerts.override]]\ntarget = \"a\"\ndepends_on = \"a\"\n",
            "cannot depend on itself",
        );
        check(
            "[[alerts.maintenance]]\nduration = \"1h\"\n",
            "alerts.maintenance #1: give start",
        );
        check(
            "[[alerts.maintenance]]\ndays = [\"sun\"]\nzone = \"Europe/Berln\"\nduration = \"1h\"\n",
            "agent.toml: line 3, column 8: alerts.maintenance: zone \"Europe/Berln\": \
             not a time zone of the tz database",
        );
        check(
            "[[alerts.maintenance]]\ndays = [\"sun\"]\ntime = \"25:00\"\nduration = \"1h\"\n",
            "time \"25:00\": expected HH:MM",
        );
    }

    /// The README's example is a working config (its files and variables provided).
    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("```toml\n[alerts]").expect("the example") + 8;
        let len = readme[start..].find("```").unwrap();
        let dir =
            std::env::temp_dir().join(format!("sitewatch-alerts-{}", crate::util::new_check_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("pagerduty-key");
        std::fs::write(&key, "k").unwrap();
        let text = readme[start..start + len]
            .replace("/etc/sitewatch/pagerduty-key", key.to_str().unwrap());
        let vars = [
            "SITEWATCH_SLACK_URL",
            "SITEWATCH_AUDIT_HOOK",
            "SITEWATCH_AUDIT_SECRET",
        ];
        let env = |k: &str| {
            vars.contains(&k)
                .then(|| "http://127.0.0.1:9/x".to_string())
        };
        let cfg = parse(&text, &env);
        let _ = std::fs::remove_dir_all(&dir);
        let a = cfg.unwrap().alerts.unwrap();
        assert_eq!(a.channels.len(), 3);
        assert_eq!(a.maintenance.len(), 2);
        assert_eq!(
            a.policy("x", &["shop".into()]).depends_on.as_deref(),
            Some("router")
        );
    }
}
