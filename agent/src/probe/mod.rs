//! One check of one target: an HTTP request with ureq, every phase bounded and timed, the TLS
//! certificate read, the body capped and judged (status, regex, rule) into a [`CheckResult`].
//!
//! A failure is data: every way a check can fail ends as a full record with a
//! [`crate::result::FailureReason`], never as an error returned to the caller.
//!
//! What is measured and how (the semantics the README documents):
//! - Phases come from our own resolver, connector and transport ([`transport`]), not from
//!   guesses: `dns` (getaddrinfo; absent for an IP literal), `connect` (TCP), `tls` (handshake),
//!   `ttfb` (last request byte written → first response byte read), `transfer` (first response
//!   byte → last body byte read). With redirects each phase is the sum over all hops (redirect
//!   bodies are not read, so their transfer is not counted); `total` is the whole check
//!   including redirects, retries and the rule. A phase that did not happen is absent.
//! - One deadline, `timeout`, bounds each attempt end to end (DNS, connect, handshake, request,
//!   response head, body), enforced on every socket read and write.
//! - Redirects are followed here, not by ureq, so each hop is measured, counted and checked for
//!   loops; `Authorization` and `Cookie` are not sent to another host.
//! - The body is read as raw bytes up to `body_cap` (one more byte tells truncation). No
//!   `Accept-Encoding` is sent and nothing is decompressed, so a gzip bomb is read as its few
//!   compressed bytes.

mod buffers;
mod transport;
pub mod x509;

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ureq::Agent;
use ureq::http::{self, Response};

use crate::config::{AgentConfig, Config, Target};
use crate::result::{CheckResult, FailureReason};
use crate::rules::{RuleInput, RuleSet, Verdict};
use crate::util::ms;

use transport::{
    ConnFacts, HopLog, ProbeConnector, ProbeResolver, SharedLog, TlsConnectors, with_log,
};

pub use buffers::release_pooled as release_pooled_buffers;
pub use transport::server_hello_version;

/// The response head may not be larger than this: a 1 MB header is a `protocol` failure, not
/// a memory spike.
pub const MAX_RESPONSE_HEADER: usize = 64 * 1024;

/// ureq's per-connection buffers. Its defaults (128 KiB each) are allocated and zeroed for
/// every connection, which with a fresh connection per check was 60% of the instructions of a
/// check (callgrind, bench/README.md). The input buffer must hold the largest response head
/// we accept (a larger one is then `LargeResponseHeader`, not "no progress"); the output
/// buffer holds the request head: the URL (or a redirect's), the configured headers, ours.
const INPUT_BUFFER: usize = MAX_RESPONSE_HEADER + 4 * 1024;
const OUTPUT_BUFFER_MIN: usize = 32 * 1024;

/// Idle connections kept per keep-alive target.
const KEEP_ALIVE_IDLE: usize = 2;

/// Makes checks. Shared by the worker threads (`&self`, `Sync`).
pub struct Prober {
    agent_id: String,
    /// `[agent] location`, copied into every record.
    location: Option<String>,
    user_agent: String,
    body_cap: usize,
    retry_delay: Duration,
    rules: RuleSet,
    /// TLS connectors by (CA file, insecure), built with the prober ([`Prober::for_config`]).
    tls: Arc<TlsConnectors>,
    /// ureq agents of `keep_alive` targets, so their connections outlive one check.
    kept: Mutex<HashMap<String, Arc<Client>>>,
}

/// A ureq agent wired to our measuring resolver and connector, and the log they write.
struct Client {
    agent: Agent,
    log: SharedLog,
}

/// Where a hop failed: the reason and a human text.
type Failure = (FailureReason, String);

/// What one attempt saw of the final response.
#[derive(Default)]
struct Seen {
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Phase durations summed over the hops of an attempt.
#[derive(Default)]
struct Phases {
    dns: Option<Duration>,
    connect: Option<Duration>,
    tls: Option<Duration>,
    ttfb: Option<Duration>,
    transfer: Option<Duration>,
}

fn add(sum: &mut Option<Duration>, part: Option<Duration>) {
    if let Some(p) = part {
        *sum = Some(sum.unwrap_or_default() + p);
    }
}

/// The address of the last connection and the TLS facts of the last TLS one, into the record.
fn record_connection(r: &mut CheckResult, conn: Option<&ConnFacts>, tls: Option<&ConnFacts>) {
    if let Some(conn) = conn {
        r.remote_ip = Some(conn.remote.ip().to_string());
    }
    if let Some(conn) = tls {
        r.tls_version = conn.tls_version.map(str::to_string);
        if let Some(cert) = &conn.cert {
            r.cert_issuer = Some(cert.issuer.clone());
            r.cert_not_after = Some(crate::util::format_rfc3339_ms(cert.not_after_ms));
            let left_ms = cert.not_after_ms - crate::util::unix_ms_now();
            r.cert_days_left = Some(left_ms as f64 / 86_400_000.0);
        }
    }
}

impl Phases {
    /// The phases into the record's timings, in milliseconds.
    fn record(&self, r: &mut CheckResult) {
        r.timings.dns = self.dns.map(ms);
        r.timings.connect = self.connect.map(ms);
        r.timings.tls = self.tls.map(ms);
        r.timings.ttfb = self.ttfb.map(ms);
        r.timings.transfer = self.transfer.map(ms);
    }

    /// Adds one hop; `end` is when its body was read (or the hop gave up), if it got that far.
    fn add_hop(&mut self, log: &HopLog, end: Option<Instant>) {
        add(&mut self.dns, log.dns);
        add(&mut self.connect, log.connect);
        add(&mut self.tls, log.tls);
        if let (Some(sent), Some(first)) = (log.request_sent, log.first_byte) {
            add(&mut self.ttfb, Some(first.saturating_duration_since(sent)));
            if let Some(end) = end {
                add(
                    &mut self.transfer,
                    Some(end.saturating_duration_since(first)),
                );
            }
        }
    }
}

impl Prober {
    /// The prober of a loaded (or reloaded) config: the TLS connectors its targets can need are
    /// built here, once, so that no check pays for loading a root store (85-250 ms each) or
    /// waits behind another check doing it. A target that may reach TLS is an https one or one
    /// that follows redirects (http → https is the common case).
    pub fn for_config(config: &Config, rules: RuleSet) -> Prober {
        let keys = config
            .targets
            .iter()
            .map(|t| &**t)
            // Only https targets: a root store costs resident memory (bench section 6 keeps
            // an agent of 100 plain-http targets under 10 MB), and an http target that is
            // redirected to https builds its connector then, timed in that check's `tls`.
            .filter(|t| {
                t.url
                    .get(..8)
                    .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            })
            // `/probe` modules too: their URLs come with each scrape, so any may meet TLS, and
            // a scrape is timed like a check (the first one measured 97 ms of `tls` building
            // the connector, 3-6 ms after). Only for the modules a user wrote, never the
            // default module, so `[metrics]` alone loads no root store.
            .chain((config.metrics.iter()).flat_map(|m| m.modules.values()))
            .map(|t| (t.tls_ca_file.clone(), t.tls_insecure));
        Prober {
            tls: Arc::new(TlsConnectors::for_keys(keys)),
            ..Prober::new(&config.agent, rules)
        }
    }

    /// A prober for targets it is not told about in advance: each TLS connector is built by
    /// the first check that needs it (its time counted in that check's `tls` phase). Long-lived
    /// agents use [`Prober::for_config`].
    pub fn new(agent: &AgentConfig, rules: RuleSet) -> Prober {
        Prober {
            agent_id: agent.id.clone(),
            location: agent.location.clone(),
            user_agent: agent.user_agent.clone(),
            body_cap: agent.body_cap,
            retry_delay: agent.retry_delay,
            rules,
            tls: Arc::default(),
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// How many TLS connectors this prober has built so far (each one loaded a root store).
    pub fn tls_connectors_built(&self) -> usize {
        self.tls.built()
    }

    /// Checks `target` once (with its retries), never panicking on anything the server sends.
    ///
    /// Each attempt is bounded by the target's timeout; attempts are separated by the agent's
    /// `retry_delay`; an attempt that is up ends the check. The last attempt's record is
    /// returned, with `attempt` = tries made, `started_at` = start of the first try and
    /// `timings.total` covering all of them.
    pub fn check(&self, target: &Target) -> CheckResult {
        let started = Instant::now();
        let mut first_started_at = None;
        let mut attempt = 1;
        loop {
            let mut record = self.attempt(target);
            record.attempt = attempt;
            match &first_started_at {
                None => first_started_at = Some(record.started_at.clone()),
                Some(at) => record.started_at = at.clone(),
            }
            if record.up || attempt > target.retries {
                record.timings.total = ms(started.elapsed());
                return record;
            }
            log::info!(
                "target {}: attempt {attempt} down ({}), retrying in {:?}",
                target.id,
                record.error.as_deref().unwrap_or("no error text"),
                self.retry_delay
            );
            std::thread::sleep(self.retry_delay);
            attempt += 1;
        }
    }

    fn client(&self, target: &Target) -> Arc<Client> {
        if !target.keep_alive {
            return Arc::new(self.new_client(target));
        }
        // The key holds everything the agent is built from, so a reloaded target with other
        // settings gets a new agent.
        let key = format!(
            "{}\n{:?}\n{:?}\n{}\n{}",
            target.id, target.ip, target.tls_ca_file, target.tls_insecure, target.url
        );
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.entry(key)
            .or_insert_with(|| Arc::new(self.new_client(target)))
            .clone()
    }

    fn new_client(&self, target: &Target) -> Client {
        let idle = if target.keep_alive {
            KEEP_ALIVE_IDLE
        } else {
            0
        };
        // Room for the configured headers on top of a generous URL, so a long header set in the
        // config can never overflow the request head.
        let configured: usize = target
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum();
        let output_buffer = OUTPUT_BUFFER_MIN + configured + target.url.len();
        let config = Agent::config_builder()
            // Every status is a result, not an error.
            .http_status_as_error(false)
            // Redirects are followed (and measured) by `attempt`.
            .max_redirects(0)
            .user_agent(self.user_agent.as_str())
            // No Accept-Encoding: bodies arrive (and are capped) as sent; nothing to inflate.
            .accept_encoding("")
            .max_response_header_size(MAX_RESPONSE_HEADER)
            .input_buffer_size(INPUT_BUFFER)
            .output_buffer_size(output_buffer)
            // 0 = a fresh connection per check, so connect and TLS are measured every time.
            .max_idle_connections(idle)
            .max_idle_connections_per_host(idle)
            .timeout_global(Some(target.timeout))
            // Checks go straight to the target: a probe measures the site, not a proxy. Our
            // connector has no proxy support, and with a proxy from the environment
            // (`http_proxy`, read on every build of this config) ureq would skip our resolver
            // and every check would fail with "connect to no address".
            .proxy(None)
            .build();
        let log: SharedLog = Arc::default();
        let connector = ProbeConnector {
            tls: self.tls.clone(),
            tls_key: (target.tls_ca_file.clone(), target.tls_insecure),
            log: log.clone(),
        };
        let resolver = ProbeResolver {
            family: target.ip,
            log: log.clone(),
        };
        Client {
            agent: Agent::with_parts(config, connector, resolver),
            log,
        }
    }

    /// One try: the request, its redirects, the body, the verdict.
    fn attempt(&self, target: &Target) -> CheckResult {
        let started = Instant::now();
        let deadline = started + target.timeout;
        // A `user:password@` in the URL never reaches the record or an error text.
        let mut r = CheckResult::new(
            &target.id,
            &redact(&target.url),
            &self.agent_id,
            target.method,
        );
        r.location.clone_from(&self.location);
        r.tags = target.tags.clone();
        r.regex = target.regex.as_ref().map(|re| re.as_str().to_string());
        let client = self.client(target);

        let mut hop = HopRequest {
            url: target.url.clone(),
            method: target.method.to_string(),
            body: target.body.clone(),
            headers: target.headers.clone(),
        };
        let mut visited = vec![hop.url.clone()];
        let mut phases = Phases::default();
        let mut seen = Seen::default();
        let mut last_conn: Option<Arc<ConnFacts>> = None;
        let mut last_tls: Option<Arc<ConnFacts>> = None;

        let failure: Option<Failure> = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break Some((
                    FailureReason::Timeout,
                    format!(
                        "timed out after {} (while following redirects)",
                        secs(target.timeout)
                    ),
                ));
            }
            with_log(&client.log, |l| *l = HopLog::default());
            let sent = send(&client.agent, &hop, remaining, !target.keep_alive);
            let log = with_log(&client.log, |l| l.clone());
            if let Some(conn) = &log.conn {
                last_conn = Some(conn.clone());
                if conn.tls_version.is_some() || conn.cert.is_some() {
                    last_tls = Some(conn.clone());
                }
            }
            r.final_url = Some(redact(&hop.url));
            let mut response = match sent {
                Ok(resp) => resp,
                Err(e) => {
                    phases.add_hop(&log, Some(Instant::now()));
                    let body_len = hop.body.as_deref().map_or(0, str::len) as u64;
                    break Some(classify(e, &log, target.timeout, body_len));
                }
            };
            let status = response.status().as_u16();
            seen.status = Some(status);
            r.status = Some(status);
            r.http_version = Some(version_text(response.version()));
            seen.headers = crate::rules::header_pairs(response.headers());
            if let Some(failure) = framing_failure(status, response.headers()) {
                phases.add_hop(&log, None);
                break Some(failure);
            }

            let location = response
                .headers()
                .get(http::header::LOCATION)
                .map(|v| v.as_bytes().to_vec());
            if let (true, true, Some(location)) =
                (target.follow_redirects, is_redirect(status), location)
            {
                // The redirect's own body is not read: the connection is dropped with it.
                phases.add_hop(&log, None);
                let next = match next_hop(
                    target,
                    &hop.url,
                    &location,
                    status,
                    &mut visited,
                    r.redirects,
                ) {
                    Ok(next) => next,
                    Err(failure) => break Some(failure),
                };
                r.redirects += 1;
                hop.redirect(next, status);
                continue;
            }

            let read = read_capped(response.body_mut().as_reader(), self.body_cap);
            let end = Instant::now();
            phases.add_hop(&with_log(&client.log, |l| l.clone()), Some(end));
            seen.body = read.bytes;
            r.body_bytes = seen.body.len() as u64;
            r.body_truncated = read.truncated;
            break read.error.map(|e| {
                let log = with_log(&client.log, |l| l.clone());
                classify_body(e, &log, target.timeout, r.body_bytes)
            });
        };

        record_connection(&mut r, last_conn.as_deref(), last_tls.as_deref());
        phases.record(&mut r);
        self.judge(target, &mut r, &seen, failure, started);
        r.timings.total = ms(started.elapsed());
        log::debug!(
            "target {} {}: up={} status={:?} failure={:?} total={:.1}ms",
            target.id,
            r.url,
            r.up,
            r.status,
            r.failure,
            r.timings.total
        );
        r
    }

    /// Decides `up` and `failure` from what the attempt saw, the rule, the status and regexes.
    fn judge(
        &self,
        target: &Target,
        r: &mut CheckResult,
        seen: &Seen,
        failure: Option<Failure>,
        started: Instant,
    ) {
        let mut rule_verdict = None;
        if let Some(name) = &target.rule {
            let url = r.final_url.clone().unwrap_or_else(|| r.url.clone());
            let input = RuleInput {
                status: seen.status.unwrap_or(0),
                elapsed_ms: started.elapsed().as_millis().min(u32::MAX as u128) as u32,
                body_truncated: r.body_truncated,
                tls: url.starts_with("https://"),
                url: &url,
                headers: &seen.headers,
                body: &seen.body,
                error: failure.as_ref().map(|f| f.1.as_str()),
            };
            r.rule = Some(name.clone());
            match self.rules.evaluate(name, &input) {
                Ok(out) => {
                    r.rule_hash = Some(out.hash);
                    r.rule_verdict = Some(out.verdict.as_str().to_string());
                    r.rule_reason = out.reason.clone();
                    r.rule_extra = out.extra;
                    r.rule_ms = Some(out.elapsed_ms);
                    rule_verdict = Some(Ok((out.verdict, out.reason)));
                }
                Err(e) => {
                    r.rule_hash = e.hash.clone();
                    r.rule_verdict = Some("error".into());
                    r.rule_reason = Some(e.message.clone());
                    r.rule_ms = Some(e.elapsed_ms);
                    rule_verdict = Some(Err(e.to_string()));
                }
            }
        }

        // Transport failures stay down whatever the rule said: it cannot make them up.
        if let Some((reason, text)) = failure {
            r.fail(reason, text);
            return;
        }
        match rule_verdict {
            Some(Ok((Verdict::Up, _))) => {
                r.up = true;
                return;
            }
            Some(Ok((Verdict::Down, reason))) => {
                let name = target.rule.as_deref().unwrap_or("");
                let text = match reason {
                    Some(reason) => format!("rule {name}: down: {reason}"),
                    None => format!("rule {name}: down"),
                };
                r.fail(FailureReason::Rule, text);
                return;
            }
            Some(Err(text)) => {
                r.fail(FailureReason::Rule, text);
                return;
            }
            Some(Ok((Verdict::Unknown, _))) | None => {}
        }

        let status = seen.status.unwrap_or(0);
        if let Some(re) = &target.regex {
            r.regex_matched = Some(re.is_match(&seen.body));
        }
        let truncated_note = if r.body_truncated {
            format!(
                " (in the first {} bytes: the body was cut at the cap)",
                r.body_bytes
            )
        } else {
            String::new()
        };
        if !target.expect_status.contains(status) {
            r.fail(
                FailureReason::HttpStatus,
                format!(
                    "status {status}, expected {} (from {})",
                    target.expect_status,
                    r.final_url.as_deref().unwrap_or(&r.url)
                ),
            );
        } else if r.regex_matched == Some(false) {
            let pattern = target.regex.as_ref().map(|re| re.as_str()).unwrap_or("");
            r.fail(
                FailureReason::BodyMismatch,
                format!("body does not match regex {pattern:?}{truncated_note}"),
            );
        } else if let Some(absent) = target
            .regex_absent
            .as_ref()
            .filter(|re| re.is_match(&seen.body))
        {
            r.fail(
                FailureReason::BodyMismatch,
                format!(
                    "body matches regex_absent {:?}{truncated_note}",
                    absent.as_str()
                ),
            );
        } else {
            r.up = true;
        }
    }
}

/// A response we must not judge: one whose body framing is ambiguous, or a protocol switch we
/// never asked for. `None` for an ordinary response.
///
/// `Transfer-Encoding` lines form one list (RFC 9110 §5.3); RFC 9112 §6.1 has chunked last and
/// once. ureq reads any list that contains `chunked` as chunked, so `chunked, deflate` was read
/// as chunked (up when the bytes happened to look chunked, a stall when not). Whatever we did
/// with such a body would be a guess, so it is a `protocol` failure, every time.
fn framing_failure(status: u16, headers: &http::HeaderMap) -> Option<Failure> {
    if status == 101 {
        // ureq hands a 101 back as a response; we never send `Upgrade`, so it is a broken
        // server (or something that is not HTTP/1.1 behind it), never a page.
        return Some((
            FailureReason::Protocol,
            "unsolicited 101 Switching Protocols (the probe never asks to switch)".into(),
        ));
    }
    let lines: Vec<&http::HeaderValue> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    if lines.is_empty() {
        return None;
    }
    let texts: Vec<String> = lines
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let codings: Vec<String> = texts
        .iter()
        .flat_map(|t| t.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    let chunked = codings.iter().filter(|c| *c == "chunked").count();
    if chunked == 1 && codings.last().is_some_and(|c| c == "chunked") {
        return None;
    }
    let shown = texts
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let lines_note = if lines.len() > 1 {
        format!(" in {} header lines", lines.len())
    } else {
        String::new()
    };
    Some((
        FailureReason::Protocol,
        format!(
            "ambiguous body framing: Transfer-Encoding {shown}{lines_note} does not end in a single chunked"
        ),
    ))
}

/// Where a redirect leads, or why it is not followed: an unusable `Location`, a loop (a URL
/// already visited in this attempt), or one redirect more than `max_redirects`.
fn next_hop(
    target: &Target,
    url: &str,
    location: &[u8],
    status: u16,
    visited: &mut Vec<String>,
    redirects: u32,
) -> Result<String, Failure> {
    let unusable = |why: String| {
        (
            FailureReason::Protocol,
            format!(
                "status {status} from {} has an unusable Location header {:?}: {why}",
                redact(url),
                redact(&String::from_utf8_lossy(location))
            ),
        )
    };
    let Some(next) = join_url(url, &encode_location(location)) else {
        return Err(unusable("not an http(s) URL".into()));
    };
    // Checked here so that a Location ureq cannot send fails as the Location it is, not as an
    // invalid request of our own.
    if let Err(e) = next.parse::<http::Uri>() {
        return Err(unusable(e.to_string()));
    }
    if visited.contains(&next) {
        visited.push(next);
        let chain: Vec<String> = visited.iter().map(|u| redact(u)).collect();
        return Err((
            FailureReason::TooManyRedirects,
            format!("redirect loop: {}", chain.join(" -> ")),
        ));
    }
    if redirects >= target.max_redirects {
        return Err((
            FailureReason::TooManyRedirects,
            format!(
                "more than {} redirects (the last one: {} -> {})",
                target.max_redirects,
                redact(url),
                redact(&next)
            ),
        ));
    }
    visited.push(next.clone());
    Ok(next)
}

/// What one hop sends; a redirect changes it for the next.
struct HopRequest {
    url: String,
    method: String,
    body: Option<String>,
    headers: Vec<(String, String)>,
}

impl HopRequest {
    /// Goes on to `next` as browsers do: after a 303, or a 301/302 answering a POST, as GET
    /// without body; `Authorization` and `Cookie` are not sent to another host.
    fn redirect(&mut self, next: String, status: u16) {
        if status == 303 || ((status == 301 || status == 302) && self.method == "POST") {
            if self.method != "HEAD" {
                self.method = "GET".into();
            }
            self.body = None;
        }
        if authority(&next) != authority(&self.url) {
            self.headers.retain(|(k, _)| {
                !k.eq_ignore_ascii_case("authorization") && !k.eq_ignore_ascii_case("cookie")
            });
        }
        self.url = next;
    }
}

/// Sends one request; a `body` of `None` sends none (ureq refuses a body on some methods
/// unless asked, and an empty body would still add `Content-Length: 0`). `close` asks the
/// server to close the connection after the response (unless the target sets `Connection`).
fn send(
    agent: &Agent,
    hop: &HopRequest,
    timeout: Duration,
    close: bool,
) -> Result<Response<ureq::Body>, ureq::Error> {
    let headers = &hop.headers;
    let mut builder = http::Request::builder()
        .method(hop.method.as_str())
        .uri(hop.url.as_str());
    for (name, value) in headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    // A connection used once says so: the server frees it with the response instead of holding
    // it for a next request, and it (not the agent) keeps the TIME_WAIT, so a busy agent does
    // not pile up closed sockets. bench/README.md has the numbers.
    if close
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        builder = builder.header(http::header::CONNECTION, "close");
    }
    match hop.body.as_deref() {
        Some(bytes) => {
            let request = builder.body(bytes.as_bytes().to_vec())?;
            let request = agent
                .configure_request(request)
                .timeout_global(Some(timeout))
                .build();
            agent.run(request)
        }
        None => {
            let request = builder.body(())?;
            let request = agent
                .configure_request(request)
                .timeout_global(Some(timeout))
                .build();
            agent.run(request)
        }
    }
}

/// The body as read: at most the cap, whether more was there, and why reading stopped early.
struct CappedBody {
    bytes: Vec<u8>,
    truncated: bool,
    error: Option<std::io::Error>,
}

/// Reads up to `cap` bytes, then one more to learn whether the body was longer.
fn read_capped(mut reader: impl Read, cap: usize) -> CappedBody {
    // Reads go through a per-thread scratch buffer, zeroed once when the thread first reads. A
    // `read_to_end` into spare capacity looks free but is not: ureq's reader cannot take
    // uninitialised memory, so std zeroes up to 8 KiB before every read (callgrind: about 8,000
    // instructions of memset per check for a 0.6 KB page, 8% of the whole check).
    thread_local! {
        static SCRATCH: std::cell::RefCell<Box<[u8]>> =
            std::cell::RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
    }
    let limit = cap.saturating_add(1);
    let mut bytes = Vec::new();
    let mut error = None;
    SCRATCH.with_borrow_mut(|scratch| {
        while bytes.len() < limit {
            let want = (limit - bytes.len()).min(scratch.len());
            match reader.read(&mut scratch[..want]) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // What was read before the error is kept.
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
    });
    let truncated = bytes.len() > cap;
    bytes.truncate(cap);
    CappedBody {
        bytes,
        truncated,
        error: if truncated { None } else { error },
    }
}

/// Size of the per-thread read buffer of [`read_capped`]: a typical page in one or two reads.
const SCRATCH_LEN: usize = 16 * 1024;

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// What the hop was doing when it stopped, for timeout texts; `body_len` is the size of the
/// request body being sent.
fn phase_of(log: &HopLog, body_len: u64) -> String {
    if log.conn.is_none() {
        "connecting".into()
    } else if log.head_bytes.is_none() {
        "sending the request header".into()
    } else if log.body_sent < body_len {
        format!(
            "sending the request body, {} of {body_len} bytes sent",
            log.body_sent
        )
    } else if log.first_byte.is_none() {
        "waiting for the response".into()
    } else {
        "reading the response header".into()
    }
}

/// Maps a ureq error of one hop to a failure reason and text. Our resolver and connector
/// classify their own failures first (ureq sees only a generic error for them).
fn classify(err: ureq::Error, log: &HopLog, timeout: Duration, body_len: u64) -> Failure {
    if let Some(f) = &log.failure {
        return f.clone();
    }
    let timed_out = log.timed_out
        || matches!(&err, ureq::Error::Timeout(_))
        || matches!(&err, ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut);
    if timed_out {
        return (
            FailureReason::Timeout,
            format!(
                "timed out after {} {}",
                secs(timeout),
                phase_of(log, body_len)
            ),
        );
    }
    match err {
        ureq::Error::LargeResponseHeader(_, limit) => (
            FailureReason::Protocol,
            format!("response header larger than {limit} bytes"),
        ),
        ureq::Error::Protocol(e) => (
            FailureReason::Protocol,
            format!("invalid HTTP response: {e}"),
        ),
        ureq::Error::HostNotFound => (FailureReason::Dns, "host not found".into()),
        ureq::Error::Io(e) if log.request_sent.is_some() => (
            FailureReason::Protocol,
            format!("connection failed before a complete response header: {e}"),
        ),
        ureq::Error::Io(e) => (FailureReason::Connect, format!("connection failed: {e}")),
        ureq::Error::BadUri(text) => (FailureReason::Protocol, format!("invalid URL: {text}")),
        ureq::Error::Http(e) => (FailureReason::Protocol, format!("invalid request: {e}")),
        other => (FailureReason::Internal, other.to_string()),
    }
}

/// A body read that stopped early: past the deadline it is `timeout`, else `body_read`.
fn classify_body(err: std::io::Error, log: &HopLog, timeout: Duration, read: u64) -> Failure {
    let err = ureq::Error::from(err);
    let timed_out = log.timed_out
        || matches!(&err, ureq::Error::Timeout(_))
        || matches!(&err, ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut);
    if timed_out {
        (
            FailureReason::Timeout,
            format!(
                "timed out after {} reading the body ({read} bytes read)",
                secs(timeout)
            ),
        )
    } else {
        (
            FailureReason::BodyRead,
            format!("body read failed after {read} bytes: {err}"),
        )
    }
}

fn version_text(v: http::Version) -> String {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
    .to_string()
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// The URL without any `user:password@` part.
fn redact(url: &str) -> String {
    crate::util::redact_url(url)
}

/// `scheme://authority` of an absolute URL (lower-cased), to tell whether a redirect leaves
/// the host.
fn authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let auth = rest.split(['/', '?', '#']).next()?;
    Some(format!("{scheme}://{auth}").to_ascii_lowercase())
}

/// A `Location` value as browsers and curl use it: bytes that may not appear in a URI (space,
/// controls, non-ASCII and the delimiters RFC 3986 §2 leaves out, such as `"`, `<`, `|`)
/// percent-encoded, everything else (`%` included) as sent.
/// `/a b` is a common server bug that every browser follows as `/a%20b`.
fn encode_location(raw: &[u8]) -> String {
    let raw = raw.trim_ascii();
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        if b <= b' ' || b >= 0x7f || b"\"<>\\^`{|}".contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// Resolves a `Location` against the URL that sent it (RFC 3986 §5.2, the common cases), and
/// drops any fragment. `None` when the result would not be an http(s) URL.
fn join_url(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    let location = location.split('#').next().unwrap_or("");
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Some(location.to_string());
    }
    if lower.contains("://") || lower.starts_with("javascript:") {
        return None;
    }
    let (scheme, rest) = base.split_once("://")?;
    let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(auth_len);
    let path = tail.split(['?', '#']).next().unwrap_or("");
    if let Some(net) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{net}"));
    }
    if location.is_empty() {
        let tail = tail.split('#').next().unwrap_or("");
        return Some(format!("{scheme}://{auth}{tail}"));
    }
    if location.starts_with('?') {
        let path = if path.is_empty() { "/" } else { path };
        return Some(format!("{scheme}://{auth}{path}{location}"));
    }
    let (loc_path, query) = match location.find('?') {
        Some(i) => location.split_at(i),
        None => (location, ""),
    };
    let merged = if loc_path.starts_with('/') {
        loc_path.to_string()
    } else {
        let dir = match path.rfind('/') {
            Some(i) => &path[..=i],
            None => "/",
        };
        format!("{dir}{loc_path}")
    };
    Some(format!(
        "{scheme}://{auth}{}{query}",
        remove_dot_segments(&merged)
    ))
}

/// `/a/b/../c/./d` → `/a/c/d`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_locations() {
        let check = |base: &str, location: &str, want: Option<&str>| {
            assert_eq!(
                join_url(base, location).as_deref(),
                want,
                "{base} + {location}"
            );
        };
        let base = "http://h:8080/a/b/c?q=1";
        check(base, "https://other/x", Some("https://other/x"));
        check(base, "HTTP://Other/x", Some("HTTP://Other/x"));
        check(base, "//other:1/x", Some("http://other:1/x"));
        check(base, "/x/y?z", Some("http://h:8080/x/y?z"));
        check(base, "d", Some("http://h:8080/a/b/d"));
        check(base, "../d", Some("http://h:8080/a/d"));
        check(base, "./", Some("http://h:8080/a/b/"));
        check(base, "../../../../d", Some("http://h:8080/d"));
        check(base, "?p=2", Some("http://h:8080/a/b/c?p=2"));
        check(base, "/x#frag", Some("http://h:8080/x"));
        check("http://h", "x", Some("http://h/x"));
        check("http://h", "?a", Some("http://h/?a"));
        check(base, "ftp://h/x", None);
        check(base, "javascript:alert(1)", None);
    }

    #[test]
    fn encodes_what_a_uri_cannot_hold_in_locations() {
        let check = |raw: &[u8], want: &str| assert_eq!(encode_location(raw), want);
        check(b" /a b ", "/a%20b");
        check(b"/caf\xc3\xa9?q=a|b", "/caf%C3%A9?q=a%7Cb");
        check(b"/ok%20already?x=1&y=/z", "/ok%20already?x=1&y=/z");
        check(b"/x\ty\"<>\\^`{}", "/x%09y%22%3C%3E%5C%5E%60%7B%7D");
    }

    #[test]
    fn prober_is_shared_by_worker_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Prober>();
    }

    #[test]
    fn redacts_credentials_in_urls() {
        let check = |url: &str, want: &str| assert_eq!(redact(url), want);
        check("https://u:p@h:1/x?y@z", "https://h:1/x?y@z");
        check("http://h/a@b", "http://h/a@b");
        check("http://u@h", "http://h");
        check("/relative", "/relative");
    }

    #[test]
    fn authority_compares_scheme_host_and_port() {
        assert_eq!(authority("http://H:1/x?y"), Some("http://h:1".into()));
        assert_ne!(authority("http://h/x"), authority("https://h/x"));
        assert_eq!(authority("http://h?x"), Some("http://h".into()));
    }

    #[test]
    fn reads_at_most_the_cap() {
        let check = |body: &[u8], cap: usize, want_len: usize, truncated: bool| {
            let read = read_capped(body, cap);
            assert_eq!(read.bytes.len(), want_len, "cap {cap}");
            assert_eq!(read.truncated, truncated, "cap {cap}");
            assert!(read.error.is_none());
        };
        let body = vec![7u8; 100_000];
        check(&body, 10, 10, true);
        check(&body, 99_999, 99_999, true);
        check(&body, 100_000, 100_000, false);
        check(&body, 1 << 20, 100_000, false);
        check(b"", 10, 0, false);
    }

    /// Hands out `chunks` one per read, then fails; `Interrupted` first of all.
    struct Chunks {
        chunks: Vec<Vec<u8>>,
        interrupted: bool,
    }

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            if self.chunks.is_empty() {
                return Err(std::io::Error::other("connection reset"));
            }
            let mut chunk = self.chunks.remove(0);
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.insert(0, chunk.split_off(n));
            }
            Ok(n)
        }
    }

    #[test]
    fn keeps_what_came_before_an_error_and_retries_interrupted_reads() {
        let chunks = vec![vec![1u8; 10], vec![2u8; 40_000], vec![3u8; 5]];
        let read = read_capped(
            Chunks {
                chunks: chunks.clone(),
                interrupted: false,
            },
            1 << 20,
        );
        assert_eq!(read.bytes, chunks.concat());
        assert!(!read.truncated);
        assert_eq!(
            read.error.map(|e| e.to_string()),
            Some("connection reset".into())
        );

        // Past the cap the error does not matter: the body was longer than we keep anyway.
        let read = read_capped(
            Chunks {
                chunks: chunks.clone(),
                interrupted: false,
            },
            20,
        );
        assert_eq!(read.bytes, chunks.concat()[..20]);
        assert!(read.truncated && read.error.is_none());
    }

    #[test]
    fn phases_sum_over_hops_and_stay_absent_when_not_measured() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let hop = |dns: Option<u64>, tls: Option<u64>, sent: u64, first: u64| HopLog {
            dns: dns.map(Duration::from_millis),
            connect: Some(Duration::from_millis(2)),
            tls: tls.map(Duration::from_millis),
            request_sent: Some(at(sent)),
            first_byte: Some(at(first)),
            ..HopLog::default()
        };
        let mut p = Phases::default();
        p.add_hop(&hop(None, None, 10, 15), None); // a redirect: body not read
        assert_eq!(p.dns, None);
        assert_eq!(p.tls, None);
        assert_eq!(p.ttfb, Some(Duration::from_millis(5)));
        assert_eq!(p.transfer, None);
        p.add_hop(&hop(Some(3), Some(4), 30, 40), Some(at(47)));
        assert_eq!(p.dns, Some(Duration::from_millis(3)));
        assert_eq!(p.connect, Some(Duration::from_millis(4)));
        assert_eq!(p.tls, Some(Duration::from_millis(4)));
        assert_eq!(p.ttfb, Some(Duration::from_millis(15)));
        assert_eq!(p.transfer, Some(Duration::from_millis(7)));
        // A hop that never got a response adds no ttfb/transfer.
        p.add_hop(&HopLog::default(), Some(at(60)));
        assert_eq!(p.ttfb, Some(Duration::from_millis(15)));
    }

    #[test]
    fn classifies_errors() {
        let check = |err: ureq::Error, log: HopLog, reason: FailureReason, text: &str| {
            let (got, got_text) = classify(err, &log, Duration::from_secs(2), 100);
            assert_eq!(got, reason);
            assert!(got_text.contains(text), "{got_text:?} lacks {text:?}");
        };
        let conn = Arc::new(ConnFacts {
            remote: "127.0.0.1:80".parse().unwrap(),
            tls_version: None,
            cert: None,
        });
        let sent = HopLog {
            request_sent: Some(Instant::now()),
            conn: Some(conn.clone()),
            head_bytes: Some(70),
            body_sent: 100,
            ..HopLog::default()
        };
        let sending = HopLog {
            body_sent: 40,
            ..sent.clone()
        };
        check(
            ureq::Error::Timeout(ureq::Timeout::SendBody),
            sending,
            FailureReason::Timeout,
            "timed out after 2.0s sending the request body, 40 of 100 bytes sent",
        );
        let head = HopLog {
            conn: Some(conn),
            ..HopLog::default()
        };
        check(
            ureq::Error::Timeout(ureq::Timeout::SendRequest),
            head,
            FailureReason::Timeout,
            "sending the request header",
        );
        check(
            ureq::Error::LargeResponseHeader(70_000, 65_536),
            sent.clone(),
            FailureReason::Protocol,
            "response header larger than 65536 bytes",
        );
        check(
            ureq::Error::Timeout(ureq::Timeout::Global),
            sent.clone(),
            FailureReason::Timeout,
            "timed out after 2.0s waiting for the response",
        );
        check(
            ureq::Error::Io(std::io::Error::other("reset")),
            sent,
            FailureReason::Protocol,
            "before a complete response header",
        );
        let own = HopLog {
            failure: Some((FailureReason::Tls, "handshake".into())),
            ..HopLog::default()
        };
        check(ureq::Error::Tls("x"), own, FailureReason::Tls, "handshake");
    }
}
