//! Membership records in flight, shared.
//!
//! A cold start sends every join over every link of the overlay: N records
//! through each of N nodes, most of them waiting behind a lost segment
//! (TCP's head-of-line blocking) for a retransmission timeout. Passed as
//! values, each one is its own `PeerRecord` with two strings of its own, and
//! at a few thousand nodes the records in flight outweigh every table. But
//! they are the same few facts many times over ("this member is alive at
//! this incarnation", relayed by each node to each of its neighbours), so
//! the plaintext transport passes a `peers` frame as handles to one shared
//! copy of each distinct record, and rebuilds the frame, equal to the one
//! sent, on delivery.
//!
//! This is a representation, not a model: what a node receives, and when,
//! is exactly what it would receive with the frame passed as a value.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use proto::frame::{PeerList, PeerRecord};

/// A `peers` frame in flight: its records, shared.
#[derive(Debug)]
pub struct SharedList(Box<[Rc<PeerRecord>]>);

impl SharedList {
    /// The frame as it was sent.
    pub fn to_list(&self) -> PeerList {
        PeerList {
            peers: self.0.iter().map(|r| PeerRecord::clone(r)).collect(),
        }
    }
}

/// The distinct records in flight. A record is dropped from it once no
/// frame in flight holds it (swept whenever it has doubled since the last
/// sweep, so it stays within twice the records in flight).
#[derive(Debug, Default)]
pub struct Records {
    /// By content hash; equal hashes are told apart by comparing.
    by_hash: HashMap<u64, Vec<Rc<PeerRecord>>>,
    len: usize,
    sweep_at: usize,
}

/// Below this many distinct records, no sweep.
const SWEEP_MIN: usize = 1024;

impl Records {
    /// The shared form of `list`.
    pub fn share(&mut self, list: PeerList) -> SharedList {
        if self.len >= self.sweep_at.max(SWEEP_MIN) {
            self.sweep();
        }
        let shared = list.peers.into_iter().map(|r| self.intern(r)).collect();
        SharedList(shared)
    }

    /// Distinct records held (in flight, or not swept yet).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    fn intern(&mut self, r: PeerRecord) -> Rc<PeerRecord> {
        let same = self.by_hash.entry(content_hash(&r)).or_default();
        if let Some(held) = same.iter().find(|h| ***h == r) {
            return Rc::clone(held);
        }
        let rc = Rc::new(r);
        same.push(Rc::clone(&rc));
        self.len += 1;
        rc
    }

    /// Forgets the records no frame in flight holds.
    fn sweep(&mut self) {
        self.by_hash.retain(|_, same| {
            same.retain(|r| Rc::strong_count(r) > 1);
            !same.is_empty()
        });
        self.len = self.by_hash.values().map(Vec::len).sum();
        self.sweep_at = self.len * 2;
    }
}

/// A hash of the fields that tell a record from its id's other records
/// (any hash will do: equal hashes are compared in full). Name, address and
/// tags are left out: they rarely differ between records of one id and one
/// incarnation, and hashing their strings was most of the cost of sharing.
fn content_hash(r: &PeerRecord) -> u64 {
    let mut h = DefaultHasher::new();
    (
        r.id,
        r.incarnation,
        &r.state,
        r.age_ms,
        r.tags_version,
        r.by,
    )
        .hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::NodeId;

    fn record(id: u128, state: &str) -> PeerRecord {
        PeerRecord {
            id: NodeId(id),
            incarnation: 1,
            name: format!("n{id}"),
            addr: "127.0.0.1:6777".parse().unwrap(),
            state: state.into(),
            age_ms: None,
            tags: Default::default(),
            tags_version: 0,
            by: None,
        }
    }

    #[test]
    fn a_shared_list_rebuilds_the_list_sent_and_shares_equal_records() {
        let mut records = Records::default();
        let list = PeerList {
            peers: vec![record(1, "alive"), record(2, "failed"), record(1, "left")],
        };
        let a = records.share(list.clone());
        let b = records.share(list.clone());
        assert_eq!(a.to_list(), list);
        assert_eq!(b.to_list(), list);
        assert_eq!(records.len(), 3, "equal records are held once");
        assert!(a.0.iter().zip(b.0.iter()).all(|(x, y)| Rc::ptr_eq(x, y)));
    }

    #[test]
    fn records_no_frame_holds_are_swept() {
        let mut records = Records::default();
        for i in 0..(SWEEP_MIN as u128 * 4) {
            let list = PeerList {
                peers: vec![record(i, "alive")],
            };
            drop(records.share(list));
        }
        assert!(
            records.len() <= SWEEP_MIN * 2,
            "{} records held with nothing in flight",
            records.len()
        );
    }
}
