//! The server-rendered pages: `/` (every target) and `/target/<id>`. No script, no external
//! asset: the style sheet is inline, the charts are inline SVG with a text alternative
//! (`role="img"`, `aria-label`) and a `<title>` per cell for hover and focus. Every text that
//! came from the database or the request goes through [`escape`].

use std::fmt::Write as _;

use super::badge::{State, uptime_colour};
use super::data::{BAR_DAYS, CheckView, DAY_MS, HOUR_MS, LocationView, Selection, TargetView};
use crate::sink::rollup::quantile;
use crate::util::format_rfc3339_ms;

/// HTML/XML text and attribute escaping.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in XML text; nothing legitimate has them.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A URL path segment: everything but unreserved characters percent-encoded.
pub fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = "\
body{font:16px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}\
main{max-width:60rem;margin:0 auto;padding:1rem}\
h1{font-size:1.5rem;margin:.5rem 0}h2{font-size:1.15rem;margin:1.5rem 0 .5rem}\
a{color:#0645ad}nav a{margin-right:.75rem}\
.t{border:1px solid #d0d7de;border-radius:6px;padding:.75rem;margin:.75rem 0}\
.t h3{font-size:1.05rem;margin:0;display:flex;flex-wrap:wrap;gap:.5rem;align-items:baseline}\
.st{font-weight:700;padding:0 .4rem;border-radius:4px;color:#fff}\
.up{background:#1a7f37}.degraded{background:#9a6700}.down{background:#c4302b}.unknown{background:#6e6e6e}\
.meta{color:#57606a;font-size:.9rem;margin:.25rem 0;overflow-wrap:anywhere}\
svg.bar{width:100%;height:2rem;display:block;margin:.4rem 0}\
svg.spark{width:100%;max-width:24rem;height:2.5rem;display:block}\
rect:focus{outline:2px solid #0969da}\
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{text-align:left;padding:.25rem .4rem;border-bottom:1px solid #d0d7de;vertical-align:top}\
.scroll{overflow-x:auto}\
.locs{list-style:none;display:flex;flex-wrap:wrap;gap:.3rem;margin:.3rem 0;padding:0}\
.chip{font-size:.8rem;border-radius:1rem;padding:0 .5rem;color:#fff}\
.chip.stale{background:none;color:inherit;border:1px dashed #6e6e6e}\
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}\
@media (prefers-color-scheme:dark){body{background:#0d1117;color:#e6edf3}a{color:#58a6ff}.meta{color:#9da7b3}.t,th,td{border-color:#30363d}}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>\n",
        escape(title)
    )
}

/// "3 h 5 min" style duration.
fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn time(ms: i64) -> String {
    let text = format_rfc3339_ms(ms);
    format!(
        "<time datetime=\"{text}\">{}</time>",
        &text[..16].replace('T', " ")
    )
}

fn percent(successes: i64, checks: i64) -> Option<f64> {
    (checks > 0).then(|| 100.0 * successes as f64 / checks as f64)
}

fn fmt_percent(p: f64) -> String {
    if p >= 100.0 {
        "100%".into()
    } else {
        format!("{:.2}%", (p * 100.0).floor() / 100.0)
    }
}

/// The 90-day bar: one cell per day, coloured by uptime, its figure in `<title>`.
fn uptime_bar(view: &TargetView, now_ms: i64) -> String {
    let today = now_ms - now_ms.rem_euclid(DAY_MS);
    let (checks, successes) = view
        .days
        .values()
        .fold((0, 0), |(c, s), (dc, ds)| (c + dc, s + ds));
    let overall = percent(successes, checks).map_or("no data".into(), fmt_percent);
    let mut out = format!(
        "<svg class=\"bar\" viewBox=\"0 0 {w} 20\" preserveAspectRatio=\"none\" role=\"img\" \
         aria-label=\"{BAR_DAYS}-day uptime of {id}: {overall}\">",
        w = BAR_DAYS * 3,
        id = escape(&view.id)
    );
    for i in 0..BAR_DAYS {
        let day = today - (BAR_DAYS - 1 - i) * DAY_MS;
        let date = &format_rfc3339_ms(day)[..10];
        let (fill, label) = match view
            .days
            .get(&day)
            .and_then(|&(c, s)| percent(s, c).map(|p| (p, c)))
        {
            Some((p, c)) => (
                uptime_colour(p),
                format!("{date}: {} up ({c} checks)", fmt_percent(p)),
            ),
            None => ("#d0d7de", format!("{date}: no data")),
        };
        let _ = write!(
            out,
            "<rect x=\"{}\" width=\"2.4\" height=\"20\" fill=\"{fill}\" tabindex=\"0\"><title>{label}</title></rect>",
            i * 3
        );
    }
    out.push_str("</svg>");
    out
}

/// The 24-hour response time chart: per hour, a p95 bar and a p50 bar over it.
fn response_chart(view: &TargetView, now_ms: i64) -> String {
    let hist = view.hist_24h();
    let (p50, p95) = (quantile(&hist, 0.5), quantile(&hist, 0.95));
    let label = match (p50, p95) {
        (Some(a), Some(b)) => format!("24-hour response time: p50 ≤ {a} ms, p95 ≤ {b} ms"),
        _ => "24-hour response time: no data".into(),
    };
    let hour = now_ms - now_ms.rem_euclid(HOUR_MS);
    let top = (0..24)
        .filter_map(|i| view.hours.get(&(hour - i * HOUR_MS)))
        .filter_map(|h| quantile(h, 0.95))
        .fold(1.0f64, f64::max);
    let mut out = format!(
        "<svg class=\"spark\" viewBox=\"0 0 240 40\" preserveAspectRatio=\"none\" role=\"img\" \
         aria-label=\"{}\">",
        escape(&label)
    );
    for i in 0..24 {
        let start = hour - (23 - i) * HOUR_MS;
        let Some(h) = view.hours.get(&start) else {
            continue;
        };
        let (Some(a), Some(b)) = (quantile(h, 0.5), quantile(h, 0.95)) else {
            continue;
        };
        let (ha, hb) = (40.0 * a / top, 40.0 * b / top);
        let _ = write!(
            out,
            "<g tabindex=\"0\"><title>{}: p50 ≤ {a} ms, p95 ≤ {b} ms</title>\
             <rect x=\"{x}\" y=\"{yb:.1}\" width=\"8\" height=\"{hb:.1}\" fill=\"#8fb8e8\"/>\
             <rect x=\"{x}\" y=\"{ya:.1}\" width=\"8\" height=\"{ha:.1}\" fill=\"#0969da\"/></g>",
            &format_rfc3339_ms(start)[11..16],
            x = i * 10,
            ya = 40.0 - ha,
            yb = 40.0 - hb,
        );
    }
    out.push_str("</svg>");
    format!("<p class=\"meta\">{}</p>{out}", escape(&label))
}

fn state_of(view: &TargetView) -> State {
    State::of(Some(view.up), view.checks_24h, view.successes_24h)
}

/// One target's block on `/`.
fn target_block(out: &mut String, view: &TargetView, now_ms: i64) {
    let state = state_of(view);
    let word = state.word();
    let _ = write!(
        out,
        "<section class=\"t\" aria-labelledby=\"t-{a}\"><h3 id=\"t-{a}\"><a href=\"/target/{a}\">{id}</a> \
         <span class=\"st {word}\">{Word}</span> <span class=\"meta\">for {dur}, since {since}</span></h3>\
         <p class=\"meta\">{url}</p>",
        a = encode_segment(&view.id),
        id = escape(&view.id),
        Word = capitalise(word),
        dur = human_duration(now_ms - view.since_ms),
        since = time(view.since_ms),
        url = escape(&view.url),
    );
    location_chips(out, view);
    if !view.up {
        let reason = view.failure.as_deref().unwrap_or("down");
        let error = view.error.as_deref().unwrap_or("");
        let _ = write!(
            out,
            "<p class=\"meta\">Last failure: {}: {}</p>",
            escape(reason),
            escape(error)
        );
    }
    out.push_str(&uptime_bar(view, now_ms));
    out.push_str(&response_chart(view, now_ms));
    if let Some(not_after) = view.cert_not_after_ms {
        let days = (not_after - now_ms).div_euclid(DAY_MS);
        let _ = write!(
            out,
            "<p class=\"meta\">Certificate expires {} (in {days} days)</p>",
            time(not_after)
        );
    }
    if !view.tags.is_empty() {
        let tags: Vec<String> = view.tags.iter().map(|t| escape(t)).collect();
        let _ = write!(out, "<p class=\"meta\">Tags: {}</p>", tags.join(", "));
    }
    out.push_str("</section>");
}

/// A location's name as shown; agents without `[agent] location` have none.
fn location_name(l: &LocationView) -> String {
    escape(l.location.as_deref().unwrap_or("(no location)"))
}

fn location_word(l: &LocationView) -> &'static str {
    if l.up { "up" } else { "down" }
}

/// One chip per location (a symbol and a colour, the state in text for screen readers),
/// and how the quorum stands, for a target seen from several locations.
fn location_chips(out: &mut String, view: &TargetView) {
    if view.locations.is_empty() {
        return;
    }
    out.push_str("<ul class=\"locs\" aria-label=\"Locations\">");
    for l in &view.locations {
        let word = location_word(l);
        let (class, note) = match l.counted {
            true => (word, ""),
            false => ("stale", ", not counted (no recent check or agent)"),
        };
        let _ = write!(
            out,
            "<li class=\"chip {class}\" title=\"{name}: {word} since {since} UTC\">\
             <span aria-hidden=\"true\">{symbol} </span>{name}<span class=\"sr\">: {word}{note}</span></li>",
            name = location_name(l),
            since = &format_rfc3339_ms(l.since_ms)[..16].replace('T', " "),
            symbol = if l.up { "✓" } else { "✕" },
        );
    }
    out.push_str("</ul>");
    if let Some(q) = view.quorum {
        let _ = write!(
            out,
            "<p class=\"meta\">Down in {} of {} locations counted (down at {}).</p>",
            q.down, q.counted, q.min_down
        );
    }
}

/// `/target/<id>`'s table: what each location sees now.
fn location_table(body: &mut String, view: &TargetView, now_ms: i64) {
    if view.locations.is_empty() {
        return;
    }
    body.push_str(
        "<h2>Locations</h2><div class=\"scroll\"><table><caption class=\"meta\">Each location's latest check in the last day</caption>\
         <thead><tr><th scope=\"col\">Location</th><th scope=\"col\">State</th><th scope=\"col\">Since (UTC)</th>\
         <th scope=\"col\">Last check (UTC)</th><th scope=\"col\">Latency (ms)</th><th scope=\"col\">Counted</th>\
         <th scope=\"col\">Error</th></tr></thead><tbody>",
    );
    for l in &view.locations {
        let state = match &l.failure {
            Some(f) if !l.up => format!("down: {f}"),
            _ => location_word(l).to_string(),
        };
        let _ = write!(
            body,
            "<tr><th scope=\"row\">{}</th><td><span class=\"st {}\">{}</span></td><td>{} ({})</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
            location_name(l),
            location_word(l),
            escape(&state),
            time(l.since_ms),
            human_duration(now_ms - l.since_ms),
            time(l.last_check_ms),
            l.total_ms,
            if l.counted { "yes" } else { "no" },
            escape(l.error.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</tbody></table></div>");
}

fn capitalise(word: &str) -> String {
    let mut c = word.chars();
    c.next()
        .map_or(String::new(), |f| f.to_uppercase().chain(c).collect())
}

/// `/`: every selected target, optionally grouped by tag.
pub fn status_page(
    views: &[TargetView],
    more: bool,
    selection: &Selection,
    group: bool,
    now_ms: i64,
) -> String {
    let mut body = String::from("<h1>Status</h1>");
    let down = views.iter().filter(|v| !v.up).count();
    let _ = write!(
        body,
        "<p>{} targets shown, {} up, {down} down. Updated {} UTC.</p>",
        views.len(),
        views.len() - down,
        time(now_ms)
    );
    let mut tags: Vec<&str> = views
        .iter()
        .flat_map(|v| v.tags.iter().map(String::as_str))
        .collect();
    tags.sort_unstable();
    tags.dedup();
    if !tags.is_empty() || selection.tag.is_some() {
        body.push_str("<nav aria-label=\"Filter by tag\"><a href=\"/\">All</a>");
        for tag in &tags {
            let _ = write!(
                body,
                "<a href=\"/?tag={}\">#{}</a>",
                encode_segment(tag),
                escape(tag)
            );
        }
        body.push_str("<a href=\"/?group=tag\">Group by tag</a></nav>");
    }
    if let Some(tag) = &selection.tag {
        let _ = write!(body, "<p>Showing tag <strong>{}</strong>.</p>", escape(tag));
    }
    if group {
        for tag in &tags {
            let _ = write!(body, "<h2>{}</h2>", escape(tag));
            for v in views.iter().filter(|v| v.tags.iter().any(|t| t == tag)) {
                target_block(&mut body, v, now_ms);
            }
        }
        let untagged: Vec<&TargetView> = views.iter().filter(|v| v.tags.is_empty()).collect();
        if !untagged.is_empty() {
            body.push_str("<h2>Untagged</h2>");
            for v in untagged {
                target_block(&mut body, v, now_ms);
            }
        }
    } else {
        for v in views {
            target_block(&mut body, v, now_ms);
        }
    }
    if views.is_empty() {
        body.push_str("<p>No targets have been checked yet.</p>");
    }
    if more || selection.page > 0 {
        body.push_str("<nav aria-label=\"Pages\">");
        let mut tag = selection
            .tag
            .as_deref()
            .map_or(String::new(), |t| format!("&tag={}", encode_segment(t)));
        if let Some(n) = selection.per_page {
            let _ = write!(tag, "&per_page={n}");
        }
        if selection.page > 0 {
            let _ = write!(
                body,
                "<a href=\"/?page={}{tag}\">Previous</a>",
                selection.page - 1
            );
        }
        if more {
            let _ = write!(
                body,
                "<a href=\"/?page={}{tag}\">Next</a>",
                selection.page + 1
            );
        }
        body.push_str("</nav>");
    }
    page("Status", &body)
}

/// `/target/<id>`: the target's block and its recent checks with failure reasons.
pub fn target_page(view: &TargetView, checks: &[CheckView], now_ms: i64) -> String {
    let mut body = format!(
        "<p><a href=\"/\">← All targets</a></p><h1>{}</h1>",
        escape(&view.id)
    );
    target_block(&mut body, view, now_ms);
    location_table(&mut body, view, now_ms);
    body.push_str(
        "<h2>Recent checks</h2><div class=\"scroll\"><table><caption class=\"meta\">Newest first; times in ms</caption>\
         <thead><tr><th scope=\"col\">Started (UTC)</th><th scope=\"col\">Result</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Total</th><th scope=\"col\">DNS / connect / TLS / TTFB / transfer</th>\
         <th scope=\"col\">Agent</th><th scope=\"col\">Error</th></tr></thead><tbody>",
    );
    for c in checks {
        let result = if c.up {
            "up".to_string()
        } else {
            format!("down: {}", c.failure.as_deref().unwrap_or("?"))
        };
        let phases: Vec<String> = c
            .phases
            .iter()
            .map(|p| p.map_or("–".into(), |ms| format!("{ms:.1}")))
            .collect();
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            time(c.started_ms),
            escape(&result),
            c.status.map_or("–".into(), |s| s.to_string()),
            c.total_ms,
            phases.join(" / "),
            escape(&c.agent),
            escape(c.error.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</tbody></table></div>");
    page(&format!("{} – status", view.id), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_encoding() {
        assert_eq!(
            escape("<a href='x'>&\"</a>\u{7}"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;\u{FFFD}"
        );
        assert_eq!(encode_segment("a b/../é"), "a%20b%2F..%2F%C3%A9");
        assert_eq!(human_duration(3_725_000), "1 h 2 min");
        assert_eq!(fmt_percent(99.999), "99.99%");
    }
}
