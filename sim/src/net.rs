//! The virtual network: hosts, their kernels' part of TCP and UDP, and the
//! wires between them.
//!
//! - **Hosts** are numbered slots. Host `i` has the address
//!   `127.(1 + i / 65536).(i / 256 % 256).(i % 256)` (loopback space, never
//!   a routable address), a partition group, and at most one node process,
//!   which is running, paused, or down (crashed, left, not started).
//! - **Latency**: each packet takes `latency ± jitter` (uniform), one way.
//! - **Loss**: each datagram is lost with probability `loss`. A lost TCP
//!   segment is retransmitted after the minimum RTO (200 ms, doubling for
//!   each further loss in a row); TCP delivers in order, so everything sent
//!   after it on that direction waits behind it (head-of-line blocking).
//! - **Partitions**: hosts in different groups cannot reach each other.
//!   Datagrams across are lost; a SYN across is lost (connects time out);
//!   TCP segments across wait in the direction's backlog and are
//!   retransmitted with exponential backoff until the partition heals, so
//!   link silence closes links and a short partition only delays them.
//! - **Connects**: the SYN (and its answer) are lost with the probability
//!   of losing either; SYNs are retransmitted after 1 s, 3 s, ... within the
//!   dialer's connect timeout. A host with no listening process answers
//!   with a reset (the dial is refused); a paused process still listens
//!   (the kernel completes the connect, the process accepts it later).
//! - **Closed sockets**: a segment that arrives at a closed end (the
//!   process closed it, crashed, or was replaced) is answered by a reset.
//!   A crash resets every connection of the process.
//!
//! Simplified on purpose: no bandwidth or queueing (a packet's latency does
//! not depend on load), no socket buffer limits, no SYN backlog limit, no
//! ACK loss, no fast retransmit or tail-loss probe, a single RTO floor.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::{Beacon, Message};
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

use crate::queue::{Ev, Input, Queue};
use crate::records::{Records, SharedList};

/// Linux's minimum retransmission timeout.
pub const RTO_MIN: Duration = Duration::from_millis(200);
/// Linux's maximum retransmission timeout.
pub const RTO_MAX: Duration = Duration::from_secs(120);
/// Linux's initial SYN retransmission timeout.
pub const SYN_RTO: Duration = Duration::from_secs(1);
/// Losses in a row of one segment beyond which the draw stops (the delay is
/// then already far past every link deadline).
const MAX_LOSSES: u32 = 8;

/// The data port every node listens on.
pub const DATA_PORT: u16 = 6777;

/// A connection's identity, unique over a run.
pub type ConnId = u64;

/// What travels on a TCP connection.
#[derive(Debug)]
pub enum Segment {
    /// Bytes of a handshake, or of a secured link's records.
    Bytes(Bytes),
    /// One frame of a plaintext link, passed as a value (its bytes are the
    /// codec's business, tested in `proto`).
    Frame(Box<Message>),
    /// A `peers` frame of a plaintext link, its records shared with every
    /// other frame in flight that carries them (see `records.rs`).
    Peers(SharedList),
    /// The sender closed its end.
    Fin,
    /// The sender's end was reset.
    Rst,
}

/// What a node process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostStatus {
    /// No process: crashed, left, or not started.
    Down,
    /// Running.
    Running,
    /// Stopped (SIGSTOP): its kernel still buffers, acknowledges and
    /// accepts; it processes nothing.
    Paused,
}

/// One host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Partition group.
    pub group: u32,
    /// Generation of its current (or last) process.
    pub proc: u32,
    /// Its process's status.
    pub status: HostStatus,
}

/// What kind of message was sent, for the per-node counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A multicast announce or leave beacon.
    Beacon,
    /// A unicast reply beacon.
    Reply,
    /// A segment of a link handshake.
    Handshake,
    /// A ping.
    Ping,
    /// A pong.
    Pong,
    /// A peer list (membership record, probe, answer).
    Peers,
    /// A goodbye.
    Goodbye,
    /// A reject.
    Reject,
    /// Anything else.
    Other,
}

/// Messages one host's processes sent.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Sent {
    /// Multicast beacons (announce and leave).
    pub beacons: u64,
    /// Unicast reply beacons.
    pub replies: u64,
    /// Handshake segments.
    pub handshake: u64,
    /// Pings.
    pub pings: u64,
    /// Pongs.
    pub pongs: u64,
    /// Peer lists.
    pub peers: u64,
    /// Goodbyes and rejects.
    pub farewells: u64,
    /// Other frames.
    pub other: u64,
}

impl Sent {
    /// Every message.
    pub fn total(&self) -> u64 {
        self.beacons
            + self.replies
            + self.handshake
            + self.pings
            + self.pongs
            + self.peers
            + self.farewells
            + self.other
    }

    fn count(&mut self, kind: Kind) {
        match kind {
            Kind::Beacon => self.beacons += 1,
            Kind::Reply => self.replies += 1,
            Kind::Handshake => self.handshake += 1,
            Kind::Ping => self.pings += 1,
            Kind::Pong => self.pongs += 1,
            Kind::Peers => self.peers += 1,
            Kind::Goodbye | Kind::Reject => self.farewells += 1,
            Kind::Other => self.other += 1,
        }
    }

    /// The sum of two counts.
    pub fn add(&self, o: &Sent) -> Sent {
        self.zip(o, |a, b| a + b)
    }

    /// What was sent since `earlier` (a count taken before this one).
    pub fn since(&self, earlier: &Sent) -> Sent {
        self.zip(earlier, u64::saturating_sub)
    }

    /// `f` of each kind's two counts.
    fn zip(&self, o: &Sent, f: impl Fn(u64, u64) -> u64) -> Sent {
        Sent {
            beacons: f(self.beacons, o.beacons),
            replies: f(self.replies, o.replies),
            handshake: f(self.handshake, o.handshake),
            pings: f(self.pings, o.pings),
            pongs: f(self.pongs, o.pongs),
            peers: f(self.peers, o.peers),
            farewells: f(self.farewells, o.farewells),
            other: f(self.other, o.other),
        }
    }

    /// Each count divided by `per` (nodes times seconds), rounded to a
    /// tenth: a rate by kind, as JSON (the same keys as the counts').
    pub fn rates(&self, per: f64) -> serde_json::Value {
        let mut v = serde_json::json!(self);
        if let Some(m) = v.as_object_mut() {
            for x in m.values_mut() {
                let n = x.as_u64().unwrap_or(0);
                *x = serde_json::json!((n as f64 / per * 10.0).round() / 10.0);
            }
        }
        v
    }
}

#[derive(Debug)]
struct Dir {
    /// When the last segment of this direction is delivered (in order).
    ready_at: Instant,
    /// Segments waiting for a retransmission to get through a partition.
    backlog: VecDeque<Segment>,
    /// The retransmission timeout while the backlog waits.
    rto: Option<Duration>,
}

/// A TCP connection: end 0 dialed, end 1 accepted; direction `d` carries
/// what end `d` sends.
#[derive(Debug)]
struct Conn {
    slots: [u32; 2],
    procs: [u32; 2],
    open: [bool; 2],
    /// A closed end that still reads, until when (see [`Net::close_after_farewell`]).
    draining: [Option<Instant>; 2],
    accepted: bool,
    started: Instant,
    dirs: [Dir; 2],
}

/// The network. See the module docs.
#[derive(Debug)]
pub struct Net {
    /// The hosts, by slot.
    pub hosts: Vec<Host>,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    latency: Duration,
    jitter: Duration,
    loss: f64,
    connect_timeout: Duration,
    /// What each host sent.
    pub sent: Vec<Sent>,
    /// The membership records in flight.
    pub(crate) records: Records,
    /// Membership records sent in `peers` frames, summed over every host:
    /// what catch-up views and relays cost beyond their frame count.
    pub records_sent: RecordsSent,
}

/// Membership records sent, by what they say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RecordsSent {
    /// `alive` (joins, refutations, views) and `suspect` without an observer.
    pub alive: u64,
    /// Silence alerts (`suspect` with `by`).
    pub alerts: u64,
    /// `failed`.
    pub failed: u64,
    /// `left`.
    pub left: u64,
    /// Probes and their answers (`age_ms`).
    pub probes: u64,
}

impl RecordsSent {
    /// Counts `r`.
    pub fn count(&mut self, r: &proto::frame::PeerRecord) {
        let n = match (r.state.as_str(), r.by, r.age_ms) {
            (_, _, Some(_)) | ("probe", _, _) => &mut self.probes,
            ("suspect", Some(_), _) => &mut self.alerts,
            ("failed", _, _) => &mut self.failed,
            ("left", _, _) => &mut self.left,
            _ => &mut self.alive,
        };
        *n += 1;
    }

    /// Every record.
    pub fn total(&self) -> u64 {
        self.alive + self.alerts + self.failed + self.left + self.probes
    }

    /// The records counted since `before`, each per `per`.
    pub fn rates_since(&self, before: &RecordsSent, per: f64) -> serde_json::Value {
        let r = |a: u64, b: u64| ((a - b) as f64 / per * 10.0).round() / 10.0;
        serde_json::json!({
            "alive": r(self.alive, before.alive),
            "alerts": r(self.alerts, before.alerts),
            "failed": r(self.failed, before.failed),
            "left": r(self.left, before.left),
            "probes": r(self.probes, before.probes),
        })
    }
}

/// The address of host `slot`.
pub fn host_ip(slot: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (slot >> 16) as u8, (slot >> 8) as u8, slot as u8)
}

/// The host of an address, if it is one of ours.
pub fn slot_of(ip: IpAddr, hosts: usize) -> Option<u32> {
    let IpAddr::V4(v4) = ip else { return None };
    let [a, b, c, d] = v4.octets();
    if a != 127 || b == 0 {
        return None;
    }
    let slot = (u32::from(b - 1) << 16) | (u32::from(c) << 8) | u32::from(d);
    ((slot as usize) < hosts).then_some(slot)
}

impl Net {
    /// `hosts` hosts, all down, all in group 0.
    pub fn new(
        hosts: usize,
        latency: Duration,
        jitter: Duration,
        loss: f64,
        connect_timeout: Duration,
    ) -> Net {
        Net {
            hosts: vec![
                Host {
                    group: 0,
                    proc: 0,
                    status: HostStatus::Down,
                };
                hosts
            ],
            conns: HashMap::new(),
            next_conn: 0,
            latency,
            jitter,
            loss: loss.clamp(0.0, 1.0),
            connect_timeout,
            sent: vec![Sent::default(); hosts],
            records: Records::default(),
            records_sent: RecordsSent::default(),
        }
    }

    /// Connections that still have an open end.
    pub fn conns(&self) -> usize {
        self.conns.len()
    }

    /// Whether hosts `a` and `b` can reach each other.
    pub fn reachable(&self, a: u32, b: u32) -> bool {
        match (self.hosts.get(a as usize), self.hosts.get(b as usize)) {
            (Some(x), Some(y)) => x.group == y.group,
            _ => false,
        }
    }

    /// Puts every host in the group given by `groups` (by slot).
    pub fn set_groups(&mut self, groups: &[u32]) {
        for (h, g) in self.hosts.iter_mut().zip(groups) {
            h.group = *g;
        }
    }

    /// One packet's one-way latency.
    fn delay(&self, rng: &mut StdRng) -> Duration {
        if self.jitter.is_zero() {
            return self.latency;
        }
        let offset = self.jitter.mul_f64(rng.gen::<f64>() * 2.0);
        (self.latency + offset).saturating_sub(self.jitter)
    }

    fn lost(&self, rng: &mut StdRng) -> bool {
        self.loss > 0.0 && rng.gen_bool(self.loss)
    }

    /// One segment's delay: latency plus the retransmissions of its losses.
    fn tcp_delay(&self, rng: &mut StdRng) -> Duration {
        let mut extra = Duration::ZERO;
        let mut rto = RTO_MIN;
        let mut losses = 0;
        while losses < MAX_LOSSES && self.lost(rng) {
            extra += rto;
            rto = (rto * 2).min(RTO_MAX);
            losses += 1;
        }
        self.delay(rng) + extra
    }

    /// A multicast datagram from `from` (source address `src`) to every
    /// other host of its group whose process listens.
    pub(crate) fn multicast(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        from: u32,
        src: SocketAddr,
        beacon: Rc<Beacon>,
    ) {
        self.sent[from as usize].count(Kind::Beacon);
        let group = self.hosts[from as usize].group;
        for slot in 0..self.hosts.len() as u32 {
            let h = &self.hosts[slot as usize];
            if slot == from || h.group != group || h.status == HostStatus::Down {
                continue;
            }
            if self.lost(rng) {
                continue;
            }
            let at = now + self.delay(rng);
            q.push(
                at,
                Ev::Deliver {
                    slot,
                    proc: None,
                    input: Input::Datagram {
                        src,
                        beacon: beacon.clone(),
                    },
                },
            );
        }
    }

    /// A unicast datagram from `from` to the discovery socket at `to`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn unicast(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        from: u32,
        src: SocketAddr,
        to: SocketAddr,
        beacon: Rc<Beacon>,
    ) {
        self.sent[from as usize].count(Kind::Reply);
        let Some(slot) = slot_of(to.ip(), self.hosts.len()) else {
            return;
        };
        if !self.reachable(from, slot) || self.lost(rng) {
            return;
        }
        let at = now + self.delay(rng);
        q.push(
            at,
            Ev::Deliver {
                slot,
                proc: None,
                input: Input::Datagram { src, beacon },
            },
        );
    }

    /// Starts a TCP connect from the process `proc` of host `from` to `to`.
    pub(crate) fn connect(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        from: (u32, u32),
        to: SocketAddr,
    ) -> ConnId {
        self.next_conn += 1;
        let id = self.next_conn;
        let target = slot_of(to.ip(), self.hosts.len()).unwrap_or(u32::MAX);
        let dir = || Dir {
            ready_at: now,
            backlog: VecDeque::new(),
            rto: None,
        };
        self.conns.insert(
            id,
            Conn {
                slots: [from.0, target],
                procs: [from.1, 0],
                open: [true, false],
                draining: [None; 2],
                accepted: false,
                started: now,
                dirs: [dir(), dir()],
            },
        );
        self.syn_send(now, rng, q, id, 0);
        id
    }

    /// SYN attempt `attempt` of `conn` leaves the dialer's host.
    pub(crate) fn syn_send(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        conn: ConnId,
        attempt: u32,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if !c.open[0] || c.accepted {
            return;
        }
        let (slots, started) = (c.slots, c.started);
        // The SYN or its answer may be lost: either loss costs an attempt.
        let through = self.reachable(slots[0], slots[1]) && !self.lost(rng) && !self.lost(rng);
        if through {
            let at = now + self.delay(rng);
            q.push(at, Ev::Syn { conn });
        }
        let next = attempt + 1;
        let backoff = SYN_RTO * ((1u32 << next.min(16)) - 1);
        if backoff < self.connect_timeout {
            q.push(
                started + backoff,
                Ev::SynSend {
                    conn,
                    attempt: next,
                },
            );
        }
    }

    /// A SYN reaches the acceptor's host: its kernel completes the connect
    /// if a process listens there (running or paused), else resets it.
    pub(crate) fn on_syn(&mut self, now: Instant, rng: &mut StdRng, q: &mut Queue, conn: ConnId) {
        let delay = self.delay(rng);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.open[0] || c.accepted {
            return; // the dialer gave up, or a retransmitted SYN
        }
        let host = &self.hosts[c.slots[1] as usize];
        let dialer = Ev::Deliver {
            slot: c.slots[0],
            proc: Some(c.procs[0]),
            input: Input::ConnectDone {
                conn,
                refused: host.status == HostStatus::Down,
            },
        };
        if host.status != HostStatus::Down {
            c.accepted = true;
            c.procs[1] = host.proc;
            c.open[1] = true;
            q.push(
                now,
                Ev::Deliver {
                    slot: c.slots[1],
                    proc: Some(host.proc),
                    input: Input::Accepted { conn },
                },
            );
        }
        q.push(now + delay, dialer);
    }

    /// Whether end `end` of `conn` is open.
    pub fn is_open(&self, conn: ConnId, end: usize) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.open[end])
    }

    /// Sends `seg` from end `from` of `conn`, in order after everything
    /// sent before on that direction.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        conn: ConnId,
        from: usize,
        seg: Segment,
        kind: Kind,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if !c.open[from] {
            return;
        }
        let slots = c.slots;
        if !matches!(seg, Segment::Fin | Segment::Rst) {
            self.sent[slots[from] as usize].count(kind);
        }
        let reachable = self.reachable(slots[0], slots[1]);
        let delay = self.tcp_delay(rng);
        let c = self.conns.get_mut(&conn).expect("looked up above");
        let d = &mut c.dirs[from];
        if d.rto.is_some() {
            d.backlog.push_back(seg);
            return;
        }
        if !reachable {
            d.backlog.push_back(seg);
            d.rto = Some(RTO_MIN);
            q.push(now + RTO_MIN, Ev::Retransmit { conn, dir: from });
            return;
        }
        let at = (now + delay).max(d.ready_at);
        d.ready_at = at;
        let to = 1 - from;
        q.push(
            at,
            Ev::Deliver {
                slot: c.slots[to],
                proc: Some(c.procs[to]),
                input: Input::Segment { conn, end: to, seg },
            },
        );
    }

    /// A retransmission timer of direction `dir` of `conn`: the backlog gets
    /// through if the partition has healed, else the timer backs off.
    pub(crate) fn on_retransmit(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        conn: ConnId,
        dir: usize,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(rto) = c.dirs[dir].rto else { return };
        if !self.reachable(c.slots[0], c.slots[1]) {
            let rto = (rto * 2).min(RTO_MAX);
            self.conns.get_mut(&conn).expect("looked up above").dirs[dir].rto = Some(rto);
            q.push(now + rto, Ev::Retransmit { conn, dir });
            return;
        }
        let n = c.dirs[dir].backlog.len();
        let delays: Vec<Duration> = (0..n).map(|_| self.tcp_delay(rng)).collect();
        let c = self.conns.get_mut(&conn).expect("looked up above");
        let to = 1 - dir;
        let (slot, proc) = (c.slots[to], c.procs[to]);
        let d = &mut c.dirs[dir];
        d.rto = None;
        for (seg, delay) in d.backlog.drain(..).zip(delays) {
            let at = (now + delay).max(d.ready_at);
            d.ready_at = at;
            q.push(
                at,
                Ev::Deliver {
                    slot,
                    proc: Some(proc),
                    input: Input::Segment { conn, end: to, seg },
                },
            );
        }
    }

    /// End `end` closes its socket: a FIN follows what it sent.
    pub(crate) fn close(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        conn: ConnId,
        end: usize,
    ) {
        self.send(now, rng, q, conn, end, Segment::Fin, Kind::Other);
        self.shut(conn, end);
    }

    /// End `end` closes its socket after writing a farewell (`goodbye`,
    /// `reject`): a FIN follows what it sent, and the end reads on (and
    /// drops what it reads) until the peer's FIN or reset, or for `drain`,
    /// as the daemon's link reader does, so that what the peer sends
    /// meanwhile draws no reset that could overtake the farewell.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn close_after_farewell(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        conn: ConnId,
        end: usize,
        drain: Duration,
    ) {
        self.close(now, rng, q, conn, end);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.draining[end] = Some(now + drain);
        }
    }

    /// Whether closed end `end` still reads `seg` at `now` (and drops it),
    /// instead of answering it with a reset: it closed after a farewell,
    /// and neither the drain's time nor the peer's side has ended. The
    /// peer's FIN or reset ends the drain.
    pub(crate) fn drains(&mut self, now: Instant, conn: ConnId, end: usize, seg: &Segment) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let until = c.draining[end];
        if matches!(seg, Segment::Fin | Segment::Rst) {
            c.draining[end] = None;
        }
        until.is_some_and(|t| now < t)
    }

    /// End `end` is reset (its process crashed, or it was dropped): the
    /// other end gets a reset after one latency, unless it is lost or a
    /// partition is in the way; what end `end` still had to send is gone.
    pub(crate) fn reset(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        conn: ConnId,
        end: usize,
    ) {
        let delay = self.delay(rng);
        let lost = self.lost(rng);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.open[end] {
            return;
        }
        c.dirs[end].backlog.clear();
        c.dirs[end].rto = None;
        let to = 1 - end;
        let reachable = self.hosts.get(c.slots[0] as usize).map(|h| h.group)
            == self.hosts.get(c.slots[1] as usize).map(|h| h.group);
        if c.open[to] && reachable && !lost {
            q.push(
                now + delay,
                Ev::Deliver {
                    slot: c.slots[to],
                    proc: Some(c.procs[to]),
                    input: Input::Segment {
                        conn,
                        end: to,
                        seg: Segment::Rst,
                    },
                },
            );
        }
        self.shut(conn, end);
    }

    /// A segment arrived at the closed end `end`: its kernel answers with a
    /// reset (a reset itself is never answered).
    pub(crate) fn refuse_segment(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        q: &mut Queue,
        conn: ConnId,
        end: usize,
        seg: &Segment,
    ) {
        if matches!(seg, Segment::Rst) {
            return;
        }
        let delay = self.delay(rng);
        let lost = self.lost(rng);
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let to = 1 - end;
        if c.open[to] && !lost && self.reachable(c.slots[0], c.slots[1]) {
            q.push(
                now + delay,
                Ev::Deliver {
                    slot: c.slots[to],
                    proc: Some(c.procs[to]),
                    input: Input::Segment {
                        conn,
                        end: to,
                        seg: Segment::Rst,
                    },
                },
            );
        }
    }

    /// Marks end `end` closed, forgetting the connection once both are.
    fn shut(&mut self, conn: ConnId, end: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.open[end] = false;
            if !c.open[0] && !c.open[1] && (c.accepted || end == 0) {
                self.conns.remove(&conn);
            }
        }
    }
}
