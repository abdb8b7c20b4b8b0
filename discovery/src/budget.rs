//! Token buckets: how much a node does because of beacons (sans-IO).
//!
//! Without a cluster secret anyone on the group can send valid-looking
//! beacons from as many source ports as they like. The per-source bucket in
//! [`crate::sources`] limits each source, but a flood from many sources
//! would still make the node answer every one of them and admit (and dial)
//! every identity they claim. Two node-wide buckets bound that work:
//!
//! - **replies**: unicast replies to announces of newcomers;
//! - **new peers**: beacons that would make the peer table create an entry
//!   and dial (an identity discovery has not heard, or a known one restarted
//!   with a higher incarnation).
//!
//! A refused reply is only a missed shortcut: the newcomer hears our next
//! periodic announce instead. A refused identity is not remembered, so its
//! next beacon (one `--beacon-interval` later) asks again; a real cluster
//! larger than the burst still joins, at the bucket's rate.
//!
//! Time is a parameter: every call takes the `now` it happens at.

use std::time::Instant;

/// A sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens held (and the number available at the start).
    pub burst: f64,
}

/// A token bucket that starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate.burst,
            refilled: now,
        }
    }

    /// Takes one token at `now` if there is one. A `now` earlier than a
    /// previous call adds nothing (time never runs backwards here).
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_sec).min(self.rate.burst);
        self.refilled = self.refilled.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The node-wide budgets (see the module docs).
#[derive(Debug, Clone)]
pub struct Budget {
    /// Unicast replies to announces.
    pub replies: TokenBucket,
    /// New (or restarted) identities admitted to the peer table.
    pub new_peers: TokenBucket,
}

impl Budget {
    /// Both buckets full at `now`.
    pub fn new(replies: Rate, new_peers: Rate, now: Instant) -> Self {
        Budget {
            replies: TokenBucket::new(replies, now),
            new_peers: TokenBucket::new(new_peers, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const RATE: Rate = Rate {
        per_sec: 20.0,
        burst: 64.0,
    };

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RATE, t0);
        assert_eq!((0..1000).filter(|_| b.try_take(t0)).count(), 64);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..1000).filter(|_| b.try_take(t1)).count(), 10);
        // Idle for long: refilled to the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..1000).filter(|_| b.try_take(t2)).count(), 64);
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(RATE, t0);
        while b.try_take(t0) {}
        assert!(!b.try_take(t0 - Duration::from_secs(5)));
        assert!(
            !b.try_take(t0),
            "the earlier call did not move the clock back"
        );
        assert!(b.try_take(t0 + Duration::from_millis(50)));
    }

    proptest! {
        /// Over any window, at most burst + rate × elapsed tokens are taken.
        #[test]
        fn prop_never_more_than_burst_plus_rate(steps in proptest::collection::vec((0u64..200, 0usize..50), 1..100)) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(RATE, t0);
            let mut now = t0;
            let mut taken = 0usize;
            for (dt, tries) in steps {
                now += Duration::from_millis(dt);
                taken += (0..tries).filter(|_| b.try_take(now)).count();
                let bound = RATE.burst + RATE.per_sec * (now - t0).as_secs_f64();
                prop_assert!(taken as f64 <= bound + 1e-9, "{} > {}", taken, bound);
            }
        }
    }
}
