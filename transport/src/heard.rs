//! What each link last heard, for the peer table: read in batches by the
//! actor's report once per ping round, and at once by the node before it
//! judges a silence ([`crate::Transport::heard`]). One board serves both,
//! so an entry is reported once whichever reads it first.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::NodeId;

use crate::event::Heard;
use crate::link::LinkCounters;

/// The current link of each peer and what of it was last reported.
pub(crate) struct Board {
    /// Origin of the links' `heard_us` counters.
    epoch: Instant,
    links: Mutex<HashMap<NodeId, Watched>>,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board")
            .field("links", &self.lock().len())
            .finish()
    }
}

struct Watched {
    counters: Arc<LinkCounters>,
    /// `heard_us` as of the last report.
    reported_us: u64,
}

impl Board {
    pub(crate) fn new(epoch: Instant) -> Board {
        Board {
            epoch,
            links: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<NodeId, Watched>> {
        // Nothing panics while holding it; a poisoned map is still whole.
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `id`'s current link is now the one counting into `counters`.
    pub(crate) fn watch(&self, id: NodeId, counters: Arc<LinkCounters>) {
        self.lock().insert(
            id,
            Watched {
                counters,
                reported_us: 0,
            },
        );
    }

    /// `id` has no link any more.
    pub(crate) fn forget(&self, id: NodeId) {
        self.lock().remove(&id);
    }

    /// Every link heard since its last report, marked reported.
    pub(crate) fn take(&self) -> Vec<Heard> {
        let mut links = self.lock();
        let mut heard = Vec::new();
        for (id, w) in links.iter_mut() {
            let at_us = w.counters.heard_us.load(Ordering::Relaxed);
            if at_us == 0 || at_us == w.reported_us {
                continue;
            }
            let rtt_us = w.counters.rtt_us.load(Ordering::Relaxed);
            heard.push(Heard {
                id: *id,
                at: self.epoch + Duration::from_micros(at_us),
                rtt: (rtt_us > 0).then(|| Duration::from_micros(rtt_us)),
            });
            w.reported_us = at_us;
        }
        heard
    }

    /// A report was lost: everything goes in the next one.
    pub(crate) fn unreport(&self) {
        for w in self.lock().values_mut() {
            w.reported_us = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hearing_is_reported_once_and_again_after_a_lost_report() {
        let epoch = Instant::now();
        let board = Board::new(epoch);
        let (a, b) = (NodeId(1), NodeId(2));
        let (ca, cb) = (
            Arc::new(LinkCounters::default()),
            Arc::new(LinkCounters::default()),
        );
        board.watch(a, ca.clone());
        board.watch(b, cb.clone());
        assert!(board.take().is_empty(), "nothing heard yet");

        ca.heard_us.store(1_000, Ordering::Relaxed);
        ca.rtt_us.store(250, Ordering::Relaxed);
        let first = board.take();
        assert_eq!(
            first,
            vec![Heard {
                id: a,
                at: epoch + Duration::from_micros(1_000),
                rtt: Some(Duration::from_micros(250)),
            }]
        );
        assert!(board.take().is_empty(), "reported once");

        cb.heard_us.store(2_000, Ordering::Relaxed);
        board.unreport();
        let mut again = board.take();
        again.sort_by_key(|h| h.id);
        assert_eq!(
            again.iter().map(|h| (h.id, h.rtt)).collect::<Vec<_>>(),
            vec![(a, Some(Duration::from_micros(250))), (b, None)]
        );

        board.forget(a);
        ca.heard_us.store(3_000, Ordering::Relaxed);
        assert!(board.take().is_empty(), "a forgotten link is not read");
    }
}
