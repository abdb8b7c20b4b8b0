//! What the simulation measures, from the tables' own events and their
//! virtual timestamps: convergence, who saw which verdict when, false
//! verdicts, and the trace that two runs of one seed must share.
//!
//! - **Converged**: every live node's table lists every other live node
//!   (its current process) as confirmed, `alive`, link `up`. Kept
//!   incrementally: a matrix of "a sees b well", updated for the peer of
//!   every event (every change of state or link emits one).
//! - **One table**: the same with `alive` or `suspect` and any link
//!   state: nobody misses, or holds as failed or left, a live node.
//! - **Watches**: when each of a set of observers first emitted an event of
//!   a kind (`Failed`, `Left`, ...) about each of a set of subjects.
//! - **False verdicts**: a `Failed` (or `Suspect`) about a live process
//!   that was running and reachable from the judge for the whole window in
//!   which silence could have built up (`Settings::verdict_window`): no
//!   pause of the subject, no partition between the two. The judge's own
//!   pause excuses nothing: that is what the table's stall rule is for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use proto::membership::{Event, EventKind, LinkState, PeerState, PeerTable};
use proto::NodeId;
use serde::Serialize;

use crate::node::Node;

/// One false verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FalseVerdict {
    /// Virtual milliseconds since the start.
    pub at_ms: f64,
    /// The judge's slot.
    pub judge: u32,
    /// The subject's slot.
    pub subject: u32,
    /// `peer_failed` or `peer_suspect`.
    pub kind: &'static str,
}

/// One traced item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceItem {
    /// Virtual nanoseconds since the start.
    pub at_ns: u64,
    /// The slot whose table emitted it (or where an operation happened).
    pub slot: u32,
    /// The peer it is about.
    pub peer: u128,
    /// The event's name, or `op:...`.
    pub what: &'static str,
}

/// Handle of a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchId(usize);

#[derive(Debug)]
struct Watch {
    kind: EventKind,
    since: Instant,
    subjects: BTreeSet<NodeId>,
    observers: BTreeSet<NodeId>,
    seen: BTreeMap<(NodeId, NodeId), Instant>,
}

#[derive(Debug, Clone)]
struct Partition {
    from: Instant,
    until: Option<Instant>,
    groups: Vec<u32>,
}

/// The observer. See the module docs.
#[derive(Debug)]
pub struct Observer {
    n: usize,
    base: Instant,
    window: Duration,
    good: Vec<bool>,
    good_pairs: u64,
    listed: Vec<bool>,
    listed_pairs: u64,
    one_table: bool,
    table_flips: Vec<(Instant, bool)>,
    live: Vec<bool>,
    live_count: u64,
    ids: Vec<Option<NodeId>>,
    id_slot: HashMap<NodeId, u32>,
    converged: bool,
    flips: Vec<(Instant, bool)>,
    watches: Vec<Watch>,
    false_verdicts: Vec<FalseVerdict>,
    suspicions: u64,
    failures: u64,
    pauses: Vec<Vec<(Instant, Option<Instant>)>>,
    partitions: Vec<Partition>,
    trace: Option<Vec<TraceItem>>,
    hash: u64,
    traced: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Observer {
    pub(crate) fn new(n: usize, base: Instant, window: Duration, record: bool) -> Observer {
        Observer {
            n,
            base,
            window,
            good: vec![false; n * n],
            good_pairs: 0,
            listed: vec![false; n * n],
            listed_pairs: 0,
            one_table: false,
            table_flips: Vec::new(),
            live: vec![false; n],
            live_count: 0,
            ids: vec![None; n],
            id_slot: HashMap::new(),
            converged: false,
            flips: Vec::new(),
            watches: Vec::new(),
            false_verdicts: Vec::new(),
            suspicions: 0,
            failures: 0,
            pauses: vec![Vec::new(); n],
            partitions: Vec::new(),
            trace: record.then(Vec::new),
            hash: FNV_OFFSET,
            traced: 0,
        }
    }

    fn ms(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.base).as_secs_f64() * 1e3
    }

    pub(crate) fn trace(&mut self, at: Instant, slot: u32, peer: u128, what: &'static str) {
        let at_ns = at.saturating_duration_since(self.base).as_nanos() as u64;
        let mut h = self.hash;
        for chunk in [
            at_ns.to_le_bytes().as_slice(),
            slot.to_le_bytes().as_slice(),
            peer.to_le_bytes().as_slice(),
            what.as_bytes(),
        ] {
            for b in chunk {
                h ^= u64::from(*b);
                h = h.wrapping_mul(FNV_PRIME);
            }
        }
        self.hash = h;
        self.traced += 1;
        if let Some(t) = &mut self.trace {
            t.push(TraceItem {
                at_ns,
                slot,
                peer,
                what,
            });
        }
    }

    /// A hash of every traced item (events and operations, with their
    /// virtual times), in order.
    pub fn trace_hash(&self) -> u64 {
        self.hash
    }

    /// Items traced.
    pub fn traced(&self) -> u64 {
        self.traced
    }

    /// The recorded trace (when `SimConfig::record_trace`).
    pub fn recorded(&self) -> Option<&[TraceItem]> {
        self.trace.as_deref()
    }

    fn sees_well(table: &PeerTable, id: NodeId) -> bool {
        table.get(&id).is_some_and(|p| {
            p.confirmed() && p.state == PeerState::Alive && p.link == LinkState::Up
        })
    }

    fn lists(table: &PeerTable, id: NodeId) -> bool {
        table.get(&id).is_some_and(|p| p.confirmed() && p.is_live())
    }

    fn set_cell(&mut self, a: usize, b: usize, good: bool, listed: bool) {
        let i = a * self.n + b;
        if self.good[i] != good {
            self.good[i] = good;
            if good {
                self.good_pairs += 1;
            } else {
                self.good_pairs -= 1;
            }
        }
        if self.listed[i] != listed {
            self.listed[i] = listed;
            if listed {
                self.listed_pairs += 1;
            } else {
                self.listed_pairs -= 1;
            }
        }
    }

    fn update(&mut self, a: u32, b: u32, nodes: &[Option<Node>]) {
        let (ai, bi) = (a as usize, b as usize);
        let both = ai != bi && self.live[ai] && self.live[bi];
        let (good, listed) = match (&nodes[ai], self.ids[bi]) {
            (Some(node), Some(id)) if both => (
                Self::sees_well(&node.table, id),
                Self::lists(&node.table, id),
            ),
            _ => (false, false),
        };
        self.set_cell(ai, bi, good, listed);
    }

    fn check_converged(&mut self, now: Instant) {
        let l = self.live_count;
        let c = l > 0 && self.good_pairs == l * (l - 1);
        if c != self.converged {
            self.converged = c;
            self.flips.push((now, c));
        }
        let t = l > 0 && self.listed_pairs == l * (l - 1);
        if t != self.one_table {
            self.one_table = t;
            self.table_flips.push((now, t));
        }
    }

    /// Whether every live node lists every other live node (its current
    /// process) as a confirmed, live (`alive` or `suspect`) entry: one
    /// table, whatever the links are doing.
    pub fn one_table(&self) -> bool {
        self.one_table
    }

    /// Whether the cluster is converged now.
    pub fn converged(&self) -> bool {
        self.converged
    }

    /// The first instant at or after `t` at which the cluster became
    /// converged (or `t` itself if it already was).
    pub fn converged_since(&self, t: Instant) -> Option<Instant> {
        let at_t = self
            .flips
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .is_some_and(|(_, c)| *c);
        if at_t {
            return Some(t);
        }
        self.flips
            .iter()
            .find(|(at, c)| *at > t && *c)
            .map(|(at, _)| *at)
    }

    /// Pairs (a, b) of live processes where a does not see b well.
    pub fn missing_pairs(&self) -> u64 {
        let l = self.live_count;
        (l * l.saturating_sub(1)).saturating_sub(self.good_pairs)
    }

    /// Live processes.
    pub fn live(&self) -> u64 {
        self.live_count
    }

    /// Whether slot `s` runs a live process.
    pub fn is_live(&self, s: u32) -> bool {
        self.live.get(s as usize).copied().unwrap_or(false)
    }

    /// The current process id of slot `s`.
    pub fn id(&self, s: u32) -> Option<NodeId> {
        self.ids.get(s as usize).copied().flatten()
    }

    /// False verdicts so far.
    pub fn false_verdicts(&self) -> &[FalseVerdict] {
        &self.false_verdicts
    }

    /// False failures so far.
    pub fn false_failures(&self) -> usize {
        self.false_verdicts
            .iter()
            .filter(|v| v.kind == EventKind::Failed.as_str())
            .count()
    }

    /// False suspicions so far.
    pub fn false_suspicions(&self) -> usize {
        self.false_verdicts
            .iter()
            .filter(|v| v.kind == EventKind::Suspect.as_str())
            .count()
    }

    /// `Suspect` and `Failed` events so far, of any kind.
    pub fn verdicts(&self) -> (u64, u64) {
        (self.suspicions, self.failures)
    }

    pub(crate) fn on_start(&mut self, slot: u32, id: NodeId, now: Instant) {
        let s = slot as usize;
        self.ids[s] = Some(id);
        self.id_slot.insert(id, slot);
        if !self.live[s] {
            self.live[s] = true;
            self.live_count += 1;
        }
        self.check_converged(now);
    }

    pub(crate) fn on_stop(&mut self, slot: u32, now: Instant) {
        let s = slot as usize;
        for o in 0..self.n {
            self.set_cell(s, o, false, false);
            self.set_cell(o, s, false, false);
        }
        if let Some(id) = self.ids[s].take() {
            self.id_slot.remove(&id);
        }
        if self.live[s] {
            self.live[s] = false;
            self.live_count -= 1;
        }
        self.check_converged(now);
    }

    pub(crate) fn on_pause(&mut self, slot: u32, now: Instant) {
        self.pauses[slot as usize].push((now, None));
    }

    pub(crate) fn on_resume(&mut self, slot: u32, now: Instant) {
        if let Some(p) = self.pauses[slot as usize].last_mut() {
            p.1.get_or_insert(now);
        }
    }

    pub(crate) fn on_partition(&mut self, groups: Vec<u32>, now: Instant) {
        if let Some(p) = self.partitions.last_mut() {
            p.until.get_or_insert(now);
        }
        if groups.iter().any(|g| *g != groups[0]) {
            self.partitions.push(Partition {
                from: now,
                until: None,
                groups,
            });
        }
    }

    /// Starts watching for the first `kind` event about each subject at
    /// each observer.
    pub fn watch(
        &mut self,
        kind: EventKind,
        since: Instant,
        subjects: impl IntoIterator<Item = NodeId>,
        observers: impl IntoIterator<Item = NodeId>,
    ) -> WatchId {
        self.watches.push(Watch {
            kind,
            since,
            subjects: subjects.into_iter().collect(),
            observers: observers.into_iter().collect(),
            seen: BTreeMap::new(),
        });
        WatchId(self.watches.len() - 1)
    }

    /// How long after the watch started every observer that is still live
    /// had seen it about every subject; `None` while some have not.
    pub fn seen_by_all(&self, w: WatchId) -> Option<Duration> {
        let w = &self.watches[w.0];
        let mut last = w.since;
        for o in w.observers.iter().filter(|o| self.id_slot.contains_key(o)) {
            for s in &w.subjects {
                last = last.max(*w.seen.get(&(*o, *s))?);
            }
        }
        Some(last - w.since)
    }

    /// (pairs seen, pairs watched) of a watch, over live observers.
    pub fn seen_count(&self, w: WatchId) -> (usize, usize) {
        let w = &self.watches[w.0];
        let live: Vec<&NodeId> = w
            .observers
            .iter()
            .filter(|o| self.id_slot.contains_key(o))
            .collect();
        let seen = w.seen.keys().filter(|(o, _)| live.contains(&o)).count();
        (seen, live.len() * w.subjects.len())
    }

    fn excused(&self, judge: u32, subject: u32, now: Instant) -> bool {
        let from = now.checked_sub(self.window).unwrap_or(self.base);
        let overlaps = |s: Instant, e: Option<Instant>| s <= now && e.is_none_or(|e| e >= from);
        let paused = self.pauses[subject as usize]
            .iter()
            .any(|(s, e)| overlaps(*s, *e));
        let parted = self.partitions.iter().any(|p| {
            overlaps(p.from, p.until) && p.groups[judge as usize] != p.groups[subject as usize]
        });
        paused || parted
    }

    pub(crate) fn on_events(
        &mut self,
        now: Instant,
        events: &[(u32, Event)],
        nodes: &[Option<Node>],
    ) {
        for &(slot, ev) in events {
            self.trace(now, slot, ev.id.0, ev.kind.as_str());
            let subject = self.id_slot.get(&ev.id).copied();
            match ev.kind {
                EventKind::Failed | EventKind::Suspect => {
                    if ev.kind == EventKind::Failed {
                        self.failures += 1;
                    } else {
                        self.suspicions += 1;
                    }
                    if let Some(b) = subject {
                        if !self.excused(slot, b, now) {
                            self.false_verdicts.push(FalseVerdict {
                                at_ms: self.ms(now),
                                judge: slot,
                                subject: b,
                                kind: ev.kind.as_str(),
                            });
                        }
                    }
                }
                _ => {}
            }
            if let Some(observer) = self.ids[slot as usize] {
                for w in &mut self.watches {
                    if w.kind == ev.kind
                        && w.subjects.contains(&ev.id)
                        && w.observers.contains(&observer)
                    {
                        w.seen.entry((observer, ev.id)).or_insert(now);
                    }
                }
            }
            if let Some(b) = subject {
                self.update(slot, b, nodes);
            }
        }
        self.check_converged(now);
    }
}
