//! The publisher: takes check records from the output channel, batches them to Kafka
//! (acks=all), and spools them to disk when the broker is unreachable, replaying in order later.
