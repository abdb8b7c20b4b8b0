//! One node process: the daemon's three subsystems, re-done as thin
//! synchronous glue around the daemon's own state machines.
//!
//! | glue here | mirrors | machines driven |
//! |---|---|---|
//! | [`Node::on_datagram`], beacon timer, [`Node::leave`] (leave beacons) | `discovery/src/driver.rs` (`Bound::run`, `classify`) | `discovery::sources::SourceTable`, `discovery::budget::Budget` |
//! | `dial`, `on_connect_done`, `on_accepted`, `pump_handshake`, `established`, `on_link_input`, `report` | `transport/src/actor.rs` (`Actor::dial`, `established`, `report_liveness`, `Closed`), `transport/src/link.rs` (reader/writer), `transport/src/handshake.rs` | `proto::link::Handshake`, `proto::link::Link`, `proto::link::resolve_duplicate` |
//! | `table_input`, `drain` | `node/src/membership.rs` (`run`, `on_transport`, `drain`, `send_list`) | `proto::membership::PeerTable` |
//!
//! The daemon runs these as sibling tasks joined by channels; here each
//! input is handed on at once, at the same virtual instant (the channels'
//! microseconds are below the model's resolution). What the glue leaves
//! out, because the simulation cannot produce it: the address rule (every
//! simulated address is dialable), cluster and version checks of beacons
//! (one cluster, one version), beacon codecs and sealing (beacons are
//! values), bounded queues between the tasks (never full here), and
//! application messages.
//!
//! Where the table's outputs come in an order that depends on its hash
//! maps (actions of one input, records of one list, events of one input),
//! the glue sorts them, so that a run depends on its seed only (see
//! `drain`). Any order is one the daemon could have produced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use discovery::budget::Budget;
use discovery::sources::{SourceTable, Verdict};
use proto::beacon::{Beacon, BeaconKind};
use proto::frame::{AppMessage, PeerList, Reject, VERSION};
use proto::id::check_incarnation;
use proto::link::{
    resolve_duplicate, CloseReason, Duplicate, Established, Handovers, Handshake, HandshakeConfig,
    Link, LinkConfig, LinkEvent, LocalClose, RejectCode, Role, FAREWELL_DRAIN, HANDOVER_WAIT,
};
use proto::membership::{Action, DialFailure, Event, PeerTable};
use proto::overlay::flood::{Config as FloodConfig, Flood, FloodStats};
use proto::overlay::Driver as OverlayDriver;
use proto::{FrameCodec, FrameError, Hello, Message, NodeId};
use rand::rngs::StdRng;
use rand::Rng;
use tokio_util::codec::{Decoder, Encoder};

use crate::config::Settings;
use crate::net::{ConnId, Kind, Net, Segment};
use crate::queue::{Ev, Input, Queue, TimerKind};

/// The cluster name every simulated node uses.
pub const CLUSTER: &str = "default";

/// What a node's handlers need from the world: the clock, the queue, the
/// random number generator, the network, and where events go.
pub(crate) struct Cx<'a> {
    pub now: Instant,
    pub queue: &'a mut Queue,
    pub rng: &'a mut StdRng,
    pub net: &'a mut Net,
    pub s: &'a Settings,
    /// Table events, by slot, for the observer.
    pub events: &'a mut Vec<(u32, Event)>,
    /// The wall clock of the cluster, in milliseconds (node clocks add
    /// their offset).
    pub wall_ms: u64,
}

/// A lazily armed timer: `want` is when the machine wants to be woken,
/// `armed` the earliest timer event in the queue. A timer event that finds
/// `want` later re-arms instead of waking the machine early.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Timer {
    want: Option<Instant>,
    armed: Option<Instant>,
}

enum Fire {
    Stale,
    Due,
    Rearm(Instant),
}

impl Timer {
    /// Sets the wanted instant; returns the instant to schedule an event
    /// for, if one is needed.
    fn set(&mut self, want: Option<Instant>) -> Option<Instant> {
        self.want = want;
        match want {
            Some(w) if self.armed.is_none_or(|a| w < a) => {
                self.armed = Some(w);
                Some(w)
            }
            _ => None,
        }
    }

    fn fire(&mut self, armed: Instant, now: Instant) -> Fire {
        if self.armed != Some(armed) {
            return Fire::Stale;
        }
        self.armed = None;
        match self.want {
            Some(w) if w <= now => {
                self.want = None;
                Fire::Due
            }
            Some(w) => {
                self.armed = Some(w);
                Fire::Rearm(w)
            }
            None => Fire::Stale,
        }
    }
}

/// One end of a connection, as the transport holds it.
enum EndState {
    /// A dial whose TCP connect is in progress.
    Connecting,
    /// The handshake runs.
    Handshaking { hs: Box<Handshake>, buf: BytesMut },
    /// An established link.
    Open {
        link: Box<Link>,
        peer: NodeId,
        enc: Box<FrameCodec>,
        dec: Box<FrameCodec>,
        rbuf: BytesMut,
    },
}

struct End {
    role: Role,
    /// The id the table asked to dial (dialer ends).
    dialed: Option<NodeId>,
    state: EndState,
    timer: Timer,
}

impl End {
    fn index(&self) -> usize {
        match self.role {
            Role::Dialer => 0,
            Role::Acceptor => 1,
        }
    }
}

/// The transport's entry for the current link to a peer
/// (`transport::actor::Entry`).
struct Current {
    conn: ConnId,
    dialer: NodeId,
    /// When a frame last arrived (the link's `heard_us` counter).
    heard: Option<Instant>,
    /// `heard` as of the last liveness report.
    reported: Option<Instant>,
}

/// Per-process counters the observer reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct NodeStats {
    /// Inputs handed to the peer table.
    pub table_inputs: u64,
    /// Ticks after which the table asked to be woken again at once or in
    /// the past: a daemon would spin on them.
    pub tick_spins: u64,
    /// Dials started.
    pub dials: u64,
    /// Links established (duplicates excluded).
    pub links_established: u64,
    /// Inbound connections dropped because too many handshakes were in
    /// progress.
    pub handshake_backlog: u64,
    /// Beacons refused by the new-peer budget.
    pub new_peer_budget: u64,
    /// Beacons dropped by the per-source rate limit.
    pub rate_limited: u64,
    /// Incarnations refused as from the future.
    pub incarnation_refused: u64,
}

/// One node process. See the module docs.
pub struct Node {
    /// Its host.
    pub slot: u32,
    /// Its process generation on that host.
    pub proc: u32,
    /// Its id (random per process).
    pub id: NodeId,
    /// Its incarnation (its start time in wall-clock milliseconds).
    pub incarnation: u64,
    /// Its name (the same across restarts on one host).
    pub name: String,
    /// Its data address.
    pub addr: SocketAddr,
    /// Where its beacons come from (a new port per process).
    pub beacon_src: SocketAddr,
    /// Its peer table: the daemon's state machine.
    pub table: PeerTable,
    /// Its counters.
    pub stats: NodeStats,
    /// Its clock's offset from the cluster's wall clock.
    clock_offset: Duration,
    /// Where its ping rounds are anchored.
    ping_anchor: Instant,
    hs_cfg: HandshakeConfig,
    sources: SourceTable,
    budget: Budget,
    ends: BTreeMap<ConnId, End>,
    links: BTreeMap<NodeId, Current>,
    /// Current links heard since the last report (sorted when reported).
    unreported: Vec<NodeId>,
    pending_handshakes: usize,
    table_timer: Timer,
    beacon_timer: Timer,
    prune_timer: Timer,
    report_timer: Timer,
    /// Links the peer rejected as duplicates, reported down only if its
    /// preferred link does not complete soon (`Actor::closed`).
    handovers: Handovers,
    handover_timer: Timer,
    /// Inputs that arrived while paused, in order.
    pub(crate) deferred: Vec<Input>,
    /// Bounded overlay mode (`--max-links`): who to link to, by the
    /// daemon's own rules (`proto::overlay::driver`).
    overlay: Option<OverlayDriver>,
    /// The relay of broadcasts (`proto::overlay::flood`, as the daemon's
    /// relay task runs it).
    flood: Flood,
    /// When each broadcast was delivered here, by `(origin, seq)`.
    delivered: HashMap<(NodeId, u64), Instant>,
}

/// What a new process needs to know about itself.
pub(crate) struct Identity {
    pub slot: u32,
    pub proc: u32,
    pub id: NodeId,
    pub incarnation: u64,
    pub name: String,
    pub addr: SocketAddr,
    pub beacon_src: SocketAddr,
    pub clock_offset: Duration,
    pub table_seed: u64,
}

impl Node {
    /// A process started at `now` (nothing runs until [`Node::start`]).
    pub(crate) fn new(me: Identity, s: &Settings, now: Instant, wall_ms: u64) -> Node {
        let hello = Hello {
            protocol: VERSION,
            cluster: CLUSTER.into(),
            id: me.id,
            incarnation: me.incarnation,
            name: me.name.clone(),
            addr: me.addr,
            tags: Default::default(),
        };
        // The transport anchors ping rounds on multiples of the interval of
        // its wall clock.
        let every = s.ping_interval.as_nanos().max(1);
        let wall_ns = (u128::from(wall_ms) * 1_000_000) + me.clock_offset.as_nanos();
        let to_round = every - wall_ns % every;
        let ping_anchor = now + Duration::from_nanos(to_round as u64);
        Node {
            slot: me.slot,
            proc: me.proc,
            id: me.id,
            incarnation: me.incarnation,
            name: me.name,
            addr: me.addr,
            beacon_src: me.beacon_src,
            table: PeerTable::new(me.id, s.table, me.table_seed),
            stats: NodeStats::default(),
            clock_offset: me.clock_offset,
            ping_anchor,
            hs_cfg: HandshakeConfig {
                local: hello,
                keyring: s.keyring.clone(),
                max_frame: s.max_frame,
                timeout: s.handshake_timeout,
            },
            sources: SourceTable::new(s.limits),
            budget: Budget::new(s.limits.replies, s.limits.new_peers, now),
            ends: BTreeMap::new(),
            links: BTreeMap::new(),
            unreported: Vec::new(),
            pending_handshakes: 0,
            table_timer: Timer::default(),
            beacon_timer: Timer::default(),
            prune_timer: Timer::default(),
            report_timer: Timer::default(),
            handovers: Handovers::default(),
            handover_timer: Timer::default(),
            deferred: Vec::new(),
            overlay: s.max_links.map(|k| OverlayDriver::new(me.id, k)),
            flood: Flood::new(me.id, FloodConfig::default()),
            delivered: HashMap::new(),
        }
        .with_local_record()
    }

    /// Overlay mode: the table learns who it is, so that it can refute.
    fn with_local_record(mut self) -> Node {
        if self.overlay.is_some() {
            self.table.set_local(&self.hs_cfg.local);
        }
        self
    }

    /// The neighbours this node wants (overlay mode), or `None` (full mesh).
    pub fn neighbours(&self) -> Option<&BTreeSet<NodeId>> {
        self.overlay.as_ref().map(|o| o.neighbours())
    }

    /// Ids of current links.
    pub fn linked(&self) -> impl Iterator<Item = &NodeId> {
        self.links.keys()
    }

    /// Overlay mode: the driver does what is due (ring updates, telling
    /// the table its neighbours, trimming); links that neither end wants
    /// are closed as "not a neighbour".
    fn refresh_overlay(&mut self, cx: &mut Cx) {
        let Some(o) = self.overlay.as_mut() else {
            return;
        };
        o.poll(cx.now, &mut self.table);
        let close: Vec<NodeId> = std::iter::from_fn(|| o.poll_close()).collect();
        for id in close {
            let Some(conn) = self.links.get(&id).map(|cur| cur.conn) else {
                continue;
            };
            if let Some(End {
                state: EndState::Open { link, .. },
                ..
            }) = self.ends.get_mut(&conn)
            {
                link.close(cx.now, LocalClose::NotNeighbour);
            }
            self.flush_link(cx, conn);
        }
    }

    /// Overlay mode: this node's mean beacon interval, paced as the
    /// daemon's discovery paces it (`discovery::pacing`: the group's total
    /// beacon rate stays bounded, RTCP-style). Membership travels over the
    /// overlay; beacons are for discovery. The configured interval in a
    /// full mesh.
    fn beacon_every(&self, configured: Duration) -> Duration {
        if self.overlay.is_none() {
            return configured;
        }
        discovery::pacing::interval(configured, self.table.len() + 1)
    }

    /// Number of current links.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Connection ends this process holds (links, handshakes, dials).
    pub fn ends(&self) -> usize {
        self.ends.len()
    }

    /// The node's wall clock.
    fn wall(&self, cx: &Cx) -> u64 {
        cx.wall_ms + self.clock_offset.as_millis() as u64
    }

    fn schedule(&self, cx: &mut Cx, kind: TimerKind, at: Option<Instant>) {
        if let Some(at) = at {
            cx.queue.push(
                at,
                Ev::Deliver {
                    slot: self.slot,
                    proc: Some(self.proc),
                    input: Input::Timer { kind, armed: at },
                },
            );
        }
    }

    /// The process starts: discovery announces at once
    /// (`Bound::run`: `next_beacon = now`).
    pub(crate) fn start(&mut self, cx: &mut Cx) {
        let at = self.beacon_timer.set(Some(cx.now));
        self.schedule(cx, TimerKind::Beacon, at);
        let at = self
            .prune_timer
            .set(Some(cx.now + cx.s.limits.forget_after));
        self.schedule(cx, TimerKind::Prune, at);
    }

    /// One input.
    pub(crate) fn handle(&mut self, cx: &mut Cx, input: Input) {
        match input {
            Input::Datagram { src, beacon } => self.on_datagram(cx, src, &beacon),
            Input::ConnectDone { conn, refused } => self.on_connect_done(cx, conn, refused),
            Input::Accepted { conn } => self.on_accepted(cx, conn),
            Input::Segment { conn, end, seg } => self.on_segment(cx, conn, end, seg),
            Input::Timer { kind, armed } => self.on_timer(cx, kind, armed),
        }
    }

    fn on_timer(&mut self, cx: &mut Cx, kind: TimerKind, armed: Instant) {
        let now = cx.now;
        let timer = match kind {
            TimerKind::Table => &mut self.table_timer,
            TimerKind::Beacon => &mut self.beacon_timer,
            TimerKind::Prune => &mut self.prune_timer,
            TimerKind::Report => &mut self.report_timer,
            TimerKind::Handover => &mut self.handover_timer,
            TimerKind::Conn(conn) => match self.ends.get_mut(&conn) {
                Some(e) => &mut e.timer,
                None => return,
            },
        };
        match timer.fire(armed, now) {
            Fire::Stale => {}
            Fire::Rearm(at) => self.schedule(cx, kind, Some(at)),
            Fire::Due => match kind {
                TimerKind::Table => {
                    // The membership loop reads the links before a tick.
                    self.report(cx);
                    self.table_step(cx, true, |t, now| t.on_tick(now));
                }
                TimerKind::Beacon => {
                    self.beacon(cx, BeaconKind::Announce, None);
                    let jitter = cx.rng.gen_range(0.9..1.1);
                    let every = self.beacon_every(cx.s.beacon_interval).mul_f64(jitter);
                    let at = self.beacon_timer.set(Some(now + every));
                    self.schedule(cx, TimerKind::Beacon, at);
                }
                TimerKind::Prune => {
                    self.sources.prune(now);
                    let at = self.prune_timer.set(Some(now + cx.s.limits.forget_after));
                    self.schedule(cx, TimerKind::Prune, at);
                }
                TimerKind::Report => self.report(cx),
                TimerKind::Handover => {
                    for (peer, reason) in self.handovers.expired(now) {
                        self.link_down(cx, peer, &reason);
                    }
                    self.arm_handover(cx);
                }
                TimerKind::Conn(conn) => self.on_end_timeout(cx, conn),
            },
        }
    }

    // ---- discovery (discovery/src/driver.rs) ----

    /// Sends a beacon of `kind`: multicast to the group, or unicast to `to`.
    fn beacon(&mut self, cx: &mut Cx, kind: BeaconKind, to: Option<SocketAddr>) {
        let b = Rc::new(Beacon {
            cluster: CLUSTER.into(),
            id: self.id,
            incarnation: self.incarnation,
            name: self.name.clone(),
            addr: self.addr,
            kind,
            digest: 0,
        });
        match to {
            None => cx
                .net
                .multicast(cx.now, cx.rng, cx.queue, self.slot, self.beacon_src, b),
            Some(to) => cx
                .net
                .unicast(cx.now, cx.rng, cx.queue, self.slot, self.beacon_src, to, b),
        }
    }

    /// A datagram arrived: `Bound::classify`, the reply to a newcomer's
    /// announce, then the membership task's `on_beacon`.
    fn on_datagram(&mut self, cx: &mut Cx, src: SocketAddr, beacon: &Beacon) {
        let now = cx.now;
        if !self.sources.admit(now, src) {
            self.stats.rate_limited += 1;
            return;
        }
        if beacon.id == self.id {
            return; // our own, looped back
        }
        let verdict = self.sources.judge(now, src, beacon.id, beacon.incarnation);
        let admits = matches!(verdict, Verdict::New | Verdict::Restarted { .. });
        if admits && beacon.kind != BeaconKind::Leave && !self.budget.new_peers.try_take(now) {
            self.stats.new_peer_budget += 1;
            return;
        }
        let verdict = self
            .sources
            .commit(now, src, beacon.id, beacon.incarnation, verdict);
        if matches!(verdict, Verdict::Conflict { .. } | Verdict::Stale) {
            return;
        }
        if beacon.kind == BeaconKind::Announce
            && verdict == Verdict::New
            && self.sources.should_reply(now, src, cx.s.beacon_interval)
            && self.budget.replies.try_take(now)
        {
            self.beacon(cx, BeaconKind::Reply, Some(src));
        }
        if check_incarnation(beacon.incarnation, self.wall(cx)).is_err() {
            self.stats.incarnation_refused += 1;
            return;
        }
        self.table_input(cx, |t, now| t.on_beacon(now, beacon));
        if let Some(o) = self.overlay.as_mut() {
            // A newcomer heard by beacon takes its place in the rings (the
            // table says nothing of pending entries).
            o.on_beacon(beacon.id);
        }
    }

    // ---- membership (node/src/membership.rs) ----

    /// Applies one input to the table, then does what the membership loop
    /// does after every input: drain events and actions, and ask the table
    /// for its next deadline (which is also what arms its stall rule).
    fn table_input(&mut self, cx: &mut Cx, f: impl FnOnce(&mut PeerTable, Instant)) {
        self.table_step(cx, false, f);
    }

    fn table_step(&mut self, cx: &mut Cx, tick: bool, f: impl FnOnce(&mut PeerTable, Instant)) {
        let now = cx.now;
        f(&mut self.table, now);
        self.stats.table_inputs += 1;
        self.drain(cx);
        let mut want = self.table.next_deadline();
        if tick && want.is_some_and(|w| w <= now) {
            // Right after a tick the table wants another at once: the
            // daemon's loop would spin. Counted, and stepped over here.
            self.stats.tick_spins += 1;
            want = Some(now + Duration::from_millis(1));
        }
        let at = self.table_timer.set(want);
        self.schedule(cx, TimerKind::Table, at);
    }

    /// `membership::drain`: events to the observer, actions to the
    /// transport. Both in an order independent of the table's hash maps.
    fn drain(&mut self, cx: &mut Cx) {
        let first = cx.events.len();
        while let Some(ev) = self.table.poll_event() {
            cx.events.push((self.slot, ev));
        }
        // Stable: the events of one peer keep their order.
        cx.events[first..].sort_by_key(|(_, e)| e.id);
        if let Some(o) = self.overlay.as_mut() {
            for (_, ev) in &cx.events[first..] {
                o.on_event(ev);
            }
        }
        self.refresh_overlay(cx);
        // Telling the table its neighbours may have queued dials.
        let again = cx.events.len();
        while let Some(ev) = self.table.poll_event() {
            cx.events.push((self.slot, ev));
        }
        cx.events[again..].sort_by_key(|(_, e)| e.id);
        let mut actions = Vec::new();
        while let Some(a) = self.table.poll_action() {
            actions.push(match a {
                Action::Send { to, mut list } => {
                    list.peers
                        .sort_by(|a, b| (a.id, &a.state).cmp(&(b.id, &b.state)));
                    Action::Send { to, list }
                }
                dial => dial,
            });
        }
        actions.sort_by(|a, b| action_key(a).cmp(&action_key(b)));
        // A refutation raised our incarnation: later handshakes and
        // beacons carry it.
        if let Some(inc) = self.table.local_incarnation() {
            if inc != self.incarnation {
                self.incarnation = inc;
                self.hs_cfg.local.incarnation = inc;
            }
        }
        for a in actions {
            match a {
                // In overlay mode the table asks only for its neighbours
                // and for peers whose link was lost (a refused redial is
                // how a crash is seen).
                Action::Dial { id, addr } => self.dial(cx, id, addr),
                Action::Send { to, list } => self.send_list(cx, to, list),
            }
        }
    }

    /// `membership::send_list`: best effort over the current link.
    fn send_list(&mut self, cx: &mut Cx, to: NodeId, list: PeerList) {
        let Some(conn) = self.links.get(&to).map(|c| c.conn) else {
            return; // no link: dropped, as `try_send` fails with NoLink
        };
        self.send_frame(cx, conn, Message::Peers(list));
    }

    // ---- transport (transport/src/actor.rs, link.rs, handshake.rs) ----

    /// `Actor::dial`: connect, then the dialer's handshake.
    fn dial(&mut self, cx: &mut Cx, id: NodeId, addr: SocketAddr) {
        self.stats.dials += 1;
        let conn = cx
            .net
            .connect(cx.now, cx.rng, cx.queue, (self.slot, self.proc), addr);
        let mut end = End {
            role: Role::Dialer,
            dialed: Some(id),
            state: EndState::Connecting,
            timer: Timer::default(),
        };
        let at = end.timer.set(Some(cx.now + cx.s.connect_timeout));
        self.ends.insert(conn, end);
        self.schedule(cx, TimerKind::Conn(conn), at);
    }

    fn dial_failed(&mut self, cx: &mut Cx, id: Option<NodeId>, why: DialFailure) {
        if let Some(id) = id {
            self.table_input(cx, |t, now| t.on_dial_failed(now, id, why));
        }
    }

    fn on_connect_done(&mut self, cx: &mut Cx, conn: ConnId, refused: bool) {
        let Some(end) = self.ends.get_mut(&conn) else {
            // We gave up (connect timeout) before the answer came.
            cx.net.reset(cx.now, cx.rng, cx.queue, conn, 0);
            return;
        };
        if !matches!(end.state, EndState::Connecting) {
            return;
        }
        if refused {
            let dialed = end.dialed;
            self.ends.remove(&conn);
            cx.net.reset(cx.now, cx.rng, cx.queue, conn, 0);
            self.dial_failed(cx, dialed, DialFailure::Refused);
            return;
        }
        let hs = Handshake::dial(cx.now, self.hs_cfg.clone());
        end.state = EndState::Handshaking {
            hs: Box::new(hs),
            buf: BytesMut::new(),
        };
        self.pump_handshake(cx, conn);
    }

    /// The accept loop: a handshake task per connection, bounded.
    fn on_accepted(&mut self, cx: &mut Cx, conn: ConnId) {
        if self.pending_handshakes >= cx.s.max_pending_handshakes {
            self.stats.handshake_backlog += 1;
            cx.net.close(cx.now, cx.rng, cx.queue, conn, 1); // dropping the stream
            return;
        }
        self.pending_handshakes += 1;
        let hs = Handshake::accept(cx.now, self.hs_cfg.clone());
        self.ends.insert(
            conn,
            End {
                role: Role::Acceptor,
                dialed: None,
                state: EndState::Handshaking {
                    hs: Box::new(hs),
                    buf: BytesMut::new(),
                },
                timer: Timer::default(),
            },
        );
        self.pump_handshake(cx, conn);
    }

    /// Moves a handshake's transmits to the wire and acts on its outcome.
    fn pump_handshake(&mut self, cx: &mut Cx, conn: ConnId) {
        let Some(end) = self.ends.get_mut(&conn) else {
            return;
        };
        let idx = end.index();
        let EndState::Handshaking { hs, .. } = &mut end.state else {
            return;
        };
        while let Some(bytes) = hs.poll_transmit() {
            cx.net.send(
                cx.now,
                cx.rng,
                cx.queue,
                conn,
                idx,
                Segment::Bytes(bytes),
                Kind::Handshake,
            );
        }
        match hs.poll_outcome() {
            None => {
                let at = end.timer.set(hs.next_deadline());
                self.schedule(cx, TimerKind::Conn(conn), at);
            }
            Some(outcome) => {
                let end = self.ends.remove(&conn).expect("looked up above");
                if end.role == Role::Acceptor {
                    self.pending_handshakes -= 1;
                }
                let EndState::Handshaking { buf, .. } = end.state else {
                    unreachable!("matched above");
                };
                match outcome {
                    Ok(est) => self.established(cx, conn, end.role, end.dialed, est, buf),
                    Err(e) => {
                        cx.net.close(cx.now, cx.rng, cx.queue, conn, idx);
                        if end.role == Role::Dialer {
                            self.dial_failed(cx, end.dialed, e.dial_failure());
                        }
                    }
                }
            }
        }
    }

    /// `Actor::established`: exactly one link per pair, then `LinkUp`.
    fn established(
        &mut self,
        cx: &mut Cx,
        conn: ConnId,
        role: Role,
        dialed: Option<NodeId>,
        est: Established,
        leftover: BytesMut,
    ) {
        let Established {
            remote,
            decoder,
            mut encoder,
        } = est;
        let idx = if role == Role::Dialer { 0 } else { 1 };
        let peer = remote.id;
        let dialer = if role == Role::Dialer { self.id } else { peer };
        let replacing = match self.links.get(&peer) {
            None => None,
            Some(cur) => match resolve_duplicate(self.id, peer, cur.dialer, dialer) {
                Duplicate::KeepNew => Some(cur.conn),
                Duplicate::KeepCurrent => {
                    // The current link is the preferred one: refuse this one.
                    let reject = Message::Reject(Reject {
                        code: RejectCode::Duplicate,
                        detail: "a link between these nodes already exists".into(),
                    });
                    write(cx, conn, idx, &mut encoder, reject);
                    cx.net.close_after_farewell(
                        cx.now,
                        cx.rng,
                        cx.queue,
                        conn,
                        idx,
                        FAREWELL_DRAIN,
                    );
                    return;
                }
            },
        };
        if let Some(old) = replacing {
            // The old link's writer sends `reject{duplicate}` and ends; it is
            // no longer current, so its close is no event.
            self.links.remove(&peer);
            if let Some(mut e) = self.ends.remove(&old) {
                if let EndState::Open { link, .. } = &mut e.state {
                    link.close(cx.now, LocalClose::Duplicate);
                }
                self.ends.insert(old, e);
                self.flush_link(cx, old);
            }
        }
        let link = Link::new(
            cx.now,
            role,
            LinkConfig {
                ping_interval: cx.s.ping_interval,
                link_timeout: cx.s.link_timeout,
                ping_anchor: self.ping_anchor,
            },
        );
        self.ends.insert(
            conn,
            End {
                role,
                dialed,
                state: EndState::Open {
                    link: Box::new(link),
                    peer,
                    enc: Box::new(encoder),
                    dec: Box::new(decoder),
                    rbuf: leftover,
                },
                timer: Timer::default(),
            },
        );
        if let Some(o) = self.overlay.as_mut() {
            o.on_link_up(cx.now, peer);
        }
        self.links.insert(
            peer,
            Current {
                conn,
                dialer,
                heard: None,
                reported: None,
            },
        );
        if replacing.is_none() && !self.handovers.take(peer) {
            self.stats.links_established += 1;
            if check_incarnation(remote.incarnation, self.wall(cx)).is_ok() {
                self.table_input(cx, |t, now| t.on_link_up(now, &remote));
            } else {
                self.stats.incarnation_refused += 1;
            }
        }
        // Frames that came with the end of the handshake.
        self.read_buffered(cx, conn);
        self.flush_link(cx, conn);
    }

    /// Writes a frame on the link of `conn`.
    fn send_frame(&mut self, cx: &mut Cx, conn: ConnId, msg: Message) {
        let Some(end) = self.ends.get_mut(&conn) else {
            return;
        };
        let idx = end.index();
        let EndState::Open { enc, .. } = &mut end.state else {
            return;
        };
        write(cx, conn, idx, enc, msg);
    }

    fn on_segment(&mut self, cx: &mut Cx, conn: ConnId, _end: usize, seg: Segment) {
        let now = cx.now;
        let Some(end) = self.ends.get_mut(&conn) else {
            return;
        };
        match &mut end.state {
            EndState::Connecting => {}
            EndState::Handshaking { hs, buf } => {
                match seg {
                    Segment::Bytes(b) => {
                        buf.extend_from_slice(&b);
                        hs.on_bytes(now, buf);
                    }
                    Segment::Frame(m) => {
                        // A plaintext peer already on its link: the bytes
                        // it would have sent.
                        if FrameCodec::new(cx.s.max_frame).encode(*m, buf).is_ok() {
                            hs.on_bytes(now, buf);
                        }
                    }
                    Segment::Peers(shared) => {
                        let m = Message::Peers(shared.to_list());
                        if FrameCodec::new(cx.s.max_frame).encode(m, buf).is_ok() {
                            hs.on_bytes(now, buf);
                        }
                    }
                    // An IO error while waiting for the answer counts as a
                    // close (`handshake::answer_io`: reset).
                    Segment::Fin | Segment::Rst => hs.on_eof(now),
                }
                self.pump_handshake(cx, conn);
            }
            EndState::Open { link, rbuf, .. } => {
                let frame = matches!(
                    seg,
                    Segment::Bytes(_) | Segment::Frame(_) | Segment::Peers(_)
                );
                match seg {
                    Segment::Bytes(b) => rbuf.extend_from_slice(&b),
                    Segment::Frame(m) => link.on_frame(now, *m),
                    Segment::Peers(shared) => link.on_frame(now, Message::Peers(shared.to_list())),
                    Segment::Fin => link.on_eof(now),
                    Segment::Rst => link.on_error(
                        now,
                        &FrameError::Io(io::Error::from(io::ErrorKind::ConnectionReset)),
                    ),
                }
                if frame {
                    self.note_heard(cx, conn);
                }
                self.read_buffered(cx, conn);
                self.flush_link(cx, conn);
            }
        }
    }

    /// Decodes whatever whole frames the end's read buffer holds.
    fn read_buffered(&mut self, cx: &mut Cx, conn: ConnId) {
        let now = cx.now;
        let Some(End {
            state: EndState::Open {
                link, dec, rbuf, ..
            },
            ..
        }) = self.ends.get_mut(&conn)
        else {
            return;
        };
        let mut got = false;
        while !rbuf.is_empty() && !link.is_closed() {
            match dec.decode(rbuf) {
                Ok(Some(m)) => {
                    got = true;
                    link.on_frame(now, m);
                }
                Ok(None) => break,
                Err(e) => {
                    link.on_error(now, &e);
                    break;
                }
            }
        }
        if got {
            self.note_heard(cx, conn);
        }
    }

    /// The reader's `heard_us` store: only the current link is reported.
    fn note_heard(&mut self, cx: &mut Cx, conn: ConnId) {
        let Some(End {
            state: EndState::Open { peer, .. },
            ..
        }) = self.ends.get(&conn)
        else {
            return;
        };
        let peer = *peer;
        let Some(cur) = self.links.get_mut(&peer).filter(|c| c.conn == conn) else {
            return;
        };
        if cur.heard == cur.reported {
            self.unreported.push(peer);
        }
        cur.heard = Some(cx.now);
        // The actor's report ticks every `liveness_report`, on the rounds.
        let next = proto::link::next_round(self.ping_anchor, cx.s.liveness_report, cx.now);
        if self.report_timer.want.is_none() {
            let at = self.report_timer.set(Some(next));
            self.schedule(cx, TimerKind::Report, at);
        }
    }

    /// `Actor::report_liveness`, then the membership loop's `Heard` arm:
    /// every entry in one go, one drain.
    fn report(&mut self, cx: &mut Cx) {
        let mut ids = std::mem::take(&mut self.unreported);
        ids.sort_unstable();
        ids.dedup();
        let mut heard = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(cur) = self.links.get_mut(&id) else {
                continue;
            };
            let Some(at) = cur.heard.filter(|_| cur.heard != cur.reported) else {
                continue;
            };
            cur.reported = cur.heard;
            let rtt = match self.ends.get(&cur.conn) {
                Some(End {
                    state: EndState::Open { link, .. },
                    ..
                }) => link.rtt(),
                _ => None,
            };
            heard.push((id, at, rtt));
        }
        if heard.is_empty() {
            return;
        }
        self.table_input(cx, |t, _| {
            for (id, at, rtt) in heard {
                match rtt {
                    Some(rtt) => t.on_pong(at, id, rtt),
                    None => t.on_traffic(at, id),
                }
            }
        });
    }

    /// Connection timers: connect timeout, handshake deadline, link
    /// deadline.
    fn on_end_timeout(&mut self, cx: &mut Cx, conn: ConnId) {
        let now = cx.now;
        let Some(end) = self.ends.get_mut(&conn) else {
            return;
        };
        match &mut end.state {
            EndState::Connecting => {
                let dialed = end.dialed;
                self.ends.remove(&conn);
                cx.net.reset(now, cx.rng, cx.queue, conn, 0);
                self.dial_failed(cx, dialed, DialFailure::Other);
            }
            EndState::Handshaking { hs, .. } => {
                hs.on_timeout(now);
                self.pump_handshake(cx, conn);
            }
            EndState::Open { link, .. } => {
                link.on_timeout(now);
                self.flush_link(cx, conn);
            }
        }
    }

    /// The link's writer and the reader's events: transmits to the wire,
    /// peer lists to the table, a close to the actor (`Internal::Closed`),
    /// which tells the table when it was the current link.
    fn flush_link(&mut self, cx: &mut Cx, conn: ConnId) {
        let Some(end) = self.ends.get_mut(&conn) else {
            return;
        };
        let idx = end.index();
        let EndState::Open {
            link, peer, enc, ..
        } = &mut end.state
        else {
            return;
        };
        let peer = *peer;
        let mut out = Vec::new();
        while let Some(m) = link.poll_transmit() {
            out.push(m);
        }
        let mut events = Vec::new();
        while let Some(e) = link.poll_event() {
            events.push(e);
        }
        let closed = link.is_closed();
        let drain = link.close_reason().is_some_and(CloseReason::sent_farewell);
        let want = link.next_deadline();
        for m in out {
            write(cx, conn, idx, enc, m);
        }
        if closed {
            self.ends.remove(&conn);
            if drain {
                cx.net
                    .close_after_farewell(cx.now, cx.rng, cx.queue, conn, idx, FAREWELL_DRAIN);
            } else {
                cx.net.close(cx.now, cx.rng, cx.queue, conn, idx);
            }
        } else {
            let at = end.timer.set(want);
            self.schedule(cx, TimerKind::Conn(conn), at);
        }
        for ev in events {
            match ev {
                LinkEvent::Peers(mut list) => {
                    // The membership task refuses records with incarnations
                    // from the future (and applies the address rule).
                    let wall = self.wall(cx);
                    list.peers.retain(|r| {
                        r.age_ms.is_some() || check_incarnation(r.incarnation, wall).is_ok()
                    });
                    self.table_input(cx, |t, now| t.on_peer_list(now, peer, &list));
                }
                LinkEvent::Relay(r) => {
                    let linked: Vec<NodeId> = self.links.keys().copied().collect();
                    self.flood.on_relayed(cx.now, peer, r, &linked);
                    self.flush_flood(cx);
                }
                LinkEvent::App(_) | LinkEvent::Query(_) => {}
                LinkEvent::Closed(reason) => {
                    let current = self.links.get(&peer).is_some_and(|c| c.conn == conn);
                    if !current {
                        continue; // a replaced duplicate; the current link is fine
                    }
                    self.links.remove(&peer);
                    if self.handovers.hold(cx.now, peer, &reason, HANDOVER_WAIT) {
                        self.arm_handover(cx);
                        continue; // the peer's preferred link is on its way
                    }
                    self.link_down(cx, peer, &reason);
                }
            }
        }
    }

    /// `Actor::link_down`: the peer's link is gone.
    fn link_down(&mut self, cx: &mut Cx, peer: NodeId, reason: &CloseReason) {
        if let Some(o) = self.overlay.as_mut() {
            o.on_link_down(peer);
        }
        let goodbye = reason.is_goodbye();
        let graceful = reason.is_graceful();
        self.table_input(cx, |t, now| {
            if goodbye {
                t.on_goodbye(now, peer);
            }
            t.on_link_down(now, peer, graceful || goodbye);
        });
    }

    fn arm_handover(&mut self, cx: &mut Cx) {
        let at = self.handover_timer.set(self.handovers.next_deadline());
        self.schedule(cx, TimerKind::Handover, at);
    }

    // ---- broadcasts over the overlay ----

    /// Broadcasts one message over the overlay, as `POST /v1/messages` with
    /// `to: null` does in the daemon; returns its `seq`.
    pub(crate) fn broadcast(&mut self, cx: &mut Cx) -> u64 {
        let linked: Vec<NodeId> = self.links.keys().copied().collect();
        let msg = AppMessage {
            topic: "sim".into(),
            payload: bytes::Bytes::from_static(b"broadcast"),
        };
        let seq = self.flood.originate(None, msg, &linked);
        self.flush_flood(cx);
        seq
    }

    /// When the broadcast `(origin, seq)` was delivered here.
    pub fn delivered(&self, origin: NodeId, seq: u64) -> Option<Instant> {
        self.delivered.get(&(origin, seq)).copied()
    }

    /// The relay's counts.
    pub fn flood_stats(&self) -> FloodStats {
        self.flood.stats()
    }

    /// Writes the relay's frames on the links and notes its deliveries.
    /// (A gap's wait ends at the next relayed frame here rather than by a
    /// timer of its own: the simulated links lose nothing for good.)
    fn flush_flood(&mut self, cx: &mut Cx) {
        self.flood.on_tick(cx.now);
        while let Some((to, r)) = self.flood.poll_transmit() {
            if let Some(conn) = self.links.get(&to).map(|c| c.conn) {
                self.send_frame(cx, conn, Message::Relay(r));
            }
        }
        while let Some(r) = self.flood.poll_delivery() {
            self.delivered.insert((r.origin, r.seq), cx.now);
        }
    }

    // ---- the process's end ----

    /// Graceful shutdown (`Actor::run` after cancel, and discovery's leave
    /// beacons): a goodbye on every current link, every other connection
    /// closed, leave beacons.
    pub(crate) fn leave(&mut self, cx: &mut Cx) {
        self.beacon(cx, BeaconKind::Leave, None);
        let current: Vec<ConnId> = self.links.values().map(|c| c.conn).collect();
        self.links.clear();
        for conn in current {
            if let Some(End {
                state: EndState::Open { link, .. },
                ..
            }) = self.ends.get_mut(&conn)
            {
                link.close(cx.now, LocalClose::Shutdown);
            }
            self.flush_link(cx, conn);
        }
        let rest: Vec<(ConnId, usize)> = self.ends.iter().map(|(c, e)| (*c, e.index())).collect();
        for (conn, idx) in rest {
            cx.net.close(cx.now, cx.rng, cx.queue, conn, idx);
        }
        self.ends.clear();
    }

    /// `kill -9`: the kernel closes every socket of the process, with no
    /// farewell from the process. For a socket with nothing unread (the
    /// daemon reads its links continuously) Linux sends a FIN, which it
    /// retransmits like data, so every peer's link ends after about one
    /// latency even under loss; later segments to it are answered with a
    /// reset, and dials are refused.
    pub(crate) fn crash(&mut self, cx: &mut Cx) {
        for (conn, e) in std::mem::take(&mut self.ends) {
            cx.net.close(cx.now, cx.rng, cx.queue, conn, e.index());
        }
        self.links.clear();
        self.handovers = Handovers::default();
    }
}

/// Encodes `msg` with `enc` (secured mode; a plaintext frame travels as a
/// value) and writes it on end `idx` of `conn`.
fn write(cx: &mut Cx, conn: ConnId, idx: usize, enc: &mut FrameCodec, msg: Message) {
    let kind = kind_of(&msg);
    if let Message::Peers(list) = &msg {
        for r in &list.peers {
            cx.net.records_sent.count(r);
        }
    }
    let seg = if cx.s.keyring.is_some() {
        let mut out = BytesMut::new();
        if enc.encode(msg, &mut out).is_err() {
            return; // our own frame: cannot fail at these sizes
        }
        Segment::Bytes(out.freeze())
    } else {
        match msg {
            Message::Peers(list) => Segment::Peers(cx.net.records.share(list)),
            msg => Segment::Frame(Box::new(msg)),
        }
    };
    cx.net.send(cx.now, cx.rng, cx.queue, conn, idx, seg, kind);
}

/// A sort key for the actions of one drain: dials by id, sends by
/// recipient and content.
fn action_key(a: &Action) -> (u8, NodeId, Vec<(NodeId, &str)>) {
    match a {
        Action::Dial { id, .. } => (0, *id, Vec::new()),
        Action::Send { to, list } => (
            1,
            *to,
            list.peers
                .iter()
                .map(|r| (r.id, r.state.as_str()))
                .collect(),
        ),
    }
}

fn kind_of(m: &Message) -> Kind {
    match m {
        Message::Ping(_) => Kind::Ping,
        Message::Pong(_) => Kind::Pong,
        Message::Peers(_) => Kind::Peers,
        Message::Goodbye(_) => Kind::Goodbye,
        Message::Reject(_) => Kind::Reject,
        Message::Hello(_) | Message::Welcome(_) => Kind::Handshake,
        Message::App(_) | Message::Query(_) | Message::QueryResponse(_) | Message::Relay(_) => {
            Kind::Other
        }
    }
}
