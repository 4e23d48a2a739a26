//! `sitewatch serve`: the status page (`/`, `/target/<id>`), shields-style badges
//! (`/badge/<id>/status.svg`, `uptime.svg?window=24h|7d|30d`, `response.svg`) and
//! `/api/v1/status` (JSON, versioned by its path and a `version` field), read from PostgreSQL
//! on the shared listener ([`crate::httpd`]: connection cap, head size and deadline).
//!
//! Bounded work: one database session serves every request, one at a time (the connection
//! cap bounds who waits for it), each statement under a timeout, each list capped
//! ([`data::MAX_TARGETS`]); an answer is cached for [`CACHE_TTL`], so a burst of page views
//! costs one set of queries.
//!
//! Architecture Invariant: `serve` cannot write. Its session is `default_transaction_read_only`
//! and every request reads in a READ ONLY transaction; the listener answers GET and HEAD only.
//!
//! Not here: the rollups themselves (the sink writes them, `sink::rollup`).

pub mod badge;
pub mod data;
pub mod html;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::Client;

use crate::config::{Config, PostgresConfig};
use crate::httpd::{self, Handler, Head, Response, ServerError};
use crate::service::Shutdown;
use crate::sink::SinkError;
use crate::sink::rollup::quantile;
use crate::util::{format_rfc3339_ms, unix_ms_now};
use data::{HOUR_MS, Selection, TargetView};

/// How long an answer is reused: a page refresh storm costs one set of queries per path.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Cached answers at most, and their bytes at most; on overflow the cache starts over, so its
/// memory is bounded whatever the requests (a request with a new query string is a new entry).
const CACHE_ENTRIES: usize = 256;
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// `?page=` beyond this is refused: an OFFSET that large is work without a reader.
const MAX_PAGE: i64 = 1000;
/// A `?tag=` or a target id longer than this cannot exist (ids come from configs).
const MAX_NAME: usize = 256;

/// `sitewatch serve` could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// The config lacks `[serve]` or `[postgres]`.
    NotConfigured { section: &'static str },
    /// The first database connection failed.
    Database(SinkError),
    /// The listener could not start.
    Listen(ServerError),
}

impl ServeError {
    /// A config that can never run as it is (exit 78).
    pub fn is_config(&self) -> bool {
        matches!(self, ServeError::NotConfigured { .. })
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::NotConfigured { section } => {
                write!(f, "serve: the config has no [{section}] section")
            }
            ServeError::Database(e) => write!(f, "serve: {e}"),
            ServeError::Listen(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServeError::NotConfigured { .. } => None,
            ServeError::Database(e) => Some(e),
            ServeError::Listen(e) => Some(e),
        }
    }
}

/// The running server.
pub struct Server {
    pub addr: std::net::SocketAddr,
}

impl Server {
    /// Connects to PostgreSQL (read-only session) and starts the `serve` listener.
    pub fn start(config: &Config) -> Result<Server, ServeError> {
        let serve =
            (config.serve.as_ref()).ok_or(ServeError::NotConfigured { section: "serve" })?;
        let pg = (config.postgres.clone()).ok_or(ServeError::NotConfigured {
            section: "postgres",
        })?;
        let client = connect(&pg).map_err(ServeError::Database)?;
        let pages = Arc::new(Pages {
            pg,
            sessions: Mutex::new(Sessions {
                main: Some(client),
                helper: None,
            }),
            cache: Mutex::new(Cache::default()),
        });
        let addr = httpd::start("serve", serve.listen, serve.connections, pages)
            .map_err(ServeError::Listen)?;
        log::info!("serve: status page on http://{addr}/");
        Ok(Server { addr })
    }
}

/// The status page as a [`Handler`] for a listener of `sitewatch sink` or `run`
/// (`daemon`): the same pages, session rules and cache as `sitewatch serve`, but its session
/// opens on the first request, so a database that is down at start delays the page, not the
/// daemon.
pub fn pages(pg: &PostgresConfig) -> Arc<dyn Handler> {
    Arc::new(Pages {
        pg: pg.clone(),
        sessions: Mutex::new(Sessions::default()),
        cache: Mutex::new(Cache::default()),
    })
}

/// `sitewatch serve`: serves until `shutdown`.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), ServeError> {
    let _server = Server::start(config)?;
    while !shutdown.sleep(Duration::from_secs(3600)) {}
    Ok(())
}

fn connect(pg: &PostgresConfig) -> Result<Client, SinkError> {
    let mut client = crate::sink::db::connect(pg, "sitewatch serve")?;
    data::prepare_session(&mut client)?;
    Ok(client)
}

struct Pages {
    pg: PostgresConfig,
    /// Held by one request at a time.
    sessions: Mutex<Sessions>,
    cache: Mutex<Cache>,
}

/// The read-only sessions: `None` after one broke (the next request connects again).
#[derive(Default)]
struct Sessions {
    main: Option<Client>,
    /// Reads a large page's daily rollups beside `main` (`data::targets`); connected on the
    /// first request for a list of targets. Without it (it cannot connect) `main` reads
    /// everything.
    helper: Option<Client>,
}

#[derive(Default)]
struct Cache {
    answers: HashMap<String, (Instant, Response)>,
    bytes: usize,
}

impl Cache {
    fn get(&self, key: &str) -> Option<Response> {
        let (at, response) = self.answers.get(key)?;
        (at.elapsed() < CACHE_TTL).then(|| response.clone())
    }

    fn insert(&mut self, key: String, response: Response) {
        let size = key.len() + response.body.len();
        if self.answers.len() >= CACHE_ENTRIES || self.bytes + size > CACHE_BYTES {
            *self = Cache::default();
        }
        // An expired answer for the same key is replaced: its bytes are no longer held.
        if let Some((_, old)) = self.answers.remove(&key) {
            self.bytes -= key.len() + old.body.len();
        }
        self.bytes += size;
        self.answers.insert(key, (Instant::now(), response));
    }
}

/// What a path asks for.
#[derive(Debug, PartialEq)]
enum Route {
    Status { selection: Selection, group: bool },
    Api(Selection),
    Target(String),
    Badge(String, BadgeKind),
}

#[derive(Debug, PartialEq, Clone, Copy)]
enum BadgeKind {
    Status,
    /// The window in hours.
    Uptime(i64),
    Response,
}

/// A request we refuse before any query.
fn refuse(status: u16, message: &str) -> Response {
    Response::text(status, format!("{message}\n"))
}

fn route(path: &str, query: &str) -> Result<Route, Response> {
    let name = |raw: &str| {
        let decoded = crate::util::percent_decode(raw);
        if decoded.is_empty() || decoded.len() > MAX_NAME {
            Err(refuse(404, "not found"))
        } else {
            Ok(decoded)
        }
    };
    let mut selection = Selection::default();
    let (mut group, mut window) = (false, None);
    for (key, value) in httpd::query_pairs(query) {
        match key {
            "tag" if value.len() <= MAX_NAME && !value.is_empty() => selection.tag = Some(value),
            "group" => group = value == "tag",
            "page" => match value.parse::<i64>() {
                Ok(n) if (0..=MAX_PAGE).contains(&n) => selection.page = n,
                _ => return Err(refuse(400, &format!("page: expected 0 to {MAX_PAGE}"))),
            },
            "per_page" => match value.parse::<i64>() {
                Ok(n) if (1..=data::MAX_PER_PAGE).contains(&n) => selection.per_page = Some(n),
                _ => {
                    let max = data::MAX_PER_PAGE;
                    return Err(refuse(400, &format!("per_page: expected 1 to {max}")));
                }
            },
            "window" => window = Some(value),
            _ => {}
        }
    }
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", ""] => Ok(Route::Status { selection, group }),
        ["", "api", "v1", "status"] => Ok(Route::Api(selection)),
        ["", "target", id] => Ok(Route::Target(name(id)?)),
        ["", "badge", id, file] => {
            let kind = match *file {
                "status.svg" => BadgeKind::Status,
                "response.svg" => BadgeKind::Response,
                "uptime.svg" => BadgeKind::Uptime(match window.as_deref() {
                    None | Some("24h") => 24,
                    Some("7d") => 7 * 24,
                    Some("30d") => 30 * 24,
                    Some(_) => return Err(refuse(400, "window: expected 24h, 7d or 30d")),
                }),
                _ => return Err(refuse(404, "not found")),
            };
            Ok(Route::Badge(name(id)?, kind))
        }
        _ => Err(refuse(404, "not found")),
    }
}

const HTML: &str = "text/html; charset=utf-8";
const SVG: &str = "image/svg+xml";
const JSON: &str = "application/json";
/// Nothing but the inline style may load: no script, no external asset.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";

impl Handler for Pages {
    fn answer(&self, head: &Head) -> Response {
        let (path, query) = head.path_and_query();
        let route = match route(path, query) {
            Ok(route) => route,
            Err(refused) => return refused,
        };
        let key = head.target.clone();
        if let Some(cached) = lock(&self.cache).get(&key) {
            return cached;
        }
        let response = self.render(&route);
        if response.status == 200 {
            lock(&self.cache).insert(key, response.clone());
        }
        response
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves data that is still valid (a cache, a session).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pages {
    /// The helper session for `route`, if it lists targets; connected when there is none
    /// (a failure is not the page's: `main` reads everything then).
    fn helper<'a>(&self, helper: &'a mut Option<Client>, route: &Route) -> Option<&'a mut Client> {
        if !matches!(route, Route::Status { .. } | Route::Api(_)) {
            return None;
        }
        if helper.as_ref().is_none_or(Client::is_closed) {
            *helper = connect(&self.pg)
                .map_err(|e| log::debug!("serve: helper session: {e}"))
                .ok();
        }
        helper.as_mut()
    }

    fn render(&self, route: &Route) -> Response {
        let mut sessions = lock(&self.sessions);
        let Sessions { main, helper } = &mut *sessions;
        if main.as_ref().is_none_or(Client::is_closed) {
            *main = match connect(&self.pg) {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!("serve: {e}");
                    return refuse(503, "database unavailable");
                }
            };
        }
        let Some(client) = main.as_mut() else {
            return refuse(503, "database unavailable");
        };
        let helper = self.helper(helper, route);
        let now_ms = unix_ms_now();
        let result = data::read_only(client, |tx| match route {
            Route::Status { selection, group } => timed(
                || data::targets(tx, helper, selection, now_ms),
                |views, more| {
                    let page = html::status_page(views, more, selection, *group, now_ms);
                    Response::new(200, HTML, page).with_header("Content-Security-Policy", CSP)
                },
            ),
            Route::Api(selection) => timed(
                || data::targets(tx, helper, selection, now_ms),
                |views, more| Response::new(200, JSON, api_json(views, more, now_ms)),
            ),
            Route::Target(id) => {
                let Some(view) = one_target(tx, id, now_ms)? else {
                    return Ok(refuse(404, "no such target"));
                };
                let checks = data::recent_checks(tx, id)?;
                let page = html::target_page(&view, &checks, now_ms);
                Ok(Response::new(200, HTML, page).with_header("Content-Security-Policy", CSP))
            }
            Route::Badge(id, kind) => badge(tx, id, *kind, now_ms),
        });
        match result {
            Ok(response) => response.with_header("X-Content-Type-Options", "nosniff"),
            Err(e) => {
                log::warn!("serve: {}", crate::sink::db::describe(&e));
                if client.is_closed() {
                    *main = None;
                }

                refuse(503, "database unavailable")
            }
        }
    }
}

/// A list of targets `read`, then `build` into an answer, with `Server-Timing` (W3C; browsers'
/// developer tools show it): the database reads and the whole answer as built, in ms, sending
/// not included. A cached answer repeats the figures of the request that built it. Bench
/// section 9 reports them as the server-side time.
fn timed(
    read: impl FnOnce() -> Result<(Vec<TargetView>, bool), postgres::Error>,
    build: impl FnOnce(&[TargetView], bool) -> Response,
) -> Result<Response, postgres::Error> {
    let started = Instant::now();
    let (views, more) = read()?;
    let read = started.elapsed();
    let response = build(&views, more);
    let total = started.elapsed();
    let timing = format!(
        "db;dur={:.1}, render;dur={:.1}, total;dur={:.1}",
        read.as_secs_f64() * 1000.0,
        (total - read).as_secs_f64() * 1000.0,
        total.as_secs_f64() * 1000.0
    );
    Ok(response.with_header("Server-Timing", timing))
}

fn one_target(
    tx: &mut postgres::Transaction,
    id: &str,
    now_ms: i64,
) -> Result<Option<TargetView>, postgres::Error> {
    let selection = Selection {
        target: Some(id.to_string()),
        ..Selection::default()
    };
    Ok(data::targets(tx, None, &selection, now_ms)?
        .0
        .into_iter()
        .next())
}

fn badge(
    tx: &mut postgres::Transaction,
    id: &str,
    kind: BadgeKind,
    now_ms: i64,
) -> Result<Response, postgres::Error> {
    let view = one_target(tx, id, now_ms)?;
    let svg = match (kind, &view) {
        (BadgeKind::Status, _) => {
            let state = match &view {
                Some(v) => badge::State::of(Some(v.up), v.checks_24h, v.successes_24h),
                None => badge::State::Unknown,
            };
            badge::render("status", state.word(), state.colour())
        }
        (BadgeKind::Uptime(hours), _) => {
            let hour = now_ms - now_ms.rem_euclid(HOUR_MS);
            let (checks, up) = data::uptime(tx, id, hour - (hours - 1) * HOUR_MS)?;
            let label = format!(
                "uptime {}",
                if hours == 24 {
                    "24h".into()
                } else {
                    format!("{}d", hours / 24)
                }
            );
            match (checks > 0).then(|| 100.0 * up as f64 / checks as f64) {
                Some(p) => badge::render(&label, &format!("{p:.2}%"), badge::uptime_colour(p)),
                None => badge::render(&label, "no data", badge::UNKNOWN),
            }
        }
        (BadgeKind::Response, Some(v)) => match quantile(&v.hist_24h(), 0.5) {
            Some(p50) => badge::render(
                "response",
                &format!("≤{p50:.0} ms"),
                badge::response_colour(p50),
            ),
            None => badge::render("response", "no data", badge::UNKNOWN),
        },
        (BadgeKind::Response, None) => badge::render("response", "no data", badge::UNKNOWN),
    };
    Ok(Response::new(200, SVG, svg)
        .with_header("Cache-Control", "public, max-age=60")
        .with_header("Content-Security-Policy", CSP))
}

fn api_json(views: &[TargetView], more: bool, now_ms: i64) -> String {
    let time = |ms: i64| format_rfc3339_ms(ms);
    let targets: Vec<serde_json::Value> = views
        .iter()
        .map(|v| {
            let (checks, ups) = v
                .days
                .iter()
                .fold((0, 0), |(c, s), (dc, ds)| (c + dc, s + ds));
            let ratio = |up: i64, n: i64| (n > 0).then(|| up as f64 / n as f64);
            let hist = v.hist_24h();
            let since_90d = data::first_day_ms(now_ms);
            serde_json::json!({
                "id": v.id,
                "url": v.url,
                "state": badge::State::of(Some(v.up), v.checks_24h, v.successes_24h).word(),
                "up": v.up,
                "since": time(v.since_ms),
                "last_check": time(v.last_check_ms),
                "failure": v.failure,
                "error": v.error,
                "status": v.status,
                "total_ms": v.total_ms,
                "cert_not_after": v.cert_not_after_ms.map(time),
                "tags": v.tags,
                "uptime_24h": ratio(v.successes_24h, v.checks_24h),
                "uptime_90d": ratio(ups, checks),
                "uptime_90d_from": time(since_90d),
                "p50_24h_ms_at_most": quantile(&hist, 0.5),
                "p95_24h_ms_at_most": quantile(&hist, 0.95),
                "locations": v.locations.iter().map(|l| location_json(l, &time)).collect::<Vec<_>>(),
                "quorum": v.quorum.map(|q| serde_json::json!({
                    "counted": q.counted,
                    "down": q.down,
                    "min_down": q.min_down,
                })),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "version": 1,
        "generated_at": time(now_ms),
        "more": more,
        "targets": targets,
    });
    doc.to_string()
}

/// One location of a target in `/api/v1/status` (added within version 1: new fields only).
fn location_json(l: &data::LocationView, time: &dyn Fn(i64) -> String) -> serde_json::Value {
    serde_json::json!({
        "location": l.location,
        "state": if l.up { "up" } else { "down" },
        "up": l.up,
        "since": time(l.since_ms),
        "last_check": time(l.last_check_ms),
        "failure": l.failure,
        "error": l.error,
        "status": l.status,
        "total_ms": l.total_ms,
        "counted": l.counted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_in_entries_and_bytes() {
        let mut cache = Cache::default();
        let page = || Response::text(200, "x".repeat(1024 * 1024));
        for i in 0..1000 {
            cache.insert(format!("/?p={i}"), page());
            assert!(cache.bytes <= CACHE_BYTES && cache.answers.len() <= CACHE_ENTRIES);
        }
        cache.insert("/?p=999".into(), page());
        let held: usize = cache
            .answers
            .iter()
            .map(|(k, (_, r))| k.len() + r.body.len())
            .sum();
        assert_eq!(cache.bytes, held);
        assert!(cache.get("/?p=999").is_some() && cache.get("/?p=0").is_none());
    }

    #[test]
    fn routes() {
        let ok = |p: &str, q: &str| route(p, q).unwrap();
        let status = |r: Result<Route, Response>| r.err().map(|e| e.status);
        assert_eq!(
            ok("/", "tag=eu+west&group=tag"),
            Route::Status {
                selection: Selection {
                    tag: Some("eu west".into()),
                    ..Selection::default()
                },
                group: true
            }
        );
        assert_eq!(ok("/target/a%2Fb", ""), Route::Target("a/b".into()));
        assert_eq!(
            ok("/badge/x/uptime.svg", "window=7d"),
            Route::Badge("x".into(), BadgeKind::Uptime(168))
        );
        assert_eq!(
            ok("/badge/x/status.svg", ""),
            Route::Badge("x".into(), BadgeKind::Status)
        );
        assert_eq!(status(route("/badge/x/uptime.svg", "window=1y")), Some(400));
        assert_eq!(status(route("/", "page=99999999")), Some(400));
        assert_eq!(status(route("/", "per_page=1001")), Some(400));
        assert_eq!(status(route("/", "per_page=0")), Some(400));
        assert_eq!(
            ok("/api/v1/status", "per_page=1000&page=3"),
            Route::Api(Selection {
                page: 3,
                per_page: Some(1000),
                ..Selection::default()
            })
        );
        assert_eq!(status(route("/../etc/passwd", "")), Some(404));
        assert_eq!(status(route("/target/", "")), Some(404));
        assert_eq!(status(route("/target/a/b", "")), Some(404));
        assert_eq!(status(route("/badge/x/../../etc/passwd", "")), Some(404));
    }
}
