//! What each channel kind receives for an outbox event: our webhook JSON (signed with
//! HMAC-SHA256 when a secret is set), a Slack incoming-webhook message, a PagerDuty Events API
//! v2 event.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// One row of `alert_events`, as the notifier reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    /// The idempotency key (UUIDv7), the same on every retry.
    pub key: String,
    pub target: String,
    pub url: String,
    /// down, degraded, reminder, resolved.
    pub kind: String,
    pub state: String,
    pub previous: String,
    pub reason: String,
    pub incident: String,
    pub check_id: String,
    /// RFC 3339: when the deciding check started.
    pub at: String,
}

/// The header carrying the idempotency key on every request.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// The webhook signature header: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Sitewatch-Signature";
/// PagerDuty limits (Events API v2): summary 1024 characters, dedup_key 255.
const PD_SUMMARY_MAX: usize = 1024;
/// Slack's limit for a section block's text is 3000 characters.
const SLACK_SECTION_MAX: usize = 3000;

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// One line for people: `shop is DOWN: connect: refused`.
pub fn summary(e: &Event) -> String {
    match e.kind.as_str() {
        "resolved" => format!("{} is up again (was {})", e.target, e.previous),
        "reminder" => format!("{} is still {}: {}", e.target, e.state, e.reason),
        _ => format!("{} is {}: {}", e.target, e.state.to_uppercase(), e.reason),
    }
}

/// The generic webhook body.
pub fn webhook(e: &Event) -> Value {
    json!({
        "id": e.key,
        "event_id": e.id,
        "kind": e.kind,
        "target": e.target,
        "url": e.url,
        "state": e.state,
        "previous_state": e.previous,
        "reason": e.reason,
        "incident": e.incident,
        "check_id": e.check_id,
        "at": e.at,
        "summary": summary(e),
        "sitewatch_version": env!("CARGO_PKG_VERSION"),
    })
}

/// `sha256=<lowercase hex>` of HMAC-SHA256(`secret`, `body`).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    m.update(body);
    let bytes = m.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// Slack's markup characters (`<!channel>` would ping everyone) escaped as Slack documents.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A Slack incoming-webhook message: `text` (the notification fallback) and one `section`
/// block in `mrkdwn`.
pub fn slack(e: &Event) -> Value {
    let icon = match e.kind.as_str() {
        "resolved" => ":large_green_circle:",
        "degraded" => ":large_orange_circle:",
        _ => ":red_circle:",
    };
    let text = slack_escape(&summary(e));
    let detail = format!(
        "{icon} *{}*\n{}\nsince check `{}` at {}",
        text,
        slack_escape(&e.url),
        slack_escape(&e.check_id),
        e.at
    );
    json!({
        "text": text,
        "blocks": [{
            "type": "section",
            "text": {"type": "mrkdwn", "text": cut(&detail, SLACK_SECTION_MAX)},
        }],
    })
}

/// The PagerDuty dedup key of an incident: trigger and resolve of one episode share it.
pub fn dedup_key(e: &Event) -> String {
    cut(&format!("sitewatch-{}", e.incident), 255)
}

/// A PagerDuty Events API v2 event: `trigger` for down / degraded / reminder (the same
/// `dedup_key` updates the open alert), `resolve` for resolved.
pub fn pagerduty(e: &Event, routing_key: &str) -> Value {
    if e.kind == "resolved" {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key(e),
        });
    }
    let severity = if e.state == "degraded" {
        "warning"
    } else {
        "critical"
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(e),
        "client": "sitewatch",
        "payload": {
            "summary": cut(&summary(e), PD_SUMMARY_MAX),
            "source": e.url,
            "severity": severity,
            "timestamp": e.at,
            "component": e.target,
            "group": "sitewatch",
            "class": e.kind,
            "custom_details": {
                "target": e.target,
                "state": e.state,
                "previous_state": e.previous,
                "reason": e.reason,
                "check_id": e.check_id,
                "event": e.key,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn slack_text_is_escaped() {
        let e = Event {
            id: 1,
            key: "k".into(),
            target: "<!channel>".into(),
            url: "http://127.0.0.1/?a&b".into(),
            kind: "down".into(),
            state: "down".into(),
            previous: "up".into(),
            reason: "x".into(),
            incident: "i".into(),
            check_id: "c".into(),
            at: "2026-01-01T00:00:00.000Z".into(),
        };
        let v = slack(&e);
        assert_eq!(v["text"], "&lt;!channel&gt; is DOWN: x");
        assert!(
            v["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .contains("?a&amp;b")
        );
    }
}
