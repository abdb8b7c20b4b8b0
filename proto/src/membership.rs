//! The peer table: who is in the cluster, and in what state.
//!
//! [`PeerTable`] is a sans-IO state machine in the style of `quinn-proto`:
//! drivers call the `on_*` inputs with the `now` at which something happened
//! (a beacon arrived, a link came up or went down, a pong returned), then
//! drain [`PeerTable::poll_event`] (what changed, for the read-model, logs
//! and `watch`) and [`PeerTable::poll_action`] (what the transport should do:
//! dial). [`PeerTable::next_deadline`] says when [`PeerTable::on_tick`] must
//! be called next. It never reads a clock and never touches a socket.
//!
//! ## Lifecycle (the contract users see)
//! - `alive`: heard from recently on some channel (beacon, link traffic, pong).
//!   An alive peer whose link is down while its beacons still arrive is
//!   *degraded* (one bad path, not a dead node): it stays alive.
//! - `suspect`: silent on every channel for `suspect_after`, or its link was
//!   lost without a goodbye and neither a new link nor a beacon has shown it
//!   alive since. Any sign of life makes it alive again.
//! - `failed`: silent on every channel for `dead_after` (for a degraded peer,
//!   which only beacons keep alive, `beacon_dead_after`); or its link was
//!   lost and a redial was *refused* with no beacon since (the process is
//!   gone: strong evidence, acted on at once).
//! - `left`: the peer said goodbye (leave beacon or goodbye frame).
//! - Failed and left entries stay as tombstones for `tombstone_ttl`, then are
//!   reaped. A higher incarnation replaces an entry at once; a lower one is
//!   stale and ignored, so old information never resurrects a node. A fresh
//!   beacon of the *same* incarnation revives a failed entry (the node was
//!   unreachable, not dead), but never a left one (it said goodbye).
//!
//! ## Links
//! Exactly one link per pair is the transport's job; this table decides
//! *when to dial*: the node with the lower id dials as soon as it learns of a
//! peer; the higher one dials only if no link exists after `dial_fallback`
//! (one-way multicast, asymmetric filtering). Redials back off exponentially
//! with jitter while the peer is believed alive.
//!
//! ## Names and restarts
//! A node's id is random per process start and its incarnation grows with
//! every start; its *name* is what stays. The table keeps one entry per name:
//! a new id claiming a known name with a higher incarnation is a restart and
//! replaces the old entry at once (`Reaped` for the old id, `Restarted` for the
//! new one); the old id is remembered as *superseded*, so late information
//! about it is stale. If the superseded id keeps talking, two live processes
//! claim one name: the entry is flagged as a conflict (with the other
//! address) until the other one falls silent for `dead_after`. Nothing is
//! merged and nothing flaps.
//!
//! Invariant: one entry per id and per name; the local node never has an
//! entry.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::beacon::{Beacon, BeaconKind};
use crate::frame::Hello;
use crate::id::{tags_digest, Incarnation, NodeId, Tags};

/// Timing settings of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Silence on every channel after which a peer is suspect.
    pub suspect_after: Duration,
    /// Silence on every channel after which a peer is failed.
    pub dead_after: Duration,
    /// The same for a degraded peer (link down, beacons arriving), which only
    /// beacons keep alive: long enough that a lost beacon is no failure.
    pub beacon_dead_after: Duration,
    /// How long the higher-id node waits for the lower-id node to dial before
    /// dialing itself.
    pub dial_fallback: Duration,
    /// First redial delay.
    pub backoff_min: Duration,
    /// Largest redial delay.
    pub backoff_max: Duration,
    /// How long failed and left entries are kept before being reaped.
    pub tombstone_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            suspect_after: Duration::from_millis(600),
            dead_after: Duration::from_millis(1400),
            beacon_dead_after: Duration::from_secs(3),
            dial_fallback: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            tombstone_ttl: Duration::from_secs(600),
        }
    }
}

/// A peer's membership state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Heard from recently.
    Alive,
    /// Silent, or its link lost; not yet failed.
    Suspect,
    /// Confirmed unreachable or dead.
    Failed,
    /// Said goodbye.
    Left,
}

impl PeerState {
    /// The name used in the API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Alive => "alive",
            PeerState::Suspect => "suspect",
            PeerState::Failed => "failed",
            PeerState::Left => "left",
        }
    }
}

/// State of the TCP data link to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Handshake done, frames flowing.
    Up,
    /// A dial is in progress.
    Connecting,
    /// No link.
    Down,
}

impl LinkState {
    /// The name used in the API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Connecting => "connecting",
            LinkState::Down => "down",
        }
    }
}

/// Everything the table knows about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Peer id.
    pub id: NodeId,
    /// Peer name.
    pub name: String,
    /// Highest incarnation seen.
    pub incarnation: Incarnation,
    /// Data address to dial.
    pub addr: SocketAddr,
    /// Membership state.
    pub state: PeerState,
    /// Link state.
    pub link: LinkState,
    /// Last measured round-trip time on the link.
    pub rtt: Option<Duration>,
    /// Last sign of life on any channel.
    pub last_seen: Instant,
    /// Last beacon.
    pub last_beacon: Option<Instant>,
    /// When `state` last changed (or the entry was created).
    pub since: Instant,
    /// Metadata, from the handshake.
    pub tags: Tags,
    /// Digest of the metadata, from beacons.
    pub digest: u64,
    /// When the link was lost without a goodbye (cleared when a link is up).
    lost_at: Option<Instant>,
    /// When another node last heard from this peer directly, by its report.
    vouched_at: Option<Instant>,
    /// When to ask other nodes about this peer next (while it is degraded
    /// and only their reports keep it alive).
    next_probe: Option<Instant>,
    /// When to dial next (only while alive and not linked).
    next_dial: Option<Instant>,
    /// Consecutive failed dials.
    dial_attempts: u32,
    /// Another live process claims this peer's name (its address).
    pub conflict: Option<SocketAddr>,
}

impl Peer {
    /// Alive in the table's eyes (alive or suspect).
    pub fn is_live(&self) -> bool {
        matches!(self.state, PeerState::Alive | PeerState::Suspect)
    }

    /// Link down while beacons still arrive, or while other nodes report
    /// hearing from it (after the link was lost, or when no link ever came
    /// up): one bad path, not a dead node.
    pub fn degraded(&self) -> bool {
        if self.link == LinkState::Up || !self.is_live() {
            return false;
        }
        let since_loss = |t: Option<Instant>| match (self.lost_at, t) {
            (Some(lost), Some(t)) => t > lost,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        since_loss(self.last_beacon) || since_loss(self.vouched_at)
    }

    /// The freshest evidence of life: our own, or another node's report.
    fn last_evidence(&self) -> Instant {
        self.vouched_at
            .map_or(self.last_seen, |v| v.max(self.last_seen))
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A new peer (or a failed one heard from again).
    Joined,
    /// The peer restarted: a higher incarnation replaced the entry.
    Restarted,
    /// Name, address or metadata changed.
    Updated,
    /// The peer became suspect.
    Suspect,
    /// A suspect peer showed a sign of life.
    Recovered,
    /// The peer is failed.
    Failed,
    /// The peer left.
    Left,
    /// The data link came up.
    LinkUp,
    /// The data link went down.
    LinkDown,
    /// The tombstone was removed from the table.
    Reaped,
}

impl EventKind {
    /// The name used on the event stream.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Joined => "peer_joined",
            EventKind::Restarted => "peer_restarted",
            EventKind::Updated => "peer_updated",
            EventKind::Suspect => "peer_suspect",
            EventKind::Recovered => "peer_alive",
            EventKind::Failed => "peer_failed",
            EventKind::Left => "peer_left",
            EventKind::LinkUp => "link_up",
            EventKind::LinkDown => "link_down",
            EventKind::Reaped => "peer_reaped",
        }
    }
}

/// One change to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The peer.
    pub id: NodeId,
    /// What happened.
    pub kind: EventKind,
}

/// How often a suspect (or report-kept) peer is asked about.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long, and how often, a failed peer is still asked about.
const REVIVE_WINDOW: Duration = Duration::from_secs(30);
const REVIVE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// How soon a dial reset during its handshake is retried.
const RESET_RETRY: Duration = Duration::from_millis(10);

/// What the driver should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a link to `id` at `addr`; report the outcome with
    /// [`PeerTable::on_link_up`] or [`PeerTable::on_dial_failed`].
    Dial {
        /// Peer to dial.
        id: NodeId,
        /// Where.
        addr: SocketAddr,
    },
    /// Ask a few linked peers whether they hear `id` directly; feed their
    /// answers to [`PeerTable::on_vouch`].
    Probe {
        /// The peer in question.
        id: NodeId,
    },
}

/// How a dial ended without a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFailure {
    /// The peer's port actively refused: the process is gone.
    Refused,
    /// Timeout, unreachable, handshake failure: no conclusion.
    Other,
    /// The connection opened but was reset or closed before the handshake
    /// answered: typically a process that is dying (its listener still had
    /// the connection queued). Retried at once, so that the next attempt
    /// meets a refusal or a live node.
    Reset,
    /// The peer already has a link with us (the other dial won).
    Duplicate,
}

/// An id replaced by a newer incarnation of the same name.
#[derive(Debug, Clone)]
struct Superseded {
    name: String,
    addr: SocketAddr,
    last_heard: Instant,
}

/// How an input's (id, name, incarnation) relates to the table.
enum NameCheck {
    /// The id has an entry.
    Known,
    /// Neither id nor name is known.
    New,
    /// A restart: the id is new and replaces this older id of the same name.
    Replaces(NodeId),
    /// Stale or conflicting: ignore the input.
    Drop,
}

/// The sans-IO peer table. See the module docs.
#[derive(Debug)]
pub struct PeerTable {
    local: NodeId,
    cfg: Config,
    peers: HashMap<NodeId, Peer>,
    by_name: HashMap<String, NodeId>,
    superseded: HashMap<NodeId, Superseded>,
    events: VecDeque<Event>,
    actions: VecDeque<Action>,
    rng: StdRng,
}

impl PeerTable {
    /// An empty table for the node `local`. `seed` drives redial jitter
    /// (tests pass a constant; the daemon a random value).
    pub fn new(local: NodeId, cfg: Config, seed: u64) -> Self {
        PeerTable {
            local,
            cfg,
            peers: HashMap::new(),
            by_name: HashMap::new(),
            superseded: HashMap::new(),
            events: VecDeque::new(),
            actions: VecDeque::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// One peer.
    pub fn get(&self, id: &NodeId) -> Option<&Peer> {
        self.peers.get(id)
    }

    /// All peers, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// Number of entries, tombstones included.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Drains one pending event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Drains one pending action.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn emit(&mut self, id: NodeId, kind: EventKind) {
        self.events.push_back(Event { id, kind });
    }

    /// Relates an input from `id` (claiming `name` at `incarnation`) to the
    /// entries we have; see "Names and restarts" in the module docs.
    fn check_name(
        &mut self,
        now: Instant,
        id: NodeId,
        name: &str,
        incarnation: Incarnation,
        addr: SocketAddr,
    ) -> NameCheck {
        if let Some(sup) = self.superseded.get_mut(&id) {
            sup.last_heard = now;
            sup.addr = addr;
            let sup = sup.clone();
            self.flag_conflict(&sup.name, sup.addr);
            return NameCheck::Drop;
        }
        if self.peers.contains_key(&id) {
            return NameCheck::Known;
        }
        let Some(&holder) = self.by_name.get(name) else {
            return NameCheck::New;
        };
        let Some(old) = self.peers.get(&holder) else {
            return NameCheck::New; // index out of date; cannot happen, but harmless
        };
        if incarnation > old.incarnation {
            return NameCheck::Replaces(holder);
        }
        // An older (or equal) life of a name held by a newer id.
        self.superseded.insert(
            id,
            Superseded {
                name: name.to_string(),
                addr,
                last_heard: now,
            },
        );
        self.flag_conflict(name, addr);
        NameCheck::Drop
    }

    /// Marks the live holder of `name` as in conflict with `other`.
    fn flag_conflict(&mut self, name: &str, other: SocketAddr) {
        let Some(&id) = self.by_name.get(name) else {
            return;
        };
        if let Some(p) = self.peers.get_mut(&id) {
            if p.is_live() && p.conflict.is_none() {
                p.conflict = Some(other);
                self.events.push_back(Event {
                    id,
                    kind: EventKind::Updated,
                });
            }
        }
    }

    /// Removes `old` in favour of a newer incarnation of the same name.
    fn replace(&mut self, now: Instant, old: NodeId) {
        if let Some(p) = self.peers.remove(&old) {
            self.by_name.remove(&p.name);
            self.superseded.insert(
                old,
                Superseded {
                    name: p.name,
                    addr: p.addr,
                    // Silent since its last sign of life; if it was only
                    // restarting, it never speaks again.
                    last_heard: p.last_seen.min(now),
                },
            );
            self.emit(old, EventKind::Reaped);
        }
    }

    fn index_name(&mut self, id: NodeId, old_name: Option<&str>, new_name: &str) {
        if let Some(old) = old_name {
            if old != new_name && self.by_name.get(old) == Some(&id) {
                self.by_name.remove(old);
            }
        }
        self.by_name.insert(new_name.to_string(), id);
    }

    /// When the first dial to a newly known peer should happen.
    fn first_dial_at(&self, id: NodeId, now: Instant) -> Instant {
        if self.local < id {
            now
        } else {
            now + self.cfg.dial_fallback
        }
    }

    /// A beacon from another node of our cluster (the driver has already
    /// checked the cluster and dropped our own looped-back beacons).
    pub fn on_beacon(&mut self, now: Instant, b: &Beacon) {
        if b.id == self.local {
            return;
        }
        let check = self.check_name(now, b.id, &b.name, b.incarnation, b.addr);
        let replaced = match check {
            NameCheck::Drop => return,
            NameCheck::Replaces(old) if b.kind != BeaconKind::Leave => {
                self.replace(now, old);
                true
            }
            _ => false,
        };
        let first_dial = self.first_dial_at(b.id, now);
        let Some(p) = self.peers.get_mut(&b.id) else {
            if b.kind == BeaconKind::Leave {
                return; // never knew it (or a newer life holds its name)
            }
            self.peers.insert(
                b.id,
                Peer {
                    id: b.id,
                    name: b.name.clone(),
                    incarnation: b.incarnation,
                    addr: b.addr,
                    state: PeerState::Alive,
                    link: LinkState::Down,
                    rtt: None,
                    last_seen: now,
                    last_beacon: Some(now),
                    since: now,
                    tags: Tags::new(),
                    digest: b.digest,
                    lost_at: None,
                    vouched_at: None,
                    next_probe: None,
                    next_dial: Some(first_dial),
                    dial_attempts: 0,
                    conflict: None,
                },
            );
            self.index_name(b.id, None, &b.name);
            let kind = if replaced {
                EventKind::Restarted
            } else {
                EventKind::Joined
            };
            self.emit(b.id, kind);
            self.schedule(now);
            return;
        };
        if b.incarnation < p.incarnation {
            return; // stale: an earlier life of this node
        }
        let restarted = b.incarnation > p.incarnation;
        if !restarted && p.state == PeerState::Left {
            return; // it said goodbye; a late beacon does not bring it back
        }
        p.last_seen = now;
        p.last_beacon = Some(now);
        let mut kind = None;
        if restarted {
            p.incarnation = b.incarnation;
            p.tags.clear(); // the new life's tags arrive with its handshake
            kind = Some(EventKind::Restarted);
        }
        if b.kind == BeaconKind::Leave {
            p.state = PeerState::Left;
            p.since = now;
            p.next_dial = None;
            p.name.clone_from(&b.name);
            let id = p.id;
            self.emit(id, EventKind::Left);
            return;
        }
        let changed = p.name != b.name || p.addr != b.addr || p.digest != b.digest;
        let old_name = (p.name != b.name).then(|| std::mem::replace(&mut p.name, b.name.clone()));
        p.addr = b.addr;
        p.digest = b.digest;
        if p.state == PeerState::Suspect {
            p.state = PeerState::Alive;
            p.since = now;
            kind = kind.or(Some(EventKind::Recovered));
        } else if p.state != PeerState::Alive {
            p.state = PeerState::Alive;
            p.since = now;
            kind = kind.or(Some(EventKind::Joined));
        } else if changed {
            kind = kind.or(Some(EventKind::Updated));
        }
        if p.link == LinkState::Down && (restarted || p.next_dial.is_none()) {
            p.dial_attempts = 0;
            p.next_dial = Some(first_dial);
        }
        let id = p.id;
        if let Some(old) = old_name {
            self.index_name(id, Some(&old), &b.name);
        }
        if let Some(kind) = kind {
            self.emit(id, kind);
        }
        self.schedule(now);
    }

    /// A link to `hello.id` completed its handshake (either direction).
    pub fn on_link_up(&mut self, now: Instant, hello: &Hello) {
        if hello.id == self.local {
            return;
        }
        let mut events = Vec::with_capacity(2);
        match self.check_name(now, hello.id, &hello.name, hello.incarnation, hello.addr) {
            // A link from a superseded life: the transport closes it when the
            // process is really gone; the table ignores it.
            NameCheck::Drop => return,
            NameCheck::Replaces(old) => {
                self.replace(now, old);
                events.push(EventKind::Restarted);
            }
            NameCheck::New => events.push(EventKind::Joined),
            NameCheck::Known => {}
        }
        let digest = tags_digest(&hello.tags);
        let p = self.peers.entry(hello.id).or_insert_with(|| Peer {
            id: hello.id,
            name: hello.name.clone(),
            incarnation: hello.incarnation,
            addr: hello.addr,
            state: PeerState::Alive,
            link: LinkState::Down,
            rtt: None,
            last_seen: now,
            last_beacon: None,
            since: now,
            tags: hello.tags.clone(),
            digest,
            lost_at: None,
            vouched_at: None,
            next_probe: None,
            next_dial: None,
            dial_attempts: 0,
            conflict: None,
        });
        if hello.incarnation > p.incarnation {
            p.incarnation = hello.incarnation;
            events.push(EventKind::Restarted);
        }
        if p.state != PeerState::Alive {
            // A completed handshake is proof of life, whatever we believed.
            let was = p.state;
            p.state = PeerState::Alive;
            p.since = now;
            if !events.contains(&EventKind::Restarted) {
                events.push(if was == PeerState::Suspect {
                    EventKind::Recovered
                } else {
                    EventKind::Joined
                });
            }
        } else if events.is_empty()
            && (p.tags != hello.tags || p.name != hello.name || p.addr != hello.addr)
        {
            events.push(EventKind::Updated);
        }
        let old_name =
            (p.name != hello.name).then(|| std::mem::replace(&mut p.name, hello.name.clone()));
        p.addr = hello.addr;
        p.tags.clone_from(&hello.tags);
        p.digest = digest;
        p.last_seen = now;
        p.lost_at = None;
        p.next_probe = None;
        p.next_dial = None;
        p.dial_attempts = 0;
        let was_up = p.link == LinkState::Up;
        p.link = LinkState::Up;
        if !was_up {
            events.push(EventKind::LinkUp);
        }
        let id = hello.id;
        self.index_name(id, old_name.as_deref(), &hello.name);
        for kind in events {
            self.emit(id, kind);
        }
    }

    /// The link to `id` closed. `graceful` when a goodbye preceded it.
    pub fn on_link_down(&mut self, now: Instant, id: NodeId, graceful: bool) {
        let first_dial = self.first_dial_at(id, now);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.link != LinkState::Up {
            return;
        }
        p.link = LinkState::Down;
        p.rtt = None;
        let mut suspect = false;
        if p.is_live() && !graceful {
            // Is the process gone, or only this link? Redial now: a refusal
            // answers within a round trip; otherwise beacons and silence decide.
            p.lost_at = Some(now);
            p.next_dial = Some(now);
            p.dial_attempts = 0;
            if p.state == PeerState::Alive {
                p.state = PeerState::Suspect;
                p.since = now;
                suspect = true;
            }
            // Others may still hear it: ask them (only reports newer than
            // this loss count).
            p.next_probe = Some(now);
        } else if p.is_live() {
            p.next_dial = Some(first_dial);
        }
        self.emit(id, EventKind::LinkDown);
        if suspect {
            self.emit(id, EventKind::Suspect);
        }
        self.schedule(now);
    }

    /// A dial to `id` ended without a link.
    pub fn on_dial_failed(&mut self, now: Instant, id: NodeId, why: DialFailure) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.link != LinkState::Connecting {
            return; // a link came up meanwhile (the other side dialed)
        }
        p.link = LinkState::Down;
        if !p.is_live() {
            return;
        }
        let beacon_since_loss = match (p.lost_at, p.last_beacon) {
            (Some(lost), Some(beacon)) => beacon > lost,
            _ => false,
        };
        if why == DialFailure::Refused && p.lost_at.is_some() && !beacon_since_loss {
            // The link died and the port now refuses: the process is gone.
            p.state = PeerState::Failed;
            p.since = now;
            p.next_dial = None;
            self.emit(id, EventKind::Failed);
            return;
        }
        if why == DialFailure::Duplicate {
            // The other side's dial won; its link is on its way.
            p.next_dial = Some(now + self.cfg.dial_fallback);
            return;
        }
        if why == DialFailure::Reset && p.dial_attempts < 3 {
            p.dial_attempts += 1;
            p.next_dial = Some(now + RESET_RETRY);
            return;
        }
        p.dial_attempts = p.dial_attempts.saturating_add(1);
        let exp = self
            .cfg
            .backoff_min
            .saturating_mul(1u32 << p.dial_attempts.min(16))
            .min(self.cfg.backoff_max);
        let jitter = self.rng.gen_range(0.8..1.2);
        p.next_dial = Some(now + exp.mul_f64(jitter));
    }

    /// The peer said goodbye on its link.
    pub fn on_goodbye(&mut self, now: Instant, id: NodeId) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.state == PeerState::Left {
            return;
        }
        p.state = PeerState::Left;
        p.since = now;
        p.next_dial = None;
        p.lost_at = None;
        self.emit(id, EventKind::Left);
    }

    /// A pong measured `rtt` on the link to `id`.
    pub fn on_pong(&mut self, now: Instant, id: NodeId, rtt: Duration) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.rtt = Some(rtt);
        }
        self.on_traffic(now, id);
    }

    /// Any other frame arrived from `id`.
    pub fn on_traffic(&mut self, now: Instant, id: NodeId) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        // Reports of link traffic may arrive a little after the fact (they
        // are batched): never move `last_seen` back.
        p.last_seen = p.last_seen.max(now);
        if p.state == PeerState::Suspect && p.link == LinkState::Up {
            p.state = PeerState::Alive;
            p.since = now;
            self.emit(id, EventKind::Recovered);
        }
    }

    /// Another node reports hearing `id` (at `incarnation`) directly, `age`
    /// ago. Only fresh reports of the same incarnation count, and only when
    /// what they saw is newer than our own loss of its link and than our
    /// verdict: a report never outlives what its sender saw, so an
    /// out-of-date one never brings a peer back, while a fresh one shows that
    /// only our path to it is broken. A peer that left stays left.
    pub fn on_vouch(&mut self, now: Instant, id: NodeId, incarnation: Incarnation, age: Duration) {
        let cfg = self.cfg;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.state == PeerState::Left || incarnation != p.incarnation || age >= cfg.suspect_after {
            return;
        }
        let heard = now.checked_sub(age).unwrap_or(now);
        let stale = p.lost_at.is_some_and(|lost| heard <= lost)
            || p.vouched_at.is_some_and(|v| v >= heard)
            || (p.state == PeerState::Failed && heard <= p.since);
        if stale {
            return;
        }
        p.vouched_at = Some(heard);
        if p.state != PeerState::Alive && p.link != LinkState::Up {
            p.state = PeerState::Alive;
            p.since = now;
            p.next_probe = Some(now + PROBE_EVERY);
            self.emit(id, EventKind::Recovered);
        }
    }

    /// Advances timers: failures, due dials, probes, reaping.
    pub fn on_tick(&mut self, now: Instant) {
        let cfg = self.cfg;
        let mut reaped = Vec::new();
        let mut failed = Vec::new();
        let mut suspected = Vec::new();
        for p in self.peers.values_mut() {
            match p.state {
                PeerState::Alive | PeerState::Suspect => {
                    let silence = now.saturating_duration_since(p.last_evidence());
                    if silence >= Self::dead_after(&cfg, p) {
                        p.state = PeerState::Failed;
                        p.since = now;
                        p.next_dial = None;
                        // Keep asking a while: if others still hear it, only
                        // our path was broken (see `on_vouch`).
                        p.next_probe = Some(now + REVIVE_PROBE_EVERY);
                        failed.push(p.id);
                        continue;
                    } else if p.state == PeerState::Alive
                        && silence >= cfg.suspect_after
                        && !p.degraded()
                    {
                        p.state = PeerState::Suspect;
                        p.since = now;
                        p.next_probe = Some(now);
                        suspected.push(p.id);
                    }
                    let beacon_since_loss = match (p.lost_at, p.last_beacon) {
                        (Some(lost), Some(b)) => b > lost,
                        (None, Some(_)) => true,
                        (_, None) => false,
                    };
                    if !p.is_live() || p.link == LinkState::Up || beacon_since_loss {
                        p.next_probe = None; // its own beacons speak for it
                    } else if p.next_probe.is_some_and(|t| t <= now) {
                        p.next_probe = Some(now + PROBE_EVERY);
                        self.actions.push_back(Action::Probe { id: p.id });
                    }
                }
                PeerState::Failed | PeerState::Left => {
                    if now >= p.since + cfg.tombstone_ttl {
                        reaped.push(p.id);
                    } else if p.state == PeerState::Failed && now < p.since + REVIVE_WINDOW {
                        if p.next_probe.is_some_and(|t| t <= now) {
                            p.next_probe = Some(now + REVIVE_PROBE_EVERY);
                            if p.link != LinkState::Up {
                                self.actions.push_back(Action::Probe { id: p.id });
                            }
                        }
                    } else {
                        p.next_probe = None;
                    }
                }
            }
        }
        for id in suspected {
            self.emit(id, EventKind::Suspect);
        }
        for id in failed {
            self.emit(id, EventKind::Failed);
        }
        for id in reaped {
            if let Some(p) = self.peers.remove(&id) {
                if self.by_name.get(&p.name) == Some(&id) {
                    self.by_name.remove(&p.name);
                }
            }
            self.emit(id, EventKind::Reaped);
        }
        // A conflict ends when the other claimant has been silent for dead_after.
        let mut cleared = Vec::new();
        for p in self.peers.values_mut() {
            if p.conflict.is_none() {
                continue;
            }
            let other_alive = self.superseded.values().any(|s| {
                s.name == p.name && now.saturating_duration_since(s.last_heard) < cfg.dead_after
            });
            if !other_alive {
                p.conflict = None;
                cleared.push(p.id);
            }
        }
        for id in cleared {
            self.emit(id, EventKind::Updated);
        }
        self.superseded
            .retain(|_, s| now.saturating_duration_since(s.last_heard) < cfg.tombstone_ttl);
        self.schedule(now);
    }

    /// Turns due dials into actions.
    fn schedule(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            if !p.is_live() || p.link != LinkState::Down {
                continue;
            }
            if p.next_dial.is_some_and(|t| t <= now) {
                p.next_dial = None;
                p.link = LinkState::Connecting;
                self.actions.push_back(Action::Dial {
                    id: p.id,
                    addr: p.addr,
                });
            }
        }
    }

    /// When [`PeerTable::on_tick`] must next be called, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let cfg = &self.cfg;
        self.peers
            .values()
            .map(|p| match p.state {
                PeerState::Alive | PeerState::Suspect => {
                    let mut t = p.last_evidence() + Self::dead_after(cfg, p);
                    if p.state == PeerState::Alive && !p.degraded() {
                        t = t.min(p.last_evidence() + cfg.suspect_after);
                    }
                    if let Some(probe) = p.next_probe.filter(|_| p.link != LinkState::Up) {
                        t = t.min(probe);
                    }
                    match p.next_dial.filter(|_| p.link == LinkState::Down) {
                        Some(d) => t.min(d),
                        None => t,
                    }
                }
                PeerState::Failed | PeerState::Left => {
                    let reap = p.since + cfg.tombstone_ttl;
                    p.next_probe.map_or(reap, |t| t.min(reap))
                }
            })
            .chain(self.superseded.values().map(|s| {
                // Conflicts clear dead_after past the last word; memory after the TTL.
                let clears = s.last_heard + cfg.dead_after;
                if self
                    .peers
                    .values()
                    .any(|p| p.conflict.is_some() && p.name == s.name)
                {
                    clears
                } else {
                    s.last_heard + cfg.tombstone_ttl
                }
            }))
            .min()
    }

    /// The silence after which `p` is failed.
    fn dead_after(cfg: &Config, p: &Peer) -> Duration {
        if p.degraded() {
            cfg.beacon_dead_after.max(cfg.dead_after)
        } else {
            cfg.dead_after
        }
    }
}

#[cfg(test)]
mod tests;
