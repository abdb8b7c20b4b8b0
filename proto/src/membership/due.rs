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

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use super::{Config, LinkState, Peer, PeerState, PeerTable};
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
    let dial = p.next_dial.filter(|_| p.link == LinkState::Down);
    let min = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match p.state {
        PeerState::Alive | PeerState::Suspect => {
            let mut t = p.last_evidence() + PeerTable::dead_after(cfg, p);
            if p.state == PeerState::Alive && !p.degraded() {
                t = t.min(p.last_evidence() + cfg.suspect_after);
            }
            let probe = p.next_probe.filter(|_| p.link != LinkState::Up);
            Keys {
                silence: Some(t),
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
#[derive(Debug, Default)]
pub(super) struct Due {
    silence: BTreeSet<(Instant, NodeId)>,
    timer: BTreeSet<(Instant, NodeId)>,
    keys: HashMap<NodeId, Keys>,
    /// Entries not confirmed yet (for the table's `unlinked` list).
    pending: BTreeSet<NodeId>,
    /// Ids changed since the last refresh.
    dirty: Vec<NodeId>,
}

impl Due {
    /// Marks `id` as possibly changed (or removed).
    pub fn touch(&mut self, id: NodeId) {
        self.dirty.push(id);
    }

    /// Recomputes the keys of every id touched since the last refresh.
    pub fn refresh(&mut self, cfg: &Config, peers: &HashMap<NodeId, Peer>) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            let new = peers.get(&id).map(|p| keys(cfg, p));
            let old = match new {
                Some(k) => self.keys.insert(id, k),
                None => self.keys.remove(&id),
            };
            if let Some(old) = old {
                if let Some(t) = old.silence {
                    self.silence.remove(&(t, id));
                }
                if let Some(t) = old.timer {
                    self.timer.remove(&(t, id));
                }
            }
            if let Some(new) = new {
                if let Some(t) = new.silence {
                    self.silence.insert((t, id));
                }
                if let Some(t) = new.timer {
                    self.timer.insert((t, id));
                }
            }
            if peers.get(&id).is_some_and(|p| !p.confirmed) {
                self.pending.insert(id);
            } else {
                self.pending.remove(&id);
            }
        }
        self.dirty = dirty; // keep the allocation
    }

    /// The earliest silence deadline and the earliest timer deadline.
    pub fn first(&self) -> (Option<Instant>, Option<Instant>) {
        (
            self.silence.first().map(|&(t, _)| t),
            self.timer.first().map(|&(t, _)| t),
        )
    }

    /// Ids whose silence or timer deadline is at or before `now`, sorted.
    pub fn due(&self, now: Instant) -> Vec<NodeId> {
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

    /// Entries not confirmed yet.
    pub fn pending(&self) -> impl Iterator<Item = &NodeId> {
        self.pending.iter()
    }

    /// Debug builds: the index matches a recomputation from every entry.
    #[cfg(debug_assertions)]
    pub fn check(&self, cfg: &Config, peers: &HashMap<NodeId, Peer>) {
        assert!(self.dirty.is_empty(), "check after a refresh");
        assert_eq!(
            self.keys.len(),
            peers.len(),
            "an entry is missing from the deadline index"
        );
        for (id, p) in peers {
            assert_eq!(
                self.keys.get(id),
                Some(&keys(cfg, p)),
                "deadline index out of date for {id:?}: an input changed it without touching it"
            );
        }
    }
}
