//! The event queue: everything that will happen, ordered by virtual time,
//! ties broken by the order of scheduling (a sequence number), so that a
//! run is a pure function of its seed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use proto::Beacon;

use crate::net::{ConnId, Segment};

/// A timer of a node process. Each is armed lazily (see `node::Timer`): the
/// event carries the instant it was armed for, so a stale one is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    /// The peer table's `next_deadline`.
    Table,
    /// Discovery's next announce.
    Beacon,
    /// Discovery's source-table pruning.
    Prune,
    /// The transport's liveness report (`Heard` batches).
    Report,
    /// The transport's held duplicate closes (`proto::link::Handovers`).
    Handover,
    /// One connection end: connect timeout, handshake or link deadline.
    Conn(ConnId),
}

/// An input for a node process.
#[derive(Debug)]
pub(crate) enum Input {
    /// A datagram on the discovery sockets.
    Datagram {
        /// Its source address.
        src: SocketAddr,
        /// What it says (shared by every receiver of one multicast).
        beacon: Rc<Beacon>,
    },
    /// A dial's TCP connect ended: connected, or refused.
    ConnectDone { conn: ConnId, refused: bool },
    /// The listener accepted a connection.
    Accepted { conn: ConnId },
    /// A segment arrived on a connection end.
    Segment {
        conn: ConnId,
        end: usize,
        seg: Segment,
    },
    /// A timer armed for `armed` came due.
    Timer { kind: TimerKind, armed: Instant },
}

/// Something that happens at an instant.
#[derive(Debug)]
pub(crate) enum Ev {
    /// An input for the process of host `slot`: the process generation
    /// `proc`, or whichever process listens then (`None`, datagrams).
    Deliver {
        slot: u32,
        proc: Option<u32>,
        input: Input,
    },
    /// A SYN reaches the acceptor's host.
    Syn { conn: ConnId },
    /// The dialer's host sends SYN attempt number `attempt` (retransmits).
    SynSend { conn: ConnId, attempt: u32 },
    /// A TCP retransmission timer of one direction of a connection.
    Retransmit { conn: ConnId, dir: usize },
}

/// A min-queue of events by `(time, sequence)`. The heap holds only the
/// 16-byte key and a slab index, so that its sifting moves little; the
/// events wait in a slab.
pub(crate) struct Queue {
    origin: Instant,
    /// Virtual now: no event is due before it (see [`Queue::push`]).
    floor: Instant,
    heap: BinaryHeap<Reverse<(u128, u32)>>,
    slab: Vec<Option<(Instant, Ev)>>,
    free: Vec<u32>,
    seq: u64,
}

impl Default for Queue {
    fn default() -> Self {
        Queue::new(Instant::now())
    }
}

impl Queue {
    /// An empty queue; no event may be scheduled before `origin`.
    pub fn new(origin: Instant) -> Queue {
        Queue {
            origin,
            floor: origin,
            heap: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            seq: 0,
        }
    }

    /// Schedules `ev` at `at`, or now if `at` has passed: a timer armed for
    /// a deadline already past fires at once, as a runtime's does (a state
    /// machine's deadline may be a lower bound that has gone by). Left in
    /// the past, it would move virtual time back.
    pub fn push(&mut self, at: Instant, ev: Ev) {
        let at = at.max(self.floor);
        self.seq += 1;
        let ns = at.saturating_duration_since(self.origin).as_nanos() as u64;
        let key = (u128::from(ns) << 64) | u128::from(self.seq);
        let idx = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some((at, ev));
                i
            }
            None => {
                self.slab.push(Some((at, ev)));
                (self.slab.len() - 1) as u32
            }
        };
        self.heap.push(Reverse((key, idx)));
    }

    /// The earliest event's time.
    pub fn peek_time(&self) -> Option<Instant> {
        let Reverse((_, idx)) = self.heap.peek()?;
        self.slab[*idx as usize].as_ref().map(|(at, _)| *at)
    }

    /// Takes the earliest event; virtual time moves to it.
    pub fn pop(&mut self) -> Option<(Instant, Ev)> {
        let Reverse((_, idx)) = self.heap.pop()?;
        self.free.push(idx);
        let (at, ev) = self.slab[idx as usize].take()?;
        self.floor = self.floor.max(at);
        Some((at, ev))
    }

    /// Virtual time moved to `now` without an event (a run's end, a
    /// scheduled start).
    pub fn advance(&mut self, now: Instant) {
        self.floor = self.floor.max(now);
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn event(conn: u32) -> Ev {
        Ev::Syn {
            conn: conn as ConnId,
        }
    }

    #[test]
    fn an_event_scheduled_in_the_past_is_due_now_and_time_never_moves_back() {
        let t0 = Instant::now();
        let mut q = Queue::new(t0);
        q.push(t0 + Duration::from_secs(5), event(1));
        let (at, _) = q.pop().unwrap();
        assert_eq!(at, t0 + Duration::from_secs(5));
        q.push(t0 + Duration::from_secs(1), event(2));
        assert_eq!(q.pop().map(|(at, _)| at), Some(t0 + Duration::from_secs(5)));
        q.advance(t0 + Duration::from_secs(9));
        q.push(t0 + Duration::from_secs(6), event(3));
        assert_eq!(q.peek_time(), Some(t0 + Duration::from_secs(9)));
    }
}
