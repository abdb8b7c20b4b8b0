//! The peer table: who is in the cluster, and in what state.
//!
//! [`PeerTable`] is a sans-IO state machine in the style of `quinn-proto`:
//! drivers call the `on_*` inputs with the `now` at which something happened
//! (a beacon arrived, a link came up or went down, a pong returned, a peer
//! list arrived), then drain [`PeerTable::poll_event`] (what changed, for the
//! read-model, logs and `watch`) and [`PeerTable::poll_action`] (what the
//! transport should do: dial, or send a probe or a report).
//! [`PeerTable::next_deadline`] says when [`PeerTable::on_tick`] must be
//! called next. It never reads a clock and never touches a socket.
//!
//! ## Confirmed and pending entries
//! A beacon is a claim, not proof: anyone on the LAN can send one, and a
//! sealed beacon can be replayed to a node that has not heard its sender
//! before. So a node first heard by beacon is *pending*: the table dials it,
//! but emits nothing about it, lets it name nobody and replace nobody, and
//! drops it silently if it falls silent. It becomes *confirmed* when a link
//! with it completes its handshake (a fresh, two-way exchange: with a secret,
//! a Noise handshake that a replay cannot complete). Only confirmed entries
//! appear in events and so in the read-model, the API and health counts.
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
//!   gone: strong evidence, acted on at once). Only a link brings a failed
//!   peer back (a beacon makes the table dial it at once), or another node's
//!   report of what it heard *on a link* (see [`PeerTable::on_vouch`]).
//! - `left`: the peer said goodbye (leave beacon or goodbye frame).
//! - Failed and left entries stay as tombstones for `tombstone_ttl`, then are
//!   reaped. A lower incarnation is stale and ignored, so old information
//!   never resurrects a node.
//!
//! ## Our own lateness
//! If an input arrives well past the deadline this table asked to be woken
//! at (the process was stopped, the VM paused, the CPU starved), the silence
//! it measures is ours, not the peers'. The table then holds every
//! silence-based verdict (suspect, failed, and suspect on a lost link) for
//! `suspect_after`, so that the links and beacons waiting in socket buffers
//! can speak first (Lifeguard's "local health awareness", reduced to its
//! core). Crash evidence (a refused redial) still counts at once.
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
//! every start; its *name* is what stays, and a name is fixed for the life
//! of an id. When a new id confirms a name that a confirmed entry holds:
//! - if the holder is no longer heard directly (its link is down and no
//!   beacon came since it was lost, or it is failed or left), the new id is
//!   a restart and replaces the entry at once (`Reaped` for the old id,
//!   `Restarted` for the new one);
//! - if the holder is still heard directly (its link is up, or its beacons
//!   arrive), two live processes claim one name: both stay listed, each
//!   flagged as a conflict with the other's address. Nothing is replaced and
//!   nothing is merged. When either stops (failed or left), it is removed and
//!   the survivor, whichever it is, is a normal entry again.
//!
//! A live node is therefore never removed or replaced while it is heard
//! directly, whatever incarnation another claimant shows.
//!
//! Invariant: one entry per id; one confirmed entry per name, or two while
//! they are in conflict; the local node never has an entry.
//!
//! ## Bounded overlay
//! With [`Config::overlay`] set, the node links only to the neighbours its
//! driver names ([`PeerTable::set_neighbours`]) and membership travels over
//! the overlay: a record relayed by a confirmed, linked member confirms, each
//! change is relayed once per link, a failure on silence takes two
//! observers' alerts, and a node reported failed refutes. The rules, and why
//! hearsay from a member may be trusted, are in `membership/overlay.rs`.
//! Without it, every rule above holds unchanged.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::beacon::{Beacon, BeaconKind};
use crate::frame::{Hello, PeerList, PeerRecord};
use crate::id::{tags_digest, Incarnation, NodeId, Tags};

mod due;
mod names;
mod overlay;
pub use overlay::MUTUAL_DIAL_WAIT;

/// The entries, by id.
type Peers = HashMap<NodeId, Box<Peer>>;

/// Beacon intervals of silence that still mean nothing for a peer whose
/// beacons are paced (one lost beacon and a late one), as discovery judges
/// its sources.
pub const BEACON_INTERVALS: u32 = 3;

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
    /// Bounded overlay: `Some(max_links)` when this node links to a bounded
    /// set of neighbours (named by the driver, [`PeerTable::set_neighbours`])
    /// and membership travels over the overlay (see "Bounded overlay" in the
    /// module docs). `None` (the default): a full mesh, every rule as
    /// before.
    pub overlay: Option<usize>,
    /// Overlay mode: how long relayed news waits to be batched with more
    /// (one `peers` frame per link per batch). Zero sends at once; a few
    /// milliseconds bound the frames per node during a cold start's flood
    /// of joins, whatever N, at that much latency per hop.
    pub relay_batch: Duration,
    /// Largest `peers` frame body this table asks for, in bytes (by an
    /// upper bound of each record's size, [`record_bound`]): a longer list
    /// (a whole view, a large relay batch) goes as several frames. The
    /// daemon sets it under its `--max-frame`, which drops a larger frame.
    pub max_list_bytes: usize,
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
            overlay: None,
            relay_batch: Duration::ZERO,
            max_list_bytes: 256 << 10,
        }
    }
}

/// An upper bound of the bytes `r` takes in a `peers` frame body: its
/// fields' names and fixed-size values, the name, the address as text, and
/// the tags.
pub fn record_bound(r: &PeerRecord) -> usize {
    // Field names (about 60 bytes), id and `by` (18 each), incarnation,
    // age and version (9 each), state, the address as text (at most 62
    // bytes for an IPv6 address with a scope and a port), map headers.
    const FIXED: usize = 256;
    const PER_TAG: usize = 10;
    let tags: usize = r
        .tags
        .iter()
        .map(|(k, v)| k.len() + v.len() + PER_TAG)
        .sum();
    FIXED + r.name.len() + r.state.len() + tags
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
    /// The interval its beacons come at, when it said it is longer than
    /// ours (beacons are paced by group size): the silences judged on
    /// beacons alone stretch to [`BEACON_INTERVALS`] of it.
    pub beacon_interval: Option<Duration>,
    /// Last frame on a link: the evidence this node obtained itself, over a
    /// handshaken connection (what probe answers rest on).
    pub last_link: Option<Instant>,
    /// When `state` last changed (or the entry was created).
    pub since: Instant,
    /// Metadata, from the handshake, or from a membership record with a
    /// higher [`PeerRecord::tags_version`] (a change made at runtime).
    pub tags: Tags,
    /// Version of `tags` within this incarnation (0: the handshake's).
    pub tags_version: u64,
    /// Digest of the metadata, from beacons.
    pub digest: u64,
    /// When the link was lost without a goodbye (cleared when a link is up).
    lost_at: Option<Instant>,
    /// When another node last heard from this peer directly, by its report.
    vouched_at: Option<Instant>,
    /// When to ask other nodes about this peer next (while it is degraded
    /// and only their reports keep it alive).
    next_probe: Option<Instant>,
    /// When to dial next.
    next_dial: Option<Instant>,
    /// Consecutive failed dials.
    dial_attempts: u32,
    /// A link with it has completed a handshake (see "Confirmed and pending
    /// entries" in the module docs).
    confirmed: bool,
    /// Another live process claims this peer's name (its address).
    pub conflict: Option<SocketAddr>,
    /// The table runs in overlay mode (copied from the configuration, so
    /// that the entry's deadlines stay a function of the entry).
    overlay: bool,
    /// Overlay mode: the driver named it a neighbour (a link is wanted).
    wanted: bool,
    /// Overlay mode: this node's own silence verdict about the current
    /// incarnation has been sent as an alert.
    alerted: bool,
    /// Overlay mode: the observers whose silence alerts about the current
    /// incarnation arrived (this node included once it alerted), each once.
    alerts: Vec<NodeId>,
}

impl Peer {
    fn new(
        id: NodeId,
        name: &str,
        incarnation: Incarnation,
        addr: SocketAddr,
        now: Instant,
    ) -> Peer {
        Peer {
            id,
            name: name.to_string(),
            incarnation,
            addr,
            state: PeerState::Alive,
            link: LinkState::Down,
            rtt: None,
            last_seen: now,
            last_beacon: None,
            beacon_interval: None,
            last_link: None,
            since: now,
            tags: Tags::new(),
            tags_version: 0,
            digest: 0,
            lost_at: None,
            vouched_at: None,
            next_probe: None,
            next_dial: None,
            dial_attempts: 0,
            confirmed: false,
            conflict: None,
            overlay: false,
            wanted: false,
            alerted: false,
            alerts: Vec::new(),
        }
    }

    /// Alive in the table's eyes (alive or suspect).
    pub fn is_live(&self) -> bool {
        matches!(self.state, PeerState::Alive | PeerState::Suspect)
    }

    /// A link with it has completed a handshake: it is listed and counted.
    pub fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// Overlay mode: a confirmed member this node has no link with and
    /// does not watch itself (not a neighbour, no link lost without a
    /// goodbye): known through the overlay only. It has no silence deadline,
    /// no probes and no dials; it stays as it is until the overlay brings a
    /// verdict (`failed`, `left`) or a newer incarnation. Its `link` is
    /// `down` and its `rtt` absent by design, not by fault.
    pub fn remote(&self) -> bool {
        self.overlay
            && self.confirmed
            && !self.wanted
            && self.link == LinkState::Down
            && self.lost_at.is_none()
    }

    /// Whether this node judges it on silence (and probes for it): always in
    /// a full mesh, and for pending entries (forgotten when silent); in
    /// overlay mode only while its link is up, after the link was lost
    /// without a goodbye, or while it is a neighbour that a dial failed to
    /// reach. A neighbour whose first link is still being made is not
    /// judged: its silence so far says nothing about it. One that cannot
    /// be reached is: otherwise a member that went silent before its other
    /// neighbours linked to it would have a single observer, and a single
    /// alert never fails a member.
    fn judged(&self) -> bool {
        !self.overlay
            || !self.confirmed
            || self.link == LinkState::Up
            || self.lost_at.is_some()
            || (self.wanted && self.dial_attempts > 0)
    }

    /// Whether the table may dial it: always in a full mesh; in overlay
    /// mode only a neighbour, a peer whose link was lost without a goodbye
    /// (a refused redial is how a crash is seen), or a member held failed
    /// whose beacon came after the verdict (a recheck: see
    /// [`PeerTable::on_beacon`]).
    fn may_dial(&self) -> bool {
        !self.overlay || self.wanted || self.lost_at.is_some() || self.beacon_after_verdict()
    }

    /// Failed here, and a beacon heard since the verdict.
    fn beacon_after_verdict(&self) -> bool {
        self.state == PeerState::Failed && self.last_beacon.is_some_and(|b| b > self.since)
    }

    /// Link down while beacons still arrive, or while other nodes report
    /// hearing from it (after the link was lost, or when no link ever came
    /// up): one bad path, not a dead node. Never for a [`Peer::remote`]
    /// member, which is not expected to have a link.
    pub fn degraded(&self) -> bool {
        if self.link == LinkState::Up || !self.is_live() || !self.judged() {
            return false;
        }
        self.since_loss(self.last_beacon) || self.since_loss(self.vouched_at)
    }

    /// True when `t` happened after the link was lost (or there was no loss).
    fn since_loss(&self, t: Option<Instant>) -> bool {
        match (self.lost_at, t) {
            (Some(lost), Some(t)) => t > lost,
            (None, Some(_)) => true,
            (_, None) => false,
        }
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
    /// Address, metadata or conflict flag changed.
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
    /// The entry was removed from the table.
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

/// How many linked peers are asked about a suspect peer.
pub const PROBE_FANOUT: usize = 3;

/// How long, and how often, a failed peer is still asked about.
const REVIVE_WINDOW: Duration = Duration::from_secs(30);
const REVIVE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Most pending entries at once; beacons and reports of new ids beyond it
/// are refused (and counted) until some are confirmed or forgotten.
pub const MAX_PENDING: usize = 4096;

/// A pending entry heard this long without a link is worth a warning.
pub const UNLINKED_AFTER: Duration = Duration::from_secs(5);
/// Most names [`PeerTable::unlinked`] lists.
pub const UNLINKED_SHOWN: usize = 8;

/// Overlay mode: a member held failed here whose beacon arrives after the
/// verdict is dialed once, at a random point of this window after the
/// beacon (see [`PeerTable::on_beacon`]).
pub const RECHECK_SPREAD: Duration = Duration::from_secs(2);

/// How soon a dial reset during its handshake is retried.
const RESET_RETRY: Duration = Duration::from_millis(10);

/// The `state` of a [`PeerRecord`] that asks "do you hear this peer on a
/// link yourself?".
pub const RECORD_PROBE: &str = "probe";
/// The `state` of a [`PeerRecord`] that answers a probe: "I heard it on my
/// link `age_ms` ago".
pub const RECORD_ALIVE: &str = "alive";

/// What the driver should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a link to `id` at `addr`; report the outcome with
    /// [`PeerTable::on_link_up`] or [`PeerTable::on_dial_failed`].
    Dial {
        /// Peer to dial.
        id: NodeId,
        /// Where.
        addr: SocketAddr,
    },
    /// Send `list` to the linked peer `to`, best effort (a probe about a
    /// peer we lost, or our answer to one). Answers come back through
    /// [`PeerTable::on_peer_list`].
    Send {
        /// A linked peer.
        to: NodeId,
        /// The records.
        list: PeerList,
    },
}

/// Why [`PeerTable::force_leave`] refused; the table is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForceLeaveError {
    /// No such entry.
    #[error("no such peer")]
    Unknown,
    /// The peer is alive or suspect here.
    #[error("the peer is {} here; only a failed peer can be removed", .0.as_str())]
    Alive(PeerState),
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

/// The sans-IO peer table. See the module docs.
#[derive(Debug)]
pub struct PeerTable {
    local: NodeId,
    cfg: Config,
    /// Boxed: the map's buckets are sized for a power of two of entries,
    /// often half empty, and an empty bucket then costs a pointer rather
    /// than a whole entry (several hundred bytes, N of them per node).
    peers: Peers,
    /// Confirmed name -> the entry that holds it (the first claimant while
    /// two are in conflict).
    by_name: names::Names,
    /// Confirmed entries in a conflict: live claimants of a name that
    /// another live entry also claims.
    rivals: HashSet<NodeId>,
    /// How many entries are pending (not confirmed).
    pending: usize,
    /// The ids whose link is up, in order: what relays, probes and news go
    /// over, without a scan of every entry (a handful of N).
    linked: BTreeSet<NodeId>,
    /// The deadline last handed to the driver by `next_deadline`, until the
    /// tick it asked for.
    armed: Cell<Option<Instant>>,
    /// When each entry next needs attention, ordered (see `due.rs`). In a
    /// `RefCell` because `next_deadline` (`&self`) refreshes it first.
    due: RefCell<due::Due>,
    /// While set, silence-based verdicts wait (we were late ourselves).
    grace_until: Option<Instant>,
    /// How often our own lateness was noticed.
    stalls: u64,
    /// New ids refused because [`MAX_PENDING`] entries were pending.
    refused_pending: u64,
    /// Pending entries ever created.
    admitted: u64,
    /// Names of pending entries that have been heard for a while but never
    /// linked (refreshed by every tick).
    unlinked: Vec<String>,
    events: VecDeque<Event>,
    actions: VecDeque<Action>,
    rng: StdRng,
    /// Overlay mode: the neighbours the driver named last.
    wanted: HashSet<NodeId>,
    /// Overlay mode: this node's own record (from [`PeerTable::set_local`]);
    /// a refutation raises its incarnation.
    local_record: Option<PeerRecord>,
    /// Overlay mode: records to relay, each with the peer it came from
    /// (which is not sent it back); batched per link when actions are
    /// polled.
    outbox: Vec<(Option<NodeId>, PeerRecord)>,
    /// Overlay mode: how often this node refuted a report of its failure.
    refutations: u64,
    /// Overlay mode: the overlay is bounded (more members than a full mesh
    /// of `max_links` holds), so a verdict on silence takes two observers'
    /// alerts. True until the driver says otherwise
    /// ([`PeerTable::set_full_mesh`]): without one, the cautious rule.
    bounded: bool,
    /// Overlay mode: the latest `now` of any input, and when the queued
    /// relays are due (see [`Config::relay_batch`]).
    clock: Option<Instant>,
    relay_due: Option<Instant>,
}

impl PeerTable {
    /// An empty table for the node `local`. `seed` drives redial jitter and
    /// the choice of probe helpers (tests pass a constant; the daemon a
    /// random value).
    pub fn new(local: NodeId, cfg: Config, seed: u64) -> Self {
        PeerTable {
            local,
            cfg,
            peers: HashMap::new(),
            by_name: names::Names::default(),
            rivals: HashSet::new(),
            pending: 0,
            linked: BTreeSet::new(),
            armed: Cell::new(None),
            due: RefCell::default(),
            grace_until: None,
            stalls: 0,
            refused_pending: 0,
            admitted: 0,
            unlinked: Vec::new(),
            events: VecDeque::new(),
            actions: VecDeque::new(),
            rng: StdRng::seed_from_u64(seed),
            wanted: HashSet::new(),
            local_record: None,
            outbox: Vec::new(),
            refutations: 0,
            bounded: true,
            clock: None,
            relay_due: None,
        }
    }

    /// A new entry, with the table's overlay flags.
    fn new_peer(
        &self,
        id: NodeId,
        name: &str,
        incarnation: Incarnation,
        addr: SocketAddr,
        now: Instant,
    ) -> Box<Peer> {
        let mut p = Box::new(Peer::new(id, name, incarnation, addr, now));
        p.overlay = self.cfg.overlay.is_some();
        p.wanted = self.wanted.contains(&id);
        p
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// One peer (confirmed or pending).
    pub fn get(&self, id: &NodeId) -> Option<&Peer> {
        self.peers.get(id).map(|p| &**p)
    }

    /// All peers, pending ones included, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values().map(|p| &**p)
    }

    /// Number of entries, tombstones and pending entries included.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Entries heard only by beacon so far (no link has confirmed them).
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// How many times an input arrived so late that the table held its
    /// silence-based verdicts (see "Our own lateness").
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// New ids (from beacons or reports) refused because [`MAX_PENDING`]
    /// entries were already pending.
    pub fn refused_pending(&self) -> u64 {
        self.refused_pending
    }

    /// Names of (at most [`UNLINKED_SHOWN`]) pending entries heard for
    /// longer than [`UNLINKED_AFTER`] that no link has confirmed: usually a
    /// firewall on the data port. As of the last tick, sorted.
    pub fn unlinked(&self) -> &[String] {
        &self.unlinked
    }

    /// Pending entries ever created (new ids heard by beacon or report).
    pub fn admitted(&self) -> u64 {
        self.admitted
    }

    /// Room for one more pending entry? Counts a refusal when there is none,
    /// an admission when there is.
    fn admit_pending(&mut self) -> bool {
        if self.pending >= MAX_PENDING {
            self.refused_pending += 1;
            return false;
        }
        self.admitted += 1;
        true
    }

    /// Drains one pending event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Drains one pending action.
    pub fn poll_action(&mut self) -> Option<Action> {
        let due = match (self.relay_due, self.clock) {
            (Some(d), Some(c)) => d <= c,
            _ => true,
        };
        if !self.outbox.is_empty() && due {
            self.relay_due = None;
            self.flush_relays();
        }
        self.actions.pop_front()
    }

    /// Queues an event about `id`, if it is confirmed: nothing about a
    /// pending entry reaches the outside.
    fn emit(&mut self, id: NodeId, kind: EventKind) {
        if self.peers.get(&id).is_some_and(|p| p.confirmed) {
            self.events.push_back(Event { id, kind });
        }
    }

    /// Marks `id` for the deadline index: every input calls it for each
    /// entry it may change, before changing it.
    fn touch(&mut self, id: NodeId) {
        self.due.get_mut().touch(id);
    }

    /// Notices our own lateness: an input past the deadline we asked for.
    fn note_input(&mut self, now: Instant) {
        self.clock = Some(self.clock.map_or(now, |c| c.max(now)));
        let Some(armed) = self.armed.get() else {
            return;
        };
        let slack = self.cfg.suspect_after / 2;
        if now > armed + slack {
            self.armed.set(None);
            self.stalls += 1;
            self.grace_until = Some(now + self.cfg.suspect_after);
        }
    }

    /// True while silence-based verdicts are held.
    fn in_grace(&self, now: Instant) -> bool {
        self.grace_until.is_some_and(|g| now < g)
    }

    /// Still heard directly: its link is up, or its beacons arrive and none
    /// of its links was lost since. A peer heard directly is never replaced.
    fn heard_directly(&self, p: &Peer, now: Instant) -> bool {
        if !p.confirmed || !p.is_live() {
            return false;
        }
        p.link == LinkState::Up
            || p.last_beacon.is_some_and(|b| {
                p.since_loss(Some(b))
                    && now.saturating_duration_since(b) < Self::beacon_allowance(&self.cfg, p)
            })
    }

    /// Removes `id` from the table. A confirmed entry is reported `Reaped`.
    /// If it was in a conflict, the other claimants of its name carry on: a
    /// lone survivor is a normal entry again and holds the name.
    fn remove(&mut self, id: NodeId) {
        self.touch(id);
        let Some(p) = self.peers.get(&id) else {
            return;
        };
        if p.confirmed {
            self.events.push_back(Event {
                id,
                kind: EventKind::Reaped,
            });
        }
        let Some(p) = self.peers.remove(&id) else {
            return;
        };
        self.linked.remove(&id);
        if !p.confirmed {
            self.pending -= 1;
        }
        self.by_name.remove_holder(&p.name, id);
        if !self.rivals.remove(&id) {
            return;
        }
        let mut others: Vec<NodeId> = self
            .rivals
            .iter()
            .filter(|r| self.peers.get(r).is_some_and(|o| o.name == p.name))
            .copied()
            .collect();
        others.sort_unstable();
        let Some(&first) = others.first() else {
            return;
        };
        self.by_name.insert_if_absent(&self.peers, &p.name, first);
        if let [survivor] = others[..] {
            self.rivals.remove(&survivor);
            if let Some(s) = self.peers.get_mut(&survivor) {
                s.conflict = None;
            }
            self.by_name.insert(&self.peers, &p.name, survivor);
            self.emit(survivor, EventKind::Updated);
            return;
        }
        // Three or more claimants: whoever pointed at the removed one now
        // points at another.
        let addrs: Vec<(NodeId, SocketAddr)> = others
            .iter()
            .filter_map(|o| self.peers.get(o).map(|p| (*o, p.addr)))
            .collect();
        for &(o, _) in &addrs {
            let other = addrs.iter().find(|(x, _)| *x != o).map(|(_, a)| *a);
            if let Some(q) = self.peers.get_mut(&o) {
                if q.conflict == Some(p.addr) {
                    q.conflict = other;
                }
            }
        }
    }

    /// Ends conflicts whose one side stopped: it is removed, the other is a
    /// normal entry again.
    fn settle(&mut self) {
        if self.rivals.is_empty() {
            return;
        }
        let stopped: Vec<NodeId> = self
            .rivals
            .iter()
            .filter(|id| self.peers.get(id).is_none_or(|p| !p.is_live()))
            .copied()
            .collect();
        for id in stopped {
            self.remove(id);
        }
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
    /// checked the cluster, the sender's address and the incarnation's
    /// plausibility, and dropped our own looped-back beacons).
    pub fn on_beacon(&mut self, now: Instant, b: &Beacon) {
        if b.id == self.local {
            return;
        }
        self.touch(b.id);
        self.note_input(now);
        let first_dial = self.first_dial_at(b.id, now);
        let Some(p) = self.peers.get_mut(&b.id) else {
            if b.kind == BeaconKind::Leave || !self.admit_pending() {
                return; // never knew it, or no room
            }
            let mut p = self.new_peer(b.id, &b.name, b.incarnation, b.addr, now);
            p.last_beacon = Some(now);
            p.digest = b.digest;
            p.next_dial = Some(first_dial);
            self.peers.insert(b.id, p);
            self.pending += 1;
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
        if !p.confirmed {
            // Pending: bookkeeping only, nothing is said about it.
            if b.kind == BeaconKind::Leave {
                let id = p.id;
                self.remove(id);
                return;
            }
            p.name.clone_from(&b.name);
            p.incarnation = b.incarnation;
            p.addr = b.addr;
            p.digest = b.digest;
            p.last_seen = now;
            p.last_beacon = Some(now);
            if p.link == LinkState::Down && p.next_dial.is_none() {
                p.next_dial = Some(first_dial);
            }
            self.schedule(now);
            return;
        }
        p.last_beacon = Some(now);
        if restarted && p.overlay {
            // Overlay mode: a newer life is learnt over links and the
            // overlay, where each change is relayed once; a beacon is a
            // claim and changes no incarnation. A neighbour is dialed.
            if p.link == LinkState::Down {
                p.next_dial = Some(now);
                p.dial_attempts = 0;
            }
            self.schedule(now);
            return;
        }
        if p.state == PeerState::Failed || p.state == PeerState::Left {
            // A beacon alone never revives a failed peer (nor a left one,
            // under a new incarnation): it may be replayed or forged. A link
            // will, if the peer is there: dial it now.
            //
            // Overlay mode, a member this node does not link to: it may be
            // alive without knowing of the verdict (the word that would make
            // it refute was lost, or stayed on this side of a healed
            // partition), and then nothing else would ever correct this
            // table. The link's handshake makes it refute (`on_link_up`),
            // and the refutation reaches every node over the overlay. The
            // dial waits a random part of `RECHECK_SPREAD`: a beacon reaches
            // every node at once, and of the many that may hold the member
            // failed, most hear the refutation before their turn comes.
            let recheck = p.overlay && !p.wanted && p.lost_at.is_none();
            if p.link == LinkState::Down {
                if !recheck {
                    p.next_dial = Some(now);
                    p.dial_attempts = 0;
                } else if p.state == PeerState::Failed && p.next_dial.is_none() {
                    let wait = RECHECK_SPREAD.mul_f64(self.rng.gen_range(0.0..1.0));
                    p.next_dial = Some(now + wait);
                }
            }
            self.schedule(now);
            return;
        }
        p.last_seen = now;
        let mut kind = None;
        if restarted {
            p.incarnation = b.incarnation;
            p.tags.clear(); // the new life's tags arrive with its handshake
            p.tags_version = 0;
            kind = Some(EventKind::Restarted);
        }
        if b.kind == BeaconKind::Leave {
            p.state = PeerState::Left;
            p.since = now;
            p.next_dial = None;
            let id = p.id;
            self.emit(id, EventKind::Left);
            self.relay_state(None, id);
            self.settle();
            return;
        }
        // The name is fixed for an id's life (it came with the handshake);
        // the address and the metadata digest may change.
        // Once a versioned record has changed its tags, the beacon's digest
        // (of the tags the peer started with) is stale, not news.
        let digest_news = p.tags_version == 0 && p.digest != b.digest;
        let changed = p.addr != b.addr || digest_news;
        p.addr = b.addr;
        if p.tags_version == 0 {
            p.digest = b.digest;
        }
        if p.state == PeerState::Suspect {
            p.state = PeerState::Alive;
            p.since = now;
            kind = kind.or(Some(EventKind::Recovered));
        } else if changed {
            kind = kind.or(Some(EventKind::Updated));
        }
        if p.link == LinkState::Down && (restarted || p.next_dial.is_none()) {
            p.dial_attempts = 0;
            p.next_dial = Some(first_dial);
        }
        let id = p.id;
        if let Some(kind) = kind {
            self.emit(id, kind);
        }
        self.schedule(now);
    }

    /// A link to `hello.id` completed its handshake (either direction). The
    /// driver has checked the incarnation's plausibility.
    pub fn on_link_up(&mut self, now: Instant, hello: &Hello) {
        if hello.id == self.local {
            return;
        }
        self.note_input(now);
        let id = hello.id;
        self.touch(id);
        let mut events = Vec::with_capacity(2);
        let mut rival = None;
        if !self.peers.get(&id).is_some_and(|p| p.confirmed) {
            // First link with this id: it is confirmed now. Does its name
            // belong to a confirmed entry that is gone (a restart), or to one
            // still heard directly (a conflict)?
            let mut replaced = false;
            while let Some(h) = self
                .by_name
                .get(&self.peers, &hello.name)
                .filter(|&h| h != id)
            {
                let old = &self.peers[&h];
                if self.heard_directly(old, now) {
                    rival = Some((h, old.addr));
                    break;
                }
                replaced |= hello.incarnation > old.incarnation;
                self.remove(h);
            }
            if self.peers.contains_key(&id) {
                self.pending -= 1;
            }
            if !self.peers.contains_key(&id) {
                let p = self.new_peer(id, &hello.name, hello.incarnation, hello.addr, now);
                self.peers.insert(id, p);
            }
            let p = self.peers.get_mut(&id).expect("inserted above");
            p.confirmed = true;
            p.name.clone_from(&hello.name);
            p.incarnation = hello.incarnation;
            p.state = PeerState::Alive;
            p.since = now;
            p.link = LinkState::Down; // LinkUp is reported below
            events.push(if replaced {
                EventKind::Restarted
            } else {
                EventKind::Joined
            });
            match rival {
                Some((_, addr)) => p.conflict = Some(addr),
                None => {
                    self.by_name.insert(&self.peers, &hello.name, id);
                }
            }
        }
        let digest = tags_digest(&hello.tags);
        let p = self
            .peers
            .get_mut(&id)
            .expect("the entry was confirmed above");
        // Overlay mode: a peer this table holds as failed, that comes back
        // in the same life, was judged on others' word or on silence; it is
        // told, so that it refutes with a higher incarnation that the
        // overlay carries to everyone (the same life at the same
        // incarnation never overrides a verdict elsewhere).
        let (was_lost, was_state) = (p.lost_at.is_some(), p.state);
        let tell_failed =
            (p.overlay && p.state == PeerState::Failed && hello.incarnation <= p.incarnation)
                .then(|| member_record(p));
        let mut overlay_news = false;
        if hello.incarnation > p.incarnation {
            p.incarnation = hello.incarnation;
            p.tags_version = 0;
            if p.overlay {
                // The same id at a higher incarnation: a refutation, not a
                // new life (a restart comes with a new id).
                overlay_news = true;
            } else {
                events.push(EventKind::Restarted);
            }
        }
        p.alerted = false;
        p.alerts.clear();
        // A handshake carries the tags the peer started with: within one
        // life, tags changed at runtime (a versioned record) are newer.
        let hello_tags = p.tags_version == 0;
        let tags_changed = hello_tags && p.tags != hello.tags;
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
        } else if events.is_empty() && (tags_changed || p.addr != hello.addr) {
            events.push(EventKind::Updated);
        }
        p.addr = hello.addr;
        if hello_tags {
            p.tags.clone_from(&hello.tags);
            p.digest = digest;
        }
        p.last_seen = now;
        // Overlay mode: a member known so far only by word (relayed
        // records) may not have heard of us from anyone; its first link
        // gets the view too (see `share`).
        let first_link = p.overlay && p.last_link.is_none();
        p.last_link = Some(now);
        p.lost_at = None;
        p.next_probe = None;
        p.next_dial = None;
        p.dial_attempts = 0;
        let was_up = p.link == LinkState::Up;
        // Overlay mode: the catch-up view goes over a new link to a peer
        // whose last link was lost without a goodbye, or that was suspect
        // or failed here (either side may have been cut off), not over each
        // link that merely replaces a closed surplus one.
        let troubled = was_lost || was_state != PeerState::Alive;
        p.link = LinkState::Up;
        self.linked.insert(id);
        if !was_up {
            events.push(EventKind::LinkUp);
        }
        let new_addr = p.addr;
        if let Some((h, _)) = rival {
            self.rivals.insert(id);
            self.rivals.insert(h);
            if let Some(old) = self.peers.get_mut(&h) {
                old.conflict = Some(new_addr);
            }
            self.emit(h, EventKind::Updated);
        }
        let news = overlay_news
            || events
                .iter()
                .any(|k| matches!(k, EventKind::Joined | EventKind::Restarted));
        for kind in events {
            self.emit(id, kind);
        }
        if let Some(r) = tell_failed {
            self.actions.push_back(Action::Send {
                to: id,
                list: PeerList { peers: vec![r] },
            });
        }
        self.share(id, news, !was_up && (troubled || first_link));
    }

    /// Membership over links: a peer `id` whose link just brought news (it
    /// joined or restarted) gets our whole view (the records of every
    /// confirmed live entry), and every other linked peer gets its record:
    /// each change crosses each link once. A node that knows only one other
    /// (a seed) thereby learns of all, and all learn of it.
    ///
    /// Overlay mode: the first link to a member known so far only by word,
    /// and a new link after trouble (`fresh`: the last link was lost
    /// without a goodbye, or the peer was suspect or failed here) get the
    /// view, news or not. A newcomer's first neighbour relays it to the
    /// others, so its later neighbours link to a member they know already:
    /// without the view, a newcomer whose one view got lost (a full queue)
    /// would list only its neighbours for good. After trouble: a node whose links were cut may have missed
    /// joins and refutations that no other path will bring it again, since
    /// each change crosses each link once. Verdicts (tombstones) are not part of it: after a partition
    /// heals, one side's verdicts on silence are about members alive on the
    /// other, and would fail them there before they could refute. A node
    /// cut off from the overlay while a verdict spread therefore keeps the
    /// member listed until it is heard of again (a limit of this version).
    fn share(&mut self, id: NodeId, news: bool, fresh: bool) {
        let overlay = self.cfg.overlay.is_some();
        // Only news is worth a view in a full mesh: a relink (the same life
        // of a peer we knew) has missed nothing it cannot learn from its own
        // links, and pushing the whole view on every link-up made a cold
        // start cost N^3 records.
        if !(news || (overlay && fresh)) {
            return;
        }
        let mut view: Vec<PeerRecord> = self
            .peers
            .values()
            .filter(|p| p.confirmed && p.is_live() && p.id != id)
            .map(|p| member_record(p))
            .collect();
        view.sort_unstable_by_key(|r| r.id);
        self.send_list(id, view);
        if !news {
            return;
        }
        let Some(change) = self.peers.get(&id).map(|p| member_record(p)) else {
            return;
        };
        if self.cfg.overlay.is_some() {
            // Batched with the input's other news, once per link.
            self.queue_relay(Some(id), change);
            return;
        }
        let linked: Vec<NodeId> = self.linked.iter().filter(|&&l| l != id).copied().collect();
        for to in linked {
            self.actions.push_back(Action::Send {
                to,
                list: PeerList {
                    peers: vec![change.clone()],
                },
            });
        }
    }

    /// A linked peer told us of a member: a new id becomes a pending entry
    /// (dialed like one heard by beacon, confirmed only by its own link); a
    /// higher incarnation of a known one is dialed at once. Old information
    /// changes nothing: a lower or equal incarnation of a known id, or a
    /// report about a failed or left one, is ignored, so hearsay never
    /// resurrects a tombstone. The driver has applied the address rule.
    fn learn(&mut self, now: Instant, r: &PeerRecord) {
        if r.id == self.local {
            return;
        }
        self.touch(r.id);
        let first_dial = self.first_dial_at(r.id, now);
        if let Some(p) = self.peers.get_mut(&r.id) {
            if r.incarnation > p.incarnation && p.link == LinkState::Down {
                p.next_dial = Some(now);
                p.dial_attempts = 0;
            }
            // A runtime tag change: the same life, a newer version. Older
            // or equal versions (late or repeated records) change nothing.
            if r.incarnation == p.incarnation && r.tags_version > p.tags_version && p.is_live() {
                p.tags_version = r.tags_version;
                p.digest = tags_digest(&r.tags);
                if p.tags != r.tags {
                    p.tags.clone_from(&r.tags);
                    let id = p.id;
                    self.emit(id, EventKind::Updated);
                }
            }
            return;
        }
        if !self.admit_pending() {
            return;
        }
        let mut p = self.new_peer(r.id, &r.name, r.incarnation, r.addr, now);
        p.tags.clone_from(&r.tags);
        p.tags_version = r.tags_version;
        p.digest = tags_digest(&r.tags);
        p.next_dial = Some(first_dial);
        self.peers.insert(r.id, p);
        self.pending += 1;
    }

    /// The link to `id` closed. `graceful` when a goodbye preceded it.
    pub fn on_link_down(&mut self, now: Instant, id: NodeId, graceful: bool) {
        self.touch(id);
        self.note_input(now);
        let first_dial = self.first_dial_at(id, now);
        let grace = self.in_grace(now);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.link != LinkState::Up {
            return;
        }
        p.link = LinkState::Down;
        self.linked.remove(&id);
        p.rtt = None;
        let mut suspect = false;
        if p.is_live() && !graceful {
            // Is the process gone, or only this link? Redial now: a refusal
            // answers within a round trip; otherwise beacons and silence decide.
            p.lost_at = Some(now);
            p.next_dial = Some(now);
            p.dial_attempts = 0;
            // While we were late ourselves, a lost link says nothing yet.
            if p.state == PeerState::Alive && !grace {
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
        self.touch(id);
        self.note_input(now);
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
        let beacon_since_loss = p.lost_at.is_some() && p.since_loss(p.last_beacon);
        if why == DialFailure::Refused && p.lost_at.is_some() && !beacon_since_loss {
            // The link died and the port now refuses: the process is gone.
            p.state = PeerState::Failed;
            p.since = now;
            p.next_dial = None;
            self.emit(id, EventKind::Failed);
            // Hard evidence: one observer's verdict is enough (overlay).
            self.relay_state(None, id);
            self.settle();
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
        self.touch(id);
        self.note_input(now);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if !p.confirmed {
            self.remove(id);
            return;
        }
        if p.state == PeerState::Left {
            return;
        }
        p.state = PeerState::Left;
        p.since = now;
        p.next_dial = None;
        p.lost_at = None;
        self.emit(id, EventKind::Left);
        self.relay_state(None, id);
        self.settle();
    }

    /// An operator removes `id` (force-leave, on this node or relayed
    /// from another): a failed peer becomes `left` at once (no more
    /// probes or dials; reaped after the tombstone TTL), or with `prune`
    /// is dropped now. A live peer (alive or suspect) is refused: only
    /// silence-confirmed failures are removed, so a node that this table
    /// still hears is never removed by another's word.
    pub fn force_leave(
        &mut self,
        now: Instant,
        id: NodeId,
        prune: bool,
    ) -> Result<(), ForceLeaveError> {
        self.touch(id);
        let Some(p) = self.peers.get_mut(&id) else {
            return Err(ForceLeaveError::Unknown);
        };
        if !p.confirmed {
            self.remove(id); // pending: nothing was ever said about it
            return Ok(());
        }
        if p.is_live() {
            return Err(ForceLeaveError::Alive(p.state));
        }
        if p.state == PeerState::Failed {
            p.state = PeerState::Left;
            p.since = now;
            p.next_dial = None;
            p.next_probe = None;
            p.lost_at = None;
            self.emit(id, EventKind::Left);
        }
        if prune {
            self.remove(id);
        }
        self.settle();
        Ok(())
    }

    /// A pong measured `rtt` on the link to `id`.
    pub fn on_pong(&mut self, now: Instant, id: NodeId, rtt: Duration) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.rtt = Some(rtt);
        }
        self.on_traffic(now, id);
    }

    /// Any other frame arrived from `id` on its link.
    pub fn on_traffic(&mut self, now: Instant, id: NodeId) {
        self.touch(id);
        self.note_input(now);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        // Reports of link traffic may arrive a little after the fact (they
        // are batched): never move `last_seen` back.
        p.last_seen = p.last_seen.max(now);
        p.last_link = Some(p.last_link.map_or(now, |l| l.max(now)));
        if p.state == PeerState::Suspect && p.link == LinkState::Up {
            p.state = PeerState::Alive;
            p.since = now;
            self.emit(id, EventKind::Recovered);
        }
    }

    /// A peer list arrived from the linked peer `from`: probes ("do you hear
    /// this peer on a link?") are answered with our own *link* evidence only
    /// (never a beacon, which may be replayed, nor hearsay); answers are fed
    /// to [`PeerTable::on_vouch`]; membership records (no `age_ms`) of live
    /// members teach us of new ones (a new id becomes a pending entry; old
    /// information changes nothing).
    /// Reports of failed or left members are not acted on: each node judges
    /// its own links.
    pub fn on_peer_list(&mut self, now: Instant, from: NodeId, list: &PeerList) {
        self.on_traffic(now, from);
        let fresh = self.cfg.suspect_after;
        let mut answers = Vec::new();
        for r in &list.peers {
            match (r.state.as_str(), r.age_ms) {
                (RECORD_PROBE, _) => {
                    let Some(p) = self.peers.get(&r.id) else {
                        continue;
                    };
                    let Some(heard) = p.last_link else { continue };
                    let age = now.saturating_duration_since(heard);
                    if p.confirmed && p.is_live() && age < fresh && p.incarnation == r.incarnation {
                        answers.push(record(p, RECORD_ALIVE, Some(age)));
                    }
                }
                (RECORD_ALIVE, Some(age_ms)) => {
                    self.on_vouch(now, r.id, r.incarnation, Duration::from_millis(age_ms))
                }
                (_, None) if self.cfg.overlay.is_some() => self.hear(now, from, r),
                ("alive" | "suspect", None) => self.learn(now, r),
                _ => {}
            }
        }
        self.schedule(now);
        self.send_list(from, answers);
    }

    /// Another node reports hearing `id` (at `incarnation`) on its link,
    /// `age` ago. Only fresh reports of the same incarnation about a
    /// confirmed entry count, and only when what they saw is newer than our
    /// own loss of its link and than our verdict: a report never outlives
    /// what its sender saw, so an out-of-date one never brings a peer back,
    /// while a fresh one shows that only our path to it is broken. A peer
    /// that left stays left.
    pub fn on_vouch(&mut self, now: Instant, id: NodeId, incarnation: Incarnation, age: Duration) {
        let cfg = self.cfg;
        self.touch(id);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if !p.confirmed
            || p.state == PeerState::Left
            || incarnation != p.incarnation
            || age >= cfg.suspect_after
        {
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
        self.note_input(now);
        self.armed.set(None);
        if self.grace_until.is_some_and(|g| now >= g) {
            self.grace_until = None;
        }
        let judge = !self.in_grace(now);
        let cfg = self.cfg;
        let local = self.local;
        let bounded = self.bounded;
        let mut alerts = Vec::new();
        let mut reaped = Vec::new();
        let mut failed = Vec::new();
        let mut suspected = Vec::new();
        let mut probes = Vec::new();
        let due = self.due.get_mut();
        due.refresh(&cfg, &self.peers);
        // Recomputed only when it may have changed: the pending set did,
        // or one of its entries has just been heard for UNLINKED_AFTER.
        let unlinked: Option<Vec<String>> = due.unlinked(now, UNLINKED_AFTER).map(|ids| {
            ids.iter()
                .filter_map(|id| self.peers.get(id))
                .map(|p| p.name.clone())
                .collect()
        });
        // Only entries with a deadline at or before `now` can change here.
        for id in due.due(now) {
            due.touch(id);
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            match p.state {
                PeerState::Alive | PeerState::Suspect => {
                    if !p.judged() {
                        continue; // the overlay judges it (see `Peer::judged`)
                    }
                    let silence = now.saturating_duration_since(p.last_evidence());
                    let dead = judge && silence >= Self::dead_after(&cfg, p);
                    // Overlay mode: a verdict on silence is this observer's
                    // alert; it takes two observers' (see `overlay.rs`).
                    // Not while the overlay is a full mesh: every member
                    // watches every other, and each judges on its own as
                    // without the overlay.
                    let alone = p.overlay && p.confirmed && bounded && {
                        if dead && !p.alerted {
                            p.alerted = true;
                            if !p.alerts.contains(&local) {
                                p.alerts.push(local);
                            }
                            alerts.push(p.id);
                        }
                        p.alerts.len() < overlay::ALERTS_TO_FAIL
                    };
                    if dead && !alone {
                        p.state = PeerState::Failed;
                        p.since = now;
                        p.next_dial = None;
                        // Keep asking a while: if others still hear it, only
                        // our path was broken (see `on_vouch`).
                        p.next_probe = Some(now + REVIVE_PROBE_EVERY);
                        failed.push(p.id);
                        continue;
                    } else if judge
                        && p.state == PeerState::Alive
                        && silence >= cfg.suspect_after
                        && !p.degraded()
                    {
                        p.state = PeerState::Suspect;
                        p.since = now;
                        p.next_probe = Some(now);
                        suspected.push(p.id);
                    }
                    let beacon_since_loss = p.since_loss(p.last_beacon);
                    if !p.confirmed || p.link == LinkState::Up || beacon_since_loss {
                        p.next_probe = None; // its own beacons speak for it
                    } else if p.next_probe.is_some_and(|t| t <= now) {
                        p.next_probe = Some(now + PROBE_EVERY);
                        probes.push(p.id);
                    }
                }
                PeerState::Failed | PeerState::Left => {
                    if now >= p.since + cfg.tombstone_ttl {
                        reaped.push(p.id);
                    } else if p.state == PeerState::Failed && now < p.since + REVIVE_WINDOW {
                        if p.next_probe.is_some_and(|t| t <= now) {
                            p.next_probe = Some(now + REVIVE_PROBE_EVERY);
                            if p.link != LinkState::Up {
                                probes.push(p.id);
                            }
                        }
                    } else {
                        p.next_probe = None;
                    }
                }
            }
        }
        if let Some(mut unlinked) = unlinked {
            unlinked.sort_unstable();
            unlinked.dedup();
            unlinked.truncate(UNLINKED_SHOWN);
            self.unlinked = unlinked;
        }
        for id in suspected {
            self.emit(id, EventKind::Suspect);
        }
        for id in alerts {
            self.alert(id);
        }
        for id in failed {
            if self.peers.get(&id).is_some_and(|p| p.confirmed) {
                self.emit(id, EventKind::Failed);
                self.relay_state(None, id);
            } else {
                self.remove(id); // a pending entry that fell silent: forgotten
            }
        }
        for id in reaped {
            self.remove(id);
        }
        self.settle();
        // The map's order is random; the seeded choice of helpers must not
        // depend on it (a simulation from a seed is reproducible).
        probes.sort_unstable();
        for id in probes {
            self.probe(id);
        }
        self.schedule(now);
    }

    /// Asks a few linked peers whether they hear `id` on their links.
    fn probe(&mut self, id: NodeId) {
        let Some(p) = self.peers.get(&id) else {
            return;
        };
        let ask = PeerList {
            peers: vec![record(p, RECORD_PROBE, None)],
        };
        // In order: the map's order is random; the rng is not.
        let mut helpers: Vec<NodeId> = self.linked.iter().filter(|&&h| h != id).copied().collect();
        helpers.shuffle(&mut self.rng);
        helpers.truncate(PROBE_FANOUT);
        for to in helpers {
            self.actions.push_back(Action::Send {
                to,
                list: ask.clone(),
            });
        }
    }

    /// Turns due dials into actions (live peers, and failed or left ones
    /// that a beacon asked us to try).
    fn schedule(&mut self, now: Instant) {
        let due = self.due.get_mut();
        due.refresh(&self.cfg, &self.peers);
        for id in due.timers_due(now) {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            if p.link != LinkState::Down || !p.may_dial() {
                continue;
            }
            if p.next_dial.is_some_and(|t| t <= now) {
                p.next_dial = None;
                p.link = LinkState::Connecting;
                due.touch(id);
                self.actions.push_back(Action::Dial {
                    id: p.id,
                    addr: p.addr,
                });
            }
        }
    }

    /// Queues `peers` for `to` as one `peers` frame, or as several when
    /// their size would pass [`Config::max_list_bytes`] (in order, each
    /// with at least one record).
    fn send_list(&mut self, to: NodeId, peers: Vec<PeerRecord>) {
        let budget = self.cfg.max_list_bytes;
        let total: usize = peers.iter().map(record_bound).sum();
        if total <= budget {
            if !peers.is_empty() {
                self.actions.push_back(Action::Send {
                    to,
                    list: PeerList { peers },
                });
            }
            return;
        }
        let mut chunk = Vec::new();
        let mut size = 0;
        for r in peers {
            let n = record_bound(&r);
            if !chunk.is_empty() && size + n > budget {
                let list = PeerList {
                    peers: std::mem::take(&mut chunk),
                };
                self.actions.push_back(Action::Send { to, list });
                size = 0;
            }
            size += n;
            chunk.push(r);
        }
        if !chunk.is_empty() {
            let list = PeerList { peers: chunk };
            self.actions.push_back(Action::Send { to, list });
        }
    }

    /// When [`PeerTable::on_tick`] must next be called, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut due = self.due.borrow_mut();
        due.refresh(&self.cfg, &self.peers);
        #[cfg(debug_assertions)]
        {
            due.check(&self.cfg, &self.peers);
            let mut up: Vec<NodeId> = self
                .peers
                .values()
                .filter(|p| p.link == LinkState::Up)
                .map(|p| p.id)
                .collect();
            up.sort_unstable();
            assert!(
                up.into_iter().eq(self.linked.iter().copied()),
                "the set of linked ids is out of date"
            );
        }
        let (silence, timer) = due.first();
        // Silence verdicts wait out a grace period after our own lateness.
        let silence = silence.map(|t| self.grace_until.map_or(t, |g| t.max(g)));
        let mut next = match (silence, timer) {
            (Some(s), Some(t)) => Some(s.min(t)),
            (s, t) => s.or(t),
        };
        // Batched relays are due on a tick too (those due already go with
        // the next `poll_action`).
        let later = |r: &Instant| self.clock.is_none_or(|c| *r > c);
        if let Some(r) = self
            .relay_due
            .filter(|r| !self.outbox.is_empty() && later(r))
        {
            next = Some(next.map_or(r, |n| n.min(r)));
        }
        self.armed.set(next);
        next
    }

    /// The silence after which `p` is failed.
    pub(crate) fn dead_after(cfg: &Config, p: &Peer) -> Duration {
        // Degraded covers entries heard only by beacon, pending ones too.
        if p.degraded() {
            Self::beacon_allowance(cfg, p).max(cfg.dead_after)
        } else {
            cfg.dead_after
        }
    }

    /// How long a peer that only beacons keep alive may go unheard:
    /// `beacon_dead_after`, or more when its beacons are paced.
    fn beacon_allowance(cfg: &Config, p: &Peer) -> Duration {
        cfg.beacon_dead_after.max(Self::paced(p))
    }

    /// [`BEACON_INTERVALS`] of `p`'s paced beacon interval (zero when it
    /// beacons at the configured rate).
    fn paced(p: &Peer) -> Duration {
        p.beacon_interval
            .map_or(Duration::ZERO, |i| i.saturating_mul(BEACON_INTERVALS))
    }

    /// The interval `id`'s beacons come at, as discovery learnt it from
    /// them (`ivl`, see PROTOCOL.md "Beacon pacing"): call after
    /// [`PeerTable::on_beacon`] with every beacon. `None` or anything not
    /// longer than `configured` (this node's own interval) means unpaced.
    pub fn on_beacon_interval(&mut self, id: NodeId, interval: Duration, configured: Duration) {
        let paced = (interval > configured).then_some(interval);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.beacon_interval != paced {
            p.beacon_interval = paced;
            self.touch(id);
        }
    }
}

/// What we know of `p`, as membership knowledge for another node.
fn member_record(p: &Peer) -> PeerRecord {
    PeerRecord {
        tags: p.tags.clone(),
        tags_version: p.tags_version,
        ..record(p, p.state.as_str(), None)
    }
}

/// A record about `p` for a peer list.
fn record(p: &Peer, state: &str, age: Option<Duration>) -> PeerRecord {
    PeerRecord {
        id: p.id,
        incarnation: p.incarnation,
        name: p.name.clone(),
        addr: p.addr,
        state: state.into(),
        age_ms: age.map(|a| a.as_millis() as u64),
        tags: Tags::new(),
        tags_version: 0,
        by: None,
    }
}

#[cfg(test)]
mod tests;
