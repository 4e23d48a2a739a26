//! `sitewatch alerts`: open alerts, recent events and the channels' delivery state, as tables
//! for a person at a terminal (the views `open_alerts`, `alert_history`, `alert_channels`).

use std::fmt::Write;
use std::time::SystemTime;

use crate::config::Config;
use crate::sink::{SinkError, db, schema};
use crate::util::format_rfc3339_ms;

/// Events shown under "recent events".
const RECENT: i64 = 20;

fn time(t: Option<SystemTime>) -> String {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| format_rfc3339_ms(d.as_millis() as i64)[..19].replace('T', " "))
        .unwrap_or_else(|| "-".into())
}

/// Left-aligned columns, two spaces apart; a line of its own when there are no rows.
fn table(out: &mut String, title: &str, head: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "{title}");
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)\n");
        return;
    }
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let padded: Vec<String> = (cells.iter().zip(&width))
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("  {}", padded.join("  ").trim_end())
    };
    let _ = writeln!(out, "{}", line(head.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
    let _ = writeln!(out);
}

/// The three tables, ready to print.
pub fn report(cfg: &Config) -> Result<String, SinkError> {
    let pg = cfg.postgres.as_ref().ok_or(SinkError::NotConfigured {
        section: "postgres",
    })?;
    let mut c = db::connect(pg, "sitewatch alerts")?;
    schema::require_alerts(&mut c, &pg.url)?;
    let open: Vec<Vec<String>> = c
        .query(
            "SELECT target, state, since, reason, alerted, muted FROM open_alerts ORDER BY since",
            &[],
        )?
        .iter()
        .map(|r| {
            let muted: Option<String> = r.get(5);
            let alerted = if r.get(4) {
                "alerted".to_string()
            } else {
                "not alerted".into()
            };
            vec![
                r.get(0),
                r.get(1),
                time(r.get(2)),
                muted.map(|m| format!("muted: {m}")).unwrap_or(alerted),
                r.get::<_, Option<String>>(3).unwrap_or_default(),
            ]
        })
        .collect();
    let recent: Vec<Vec<String>> = c
        .query(
            "SELECT id, created_at, target, kind, reason, delivered, pending, failed, abandoned \
             FROM alert_history LIMIT $1",
            &[&RECENT],
        )?
        .iter()
        .map(|r| {
            let (d, p, f, a): (i64, i64, i64, i64) = (r.get(5), r.get(6), r.get(7), r.get(8));
            // Abandoned (a channel removed from the config) is rare: said only when it happened.
            let a = match a {
                0 => String::new(),
                a => format!(", {a} abandoned"),
            };
            vec![
                r.get::<_, i64>(0).to_string(),
                time(r.get(1)),
                r.get(2),
                r.get(3),
                format!("{d} delivered, {p} pending, {f} failed{a}"),
                r.get(4),
            ]
        })
        .collect();
    let channels: Vec<Vec<String>> = c
        .query(
            "SELECT channel, pending, delivered, failed, abandoned, last_delivered, last_error \
             FROM alert_channels ORDER BY channel",
            &[],
        )?
        .iter()
        .map(|r| {
            vec![
                r.get(0),
                r.get::<_, i64>(1).to_string(),
                r.get::<_, i64>(2).to_string(),
                r.get::<_, i64>(3).to_string(),
                r.get::<_, i64>(4).to_string(),
                time(r.get(5)),
                r.get::<_, Option<String>>(6).unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = String::new();
    let open_head = ["TARGET", "STATE", "SINCE (UTC)", "ALERT", "REASON"];
    table(&mut out, "OPEN ALERTS", &open_head, &open);
    let event_head = ["ID", "AT (UTC)", "TARGET", "EVENT", "DELIVERY", "REASON"];
    table(&mut out, "RECENT EVENTS", &event_head, &recent);
    let channel_head = [
        "CHANNEL",
        "PENDING",
        "DELIVERED",
        "FAILED",
        "ABANDONED",
        "LAST DELIVERED",
        "LAST ERROR",
    ];
    table(&mut out, "CHANNELS", &channel_head, &channels);
    Ok(out)
}
