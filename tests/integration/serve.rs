//! `sitewatch serve` against real PostgreSQL: badges (parsed as XML, their colours), the JSON
//! API, hostile requests (traversal, huge heads, slow clients, writes), and the status page in
//! headless Chromium from a database filled by a real `sitewatch run`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sitewatch::config::Config;
use sitewatch::result::{CheckResult, FailureReason};
use sitewatch::serve::{self, badge};
use sitewatch::sink::{self, Message, Writer, db};
use sitewatch::util::{format_rfc3339_ms, unix_ms_now};

use crate::support::pg::TestDb;

/// One raw HTTP/1.1 exchange: status, head, body.
fn request(addr: SocketAddr, raw: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.get(end + 4..).unwrap_or_default().to_vec();
    (status, head, body)
}

fn get(addr: SocketAddr, target: &str) -> (u16, String, String) {
    let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, head, body) = request(addr, raw.as_bytes());
    (status, head, String::from_utf8(body).expect("utf-8 body"))
}

/// A database with the schema, and a config with `[postgres]` on it and `[serve]` on port 0.
fn served_db() -> (TestDb, Config) {
    let db = TestDb::create();
    let text = format!(
        "[postgres]\nurl = \"{}\"\nsslmode = \"disable\"\n\n[serve]\nlisten = \"127.0.0.1:0\"\nconnections = 4\n",
        db.url()
    );
    let cfg = Config::parse(&text, Path::new("serve.toml"), &|_| None).expect("config");
    sink::init_db(&cfg).expect("init-db");
    (db, cfg)
}

/// 100 checks a minute apart ending now: `down_every` (0: never) of them down, the last one
/// `last_up`.
fn history(target: &str, total_ms: f64, down_every: usize, last_up: bool) -> Vec<CheckResult> {
    (0..100)
        .map(|i| {
            let mut r = CheckResult::new(target, "http://127.0.0.1/x", "test", "GET");
            r.started_at = format_rfc3339_ms(unix_ms_now() - (100 - i as i64) * 60_000);
            r.timings.total = total_ms;
            r.tags = vec!["web".into()];
            let down = (down_every > 0 && i % down_every == 0) || (i == 99 && !last_up);
            if down {
                r.fail(FailureReason::Connect, "connection refused <b>&");
            } else {
                r.up = true;
                r.status = Some(200);
            }
            r
        })
        .collect()
}

fn write_records(db: &TestDb, records: &[CheckResult]) {
    let cfg = db.pg_config();
    let client = db::connect(&cfg, "serve-test-writer").expect("connect");
    let mut w = Writer::new(client, "t", 0, cfg.retention).expect("writer");
    let messages: Vec<Message> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Message {
            offset: i as i64,
            timestamp_ms: 0,
            key: None,
            value: Some(r.to_json().into_bytes()),
        })
        .collect();
    w.write(None, &messages, 0).expect("write");
}

/// An element's name and attributes.
type Element = (String, Vec<(String, String)>);

/// A small XML well-formedness check: tags nest and close, attributes are quoted, every `&`
/// starts a known entity, no `<` in text. Returns the elements' (name, attributes) in order.
fn parse_xml(text: &str) -> Result<Vec<Element>, String> {
    let mut stack: Vec<String> = Vec::new();
    let mut elements = Vec::new();
    let mut rest = text.trim();
    let check_text = |t: &str| -> Result<(), String> {
        let mut parts = t.split('&');
        parts.next();
        for p in parts {
            let ok = ["amp;", "lt;", "gt;", "quot;", "#39;"]
                .iter()
                .any(|e| p.starts_with(e));
            if !ok {
                return Err(format!("bad entity in {t:?}"));
            }
        }
        if t.contains('>') {
            return Err(format!("stray > in {t:?}"));
        }
        Ok(())
    };
    while !rest.is_empty() {
        let Some(open) = rest.find('<') else {
            check_text(rest)?;
            break;
        };
        check_text(&rest[..open])?;
        let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            if stack.pop().as_deref() != Some(name) {
                return Err(format!("</{name}> closes nothing open"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let (name, mut attrs_text) = tag.split_once(' ').unwrap_or((tag, ""));
        let mut attrs = Vec::new();
        while !attrs_text.trim().is_empty() {
            let (key, after) = attrs_text
                .trim_start()
                .split_once("=\"")
                .ok_or(format!("attribute in <{name}>"))?;
            let (value, after) = after
                .split_once('"')
                .ok_or(format!("unquoted in <{name}>"))?;
            check_text(value)?;
            if value.contains('<') {
                return Err(format!("< in attribute of <{name}>"));
            }
            attrs.push((key.to_string(), value.to_string()));
            attrs_text = after;
        }
        elements.push((name.to_string(), attrs));
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    if stack.is_empty() {
        Ok(elements)
    } else {
        Err(format!("unclosed: {stack:?}"))
    }
}

/// The badge's message colour: the second `<rect>` inside the clip group.
fn message_colour(svg: &str) -> String {
    let elements = parse_xml(svg).unwrap_or_else(|e| panic!("{e}: {svg}"));
    assert_eq!(elements[0].0, "svg");
    let fills: Vec<&String> = elements
        .iter()
        .filter(|(name, _)| name == "rect")
        .filter_map(|(_, a)| a.iter().find(|(k, _)| k == "fill").map(|(_, v)| v))
        .collect();
    fills[2].clone()
}

#[test]
fn badges_are_valid_svg_in_the_right_colours_and_the_api_says_the_same() {
    let (db, cfg) = served_db();
    let mut records = history("steady", 40.0, 0, true);
    records.extend(history("flaky", 40.0, 10, true));
    records.extend(history("broken", 40.0, 0, false));
    records.extend(history("slow <&>", 3000.0, 0, true));
    write_records(&db, &records);
    let server = serve::Server::start(&cfg).expect("serve starts");
    let addr = server.addr;
    for (id, state, colour) in [
        ("steady", "up", badge::GREEN),
        ("flaky", "degraded", badge::YELLOW),
        ("broken", "down", badge::RED),
        ("nobody", "unknown", badge::UNKNOWN),
    ] {
        let (status, head, svg) = get(addr, &format!("/badge/{id}/status.svg"));
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("Content-Type: image/svg+xml"), "{head}");
        assert!(head.contains("Cache-Control: public, max-age=60"), "{head}");
        assert_eq!(message_colour(&svg), colour, "{id}: {svg}");
        assert!(svg.contains(&format!(">{state}</text>")), "{id}: {svg}");
        // For a person to look at (README.md shows one).
        std::fs::write(screenshot_dir().join(format!("badge-{state}.svg")), &svg).unwrap();
    }
    // 90 of 100 up: 90% is red; 100% green; the window parameter is honoured.
    for (id, window, text, colour) in [
        ("flaky", "24h", "90.00%", badge::RED),
        ("steady", "7d", "100.00%", badge::GREEN),
        ("steady", "30d", "100.00%", badge::GREEN),
    ] {
        let (status, _, svg) = get(addr, &format!("/badge/{id}/uptime.svg?window={window}"));
        assert_eq!(status, 200);
        assert_eq!(message_colour(&svg), colour, "{svg}");
        assert!(svg.contains(text), "{svg}");
    }
    let (_, _, svg) = get(addr, "/badge/slow%20%3C%26%3E/response.svg");
    assert_eq!(message_colour(&svg), badge::RED, "{svg}");
    let (_, _, svg) = get(addr, "/badge/steady/response.svg");
    assert_eq!(message_colour(&svg), badge::GREEN, "{svg}");
    assert!(svg.contains("≤50 ms"), "{svg}");

    let (status, _, body) = get(addr, "/api/v1/status");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(doc["version"], 1);
    let states: Vec<(String, String)> = doc["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().into(),
                t["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [
        ("broken", "down"),
        ("flaky", "degraded"),
        ("slow <&>", "up"),
        ("steady", "up"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(states, want);
    assert_eq!(doc["targets"][1]["uptime_24h"], 0.9);

    // Every page is well-formed markup with the hostile id escaped.
    for path in [
        "/",
        "/?group=tag",
        "/?tag=web",
        "/target/slow%20%3C%26%3E",
        "/target/broken",
    ] {
        let (status, _, page) = get(addr, path);
        assert_eq!(status, 200, "{path}");
        let body = page.trim_start_matches("<!DOCTYPE html>\n");
        // HTML void elements are the only unclosed tags the pages write.
        let xml = body.replace("<meta charset=\"utf-8\">", "").replace(
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
            "",
        );
        parse_xml(&xml).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            !page.contains("slow <&>") && !page.contains("<b>&"),
            "{path}"
        );
    }
    let (_, _, page) = get(addr, "/target/broken");
    assert!(page.contains("down: connect") && page.contains("connection refused &lt;b&gt;&amp;"));
}

#[test]
fn hostile_requests_are_bounded_and_nothing_can_write() {
    let (db, cfg) = served_db();
    write_records(&db, &history("steady", 40.0, 0, true));
    let server = serve::Server::start(&cfg).expect("serve starts");
    let addr = server.addr;
    for path in [
        "/../../etc/passwd",
        "/target/..%2F..%2Fetc%2Fpasswd",
        "/badge/..%2F..%2Fetc%2Fpasswd/status.svg",
        "/badge/steady/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
    ] {
        let (status, _, body) = get(addr, path);
        assert!(
            status == 404 || status == 200 && path.starts_with("/badge/"),
            "{path}: {status}"
        );
        assert!(!body.contains("root:"), "{path}");
    }
    // A query string far over the head limit: refused, and the server still answers.
    let huge = format!("/?tag={}", "a".repeat(1 << 20));
    let (status, _, _) = request(addr, format!("GET {huge} HTTP/1.1\r\n\r\n").as_bytes());
    assert!(status == 431 || status == 0, "{status}");
    let (status, _, _) = get(addr, &format!("/?tag={}", "b".repeat(4000)));
    assert_eq!(status, 200);
    // No write method.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let raw = format!("{method} /api/v1/status HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(request(addr, raw.as_bytes()).0, 405, "{method}");
    }
    // Slow clients hold every slot (connections = 4): a fifth connection is closed unanswered,
    // and the slots come back once the head deadline passes.
    let slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let answered = |addr| get(addr, "/api/v1/status").0 == 200;
    crate::support::wait_for(
        "the 5th connection to be refused",
        Duration::from_secs(30),
        || !answered(addr),
    );
    crate::support::wait_for(
        "the slow clients to be cut off",
        Duration::from_secs(30),
        || answered(addr),
    );
    drop(slow);
    // The session refuses writes, inside the request's transaction and outside it.
    let mut client = db::connect(&db.pg_config(), "serve-test").unwrap();
    serve::data::prepare_session(&mut client).unwrap();
    let insert = "INSERT INTO targets VALUES ('x', 'u', now(), now(), 'a')";
    let in_tx = serve::data::read_only(&mut client, |tx| tx.execute(insert, &[])).unwrap_err();
    let outside = client.execute(insert, &[]).unwrap_err();
    for e in [in_tx, outside] {
        assert_eq!(
            e.code(),
            Some(&postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
            "{e}"
        );
    }
}

/// `(ids, more)` of one `/api/v1/status` answer.
fn api_ids(addr: SocketAddr, query: &str) -> (Vec<String>, bool) {
    let (status, _, body) = get(addr, &format!("/api/v1/status?{query}"));
    assert_eq!(status, 200, "{query}: {body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    let ids = (doc["targets"].as_array().unwrap().iter())
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    (ids, doc["more"] == true)
}

#[test]
fn pages_and_tags_are_picked_from_the_targets_table() {
    let (db, cfg) = served_db();
    let mut records = Vec::new();
    for (id, tag) in [("a", "x"), ("b", "y"), ("c", "x"), ("d", "y"), ("e", "x")] {
        let mut h = history(id, 40.0, 0, true);
        for r in &mut h {
            r.tags = vec![tag.into(), "all".into()];
        }
        records.extend(h);
    }
    // A newer record with other tags: the target's tags are its newest record's.
    let mut newer = CheckResult::new("b", "http://127.0.0.1/x", "test", "GET");
    newer.up = true;
    newer.tags = vec!["x".into()];
    records.push(newer);
    write_records(&db, &records);
    let server = serve::Server::start(&cfg).expect("serve starts");
    let addr = server.addr;
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(api_ids(addr, "per_page=2"), (ids(&["a", "b"]), true));
    assert_eq!(api_ids(addr, "per_page=2&page=2"), (ids(&["e"]), false));
    assert_eq!(api_ids(addr, "tag=x"), (ids(&["a", "b", "c", "e"]), false));
    assert_eq!(
        api_ids(addr, "tag=x&per_page=3&page=1"),
        (ids(&["e"]), false)
    );
    assert_eq!(api_ids(addr, "tag=y"), (ids(&["d"]), false));
    assert_eq!(get(addr, "/?per_page=1001").0, 400);
    // The next-page link keeps per_page.
    let (_, _, page) = get(addr, "/?per_page=2&tag=all");
    assert!(
        page.contains("href=\"/?page=1&tag=all&per_page=2\""),
        "{page}"
    );
    // init-db fills the tags of targets written before version 5 from their latest check.
    let mut client = db.client();
    client
        .execute("UPDATE targets SET tags = NULL", &[])
        .unwrap();
    sink::init_db(&cfg).expect("init-db again");
    let tags: Vec<String> = client
        .query_one("SELECT tags FROM targets WHERE id = 'b'", &[])
        .unwrap()
        .get(0);
    assert_eq!(tags, ["x"]);
}

/// A page of 100 targets or more reads its daily rollups on a second session, in the first
/// one's snapshot: it must show what pages of fewer targets (one session) show.
#[test]
fn a_large_page_read_on_two_sessions_shows_what_small_pages_show() {
    let (db, cfg) = served_db();
    let records: Vec<CheckResult> = (0..120)
        .flat_map(|i| history(&format!("t{i:03}"), 10.0 + i as f64, i % 7, i % 5 != 0))
        .collect();
    write_records(&db, &records);
    let server = serve::Server::start(&cfg).expect("serve starts");
    let targets = |query: &str| {
        let (status, head, body) = get(server.addr, &format!("/api/v1/status?{query}"));
        assert_eq!(status, 200, "{body}");
        assert!(head.contains("Server-Timing: db;dur="), "{head}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
        doc["targets"].as_array().unwrap().clone()
    };
    let large = targets("per_page=120");
    let small: Vec<serde_json::Value> = (0..3)
        .flat_map(|page| targets(&format!("per_page=50&page={page}")))
        .collect();
    assert_eq!(large.len(), 120);
    assert_eq!(large, small);
    // The figures came from the rollups: some days below 100%, p50 from the histograms.
    assert!(large.iter().any(|t| t["uptime_90d"].as_f64() < Some(1.0)));
    assert!(
        large
            .iter()
            .all(|t| t["p50_24h_ms_at_most"].as_f64().is_some())
    );
    let (status, head, page) = get(server.addr, "/?per_page=120");
    assert_eq!(status, 200);
    assert!(head.contains("Server-Timing: db;dur="), "{head}");
    assert_eq!(page.matches("<section class=\"t\"").count(), 120);
    let sessions: i64 = (db.client())
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'sitewatch serve' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(sessions, 2, "the page's session and its helper");
}

/// `history` as seen from `location`.
fn history_at(target: &str, location: &str, down_every: usize, last_up: bool) -> Vec<CheckResult> {
    let mut records = history(target, 40.0, down_every, last_up);
    for r in &mut records {
        r.location = Some(location.into());
    }
    records
}

#[test]
fn several_locations_each_shown_and_the_quorum_decides_the_state() {
    let (db, cfg) = served_db();
    // min_down stays 2; the histories end a minute ago, so every location counts.
    db.client()
        .execute("UPDATE quorum_settings SET fresh_for = '1 hour'", &[])
        .unwrap();
    let mut records = history_at("split", "eu-west", 0, false);
    records.extend(history_at("split", "us-east", 0, true));
    records.extend(history_at("everywhere", "eu-west", 0, false));
    records.extend(history_at("everywhere", "us-east", 0, false));
    records.extend(history("solo", 40.0, 0, true));
    write_records(&db, &records);
    let server = serve::Server::start(&cfg).expect("serve starts");
    let addr = server.addr;

    let (status, _, body) = get(addr, "/api/v1/status");
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    let target = |id: &str| {
        let all = doc["targets"].as_array().unwrap();
        all.iter().find(|t| t["id"] == id).unwrap().clone()
    };
    // Down in one of two locations is not a quorum of two: up, each location as it is.
    let split = target("split");
    assert_eq!(split["state"], "up", "{split}");
    let seen: Vec<(String, String, bool)> = split["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let name = l["location"].as_str().unwrap().to_string();
            (
                name,
                l["state"].as_str().unwrap().into(),
                l["counted"] == true,
            )
        })
        .collect();
    let want = [("eu-west", "down", true), ("us-east", "up", true)];
    let want: Vec<(String, String, bool)> = (want.iter())
        .map(|(a, b, c)| (a.to_string(), b.to_string(), *c))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(split["locations"][0]["failure"], "connect");
    assert_eq!(split["quorum"]["down"], 1);
    let everywhere = target("everywhere");
    assert_eq!(everywhere["state"], "down", "{everywhere}");
    assert_eq!(everywhere["quorum"]["down"], 2);
    assert_eq!(everywhere["failure"], "connect");
    // One location: as before, no locations to list.
    let solo = target("solo");
    assert_eq!(
        (solo["state"].as_str(), solo["quorum"].is_null()),
        (Some("up"), true)
    );
    assert_eq!(solo["locations"].as_array().map(Vec::len), Some(0));
    let (_, _, svg) = get(addr, "/badge/everywhere/status.svg");
    assert_eq!(message_colour(&svg), badge::RED, "{svg}");
    let (_, _, svg) = get(addr, "/badge/split/status.svg");
    assert_eq!(message_colour(&svg), badge::GREEN, "{svg}");

    // The same in the browser: chips on `/` with the state in text, a table per target.
    let dir = crate::support::TempDir::new("serve-locations");
    let profile = dir.path().join("chromium");
    let dump = |path: &str| {
        let dom = chromium(&profile, &["--dump-dom", &format!("http://{addr}{path}")]);
        assert!(
            dom.status.success(),
            "{}",
            String::from_utf8_lossy(&dom.stderr)
        );
        String::from_utf8_lossy(&dom.stdout).to_string()
    };
    let text = dump("/");
    let block = |id: &str| {
        let start = text.find(&format!("id=\"t-{id}\"")).unwrap();
        let end = text[start..].find("</section>").unwrap() + start;
        text[start..end].to_string()
    };
    let split = block("split");
    assert!(split.contains(">Up<"), "{split}");
    assert!(
        split.contains("eu-west<span class=\"sr\">: down</span>")
            && split.contains("us-east<span class=\"sr\">: up</span>")
            && split.contains("Down in 1 of 2 locations counted (down at 2)."),
        "{split}"
    );
    let everywhere = block("everywhere");
    assert!(
        everywhere.contains(">Down<") && everywhere.contains("Last failure: connect"),
        "{everywhere}"
    );
    assert!(
        !block("solo").contains("class=\"locs\""),
        "{}",
        block("solo")
    );
    let page = dump("/target/split");
    let table = &page[page.find("<h2>Locations</h2>").expect("a locations table")..];
    let rows: Vec<&str> = table.split("<tr>").skip(2).collect();
    assert!(
        rows.len() >= 2
            && rows[0].contains("eu-west")
            && rows[0].contains("down: connect")
            && rows[1].contains("us-east")
            && rows[1].contains(">up<"),
        "{table}"
    );
    let file = screenshot_dir().join("target-locations.png");
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", file.display()),
            "--window-size=1280,1200",
            &format!("http://{addr}/target/split"),
        ],
    );
    assert!(std::fs::metadata(&file).is_ok_and(|m| m.len() > 10_000));
}

/// Where the screenshots go: `<target dir>/serve-screenshots/`.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("serve-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium that can reach 127.0.0.1 only: every other host goes to a closed port.
fn chromium(profile: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium (scripts/setup installs it)")
}

/// A `sitewatch` process, killed and reaped when dropped: also when an assertion fails first.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sitewatch` `cmd` with `config`, logging to `log`.
fn spawn(cmd: &str, config: &Path, log: &Path) -> Running {
    let child = crate::support::sitewatch()
        .args([cmd, "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "sitewatch=info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start sitewatch");
    Running(child)
}

/// Runs a real `sitewatch run` against local targets (up, TLS, a closed port, a body that does
/// not match) until each has 3 rows, then SIGKILLs it. Returns the config, with `[serve]` on
/// `serve_port`.
fn fill_by_sitewatch_run(p: &crate::sink::Pipeline, dir: &Path, serve_port: u16) -> PathBuf {
    use crate::support::http::{Cert, HttpServer, Reply, fixture};
    let up = HttpServer::start(|_, _| Reply::status(200, "hello"));
    let tls = HttpServer::start_tls(Cert::Localhost, |_, _| Reply::status(200, "hello"));
    let text = format!(
        "[agent]\nid = \"page\"\ninterval = \"300ms\"\ntimeout = \"2s\"\njitter = \"0%\"\n\
         state_dir = \"{state}\"\n\n{pipeline}\n\
         [[target]]\nid = \"shop\"\nurl = \"{up}\"\nregex = \"hello\"\ntags = [\"web\"]\n\
         [[target]]\nid = \"secure\"\nurl = \"{tls}\"\ntls = {{ ca_file = \"{ca}\" }}\ntags = [\"web\"]\n\
         [[target]]\nid = \"closed-port\"\nurl = \"http://127.0.0.1:{closed}/\"\ntags = [\"api\"]\n\
         [[target]]\nid = \"wrong-content\"\nurl = \"{up}\"\nregex = \"goodbye\"\n\n\
         [serve]\nlisten = \"127.0.0.1:{serve_port}\"\n",
        state = dir.join("state").display(),
        pipeline = p.config_text(),
        up = up.url("/"),
        tls = tls.url("/"),
        ca = fixture("tls/ca.pem").display(),
        closed = crate::support::free_port(),
    );
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).unwrap();
    let run = spawn("run", &config, &dir.join("run.log"));
    let mut c = p.db.client();
    crate::support::wait_for("3 rows per target", Duration::from_secs(120), || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM (SELECT target FROM checks GROUP BY target \
                 HAVING count(*) >= 3) t",
                &[],
            )
            .unwrap()
            .get(0);
        n == 4
    });
    // `run` itself serves the page on `[serve] listen` while it sinks.
    let (status, _, page) = get(
        format!("127.0.0.1:{serve_port}").parse().unwrap(),
        "/?from=run",
    );
    assert!(
        status == 200 && page.contains("id=\"t-shop\""),
        "{status}: {page}"
    );
    drop(run);
    config
}

#[test]
fn chromium_shows_each_state_from_a_database_filled_by_sitewatch_run() {
    let p = crate::sink::Pipeline::new(1);
    let dir = crate::support::TempDir::new("serve-chromium");
    let port = crate::support::free_port();
    let config = fill_by_sitewatch_run(&p, dir.path(), port);
    let serve = spawn("serve", &config, &dir.path().join("serve.log"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    crate::support::wait_for("serve to listen", Duration::from_secs(30), || {
        TcpStream::connect(addr).is_ok()
    });
    let url = format!("http://{addr}/");
    let profile = dir.path().join("chromium");
    let dom = chromium(&profile, &["--dump-dom", &url]);
    let text = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.status.success() && text.contains("<h1>Status</h1>"),
        "chromium: {}\n{text}",
        String::from_utf8_lossy(&dom.stderr)
    );
    // The DOM as Chromium built it: each target, its state, why it is down, cert expiry.
    let block = |id: &str| {
        let start = text
            .find(&format!("id=\"t-{id}\""))
            .unwrap_or_else(|| panic!("{id} missing:\n{text}"));
        let end = text[start..].find("</section>").unwrap() + start;
        text[start..end].to_string()
    };
    assert!(block("shop").contains(">Up<"), "{}", block("shop"));
    assert!(
        block("secure").contains("Certificate expires"),
        "{}",
        block("secure")
    );
    let closed = block("closed-port");
    assert!(
        closed.contains(">Down<") && closed.contains("Last failure: connect"),
        "{closed}"
    );
    let wrong = block("wrong-content");
    assert!(
        wrong.contains(">Down<") && wrong.contains("body_mismatch"),
        "{wrong}"
    );
    assert!(text.contains("90-day uptime of shop: 100%"), "{text}");
    assert!(text.contains("href=\"/?tag=web\""), "{text}");
    let shots = screenshot_dir();
    for (name, size) in [("desktop", "1280,1600"), ("phone", "390,1800")] {
        let file = shots.join(format!("status-{name}.png"));
        let _ = std::fs::remove_file(&file);
        let out = chromium(
            &profile,
            &[
                &format!("--screenshot={}", file.display()),
                &format!("--window-size={size}"),
                &url,
            ],
        );
        assert!(
            std::fs::metadata(&file).is_ok_and(|m| m.len() > 10_000),
            "no screenshot {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("screenshot: {}", file.display());
    }
    // One target's page: its recent checks with the failure reason, in the browser too.
    let target_url = format!("http://{addr}/target/closed-port");
    let dom = chromium(&profile, &["--dump-dom", &target_url]);
    let page = String::from_utf8_lossy(&dom.stdout);
    assert!(
        page.contains("Recent checks") && page.contains("down: connect"),
        "{page}"
    );
    let file = shots.join("target-desktop.png");
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", file.display()),
            "--window-size=1280,1200",
            &target_url,
        ],
    );
    assert!(std::fs::metadata(&file).is_ok_and(|m| m.len() > 10_000));
    drop(serve);
}

#[test]
fn run_serves_the_status_page_and_badges_on_the_metrics_listener_while_it_sinks() {
    use crate::support::http::{HttpServer, Reply};
    let p = crate::sink::Pipeline::new(1);
    let dir = crate::support::TempDir::new("serve-in-run");
    let up = HttpServer::start(|_, _| Reply::status(200, "hello"));
    let port = crate::support::free_port();
    let text = format!(
        "[agent]\nid = \"inside\"\ninterval = \"300ms\"\ntimeout = \"2s\"\njitter = \"0%\"\n\
         state_dir = \"{state}\"\n\n{pipeline}\n\
         [[target]]\nid = \"shop\"\nurl = \"{up}\"\n\n\
         [serve]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        state = dir.path().join("state").display(),
        pipeline = p.config_text(),
        up = up.url("/"),
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, text).unwrap();
    let run = spawn("run", &config, &dir.path().join("run.log"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The badge turns green once the sink has written shop's rows (a new query each time:
    // answers are cached for a few seconds).
    let mut i = 0;
    crate::support::wait_for("a green badge from run", Duration::from_secs(120), || {
        i += 1;
        if TcpStream::connect(addr).is_err() {
            return false; // not listening yet
        }
        let (status, _, svg) = get(addr, &format!("/badge/shop/status.svg?n={i}"));
        status == 200 && message_colour(&svg) == badge::GREEN
    });
    let (status, head, page) = get(addr, "/");
    assert_eq!(status, 200, "{page}");
    assert!(head.contains("Content-Type: text/html"), "{head}");
    assert!(
        page.contains("id=\"t-shop\"") && page.contains(">Up<"),
        "{page}"
    );
    // The metrics listener's own paths still answer: one listener, both handlers.
    let (status, _, metrics) = get(addr, "/metrics");
    assert!(
        status == 200 && metrics.contains("probe_success{"),
        "{metrics}"
    );
    // Still sinking: more rows arrive while it serves.
    let mut c = p.db.client();
    let mut count = || -> i64 {
        c.query_one("SELECT count(*) FROM checks", &[])
            .unwrap()
            .get(0)
    };
    let before = count();
    crate::support::wait_for("more rows", Duration::from_secs(60), || count() > before);
    // No write path here either.
    assert_eq!(
        request(addr, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0,
        405
    );
    drop(run);
}
