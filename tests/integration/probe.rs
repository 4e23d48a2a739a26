//! The probe engine against real servers on 127.0.0.1 / ::1 (support/http.rs): every way a
//! check can end, each asserting the record's fields. Targets are built the way users build
//! them: a TOML config through `Config::parse`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use sitewatch::config::Config;
use sitewatch::probe::Prober;
use sitewatch::result::{CheckResult, FailureReason};
use sitewatch::rules::RuleSet;

use crate::support::http::{Cert, DeafServer, HttpServer, OpensslServer, Reply, fixture};

/// Parses an agent.toml with one target and runs one check of it.
fn probe_with(agent_extra: &str, target_extra: &str) -> CheckResult {
    let config = config_with(agent_extra, target_extra);
    let prober = Prober::for_config(&config, RuleSet::default());
    prober.check(&config.targets[0])
}

/// An agent.toml with test defaults and one target `t`, parsed as users' files are.
fn config_with(agent_extra: &str, target_extra: &str) -> Config {
    let text = format!(
        r#"
[agent]
id = "test-agent"
timeout = "10s"
user_agent = "sitewatch-test/1"
retry_delay = "100ms"
{agent_extra}

[[target]]
id = "t"
tags = ["probe-test"]
{target_extra}
"#
    );
    Config::parse(&text, Path::new("/nonexistent/agent.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

fn probe(target_extra: &str) -> CheckResult {
    probe_with("", target_extra)
}

fn ca_file() -> String {
    fixture("tls/ca.pem").display().to_string()
}

/// The failure fields: reason and a piece of the error text.
#[track_caller]
fn assert_down(r: &CheckResult, reason: FailureReason, text: &str) {
    assert!(!r.up, "{r:#?}");
    assert_eq!(r.failure, Some(reason), "{r:#?}");
    let error = r.error.as_deref().unwrap_or("");
    assert!(error.contains(text), "error {error:?} lacks {text:?}");
}

#[track_caller]
fn assert_up(r: &CheckResult) {
    assert!(r.up, "{r:#?}");
    assert_eq!(r.failure, None);
    assert_eq!(r.error, None);
}

/// Phases that happened are present, the rest absent, and together they fit in `total`.
#[track_caller]
fn assert_phases(r: &CheckResult, dns: bool, connect: bool, tls: bool, response: bool) {
    let t = &r.timings;
    assert_eq!(t.dns.is_some(), dns, "dns {t:?}");
    assert_eq!(t.connect.is_some(), connect, "connect {t:?}");
    assert_eq!(t.tls.is_some(), tls, "tls {t:?}");
    assert_eq!(t.ttfb.is_some(), response, "ttfb {t:?}");
    let parts = [t.dns, t.connect, t.tls, t.ttfb, t.transfer];
    for p in parts.iter().flatten() {
        assert!(*p >= 0.0, "{t:?}");
    }
    let sum: f64 = parts.iter().flatten().sum();
    assert!(
        t.total >= sum,
        "total {} < sum of phases {sum}: {t:?}",
        t.total
    );
    assert!(t.total > 0.0);
}

#[test]
fn ok_200_with_matching_body_fills_the_record() {
    let server = HttpServer::start(|_, _| Reply::status(200, "hello world"));
    let url = server.url("/health");
    let r = probe(&format!("url = {url:?}\nregex = \"hello\""));
    assert_up(&r);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.http_version.as_deref(), Some("HTTP/1.1"));
    assert_eq!(r.final_url.as_deref(), Some(url.as_str()));
    assert_eq!(r.url, url);
    assert_eq!(r.target, "t");
    assert_eq!(r.agent, "test-agent");
    assert_eq!(r.method, "GET");
    assert_eq!(r.attempt, 1);
    assert_eq!(r.redirects, 0);
    assert_eq!(r.remote_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(r.body_bytes, 11);
    assert!(!r.body_truncated);
    assert_eq!(r.regex.as_deref(), Some("hello"));
    assert_eq!(r.regex_matched, Some(true));
    assert_eq!(r.tags, vec!["probe-test".to_string()]);
    assert_eq!(
        (r.tls_version.as_ref(), r.cert_issuer.as_ref()),
        (None, None)
    );
    // An IP literal needs no lookup: dns is absent, not 0.
    assert_phases(&r, false, true, false, true);
    assert!(r.timings.transfer.is_some());
    assert_eq!(r.rule, None);
    // The request went out as configured, without Accept-Encoding.
    let req = &server.requests()[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("GET", "/health"));
    assert_eq!(req.header("user-agent"), Some("sitewatch-test/1"));
    assert_eq!(req.header("accept-encoding"), None);
    // A connection used once says so, so the server closes it with the response.
    assert_eq!(req.header("connection"), Some("close"));
}

#[test]
fn ok_200_with_non_matching_body_is_body_mismatch() {
    let server = HttpServer::start(|_, _| Reply::status(200, "maintenance"));
    let r = probe(&format!("url = {:?}\nregex = \"hello\"", server.url("/")));
    assert_down(
        &r,
        FailureReason::BodyMismatch,
        "does not match regex \"hello\"",
    );
    assert_eq!(r.status, Some(200));
    assert_eq!(r.regex_matched, Some(false));
    assert_eq!(r.body_bytes, 11);
}

#[test]
fn error_statuses_are_results_not_errors() {
    for status in [404u16, 500] {
        let server = HttpServer::start(move |_, _| Reply::status(status, "nope"));
        let r = probe(&format!("url = {:?}", server.url("/x")));
        assert_down(&r, FailureReason::HttpStatus, &format!("status {status}"));
        assert_eq!(r.status, Some(status));
        assert_eq!(r.body_bytes, 4);
        assert_phases(&r, false, true, false, true);
    }
    // expect_status decides: a 404 that is expected is up.
    let server = HttpServer::start(|_, _| Reply::status(404, "gone"));
    let r = probe(&format!(
        "url = {:?}\nexpect_status = [404]",
        server.url("/")
    ));
    assert_up(&r);
    assert_eq!(r.status, Some(404));
}

#[test]
fn redirect_chain_of_three_hops_is_followed_and_counted() {
    let server = HttpServer::start(|req, _| match req.path.as_str() {
        "/a" => Reply::redirect(301, "/b"),
        "/b" => Reply::redirect(302, "c"), // relative to /b
        "/c" => Reply::redirect(307, "/final?x=1"),
        "/final?x=1" => Reply::status(200, "arrived"),
        _ => Reply::status(404, ""),
    });
    let r = probe(&format!(
        "url = {:?}\nregex = \"arrived\"",
        server.url("/a")
    ));
    assert_up(&r);
    assert_eq!(r.redirects, 3);
    assert_eq!(r.status, Some(200));
    assert_eq!(
        r.final_url.as_deref(),
        Some(server.url("/final?x=1").as_str())
    );
    assert_eq!(r.url, server.url("/a"));
    let paths: Vec<String> = server.requests().into_iter().map(|q| q.path).collect();
    assert_eq!(paths, ["/a", "/b", "/c", "/final?x=1"]);
    // Four connections, four responses: phases summed over the hops.
    assert_phases(&r, false, true, false, true);

    // Not following: the 301 is the result (and 3xx is in the default expect_status).
    let r = probe(&format!(
        "url = {:?}\nfollow_redirects = false",
        server.url("/a")
    ));
    assert_up(&r);
    assert_eq!((r.status, r.redirects), (Some(301), 0));

    // More hops than allowed.
    let r = probe(&format!("url = {:?}\nmax_redirects = 2", server.url("/a")));
    assert_down(&r, FailureReason::TooManyRedirects, "more than 2 redirects");
    assert_eq!(r.redirects, 2);
    assert_eq!(r.status, Some(307));
}

#[test]
fn redirect_loop_is_detected() {
    let server = HttpServer::start(|req, _| match req.path.as_str() {
        "/a" => Reply::redirect(302, "/b"),
        _ => Reply::redirect(302, "/a"),
    });
    let r = probe(&format!("url = {:?}", server.url("/a")));
    assert_down(&r, FailureReason::TooManyRedirects, "redirect loop");
    let error = r.error.unwrap();
    assert!(
        error.contains("/a -> ") && error.contains("/b -> "),
        "{error}"
    );
    assert_eq!(r.redirects, 1);
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn redirect_to_another_host_drops_credentials_and_303_turns_post_into_get() {
    let other = HttpServer::start(|_, _| Reply::status(200, "other"));
    let target = other.url("/landing");
    let server = HttpServer::start(move |_, _| Reply::redirect(303, &target));
    let r = probe(&format!(
        "url = {:?}\nmethod = \"POST\"\nbody = \"form=1\"\n[target.headers]\nAuthorization = \"Bearer s3cret\"\nX-Trace = \"keep\"",
        server.url("/login")
    ));
    assert_up(&r);
    assert_eq!(r.redirects, 1);
    let first = &server.requests()[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.header("authorization"), Some("Bearer s3cret"));
    let second = &other.requests()[0];
    assert_eq!(second.method, "GET");
    assert!(second.body.is_empty());
    assert_eq!(second.header("authorization"), None);
    assert_eq!(second.header("x-trace"), Some("keep"));
}

#[test]
fn server_that_never_answers_times_out_within_the_timeout() {
    let server = HttpServer::start(|_, _| Reply::Hang);
    let started = Instant::now();
    let r = probe(&format!("url = {:?}\ntimeout = \"1s\"", server.url("/")));
    let took = started.elapsed();
    assert_down(&r, FailureReason::Timeout, "waiting for the response");
    assert!(
        took < Duration::from_secs(6),
        "took {took:?} for a 1s timeout"
    );
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert_eq!(r.status, None);
    assert_eq!(r.remote_ip.as_deref(), Some("127.0.0.1"));
    assert_phases(&r, false, true, false, false);
}

#[test]
fn closed_port_is_a_connect_failure() {
    let port = crate::support::free_port();
    let r = probe(&format!("url = \"http://127.0.0.1:{port}/\""));
    assert_down(&r, FailureReason::Connect, &format!("127.0.0.1:{port}"));
    assert_eq!(r.status, None);
    assert_eq!(r.remote_ip, None);
    assert_phases(&r, false, true, false, false);
}

#[test]
fn unresolvable_name_is_a_dns_failure() {
    let r = probe("url = \"http://no-such-host.invalid/\"");
    assert_down(&r, FailureReason::Dns, "no-such-host.invalid");
    assert_eq!(r.status, None);
    assert_phases(&r, true, false, false, false);
}

#[test]
fn body_larger_than_the_cap_is_read_up_to_the_cap() {
    let mut body = vec![b'a'; 5000];
    body.extend_from_slice(b"NEEDLE");
    let server = HttpServer::start(move |_, _| Reply::status(200, body.clone()));
    let url = server.url("/big");
    let r = probe_with(
        "body_cap = \"1KiB\"",
        &format!("url = {url:?}\nregex = \"^a+$\""),
    );
    assert_up(&r);
    assert_eq!(r.body_bytes, 1024);
    assert!(r.body_truncated);
    assert_eq!(r.regex_matched, Some(true));

    let r = probe_with(
        "body_cap = \"1KiB\"",
        &format!("url = {url:?}\nregex = \"NEEDLE\""),
    );
    assert_down(&r, FailureReason::BodyMismatch, "cut at the cap");
    assert!(r.body_truncated);
    assert_eq!(r.regex_matched, Some(false));
}

#[test]
fn invalid_utf8_body_matches_a_byte_regex() {
    let server = HttpServer::start(|_, _| Reply::status(200, b"\xff\xfeok\x80 done".to_vec()));
    let r = probe(&format!(
        "url = {:?}\nregex = '(?-u)\\xFF\\xFEok\\x80'",
        server.url("/")
    ));
    assert_up(&r);
    assert_eq!(r.regex_matched, Some(true));
    assert_eq!(r.body_bytes, 10);
    // A Unicode regex on the same bytes simply does not match; nothing panics.
    let r = probe(&format!("url = {:?}\nregex = \"^ok\"", server.url("/")));
    assert_down(&r, FailureReason::BodyMismatch, "does not match");
}

#[test]
fn regex_absent() {
    let check = |body: &'static str, up: bool| {
        let server = HttpServer::start(move |_, _| Reply::status(200, body));
        let r = probe(&format!(
            "url = {:?}\nregex_absent = \"(?i)error\"",
            server.url("/")
        ));
        assert_eq!(r.up, up, "{body}: {r:#?}");
        if !up {
            assert_down(&r, FailureReason::BodyMismatch, "matches regex_absent");
        }
        // regex/regex_matched describe `regex` only.
        assert_eq!((r.regex, r.regex_matched), (None, None));
    };
    check("all fine", true);
    check("Internal ERROR: db down", false);
}

#[test]
fn tls_with_the_test_ca_records_certificate_facts() {
    let server = HttpServer::start_tls(Cert::Localhost, |_, _| Reply::status(200, "secure"));
    let url = format!("https://localhost:{}/", server.port());
    let r = probe(&format!(
        "url = {url:?}\nregex = \"secure\"\n[target.tls]\nca_file = {:?}",
        ca_file()
    ));
    assert_up(&r);
    assert_eq!(r.status, Some(200));
    // native-tls's acceptor (OpenSSL's "intermediate" profile) stops at TLS 1.2.
    assert_eq!(r.tls_version.as_deref(), Some("TLSv1.2"));
    assert_eq!(
        r.cert_issuer.as_deref(),
        Some("O=sitewatch tests, CN=sitewatch test CA")
    );
    let not_after = r.cert_not_after.as_deref().unwrap();
    assert!(
        not_after.starts_with("21") && not_after.ends_with('Z'),
        "{not_after}"
    );
    assert!(r.cert_days_left.unwrap() > 36_000.0, "{r:#?}");
    assert_eq!(r.remote_ip.as_deref(), Some("127.0.0.1"));
    // A name: dns happened; https: tls happened.
    assert_phases(&r, true, true, true, true);
}

#[test]
fn tls_version_and_http_1_0_from_openssl_s_server() {
    let server = OpensslServer::start();
    let r = probe(&format!(
        "url = \"https://localhost:{}/\"\n[target.tls]\nca_file = {:?}",
        server.port,
        ca_file()
    ));
    assert_up(&r);
    assert_eq!(r.tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(r.http_version.as_deref(), Some("HTTP/1.0"));
    assert_eq!(
        r.cert_issuer.as_deref(),
        Some("O=sitewatch tests, CN=sitewatch test CA")
    );
    assert!(r.body_bytes > 0);
    assert_phases(&r, true, true, true, true);
}

#[test]
fn tls_verification_failures() {
    let check = |cert: Cert, url_host: &str, text: &str, issuer: &str| {
        let server = HttpServer::start_tls(cert, |_, _| Reply::status(200, "x"));
        let r = probe(&format!(
            "url = \"https://{url_host}:{}/\"\n[target.tls]\nca_file = {:?}",
            server.port(),
            ca_file()
        ));
        assert_down(&r, FailureReason::Tls, "TLS handshake with");
        let error = r.error.clone().unwrap().to_lowercase();
        assert!(error.contains(text), "{cert:?}: {error:?} lacks {text:?}");
        assert_eq!(r.status, None);
        // What is known is recorded (issue 12 item 10): the address and the refused
        // certificate.
        assert_eq!(r.remote_ip.as_deref(), Some("127.0.0.1"), "{r:#?}");
        assert_eq!(r.cert_issuer.as_deref(), Some(issuer), "{r:#?}");
        assert!(r.tls_version.is_some(), "{r:#?}");
        assert_phases(&r, url_host == "localhost", true, true, false);
        r
    };
    let ca = "O=sitewatch tests, CN=sitewatch test CA";
    check(Cert::WrongHost, "localhost", "hostname mismatch", ca);
    check(Cert::WrongHost, "127.0.0.1", "ip address mismatch", ca);
    let r = check(Cert::Expired, "localhost", "expired", ca);
    let not_after = r.cert_not_after.as_deref().unwrap();
    assert!(not_after.starts_with("2021-"), "{not_after}");
    assert!(r.cert_days_left.unwrap() < 0.0, "{r:#?}");
    check(Cert::SelfSigned, "localhost", "self-signed", "CN=localhost");

    // A server that does not speak TLS at all: the address is known, no certificate is.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        // Answers the ClientHello (and the re-read's) with plain HTTP.
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let r = probe(&format!("url = \"https://127.0.0.1:{port}/\""));
    // Unblocks the server thread whether or not the probe made a second connection.
    for _ in 0..2 {
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    }
    server.join().unwrap();
    assert_down(&r, FailureReason::Tls, "TLS handshake with");
    assert_eq!(r.remote_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!((r.cert_issuer, r.cert_not_after), (None, None));
}

#[test]
fn tls_insecure_skip_verify_is_up_and_still_records_the_certificate() {
    let check = |cert: Cert, issuer: &str, expired: bool| {
        let server = HttpServer::start_tls(cert, |_, _| Reply::status(200, "x"));
        let r = probe(&format!(
            "url = \"https://127.0.0.1:{}/\"\n[target.tls]\ninsecure_skip_verify = true",
            server.port()
        ));
        assert_up(&r);
        assert_eq!(r.cert_issuer.as_deref(), Some(issuer));
        assert_eq!(r.cert_days_left.unwrap() < 0.0, expired, "{r:#?}");
        assert!(r.tls_version.is_some());
    };
    check(Cert::SelfSigned, "CN=localhost", false);
    check(
        Cert::Expired,
        "O=sitewatch tests, CN=sitewatch test CA",
        true,
    );
}

#[test]
fn trickling_body_ends_at_the_timeout() {
    let server = HttpServer::start(|_, _| Reply::Trickle {
        head: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec(),
        body: vec![b'x'; 100],
        every: Duration::from_secs(1),
    });
    let started = Instant::now();
    let r = probe(&format!("url = {:?}\ntimeout = \"3s\"", server.url("/")));
    let took = started.elapsed();
    assert_down(&r, FailureReason::Timeout, "reading the body");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(took >= Duration::from_millis(2900), "took {took:?}");
    assert_eq!(r.status, Some(200));
    assert!(r.body_bytes > 0 && r.body_bytes < 100, "{}", r.body_bytes);
    assert!(!r.body_truncated);
    assert_eq!(r.regex_matched, None);
    assert_phases(&r, false, true, false, true);

    // The same with the response head trickled: it never completes.
    let server = HttpServer::start(|_, _| Reply::Trickle {
        head: Vec::new(),
        body: b"HTTP/1.1 200 OK\r\nX-Slow: 1234567890\r\n\r\n".to_vec(),
        every: Duration::from_millis(500),
    });
    let started = Instant::now();
    let r = probe(&format!("url = {:?}\ntimeout = \"2s\"", server.url("/")));
    let took = started.elapsed();
    assert_down(&r, FailureReason::Timeout, "reading the response header");
    assert!(took < Duration::from_secs(7), "took {took:?}");
    assert_eq!(r.status, None);
}

#[test]
fn tls_handshake_with_a_silent_server_times_out() {
    // A plain server that never answers: the ClientHello gets no ServerHello.
    let server = HttpServer::start(|_, _| Reply::Hang);
    let started = Instant::now();
    let r = probe(&format!(
        "url = \"https://127.0.0.1:{}/\"\ntimeout = \"1s\"",
        server.port()
    ));
    let took = started.elapsed();
    assert_down(&r, FailureReason::Timeout, "TLS handshake with 127.0.0.1");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_phases(&r, false, true, true, false);
    assert_eq!(r.tls_version, None);
}

#[test]
fn one_megabyte_response_header_is_a_protocol_failure() {
    let server = HttpServer::start(|_, _| {
        let mut raw = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        raw.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
        Reply::Raw(raw)
    });
    let r = probe(&format!("url = {:?}", server.url("/")));
    assert_down(
        &r,
        FailureReason::Protocol,
        "response header larger than 65536 bytes",
    );
    assert_eq!(r.status, None);
    assert_eq!(r.body_bytes, 0);
}

#[test]
fn gzip_bomb_is_read_as_its_raw_capped_bytes() {
    let bomb = std::fs::read(fixture("tls/gzip-bomb.gz")).unwrap();
    let size = bomb.len() as u64;
    let server = HttpServer::start(move |_, _| Reply::Response {
        status: 200,
        headers: vec![("Content-Encoding".into(), "gzip".into())],
        body: bomb.clone(),
    });
    // 10 MiB of zeros inflated would be 10 MiB; we read the ~10 KiB as sent.
    let r = probe(&format!("url = {:?}", server.url("/")));
    assert_up(&r);
    assert_eq!(r.body_bytes, size);
    assert!(size < 64 * 1024);
    assert!(!r.body_truncated);
    let r = probe_with(
        "body_cap = \"4KiB\"",
        &format!("url = {:?}", server.url("/")),
    );
    assert_up(&r);
    assert_eq!((r.body_bytes, r.body_truncated), (4096, true));
}

#[test]
fn ipv6_loopback() {
    let server = HttpServer::start_v6(|_, _| Reply::status(200, "six"));
    let url = server.url("/");
    assert!(url.starts_with("http://[::1]:"), "{url}");
    let r = probe(&format!("url = {url:?}\nip = \"v6\""));
    assert_up(&r);
    assert_eq!(r.remote_ip.as_deref(), Some("::1"));
    // An IPv6 literal cannot satisfy ip = "v4".
    let r = probe(&format!("url = {url:?}\nip = \"v4\""));
    assert_down(&r, FailureReason::Dns, "has no IPv4 address");
    assert_eq!(r.status, None);
}

#[test]
fn ip_family_filters_resolved_addresses_of_localhost() {
    use std::net::ToSocketAddrs;
    // What `localhost` resolves to depends on /etc/hosts; the test asserts whichever holds.
    let addrs: Vec<_> = ("localhost", 80).to_socket_addrs().unwrap().collect();
    let has_v4 = addrs.iter().any(|a| a.is_ipv4());
    let has_v6 = addrs.iter().any(|a| a.is_ipv6());
    let v4 = HttpServer::start(|_, _| Reply::status(200, "four"));
    for (family, present, want_ip) in [("v4", has_v4, "127.0.0.1"), ("v6", has_v6, "::1")] {
        let server = if family == "v4" {
            None
        } else {
            Some(HttpServer::start_v6(|_, _| Reply::status(200, "six")))
        };
        let port = server.as_ref().map(|s| s.port()).unwrap_or(v4.port());
        let r = probe(&format!(
            "url = \"http://localhost:{port}/\"\nip = \"{family}\""
        ));
        if present {
            assert_up(&r);
            assert_eq!(r.remote_ip.as_deref(), Some(want_ip));
        } else {
            let label = if family == "v4" { "IPv4" } else { "IPv6" };
            assert_down(
                &r,
                FailureReason::Dns,
                &format!("localhost has no {label} address"),
            );
        }
        assert!(r.timings.dns.is_some());
    }
}

#[test]
fn retries_until_up_and_count_attempts() {
    let server = HttpServer::start(|_, i| {
        if i == 0 {
            Reply::status(500, "flaky")
        } else {
            Reply::status(200, "ok")
        }
    });
    let r = probe(&format!("url = {:?}\nretries = 2", server.url("/")));
    assert_up(&r);
    assert_eq!((r.attempt, r.status), (2, Some(200)));
    assert_eq!(
        server.requests().len(),
        2,
        "an up attempt stops the retries"
    );
    assert!(r.timings.total >= 100.0, "includes the retry delay");

    let server = HttpServer::start(|_, _| Reply::status(500, "down"));
    let r = probe(&format!("url = {:?}\nretries = 2", server.url("/")));
    assert_down(&r, FailureReason::HttpStatus, "status 500");
    assert_eq!(r.attempt, 3);
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn post_with_body_and_headers_reaches_the_server() {
    let server = HttpServer::start(|req, _| {
        if req.method == "POST" && req.body == br#"{"q":1}"# {
            Reply::status(201, "created")
        } else {
            Reply::status(400, "bad")
        }
    });
    let r = probe(&format!(
        "url = {:?}\nmethod = \"post\"\nbody = '{{\"q\":1}}'\n[target.headers]\nContent-Type = \"application/json\"\nX-Token = \"abc\"",
        server.url("/api")
    ));
    assert_up(&r);
    assert_eq!((r.method.as_str(), r.status), ("POST", Some(201)));
    let req = &server.requests()[0];
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("x-token"), Some("abc"));
    assert_eq!(req.header("content-length"), Some("7"));
}

#[test]
fn a_rule_that_cannot_run_is_a_rule_failure_but_never_hides_a_transport_failure() {
    // RuleSet::default() has no modules loaded: every evaluation is a rule error.
    let server = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let r = probe(&format!(
        "url = {:?}\nrule = \"status_ok.wasm\"",
        server.url("/")
    ));
    assert_eq!(r.failure, Some(FailureReason::Rule), "{r:#?}");
    assert_eq!(r.rule.as_deref(), Some("status_ok.wasm"));
    assert_eq!(r.rule_verdict.as_deref(), Some("error"));
    assert!(r.rule_ms.is_some());

    let port = crate::support::free_port();
    let r = probe(&format!(
        "url = \"http://127.0.0.1:{port}/\"\nrule = \"status_ok.wasm\""
    ));
    assert_down(&r, FailureReason::Connect, "connect to");
    assert_eq!(r.rule_verdict.as_deref(), Some("error"));
}

#[test]
fn keep_alive_target_reuses_its_connection_between_checks() {
    let server = HttpServer::start_keep_alive(|_, _| Reply::status(200, "ok"));
    let check_twice = |keep_alive: bool| {
        let config = config_with(
            "",
            &format!("url = {:?}\nkeep_alive = {keep_alive}", server.url("/")),
        );
        let prober = Prober::for_config(&config, RuleSet::default());
        let target = &config.targets[0];
        (prober.check(target), prober.check(target))
    };
    let (first, second) = check_twice(true);
    assert_up(&first);
    assert_up(&second);
    assert_eq!(
        server.connections(),
        1,
        "the second check reused the connection"
    );
    assert_phases(&first, false, true, false, true);
    // A reused connection has no connect phase, but still its remote address.
    assert_phases(&second, false, false, false, true);
    assert_eq!(second.remote_ip.as_deref(), Some("127.0.0.1"));

    // The default: a fresh connection per check, connect measured each time.
    let (first, second) = check_twice(false);
    assert_phases(&first, false, true, false, true);
    assert_phases(&second, false, true, false, true);
    assert_eq!(server.connections(), 3);
    assert_eq!(server.requests().len(), 4);
    let close: Vec<Option<String>> = server
        .requests()
        .iter()
        .map(|r| r.header("connection").map(str::to_string))
        .collect();
    assert_eq!(
        close,
        [None, None, Some("close".into()), Some("close".into())],
        "only the connections used once ask the server to close"
    );

    // A Connection header from the config wins.
    let config = config_with(
        "",
        &format!(
            "url = {:?}\nheaders = {{ Connection = \"keep-alive\" }}",
            server.url("/")
        ),
    );
    let r = Prober::for_config(&config, RuleSet::default()).check(&config.targets[0]);
    assert_up(&r);
    let last = server.requests().pop().unwrap();
    assert_eq!(last.header("connection"), Some("keep-alive"));
}

#[test]
fn a_ca_file_that_is_not_pem_is_a_tls_failure_naming_the_file() {
    let path = std::env::temp_dir().join(format!("sitewatch-bad-ca-{}.pem", std::process::id()));
    std::fs::write(&path, "not a certificate").unwrap();
    let server = HttpServer::start_tls(Cert::Localhost, |_, _| Reply::status(200, "x"));
    let r = probe(&format!(
        "url = \"https://localhost:{}/\"\n[target.tls]\nca_file = {:?}",
        server.port(),
        path.display().to_string()
    ));
    let _ = std::fs::remove_file(&path);
    assert_down(&r, FailureReason::Tls, "tls ca_file");
    assert!(r.error.unwrap().contains("sitewatch-bad-ca-"));
    // Plain HTTP targets never need the TLS connector, so they are not affected.
    let plain = HttpServer::start(|_, _| Reply::status(200, "x"));
    assert_up(&probe(&format!("url = {:?}", plain.url("/"))));
}

#[test]
fn broken_bodies_are_body_read_failures() {
    let check = |raw: &'static [u8], bytes: u64, text: &str| {
        let server = HttpServer::start(move |_, _| Reply::Raw(raw.to_vec()));
        let r = probe(&format!("url = {:?}", server.url("/")));
        assert_down(&r, FailureReason::BodyRead, text);
        assert_eq!(r.status, Some(200));
        assert_eq!(r.body_bytes, bytes);
        assert_eq!(r.regex_matched, None);
        assert_phases(&r, false, true, false, true);
    };
    // The server closes after 10 of 100 promised bytes.
    check(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        10,
        "after 10 bytes",
    );
    // A chunk size that is not hex (ureq rejects the buffer before handing out "hello").
    check(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        0,
        "chunk length",
    );
}

#[test]
fn garbage_instead_of_http_is_a_protocol_failure() {
    let server = HttpServer::start(|_, _| Reply::Raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()));
    let r = probe(&format!("url = {:?}", server.url("/")));
    assert_down(&r, FailureReason::Protocol, "invalid HTTP response");
    assert_eq!(r.status, None);
}

/// Issue 12 item 15: RFC 9112 §7.1.1 has a client ignore chunk extensions; ureq-proto refused
/// any chunk-size line over 20 bytes, so a valid page was reported down (`body_read`).
#[test]
fn chunk_extensions_of_any_length_are_ignored() {
    let server = HttpServer::start(|_, _| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              5;name=\"a quoted extension value well over twenty bytes\";flag\r\nhello\r\n\
              6 ; another-extension=token-value-that-is-long\r\n world\r\n\
              0;last=\"extension on the last chunk\"\r\n\r\n"
                .to_vec(),
        )
    });
    let r = probe(&format!(
        "url = {:?}\nregex = \"^hello world$\"",
        server.url("/")
    ));
    assert_up(&r);
    assert_eq!(r.body_bytes, 11);
}

/// Issue 12 item 16: a Transfer-Encoding list that does not end in one `chunked` leaves the body
/// length undefined; it was read as chunked (a stall, or up by luck). Now `protocol`, naming the
/// header, whatever the body looks like.
#[test]
fn ambiguous_transfer_encoding_is_a_protocol_failure() {
    let check = |te_lines: &str, body: &'static str| {
        let raw = format!("HTTP/1.1 200 OK\r\n{te_lines}Connection: close\r\n\r\n{body}");
        let server = HttpServer::start(move |_, _| Reply::Raw(raw.clone().into_bytes()));
        let r = probe(&format!("url = {:?}", server.url("/")));
        assert_down(&r, FailureReason::Protocol, "Transfer-Encoding");
        assert_eq!(r.status, Some(200), "{te_lines}");
        assert_eq!(r.body_bytes, 0);
    };
    let chunked_body = "5\r\nhello\r\n0\r\n\r\n";
    check(
        "Transfer-Encoding: chunked, deflate\r\n",
        "x\u{1}\u{2}raw deflate",
    );
    // A body that happens to be valid chunked does not make it up.
    check("Transfer-Encoding: chunked, deflate\r\n", chunked_body);
    check(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: deflate\r\n",
        chunked_body,
    );
    check(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        chunked_body,
    );
    check("Transfer-Encoding: gzip\r\nContent-Length: 5\r\n", "hello");
    // Codings that end in one chunked, across lines or not, are fine.
    for te in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n",
    ] {
        let raw = format!("HTTP/1.1 200 OK\r\n{te}Connection: close\r\n\r\n{chunked_body}");
        let server = HttpServer::start(move |_, _| Reply::Raw(raw.clone().into_bytes()));
        let r = probe(&format!("url = {:?}", server.url("/")));
        assert_up(&r);
        assert_eq!(r.body_bytes, 5, "{te}");
    }
}

/// Issue 12 item 17: we never ask to switch protocols, so a 101 is a broken server even when
/// `expect_status` lists it.
#[test]
fn unsolicited_101_switching_protocols_is_a_protocol_failure() {
    let server = HttpServer::start(|_, _| {
        Reply::Raw(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                .to_vec(),
        )
    });
    let r = probe(&format!(
        "url = {:?}\nexpect_status = [101, 200]",
        server.url("/")
    ));
    assert_down(
        &r,
        FailureReason::Protocol,
        "unsolicited 101 Switching Protocols",
    );
    assert_eq!(r.status, Some(101));
}

/// Issue 12 item 11: a Location with a space is followed percent-encoded, as browsers and curl
/// do; one that is still unusable says it was the Location header.
#[test]
fn redirect_location_with_a_space_is_percent_encoded_and_bad_ones_name_the_header() {
    let server = HttpServer::start(|req, _| match req.path.as_str() {
        "/start" => Reply::redirect(302, "/a b?q=x y"),
        "/a%20b?q=x%20y" => Reply::status(200, "arrived"),
        "/broken" => Reply::redirect(302, "http://[::1/x"),
        _ => Reply::status(404, ""),
    });
    let r = probe(&format!("url = {:?}", server.url("/start")));
    assert_up(&r);
    assert_eq!(r.redirects, 1);
    assert_eq!(
        r.final_url.as_deref(),
        Some(server.url("/a%20b?q=x%20y").as_str())
    );

    let r = probe(&format!("url = {:?}", server.url("/broken")));
    assert_down(&r, FailureReason::Protocol, "unusable Location header");
    assert!(
        r.error.as_deref().unwrap().contains("http://[::1/x"),
        "{r:#?}"
    );
    assert_eq!(r.redirects, 0);
}

/// Issue 12 item 5: a timeout while the request body is still going out says so, with how much
/// of it went out (it said "waiting for the response").
#[test]
fn timeout_while_sending_the_request_body_says_how_much_was_sent() {
    let server = DeafServer::start();
    let body_len = 16 * 1024 * 1024;
    let body = "x".repeat(body_len);
    let r = probe(&format!(
        "url = {:?}\nmethod = \"POST\"\ntimeout = \"1s\"\nbody = {body:?}",
        server.url("/upload")
    ));
    assert_down(&r, FailureReason::Timeout, "sending the request body, ");
    let error = r.error.as_deref().unwrap();
    let sent: u64 = error
        .split("body, ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {error:?}"));
    assert!(
        error.ends_with(&format!("{sent} of {body_len} bytes sent")),
        "{error}"
    );
    assert!(sent < body_len as u64, "{error}");
    assert_eq!(r.status, None);
    assert_eq!(r.remote_ip.as_deref(), Some("127.0.0.1"));
}

/// Issue 12 item 7: `RUST_LOG=trace` made ureq-proto dump every request, headers included, to
/// stderr. The real binary, one check with secret headers: no piece of a secret in the log.
#[test]
fn trace_logging_never_shows_request_header_values() {
    let server = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let secrets = ["Zq7xK9wPvL3mT8rB", "c00kieV4lue5ecret", "ap1KeyQ8dN2sW6yH"];
    let dir = crate::support::TempDir::new("trace-log");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[target]]\nid = \"t\"\nurl = {:?}\n[target.headers]\nAuthorization = \"Bearer {}\"\nCookie = \"session={}\"\nX-Api-Key = \"{}\"\n",
            server.url("/private"),
            secrets[0],
            secrets[1],
            secrets[2]
        ),
    )
    .unwrap();
    let out = crate::support::sitewatch()
        .args(["--once", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The request went out with the headers, and verbose logging was on (ureq's own debug
    // lines, which redact headers, stay).
    let req = &server.requests()[0];
    assert_eq!(req.header("x-api-key"), Some(secrets[2]));
    assert!(stderr.contains("DEBUG ureq::run"), "{stderr}");
    // ureq-proto dumps 16 bytes a row, so a secret can be cut in two: no 8 bytes of one may show.
    for secret in secrets {
        for piece in secret.as_bytes().windows(8) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !stderr.contains(piece),
                "{piece:?} of a secret in:\n{stderr}"
            );
        }
    }
}

/// A `/probe` module's connector is built with the prober too: its scrapes are timed like
/// checks, and the first one used to report the root store's loading (97 ms in a release
/// build, over a second in a debug build on a loaded machine) as its `tls` phase. The default
/// module (no `module=`) builds none, so `[metrics]` alone loads no root store.
#[cfg(feature = "metrics")]
#[test]
fn probe_modules_tls_connectors_are_built_with_the_prober() {
    let plain = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let config = config_with(
        "",
        &format!(
            "url = {:?}\n\n[metrics]\nlisten = \"127.0.0.1:9\"\n\
             [metrics.module.plain]\ntimeout = \"5s\"\n\
             [metrics.module.tls]\ntls = {{ ca_file = {:?} }}\n\
             [metrics.module.tls_again]\nregex = \"ok\"\ntls = {{ ca_file = {:?} }}\n",
            plain.url("/"),
            ca_file(),
            ca_file()
        ),
    );
    let prober = Prober::for_config(&config, RuleSet::default());
    // One per distinct TLS setting among the modules (the plain module's is the default
    // one): the http target and the default module add none.
    assert_eq!(prober.tls_connectors_built(), 2);
}

/// Issue 12 item 6: building a TLS connector loads the root store (85-250 ms). It happened in
/// the first check of each TLS setting, under a lock other checks queued behind, and in no
/// phase. Now the config's connectors are built with the prober, and a connector a check still
/// has to build (a prober told no targets) is inside that check's `tls` phase.
#[test]
fn tls_connectors_are_built_with_the_prober_and_never_hidden_from_the_phases() {
    let server = HttpServer::start_tls(Cert::Localhost, |_, _| Reply::status(200, "ok"));
    let plain = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let url = format!("https://localhost:{}/", server.port());
    let config = config_with(
        "",
        &format!(
            "url = {url:?}\n[target.tls]\nca_file = {:?}\n\n\
             [[target]]\nid = \"insecure\"\nurl = {url:?}\n[target.tls]\ninsecure_skip_verify = true\n\n\
             [[target]]\nid = \"same-as-t\"\nurl = {url:?}\n[target.tls]\nca_file = {:?}\n\n\
             [[target]]\nid = \"plain\"\nurl = {:?}\nfollow_redirects = false\n\n\
             [[target]]\nid = \"plain-redirectable\"\nurl = {:?}\n",
            ca_file(),
            ca_file(),
            plain.url("/"),
            plain.url("/")
        ),
    );
    let prober = Prober::for_config(&config, RuleSet::default());
    // One per distinct TLS setting of an https target; none for plain-http targets, even one
    // a redirect could take to https (a root store costs resident memory: such a target
    // builds its connector if a redirect ever needs it, timed in its tls phase).
    assert_eq!(prober.tls_connectors_built(), 2);
    for target in &config.targets {
        let r = prober.check(target);
        assert_up(&r);
        let tls = !target.id.starts_with("plain");
        assert_phases(&r, tls, true, tls, true);
    }
    assert_eq!(
        prober.tls_connectors_built(),
        2,
        "a check built a connector"
    );

    // Without targets up front, the first check builds its connector, and that time is in
    // its tls phase: what no phase covers stays below what the tls phase covers (the build
    // used to be in that gap, with only the handshake in tls).
    let lazy = Prober::new(&config.agent, RuleSet::default());
    let r = lazy.check(&config.targets[0]);
    assert_up(&r);
    assert_eq!(lazy.tls_connectors_built(), 1);
    let t = &r.timings;
    let phases: f64 = [t.dns, t.connect, t.tls, t.ttfb, t.transfer]
        .iter()
        .flatten()
        .sum();
    let unaccounted = t.total - phases;
    assert!(unaccounted < t.tls.unwrap(), "{t:?}");
}
