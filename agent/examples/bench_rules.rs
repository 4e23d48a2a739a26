//! Benchmark helper for `bench/run` (section 2): what judging one 64 KiB body costs with a
//! regex and with each example WASM rule (built by `scripts/build-rules` into `rules/dist`).
//!
//! Usage: `bench_rules RULES_DIR`. The body is 64 KiB of HTML with the keyword at the very end
//! (the worst case for a search). Prints one JSON line: per-call microseconds (median of 15
//! batches) for the regex `Example Domain` and for every `*.wasm` in RULES_DIR, with the
//! verdict each gave. Needs the `wasm` feature (the default). Only for the benchmark.

#[cfg(feature = "wasm")]
fn main() {
    use std::time::Instant;

    use sitewatch::config::Config;
    use sitewatch::rules::{RuleInput, RuleSet};

    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: bench_rules RULES_DIR");
        std::process::exit(2);
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| fail(&format!("{dir}: {e}")))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wasm"))
        .collect();
    names.sort();
    if names.is_empty() {
        fail(&format!("{dir}: no .wasm rules (run scripts/build-rules)"));
    }
    let cfg = Config::parse(
        &format!("[rules]\ndir = {dir:?}\n"),
        std::path::Path::new("bench.toml"),
        &|_| None,
    )
    .unwrap_or_else(|e| fail(&format!("config: {e}")));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let rules = RuleSet::load(&cfg.rules, &refs);

    let mut body = Vec::with_capacity(64 * 1024);
    body.extend_from_slice(b"<!doctype html><html><body>\n");
    while body.len() < 64 * 1024 - 64 {
        body.extend_from_slice(b"<p>All systems operational; nothing to see here.</p>\n");
    }
    body.extend_from_slice(b"<h1>Example Domain</h1></body></html>\n");
    body.resize(64 * 1024, b'\n');
    let headers = vec![
        ("content-type".to_string(), "text/html".to_string()),
        ("server".to_string(), "nginx".to_string()),
    ];
    let input = RuleInput {
        status: 200,
        elapsed_ms: 12,
        body_truncated: false,
        tls: false,
        url: "http://127.0.0.1/",
        headers: &headers,
        body: &body,
        error: None,
    };

    // Median over batches of the per-call time, so one scheduler hiccup does not count.
    let per_call_us = |iters: u32, f: &mut dyn FnMut()| -> f64 {
        let mut batches: Vec<f64> = (0..15)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e6 / iters as f64
            })
            .collect();
        batches.sort_by(f64::total_cmp);
        batches[batches.len() / 2]
    };

    let regex = regex::bytes::Regex::new("Example Domain").expect("a valid regex");
    let regex_us = per_call_us(2000, &mut || {
        std::hint::black_box(regex.is_match(std::hint::black_box(&body)));
    });
    let mut out = format!("{{\"body_bytes\":{},\"regex_us\":{regex_us:.3}", body.len());
    out.push_str(",\"rules\":{");
    for (i, name) in names.iter().enumerate() {
        let verdict = match rules.evaluate(name, &input) {
            Ok(o) => o.verdict.as_str().to_string(),
            Err(e) => format!("error: {}", e.message.replace('"', "'")),
        };
        let us = per_call_us(200, &mut || {
            let _ = std::hint::black_box(rules.evaluate(name, &input));
        });
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{name:?}:{{\"us\":{us:.3},\"verdict\":{verdict:?}}}"
        ));
    }
    out.push_str("}}");
    println!("{out}");
}

#[cfg(feature = "wasm")]
fn fail(msg: &str) -> ! {
    eprintln!("bench_rules: {msg}");
    std::process::exit(1)
}

#[cfg(not(feature = "wasm"))]
fn main() {
    eprintln!("bench_rules: built without the `wasm` feature");
    std::process::exit(1)
}
