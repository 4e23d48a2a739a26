//! Exponential backoff between retries: one type for the publisher's reconnects, the sink's
//! retries and the Kafka client's request retries. Each owner picks its bounds; the doubling,
//! the cap and the reset after a success are the same everywhere.

use std::time::Duration;

/// Delays that start at `min`, double after each failure up to `max`, and start over at
/// `min` after a success ([`Backoff::reset`]).
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next try; the one after it is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// True when no failure was counted since the start or the last reset (the first failure
    /// of a streak, which is worth a warning; the rest are not).
    pub fn is_reset(&self) -> bool {
        self.next == self.min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_a_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        assert!(b.is_reset());
        let seen: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seen, vec![250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert!(!b.is_reset());
        b.reset();
        assert!(b.is_reset());
        assert_eq!(b.next_delay(), Duration::from_millis(250));
        // A cap below twice the start is reached at once and held.
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_millis(300));
        let seen: Vec<u128> = (0..3).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seen, vec![200, 300, 300]);
    }
}
