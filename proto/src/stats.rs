//! Drop counters shared by the drivers.
//!
//! Every bad input (malformed datagram, wrong cluster, oversized frame, ...)
//! is dropped and counted by a short stable reason, and these counters are
//! what `status` and `/metrics` show. Logging is rate-limited per reason:
//! [`Tally::record`] says whether this drop should be logged loudly, so a
//! flood produces one warning per window instead of one line per datagram.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a loud log line per reason is allowed.
pub const LOG_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Inner {
    counts: BTreeMap<&'static str, u64>,
    last_logged: BTreeMap<&'static str, Instant>,
}

/// Counters by a short stable label (drop reasons, state transitions).
#[derive(Debug, Default)]
pub struct Tally {
    // A std Mutex: the critical section is a map update, never held across
    // an await, and drops are off the hot path of valid traffic.
    inner: Mutex<Inner>,
}

impl Tally {
    /// Counts one drop for `reason` at `now`; returns true when the caller
    /// should log it at warning level (first in its [`LOG_WINDOW`]).
    pub fn record(&self, now: Instant, reason: &'static str) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner.counts.entry(reason).or_default() += 1;
        match inner.last_logged.get(reason) {
            Some(t) if now.saturating_duration_since(*t) < LOG_WINDOW => false,
            _ => {
                inner.last_logged.insert(reason, now);
                true
            }
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.counts.clone()
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_drop_but_logs_once_per_window() {
        let d = Tally::default();
        let t0 = Instant::now();
        assert!(d.record(t0, "bad_magic"));
        assert!(!d.record(t0 + Duration::from_secs(1), "bad_magic"));
        assert!(d.record(t0, "cluster"));
        assert!(d.record(t0 + LOG_WINDOW, "bad_magic"));
        assert_eq!(d.snapshot()["bad_magic"], 3);
        assert_eq!(d.total(), 4);
    }
}
