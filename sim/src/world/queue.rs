//! The event queue: a radix heap over (time, sequence).
//!
//! Events come out by time, and those at the same time in the order they
//! were scheduled, exactly as from a binary heap ordered on (time, sequence).
//! A simulation never schedules into its past, so every key pushed is above
//! the last popped, which is all a radix heap needs: a key goes to the bucket
//! of the highest bit in which it differs from the last key popped, and only
//! the lowest non-empty bucket is ever sorted out again, into lower ones.
//! Each event moves a few times at most, through memory read in order,
//! instead of sifting through a heap of every pending departure.

use std::mem;

/// Bucket `b > 0` holds keys whose highest bit differing from `last` is bit
/// `b - 1`; bucket 0 holds `last` itself.
const BUCKETS: usize = 129;

/// Pending events, lowest (time, sequence) first.
#[derive(Debug)]
pub(super) struct Queue<E> {
    /// The key last popped: every key held is above it.
    last: u128,
    buckets: Vec<Vec<(u128, E)>>,
    /// Bit `b` set: bucket `b + 1` holds something (bucket 0 is looked at directly).
    full: u128,
    /// A spare bucket, kept to reuse its memory.
    spare: Vec<(u128, E)>,
}

fn key(t: u64, seq: u64) -> u128 {
    u128::from(t) << 64 | u128::from(seq)
}

fn bucket(differs: u128) -> usize {
    (u128::BITS - differs.leading_zeros()) as usize
}

impl<E> Queue<E> {
    pub(super) fn new() -> Self {
        Self {
            last: 0,
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            full: 0,
            spare: Vec::new(),
        }
    }

    /// Schedules `event` at `t`, with sequence number `seq`: (t, seq) must
    /// be above every pair popped so far.
    pub(super) fn push(&mut self, t: u64, seq: u64, event: E) {
        let k = key(t, seq);
        debug_assert!(k > self.last, "an event scheduled into the past");
        self.put(k, event);
    }

    fn put(&mut self, k: u128, event: E) {
        let b = bucket(k ^ self.last);
        if b > 0 {
            self.full |= 1 << (b - 1);
        }
        self.buckets[b].push((k, event));
    }

    /// The lowest pending event, as (time, event).
    pub(super) fn pop(&mut self) -> Option<(u64, E)> {
        if self.buckets[0].is_empty() {
            if self.full == 0 {
                return None;
            }
            let b = self.full.trailing_zeros() as usize + 1;
            self.full &= !(1 << (b - 1));
            let mut items = mem::replace(&mut self.buckets[b], mem::take(&mut self.spare));
            self.last = items.iter().map(|(k, _)| *k).min()?;
            for (k, e) in items.drain(..) {
                self.put(k, e);
            }
            self.spare = items;
        }
        let (k, e) = self.buckets[0].pop()?;
        Some(((k >> 64) as u64, e))
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn events_come_out_as_from_a_heap_on_time_then_sequence(
            // Each step pops some events, then schedules some at small delays
            // (zero included) from the time of the last one popped.
            steps in proptest::collection::vec(
                (0usize..4, proptest::collection::vec(
                    prop::sample::select(vec![0u64, 0, 1, 2, 3, 1000, 1 << 40]), 0..5)),
                1..60),
        ) {
            let mut queue = Queue::new();
            let mut heap = BinaryHeap::new();
            let (mut now, mut seq) = (0u64, 0u64);
            for (pops, delays) in steps {
                for _ in 0..pops {
                    let a = queue.pop();
                    let b = heap.pop().map(|Reverse((t, s, _)): Reverse<(u64, u64, ())>| (t, s));
                    prop_assert_eq!(a, b);
                    if let Some((t, _)) = a {
                        now = t;
                    }
                }
                for d in delays {
                    seq += 1;
                    queue.push(now + d, seq, seq);
                    heap.push(Reverse((now + d, seq, ())));
                }
            }
            while let Some(b) = heap.pop() {
                let Reverse((t, s, ())) = b;
                prop_assert_eq!(queue.pop(), Some((t, s)));
            }
            prop_assert_eq!(queue.pop(), None);
        }
    }
}
