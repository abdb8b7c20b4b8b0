//! The world: hosts, their node processes, the network and the observer,
//! advanced one event at a time in virtual time, and the operations a
//! scenario applies (start, crash, leave, pause, resume, partition, heal).
//!
//! Scenarios read like `chitchat`'s cluster tests: a list of [`Op`]s (run
//! for a while, crash a node, heal ...) applied in order, with checks on
//! the [`Observer`] between them. Like `quinn-proto`'s test `Pair`, the
//! world is driven by a step function ([`World::step`]) and a loop over it
//! until a condition holds or a deadline passes ([`World::run_until`]).

use std::time::{Duration, Instant};

use proto::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{Settings, SimConfig};
use crate::net::{host_ip, HostStatus, Net, Sent, DATA_PORT};
use crate::node::{Cx, Identity, Node, NodeStats};
use crate::observe::Observer;
use crate::queue::{Ev, Input, Queue};

/// The cluster's wall clock at the start of every run, in milliseconds
/// since the Unix epoch (incarnations are start times on it).
pub const WALL_START_MS: u64 = 1_750_000_000_000;

/// Node clocks differ from the cluster's wall clock by up to this much
/// (NTP on a LAN), so that ping rounds do not all fall on one instant.
const CLOCK_SPREAD: Duration = Duration::from_millis(2);

/// A scenario step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Let virtual time pass.
    RunFor(Duration),
    /// Start a process on host `slot` (a new id, a higher incarnation, the
    /// host's name), if none runs there.
    Start(u32),
    /// Start every host without a process, each within `spread` from now.
    StartAll {
        /// Start times are uniform in `[now, now + spread)`.
        spread: Duration,
    },
    /// `kill -9` the process of `slot`.
    Crash(u32),
    /// Stop the process of `slot` gracefully (goodbyes, leave beacons).
    Leave(u32),
    /// `SIGSTOP` the process of `slot`.
    Pause(u32),
    /// `SIGCONT` it.
    Resume(u32),
    /// Split the hosts: each inner list is one side; hosts in no list form
    /// one more side.
    Partition(Vec<Vec<u32>>),
    /// Every host reaches every other again.
    Heal,
}

/// The simulation. See the module docs.
pub struct World {
    cfg: SimConfig,
    s: Settings,
    base: Instant,
    now: Instant,
    queue: Queue,
    rng: StdRng,
    net: Net,
    nodes: Vec<Option<Node>>,
    obs: Observer,
    events: Vec<(u32, proto::membership::Event)>,
    offsets: Vec<Duration>,
    last_incarnation: Vec<u64>,
    /// Stats of processes that ended, summed.
    ended: NodeStats,
    processed: u64,
    pending_starts: Vec<(Instant, u32)>,
}

impl World {
    /// A world of `cfg.nodes` hosts, none running yet.
    pub fn new(cfg: SimConfig) -> World {
        let mut s = Settings::from_flags(&cfg.flags, cfg.secured);
        s.max_links = cfg.max_links;
        // The peer table's overlay mode goes with the driver's.
        s.table.overlay = cfg.max_links;
        if cfg.max_links.is_some() {
            // Relays wait up to 5 ms to travel together: the frames per
            // node of a cold start's flood stay bounded as N grows.
            s.table.relay_batch = std::time::Duration::from_millis(5);
        }
        let base = Instant::now(); // the origin of virtual time; never read again
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let offsets = (0..cfg.nodes)
            .map(|_| CLOCK_SPREAD.mul_f64(rng.gen::<f64>()))
            .collect();
        let net = Net::new(
            cfg.nodes,
            cfg.latency,
            cfg.jitter,
            cfg.loss,
            s.connect_timeout,
        );
        let obs = Observer::new(cfg.nodes, base, s.verdict_window(), cfg.record_trace);
        World {
            nodes: (0..cfg.nodes).map(|_| None).collect(),
            last_incarnation: vec![0; cfg.nodes],
            cfg,
            s,
            base,
            now: base,
            queue: Queue::new(base),
            rng,
            net,
            obs,
            events: Vec::new(),
            offsets,
            ended: NodeStats::default(),
            processed: 0,
            pending_starts: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// The daemon settings every node runs with.
    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// Virtual now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The origin of virtual time.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// The measurements.
    pub fn observer(&self) -> &Observer {
        &self.obs
    }

    /// The measurements, to add watches.
    pub fn observer_mut(&mut self) -> &mut Observer {
        &mut self.obs
    }

    /// The process of `slot`, if one runs (or is paused) there.
    pub fn node(&self, slot: u32) -> Option<&Node> {
        self.nodes.get(slot as usize).and_then(|n| n.as_ref())
    }

    /// Ids of every live process, by slot.
    pub fn live_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().flatten().map(|n| n.id).collect()
    }

    /// Events processed so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }

    /// Events waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Open connections in the network.
    pub fn conns(&self) -> usize {
        self.net.conns()
    }

    /// Messages each host sent (all its processes).
    pub fn sent(&self) -> &[Sent] {
        &self.net.sent
    }

    /// All messages sent, summed over hosts.
    pub fn sent_total(&self) -> Sent {
        self.net.sent.iter().fold(Sent::default(), |a, s| a.add(s))
    }

    /// Membership records sent in `peers` frames, summed over hosts.
    pub fn records_sent(&self) -> crate::net::RecordsSent {
        self.net.records_sent
    }

    /// Node counters summed over every process, ended ones included.
    pub fn stats(&self) -> NodeStats {
        let mut t = self.ended;
        for n in self.nodes.iter().flatten() {
            add_stats(&mut t, &n.stats);
        }
        t
    }

    /// The cluster's wall clock at `now`.
    fn wall_ms(&self) -> u64 {
        WALL_START_MS + (self.now - self.base).as_millis() as u64
    }

    /// Applies one operation at the current instant (`RunFor` runs).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::RunFor(d) => {
                let until = self.now + *d;
                self.run_until(until, |_| false);
            }
            Op::Start(slot) => self.start(*slot),
            Op::StartAll { spread } => {
                for slot in 0..self.cfg.nodes as u32 {
                    if self.nodes[slot as usize].is_some() {
                        continue;
                    }
                    let at = self.now + spread.mul_f64(self.rng.gen::<f64>());
                    self.pending_starts.push((at, slot));
                }
                self.pending_starts.sort();
                let first = self.pending_starts.first().map(|(t, _)| *t);
                if first.is_some_and(|t| t <= self.now) {
                    self.run_starts();
                }
            }
            Op::Crash(slot) => self.stop(*slot, false),
            Op::Leave(slot) => self.stop(*slot, true),
            Op::Pause(slot) => self.pause(*slot),
            Op::Resume(slot) => self.resume(*slot),
            Op::Partition(sides) => {
                let rest = sides.len() as u32;
                let mut groups = vec![rest; self.cfg.nodes];
                for (g, side) in sides.iter().enumerate() {
                    for s in side {
                        groups[*s as usize] = g as u32;
                    }
                }
                self.obs
                    .trace(self.now, u32::MAX, u128::from(rest), "op:partition");
                self.net.set_groups(&groups);
                self.obs.on_partition(groups, self.now);
            }
            Op::Heal => {
                self.obs.trace(self.now, u32::MAX, 0, "op:heal");
                let groups = vec![0; self.cfg.nodes];
                self.net.set_groups(&groups);
                self.obs.on_partition(groups, self.now);
            }
        }
    }

    /// Broadcasts one message from the process of `slot` over the overlay;
    /// returns its name, `(origin, seq)`, or `None` if nothing runs there.
    pub fn broadcast(&mut self, slot: u32) -> Option<(proto::NodeId, u64)> {
        let id = self.nodes.get(slot as usize)?.as_ref()?.id;
        self.obs.trace(self.now, slot, id.0, "op:broadcast");
        let mut seq = None;
        self.with_node(slot, |n, cx| seq = Some(n.broadcast(cx)));
        self.flush_events();
        Some((id, seq?))
    }

    /// Applies operations in order.
    pub fn apply_all(&mut self, ops: &[Op]) {
        for op in ops {
            self.apply(op);
        }
    }

    fn run_starts(&mut self) {
        while let Some(&(at, slot)) = self.pending_starts.first() {
            if at > self.now {
                break;
            }
            self.pending_starts.remove(0);
            self.start(slot);
        }
    }

    /// Processes events until `until`, or until `done` holds (checked after
    /// every event); returns the instant `done` first held.
    pub fn run_until(
        &mut self,
        until: Instant,
        mut done: impl FnMut(&World) -> bool,
    ) -> Option<Instant> {
        if done(self) {
            return Some(self.now);
        }
        loop {
            let next_start = self.pending_starts.first().map(|(t, _)| *t);
            let next = match (self.queue.peek_time(), next_start) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match next {
                Some(t) if t <= until => {
                    if next_start == Some(t) {
                        self.now = t;
                        self.queue.advance(t);
                        self.run_starts();
                    } else {
                        self.step();
                    }
                    if done(self) {
                        return Some(self.now);
                    }
                }
                _ => {
                    self.now = until.max(self.now);
                    self.queue.advance(self.now);
                    return None;
                }
            }
        }
    }

    /// Processes the earliest event; false when none is left.
    pub fn step(&mut self) -> bool {
        let Some((at, ev)) = self.queue.pop() else {
            return false;
        };
        self.now = at;
        self.processed += 1;
        match ev {
            Ev::Deliver { slot, proc, input } => self.deliver(slot, proc, input),
            Ev::Syn { conn } => self.net.on_syn(at, &mut self.rng, &mut self.queue, conn),
            Ev::SynSend { conn, attempt } => {
                self.net
                    .syn_send(at, &mut self.rng, &mut self.queue, conn, attempt)
            }
            Ev::Retransmit { conn, dir } => {
                self.net
                    .on_retransmit(at, &mut self.rng, &mut self.queue, conn, dir)
            }
        }
        self.flush_events();
        true
    }

    fn flush_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.events);
        self.obs.on_events(self.now, &events, &self.nodes);
        self.events = events;
        self.events.clear();
    }

    fn deliver(&mut self, slot: u32, proc: Option<u32>, input: Input) {
        if let Input::Segment { conn, end, seg } = &input {
            if !self.net.is_open(*conn, *end) {
                if self.net.drains(self.now, *conn, *end, seg) {
                    return; // read and dropped after a farewell
                }
                // The socket is gone: its kernel resets the sender.
                self.net
                    .refuse_segment(self.now, &mut self.rng, &mut self.queue, *conn, *end, seg);
                return;
            }
        }
        let host = &self.net.hosts[slot as usize];
        if host.status == HostStatus::Down || proc.is_some_and(|p| p != host.proc) {
            return;
        }
        let paused = host.status == HostStatus::Paused;
        let wall_ms = self.wall_ms();
        let World {
            nodes,
            queue,
            rng,
            net,
            s,
            events,
            now,
            ..
        } = self;
        let Some(node) = nodes[slot as usize].as_mut() else {
            return;
        };
        if paused {
            node.deferred.push(input);
            return;
        }
        let mut cx = Cx {
            now: *now,
            queue,
            rng,
            net,
            s,
            events,
            wall_ms,
        };
        node.handle(&mut cx, input);
    }

    /// Runs `f` on the process of `slot` with a context.
    fn with_node(&mut self, slot: u32, f: impl FnOnce(&mut Node, &mut Cx)) {
        let wall_ms = self.wall_ms();
        let World {
            nodes,
            queue,
            rng,
            net,
            s,
            events,
            now,
            ..
        } = self;
        let Some(node) = nodes[slot as usize].as_mut() else {
            return;
        };
        let mut cx = Cx {
            now: *now,
            queue,
            rng,
            net,
            s,
            events,
            wall_ms,
        };
        f(node, &mut cx);
    }

    fn start(&mut self, slot: u32) {
        let i = slot as usize;
        if self.nodes[i].is_some() {
            return;
        }
        let host = &mut self.net.hosts[i];
        host.proc += 1;
        host.status = HostStatus::Running;
        let proc = host.proc;
        let wall = self.wall_ms() + self.offsets[i].as_millis() as u64;
        let incarnation = wall.max(self.last_incarnation[i] + 1);
        self.last_incarnation[i] = incarnation;
        let ip = host_ip(slot);
        let me = Identity {
            slot,
            proc,
            id: NodeId(self.rng.gen()),
            incarnation,
            name: format!("node-{slot}"),
            addr: (ip, DATA_PORT).into(),
            // Each process's beacon socket has a port of its own.
            beacon_src: (ip, 40_000u16.wrapping_add(proc as u16)).into(),
            clock_offset: self.offsets[i],
            table_seed: self.rng.gen(),
        };
        let id = me.id;
        self.nodes[i] = Some(Node::new(me, &self.s, self.now, self.wall_ms()));
        self.obs.trace(self.now, slot, id.0, "op:start");
        self.obs.on_start(slot, id, self.now);
        self.with_node(slot, |n, cx| n.start(cx));
        self.flush_events();
    }

    fn stop(&mut self, slot: u32, graceful: bool) {
        let i = slot as usize;
        if self.nodes[i].is_none() {
            return;
        }
        let what = if graceful { "op:leave" } else { "op:crash" };
        let id = self.nodes[i].as_ref().map_or(0, |n| n.id.0);
        self.obs.trace(self.now, slot, id, what);
        if graceful {
            // A paused process cannot leave gracefully; it is resumed first.
            if self.net.hosts[i].status == HostStatus::Paused {
                self.resume(slot);
            }
            self.with_node(slot, |n, cx| n.leave(cx));
        } else {
            self.with_node(slot, |n, cx| n.crash(cx));
        }
        self.net.hosts[i].status = HostStatus::Down;
        if let Some(n) = self.nodes[i].take() {
            add_stats(&mut self.ended, &n.stats);
        }
        self.obs.on_stop(slot, self.now);
        self.flush_events();
    }

    fn pause(&mut self, slot: u32) {
        let i = slot as usize;
        if self.net.hosts[i].status != HostStatus::Running {
            return;
        }
        self.net.hosts[i].status = HostStatus::Paused;
        self.obs.trace(self.now, slot, 0, "op:pause");
        self.obs.on_pause(slot, self.now);
    }

    /// Resumes a paused process: what its kernel buffered is read first,
    /// then its overdue timers fire, all at the resume instant.
    fn resume(&mut self, slot: u32) {
        let i = slot as usize;
        if self.net.hosts[i].status != HostStatus::Paused {
            return;
        }
        self.net.hosts[i].status = HostStatus::Running;
        self.obs.trace(self.now, slot, 0, "op:resume");
        self.obs.on_resume(slot, self.now);
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let proc = node.proc;
        let deferred = std::mem::take(&mut node.deferred);
        let (timers, inputs): (Vec<Input>, Vec<Input>) = deferred
            .into_iter()
            .partition(|i| matches!(i, Input::Timer { .. }));
        for input in inputs.into_iter().chain(timers) {
            self.queue.push(
                self.now,
                Ev::Deliver {
                    slot,
                    proc: Some(proc),
                    input,
                },
            );
        }
    }
}

fn add_stats(t: &mut NodeStats, s: &NodeStats) {
    t.table_inputs += s.table_inputs;
    t.tick_spins += s.tick_spins;
    t.dials += s.dials;
    t.links_established += s.links_established;
    t.handshake_backlog += s.handshake_backlog;
    t.new_peer_budget += s.new_peer_budget;
    t.rate_limited += s.rate_limited;
    t.incarnation_refused += s.incarnation_refused;
}
