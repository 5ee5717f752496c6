//! Rate limits: a token bucket per member, with the time passed in.
//!
//! A bucket holds up to `burst` tokens and gains `per_minute` tokens a minute;
//! each request takes one. Levels are kept in integer ticks (one token is
//! 60,000 ticks, and a bucket gains `per_minute` ticks a millisecond), so
//! refilling is exact whatever the steps of time, and two runs fed the same
//! times decide the same.

use std::collections::BTreeMap;

use commons_protocol::UnixMillis;

/// Ticks in one token: a bucket gains `per_minute` ticks per millisecond.
const TICKS_PER_TOKEN: u64 = 60_000;

/// How much one member may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed at once, after a quiet spell.
    pub burst: u32,
    /// Requests allowed per minute, sustained.
    pub per_minute: u32,
}

impl RateLimit {
    /// `burst` at once, then `per_minute` a minute; `None` when either is 0
    /// (no limit).
    #[must_use]
    pub fn new(burst: u32, per_minute: u32) -> Option<Self> {
        (burst > 0 && per_minute > 0).then_some(Self { burst, per_minute })
    }
}

/// A request over the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// The member's bucket is empty.
    #[error(
        "over the rate limit of {} at once and {} a minute; retry in {retry_after_ms} ms",
        limit.burst,
        limit.per_minute
    )]
    RateLimited {
        /// The limit.
        limit: RateLimit,
        /// When the next token will be there.
        retry_after_ms: u64,
    },
    /// Too many members are being limited at once to track another.
    #[error("too many members are over their rate limit right now ({max} tracked); retry later")]
    TooManyMembers {
        /// Buckets kept at most.
        max: usize,
    },
}

/// One member's bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    limit: RateLimit,
    /// Ticks held (at most `burst` tokens' worth).
    level: u64,
    /// When `level` was last brought up to date.
    updated: UnixMillis,
}

impl TokenBucket {
    /// A full bucket.
    #[must_use]
    pub fn full(limit: RateLimit, now: UnixMillis) -> Self {
        Self {
            limit,
            level: Self::capacity(limit),
            updated: now,
        }
    }

    fn capacity(limit: RateLimit) -> u64 {
        u64::from(limit.burst) * TICKS_PER_TOKEN
    }

    fn refill(&mut self, now: UnixMillis) {
        // A clock that steps back refills nothing, and does not move `updated` back.
        if now > self.updated {
            let gained = (now.0 - self.updated.0).saturating_mul(u64::from(self.limit.per_minute));
            self.level = self
                .level
                .saturating_add(gained)
                .min(Self::capacity(self.limit));
            self.updated = now;
        }
    }

    /// Takes a token, or says when the next one comes.
    pub fn try_take(&mut self, now: UnixMillis) -> Result<(), QuotaError> {
        self.refill(now);
        if self.level >= TICKS_PER_TOKEN {
            self.level -= TICKS_PER_TOKEN;
            return Ok(());
        }
        let missing = TICKS_PER_TOKEN - self.level;
        Err(QuotaError::RateLimited {
            limit: self.limit,
            retry_after_ms: missing.div_ceil(u64::from(self.limit.per_minute.max(1))),
        })
    }

    /// Whole tokens available at `now`.
    #[must_use]
    pub fn available(&self, now: UnixMillis) -> u32 {
        let mut b = self.clone();
        b.refill(now);
        (b.level / TICKS_PER_TOKEN) as u32
    }

    /// True when the bucket is as good as new: forgetting it changes nothing.
    #[must_use]
    pub fn is_full(&self, now: UnixMillis) -> bool {
        let mut b = self.clone();
        b.refill(now);
        b.level >= Self::capacity(self.limit)
    }
}

/// A bucket per member, at most `max_members` of them. Full buckets are
/// forgotten when room is needed (a new bucket starts full, so nothing
/// changes); when every tracked member is still limited, a new member is
/// refused rather than an old one forgiven.
#[derive(Debug, Clone)]
pub struct Quotas<K> {
    limit: RateLimit,
    max_members: usize,
    buckets: BTreeMap<K, TokenBucket>,
}

impl<K: Ord + Clone> Quotas<K> {
    /// `limit` for every member, tracking at most `max_members` at once.
    #[must_use]
    pub fn new(limit: RateLimit, max_members: usize) -> Self {
        Self {
            limit,
            max_members: max_members.max(1),
            buckets: BTreeMap::new(),
        }
    }

    /// The limit.
    #[must_use]
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one of `member`'s tokens.
    pub fn try_take(&mut self, member: &K, now: UnixMillis) -> Result<(), QuotaError> {
        if let Some(bucket) = self.buckets.get_mut(member) {
            return bucket.try_take(now);
        }
        if self.buckets.len() >= self.max_members {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_members {
                return Err(QuotaError::TooManyMembers {
                    max: self.max_members,
                });
            }
        }
        let mut bucket = TokenBucket::full(self.limit, now);
        let taken = bucket.try_take(now);
        self.buckets.insert(member.clone(), bucket);
        taken
    }

    /// Members tracked now.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: RateLimit = RateLimit {
        burst: 8,
        per_minute: 60,
    };

    #[test]
    fn a_burst_then_one_a_second() {
        let mut b = TokenBucket::full(LIMIT, UnixMillis(1_000));
        for _ in 0..8 {
            b.try_take(UnixMillis(1_000)).unwrap();
        }
        assert_eq!(
            b.try_take(UnixMillis(1_000)),
            Err(QuotaError::RateLimited {
                limit: LIMIT,
                retry_after_ms: 1_000
            })
        );
        // Half a second later: half a token, 500 ms to go.
        assert_eq!(
            b.try_take(UnixMillis(1_500)),
            Err(QuotaError::RateLimited {
                limit: LIMIT,
                retry_after_ms: 500
            })
        );
        b.try_take(UnixMillis(2_000)).unwrap();
        assert!(b.try_take(UnixMillis(2_000)).is_err());
        // A long rest refills up to the burst, not beyond.
        assert_eq!(b.available(UnixMillis(1_000_000)), 8);
        assert!(b.is_full(UnixMillis(1_000_000)));
        assert!(!b.is_full(UnixMillis(2_000)));
    }

    #[test]
    fn a_clock_stepping_back_refills_nothing() {
        let mut b = TokenBucket::full(LIMIT, UnixMillis(10_000));
        for _ in 0..8 {
            b.try_take(UnixMillis(10_000)).unwrap();
        }
        assert!(b.try_take(UnixMillis(5_000)).is_err());
        assert_eq!(b.available(UnixMillis(10_999)), 0);
        assert_eq!(b.available(UnixMillis(11_000)), 1);
    }

    #[test]
    fn zero_means_no_limit() {
        assert_eq!(RateLimit::new(0, 60), None);
        assert_eq!(RateLimit::new(8, 0), None);
        assert_eq!(RateLimit::new(8, 60), Some(LIMIT));
    }

    #[test]
    fn members_have_their_own_buckets_and_full_ones_make_room() {
        let limit = RateLimit {
            burst: 1,
            per_minute: 60,
        };
        let mut q = Quotas::new(limit, 2);
        let t = UnixMillis(0);
        q.try_take(&"a", t).unwrap();
        assert!(q.try_take(&"a", t).is_err(), "a's bucket is empty");
        q.try_take(&"b", t).unwrap();
        // Both tracked buckets are still empty: a third member is refused, not a forgiven.
        assert_eq!(
            q.try_take(&"c", t),
            Err(QuotaError::TooManyMembers { max: 2 })
        );
        // A second later both are full again and forgotten to make room.
        q.try_take(&"c", UnixMillis(1_000)).unwrap();
        assert_eq!(q.tracked(), 1);
        q.try_take(&"a", UnixMillis(1_000)).unwrap();
    }

    proptest! {
        /// Over any stretch of time, a member gets at most the burst plus
        /// what the rate refilled, and a member who asks when told to is served.
        #[test]
        fn never_more_than_burst_plus_refill(
            burst in 1u32..20,
            per_minute in 1u32..10_000,
            steps in proptest::collection::vec(0u64..5_000, 1..200),
        ) {
            let limit = RateLimit { burst, per_minute };
            let mut b = TokenBucket::full(limit, UnixMillis(0));
            let (mut now, mut granted) = (0u64, 0u64);
            for step in steps {
                now += step;
                match b.try_take(UnixMillis(now)) {
                    Ok(()) => granted += 1,
                    Err(QuotaError::RateLimited { retry_after_ms, .. }) => {
                        prop_assert!(retry_after_ms >= 1);
                        let mut later = b.clone();
                        prop_assert!(later.try_take(UnixMillis(now + retry_after_ms)).is_ok());
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
            let refilled = now * u64::from(per_minute) / 60_000;
            prop_assert!(granted <= u64::from(burst) + refilled);
        }
    }
}
