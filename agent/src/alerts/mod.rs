//! Alerts: target state decided exactly once by the sink, delivered at least once from an
//! outbox to webhooks, Slack and PagerDuty (issue 16).
//!
//! Design, and why:
//! - **Where state is decided.** In the sink, for the records of each fetch, inside the
//!   transaction that stores their rows and moves the partition's offset ([`eval`], called by
//!   `sink::writer`). Records are keyed by target, so one partition (and one owning sink, by
//!   advisory lock) sees every check of a target: one evaluator per target without any other
//!   coordination, and a sink killed at any moment neither loses nor repeats a transition.
//! - **State** (`alert_state`): `up`, `down` or `degraded`, consecutive failed / up / slow
//!   counts, since when, the episode's incident key, whether the episode was alerted and why not
//!   (`muted`: `maintenance`, `depends_on X (down)`). Maintenance is not a state of its own: a
//!   target keeps being judged during a window (so the state is right when it closes), only the
//!   alert is not created; `open_alerts` shows it as muted. A state entered while muted stays
//!   unalerted (no trigger, and so no resolve) while muted; if it is still bad at a check once
//!   nothing mutes it (the window closed, the parent is up again), its event goes out then.
//! - **Locations** (`alert_locations`, [`eval`]): with agents in several locations each
//!   location's checks of a target decide that location's health alone, and the target's
//!   state follows the quorum (`[alerts] quorum` of the locations whose latest check is within
//!   `quorum_settings.fresh_for` of the check judged: the `target_quorum` view's window, on
//!   record time so a re-read batch decides the same). One event per target transition, naming
//!   the locations. The record key is the target id, so one partition holds every location's
//!   checks of a target and one sink decides. One location (or none): as before.
//! - **Degraded**: `failure_threshold` checks in a row over `latency_budget` (one slow check
//!   is not news), or a certificate within a warning level of `cert_expiry_days`: each lower
//!   level crossed is its own event. Back to up after `success_threshold` good checks.
//! - **Outbox** (`alert_events`, `alert_deliveries`): one event per transition with a UUIDv7
//!   key (the receivers' idempotency key), and one delivery row per configured channel, written
//!   in the same transaction. `NOTIFY sitewatch_alerts`, sent by the writer right after that
//!   commit in a transaction of its own, wakes the notifiers (see `eval::wake`).
//! - **Delivery** ([`notify`]): one thread per channel in the sink process, with its own
//!   PostgreSQL connection, so a channel that hangs or fails delays only itself and never the
//!   sink's batches. Per channel, events go out in id order (a resolve never overtakes its
//!   trigger): the first pending deliveries (up to 64, as far as they are due) are leased
//!   (`lease_until`) in one statement, sent one by one, and marked delivered in one statement
//!   (two round trips a batch, not two an event: the sink's throughput with a delivering
//!   channel, bench section 4); a failure keeps it pending with a backoff (`backoff.rs`, 500 ms doubling to
//!   30 s) and the channel shows as failing in the STATUS line and the `alert_channels` view.
//!   A 4xx answer other than 408/425/429 is permanent: marked `failed` (status and the start
//!   of the answer), and the channel moves on; 408/425/429, 5xx and no answer keep the order.
//!   A retryable failure ends the batch and releases the events after it untried; an event is
//!   sent only while its lease still covers a whole request, so a slow receiver cannot let a
//!   lease run out mid-send. At least once: a sink killed after sending but before marking
//!   (the batch's mark, a few ms later) is retried once the lease (timeout + 5 s) expires, with the same idempotency key; PagerDuty's `dedup_key` (the
//!   incident) makes its retries harmless too.
//! - **Removed channels**: deliveries are written only for configured channels, so a channel
//!   removed from the config would leave its pending ones pending for ever (blocking their
//!   events' retention, and looking like work to do). The sink's first maintenance pass marks
//!   them `abandoned` with the reason and logs the count per channel. Decided at start, from
//!   this sink's config: sinks share one config, and during a rolling change a sink still on
//!   the old one only loses deliveries it could have sent late. Not revived if the channel
//!   comes back: an old page is noise by then (an `UPDATE` revives them by hand).
//! - **Time zones**: maintenance windows are one-off (RFC 3339) or weekly in UTC, a fixed
//!   offset (`+02:00`) or a named zone (`Europe/Berlin`). Named zones come from the system tz
//!   database (`/usr/share/zoneinfo`, Debian's tzdata, or `$TZDIR`) through jiff, read when the
//!   config is loaded; nothing is bundled (a bundled copy would grow the binary and go stale
//!   between our releases). An unknown zone, or no database, is a config error with its line,
//!   never a silent UTC. A start time a DST change skips or repeats takes jiff's "compatible"
//!   reading: after the gap (02:30 on spring-forward day starts at 03:30), the first of the
//!   fold; the duration is real time.

#[cfg(feature = "alerts")]
pub mod config;
#[cfg(feature = "alerts")]
pub mod eval;
#[cfg(feature = "alerts")]
pub mod notify;
#[cfg(feature = "alerts")]
pub mod payload;
#[cfg(feature = "alerts")]
pub mod report;

/// What one channel's notifier did since start, for the STATUS line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStatus {
    pub delivered: u64,
    /// Failed deliveries since the last success: more than zero means the channel is failing.
    pub failures: u64,
    /// The last failure (the URL never in it).
    pub last_error: Option<String>,
}

#[cfg(feature = "alerts")]
pub use config::{AlertsConfig, RawAlerts, validate, write_toml};

/// Without the feature no alerts config can exist: `[alerts]` is read as anything and
/// refused by [`validate`], so none of the alerts code is in the smallest binary.
#[cfg(not(feature = "alerts"))]
pub type AlertsConfig = std::convert::Infallible;
#[cfg(not(feature = "alerts"))]
pub type RawAlerts = serde::de::IgnoredAny;

#[cfg(not(feature = "alerts"))]
pub fn validate(_: &RawAlerts, _: &Ctx) -> Result<AlertsConfig, String> {
    Err("alerts: this sitewatch was built without the `alerts` feature; remove [alerts]".into())
}

#[cfg(not(feature = "alerts"))]
pub fn write_toml(a: &AlertsConfig, _: &mut String, _: &dyn Fn(&str) -> String) {
    match *a {}
}

/// What validating `[alerts]` needs from the config loader.
pub struct Ctx<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Resolves a relative path against the config file's directory.
    pub path: &'a dyn Fn(&str) -> std::path::PathBuf,
    pub read_secret: &'a dyn Fn(&std::path::Path) -> Result<String, String>,
}

#[cfg(all(test, not(feature = "alerts")))]
mod tests {
    #[test]
    fn alerts_are_refused_by_name_without_the_feature() {
        let e = crate::config::Config::parse(
            "[alerts]\nfailure_threshold = 3\n",
            std::path::Path::new("agent.toml"),
            &|_| None,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("alerts: this sitewatch was built without the `alerts` feature"),
            "{e}"
        );
    }
}
