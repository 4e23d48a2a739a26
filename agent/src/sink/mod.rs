//! The sink: consumes the check topic and persists records to PostgreSQL exactly once.
//!
//! This module owns everything on the PostgreSQL side: the schema and `init-db` ([`schema`]),
//! connections and `sslmode` ([`db`]), the transactional batch writer with dead letters
//! ([`writer`]), partition ownership by advisory locks ([`owner`]), retention, and the consume
//! loop that ties them to the Kafka fetcher.
//!
//! Not here: the record's shape and JSON (`result`), the Kafka wire protocol (`kafka`).

#[cfg(feature = "fleet")]
pub mod agents;
pub mod consume;
pub mod db;
pub mod owner;
pub mod rollup;
pub mod schema;
pub mod writer;

use std::fmt;
use std::path::PathBuf;

use crate::config::{Config, PostgresConfig};

pub use consume::{PartitionStatus, Sink, SinkStatus, run};
pub use writer::{BatchOutcome, Message, Writer};

/// Everything that can stop the sink or a sink operation. Messages name the database by its
/// password-free URL and never carry a secret. Variants wrap the real cause (`source()`), so
/// callers branch on kinds ([`SinkError::is_data_error`], the variant), never on text.
#[derive(Debug)]
#[non_exhaustive]
pub enum SinkError {
    /// The config lacks a section the sink needs (`[postgres]` or `[kafka]`).
    NotConfigured { section: &'static str },
    /// Could not open a connection (invalid URL, server down, auth, TLS handshake).
    Connect {
        url: String,
        source: postgres::Error,
    },
    /// The CA file cannot be read.
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TLS setup itself: the CA file is not a PEM certificate, or no connector could be
    /// built.
    Tls {
        ca_file: Option<PathBuf>,
        source: native_tls::Error,
    },
    /// A statement failed; usually the connection broke (the sink reconnects and retries), or
    /// the server rejected the data ([`SinkError::is_data_error`]).
    Database {
        /// What the sink was doing, when more than a routine statement (`applying schema.sql`).
        doing: Option<&'static str>,
        source: postgres::Error,
    },
    /// The database has no (or an older) sitewatch schema.
    SchemaMissing { url: String },
    /// The stored offset of a partition moved under this writer: another sink owns it now.
    Fenced {
        topic: String,
        partition: i32,
        expected: Option<i64>,
    },
    /// Kafka refuses the sink as configured (credentials, certificates): retrying cannot help.
    Kafka(crate::kafka::KafkaError),
    /// A sink thread could not start.
    Thread { source: std::io::Error },
    /// The sink thread panicked.
    Panicked,
}

impl SinkError {
    /// True when PostgreSQL refused the rows we sent (a bad value, a constraint, no partition
    /// for a row) rather than failing as a server or connection: retrying the same batch on a
    /// new connection cannot help, isolating the bad record can.
    pub fn is_data_error(&self) -> bool {
        matches!(self, SinkError::Database { source, .. } if db::is_data_error(source))
    }
}

impl From<postgres::Error> for SinkError {
    fn from(source: postgres::Error) -> SinkError {
        SinkError::Database {
            doing: None,
            source,
        }
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkError::NotConfigured { section } => {
                write!(f, "the config has no [{section}] section")
            }
            SinkError::Connect { url, source } => {
                write!(
                    f,
                    "cannot connect to PostgreSQL at {url}: {}",
                    db::describe(source)
                )
            }
            SinkError::CaFile { path, source } => {
                write!(
                    f,
                    "PostgreSQL TLS setup: ca_file {}: {source}",
                    path.display()
                )
            }
            SinkError::Tls {
                ca_file: Some(path),
                source,
            } => write!(
                f,
                "PostgreSQL TLS setup: ca_file {}: {source}",
                path.display()
            ),
            SinkError::Tls {
                ca_file: None,
                source,
            } => write!(f, "PostgreSQL TLS setup: {source}"),
            SinkError::Database {
                doing: Some(doing),
                source,
            } => write!(f, "PostgreSQL: {doing}: {}", db::describe(source)),
            SinkError::Database {
                doing: None,
                source,
            } => write!(f, "PostgreSQL: {}", db::describe(source)),
            SinkError::SchemaMissing { url } => write!(
                f,
                "the database at {url} has no sitewatch schema (or an older one): \
                 run `sitewatch init-db` first"
            ),
            SinkError::Fenced {
                topic,
                partition,
                expected,
            } => match expected {
                Some(o) => write!(
                    f,
                    "{topic}/{partition}: stored offset is no longer {o}: another sink owns the partition"
                ),
                None => write!(
                    f,
                    "{topic}/{partition}: another sink stored a first offset: it owns the partition"
                ),
            },
            SinkError::Kafka(e) => write!(f, "Kafka: {e}"),
            SinkError::Thread { source } => write!(f, "cannot start a sink thread: {source}"),
            SinkError::Panicked => f.write_str("sink: the sink thread panicked"),
        }
    }
}

impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SinkError::Connect { source, .. } | SinkError::Database { source, .. } => Some(source),
            SinkError::CaFile { source, .. } | SinkError::Thread { source } => Some(source),
            SinkError::Tls { source, .. } => Some(source),
            SinkError::Kafka(e) => Some(e),
            SinkError::NotConfigured { .. }
            | SinkError::SchemaMissing { .. }
            | SinkError::Fenced { .. }
            | SinkError::Panicked => None,
        }
    }
}

fn postgres_config(cfg: &Config) -> Result<&PostgresConfig, SinkError> {
    cfg.postgres.as_ref().ok_or(SinkError::NotConfigured {
        section: "postgres",
    })
}

/// `sitewatch init-db`: applies `schema.sql` (idempotent) and creates the first partitions.
pub fn init_db(cfg: &Config) -> Result<(), SinkError> {
    let pg = postgres_config(cfg)?;
    let mut client = db::connect(pg, "sitewatch init-db")?;
    schema::apply(&mut client)?;
    let now = crate::util::unix_ms_now();
    schema::maintain(&mut client, pg.retention, pg.rollup_retention, now)?;
    log::info!(target: "sitewatch::sink", "schema applied to {}", pg.url);
    Ok(())
}
