//! llhttp's own response test cases (vendored in `tests/fixtures/llhttp/`, see its README),
//! replayed byte for byte from a server on 127.0.0.1 to the real probe, comparing our
//! accept/reject with llhttp's.
//!
//! llhttp is the HTTP parser of Node.js; its cases are malformed and edge-case responses
//! collected from real servers and from bug reports. Each case's `log` block is llhttp's event
//! stream for the input. Our replay sends the input and then closes the connection, so llhttp's
//! verdict is taken as llhttp would give it for that connection: an `error` event rejects
//! (`Pause on CONNECT/Upgrade` too: a client that never asked to switch protocols cannot use
//! the connection); otherwise the end of input is the peer's EOF, which `llhttp_finish` accepts
//! between messages and inside a body that runs to EOF, and rejects ("Invalid EOF state")
//! anywhere else: inside a head, a `Content-Length` body or a chunked body.
//!
//! Ours: the probe checks the target with every status expected (100-599), no redirects
//! followed and no retries, so `up` means the response was read and judged and `down` means it
//! was refused (protocol, body_read, ...). Every case where the two differ is listed in
//! [`KNOWN_DIFFERENCES`] with its reason; the test fails on a new difference and on a listed
//! one that no longer differs, so the list stays true.

use std::fs;
use std::path::Path;

use sitewatch::config::Config;
use sitewatch::probe::Prober;
use sitewatch::rules::RuleSet;

use crate::support::http::{HttpServer, Reply, fixture};

/// Cases where we and llhttp differ, with why. `file.md: heading` as in the table the test
/// prints.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[
    // Bytes after the response. We send one request with `Connection: close` and read one
    // response; llhttp parses the whole stream and objects to what follows it.
    (
        "connection.md: HTTP/1.0 with keep-alive and 204 status",
        AFTER_CUT,
    ),
    ("connection.md: HTTP/1.1 with 204 status", AFTER_CUT),
    ("connection.md: HTTP 304 with Transfer-Encoding", AFTER_CUT),
    ("pipelining.md: Should parse multiple events", AFTER_CUT),
    (
        "connection.md: HTTP/1.1 with keep-alive disabled and 204 status",
        AFTER_CLOSE,
    ),
    (
        "connection.md: HTTP/1.1 with keep-alive disabled, content-length",
        AFTER_CLOSE,
    ),
    // Bare LF line endings: httparse accepts them, as RFC 9112 §2.2 allows a recipient to;
    // llhttp refuses them unless lenient (the lenient twins of these cases accept).
    ("invalid.md: Only LFs present and no body", BARE_LF),
    ("invalid.md: Only LFs present", BARE_LF),
    ("sample.md: No carriage ret", BARE_LF),
    // llhttp also parses RTSP and ICE; we are an HTTP client and only HTTP/1.0 and HTTP/1.1
    // exist with a status line (HTTP/0.9 had none), so the rest is a protocol failure.
    ("sample.md: RTSP response", NOT_HTTP_1),
    ("sample.md: ICE response", NOT_HTTP_1),
    ("sample.md: HTTP version 0.9", NOT_HTTP_1),
    // Lenient chunk-line syntax in ureq-proto: whitespace after the size, an empty extension.
    // The body is still framed without ambiguity, and RFC 9112 §7.1.1 has a client ignore
    // extensions it does not understand; llhttp is strict about both.
    (
        "transfer-encoding.md: Trailing space on chunked body",
        "ureq-proto accepts whitespace after a chunk size (llhttp has a lenient flag for it)",
    ),
    (
        "transfer-encoding.md: No extension after semicolon",
        "ureq-proto ignores an empty chunk extension after `;`",
    ),
    (
        "transfer-encoding.md: Unbalanced chunk extensions quoting",
        "chunk extensions are ignored whatever their syntax (RFC 9112 §7.1.1), since the \
         size before them frames the body; llhttp checks their quoted strings",
    ),
    (
        "transfer-encoding.md: Chunk extensions quoting",
        "the body ends at the last (size 0) chunk, every byte of it delivered; llhttp also \
         wants the CRLF that ends the trailer section before EOF",
    ),
    // Transfer-Encoding that does not end in a single `chunked`: we refuse the framing as a
    // protocol failure naming the header (issue 12 item 16), llhttp reads the body to EOF
    // (RFC 9112 §6.3). A monitor that guessed would report a page it may not have read.
    (
        "transfer-encoding.md: `chunked` before other transfer-encoding",
        AMBIGUOUS_FRAMING,
    ),
    (
        "transfer-encoding.md: multiple transfer-encoding where chunked is not the last one",
        AMBIGUOUS_FRAMING,
    ),
    (
        "transfer-encoding.md: `chunkedchunked` transfer-encoding does not enable chunked enconding",
        AMBIGUOUS_FRAMING,
    ),
];

const AFTER_CUT: &str = "a second response, cut by EOF, follows the one we read";
const AFTER_CLOSE: &str = "llhttp refuses data after `Connection: close`; we never read it";
const BARE_LF: &str = "bare LF line endings accepted (RFC 9112 §2.2 MAY); llhttp strict refuses";
const NOT_HTTP_1: &str = "not HTTP/1.0 or HTTP/1.1: a protocol failure for an HTTP monitor";
const AMBIGUOUS_FRAMING: &str = "Transfer-Encoding not ending in a single chunked: a protocol \
     failure for us (issue 12 item 16), the body read to EOF by llhttp";

/// Cases that are not replayed, by their `meta` type.
fn skip_reason(kind: &str) -> Option<&'static str> {
    if kind.starts_with("response-lenient") {
        // Each is the lenient twin of a strict case in the same file, which is replayed.
        return Some("llhttp lenient flag (off by default; the strict twin is replayed)");
    }
    if kind != "response" && kind != "response-finish" {
        return Some("not a response case");
    }
    None
}

/// One case of an llhttp markdown file.
struct Case {
    /// `file.md: heading`.
    name: String,
    /// The `type` of its `meta` comment (`response`, `response-lenient-all`, ...).
    kind: String,
    /// `skipBody`: llhttp is told the response has no body, as for a HEAD request.
    skip_body: bool,
    /// The bytes the server sends.
    input: Vec<u8>,
    log: Vec<String>,
}

/// Every case of every file in `tests/fixtures/llhttp/response/`, in file order.
fn load_cases() -> Vec<Case> {
    let dir = fixture("llhttp/response");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    files.iter().flat_map(|f| parse_file(f)).collect()
}

/// The cases of one file: a heading names the case, then come a `<!-- meta={...} -->` comment,
/// an ```` ```http ```` block and a ```` ```log ```` block, with prose allowed in between.
fn parse_file(path: &Path) -> Vec<Case> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut cases = Vec::new();
    let (mut heading, mut meta, mut input) = (String::new(), None, None);
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let at = || format!("{file}:{}", n + 1);
        if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_string();
        } else if let Some(json) = line
            .strip_prefix("<!-- meta=")
            .and_then(|l| l.strip_suffix("-->"))
        {
            let v: serde_json::Value =
                serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{}: {e}", at()));
            meta = Some(v);
        } else if line == "```http" || line == "```log" {
            let mut block = String::new();
            for (_, l) in lines.by_ref().take_while(|(_, l)| *l != "```") {
                block.push_str(l);
                block.push('\n');
            }
            if line == "```http" {
                input = Some(decode_input(&block));
                continue;
            }
            let meta = meta
                .take()
                .unwrap_or_else(|| panic!("{}: log without meta", at()));
            cases.push(Case {
                name: format!("{file}: {heading}"),
                kind: meta["type"].as_str().unwrap_or_default().to_string(),
                skip_body: meta["skipBody"] == serde_json::Value::Bool(true),
                input: input
                    .take()
                    .unwrap_or_else(|| panic!("{}: log without http", at())),
                log: block.lines().map(str::to_string).collect(),
            });
        }
    }
    cases
}

/// An `http` block to the bytes llhttp is fed, as llhttp's `test/md-test.ts` does it: drop the
/// last newline and `\`-newline continuations, turn newlines into CRLF, then the escapes
/// `\r`, `\n`, `\t`, `\f`.
fn decode_input(block: &str) -> Vec<u8> {
    assert!(
        !block.contains("${") && !block.contains("\\x"),
        "escape not supported here (see md-test.ts): {block:?}"
    );
    let text = block.strip_suffix('\n').unwrap_or(block);
    let text = text.replace("\\\n", "").replace('\n', "\r\n");
    let text = text
        .replace("\\r", "\r")
        .replace("\\n", "\n")
        .replace("\\t", "\t")
        .replace("\\f", "\x0c");
    text.into_bytes()
}

/// Accepted, or refused with why.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Accept,
    Reject(String),
}

/// llhttp's verdict on its event log followed by EOF (see the module doc).
fn llhttp_verdict(log: &[String]) -> Verdict {
    // Where llhttp_finish would stand: true between messages and in a body that ends at EOF.
    let mut safe_at_eof = true;
    for line in log {
        let event = line.split_once(' ').map_or("", |(_, e)| e);
        if let Some(error) = event.strip_prefix("error ") {
            return Verdict::Reject(error.to_string());
        }
        if event == "message begin" {
            safe_at_eof = false;
        } else if let Some(head) = event.strip_prefix("headers complete ") {
            // F_CHUNKED = 0x8, F_CONTENT_LENGTH = 0x20: a framed body must end before EOF.
            let flags = head
                .split(' ')
                .find_map(|w| w.strip_prefix("flags="))
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .unwrap_or_else(|| panic!("no flags in {line:?}"));
            safe_at_eof = flags & (0x8 | 0x20) == 0;
        } else if event == "message complete" {
            safe_at_eof = true;
        }
    }
    if safe_at_eof {
        Verdict::Accept
    } else {
        Verdict::Reject("EOF inside a message (llhttp_finish: Invalid EOF state)".into())
    }
}

/// Our verdict: the probe's check of a server that sends `case.input` and closes.
fn our_verdict(case: &Case) -> (Verdict, String) {
    let raw = case.input.clone();
    let server = HttpServer::start(move |_, _| Reply::Raw(raw.clone()));
    let method = if case.skip_body { "HEAD" } else { "GET" };
    // Every status is judged up and no Location is followed (some cases redirect to real hosts).
    let text = format!(
        r#"
[agent]
id = "llhttp-replay"
timeout = "5s"

[[target]]
id = "case"
url = {url:?}
method = "{method}"
expect_status = ["100-599"]
follow_redirects = false
keep_alive = false
retries = 0
"#,
        url = server.url("/")
    );
    let config = Config::parse(&text, Path::new("/nonexistent/agent.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("config: {e}"));
    let r = Prober::new(&config.agent, RuleSet::default()).check(&config.targets[0]);
    let status = r.status.map_or("-".into(), |s| s.to_string());
    let verdict = match (r.up, r.failure) {
        (true, _) => Verdict::Accept,
        (false, f) => Verdict::Reject(format!(
            "{}: {}",
            f.map_or("?", |f| f.as_str()),
            r.error.as_deref().unwrap_or("")
        )),
    };
    (verdict, status)
}

fn short(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Reject(why) => format!("reject ({why})"),
    }
}

#[test]
fn llhttp_response_cases_agree_except_the_known_differences() {
    let cases = load_cases();
    assert!(cases.len() >= 80, "only {} cases parsed", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be unique");
    let (mut skipped, mut agree, mut differ) = (0, 0, Vec::new());
    let mut table = String::new();
    for case in &cases {
        if let Some(why) = skip_reason(&case.kind) {
            skipped += 1;
            table.push_str(&format!("SKIP   {}: {why}\n", case.name));
            continue;
        }
        let theirs = llhttp_verdict(&case.log);
        let (ours, status) = our_verdict(case);
        let same = (theirs == Verdict::Accept) == (ours == Verdict::Accept);
        table.push_str(&format!(
            "{}  {}\n       llhttp: {}\n       ours:   {} [status {status}]\n",
            if same { "agree " } else { "DIFFER" },
            case.name,
            short(&theirs),
            short(&ours),
        ));
        if same {
            agree += 1;
        } else {
            differ.push(case.name.clone());
        }
    }
    eprintln!(
        "{table}\nllhttp cases: {} total, {skipped} skipped, {agree} agree, {} differ",
        cases.len(),
        differ.len()
    );

    let known: Vec<&str> = KNOWN_DIFFERENCES.iter().map(|(n, _)| *n).collect();
    let mut problems = Vec::new();
    for name in &differ {
        if !known.contains(&name.as_str()) {
            problems.push(format!("new difference: {name}"));
        }
    }
    for name in &known {
        if !cases.iter().any(|c| c.name == *name) {
            problems.push(format!("listed but no such case: {name}"));
        } else if !differ.iter().any(|d| d == name) {
            problems.push(format!("listed but no longer differs (remove it): {name}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_md_decoding_follows_llhttps_harness() {
    // A `\`-continued line joins the next, newlines become CRLF, `\r\n` escapes are bytes.
    assert_eq!(
        decode_input("HTTP/1.1 200 \\r\\n\\\nA:\\tb\n\nbody\n"),
        b"HTTP/1.1 200 \r\nA:\tb\r\n\r\nbody"
    );
    let log = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    // A Content-Length body cut by EOF is refused by llhttp_finish; an EOF-delimited one is not.
    let cut = log(&[
        "off=0 message begin",
        "off=38 headers complete status=200 v=1/1 flags=20 content_length=3",
    ]);
    assert!(matches!(llhttp_verdict(&cut), Verdict::Reject(_)));
    let eof_body = log(&[
        "off=0 message begin",
        "off=19 headers complete status=200 v=1/1 flags=0 content_length=0",
        "off=19 len=5 span[body]=\"hello\"",
    ]);
    assert_eq!(llhttp_verdict(&eof_body), Verdict::Accept);
}
