//! Partition ownership: which sink process consumes which (topic, partition).
//!
//! One dedicated session per sink process holds a session-level advisory lock per partition it
//! consumes (`pg_try_advisory_lock(hashtext(topic), partition)`). When the process dies, its
//! session ends and PostgreSQL releases the locks; the other sinks retry unowned partitions
//! every few seconds, so one of them takes over within that bound.
//!
//! Sinks share the partitions fairly: each session also holds a shared "member" lock on
//! (topic, -1), the number of members is read from `pg_locks`, and a sink takes at most
//! ceil(partitions / members) partitions, giving up its extra ones when another sink joins.
//!
//! Architecture Invariant: ownership is an optimisation, not the correctness guarantee. A sink
//! that lost its lock session keeps no partition: its workers stop. And even a writer that has
//! not noticed yet cannot corrupt anything, because the offset update is a compare-and-set (see
//! `writer`).

use std::collections::BTreeSet;

use postgres::Client;

use super::SinkError;

/// The lock session and the partitions it holds.
pub struct Ownership {
    client: Client,
    topic: String,
    held: BTreeSet<i32>,
    member: bool,
}

impl Ownership {
    pub fn new(client: Client, topic: &str) -> Ownership {
        Ownership {
            client,
            topic: topic.to_string(),
            held: BTreeSet::new(),
            member: false,
        }
    }

    /// Joins the group of sinks consuming the topic (idempotent for this session).
    pub fn join_group(&mut self) -> Result<(), SinkError> {
        if !self.member {
            self.client.execute(
                "SELECT pg_advisory_lock_shared(hashtext($1), -1)",
                &[&self.topic],
            )?;
            self.member = true;
        }
        Ok(())
    }

    /// How many sink sessions consume the topic (on this database), this one included.
    pub fn members(&mut self) -> Result<i64, SinkError> {
        let row = self.client.query_one(
            "SELECT count(DISTINCT pid) FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND classid = hashtext($1)::oid AND objid = (-1)::oid AND objsubid = 2",
            &[&self.topic],
        )?;
        Ok(row.get(0))
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
            )?
            .get(0);
        if got {
            self.held.insert(partition);
        }
        Ok(got)
    }

    /// Gives `partition` up (a worker failed and must start over, or shutdown).
    pub fn release(&mut self, partition: i32) -> Result<(), SinkError> {
        if self.held.remove(&partition) {
            self.client.execute(
                "SELECT pg_advisory_unlock(hashtext($1), $2)",
                &[&self.topic, &partition],
            )?;
        }
        Ok(())
    }

    /// Fails when the session is gone (killed, server restarted): every lock is lost then.
    pub fn check_alive(&mut self) -> Result<(), SinkError> {
        self.client.simple_query("SELECT 1")?;
        Ok(())
    }

    pub fn held(&self) -> &BTreeSet<i32> {
        &self.held
    }
}
