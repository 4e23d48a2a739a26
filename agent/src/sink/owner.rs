//! Partition ownership: which sink process consumes which (topic, partition).
//!
//! One dedicated session per sink process holds a session-level advisory lock per partition it
//! consumes (`pg_try_advisory_lock(hashtext(topic), partition)`). When the process dies, its
//! session ends and PostgreSQL releases the locks; the other sinks retry unowned partitions
//! every few seconds, so one of them takes over within that bound.
//!
//! Architecture Invariant: ownership is an optimisation, not the correctness guarantee. A sink
//! that lost its lock session keeps no partition: its workers stop. And even a writer that has
//! not noticed yet cannot corrupt anything, because the offset update is a compare-and-set (see
//! `writer`).

use std::collections::BTreeSet;

use postgres::Client;

use super::{SinkError, db_error};

/// The lock session and the partitions it holds.
pub struct Ownership {
    client: Client,
    topic: String,
    held: BTreeSet<i32>,
}

impl Ownership {
    pub fn new(client: Client, topic: &str) -> Ownership {
        Ownership {
            client,
            topic: topic.to_string(),
            held: BTreeSet::new(),
        }
    }

    /// Takes `partition` if no other session holds it. True when this session owns it now.
    pub fn try_acquire(&mut self, partition: i32) -> Result<bool, SinkError> {
        if self.held.contains(&partition) {
            return Ok(true);
        }
        let got: bool = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext($1), $2)",
                &[&self.topic, &partition],
            )
            .map_err(db_error)?
            .get(0);
        if got {
            self.held.insert(partition);
        }
        Ok(got)
    }

    /// Gives `partition` up (a worker failed and must start over, or shutdown).
    pub fn release(&mut self, partition: i32) -> Result<(), SinkError> {
        if self.held.remove(&partition) {
            self.client
                .execute(
                    "SELECT pg_advisory_unlock(hashtext($1), $2)",
                    &[&self.topic, &partition],
                )
                .map_err(db_error)?;
        }
        Ok(())
    }

    /// Fails when the session is gone (killed, server restarted): every lock is lost then.
    pub fn check_alive(&mut self) -> Result<(), SinkError> {
        self.client.simple_query("SELECT 1").map_err(db_error)?;
        Ok(())
    }

    pub fn held(&self) -> &BTreeSet<i32> {
        &self.held
    }
}
