//! Benchmark helper for `bench/run` (section 4): the classic way to move Kafka records into
//! PostgreSQL, for comparison with `sitewatch sink`: one `INSERT` per record, autocommit (so
//! one transaction and one WAL flush per row), no offset bookkeeping at all.
//!
//! Usage: `bench_naive_sink BROKER TOPIC PG_URL LIMIT`. Reads up to LIMIT records from every
//! partition of TOPIC (reading is not timed), then times the insert loop into the `checks`
//! table of the schema `sitewatch init-db` created, and prints one JSON line:
//! `{"records":..,"inserted":..,"seconds":..,"per_second":..}`. Only for the benchmark.

use std::time::{Duration, Instant};

use postgres::NoTls;
use sitewatch::config::Config;
use sitewatch::kafka::Client;
use sitewatch::result::CheckResult;

const INSERT: &str = "INSERT INTO checks (check_id, started_at, target, url, agent, agent_version, \
    v, up, failure, error, attempt, method, status, http_version, final_url, redirects, \
    remote_ip, body_bytes, body_truncated, total_ms, dns_ms, connect_ms, tls_ms, ttfb_ms, \
    transfer_ms, regex, regex_matched, tags, kafka_partition, kafka_offset) \
    VALUES ($1, $2::text::timestamptz, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
    $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30) \
    ON CONFLICT DO NOTHING";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: bench_naive_sink BROKER TOPIC PG_URL LIMIT");
        std::process::exit(2);
    }
    let (broker, topic, pg_url) = (&args[1], &args[2], &args[3]);
    let limit: usize = args[4]
        .parse()
        .unwrap_or_else(|_| fail("LIMIT must be a number"));
    let toml = format!("[kafka]\nbrokers = [\"{broker}\"]\ntopic = \"{topic}\"\n");
    let cfg = Config::parse(&toml, std::path::Path::new("bench.toml"), &|_| None)
        .unwrap_or_else(|e| fail(&format!("config: {e}")));
    let kafka = cfg.kafka.unwrap_or_else(|| fail("no [kafka] section"));
    let mut client = Client::connect(&kafka).unwrap_or_else(|e| fail(&format!("kafka: {e}")));

    // Read the records first: only the database side is timed.
    let mut records: Vec<(i32, i64, CheckResult)> = Vec::new();
    let partitions = client
        .partitions(topic)
        .unwrap_or_else(|e| fail(&format!("kafka: {e}")));
    for p in partitions {
        let mut offset = 0;
        while records.len() < limit {
            let f = client
                .fetch(topic, p, offset, 4 << 20, Duration::from_millis(100))
                .unwrap_or_else(|e| fail(&format!("fetch: {e}")));
            for r in &f.records {
                if let Some(v) = &r.value
                    && let Ok(c) = CheckResult::from_json(v)
                {
                    records.push((p, r.offset, c));
                }
            }
            if f.high_watermark.is_none_or(|hw| f.next_offset >= hw) || f.next_offset <= offset {
                break;
            }
            offset = f.next_offset;
        }
    }
    records.truncate(limit);

    let mut pg =
        postgres::Client::connect(pg_url, NoTls).unwrap_or_else(|e| fail(&format!("pg: {e}")));
    let start = Instant::now();
    let mut inserted = 0u64;
    for (partition, offset, c) in &records {
        let t = &c.timings;
        let failure = c.failure.map(|f| f.as_str());
        let n = pg
            .execute(
                INSERT,
                &[
                    &c.check_id,
                    &c.started_at,
                    &c.target,
                    &c.url,
                    &c.agent,
                    &c.agent_version,
                    &(c.v as i32),
                    &c.up,
                    &failure,
                    &c.error,
                    &(c.attempt as i64),
                    &c.method,
                    &c.status.map(i32::from),
                    &c.http_version,
                    &c.final_url,
                    &(c.redirects as i64),
                    &c.remote_ip,
                    &(c.body_bytes as i64),
                    &c.body_truncated,
                    &t.total,
                    &t.dns,
                    &t.connect,
                    &t.tls,
                    &t.ttfb,
                    &t.transfer,
                    &c.regex,
                    &c.regex_matched,
                    &c.tags,
                    partition,
                    offset,
                ],
            )
            .unwrap_or_else(|e| fail(&format!("insert: {e}")));
        inserted += n;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"records\":{},\"inserted\":{inserted},\"seconds\":{seconds:.4},\"per_second\":{:.1}}}",
        records.len(),
        records.len() as f64 / seconds
    );
}

fn fail(msg: &str) -> ! {
    eprintln!("bench_naive_sink: {msg}");
    std::process::exit(1)
}
