//! The sink: consumes the check topic and persists records to PostgreSQL exactly once.
//!
//! This module owns everything on the PostgreSQL side: the schema and `init-db` ([`schema`]),
//! connections and `sslmode` ([`db`]), the transactional batch writer with dead letters
//! ([`writer`]), partition ownership by advisory locks ([`owner`]), retention, and the consume
//! loop that ties them to the Kafka fetcher.
//!
//! Not here: the record's shape and JSON (`result`), the Kafka wire protocol (`kafka`).

pub mod consume;
pub mod db;
pub mod owner;
pub mod schema;
pub mod writer;

use std::fmt;

use crate::config::{Config, PostgresConfig};

pub use consume::{PartitionStatus, Sink, SinkStatus, run};
pub use writer::{BatchOutcome, Message, Writer};

/// Everything that can stop the sink or a sink operation. Messages name the database by its
/// password-free URL and never carry a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SinkError {
    /// The config lacks a section the sink needs (`[postgres]` or `[kafka]`).
    NotConfigured { section: &'static str },
    /// Could not open a connection (server down, auth, TLS handshake).
    Connect { url: String, message: String },
    /// The TLS setup itself (CA file unreadable or not PEM).
    Tls { message: String },
    /// A statement failed; usually the connection broke. The sink reconnects and retries.
    Database { message: String },
    /// The database has no (or an older) sitewatch schema.
    SchemaMissing { url: String },
    /// The stored offset of a partition moved under this writer: another sink owns it now.
    Fenced {
        topic: String,
        partition: i32,
        expected: Option<i64>,
    },
    /// The sink's own machinery failed (a thread could not start, or panicked).
    Internal { message: String },
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkError::NotConfigured { section } => {
                write!(f, "the config has no [{section}] section")
            }
            SinkError::Connect { url, message } => {
                write!(f, "cannot connect to PostgreSQL at {url}: {message}")
            }
            SinkError::Tls { message } => write!(f, "PostgreSQL TLS setup: {message}"),
            SinkError::Database { message } => write!(f, "PostgreSQL: {message}"),
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
            SinkError::Internal { message } => write!(f, "sink: {message}"),
        }
    }
}

impl std::error::Error for SinkError {}

pub(crate) fn db_error(e: postgres::Error) -> SinkError {
    SinkError::Database {
        message: db::describe(&e),
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
    schema::maintain(&mut client, pg.retention, crate::util::unix_ms_now())?;
    log::info!(target: "sitewatch::sink", "schema applied to {}", pg.url);
    Ok(())
}
