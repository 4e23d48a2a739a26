//! Due times per target, keyed by target id: a min-heap of (due, generation, id). Entries whose
//! generation is stale (the target was rescheduled or removed by a reload) are skipped when
//! popped. Identity is the id, never a position in the target list, so a reload that reorders
//! or shortens the list cannot hand one target's slot to another.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A target's id, shared by the queue, the in-flight set, jobs and the done channel.
pub(crate) type TargetId = Arc<str>;

pub(crate) struct Queue {
    heap: BinaryHeap<Reverse<(Instant, u64, TargetId)>>,
    /// Current generation and due time per queued target.
    slots: HashMap<TargetId, (u64, Instant)>,
    next_gen: u64,
}

impl Queue {
    pub(crate) fn new() -> Queue {
        Queue {
            heap: BinaryHeap::new(),
            slots: HashMap::new(),
            next_gen: 0,
        }
    }

    /// Queues `id` at `due`, replacing any earlier due time. Targets due at the same instant
    /// pop in the order they were set (the generation breaks the tie), so `--once` checks in
    /// config order.
    pub(crate) fn set(&mut self, id: &TargetId, due: Instant) {
        self.next_gen += 1;
        let generation = self.next_gen;
        self.slots.insert(id.clone(), (generation, due));
        self.heap.push(Reverse((due, generation, id.clone())));
    }

    /// When `id` is due, if it is queued.
    pub(crate) fn due(&self, id: &str) -> Option<Instant> {
        self.slots.get(id).map(|s| s.1)
    }

    /// Takes `id` out of the queue (its heap entry goes stale).
    pub(crate) fn remove(&mut self, id: &str) {
        self.slots.remove(id);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn next_due(&mut self) -> Option<Instant> {
        while let Some(Reverse((due, generation, id))) = self.heap.peek() {
            if self.slots.get(id).map(|s| s.0) == Some(*generation) {
                return Some(*due);
            }
            self.heap.pop();
        }
        None
    }

    /// A target due at `now` and the time it was due, removed from the queue (reschedule to
    /// keep it).
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(TargetId, Instant)> {
        let due = self.next_due()?;
        if due > now {
            return None;
        }
        let Reverse((_, _, id)) = self.heap.pop()?;
        self.slots.remove(&id);
        Some((id, due))
    }

    /// Next due = previous due + interval (no drift). If we fell more than a whole interval
    /// behind (machine suspended, overload), skip the missed slots instead of bursting.
    pub(crate) fn reschedule(
        &mut self,
        id: &TargetId,
        prev_due: Instant,
        interval: Duration,
        now: Instant,
    ) {
        let mut next = prev_due + interval;
        if next + interval <= now {
            let behind = now.duration_since(next).as_nanos() / interval.as_nanos().max(1);
            next += interval * (behind as u32);
        }
        self.set(id, next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TargetId {
        Arc::from(s)
    }

    #[test]
    fn orders_by_due_time_without_drift() {
        let (a, b) = (id("a"), id("b"));
        let mut q = Queue::new();
        let start = Instant::now();
        q.set(&a, start);
        q.set(&b, start);
        // Equal due times pop in the order they were set.
        let (first, due_a) = q.pop_due(start + Duration::from_millis(1)).unwrap();
        let (second, due_b) = q.pop_due(start + Duration::from_millis(1)).unwrap();
        assert_eq!((&*first, &*second), ("a", "b"));
        assert!(q.is_empty(), "popped targets leave the queue");
        assert!(q.pop_due(start + Duration::from_secs(9)).is_none());
        // Reschedule both "late" by 20 ms: next due is prev due + interval, not now + interval.
        let late = start + Duration::from_millis(20);
        q.reschedule(&a, due_a, Duration::from_millis(300), late);
        q.reschedule(&b, due_b, Duration::from_millis(100), late);
        assert_eq!(q.next_due(), Some(start + Duration::from_millis(100)));
        assert_eq!(q.pop_due(start + Duration::from_millis(99)), None);
        let popped = |q: &mut Queue, ms| q.pop_due(start + Duration::from_millis(ms)).map(|p| p.0);
        assert_eq!(popped(&mut q, 100).as_deref(), Some("b"));
        assert_eq!(popped(&mut q, 299), None);
        assert_eq!(popped(&mut q, 300).as_deref(), Some("a"));
    }

    #[test]
    fn skips_whole_missed_intervals() {
        let a = id("a");
        let mut q = Queue::new();
        let start = Instant::now();
        q.set(&a, start);
        let (_, due) = q.pop_due(start).unwrap();
        // 1.05 s late at 100 ms: the next slot is the first one not yet passed by a whole
        // interval, 1.0 s after the start (exactly: the arithmetic has no clock in it).
        q.reschedule(
            &a,
            due,
            Duration::from_millis(100),
            start + Duration::from_millis(1050),
        );
        assert_eq!(q.next_due(), Some(start + Duration::from_millis(1000)));
    }

    #[test]
    fn a_removed_or_moved_target_leaves_no_stale_entry() {
        let (a, b) = (id("a"), id("b"));
        let mut q = Queue::new();
        let start = Instant::now();
        q.set(&a, start);
        q.set(&b, start + Duration::from_millis(5));
        q.set(&a, start + Duration::from_millis(10));
        q.remove("b");
        assert_eq!(q.len(), 1);
        assert_eq!(q.due("a"), Some(start + Duration::from_millis(10)));
        assert_eq!(q.pop_due(start + Duration::from_millis(9)), None);
        let (popped, _) = q.pop_due(start + Duration::from_millis(10)).unwrap();
        assert_eq!(&*popped, "a");
        assert_eq!(q.next_due(), None);
    }
}
