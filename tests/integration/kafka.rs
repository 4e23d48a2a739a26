//! The Kafka client and the publisher against a real tansu broker (one per test), and
//! wire compatibility with librdkafka (the confluent-kafka peer).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sitewatch::kafka::{Client, Fetched, KafkaError, ProduceRecord, partition_for_key};

use crate::support::broker::{Broker, kafka_config};

/// Reads every record of `topic` from offset 0 up to the high watermark, per partition.
fn fetch_all(
    client: &mut Client,
    topic: &str,
) -> HashMap<i32, Vec<sitewatch::kafka::FetchedRecord>> {
    let mut out = HashMap::new();
    for p in client.partitions(topic).expect("partitions") {
        let mut offset = client.earliest_offset(topic, p).expect("earliest");
        let mut recs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let f: Fetched = client
                .fetch(topic, p, offset, 4 << 20, Duration::from_millis(100))
                .expect("fetch");
            offset = f.next_offset.max(offset);
            recs.extend(f.records);
            if offset >= f.high_watermark {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fetch of {topic}/{p} stalled at {offset}"
            );
        }
        out.insert(p, recs);
    }
    out
}

#[test]
fn client_basics_against_tansu() {
    let broker = Broker::start();
    let cfg = broker.config("basics");
    let mut c = Client::connect(&cfg).expect("connect");
    let versions = c.broker_versions().unwrap();
    let mut v: Vec<_> = versions.iter().collect();
    v.sort();
    eprintln!("tansu API versions: {v:?}");
    assert!(matches!(
        c.partitions("basics"),
        Err(KafkaError::UnknownTopic(_))
    ));
    c.ensure_topic("basics", 3, 1).expect("create");
    c.ensure_topic("basics", 3, 1)
        .expect("already there is fine");
    assert_eq!(c.partitions("basics").unwrap(), vec![0, 1, 2]);
    let recs: Vec<ProduceRecord> = (0..10)
        .map(|i| ProduceRecord {
            key: format!("key-{i}").into_bytes(),
            value: format!("value-{i}").into_bytes(),
            timestamp_ms: 1_700_000_000_000 + i,
        })
        .collect();
    c.produce("basics", &recs).expect("produce");
    let all = fetch_all(&mut c, "basics");
    let mut n = 0;
    for (p, rs) in &all {
        for r in rs {
            let key = r.key.clone().unwrap();
            assert_eq!(partition_for_key(&key, 3), *p);
            let i: i64 = String::from_utf8(key).unwrap()[4..].parse().unwrap();
            assert_eq!(r.value.as_deref(), Some(format!("value-{i}").as_bytes()));
            assert_eq!(r.timestamp_ms, 1_700_000_000_000 + i);
            n += 1;
        }
    }
    assert_eq!(n, 10);
    let err = c
        .fetch("basics", 0, 1_000_000, 1 << 20, Duration::from_millis(10))
        .unwrap_err();
    assert!(matches!(err, KafkaError::OffsetOutOfRange { .. }), "{err}");
}
