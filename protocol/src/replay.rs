//! Replay protection: a bounded, time-windowed cache of the nonces seen.
//!
//! A message is accepted once. Its (signer, nonce) is remembered until the
//! message expires, after which the envelope check refuses it anyway, so the
//! cache only ever holds nonces of live messages. Messages whose validity
//! extends past the window are refused outright: they could not be remembered
//! for long enough. When the cache is full of live nonces it refuses new ones
//! rather than forget old ones (fail closed).

use std::collections::{BTreeSet, HashSet};

use crate::ids::{NodeId, Nonce};
use crate::time::UnixMillis;

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// This (signer, nonce) was already accepted.
    #[error("nonce already seen from {signer}")]
    Replayed {
        /// Signer.
        signer: NodeId,
    },
    /// The message is already expired.
    #[error("message expired at {expires_at}")]
    Expired {
        /// End of validity.
        expires_at: UnixMillis,
    },
    /// The message's validity reaches past the window the cache can remember.
    #[error("validity until {expires_at} exceeds the replay window ending {window_end}")]
    BeyondWindow {
        /// End of validity.
        expires_at: UnixMillis,
        /// Now plus the window.
        window_end: UnixMillis,
    },
    /// The cache holds its maximum of live nonces.
    #[error("replay cache full ({capacity} live nonces)")]
    Full {
        /// Capacity.
        capacity: usize,
    },
}

/// The nonce cache.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    seen: HashSet<(NodeId, Nonce)>,
    by_expiry: BTreeSet<(UnixMillis, NodeId, Nonce)>,
}

impl ReplayGuard {
    /// A cache remembering at most `capacity` nonces of messages valid for at most `window_ms`.
    #[must_use]
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        Self {
            window_ms,
            capacity,
            seen: HashSet::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    /// Nonces held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no nonce is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Accepts (signer, nonce) once, for a message valid until `expires_at`.
    pub fn check(
        &mut self,
        signer: NodeId,
        nonce: Nonce,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<(), ReplayError> {
        self.prune(now);
        if self.seen.contains(&(signer, nonce)) {
            return Err(ReplayError::Replayed { signer });
        }
        if expires_at <= now {
            return Err(ReplayError::Expired { expires_at });
        }
        let window_end = now.plus_millis(self.window_ms);
        if expires_at > window_end {
            return Err(ReplayError::BeyondWindow {
                expires_at,
                window_end,
            });
        }
        if self.seen.len() >= self.capacity {
            return Err(ReplayError::Full {
                capacity: self.capacity,
            });
        }
        self.seen.insert((signer, nonce));
        self.by_expiry.insert((expires_at, signer, nonce));
        Ok(())
    }

    /// Forgets nonces of messages expired by `now`.
    pub fn prune(&mut self, now: UnixMillis) {
        while let Some(&(expires_at, signer, nonce)) = self.by_expiry.first() {
            if expires_at > now {
                break;
            }
            self.by_expiry.pop_first();
            self.seen.remove(&(signer, nonce));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([1; 32]);
    const B: NodeId = NodeId([2; 32]);

    #[test]
    fn replay_is_refused_until_expiry() {
        let mut g = ReplayGuard::new(60_000, 10);
        let now = UnixMillis(1_000);
        g.check(A, Nonce([1; 16]), UnixMillis(5_000), now).unwrap();
        assert_eq!(
            g.check(A, Nonce([1; 16]), UnixMillis(5_000), now),
            Err(ReplayError::Replayed { signer: A })
        );
        // Same nonce, other signer: a different key.
        g.check(B, Nonce([1; 16]), UnixMillis(5_000), now).unwrap();
        // After expiry the nonce is forgotten, and the message itself is refused as expired.
        assert_eq!(
            g.check(A, Nonce([1; 16]), UnixMillis(5_000), UnixMillis(5_000)),
            Err(ReplayError::Expired {
                expires_at: UnixMillis(5_000)
            })
        );
        assert!(g.is_empty());
    }

    #[test]
    fn window_and_capacity_are_enforced() {
        let mut g = ReplayGuard::new(10_000, 2);
        let now = UnixMillis(0);
        assert!(matches!(
            g.check(A, Nonce([0; 16]), UnixMillis(20_000), now),
            Err(ReplayError::BeyondWindow { .. })
        ));
        g.check(A, Nonce([1; 16]), UnixMillis(5_000), now).unwrap();
        g.check(A, Nonce([2; 16]), UnixMillis(6_000), now).unwrap();
        assert_eq!(
            g.check(A, Nonce([3; 16]), UnixMillis(6_000), now),
            Err(ReplayError::Full { capacity: 2 })
        );
        // Once the first expires there is room again.
        g.check(A, Nonce([3; 16]), UnixMillis(9_000), UnixMillis(5_001))
            .unwrap();
        assert_eq!(g.len(), 2);
    }
}
