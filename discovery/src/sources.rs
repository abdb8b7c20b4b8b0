//! Demultiplexing datagrams by source address (sans-IO).
//!
//! Every node sends from a socket of its own, so a source address
//! (ip, port) speaks for one node at a time. [`SourceTable`] keeps, per
//! source, which identity it speaks for, when it was last heard, a token
//! bucket (a flooding source is limited without slowing the others) and when
//! we last answered it. It classifies each beacon:
//!
//! - a source never heard before: [`Verdict::New`] (answer an announce);
//! - a known identity from a new source with a *higher* incarnation: the node
//!   restarted ([`Verdict::Restarted`]);
//! - the same incarnation from a new source while the old one is silent: the
//!   node moved ([`Verdict::Moved`]);
//! - the same incarnation from another port of the *same* IP while the old
//!   source is still active: two live processes claim one identity
//!   ([`Verdict::Conflict`]): counted and dropped, never merged;
//! - a lower incarnation than the identity's current one: [`Verdict::Stale`].
//!
//! The same identity heard from different IPs is a multi-homed node, not a
//! conflict.
//!
//! Silence is judged against the interval each source announces at: a
//! source whose beacon said its interval is scaled (see [`crate::pacing`])
//! keeps its identity, and its entry, for [`crate::pacing::SILENT_INTERVALS`]
//! of its own intervals if that is longer than the configured allowances.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::{Incarnation, NodeId};

use crate::budget::{Rate, TokenBucket};
use crate::pacing::silence_allowance;

/// Flood-limiting and bookkeeping settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Sustained datagrams per second admitted from one source.
    pub rate: f64,
    /// Burst size of the per-source bucket.
    pub burst: f64,
    /// Sources silent this long are forgotten.
    pub forget_after: Duration,
    /// A source silent this long no longer holds its identity against a new one.
    pub stale_after: Duration,
    /// Most sources tracked at once; unknown sources beyond it are refused.
    pub max_sources: usize,
    /// Node-wide budget of unicast replies to announces (see
    /// [`crate::budget`]).
    pub replies: Rate,
    /// Node-wide budget of new (or restarted) identities admitted.
    pub new_peers: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate: 50.0,
            burst: 100.0,
            forget_after: Duration::from_secs(60),
            stale_after: Duration::from_secs(3),
            max_sources: 4096,
            // Replies only save a newcomer one beacon interval; one newcomer
            // costs each node one reply. 64 at once covers 64 nodes starting
            // together; beyond that the periodic announce does the job.
            replies: Rate {
                per_sec: 20.0,
                burst: 64.0,
            },
            // Every node of a cluster of up to 128 (the largest we run on
            // one host) is admitted at once, even when all start together;
            // a larger crowd joins at 32 identities a second (300 nodes:
            // about 5 s), since a refused identity asks again with its next
            // beacon. A flood gets at most 128 + 32/s ghost entries and dials.
            new_peers: Rate {
                per_sec: 32.0,
                burst: 128.0,
            },
        }
    }
}

/// How a beacon relates to what we knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First beacon from this source.
    New,
    /// The source and identity are as before.
    Known,
    /// The identity came back with a higher incarnation (from `from`, if it
    /// was known at another source).
    Restarted {
        /// Its previous source, if any.
        from: Option<SocketAddr>,
    },
    /// The identity moved from a silent source.
    Moved {
        /// Its previous source.
        from: SocketAddr,
    },
    /// Another live source on the same IP claims this identity.
    Conflict {
        /// The source that holds the identity.
        holder: SocketAddr,
    },
    /// An incarnation lower than the identity's current one.
    Stale,
}

impl Verdict {
    /// True when the beacon should reach the peer table.
    pub fn accept(self) -> bool {
        !matches!(self, Verdict::Conflict { .. } | Verdict::Stale)
    }
}

#[derive(Debug, Clone)]
struct Source {
    speaks_for: Option<(NodeId, Incarnation)>,
    last_seen: Instant,
    bucket: TokenBucket,
    last_reply: Option<Instant>,
    /// The interval this source last said it announces at; zero until one
    /// is noted (the configured allowances apply as they are).
    interval: Duration,
}

impl Source {
    fn new(limits: &Limits, now: Instant) -> Self {
        Source {
            speaks_for: None,
            last_seen: now,
            bucket: TokenBucket::new(
                Rate {
                    per_sec: limits.rate,
                    burst: limits.burst,
                },
                now,
            ),
            last_reply: None,
            interval: Duration::ZERO,
        }
    }

    /// How long this source may be silent before it no longer holds its
    /// identity against another source.
    fn stale_after(&self, limits: &Limits) -> Duration {
        silence_allowance(limits.stale_after, self.interval)
    }

    /// How long this source may be silent before it is forgotten.
    fn forget_after(&self, limits: &Limits) -> Duration {
        silence_allowance(limits.forget_after, self.interval)
    }
}

/// Per-source state. See the module docs.
#[derive(Debug)]
pub struct SourceTable {
    limits: Limits,
    /// Boxed: a hash map's buckets are often half empty, and an empty
    /// bucket then costs a pointer rather than a whole entry.
    by_src: HashMap<SocketAddr, Box<Source>>,
    holder: HashMap<NodeId, SocketAddr>,
}

impl SourceTable {
    /// An empty table.
    pub fn new(limits: Limits) -> Self {
        SourceTable {
            limits,
            by_src: HashMap::new(),
            holder: HashMap::new(),
        }
    }

    /// Number of tracked sources.
    pub fn len(&self) -> usize {
        self.by_src.len()
    }

    /// True when no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.by_src.is_empty()
    }

    /// Number of distinct identities heard (and not yet forgotten): the
    /// members of the multicast group besides this node, as far as beacons
    /// tell. The pacing of our own beacons and replies follows it.
    pub fn identities(&self) -> usize {
        self.holder.len()
    }

    /// Records the interval `src` says it announces at (the receiver's
    /// [`crate::pacing::assumed`] value of its beacon): its silence is
    /// judged by it from now on. Nothing for an unknown source.
    pub fn note_interval(&mut self, src: SocketAddr, interval: Duration) {
        if let Some(s) = self.by_src.get_mut(&src) {
            s.interval = interval;
        }
    }

    /// Whether a datagram from `src` at `now` may be processed at all
    /// (called before decoding, so a flood costs little).
    pub fn admit(&mut self, now: Instant, src: SocketAddr) -> bool {
        if !self.by_src.contains_key(&src) {
            if self.by_src.len() >= self.limits.max_sources {
                self.prune(now);
            }
            if self.by_src.len() >= self.limits.max_sources {
                return false;
            }
            self.by_src
                .insert(src, Box::new(Source::new(&self.limits, now)));
        }
        let s = self.by_src.get_mut(&src).expect("inserted above");
        s.bucket.try_take(now)
    }

    /// Classifies a (decoded, same-cluster, not our own) beacon from `src`
    /// and records it; see [`SourceTable::judge`].
    pub fn on_beacon(
        &mut self,
        now: Instant,
        src: SocketAddr,
        id: NodeId,
        incarnation: Incarnation,
    ) -> Verdict {
        let verdict = self.judge(now, src, id, incarnation);
        self.commit(now, src, id, incarnation, verdict)
    }

    /// Classifies a beacon without recording anything, so that a caller may
    /// still refuse it (a budget) and have its next beacon judged afresh.
    /// `New` here means an identity with no source at all; [`commit`]
    /// also calls a known identity's first beacon from a new source `New`.
    ///
    /// [`commit`]: SourceTable::commit
    pub fn judge(
        &self,
        now: Instant,
        src: SocketAddr,
        id: NodeId,
        incarnation: Incarnation,
    ) -> Verdict {
        let previous = self.by_src.get(&src).and_then(|s| s.speaks_for);
        match self.holder.get(&id).copied() {
            Some(holder) if holder != src => {
                let held = self.by_src.get(&holder).and_then(|s| {
                    s.speaks_for
                        .filter(|(hid, _)| *hid == id)
                        .map(|(_, inc)| (inc, s.last_seen, s.stale_after(&self.limits)))
                });
                match held {
                    Some((inc, ..)) if incarnation < inc => Verdict::Stale,
                    Some((inc, ..)) if incarnation > inc => {
                        Verdict::Restarted { from: Some(holder) }
                    }
                    Some((_, seen, stale_after))
                        if now.saturating_duration_since(seen) >= stale_after =>
                    {
                        Verdict::Moved { from: holder }
                    }
                    Some(_) if holder.ip() == src.ip() => Verdict::Conflict { holder },
                    // Same identity on another IP: a multi-homed node.
                    Some(_) => Verdict::Known,
                    None => Verdict::New,
                }
            }
            Some(_) => match previous {
                Some((_, inc)) if incarnation < inc => Verdict::Stale,
                Some((_, inc)) if incarnation > inc => Verdict::Restarted { from: None },
                _ => Verdict::Known,
            },
            None => Verdict::New,
        }
    }

    /// Records a beacon that [`SourceTable::judge`] classified as `verdict`
    /// (same arguments, nothing in between); returns the final verdict.
    pub fn commit(
        &mut self,
        now: Instant,
        src: SocketAddr,
        id: NodeId,
        incarnation: Incarnation,
        verdict: Verdict,
    ) -> Verdict {
        if !verdict.accept() {
            return verdict;
        }
        let limits = self.limits;
        let s = self
            .by_src
            .entry(src)
            .or_insert_with(|| Box::new(Source::new(&limits, now)));
        // A source that spoke for another identity: its port was reused by a
        // new process; the old identity loses this source.
        if let Some((old, _)) = s.speaks_for.filter(|(old, _)| *old != id) {
            if self.holder.get(&old) == Some(&src) {
                self.holder.remove(&old);
            }
        }
        let first_from_source = s.speaks_for.is_none();
        s.speaks_for = Some((id, incarnation));
        s.last_seen = now;
        let take_over = match verdict {
            Verdict::Restarted { .. } | Verdict::Moved { .. } | Verdict::New => true,
            // Multi-homed nodes keep their first holder.
            _ => !self.holder.contains_key(&id),
        };
        if take_over {
            self.holder.insert(id, src);
        }
        if first_from_source && verdict == Verdict::Known {
            return Verdict::New; // a new source of a known (multi-homed) node
        }
        verdict
    }

    /// Whether to answer `src` with a unicast reply now (at most once per
    /// `min_gap` per source); records the answer when true.
    pub fn should_reply(&mut self, now: Instant, src: SocketAddr, min_gap: Duration) -> bool {
        let Some(s) = self.by_src.get_mut(&src) else {
            return false;
        };
        match s.last_reply {
            Some(t) if now.saturating_duration_since(t) < min_gap => false,
            _ => {
                s.last_reply = Some(now);
                true
            }
        }
    }

    /// Forgets sources silent for `forget_after` (or for longer, if their
    /// interval asks for it; see [`SourceTable::note_interval`]).
    pub fn prune(&mut self, now: Instant) {
        let limits = self.limits;
        let holder = &mut self.holder;
        self.by_src.retain(|src, s| {
            let keep = now.saturating_duration_since(s.last_seen) < s.forget_after(&limits);
            if !keep {
                if let Some((id, _)) = s.speaks_for {
                    if holder.get(&id) == Some(src) {
                        holder.remove(&id);
                    }
                }
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(ip: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, ip], port))
    }

    #[test]
    fn first_beacon_is_new_then_known() {
        let t0 = Instant::now();
        let mut s = SourceTable::new(Limits::default());
        assert!(s.admit(t0, addr(1, 1000)));
        assert_eq!(s.on_beacon(t0, addr(1, 1000), NodeId(1), 1), Verdict::New);
        assert_eq!(s.on_beacon(t0, addr(1, 1000), NodeId(1), 1), Verdict::Known);
    }

    #[test]
    fn judging_records_nothing_until_committed() {
        let t0 = Instant::now();
        let mut s = SourceTable::new(Limits::default());
        s.admit(t0, addr(1, 1000));
        assert_eq!(s.judge(t0, addr(1, 1000), NodeId(1), 1), Verdict::New);
        assert_eq!(s.judge(t0, addr(1, 1000), NodeId(1), 1), Verdict::New);
        let v = s.judge(t0, addr(1, 1000), NodeId(1), 1);
        assert_eq!(s.commit(t0, addr(1, 1000), NodeId(1), 1, v), Verdict::New);
        assert_eq!(s.judge(t0, addr(1, 1000), NodeId(1), 1), Verdict::Known);
        // A restart judged but refused leaves the old life in place.
        let v = s.judge(t0, addr(1, 2000), NodeId(1), 2);
        assert_eq!(
            v,
            Verdict::Restarted {
                from: Some(addr(1, 1000))
            }
        );
        assert_eq!(s.judge(t0, addr(1, 1000), NodeId(1), 1), Verdict::Known);
    }

    #[test]
    fn restart_on_new_port_replaces_and_stale_is_dropped() {
        let t0 = Instant::now();
        let mut s = SourceTable::new(Limits::default());
        s.on_beacon(t0, addr(1, 1000), NodeId(1), 1);
        assert_eq!(
            s.on_beacon(t0, addr(1, 2000), NodeId(1), 2),
            Verdict::Restarted {
                from: Some(addr(1, 1000))
            }
        );
        assert_eq!(s.on_beacon(t0, addr(1, 1000), NodeId(1), 1), Verdict::Stale);
    }

    #[test]
    fn two_live_sources_on_one_ip_conflict_but_a_silent_one_moves() {
        let t0 = Instant::now();
        let lim = Limits::default();
        let mut s = SourceTable::new(lim);
        s.on_beacon(t0, addr(1, 1000), NodeId(1), 1);
        assert_eq!(
            s.on_beacon(t0, addr(1, 2000), NodeId(1), 1),
            Verdict::Conflict {
                holder: addr(1, 1000)
            }
        );
        let later = t0 + lim.stale_after;
        assert_eq!(
            s.on_beacon(later, addr(1, 2000), NodeId(1), 1),
            Verdict::Moved {
                from: addr(1, 1000)
            }
        );
    }

    #[test]
    fn multi_homed_node_is_not_a_conflict() {
        let t0 = Instant::now();
        let mut s = SourceTable::new(Limits::default());
        s.on_beacon(t0, addr(1, 1000), NodeId(1), 1);
        assert!(s.on_beacon(t0, addr(2, 1000), NodeId(1), 1).accept());
    }

    #[test]
    fn flooding_source_is_limited_without_affecting_others() {
        let t0 = Instant::now();
        let lim = Limits::default();
        let mut s = SourceTable::new(lim);
        let admitted = (0..1000).filter(|_| s.admit(t0, addr(9, 9))).count();
        assert_eq!(admitted, lim.burst as usize);
        assert!(s.admit(t0, addr(1, 1)));
        // Refills at `rate` per second.
        assert!(s.admit(t0 + Duration::from_secs(1), addr(9, 9)));
    }

    #[test]
    fn replies_are_rate_limited_per_source() {
        let t0 = Instant::now();
        let mut s = SourceTable::new(Limits::default());
        s.admit(t0, addr(1, 1));
        let gap = Duration::from_secs(1);
        assert!(s.should_reply(t0, addr(1, 1), gap));
        assert!(!s.should_reply(t0, addr(1, 1), gap));
        assert!(s.should_reply(t0 + gap, addr(1, 1), gap));
    }

    #[test]
    fn table_is_bounded() {
        let t0 = Instant::now();
        let lim = Limits {
            max_sources: 10,
            ..Limits::default()
        };
        let mut s = SourceTable::new(lim);
        for p in 0..100 {
            s.admit(t0, addr(1, p));
        }
        assert_eq!(s.len(), 10);
        // Once they are silent long enough, room is made.
        assert!(s.admit(t0 + lim.forget_after, addr(2, 1)));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_source_with_a_longer_interval_is_judged_by_it() {
        let t0 = Instant::now();
        let lim = Limits::default();
        let mut s = SourceTable::new(lim);
        s.on_beacon(t0, addr(1, 1000), NodeId(1), 1);
        s.on_beacon(t0, addr(1, 3000), NodeId(3), 1);
        assert_eq!(s.identities(), 2);
        // Announcing every 5 s: 3 s of silence is normal, so a second
        // source of the same identity on that IP is still a conflict.
        s.note_interval(addr(1, 1000), Duration::from_secs(5));
        let later = t0 + lim.stale_after;
        assert_eq!(
            s.on_beacon(later, addr(1, 2000), NodeId(1), 1),
            Verdict::Conflict {
                holder: addr(1, 1000)
            }
        );
        assert_eq!(
            s.on_beacon(t0 + Duration::from_secs(15), addr(1, 2000), NodeId(1), 1),
            Verdict::Moved {
                from: addr(1, 1000)
            }
        );
        // Forgotten after three of its own intervals when that is longer
        // than `forget_after`; a default source after `forget_after`.
        let mut s = SourceTable::new(lim);
        s.on_beacon(t0, addr(1, 1000), NodeId(1), 1);
        s.on_beacon(t0, addr(1, 2000), NodeId(2), 1);
        s.note_interval(addr(1, 1000), Duration::from_secs(40));
        s.prune(t0 + lim.forget_after);
        assert_eq!((s.len(), s.identities()), (1, 1));
        s.prune(t0 + Duration::from_secs(120));
        assert_eq!((s.len(), s.identities()), (0, 0));
        // Unknown sources note nothing.
        s.note_interval(addr(9, 9), Duration::from_secs(40));
        assert!(s.is_empty());
    }

    proptest! {
        /// Whatever the sequence, every identity has at most one holder and
        /// the holder speaks for it.
        #[test]
        fn prop_holder_is_consistent(ops in proptest::collection::vec((0u8..4, 0u16..4, 0u8..3, 1u64..4, 0u64..5000), 1..200)) {
            let t0 = Instant::now();
            let mut s = SourceTable::new(Limits::default());
            let mut now = t0;
            for (ip, port, id, inc, dt) in ops {
                now += Duration::from_millis(dt);
                let src = addr(ip, port);
                if s.admit(now, src) {
                    s.on_beacon(now, src, NodeId(id as u128), inc);
                }
                for (id, holder) in &s.holder {
                    let speaks = s.by_src.get(holder).and_then(|x| x.speaks_for).map(|(i, _)| i);
                    prop_assert_eq!(speaks, Some(*id));
                }
            }
        }
    }
}
