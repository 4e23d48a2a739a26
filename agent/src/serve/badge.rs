//! Shields-style SVG badges: a grey label and a coloured message, text widths estimated from
//! Verdana's average advance (shields.io measures the same font; an estimate is enough for a
//! few ASCII words). Every text is escaped.

use super::html::escape;

/// Colours (shields.io's palette), with white text of at least 3:1 contrast on each.
pub const GREEN: &str = "#3b7d0b";
pub const YELLOW: &str = "#9a6700";
pub const RED: &str = "#c4302b";
pub const GREY: &str = "#555";
pub const UNKNOWN: &str = "#6e6e6e";

/// A target's state as a badge and the page show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    /// Up now, but under 99% of the last 24 hours' checks succeeded.
    Degraded,
    Down,
    /// No check stored (unknown target, or its checks expired).
    Unknown,
}

impl State {
    pub fn of(up: Option<bool>, checks_24h: i64, successes_24h: i64) -> State {
        match up {
            None => State::Unknown,
            Some(false) => State::Down,
            Some(true) if checks_24h > 0 && successes_24h * 100 < checks_24h * 99 => {
                State::Degraded
            }
            Some(true) => State::Up,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Degraded => "degraded",
            State::Down => "down",
            State::Unknown => "unknown",
        }
    }

    pub fn colour(self) -> &'static str {
        match self {
            State::Up => GREEN,
            State::Degraded => YELLOW,
            State::Down => RED,
            State::Unknown => UNKNOWN,
        }
    }
}

/// The colour of an uptime percentage.
pub fn uptime_colour(percent: f64) -> &'static str {
    if percent >= 99.0 {
        GREEN
    } else if percent >= 95.0 {
        YELLOW
    } else {
        RED
    }
}

/// The colour of a response time (ms).
pub fn response_colour(ms: f64) -> &'static str {
    if ms < 500.0 {
        GREEN
    } else if ms < 2000.0 {
        YELLOW
    } else {
        RED
    }
}

fn text_width(text: &str) -> usize {
    // About 6.5 px per character of 11 px Verdana, plus padding on both sides.
    text.chars().count() * 13 / 2 + 10
}

/// The badge: `label` on grey, `message` on `colour`, with a `<title>` for screen readers.
pub fn render(label: &str, message: &str, colour: &str) -> String {
    let (lw, mw) = (text_width(label), text_width(message));
    let width = lw + mw;
    let (label, message) = (escape(label), escape(message));
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" aria-label="{label}: {message}"><title>{label}: {message}</title><linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient><clipPath id="r"><rect width="{width}" height="20" rx="3" fill="#fff"/></clipPath><g clip-path="url(#r)"><rect width="{lw}" height="20" fill="{GREY}"/><rect x="{lw}" width="{mw}" height="20" fill="{colour}"/><rect width="{width}" height="20" fill="url(#s)"/></g><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{mx}" y="14">{message}</text></g></svg>"##,
        lx = lw / 2,
        mx = lw + mw / 2,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_colours() {
        assert_eq!(State::of(None, 0, 0), State::Unknown);
        assert_eq!(State::of(Some(false), 10, 10), State::Down);
        assert_eq!(State::of(Some(true), 100, 99), State::Up);
        assert_eq!(State::of(Some(true), 100, 98), State::Degraded);
        assert_eq!(State::of(Some(true), 0, 0), State::Up);
        assert_eq!(uptime_colour(99.5), GREEN);
        assert_eq!(uptime_colour(97.0), YELLOW);
        assert_eq!(uptime_colour(10.0), RED);
        assert_eq!(response_colour(120.0), GREEN);
    }

    #[test]
    fn text_is_escaped() {
        let svg = render("a<b", "\"&'", GREEN);
        assert!(
            svg.contains("a&lt;b") && svg.contains("&quot;&amp;&#39;"),
            "{svg}"
        );
        assert!(!svg.contains("a<b"));
    }
}
