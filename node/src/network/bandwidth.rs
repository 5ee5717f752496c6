//! The node's bandwidth estimate, from real transfers: the throughput of
//! model blocks fetched from peers (1 MiB each, so latency matters little),
//! smoothed. Zero, meaning unknown, until the node has fetched something.

use std::time::Duration;

/// Transfers smaller than this say more about latency than bandwidth.
const MIN_BYTES: usize = 256 * 1024;

/// An exponentially weighted estimate of bytes per second.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bandwidth {
    estimate: Option<f64>,
    samples: u64,
}

impl Bandwidth {
    /// `bytes` arrived `elapsed` after they were asked for.
    pub fn observe(&mut self, bytes: usize, elapsed: Duration) {
        if bytes < MIN_BYTES || elapsed.is_zero() {
            return;
        }
        let rate = bytes as f64 / elapsed.as_secs_f64();
        self.estimate = Some(match self.estimate {
            None => rate,
            Some(e) => 0.8 * e + 0.2 * rate,
        });
        self.samples += 1;
    }

    /// Bytes per second (0: not measured yet).
    #[must_use]
    pub fn bytes_per_sec(&self) -> u64 {
        self.estimate.map_or(0, |e| e as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_transfers_make_the_estimate_and_small_ones_do_not() {
        let mut b = Bandwidth::default();
        assert_eq!(b.bytes_per_sec(), 0);
        b.observe(1000, Duration::from_millis(1));
        assert_eq!(b.bytes_per_sec(), 0, "too small to say");
        b.observe(1 << 20, Duration::from_millis(10));
        assert_eq!(b.bytes_per_sec(), 104_857_600);
        // Smoothed towards a slower transfer, not replaced by it.
        b.observe(1 << 20, Duration::from_millis(20));
        let e = b.bytes_per_sec();
        assert!(e < 104_857_600 && e > 52_428_800, "{e}");
    }
}
