//! Where check records go: stdout (JSON lines or a table), an in-memory collector for tests,
//! and (in `publish`) Kafka. All behind the [`Output`] trait.
