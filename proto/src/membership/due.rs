//! The peer table's deadline index: when each entry next needs the table's
//! attention, kept ordered so that [`PeerTable::next_deadline`], the dial
//! scheduler and [`PeerTable::on_tick`] cost O(log N) per changed entry
//! instead of a scan of every entry after every input.
//!
//! Each entry has two keys, both pure functions of the entry and the
//! configuration ([`keys`]):
//! - its *silence* deadline (when it turns suspect or failed if nothing is
//!   heard), which the grace period after our own lateness may hold back;
//! - its *timer* deadline: the earliest of its next probe, next dial (while
//!   no link is up or being made) and, for a tombstone, its reaping.
//!
//! The index is maintained lazily: every input marks the ids it may change
//! ([`Due::touch`]), and the next reader recomputes their keys first
//! ([`Due::refresh`]). A missed mark is a bug that debug builds catch: there
//! `next_deadline` checks the index against a full recomputation.
//!
//! [`PeerTable::next_deadline`]: super::PeerTable::next_deadline
//! [`PeerTable::on_tick`]: super::PeerTable::on_tick

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::time::{Duration, Instant};

use super::{Config, LinkState, Peer, PeerState, PeerTable, Peers};
use crate::id::NodeId;

/// The two keys of one entry. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Keys {
    /// When silence turns the entry suspect or failed (live entries only).
    pub silence: Option<Instant>,
    /// The earliest probe, dial or reaping.
    pub timer: Option<Instant>,
}

/// Computes the keys of `p`: the per-entry term of the deadline, exactly as
/// a scan over every entry would compute it.
pub(super) fn keys(cfg: &Config, p: &Peer) -> Keys {
    let dial = p
        .next_dial
        .filter(|_| p.link == LinkState::Down && p.may_dial());
    let min = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match p.state {
        // Known through the overlay (or a neighbour whose first link is
        // being made): no silence of its own, only its dial.
        PeerState::Alive | PeerState::Suspect if !p.judged() => Keys {
            silence: None,
            timer: dial,
        },
        PeerState::Alive | PeerState::Suspect => {
            let mut t = p.last_evidence() + PeerTable::dead_after(cfg, p);
            if p.state == PeerState::Alive && !p.degraded() {
                t = t.min(p.last_evidence() + cfg.suspect_after);
            }
            let probe = p.next_probe.filter(|_| p.link != LinkState::Up);
            Keys {
                // Once this observer's silence alert is out (overlay mode),
                // the verdict waits for another observer's.
                silence: (!p.alerted).then_some(t),
                timer: min(probe, dial),
            }
        }
        PeerState::Failed | PeerState::Left => {
            let reap = p.since + cfg.tombstone_ttl;
            Keys {
                silence: None,
                timer: min(min(Some(reap), p.next_probe), dial),
            }
        }
    }
}

/// The ordered index. See the module docs.
///
/// Silence deadlines move later with every frame heard (the most frequent
/// input), so their set is lazy: it holds one entry per live id at or
/// *before* its true deadline, and an entry found stale when it comes first
/// is moved to the true deadline then. Traffic thus costs a map update, not
/// a removal and an insertion in the ordered set.
#[derive(Debug, Default)]
pub(super) struct Due {
    /// Lower bounds of silence deadlines (see above); each id's [`Slot`]
    /// says which entry it has here.
    silence: BTreeSet<(Instant, NodeId)>,
    timer: BTreeSet<(Instant, NodeId)>,
    /// Per id with a deadline: its true keys and its entry in `silence`
    /// (an id with neither has no slot). One map, not two.
    slots: HashMap<NodeId, Slot>,
    /// Entries not confirmed yet, with their `since` (for the table's
    /// `unlinked` list). Ordered, so that it shrinks back once a cold
    /// start's crowd of pending entries is confirmed (a hash map keeps its
    /// largest capacity).
    pending: BTreeMap<NodeId, Instant>,
    /// The `unlinked` list must be recomputed at the next tick at or after
    /// this (`None`: only when `pending` changes).
    unlinked_until: Option<Instant>,
    /// `pending` changed since the `unlinked` list was computed.
    pending_changed: bool,
    /// Ids changed since the last refresh.
    dirty: Vec<NodeId>,
}

/// What the index holds about one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// The true keys.
    keys: Keys,
    /// Its entry in the lazy silence set, if any.
    held: Option<Instant>,
}

impl Due {
    /// Marks `id` as possibly changed (or removed).
    pub fn touch(&mut self, id: NodeId) {
        self.dirty.push(id);
    }

    /// Recomputes the keys of every id touched since the last refresh.
    pub fn refresh(&mut self, cfg: &Config, peers: &Peers) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            // An entry with no deadline has no slot (in overlay mode, most
            // entries: members known through the overlay only).
            let new = peers
                .get(&id)
                .map(|p| keys(cfg, p))
                .filter(|k| *k != Keys::default());
            // The slot's keys and silence entry before this refresh.
            let old = match new {
                Some(k) => match self.slots.entry(id) {
                    Entry::Occupied(mut e) => {
                        let old = *e.get();
                        e.get_mut().keys = k;
                        Some(old)
                    }
                    Entry::Vacant(e) => {
                        e.insert(Slot {
                            keys: k,
                            held: None,
                        });
                        None
                    }
                },
                None => self.slots.remove(&id),
            };
            let old_timer = old.and_then(|s| s.keys.timer);
            let new_timer = new.and_then(|k| k.timer);
            if old_timer != new_timer {
                if let Some(t) = old_timer {
                    self.timer.remove(&(t, id));
                }
                if let Some(t) = new_timer {
                    self.timer.insert((t, id));
                }
            }
            let silence = new.and_then(|k| k.silence);
            let held = old.and_then(|s| s.held);
            match (held, silence) {
                (Some(h), Some(t)) if h <= t => {} // still a lower bound
                (held, t) => {
                    if let Some(h) = held {
                        self.silence.remove(&(h, id));
                    }
                    if let Some(t) = t {
                        self.silence.insert((t, id));
                    }
                    if let Some(slot) = self.slots.get_mut(&id) {
                        slot.held = t;
                    }
                }
            }
            let since = peers.get(&id).filter(|p| !p.confirmed).map(|p| p.since);
            let was = match since {
                Some(t) => self.pending.insert(id, t),
                None => self.pending.remove(&id),
            };
            self.pending_changed |= was != since;
        }
        self.dirty = dirty; // keep the allocation
                            // A cold start's crowd of entries with deadlines (pending ones) is
                            // soon known through the overlay only: give the room back.
        let len = self.slots.len();
        if self.slots.capacity() > 8 * len.max(16) {
            self.slots.shrink_to(2 * len);
        }
    }

    /// Moves stale silence entries at or before `until` (or, when `None`,
    /// at the first entry's instant) to their true deadlines, until none is
    /// stale: then the first entry is the true earliest deadline, and every
    /// entry at or before `until` is true.
    fn settle_silence(&mut self, until: Option<Instant>) {
        loop {
            let Some(bound) = until.or_else(|| self.silence.first().map(|&(t, _)| t)) else {
                return;
            };
            let stale: Vec<(Instant, NodeId)> = self
                .silence
                .iter()
                .take_while(|(t, _)| *t <= bound)
                .filter(|&&(t, id)| self.true_silence(id) != Some(t))
                .copied()
                .collect();
            if stale.is_empty() {
                return;
            }
            for (t, id) in stale {
                self.move_silence(t, id);
            }
        }
    }

    /// The true silence deadline of `id`.
    fn true_silence(&self, id: NodeId) -> Option<Instant> {
        self.slots.get(&id).and_then(|s| s.keys.silence)
    }

    /// Replaces the entry `(held, id)` by the id's true silence deadline.
    fn move_silence(&mut self, held: Instant, id: NodeId) {
        self.silence.remove(&(held, id));
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        slot.held = slot.keys.silence;
        if let Some(t) = slot.held {
            self.silence.insert((t, id));
        }
    }

    /// The earliest silence deadline and the earliest timer deadline.
    pub fn first(&mut self) -> (Option<Instant>, Option<Instant>) {
        self.settle_silence(None);
        (
            self.silence.first().map(|&(t, _)| t),
            self.timer.first().map(|&(t, _)| t),
        )
    }

    /// Ids whose silence or timer deadline is at or before `now`, sorted.
    pub fn due(&mut self, now: Instant) -> Vec<NodeId> {
        self.settle_silence(Some(now));
        let mut ids = Vec::new();
        for set in [&self.silence, &self.timer] {
            ids.extend(set.iter().take_while(|(t, _)| *t <= now).map(|&(_, id)| id));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Ids whose timer deadline (probe, dial, reaping) is at or before `now`.
    pub fn timers_due(&self, now: Instant) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self
            .timer
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|&(_, id)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The pending entries heard for at least `after` as of `now`, when
    /// that set may differ from the last time this returned `Some`;
    /// `None` when it cannot have changed (so the table's scan of every
    /// pending entry happens only when it matters).
    pub fn unlinked(&mut self, now: Instant, after: Duration) -> Option<Vec<NodeId>> {
        if !self.pending_changed && self.unlinked_until.is_none_or(|t| now < t) {
            return None;
        }
        self.pending_changed = false;
        let mut next = None;
        let mut old = Vec::new();
        for (&id, &since) in &self.pending {
            if now.saturating_duration_since(since) >= after {
                old.push(id);
            } else {
                let at = since + after;
                next = Some(next.map_or(at, |n: Instant| n.min(at)));
            }
        }
        self.unlinked_until = next;
        Some(old)
    }

    /// Debug builds: the index matches a recomputation from every entry.
    #[cfg(debug_assertions)]
    pub fn check(&self, cfg: &Config, peers: &Peers) {
        assert!(self.dirty.is_empty(), "check after a refresh");
        assert!(
            self.slots.keys().all(|id| peers.contains_key(id)),
            "a removed entry is still in the deadline index"
        );
        for (id, p) in peers {
            let k = keys(cfg, p);
            assert_eq!(
                self.slots.get(id).map_or(Keys::default(), |s| s.keys),
                k,
                "deadline index out of date for {id:?}: an input changed it without touching it"
            );
            let held = self.slots.get(id).and_then(|s| s.held);
            assert_eq!(
                held.is_some(),
                k.silence.is_some(),
                "silence entry of {id:?}"
            );
            assert!(
                held <= k.silence,
                "a silence entry after the deadline of {id:?}"
            );
            assert!(held.is_none_or(|h| self.silence.contains(&(h, *id))));
            assert!(k.timer.is_none_or(|t| self.timer.contains(&(t, *id))));
        }
        assert_eq!(
            self.silence.len(),
            self.slots.values().filter(|s| s.held.is_some()).count()
        );
        assert_eq!(
            self.timer.len(),
            peers
                .values()
                .filter(|p| keys(cfg, p).timer.is_some())
                .count()
        );
    }
}
