//! Turns discovery's counters into log warnings: beacons that fail to send,
//! and the node's own multicast that stops looping back (multicast blocked,
//! interface down). Until now only `status` showed either.
//!
//! Sans-IO: the daemon samples the counters every [`window`] (counted in
//! beacon rounds, on the beacon's own wake-up: the watch arms no timer) and
//! feeds them to [`BeaconWatch::on_sample`] with `now`; the answer is what
//! to log.
//! Each kind of warning is logged when the problem appears and then at most
//! once per [`LOG_EVERY`] while it lasts; a recovery is logged once.

use std::time::{Duration, Instant};

/// At most one warning of each kind this often while a problem lasts.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// How often to sample: three beacon intervals (so a window holds a few
/// beacons), within 1 s ..= 60 s.
pub fn window(beacon_interval: Duration) -> Duration {
    (beacon_interval * 3).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Discovery's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Multicast beacons sent successfully.
    pub sent: u64,
    /// Sends that failed.
    pub send_errors: u64,
    /// Own multicast beacons heard back.
    pub own_heard: u64,
}

/// Something to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// `failed` sends since the last warning of this kind (or the start).
    SendErrors {
        /// How many.
        failed: u64,
        /// Over how long.
        over: Duration,
    },
    /// `sent` beacons in the last window and none came back.
    NotLoopingBack {
        /// Beacons sent in the window.
        sent: u64,
        /// Whether any ever came back (it stopped) or never (it never did).
        ever: bool,
    },
    /// Own beacons come back again after a [`Finding::NotLoopingBack`].
    LoopingBackAgain,
}

/// The watch's memory between samples.
#[derive(Debug, Default)]
pub struct BeaconWatch {
    last: Option<Sample>,
    /// Since when send errors are counted for the next warning (the
    /// baseline or the last warning), and the counter then.
    counted: Option<(Instant, u64)>,
    send_warned: Option<Instant>,
    loop_warned: Option<Instant>,
    not_looping: bool,
}

impl BeaconWatch {
    /// Feeds the counters sampled at `now`; returns what to log.
    pub fn on_sample(&mut self, now: Instant, s: Sample) -> Vec<Finding> {
        let mut out = Vec::new();
        let Some(last) = self.last.replace(s) else {
            self.counted = Some((now, s.send_errors));
            return out; // the first sample is the baseline
        };
        let (since, base) = self.counted.unwrap_or((now, last.send_errors));
        let due = self
            .send_warned
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
        if s.send_errors > last.send_errors && due {
            out.push(Finding::SendErrors {
                failed: s.send_errors.saturating_sub(base),
                over: now.saturating_duration_since(since),
            });
            self.send_warned = Some(now);
            self.counted = Some((now, s.send_errors));
        }
        let sent = s.sent.saturating_sub(last.sent);
        let heard = s.own_heard.saturating_sub(last.own_heard);
        if heard > 0 {
            if self.not_looping {
                out.push(Finding::LoopingBackAgain);
            }
            self.not_looping = false;
        } else if sent >= 2 {
            let due = !self.not_looping
                || self
                    .loop_warned
                    .is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
            if due {
                out.push(Finding::NotLoopingBack {
                    sent,
                    ever: s.own_heard > 0,
                });
                self.loop_warned = Some(now);
            }
            self.not_looping = true;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(sent: u64, send_errors: u64, own_heard: u64) -> Sample {
        Sample {
            sent,
            send_errors,
            own_heard,
        }
    }

    #[test]
    fn a_healthy_node_logs_nothing() {
        let t0 = Instant::now();
        let mut w = BeaconWatch::default();
        for i in 0..10u64 {
            let found = w.on_sample(t0 + Duration::from_secs(3 * i), s(3 * i, 0, 3 * i));
            assert!(found.is_empty(), "{found:?}");
        }
    }

    #[test]
    fn send_errors_are_reported_at_once_then_once_a_minute_with_the_count() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut w = BeaconWatch::default();
        assert!(w.on_sample(at(0), s(5, 0, 5)).is_empty());
        assert_eq!(
            w.on_sample(at(3), s(5, 3, 5)),
            vec![Finding::SendErrors {
                failed: 3,
                over: Duration::from_secs(3)
            }]
        );
        for secs in [6, 9, 30, 60] {
            assert!(
                w.on_sample(at(secs), s(5, 3 + secs, 5)).is_empty(),
                "{secs}"
            );
        }
        assert_eq!(
            w.on_sample(at(63), s(5, 66, 5)),
            vec![Finding::SendErrors {
                failed: 63,
                over: Duration::from_secs(60)
            }]
        );
        assert!(w.on_sample(at(66), s(5, 66, 5)).is_empty(), "no new errors");
    }

    #[test]
    fn own_beacons_that_stop_coming_back_warn_then_recover_once() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut w = BeaconWatch::default();
        assert!(w.on_sample(at(0), s(3, 0, 3)).is_empty());
        assert_eq!(
            w.on_sample(at(3), s(6, 0, 3)),
            vec![Finding::NotLoopingBack {
                sent: 3,
                ever: true
            }]
        );
        assert!(w.on_sample(at(6), s(9, 0, 3)).is_empty(), "rate-limited");
        assert_eq!(
            w.on_sample(at(66), s(30, 0, 3)),
            vec![Finding::NotLoopingBack {
                sent: 21,
                ever: true
            }]
        );
        assert_eq!(
            w.on_sample(at(69), s(33, 0, 6)),
            vec![Finding::LoopingBackAgain]
        );
        assert!(w.on_sample(at(72), s(36, 0, 9)).is_empty());
    }

    #[test]
    fn a_node_whose_beacons_never_came_back_says_so_and_one_beacon_proves_nothing() {
        let t0 = Instant::now();
        let mut w = BeaconWatch::default();
        assert!(w.on_sample(t0, s(1, 0, 0)).is_empty());
        assert!(w
            .on_sample(t0 + Duration::from_secs(1), s(2, 0, 0))
            .is_empty());
        assert_eq!(
            w.on_sample(t0 + Duration::from_secs(4), s(5, 0, 0)),
            vec![Finding::NotLoopingBack {
                sent: 3,
                ever: false
            }]
        );
    }
}
