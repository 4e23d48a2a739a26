//! The server-rendered pages: `/` (every target) and `/target/<id>`. No script, no external
//! asset: the style sheet is inline, the charts are inline SVG with a text alternative
//! (`role="img"`, `aria-label`) and a `<title>` per cell for hover and focus. Every text that
//! came from the database or the request goes through [`escape`].

use std::fmt::Write as _;

use super::badge::{GREEN, State, YELLOW, uptime_colour};
use super::data::{
    BAR_DAYS, CheckView, DAY_MS, HOUR_MS, LocationView, Selection, TargetView, first_day_ms,
    first_hour_ms,
};
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
.bg{fill:#3b7d0b}.by{fill:#9a6700}.br{fill:#c4302b}.bn{fill:#d0d7de}svg.bar rect{height:20px}\
.gaps{fill:url(#gap);pointer-events:none}.gap{fill:#fff}.p95{fill:#8fb8e8}.p50{fill:#0969da}\
rect:focus,g:focus{outline:2px solid #0969da}\
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{text-align:left;padding:.25rem .4rem;border-bottom:1px solid #d0d7de;vertical-align:top}\
.scroll{overflow-x:auto}\
.locs{list-style:none;display:flex;flex-wrap:wrap;gap:.3rem;margin:.3rem 0;padding:0}\
.chip{font-size:.8rem;border-radius:1rem;padding:0 .5rem;color:#fff}\
.chip.stale{background:none;color:inherit;border:1px dashed #6e6e6e}\
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}\
@media (prefers-color-scheme:dark){body{background:#0d1117;color:#e6edf3}a{color:#58a6ff}.meta{color:#9da7b3}.t,th,td{border-color:#30363d}.gap{fill:#0d1117}}";

/// Drawn over each uptime bar (`.gaps`): the background between days, so that a run of days
/// shown as one cell still looks like its days.
const GAP_PATTERN: &str = "<svg width=\"0\" height=\"0\" style=\"position:absolute\" aria-hidden=\"true\">\
<defs><pattern id=\"gap\" width=\"3\" height=\"20\" patternUnits=\"userSpaceOnUse\">\
<rect class=\"gap\" x=\"2.4\" width=\".6\" height=\"20\"/></pattern></defs></svg>";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>{GAP_PATTERN}<main>{body}</main></body></html>\n",
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
    let mut out = String::new();
    push_percent(&mut out, (p * 100.0).floor() as i64);
    out
}

/// A percentage given in hundredths (rounded down by the caller): "99.95%", "100%".
fn push_percent(out: &mut String, hundredths: i64) {
    if hundredths >= 10_000 {
        out.push_str("100%");
        return;
    }
    push_int(out, hundredths / 100);
    out.push('.');
    if hundredths % 100 < 10 {
        out.push('0');
    }
    push_int(out, hundredths % 100);
    out.push('%');
}

/// What the pages share: the time they are drawn for and the dates of the bar's days, built
/// once per page rather than once per target.
pub struct Frame {
    now_ms: i64,
    /// `YYYY-MM-DD` of each of the [`BAR_DAYS`] days, oldest first.
    dates: Vec<String>,
}

impl Frame {
    pub fn new(now_ms: i64) -> Frame {
        let first_day = first_day_ms(now_ms);
        let dates = (0..BAR_DAYS)
            .map(|i| format_rfc3339_ms(first_day + i * DAY_MS)[..10].to_string())
            .collect();
        Frame { now_ms, dates }
    }
}

/// Day `i` of the bar (0 the oldest) as shown: its uptime in hundredths of a percent, rounded
/// down as [`fmt_percent`] shows it (`None`: no data). Days that show the same are one cell.
/// Integers, not `f64`: a page of 1,000 targets has 90,000 days, and formatting floats was a
/// tenth of its time.
fn day_cell(view: &TargetView, i: usize) -> Option<i64> {
    match view.days.get(i) {
        Some(&(checks, up)) if checks > 0 => Some(up.clamp(0, checks) * 10_000 / checks),
        _ => None,
    }
}

/// A day's colour class and figure text ("99.95%", "100%") from [`day_cell`].
fn day_look(cell: Option<i64>, text: &mut String) -> &'static str {
    let Some(bp) = cell else {
        return "bn";
    };
    push_percent(text, bp);
    uptime_class(bp as f64 / 100.0)
}

/// `n` in decimal, without the formatting machinery (the bar writes 90,000 numbers a page).
fn push_int(out: &mut String, n: i64) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    let mut v = n.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push('-');
    }
    out.push_str(std::str::from_utf8(&buf[at..]).unwrap_or("0"));
}

/// The bar's class for an uptime percentage: the badge's colours (`uptime_colour`).
fn uptime_class(percent: f64) -> &'static str {
    let colour = uptime_colour(percent);
    if colour == GREEN {
        "bg"
    } else if colour == YELLOW {
        "by"
    } else {
        "br"
    }
}

/// The 90-day bar: a cell per day, coloured by uptime, its figure in a `<title>` (hover) on a
/// focusable cell (focus). A run of days with the same figure (a quiet month at 100%, the days
/// before the first check) is one cell with the run's dates, drawn as separate days by the
/// page's gap pattern: the same picture and the same figures in a fraction of the markup,
/// and one tab stop per run rather than 90 per target.
fn uptime_bar(out: &mut String, view: &TargetView, frame: &Frame) {
    let (checks, successes) = view
        .days
        .iter()
        .fold((0, 0), |(c, s), (dc, ds)| (c + dc, s + ds));
    let overall = percent(successes, checks).map_or("no data".into(), fmt_percent);
    let _ = write!(
        out,
        "<svg class=\"bar\" viewBox=\"0 0 {w} 20\" preserveAspectRatio=\"none\" role=\"img\" \
         aria-label=\"{BAR_DAYS}-day uptime of {id}: {overall}\">",
        w = BAR_DAYS * 3,
        id = escape(&view.id)
    );
    let days = BAR_DAYS as usize;
    let cells: Vec<Option<i64>> = (0..days).map(|i| day_cell(view, i)).collect();
    let mut figure = String::with_capacity(8);
    let mut i = 0;
    while i < days {
        let mut j = i + 1;
        while j < days && cells[j] == cells[i] {
            j += 1;
        }
        figure.clear();
        let class = day_look(cells[i], &mut figure);
        out.push_str("<rect x=\"");
        push_int(out, i as i64 * 3);
        out.push_str("\" width=\"");
        push_int(out, (j - i) as i64 * 3);
        out.push_str("\" class=\"");
        out.push_str(class);
        out.push_str("\" tabindex=\"0\"><title>");
        out.push_str(&frame.dates[i]);
        if j - i > 1 {
            out.push_str(" to ");
            out.push_str(&frame.dates[j - 1]);
        }
        if figure.is_empty() {
            out.push_str(": no data</title></rect>");
        } else {
            out.push_str(": ");
            out.push_str(&figure);
            out.push_str(if j - i > 1 {
                " up each day</title></rect>"
            } else {
                " up</title></rect>"
            });
        }
        i = j;
    }
    let _ = write!(
        out,
        "<rect class=\"gaps\" width=\"{}\" height=\"20\"/></svg>",
        BAR_DAYS * 3
    );
}

/// The 24-hour response time chart: per hour, a p95 bar and a p50 bar over it. On `/` the
/// bars are two paths under the chart's text alternative; `/target/<id>` (`per_hour`) gives
/// each hour its figures on hover and focus.
fn response_chart(out: &mut String, view: &TargetView, now_ms: i64, per_hour: bool) {
    let hist = view.hist_24h();
    let (p50, p95) = (quantile(&hist, 0.5), quantile(&hist, 0.95));
    let label = match (p50, p95) {
        (Some(a), Some(b)) => format!("24-hour response time: p50 ≤ {a} ms, p95 ≤ {b} ms"),
        _ => "24-hour response time: no data".into(),
    };
    let first_hour = first_hour_ms(now_ms);
    let bars: Vec<(usize, i64, f64, f64)> = (view.hours.iter().enumerate())
        .filter_map(|(i, h)| {
            let start = first_hour + i as i64 * HOUR_MS;
            Some((i, start, quantile(h, 0.5)?, quantile(h, 0.95)?))
        })
        .collect();
    let top = bars.iter().map(|b| b.3).fold(1.0f64, f64::max);
    let label = escape(&label);
    // Heights in whole units of a 400-high box: integers, as for the bar (a page of 1,000
    // targets draws 48,000 of them).
    let _ = write!(
        out,
        "<p class=\"meta\">{label}</p><svg class=\"spark\" viewBox=\"0 0 240 400\" \
         preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{label}\">"
    );
    let height = |ms: f64| (400.0 * ms / top).round() as i64;
    if per_hour {
        for &(i, start, a, b) in &bars {
            let (ha, hb) = (height(a), height(b));
            let _ = write!(
                out,
                "<g tabindex=\"0\"><title>{}: p50 ≤ {a} ms, p95 ≤ {b} ms</title>\
                 <rect x=\"{x}\" y=\"{yb}\" width=\"8\" height=\"{hb}\" class=\"p95\"/>\
                 <rect x=\"{x}\" y=\"{ya}\" width=\"8\" height=\"{ha}\" class=\"p50\"/></g>",
                &format_rfc3339_ms(start)[11..16],
                x = i * 10,
                ya = 400 - ha,
                yb = 400 - hb,
            );
        }
    } else {
        for (class, p95) in [("p95", true), ("p50", false)] {
            out.push_str("<path class=\"");
            out.push_str(class);
            out.push_str("\" d=\"");
            for &(i, _, a, b) in &bars {
                out.push('M');
                push_int(out, i as i64 * 10);
                out.push(' ');
                push_int(out, 400 - height(if p95 { b } else { a }));
                out.push_str("h8V400h-8z");
            }
            out.push_str("\"/>");
        }
    }
    out.push_str("</svg>");
}

fn state_of(view: &TargetView) -> State {
    State::of(Some(view.up), view.checks_24h, view.successes_24h)
}

/// One target's block on `/` (and at the top of `/target/<id>`, with `per_hour` figures).
fn target_block(out: &mut String, view: &TargetView, frame: &Frame, per_hour: bool) {
    let now_ms = frame.now_ms;
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
    uptime_bar(out, view, frame);
    response_chart(out, view, now_ms, per_hour);
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
    let frame = Frame::new(now_ms);
    // Most of a page is its targets' blocks, about 5-8 KB each: one allocation up front.
    let mut body = String::with_capacity(4096 + views.len() * 8192);
    body.push_str("<h1>Status</h1>");
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
                target_block(&mut body, v, &frame, false);
            }
        }
        let untagged: Vec<&TargetView> = views.iter().filter(|v| v.tags.is_empty()).collect();
        if !untagged.is_empty() {
            body.push_str("<h2>Untagged</h2>");
            for v in untagged {
                target_block(&mut body, v, &frame, false);
            }
        }
    } else {
        for v in views {
            target_block(&mut body, v, &frame, false);
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
    target_block(&mut body, view, &Frame::new(now_ms), true);
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

    #[test]
    fn day_figures_are_rounded_down_to_hundredths_in_integers() {
        let look = |checks: i64, up: i64| {
            let view = TargetView {
                days: vec![(checks, up)],
                ..TargetView::default()
            };
            let mut text = String::new();
            let class = day_look(day_cell(&view, 0), &mut text);
            format!("{class} {text}")
        };
        assert_eq!(look(3, 1), "br 33.33%");
        assert_eq!(look(3, 2), "br 66.66%");
        assert_eq!(look(100, 29), "br 29.00%");
        assert_eq!(look(1000, 1), "br 0.10%");
        assert_eq!(look(5, 0), "br 0.00%");
        assert_eq!(look(10_000, 9_999), "bg 99.99%");
        assert_eq!(look(100, 97), "by 97.00%");
        assert_eq!(look(10, 10), "bg 100%");
        assert_eq!(look(0, 0), "bn ");
        let mut n = String::new();
        for v in [0, 7, 10, 267, -42, i64::MAX] {
            push_int(&mut n, v);
            n.push(' ');
        }
        assert_eq!(n, format!("0 7 10 267 -42 {} ", i64::MAX));
    }

    #[test]
    fn a_run_of_days_with_one_figure_is_one_cell_with_its_dates() {
        let frame = Frame::new(20_000 * DAY_MS + 5 * HOUR_MS);
        let mut view = TargetView {
            id: "a".into(),
            ..TargetView::default()
        };
        // The last three days: 100%, 100%, 50%; before them no data.
        view.days = vec![(0, 0); BAR_DAYS as usize];
        for (day, checks, up) in [(87, 10, 10), (88, 20, 20), (89, 10, 5)] {
            view.days[day] = (checks, up);
        }
        let mut out = String::new();
        uptime_bar(&mut out, &view, &frame);
        let d = &frame.dates;
        assert_eq!(d[89], "2024-10-04");
        let cells: Vec<&str> = out.split("<rect x=").skip(1).collect();
        assert_eq!(cells.len(), 3, "{out}");
        assert!(
            cells[0].starts_with("\"0\" width=\"261\" class=\"bn\""),
            "{out}"
        );
        assert!(cells[0].contains(&format!("<title>{} to {}: no data</title>", d[0], d[86])));
        assert!(
            cells[1].starts_with("\"261\" width=\"6\" class=\"bg\""),
            "{out}"
        );
        assert!(cells[1].contains(&format!("<title>{} to {}: 100% up each day<", d[87], d[88])));
        assert!(
            cells[2].starts_with("\"267\" width=\"3\" class=\"br\""),
            "{out}"
        );
        assert!(cells[2].contains(&format!("<title>{}: 50.00% up</title>", d[89])));
        assert!(
            out.contains("aria-label=\"90-day uptime of a: 87.50%\""),
            "{out}"
        );
        assert!(out.ends_with("<rect class=\"gaps\" width=\"270\" height=\"20\"/></svg>"));
    }
}
