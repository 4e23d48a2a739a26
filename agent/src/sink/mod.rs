//! The sink: consumes the topic and persists records to PostgreSQL exactly once (rows and the
//! partition's next offset in one transaction), with dead letters for undecodable messages.
