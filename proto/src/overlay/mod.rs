//! Neighbour selection for a bounded-degree overlay, sans-IO.
//!
//! Today every node links to every other: failure detection in milliseconds,
//! but each node's cost grows with N. [`Overlay`] picks a bounded set of
//! neighbours instead, in the manner of Rapid's K pseudo-random rings: every
//! member has a position on each of `R` rings (a hash of its id and the
//! ring's number), and its neighbours are its predecessor and successor on
//! each ring. Its successors are the members it watches (its *subjects*), its
//! predecessors the members that watch it (its *observers*); a link carries
//! both directions, so every neighbour is an observer in practice.
//!
//! Properties (tested in `tests.rs`):
//! - **Deterministic from the member set.** Every node that knows the same
//!   members computes the same rings, and nodes agree without exchanging
//!   anything about it. Ring neighbours are symmetric (b is a's successor on
//!   a ring exactly when a is b's predecessor); a link exists when either
//!   side wants it.
//! - **Bounded.** Each node wants exactly `min(max_links, N - 1)` links
//!   (`R = max_links / 2` rings); fill-ins (below) wanted by others may add
//!   one or two more (tested: at most `max_links + 2`).
//! - **Full mesh while small.** With at most `max_links + 1` members, every
//!   member is a neighbour of every other, exactly today's behaviour.
//! - **At least `min(max_links, N - 1)` neighbours.** Two rings may make the
//!   same pair adjacent; the shortfall is filled with members two, three ...
//!   steps along the rings, in a fixed order.
//! - **Connected under failures, repaired by recomputation.** A union of
//!   random rings is an expander; when a member fails or leaves, removing it
//!   from the set joins its predecessor and successor on each ring, so the
//!   repair is local: only the failed member's former neighbours change links.
//!
//! What it does *not* do: it opens no links and judges no failures. The
//! driver feeds it the member set (its peer table's live entries) and dials
//! what [`Overlay::want_links`] names; the peer table still decides who is
//! alive.

use std::collections::{BTreeSet, HashMap};

use crate::id::NodeId;

pub mod driver;
pub mod flood;
pub use driver::Driver;

/// The position of `id` on ring `ring`: a 64-bit mix (splitmix64's
/// finalizer) of the id and the ring number. Every node computes the same.
pub fn ring_position(ring: usize, id: NodeId) -> u64 {
    let lo = id.0 as u64;
    let hi = (id.0 >> 64) as u64;
    let mut z = lo ^ hi.rotate_left(29) ^ (ring as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The member set on `R` rings, kept sorted so that a neighbour query costs
/// O(R log N). See the module docs.
#[derive(Debug, Clone)]
pub struct Overlay {
    max_links: usize,
    rings: Vec<BTreeSet<(u64, NodeId)>>,
    members: HashMap<NodeId, ()>,
}

impl Overlay {
    /// An empty overlay whose members keep at most about `max_links` links
    /// each (at least 2: one ring).
    pub fn new(max_links: usize) -> Overlay {
        let max_links = max_links.max(2);
        Overlay {
            max_links,
            rings: vec![BTreeSet::new(); max_links / 2],
            members: HashMap::new(),
        }
    }

    /// The bound on links per node.
    pub fn max_links(&self) -> usize {
        self.max_links
    }

    /// Number of rings.
    pub fn rings(&self) -> usize {
        self.rings.len()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True without members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Is `id` a member?
    pub fn contains(&self, id: NodeId) -> bool {
        self.members.contains_key(&id)
    }

    /// The members, in no particular order.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.keys().copied()
    }

    /// Adds a member; false if it already was one.
    pub fn insert(&mut self, id: NodeId) -> bool {
        if self.members.insert(id, ()).is_some() {
            return false;
        }
        for (r, ring) in self.rings.iter_mut().enumerate() {
            ring.insert((ring_position(r, id), id));
        }
        true
    }

    /// Removes a member (it failed or left); false if it was none.
    pub fn remove(&mut self, id: NodeId) -> bool {
        if self.members.remove(&id).is_none() {
            return false;
        }
        for (r, ring) in self.rings.iter_mut().enumerate() {
            ring.remove(&(ring_position(r, id), id));
        }
        true
    }

    /// Makes the member set exactly `ids`.
    pub fn set_members(&mut self, ids: impl IntoIterator<Item = NodeId>) {
        let want: BTreeSet<NodeId> = ids.into_iter().collect();
        let gone: Vec<NodeId> = self
            .members
            .keys()
            .filter(|id| !want.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id);
        }
        for id in want {
            self.insert(id);
        }
    }

    /// The member `steps` places after (`forward`) or before `id` on ring
    /// `r`, wrapping around; `id` must be a member.
    fn walk(&self, r: usize, id: NodeId, steps: usize, forward: bool) -> NodeId {
        let ring = &self.rings[r];
        let key = (ring_position(r, id), id);
        let mut at = key;
        for _ in 0..steps {
            at = if forward {
                ring.range((std::ops::Bound::Excluded(at), std::ops::Bound::Unbounded))
                    .next()
                    .or_else(|| ring.first())
                    .copied()
                    .unwrap_or(key)
            } else {
                ring.range(..at)
                    .next_back()
                    .or_else(|| ring.last())
                    .copied()
                    .unwrap_or(key)
            };
        }
        at.1
    }

    /// The members `me` should hold links to: every other member while the
    /// set has at most `max_links + 1` members, else its predecessor and
    /// successor on every ring, filled up to `max_links` distinct members
    /// from further along the rings. `me` counts as a member whether or not
    /// it was inserted (the set is left unchanged).
    pub fn want_links(&self, me: NodeId) -> BTreeSet<NodeId> {
        if !self.contains(me) {
            let mut with_me = self.clone();
            with_me.insert(me);
            return with_me.want_links(me);
        }
        let others = self.members.len() - 1;
        if others <= self.max_links {
            return self
                .members
                .keys()
                .filter(|&&id| id != me)
                .copied()
                .collect();
        }
        let mut want = BTreeSet::new();
        for r in 0..self.rings.len() {
            want.insert(self.walk(r, me, 1, true));
            want.insert(self.walk(r, me, 1, false));
        }
        // Two rings made the same pair adjacent: fill in, in a fixed order
        // (every node computes the same), from two, three ... steps away.
        let target = self.max_links.min(others);
        let mut steps = 2;
        while want.len() < target {
            for r in 0..self.rings.len() {
                for forward in [true, false] {
                    if want.len() < target {
                        want.insert(self.walk(r, me, steps, forward));
                    }
                }
            }
            steps += 1;
        }
        want.remove(&me);
        want
    }

    /// The members that watch `me`: its predecessor on every ring (or every
    /// other member while the overlay is a full mesh).
    pub fn observers(&self, me: NodeId) -> BTreeSet<NodeId> {
        self.ring_neighbours(me, false)
    }

    /// The members `me` watches: its successor on every ring (or every
    /// other member while the overlay is a full mesh).
    pub fn subjects(&self, me: NodeId) -> BTreeSet<NodeId> {
        self.ring_neighbours(me, true)
    }

    /// `me`'s adjacent member on every ring, one step `forward`
    /// (successors: its subjects) or back (predecessors: its observers).
    /// While the overlay is a full mesh, every other member is both. The
    /// two directions are one walk: observers and subjects differ only in
    /// which way it goes.
    pub fn ring_neighbours(&self, me: NodeId, forward: bool) -> BTreeSet<NodeId> {
        if self.members.len().saturating_sub(1) <= self.max_links {
            return self
                .members
                .keys()
                .filter(|&&id| id != me)
                .copied()
                .collect();
        }
        (0..self.rings.len())
            .map(|r| self.walk(r, me, 1, forward))
            .filter(|&id| id != me)
            .collect()
    }

    /// Every link of the overlay, each pair once (smaller id first): the
    /// union of every member's [`Overlay::want_links`].
    pub fn edges(&self) -> BTreeSet<(NodeId, NodeId)> {
        let mut edges = BTreeSet::new();
        for &a in self.members.keys() {
            for b in self.want_links(a) {
                edges.insert((a.min(b), a.max(b)));
            }
        }
        edges
    }
}

#[cfg(test)]
mod tests;
