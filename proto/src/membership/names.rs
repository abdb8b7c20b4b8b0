//! The peer table's index of confirmed names: name -> the entry that holds
//! it.
//!
//! A map from `String` would keep a second copy of every name, and a
//! bucket of a name and an id, N of them per node. This index keeps only
//! the holder's id, hashed by its entry's name, and compares names against
//! the entries themselves. That rests on the table's invariant: an entry is
//! indexed only while it is confirmed, and a confirmed entry's name never
//! changes (a name is fixed for the life of an id; only pending entries,
//! which are not indexed, take a new one).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::Peers;
use crate::id::NodeId;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Names {
    table: HashTable<NodeId>,
    hasher: RandomState,
}

impl Names {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    /// The entry that holds `name`.
    pub fn get(&self, peers: &Peers, name: &str) -> Option<NodeId> {
        let holds = |id: &NodeId| peers.get(id).is_some_and(|p| p.name == name);
        self.table.find(self.hash(name), holds).copied()
    }

    /// `id` holds `name` now (in place of any previous holder).
    pub fn insert(&mut self, peers: &Peers, name: &str, id: NodeId) {
        let hash = self.hash(name);
        let holds = |h: &NodeId| peers.get(h).is_some_and(|p| p.name == name);
        match self.table.find_mut(hash, holds) {
            Some(held) => *held = id,
            None => {
                let hasher = &self.hasher;
                // Every indexed id has an entry (see the module docs).
                let rehash = |h: &NodeId| peers.get(h).map_or(0, |p| hasher.hash_one(&*p.name));
                self.table.insert_unique(hash, id, rehash);
            }
        }
    }

    /// `id` holds `name` now, unless another entry already does.
    pub fn insert_if_absent(&mut self, peers: &Peers, name: &str, id: NodeId) {
        if self.get(peers, name).is_none() {
            self.insert(peers, name, id);
        }
    }

    /// Unindexes `id` if it holds `name` (its entry may already be gone).
    pub fn remove_holder(&mut self, name: &str, id: NodeId) {
        if let Ok(e) = self.table.find_entry(self.hash(name), |h| *h == id) {
            e.remove();
        }
    }
}
