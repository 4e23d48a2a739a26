//! The notifier: one `alerts-<channel>` thread per channel delivers that channel's pending
//! outbox rows in event order, at least once, with backoff. See the module docs of `alerts`
//! for the guarantees.
//!
//! A channel's URL, secret and routing key never appear in a log line, an error or the
//! status: errors say what failed with the URL replaced by the channel's name.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::ChannelStatus;
use super::config::{AlertsConfig, Channel, ChannelKind};
use super::payload::{self, Event, IDEMPOTENCY_HEADER, SIGNATURE_HEADER};
use crate::backoff::Backoff;
use crate::config::PostgresConfig;
use crate::service::{Health, Heartbeat, Shutdown};
use crate::sink::{SinkError, db};
use crate::util::format_rfc3339_ms;

/// Retry delays of one channel after a failed delivery.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long a thread waits for a NOTIFY before it looks again (also its reaction to stop).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// A lease outlives the request's timeout by this much before another try may start.
const LEASE_SLACK: Duration = Duration::from_secs(5);

/// Most deliveries one claim takes: a lease, its marks and its release are one statement each
/// per batch rather than per event.
const BATCH: i64 = 64;

/// Leases the channel's first pending deliveries (up to `$3`), in event order, as far as they
/// are due and not leased: the claim stops at the first that is not, so a later event never
/// overtakes one that waits for its retry or is another notifier's. With their events, in
/// order.
const CLAIM: &str = "WITH head AS ( \
       SELECT event_id, next_attempt <= now() AND (lease_until IS NULL OR lease_until < now()) \
              AS ready \
       FROM alert_deliveries WHERE channel = $1 AND state = 'pending' \
       ORDER BY event_id LIMIT $3 FOR UPDATE), \
     blocked AS (SELECT min(event_id) AS at FROM head WHERE NOT ready), \
     claimed AS ( \
       UPDATE alert_deliveries d \
       SET lease_until = now() + ($2::float8 * interval '1 millisecond'), attempts = d.attempts + 1 \
       FROM head, blocked WHERE d.event_id = head.event_id AND d.channel = $1 AND head.ready \
         AND (blocked.at IS NULL OR head.event_id < blocked.at) \
       RETURNING d.event_id) \
     SELECT e.id, e.key, e.target, e.url, e.kind, e.state, e.previous, e.reason, e.incident, \
            e.check_id, e.at \
     FROM alert_events e JOIN claimed c ON c.event_id = e.id ORDER BY e.id";

/// Marks the events of `$1` delivered, each with its status from `$3`.
const DELIVERED: &str = "UPDATE alert_deliveries d SET state = 'delivered', delivered_at = now(), \
     lease_until = NULL, last_status = u.status, last_error = NULL \
     FROM unnest($1::int8[], $3::int4[]) AS u(id, status) \
     WHERE d.event_id = u.id AND d.channel = $2";

/// Gives back claimed deliveries that were not tried (the batch stopped before them).
const RELEASE: &str = "UPDATE alert_deliveries SET lease_until = NULL, attempts = attempts - 1 \
     WHERE event_id = ANY($1) AND channel = $2 AND state = 'pending'";

const FAILED: &str = "UPDATE alert_deliveries SET state = 'failed', lease_until = NULL, \
     last_status = $3, last_error = $4 WHERE event_id = $1 AND channel = $2";

const RETRY: &str = "UPDATE alert_deliveries SET lease_until = NULL, last_status = $3, \
     last_error = $4, next_attempt = now() + ($5::float8 * interval '1 millisecond') \
     WHERE event_id = $1 AND channel = $2";

/// What a delivery to a channel that is no longer configured says in `last_error`.
pub const ABANDONED_REASON: &str = "channel no longer configured";

/// Ends the pending deliveries of channels the config no longer has: nobody would ever send
/// them, and pending for ever they would keep their events from retention and show as work
/// still to do. Per channel, how many.
const ABANDON: &str = "WITH gone AS ( \
       UPDATE alert_deliveries SET state = 'abandoned', lease_until = NULL, last_error = $2 \
       WHERE state = 'pending' AND NOT (channel = ANY($1)) RETURNING channel) \
     SELECT channel, count(*) FROM gone GROUP BY channel ORDER BY channel";

/// Marks the pending deliveries of every channel not in `cfg` as `abandoned` (with
/// [`ABANDONED_REASON`]) and logs how many per channel. Run by the sink once at start, when
/// the database first answers (see `sink::consume`).
pub fn abandon_removed_channels(
    c: &mut Client,
    cfg: &AlertsConfig,
) -> Result<Vec<(String, i64)>, SinkError> {
    let names: Vec<&str> = cfg.channels.iter().map(|ch| ch.name.as_str()).collect();
    let gone: Vec<(String, i64)> = (c.query(ABANDON, &[&names, &ABANDONED_REASON])?.iter())
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (channel, n) in &gone {
        let what = if *n == 1 { "delivery" } else { "deliveries" };
        // A channel's name is not a secret; its URL and keys are gone with its config.
        log::warn!(target: "sitewatch::alerts",
            "alert channel {channel:?} is no longer configured: {n} pending {what} abandoned");
    }
    Ok(gone)
}

/// Why one delivery failed.
#[derive(Debug)]
pub enum DeliveryError {
    /// No answer: connection, TLS, timeout. `message` has the URL replaced.
    Transport {
        message: String,
        source: ureq::Error,
    },
    /// An answer that is not 2xx. `permanent`: see [`is_permanent`].
    Status {
        status: u16,
        body: String,
        permanent: bool,
    },
}

impl DeliveryError {
    fn status(&self) -> Option<i32> {
        match self {
            DeliveryError::Status { status, .. } => Some(i32::from(*status)),
            DeliveryError::Transport { .. } => None,
        }
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::Transport { message, .. } => write!(f, "no answer: {message}"),
            DeliveryError::Status { status, body, .. } if body.is_empty() => {
                write!(f, "HTTP {status}")
            }
            DeliveryError::Status { status, body, .. } => write!(f, "HTTP {status}: {body}"),
        }
    }
}

impl std::error::Error for DeliveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DeliveryError::Transport { source, .. } => Some(source),
            DeliveryError::Status { .. } => None,
        }
    }
}

/// The running notifier threads.
pub struct Notifier {
    threads: Vec<JoinHandle<()>>,
    status: Arc<Mutex<BTreeMap<String, ChannelStatus>>>,
}

impl Notifier {
    /// Starts one thread per channel, each registered with `health` (the watchdog sees a
    /// stuck one); they stop when `shutdown` is triggered.
    pub fn start(
        cfg: &AlertsConfig,
        pg: &PostgresConfig,
        shutdown: &Shutdown,
        health: &Health,
    ) -> Result<Notifier, SinkError> {
        let status: Arc<Mutex<BTreeMap<String, ChannelStatus>>> = Arc::default();
        let mut threads = Vec::new();
        for ch in &cfg.channels {
            let w = ChannelWorker {
                agent: agent(ch),
                channel: ch.clone(),
                pg: pg.clone(),
                shutdown: shutdown.clone(),
                status: status.clone(),
                backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
                hb: health.register(&format!("alerts-{}", ch.name)),
            };
            lock(&status).insert(ch.name.clone(), ChannelStatus::default());
            let t = std::thread::Builder::new()
                .name(format!("alerts-{}", ch.name))
                .spawn(move || w.run())
                .map_err(|source| SinkError::Thread { source })?;
            threads.push(t);
        }
        Ok(Notifier { threads, status })
    }

    pub fn status(&self) -> BTreeMap<String, ChannelStatus> {
        lock(&self.status).clone()
    }

    /// Waits for the threads (after the shutdown they were started with).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn agent(ch: &Channel) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(ch.timeout))
        .user_agent(concat!("sitewatch/", env!("CARGO_PKG_VERSION")))
        // Alerts go where the config says, not through a proxy from the environment.
        .proxy(None)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::NativeTls)
                .build(),
        )
        .build()
        .into()
}

struct ChannelWorker {
    agent: ureq::Agent,
    channel: Channel,
    pg: PostgresConfig,
    shutdown: Shutdown,
    status: Arc<Mutex<BTreeMap<String, ChannelStatus>>>,
    backoff: Backoff,
    hb: Heartbeat,
}

impl ChannelWorker {
    fn run(mut self) {
        let name = self.channel.name.clone();
        let mut client: Option<Client> = None;
        let mut db_backoff = Backoff::new(RETRY_MIN, Duration::from_secs(10));
        while !self.shutdown.is_triggered() {
            // Every pass is bounded: statements, the NOTIFY wait, one request (see `pass`).
            self.hb.beat();
            let c = match client.as_mut() {
                Some(c) => c,
                None => match self.connect() {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        log::warn!(target: "sitewatch::alerts", "channel {name}: {e}; retrying");
                        self.shutdown.sleep(db_backoff.next_delay());
                        continue;
                    }
                },
            };
            match self.pass(c) {
                Ok(true) => db_backoff.reset(),
                Ok(false) => {
                    db_backoff.reset();
                    // Woken by the writer's NOTIFY after a batch with events, or looks
                    // again soon (a retry that became due, a wake-up that was lost).
                    let _ = c.notifications().timeout_iter(IDLE_WAIT).next();
                }
                Err(e) => {
                    log::warn!(target: "sitewatch::alerts", "channel {name}: {e}; reconnecting");
                    client = None;
                    self.shutdown.sleep(db_backoff.next_delay());
                }
            }
        }
        self.hb.idle();
    }

    fn connect(&self) -> Result<Client, SinkError> {
        let mut c = db::connect(&self.pg, &format!("sitewatch alerts {}", self.channel.name))?;
        // The notifier's commits (a batch's lease, its marks) need not wait for the WAL
        // flush: a crash of PostgreSQL may lose the last few, which only sends those events
        // again, as at-least-once allows (same idempotency key). Waiting would put WAL flushes
        // in the queue of the sink's batch commits for the disk.
        c.batch_execute("SET synchronous_commit = off; LISTEN sitewatch_alerts")?;
        Ok(c)
    }

    /// Delivers the channel's next due events (a batch of at most [`BATCH`]), in order;
    /// `Ok(false)` when none was due. A retryable failure ends the batch: the events after it
    /// are released untried, so none overtakes it. An event is sent only while its lease still
    /// covers a whole request, so no other notifier can take it meanwhile.
    fn pass(&mut self, c: &mut Client) -> Result<bool, SinkError> {
        let lease = self.lease();
        let claimed_at = Instant::now();
        let rows = c.query(
            CLAIM,
            &[&self.channel.name, &(lease.as_millis() as f64), &BATCH],
        )?;
        if rows.is_empty() {
            return Ok(false);
        }
        let events: Vec<Event> = rows.iter().map(event).collect();
        let mut delivered: (Vec<i64>, Vec<i32>) = (Vec::new(), Vec::new());
        let mut tried = 0;
        for ev in &events {
            if claimed_at.elapsed() + self.channel.timeout > lease {
                break;
            }
            tried += 1;
            match self.deliver(c, ev)? {
                Outcome::Delivered(status) => {
                    delivered.0.push(ev.id);
                    delivered.1.push(status);
                }
                Outcome::Failed => {}
                Outcome::Retry => break,
            }
        }
        if !delivered.0.is_empty() {
            c.execute(DELIVERED, &[&delivered.0, &self.channel.name, &delivered.1])?;
        }
        if tried < events.len() {
            let rest: Vec<i64> = events[tried..].iter().map(|ev| ev.id).collect();
            c.execute(RELEASE, &[&rest, &self.channel.name])?;
        }
        Ok(true)
    }

    /// How long a claim leases its deliveries: the request's timeout and some slack.
    fn lease(&self) -> Duration {
        self.channel.timeout + LEASE_SLACK
    }

    /// Sends one event; a failure is written at once (`failed`, or pending with a backoff),
    /// a delivery is left for the batch's mark.
    fn deliver(&mut self, c: &mut Client, ev: &Event) -> Result<Outcome, SinkError> {
        let name = &self.channel.name;
        // A request may take the channel's timeout, longer than the default budget.
        self.hb.busy(self.lease());
        let e = match send(&self.agent, &self.channel, ev) {
            Ok(status) => {
                self.backoff.reset();
                let mut s = lock(&self.status);
                let st = s.entry(name.clone()).or_default();
                st.delivered += 1;
                st.failures = 0;
                st.last_error = None;
                return Ok(Outcome::Delivered(i32::from(status)));
            }
            Err(e) => e,
        };
        let text = e.to_string();
        let permanent = matches!(
            e,
            DeliveryError::Status {
                permanent: true,
                ..
            }
        );
        let outcome = if permanent {
            log::error!(target: "sitewatch::alerts",
                "channel {name}: event {} ({} {}) refused: {text}; not retried",
                ev.key, ev.target, ev.kind);
            c.execute(FAILED, &[&ev.id, name, &e.status(), &text])?;
            Outcome::Failed
        } else {
            let delay = self.backoff.next_delay();
            log::warn!(target: "sitewatch::alerts",
                "channel {name}: event {} ({} {}): {text}; retrying in {}",
                ev.key, ev.target, ev.kind, crate::util::format_duration(delay));
            let ms = delay.as_millis() as f64;
            c.execute(RETRY, &[&ev.id, name, &e.status(), &text, &ms])?;
            Outcome::Retry
        };
        let mut s = lock(&self.status);
        let st = s.entry(name.clone()).or_default();
        st.failures += 1;
        st.last_error = Some(text);
        Ok(outcome)
    }
}

/// What became of one event of a batch.
enum Outcome {
    /// A 2xx answer with this status; marked with the rest of the batch.
    Delivered(i32),
    /// Refused for good and marked `failed`: the batch goes on.
    Failed,
    /// Pending again with a backoff: the batch ends, so no later event overtakes it.
    Retry,
}

/// An event as [`CLAIM`] returns it.
fn event(row: &postgres::Row) -> Event {
    let at: SystemTime = row.get(10);
    let at_ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Event {
        id: row.get(0),
        key: row.get(1),
        target: row.get(2),
        url: row.get(3),
        kind: row.get(4),
        state: row.get(5),
        previous: row.get(6),
        reason: row.get(7),
        incident: row.get(8),
        check_id: row.get(9),
        at: format_rfc3339_ms(at_ms),
    }
}

/// The request body for `ch`'s kind.
pub fn body(ch: &Channel, ev: &Event) -> String {
    match ch.kind {
        ChannelKind::Webhook => payload::webhook(ev),
        ChannelKind::Slack => payload::slack(ev),
        ChannelKind::PagerDuty => payload::pagerduty(
            ev,
            ch.routing_key
                .as_ref()
                .map(|k| k.value.expose())
                .unwrap_or(""),
        ),
    }
    .to_string()
}

/// One POST of `ev` to `ch`; the status on a 2xx answer.
pub fn send(agent: &ureq::Agent, ch: &Channel, ev: &Event) -> Result<u16, DeliveryError> {
    let body = body(ch, ev);
    let mut req = agent
        .post(ch.url())
        .header("Content-Type", "application/json")
        .header(IDEMPOTENCY_HEADER, &ev.key);
    if let Some(secret) = &ch.secret {
        let sig = payload::signature(secret.value.expose().as_bytes(), body.as_bytes());
        req = req.header(SIGNATURE_HEADER, &sig);
    }
    let resp = req
        .send(body.as_bytes())
        .map_err(|source| DeliveryError::Transport {
            message: source
                .to_string()
                .replace(ch.url(), &format!("<{} url>", ch.name)),
            source,
        })?;
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(status);
    }
    let text = resp
        .into_body()
        .with_config()
        .limit(512)
        .read_to_string()
        .unwrap_or_default();
    Err(DeliveryError::Status {
        status,
        body: text.trim().chars().take(200).collect(),
        permanent: is_permanent(status),
    })
}

/// Whether an answer refuses this request for good, so that retrying it would only hold back
/// the channel's later events (a channel delivers in order): a 4xx, which says the request is
/// wrong, except the ones that say "not now" — 408 Request Timeout, 425 Too Early, 429 Too
/// Many Requests. 5xx and anything else (3xx not followed) are retried with backoff.
pub fn is_permanent(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 425 | 429)
}

#[cfg(test)]
mod tests {
    use super::is_permanent;

    #[test]
    fn client_errors_are_permanent_except_the_ones_that_mean_not_now() {
        for status in [400, 401, 403, 404, 410, 413, 422] {
            assert!(is_permanent(status), "{status}");
        }
        for status in [408, 425, 429, 500, 502, 503, 504, 301, 302] {
            assert!(!is_permanent(status), "{status}");
        }
    }
}
