//! Benchmark helper for `bench/run` (section 3): how many check records per second the
//! [`Publisher`] moves into a Kafka broker with acks=all.
//!
//! Usage: `bench_publish BROKER TOPIC COUNT SPOOL_DIR [guard|no-guard]`. Creates the topic, then
//! feeds COUNT realistic records (full checks of 100 targets, about 600 bytes of JSON each;
//! every 10th target down for 5 rounds in 50, one round every 10 s ending now) through the
//! publisher as fast as its queue takes them, closes it (which waits for the last
//! acknowledgement) and prints one JSON line:
//! `{"records":..,"acked":..,"spooled":..,"seconds":..,"per_second":..}`.
//! `guard` (the default) calls the publisher's idle tick every 100 ms as the agent's output
//! thread does, which runs the `kafka.spool_after` stall guard; `no-guard` never calls it, so
//! the guard never looks (what is left is the copy of each request's records the sender makes
//! for it, which the code does unconditionally).
//! Only for the benchmark: it is not part of the agent.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sitewatch::config::Config;
use sitewatch::kafka::Client;
use sitewatch::output::Output;
use sitewatch::publish::{Publisher, QUEUE_CAPACITY};
use sitewatch::result::{CheckResult, Timings};

fn record(i: u64) -> CheckResult {
    let (t, round) = (i % 100, i / 100);
    let target = format!("target-{t}");
    let mut r = CheckResult::new(&target, "http://127.0.0.1:8080/", "bench", "GET");
    // Every 10th target is down for 5 rounds of every 50, so a sink that decides alerts
    // (section 4, alerts on) meets transitions: a down and a resolve per cycle and target.
    let down = t % 10 == 0 && round % 50 >= 45;
    r.up = !down;
    if down {
        r.failure = Some(sitewatch::result::FailureReason::HttpStatus);
    }
    r.status = Some(if down { 503 } else { 200 });
    r.http_version = Some("HTTP/1.1".into());
    r.remote_ip = Some("127.0.0.1".into());
    r.body_bytes = 612;
    r.regex = Some("sitewatch bench page".into());
    r.regex_matched = Some(true);
    r.timings = Timings {
        connect: Some(0.08),
        ttfb: Some(0.21),
        transfer: Some(0.01),
        total: 0.35,
        ..Timings::default()
    };
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let guard = match args.get(5).map(String::as_str) {
        _ if args.len() < 5 || args.len() > 6 => None,
        None | Some("guard") => Some(true),
        Some("no-guard") => Some(false),
        Some(_) => None,
    };
    let Some(guard) = guard else {
        eprintln!("usage: bench_publish BROKER TOPIC COUNT SPOOL_DIR [guard|no-guard]");
        std::process::exit(2);
    };
    let (broker, topic) = (&args[1], &args[2]);
    let count: u64 = args[3].parse().unwrap_or_else(|_| {
        eprintln!("COUNT must be a number");
        std::process::exit(2)
    });
    let toml = format!("[kafka]\nbrokers = [\"{broker}\"]\ntopic = \"{topic}\"\n");
    let cfg = Config::parse(&toml, std::path::Path::new("bench.toml"), &|_| None)
        .unwrap_or_else(|e| fail(&format!("config: {e}")));
    let kafka = cfg
        .kafka
        .unwrap_or_else(|| fail("config: no [kafka] section"));
    Client::connect(&kafka)
        .and_then(|mut c| c.ensure_topic(topic, kafka.partitions, kafka.replication_factor))
        .unwrap_or_else(|e| fail(&format!("kafka: {e}")));

    // One cycle of 50 rounds of 100 targets, reused; each record gets its own id and time.
    let records: Vec<CheckResult> = (0..count.min(5000)).map(record).collect();
    // One round every 10 s, the last one now: each target's checks are apart in time, as an
    // agent's are (the alert evaluator ignores a check no newer than the last one it saw).
    let first_round_ms = sitewatch::util::unix_ms_now() - (count / 100) as i64 * 10_000;
    let mut publisher = Publisher::start_with_spool(&kafka, PathBuf::from(&args[4]), 1 << 30)
        .unwrap_or_else(|e| fail(&format!("publisher: {e}")));
    let start = Instant::now();
    let mut ticked = start;
    for i in 0..count {
        // The output thread's idle tick (every 100 ms, also under a stream of records): where
        // the publisher checks for a stalled request (kafka.spool_after).
        if guard && ticked.elapsed() >= Duration::from_millis(100) {
            ticked = Instant::now();
            publisher
                .idle()
                .unwrap_or_else(|e| fail(&format!("idle: {e}")));
        }
        // Stay under the queue capacity so the measurement is the network path, not the spool.
        while publisher.stats().accepted - publisher.stats().acked >= QUEUE_CAPACITY as u64 - 100 {
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut r = records[(i % records.len() as u64) as usize].clone();
        r.check_id = sitewatch::util::new_check_id();
        r.started_at =
            sitewatch::util::format_rfc3339_ms(first_round_ms + (i / 100) as i64 * 10_000);
        publisher
            .write(r)
            .unwrap_or_else(|e| fail(&format!("write: {e}")));
    }
    publisher
        .close(Instant::now() + Duration::from_secs(120))
        .unwrap_or_else(|e| fail(&format!("close: {e}")));
    let seconds = start.elapsed().as_secs_f64();
    let st = publisher.stats();
    println!(
        "{{\"records\":{count},\"acked\":{},\"spooled\":{},\"seconds\":{seconds:.4},\"per_second\":{:.1}}}",
        st.acked,
        st.spooled,
        st.acked as f64 / seconds
    );
}

fn fail(msg: &str) -> ! {
    eprintln!("bench_publish: {msg}");
    std::process::exit(1)
}
