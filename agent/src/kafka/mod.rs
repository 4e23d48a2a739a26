//! A small synchronous Kafka client on top of the `kafka-protocol` crate (encode/decode only):
//! blocking sockets, TLS and SASL, version negotiation, a producer and a fetcher.
