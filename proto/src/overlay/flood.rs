//! Application messages over the bounded overlay, sans-IO: broadcasts that
//! reach every member, and messages for a member this node has no link to.
//!
//! In the full mesh a broadcast is one [`AppMessage`] frame per link and
//! needs nothing else. With `--max-links`, most members are not neighbours,
//! so a message for them travels as a [`Relayed`] frame (kind 11) that every
//! node passes on over its other links:
//!
//! - **Named by `(origin, seq)`.** `seq` counts the origin's relayed
//!   messages from 1 in its life (a node's id is new at every start), one
//!   count for broadcasts and addressed messages alike.
//! - **Each node handles a message once.** A copy of a message already
//!   handled is dropped and counted ([`FloodStats::duplicates`]). A new one
//!   is passed on at once to every linked peer but the one it came from and
//!   the origin, while `ttl` lasts. A link therefore carries a message at most
//!   once each way; both ways only when its two ends pass it on at the same
//!   moment. It reaches every live member over the shortest path, in about
//!   log_K(N) hops.
//! - **Per-origin order.** A node hands on its own copy at once, but delivers
//!   an origin's messages in `seq` order: one that arrives ahead of a gap is
//!   held until the gap fills. Over TCP links a gap is a message still on a
//!   longer path, so it fills within milliseconds. A gap that does not fill
//!   within [`Config::hold`] (its message was lost with a link, or dropped by
//!   a full queue on every path) is given up ([`FloodStats::skipped`]) and
//!   delivery goes on after it; so is a gap behind which too much waits
//!   ([`Config::max_held`] messages of one origin, [`Config::max_held_bytes`]
//!   in all), so that a member cannot make a node hold without bound. The first message heard from an origin sets
//!   where its count starts: `seq` 1 is delivered at once, a higher one waits
//!   [`Config::first_hold`] for earlier ones on longer paths.
//! - **Addressed messages** (`to` set) travel the same way, and only the
//!   node named delivers them: their cost is one frame per link, like a
//!   broadcast, which suits messages to non-neighbours (rare in an overlay
//!   where queries and broadcasts reach everyone), not bulk data.
//!
//! Inputs take `now`. After each, drain [`Flood::poll_transmit`] (frames to
//! send) and [`Flood::poll_delivery`] (messages this node delivers, in
//! order); call [`Flood::on_tick`] at [`Flood::next_deadline`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::frame::{AppMessage, Topic};
use crate::id::NodeId;

/// A message relayed over the overlay, as it travels on a link (frame kind
/// 11, a msgpack map like every frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relayed {
    /// The sending node.
    pub origin: NodeId,
    /// The origin's count of relayed messages, from 1 (see the module docs).
    pub seq: u64,
    /// The one member that delivers it; `None`: every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<NodeId>,
    /// How many more times it may be passed on.
    pub ttl: u8,
    /// Free-form topic.
    pub topic: Topic,
    /// Opaque payload (msgpack `bin`).
    pub payload: Bytes,
}

impl Relayed {
    /// The application message it carries.
    pub fn message(&self) -> AppMessage {
        AppMessage {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// Bounds and timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The `ttl` of a message this node sends: more hops than any path
    /// takes (duplicates are dropped anyway; this bounds a loop if that
    /// ever failed). With two links per node the overlay is one ring,
    /// whose paths take up to N/2 hops, hence the most a byte holds.
    pub ttl: u8,
    /// How long a gap in an origin's sequence is waited for.
    pub hold: Duration,
    /// How long the first message heard from an origin, if it is not its
    /// first, waits for earlier ones.
    pub first_hold: Duration,
    /// Most messages held per origin; past it, the oldest gap is given up.
    pub max_held: usize,
    /// Most payload bytes held in all; past it, every gap is given up.
    pub max_held_bytes: usize,
    /// Most origins remembered; past it, the one heard from longest ago
    /// with nothing held is forgotten.
    pub max_origins: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ttl: u8::MAX,
            hold: Duration::from_millis(500),
            first_hold: Duration::from_millis(50),
            max_held: 1024,
            max_held_bytes: 64 << 20,
            max_origins: 16_384,
        }
    }
}

/// Counts, for the node's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodStats {
    /// Messages this node sent.
    pub originated: u64,
    /// Copies passed on to other links.
    pub forwarded: u64,
    /// Messages delivered here.
    pub delivered: u64,
    /// Copies of messages already handled (or from ourselves), dropped.
    pub duplicates: u64,
    /// Messages given up: a gap not filled in time (see the module docs).
    pub skipped: u64,
}

#[derive(Debug)]
struct Origin {
    /// The next `seq` to deliver; everything below is handled.
    next: u64,
    /// Messages ahead of `next`, by `seq`.
    held: BTreeMap<u64, Relayed>,
    /// When the wait for `next` ends (`Some` exactly when `held` is not
    /// empty).
    give_up: Option<Instant>,
    last_heard: Instant,
}

impl Origin {
    /// Gives up the gap before the first held message: `next` moves to it.
    /// Returns how many messages were given up.
    fn give_up_gap(&mut self) -> u64 {
        let gap_end = *self
            .held
            .keys()
            .next()
            .expect("a gap is before a held message");
        let skipped = gap_end - self.next;
        self.next = gap_end;
        skipped
    }
}

/// One node's relay. See the module docs.
#[derive(Debug)]
pub struct Flood {
    me: NodeId,
    cfg: Config,
    next_seq: u64,
    origins: HashMap<NodeId, Origin>,
    /// How many origins hold messages (so that a node with none skips the
    /// scan for a deadline).
    holding: usize,
    /// Payload bytes held, all origins together.
    held_bytes: usize,
    transmits: VecDeque<(NodeId, Relayed)>,
    deliveries: VecDeque<Relayed>,
    stats: FloodStats,
}

impl Flood {
    /// The relay of node `me`.
    pub fn new(me: NodeId, cfg: Config) -> Flood {
        Flood {
            me,
            cfg,
            next_seq: 1,
            origins: HashMap::new(),
            holding: 0,
            held_bytes: 0,
            transmits: VecDeque::new(),
            deliveries: VecDeque::new(),
            stats: FloodStats::default(),
        }
    }

    /// Sends `msg` to every member (`to: None`) or to one, over the links to
    /// `linked`. Returns its `seq`. A broadcast is not delivered here.
    pub fn originate(&mut self, to: Option<NodeId>, msg: AppMessage, linked: &[NodeId]) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.originated += 1;
        let r = Relayed {
            origin: self.me,
            seq,
            to,
            ttl: self.cfg.ttl,
            topic: msg.topic,
            payload: msg.payload,
        };
        self.pass_on(r, None, linked);
        seq
    }

    /// A relayed message arrived over the link from `from`; `linked` are the
    /// peers this node has links to now.
    pub fn on_relayed(&mut self, now: Instant, from: NodeId, r: Relayed, linked: &[NodeId]) {
        // `seq` counts from 1, and never reaches the last value (a forged
        // one is dropped: there is no `next` after it).
        if r.origin == self.me || r.seq == 0 || r.seq == u64::MAX {
            self.stats.duplicates += 1;
            return;
        }
        if !self.origins.contains_key(&r.origin) {
            self.make_room(now);
        }
        let cfg = self.cfg;
        let o = self.origins.entry(r.origin).or_insert_with(|| Origin {
            // Heard first: a `seq` above 1 waits briefly for earlier ones.
            next: 1,
            held: BTreeMap::new(),
            give_up: (r.seq > 1).then_some(now + cfg.first_hold),
            last_heard: now,
        });
        o.last_heard = now;
        if r.seq < o.next || o.held.contains_key(&r.seq) {
            self.stats.duplicates += 1;
            return;
        }
        let seq = r.seq;
        let was_holding = !o.held.is_empty();
        // Passed on before it is delivered: order is the receivers' concern.
        self.pass_on(r.clone(), Some(from), linked);
        let o = self.origins.get_mut(&r.origin).expect("inserted above");
        self.held_bytes += size(&r);
        o.held.insert(seq, r);
        if o.held.len() > cfg.max_held {
            // Too much held: the gap is given up.
            self.stats.skipped = self.stats.skipped.saturating_add(o.give_up_gap());
        }
        self.stats.delivered += drain(
            o,
            now,
            &cfg,
            &mut self.deliveries,
            self.me,
            &mut self.held_bytes,
        );
        match (was_holding, o.held.is_empty()) {
            (false, false) => self.holding += 1,
            (true, true) => self.holding -= 1,
            _ => {}
        }
        if self.held_bytes > cfg.max_held_bytes {
            // Too much held in all: every wait ends now (each one ends
            // within `hold` of now anyway).
            self.on_tick(now + cfg.hold.max(cfg.first_hold));
        }
    }

    /// Gives up the gaps whose wait has ended.
    pub fn on_tick(&mut self, now: Instant) {
        if self.holding == 0 {
            return;
        }
        let cfg = self.cfg;
        for o in self.origins.values_mut() {
            let Some(t) = o.give_up else { continue };
            if t > now {
                continue;
            }
            self.stats.skipped = self.stats.skipped.saturating_add(o.give_up_gap());
            o.give_up = None;
            self.stats.delivered += drain(
                o,
                now,
                &cfg,
                &mut self.deliveries,
                self.me,
                &mut self.held_bytes,
            );
            if o.held.is_empty() {
                self.holding -= 1;
            }
        }
    }

    /// When [`Flood::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.holding == 0 {
            return None;
        }
        self.origins.values().filter_map(|o| o.give_up).min()
    }

    /// The next frame to send: `(peer, message)`.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Relayed)> {
        self.transmits.pop_front()
    }

    /// The next message this node delivers (origin's order).
    pub fn poll_delivery(&mut self) -> Option<Relayed> {
        self.deliveries.pop_front()
    }

    /// The counts so far.
    pub fn stats(&self) -> FloodStats {
        self.stats
    }

    fn pass_on(&mut self, r: Relayed, from: Option<NodeId>, linked: &[NodeId]) {
        let Some(ttl) = (match from {
            None => Some(r.ttl),
            Some(_) => r.ttl.checked_sub(1),
        }) else {
            return;
        };
        let mut to: Vec<NodeId> = linked
            .iter()
            .copied()
            .filter(|p| Some(*p) != from && *p != r.origin && *p != self.me)
            .collect();
        to.sort_unstable();
        to.dedup();
        if from.is_some() {
            self.stats.forwarded += to.len() as u64;
        }
        for peer in to {
            self.transmits
                .push_back((peer, Relayed { ttl, ..r.clone() }));
        }
    }

    /// Forgets the origin heard from longest ago with nothing held, when
    /// the memory is full.
    fn make_room(&mut self, now: Instant) {
        if self.origins.len() < self.cfg.max_origins {
            return;
        }
        if self.origins.values().all(|o| !o.held.is_empty()) {
            // Every origin holds something: give up every wait.
            self.on_tick(now + self.cfg.hold.max(self.cfg.first_hold));
        }
        let oldest = self
            .origins
            .iter()
            .filter(|(_, o)| o.held.is_empty())
            .min_by_key(|(_, o)| o.last_heard)
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.origins.remove(&id);
        }
    }
}

/// Delivers what is in order at the front of `o.held`, and restarts the
/// wait when that moved `next` and a gap remains; returns how many were
/// delivered here.
fn drain(
    o: &mut Origin,
    now: Instant,
    cfg: &Config,
    out: &mut VecDeque<Relayed>,
    me: NodeId,
    held_bytes: &mut usize,
) -> u64 {
    let start = o.next;
    let mut delivered = 0;
    while let Some(entry) = o.held.first_entry() {
        if *entry.key() != o.next {
            break;
        }
        let r = entry.remove();
        *held_bytes -= size(&r);
        o.next += 1;
        if r.to.is_none_or(|t| t == me) {
            delivered += 1;
            out.push_back(r);
        }
    }
    if o.held.is_empty() {
        o.give_up = None;
    } else if o.next != start || o.give_up.is_none() {
        o.give_up = Some(now + cfg.hold);
    }
    delivered
}

/// What a held message counts against [`Config::max_held_bytes`].
fn size(r: &Relayed) -> usize {
    r.payload.len() + r.topic.as_str().len()
}

#[cfg(test)]
mod tests;
