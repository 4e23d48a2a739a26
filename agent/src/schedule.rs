//! The scheduler: a time-ordered queue of targets, a fixed pool of worker threads, bounded
//! channels between them, no drift, no overlap of one target with itself.
