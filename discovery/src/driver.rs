//! The UDP driver: socket setup, reader tasks, writer task, main loop.
//!
//! ## Wake-ups
//! An idle node should cost next to nothing, so the driver arms a timer
//! only for what is due and lets the rest ride on the beacon's wake-up:
//! the multicast rejoin, the pruning of silent sources and the counters'
//! round notification ([`Stats::beacon_round`]) all happen when a beacon is
//! sent, never on timers of their own. The sockets are registered with the
//! runtime for *readability only* and written without waiting (a UDP send
//! does not block but for a full send buffer, which drops the datagram and
//! counts it): a socket registered for writability too would report
//! "writable" again after every send and wake the node for nothing. Right
//! after a multicast send the writer reads what the group socket holds
//! (on Linux our own looped-back beacon is already there when the send
//! returns), so hearing ourselves costs no wake-up of its own either.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::addr_rule::{self, AddrRule, Cidr};
use proto::beacon::{Beacon, BeaconKind, Extensions};
use proto::secure::{open_beacon_with, seal_beacon_with, ReplayGuard, SendClock, SharedKeyring};
use proto::stats::Tally;
use proto::{Incarnation, NodeId};
use rand::Rng;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::budget::Budget;
use crate::pacing;
use crate::sources::{Limits, SourceTable, Verdict};

/// Raw datagrams waiting for the main loop. A flood beyond this is dropped
/// (and counted) at the reader, before any decoding.
const INBOUND_QUEUE: usize = 1024;
/// Datagrams waiting for the writer. Beacons are periodic and replies are
/// rate-limited per source, so this only fills if sending itself stalls.
const OUTBOUND_QUEUE: usize = 256;
/// Receive buffer: larger than any beacon, so that an oversize datagram is
/// still seen (and counted) as such; one larger than the buffer is cut to
/// it, which only understates the length logged. (Three buffers of 64 KiB,
/// one per socket reader and the writer's echo drain, were most of them
/// resident: 10% of a node's private memory.)
const RECV_BUF: usize = 2 * proto::beacon::MAX_BEACON;
/// How often group membership is re-asserted on every interface (at the
/// first beacon this long after the last time). An interface that went away
/// and came back (a container network reconnect) loses its memberships;
/// joining again is harmless when still joined.
const REJOIN_EVERY: Duration = Duration::from_secs(1);
/// How long shutdown waits for the leave beacons to be written.
const LEAVE_FLUSH: Duration = Duration::from_millis(500);
/// Most datagrams the writer reads from the group socket after one
/// multicast send (our own echo, and whatever else is waiting): bounded so
/// that a flood is left to the reader and its admission, not the writer.
const ECHO_DRAIN: usize = 16;

/// A UDP socket registered with the runtime for readability only (see the
/// module docs: "Wake-ups").
type Sock = Arc<AsyncFd<UdpSocket>>;

/// One interface to send beacons on and join the group on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name (`lo`, `eth1`), for logs and status.
    pub name: String,
    /// The address beacons leave from and advertise: of the group's family
    /// (an interface of the other family is skipped with a warning).
    pub addr: IpAddr,
    /// Its prefix length, used to pick the interface a unicast reply
    /// leaves on and for the address rule.
    pub prefix: u8,
    /// The kernel's interface index: IPv6 multicast is joined and sent by
    /// index, and a link-local address is scoped by it. 0 when unknown.
    pub index: u32,
}

impl Interface {
    fn contains(&self, ip: IpAddr) -> bool {
        Cidr::new(self.addr, self.prefix).is_some_and(|c| c.contains(ip))
    }

    /// The scope id a socket address on this interface needs: its index
    /// for an IPv6 link-local address, else 0.
    fn scope(&self) -> u32 {
        match self.addr {
            IpAddr::V6(a) if addr_rule::is_link_local6(a) => self.index,
            _ => 0,
        }
    }

    /// `addr:port` on this interface, scoped when link-local.
    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        match self.addr {
            IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, port, 0, self.scope())),
            IpAddr::V4(a) => SocketAddr::from((a, port)),
        }
    }
}

/// Discovery settings (validated by the caller).
#[derive(Debug, Clone)]
pub struct Config {
    /// Multicast group and port: IPv4 (`239.255.67.76:6776`) or IPv6
    /// (`[ff02::4c:1]:6776`; a link-scoped group is joined on each
    /// interface by index).
    pub group: SocketAddr,
    /// Interfaces to use; unusable ones are skipped with a warning.
    pub interfaces: Vec<Interface>,
    /// Multicast TTL (0 keeps beacons on this host).
    pub ttl: u32,
    /// Mean beacon interval (each wait is jittered by ±10%) while the group
    /// is small; it grows with the group (see [`crate::pacing`]). Also what
    /// a peer's beacon without an interval is assumed to announce at.
    pub interval: Duration,
    /// Cluster name; other clusters' beacons are dropped and counted.
    pub cluster: String,
    /// Flood limits and the node-wide reply and new-peer budgets.
    pub limits: Limits,
    /// Networks whose advertised addresses are accepted besides the
    /// source address and our interfaces' subnets (see
    /// [`proto::addr_rule`]): for peers that `--advertise` across NAT.
    pub allow_advertise: Vec<Cidr>,
    /// The cluster secret: when set, every beacon sent is sealed and only
    /// sealed, authenticated, fresh beacons are accepted.
    pub keyring: Option<SharedKeyring>,
    /// How many members the node knows besides itself, kept current by the
    /// caller (the peer table's confirmed live members): what paces our
    /// beacons and replies ([`crate::pacing`]). `None`: the identities
    /// heard by beacon, which anyone on the group can inflate.
    pub members: Option<Arc<AtomicUsize>>,
    /// This node's current incarnation, when something other than the
    /// start may raise it (the peer table refutes a report of this node's
    /// failure by raising it; see "Bounded overlay" in PROTOCOL.md). Every
    /// beacon carries the larger of it and [`LocalIdentity::incarnation`].
    pub incarnation: Option<Arc<AtomicU64>>,
    /// The period of the node's ping rounds, which fall on wall-clock
    /// multiples of it (see [`proto::link::wall_clock_anchor`]): periodic
    /// beacons go out on the round nearest to when they are due, when the
    /// node is awake anyway ([`pacing::on_round`]). `None`: when due.
    pub rounds: Option<Duration>,
}

/// What this node says about itself in beacons.
#[derive(Debug, Clone)]
pub struct LocalIdentity {
    /// Node id.
    pub id: NodeId,
    /// Incarnation.
    pub incarnation: Incarnation,
    /// Name.
    pub name: String,
    /// TCP data port (advertised with each interface's address).
    pub data_port: u16,
    /// Explicit advertised address, overriding the per-interface one.
    pub advertise: Option<SocketAddr>,
    /// Digest of the tags.
    pub digest: u64,
}

/// Something discovery learned, for the membership task.
#[derive(Debug, Clone)]
pub enum DiscoveryEvent {
    /// A valid beacon of our cluster from another node.
    Beacon {
        /// When it arrived.
        at: std::time::Instant,
        /// Its source address.
        src: SocketAddr,
        /// What it says.
        beacon: Beacon,
        /// How it relates to what we knew of its source.
        verdict: Verdict,
        /// The interval its sender announces at, as this node believes it
        /// ([`pacing::assumed`]): [`Config::interval`] unless the beacon
        /// said it is longer. Silence shorter than a few of these is normal.
        interval: Duration,
    },
}

/// Discovery counters, shared with the control API.
#[derive(Debug, Default)]
pub struct Stats {
    /// Multicast beacons sent (all interfaces).
    pub beacons_sent: AtomicU64,
    /// Unicast replies sent.
    pub replies_sent: AtomicU64,
    /// Valid beacons from other nodes received.
    pub beacons_received: AtomicU64,
    /// Failed sends.
    pub send_errors: AtomicU64,
    /// Whether one of our own multicast beacons came back to us.
    pub loops_back: AtomicBool,
    /// Own multicast beacons heard back (to notice loopback stopping).
    pub own_heard: AtomicU64,
    /// The current mean beacon interval in ms ([`crate::pacing::interval`]
    /// of the members heard); 0 before the first beacon.
    pub interval_ms: AtomicU64,
    /// Notified (all current waiters) each time a round of announces has
    /// been queued: whatever samples these counters can ride on the
    /// beacon's wake-up instead of a timer of its own. Nothing is stored
    /// for a waiter that was not waiting.
    pub beacon_round: Notify,
    /// Dropped datagrams by reason: the decoder's reasons, `cluster`,
    /// `conflict`, `stale`, `rate_limited` and `queue_full` (inbound);
    /// `address` (the advertised address fails the address rule);
    /// `new_peer_budget` (a new or restarted identity refused by the
    /// node-wide budget, admitted from a later beacon); `reply_budget` and
    /// `send_queue_full` (replies and beacons not sent).
    pub drops: Tally,
}

/// Why discovery cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The shared group socket could not be created or bound.
    #[error("cannot bind the multicast group socket {group}: {source}")]
    GroupSocket {
        /// The group.
        group: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Every configured interface failed; the node would be deaf and mute.
    #[error("no usable interface for multicast ({0})")]
    NoUsableInterface(String),
    /// A beacon of ours cannot be encoded (name too long for 1200 bytes).
    #[error("cannot build our beacon: {0}")]
    Beacon(#[from] proto::BeaconError),
}

/// Sockets bound and ready; [`Bound::run`] starts the tasks.
#[derive(Debug)]
pub struct Bound {
    cfg: Config,
    local: LocalIdentity,
    group: Sock,
    ifaces: Vec<(Interface, Sock)>,
    rule: AddrRule,
    stats: Arc<Stats>,
    send_clock: Mutex<SendClock>,
}

/// Whether an IPv6 multicast group is link-scoped (`ffx2::`): binding to
/// it needs an interface, and it never leaves the link.
fn link_scoped(group: &Ipv6Addr) -> bool {
    group.segments()[0] & 0x000f == 2
}

fn group_socket(group: SocketAddr, ifaces: &[Interface]) -> io::Result<Socket> {
    let domain = if group.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?; // several nodes per host share the group port
    s.set_nonblocking(true)?;
    // Only the groups this socket joined, not every group any process joined
    // on this port (Linux defaults to all). Bound to the group address
    // itself: unicast to the port never lands here.
    let bind_to = match group {
        SocketAddr::V4(_) => {
            s.set_multicast_all_v4(false)?;
            group
        }
        SocketAddr::V6(g) => {
            s.set_only_v6(true)?;
            s.set_multicast_all_v6(false)?;
            // A link-scoped group is bound with its interface's scope; with
            // several interfaces the wildcard (the joins still filter).
            match ifaces {
                [one] if link_scoped(g.ip()) => {
                    SocketAddr::V6(SocketAddrV6::new(*g.ip(), g.port(), 0, one.index))
                }
                _ if link_scoped(g.ip()) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, g.port())),
                _ => group,
            }
        }
    };
    s.bind(&bind_to.into())?;
    Ok(s)
}

fn join(group_sock: &Socket, group: SocketAddr, iface: &Interface) -> io::Result<()> {
    match (group.ip(), iface.addr) {
        (IpAddr::V4(g), IpAddr::V4(a)) => group_sock.join_multicast_v4(&g, &a),
        (IpAddr::V6(g), IpAddr::V6(_)) => group_sock.join_multicast_v6(&g, iface.index),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "address family differs from the group's",
        )),
    }
}

fn send_socket(iface: &Interface, ttl: u32) -> io::Result<Sock> {
    let s = match iface.addr {
        IpAddr::V4(a) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_multicast_if_v4(&a)?;
            s.set_multicast_ttl_v4(ttl)?;
            s.set_multicast_loop_v4(true)?; // same-host nodes must hear us
            s
        }
        IpAddr::V6(_) => {
            let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_only_v6(true)?;
            s.set_multicast_if_v6(iface.index)?;
            s.set_multicast_hops_v6(ttl)?;
            s.set_multicast_loop_v6(true)?;
            s
        }
    };
    s.set_nonblocking(true)?;
    // Its own port: the source address of our datagrams identifies us.
    s.bind(&iface.socket_addr(0).into())?;
    readable(s.into())
}

/// Registers a (non-blocking) socket with the runtime for readability only.
///
/// `tokio::net::UdpSocket` always registers for writability too, which is
/// what we must avoid here (see the module docs, "Wake-ups"); `AsyncFd` is
/// the one way to choose. Its safe constructor is deprecated because a
/// wrapped object might hand out a descriptor it does not own, which could
/// be closed and reused under the registration: a `std::net::UdpSocket`
/// owns its descriptor for its whole life and always returns the same one,
/// so that cannot happen, and the replacement is `unsafe`, which this crate
/// forbids.
#[allow(deprecated)]
fn readable(s: UdpSocket) -> io::Result<Sock> {
    AsyncFd::with_interest(s, Interest::READABLE).map(Arc::new)
}

/// Receives one datagram: waits until the socket is readable, then reads
/// without blocking. Cancel-safe: a datagram is either returned or left in
/// the socket.
async fn recv_from(sock: &AsyncFd<UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    loop {
        let mut ready = sock.readable().await?;
        match ready.try_io(|s| s.get_ref().recv_from(buf)) {
            Ok(got) => return got,
            // Read by someone else first (the writer's echo drain): wait again.
            Err(_would_block) => continue,
        }
    }
}

/// Creates the group socket and one send socket per usable interface.
/// Must be called within a tokio runtime.
pub fn bind(cfg: Config, local: LocalIdentity) -> Result<Bound, DiscoveryError> {
    let family: Vec<Interface> = cfg
        .interfaces
        .iter()
        .filter(|i| i.addr.is_ipv6() == cfg.group.is_ipv6())
        .cloned()
        .collect();
    let group = group_socket(cfg.group, &family).map_err(|source| DiscoveryError::GroupSocket {
        group: cfg.group,
        source,
    })?;
    let mut ifaces = Vec::new();
    let mut errors = Vec::new();
    for iface in &cfg.interfaces {
        let joined = join(&group, cfg.group, iface);
        let sock = joined.and_then(|()| send_socket(iface, cfg.ttl));
        match sock {
            Ok(sock) => ifaces.push((iface.clone(), sock)),
            Err(error) => {
                warn!(interface = %iface.name, addr = %iface.addr, %error, "skipping interface");
                errors.push(format!("{} ({}): {error}", iface.name, iface.addr));
            }
        }
    }
    if ifaces.is_empty() {
        return Err(DiscoveryError::NoUsableInterface(if errors.is_empty() {
            "none configured".into()
        } else {
            errors.join("; ")
        }));
    }
    let group = readable(group.into()).map_err(|source| DiscoveryError::GroupSocket {
        group: cfg.group,
        source,
    })?;
    // The interfaces actually in use decide which addresses are ours to dial.
    let rule = AddrRule::from_prefixes(
        ifaces.iter().map(|(i, _)| (i.addr, i.prefix)),
        cfg.allow_advertise.iter().copied(),
    );
    let bound = Bound {
        cfg,
        local,
        group,
        ifaces,
        rule,
        stats: Arc::new(Stats::default()),
        send_clock: Mutex::new(SendClock::default()),
    };
    // Fail now, not in the loop; with the longest interval the beacon may
    // ever carry, so that growing never makes it too large.
    let longest = Extensions {
        interval: Some(pacing::MAX_ADVERTISED),
    };
    for i in 0..bound.ifaces.len() {
        bound.datagram(BeaconKind::Announce, i, &longest)?;
    }
    Ok(bound)
}

/// A datagram for the writer.
struct Outgoing {
    iface: usize,
    to: SocketAddr,
    datagram: Bytes,
    reply: bool,
}

/// A datagram from a reader.
struct Incoming {
    data: Bytes,
    src: SocketAddr,
}

impl Bound {
    /// The interfaces in use.
    pub fn interfaces(&self) -> Vec<Interface> {
        self.ifaces.iter().map(|(i, _)| i.clone()).collect()
    }

    /// The address rule applied to every beacon (the interfaces in use and
    /// the allow-list), for the daemon to apply to addresses it learns
    /// elsewhere, such as TCP hellos.
    pub fn addr_rule(&self) -> AddrRule {
        self.rule.clone()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The data address advertised on each interface, in order.
    pub fn advertised(&self) -> Vec<SocketAddr> {
        self.ifaces
            .iter()
            .map(|(i, _)| self.advertised_on(i))
            .collect()
    }

    /// Source addresses our datagrams leave from.
    pub fn send_addrs(&self) -> Vec<SocketAddr> {
        self.ifaces
            .iter()
            .filter_map(|(_, s)| s.get_ref().local_addr().ok())
            .collect()
    }

    fn advertised_on(&self, iface: &Interface) -> SocketAddr {
        self.local
            .advertise
            .unwrap_or_else(|| iface.socket_addr(self.local.data_port))
    }

    /// The incarnation our beacons carry now: the start's, or a higher one
    /// a refutation raised ([`Config::incarnation`]).
    fn incarnation(&self) -> Incarnation {
        let raised = self
            .cfg
            .incarnation
            .as_ref()
            .map_or(0, |a| a.load(Ordering::Relaxed));
        self.local.incarnation.max(raised)
    }

    /// The datagram of a beacon of `kind` for interface `i` (advertising
    /// that interface's address). With a cluster secret it is sealed afresh
    /// (new nonce, new send time) under the primary key at every call.
    fn datagram(
        &self,
        kind: BeaconKind,
        i: usize,
        ext: &Extensions,
    ) -> Result<Bytes, proto::BeaconError> {
        let beacon = Beacon {
            cluster: self.cfg.cluster.clone(),
            id: self.local.id,
            incarnation: self.incarnation(),
            name: self.local.name.clone(),
            addr: self.advertised_on(&self.ifaces[i].0),
            kind,
            digest: self.local.digest,
        };
        let Some(ring) = &self.cfg.keyring else {
            return beacon.encode_with(ext);
        };
        let key = ring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .primary()
            .clone();
        let sent = self
            .send_clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stamp(wall_ms());
        seal_beacon_with(&key, &beacon, ext, sent, rand::random())
    }

    /// Queues a beacon of `kind` on interface `i` to `to`; counts a drop
    /// when the writer's queue is full.
    fn queue(
        &self,
        out_tx: &mpsc::Sender<Outgoing>,
        (kind, ext): (BeaconKind, &Extensions),
        i: usize,
        to: SocketAddr,
    ) {
        let datagram = match self.datagram(kind, i, ext) {
            Ok(d) => d,
            Err(error) => {
                // Checked in `bind`; only a keyring edit could change it.
                warn!(%error, "cannot build a beacon");
                return;
            }
        };
        let reply = kind == BeaconKind::Reply;
        let out = Outgoing {
            iface: i,
            to,
            datagram,
            reply,
        };
        if out_tx.try_send(out).is_err() {
            self.stats.drops.record(now_std(), "send_queue_full");
        }
    }

    /// Which interface a reply to `ip` should leave on.
    fn iface_for(&self, src: SocketAddr) -> usize {
        let ip = src.ip();
        let scope = match src {
            SocketAddr::V6(s) => s.scope_id(),
            SocketAddr::V4(_) => 0,
        };
        self.ifaces
            .iter()
            .position(|(i, _)| i.addr == ip)
            .or_else(|| {
                // A link-local source names its link by scope id.
                (scope != 0)
                    .then(|| self.ifaces.iter().position(|(i, _)| i.index == scope))
                    .flatten()
            })
            .or_else(|| self.ifaces.iter().position(|(i, _)| i.contains(ip)))
            .unwrap_or(0)
    }

    /// Runs discovery until `cancel` fires, then sends a leave beacon on
    /// every interface. Valid beacons go to `events`.
    pub async fn run(self, events: mpsc::Sender<DiscoveryEvent>, cancel: CancellationToken) {
        let tasks = TaskTracker::new();
        let stats = self.stats.clone();
        // Readers and the writer's echo drain: raw datagrams into one
        // bounded queue.
        let (in_tx, mut in_rx) = mpsc::channel::<Incoming>(INBOUND_QUEUE);
        // Writer: the only code that sends.
        let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(OUTBOUND_QUEUE);
        let socks: Vec<Sock> = self.ifaces.iter().map(|(_, s)| s.clone()).collect();
        let (wstats, group, echo_tx) = (stats.clone(), self.group.clone(), in_tx.clone());
        let writer = tasks.spawn(async move {
            let mut buf = vec![0u8; RECV_BUF];
            // Ends when every sender is gone, after draining (leave beacons).
            while let Some(out) = out_rx.recv().await {
                // Never waits: see the module docs ("Wake-ups").
                match socks[out.iface].get_ref().send_to(&out.datagram, out.to) {
                    Ok(_) if out.reply => {
                        wstats.replies_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        wstats.beacons_sent.fetch_add(1, Ordering::Relaxed);
                        drain_echo(&group, &echo_tx, &wstats, &mut buf);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The kernel's send buffer is full: a queue, not a
                        // broken interface (a beacon is best-effort).
                        wstats.drops.record(now_std(), "send_queue_full");
                    }
                    Err(error) => {
                        debug!(to = %out.to, %error, "beacon send failed");
                        wstats.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });

        // Readers: one per socket.
        let mut readers: Vec<Sock> = vec![self.group.clone()];
        readers.extend(self.ifaces.iter().map(|(_, s)| s.clone()));
        for sock in readers {
            let (tx, cancel, stats) = (in_tx.clone(), cancel.clone(), stats.clone());
            tasks.spawn(async move {
                let mut buf = vec![0u8; RECV_BUF];
                loop {
                    let got = tokio::select! {
                        () = cancel.cancelled() => break,
                        got = recv_from(&sock, &mut buf) => got, // cancel-safe
                    };
                    match got {
                        Ok((n, src)) => forward(&tx, &stats, &buf[..n], src),
                        // ICMP errors of earlier sends surface here; transient.
                        Err(error) => debug!(%error, "datagram receive failed"),
                    }
                }
            });
        }
        drop(in_tx);

        let own: Vec<SocketAddr> = self.send_addrs();
        let mut sources = SourceTable::new(self.cfg.limits);
        let mut budget = Budget::new(
            self.cfg.limits.replies,
            self.cfg.limits.new_peers,
            now_std(),
        );
        let mut replay = ReplayGuard::default();
        // Announce at once; later beacons on the node's ping rounds.
        let rounds = self.cfg.rounds.map(|every| {
            let since_epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let now = now_std();
            (
                proto::link::wall_clock_anchor(now, since_epoch, every),
                every,
            )
        });
        let mut clock = BeaconClock::new(Instant::now(), rounds);
        let mut next_prune = Instant::now() + self.cfg.limits.forget_after;
        let mut next_rejoin = Instant::now() + REJOIN_EVERY;
        let configured = self.cfg.interval;
        info!(
            group = %self.cfg.group,
            interfaces = ?self.ifaces.iter().map(|(i, _)| &i.name).collect::<Vec<_>>(),
            advertise = ?self.advertised(),
            "discovery started"
        );

        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                // The only timer this loop arms: everything periodic below
                // rides on it.
                which = clock.next() => {
                    // Paced by the members we know (ourselves included).
                    let interval = pacing::interval(configured, self.members(&sources));
                    let ext = self.extensions(interval);
                    for i in 0..self.ifaces.len() {
                        self.queue(&out_tx, (BeaconKind::Announce, &ext), i, self.cfg.group);
                    }
                    stats.interval_ms.store(interval.as_millis() as u64, Ordering::Relaxed);
                    stats.beacon_round.notify_waiters();
                    let now = Instant::now();
                    let jitter = rand::thread_rng().gen_range(0.9..1.1);
                    clock.rearm(which, now, interval.mul_f64(jitter));
                    if now >= next_rejoin {
                        self.rejoin();
                        next_rejoin = now + REJOIN_EVERY;
                    }
                    // Late by up to one interval, which only delays
                    // forgetting (a full table prunes on admission anyway).
                    if now >= next_prune {
                        sources.prune(now.into_std());
                        next_prune = now + self.cfg.limits.forget_after;
                    }
                }
                item = in_rx.recv() => {
                    let Some(item) = item else { break };
                    let now = now_std();
                    let Some(ev) = self.classify(now, &mut sources, &mut budget, &mut replay, &own, item) else { continue };
                    let DiscoveryEvent::Beacon { src, ref beacon, verdict, .. } = ev;
                    // A newcomer's first announce: about REPLIERS members
                    // answer it, chosen by hash, not all of them.
                    if beacon.kind == BeaconKind::Announce
                        && verdict == Verdict::New
                        && pacing::answers(self.local.id, beacon.id, self.answerers(&sources))
                        && sources.should_reply(now, src, configured)
                    {
                        if budget.replies.try_take(now) {
                            let interval = pacing::interval(configured, self.members(&sources));
                            let ext = self.extensions(interval);
                            self.queue(&out_tx, (BeaconKind::Reply, &ext), self.iface_for(src), src);
                        } else if stats.drops.record(now, "reply_budget") {
                            warn!(%src, "reply budget spent: not answering every newcomer (further refusals are counted, not logged)");
                        }
                    }
                    if events.try_send(ev).is_err() {
                        stats.drops.record(now, "event_queue_full");
                    }
                }
            }
        }

        // Graceful: tell everyone we leave, then let the writer drain.
        let interval = pacing::interval(configured, self.members(&sources));
        let ext = self.extensions(interval);
        for i in 0..self.ifaces.len() {
            self.queue(&out_tx, (BeaconKind::Leave, &ext), i, self.cfg.group);
        }
        drop(out_tx);
        tasks.close();
        if tokio::time::timeout(LEAVE_FLUSH, writer).await.is_err() {
            warn!("leave beacons not flushed in time");
        }
        tasks.wait().await;
        info!("discovery stopped");
    }

    /// The members of the group as far as this node knows, itself included.
    fn members(&self, sources: &SourceTable) -> usize {
        let others = match &self.cfg.members {
            Some(known) => known.load(Ordering::Relaxed),
            None => sources.identities(),
        };
        others.saturating_add(1)
    }

    /// The members that may answer a newcomer's first announce: all we
    /// know but the newcomer. The peer table does not hold it yet (so
    /// ourselves are added); the beacon count already does (so it stands
    /// in for us).
    fn answerers(&self, sources: &SourceTable) -> usize {
        match &self.cfg.members {
            Some(known) => known.load(Ordering::Relaxed).saturating_add(1),
            None => sources.identities(),
        }
    }

    /// What our beacons carry besides the basics at `interval`: the
    /// interval itself only while it is scaled, so that a small group's
    /// beacons are byte-for-byte those of builds without pacing.
    fn extensions(&self, interval: Duration) -> Extensions {
        Extensions {
            interval: pacing::advertised(self.cfg.interval, interval),
        }
    }

    /// Joins the group again on every interface; "already joined" is the
    /// usual answer and is fine.
    fn rejoin(&self) {
        for (iface, _) in &self.ifaces {
            match join(
                &socket2::SockRef::from(self.group.get_ref()),
                self.cfg.group,
                iface,
            ) {
                Ok(()) => info!(interface = %iface.name, "multicast membership restored"),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
                Err(error) => {
                    debug!(interface = %iface.name, %error, "cannot rejoin the group yet")
                }
            }
        }
    }

    /// Admission, decoding and demultiplexing of one datagram. Returns the
    /// event to emit, or `None` when it was dropped (and counted) or was our
    /// own beacon looping back.
    fn classify(
        &self,
        now: std::time::Instant,
        sources: &mut SourceTable,
        budget: &mut Budget,
        replay: &mut ReplayGuard,
        own: &[SocketAddr],
        item: Incoming,
    ) -> Option<DiscoveryEvent> {
        let stats = &self.stats;
        let src = item.src;
        if !sources.admit(now, src) {
            stats.drops.record(now, "rate_limited");
            return None;
        }
        let drop = |error: proto::BeaconError| {
            if stats.drops.record(now, error.reason()) {
                warn!(%src, %error, "dropping datagram (further drops of this kind are counted, not logged)");
            }
        };
        let opened = match &self.cfg.keyring {
            None => Beacon::decode_with(&item.data).map(|(b, ext)| (b, ext, None)),
            Some(ring) => {
                let ring = ring.read().unwrap_or_else(|e| e.into_inner());
                open_beacon_with(&ring, &item.data).map(|(b, ext, sent)| (b, ext, Some(sent)))
            }
        };
        let (mut beacon, ext, sent) = match opened {
            Ok(b) => b,
            Err(error) => {
                drop(error);
                return None;
            }
        };
        if beacon.id == self.local.id {
            if own.contains(&src) {
                stats.loops_back.store(true, Ordering::Relaxed);
                stats.own_heard.fetch_add(1, Ordering::Relaxed);
            } else if stats.drops.record(now, "conflict") {
                warn!(%src, id = %beacon.id, "another source claims our own node id");
            }
            return None;
        }
        if let Some(sent) = sent {
            if let Err(error) = replay.check(beacon.id, sent, wall_ms()) {
                drop(error);
                return None;
            }
        }
        if beacon.cluster != self.cfg.cluster {
            if stats.drops.record(now, "cluster") {
                warn!(%src, cluster = %beacon.cluster, ours = %self.cfg.cluster, "dropping beacon of another cluster");
            }
            return None;
        }
        // A link-local address is on the link the datagram came in on.
        beacon.addr = addr_rule::scoped_like(beacon.addr, src);
        if let Err(why) = self.rule.check(beacon.addr, src.ip()) {
            if stats.drops.record(now, addr_rule::DROP_REASON) {
                warn!(%src, addr = %beacon.addr, id = %beacon.id, %why,
                    "refusing a beacon whose address this node must not dial (further refusals are counted, not logged)");
            }
            return None;
        }
        let verdict = sources.judge(now, src, beacon.id, beacon.incarnation);
        // What makes the peer table create or replace an entry, and dial,
        // draws on the node-wide budget. Leaves never do. Nothing is
        // recorded for a refused beacon: the sender's next one asks again.
        let admits = matches!(verdict, Verdict::New | Verdict::Restarted { .. });
        if admits && beacon.kind != BeaconKind::Leave && !budget.new_peers.try_take(now) {
            if stats.drops.record(now, "new_peer_budget") {
                warn!(%src, id = %beacon.id,
                    "new-peer budget spent: refusing new identities for now (further refusals are counted, not logged)");
            }
            return None;
        }
        let verdict = sources.commit(now, src, beacon.id, beacon.incarnation, verdict);
        match verdict {
            Verdict::Conflict { holder } => {
                if stats.drops.record(now, "conflict") {
                    warn!(%src, %holder, id = %beacon.id, name = %beacon.name,
                        "two live sources claim one node id; keeping the first");
                }
                return None;
            }
            Verdict::Stale => {
                stats.drops.record(now, "stale");
                return None;
            }
            Verdict::Moved { from } => {
                info!(id = %beacon.id, name = %beacon.name, %from, to = %src, "peer moved");
            }
            _ => {}
        }
        // Its silence is judged by the interval it says it keeps.
        let interval = pacing::assumed(self.cfg.interval, ext.interval);
        sources.note_interval(src, interval);
        stats.beacons_received.fetch_add(1, Ordering::Relaxed);
        Some(DiscoveryEvent::Beacon {
            at: now,
            src,
            beacon,
            verdict,
            interval,
        })
    }
}

/// The beacon timer, armed one round ahead.
///
/// Two timers take turns: while one waits for the next beacon, the other
/// already waits for the one after it. Tokio's timer driver writes to its
/// wake-up descriptor whenever a task arms a timer earlier than every timer
/// it holds, even from the runtime's own thread, and that costs the node an
/// extra wake-up; re-arming at each beacon a timer that is later than one
/// already armed never does. Which of the two fires is all that differs.
///
/// With ping rounds given, each beacon after the first goes out on the
/// round nearest to when it is due ([`pacing::on_round`]); the jittered
/// series of due times is kept apart from the rounded deadlines, so that
/// rounding neither drifts the mean interval nor erases the jitter.
struct BeaconClock {
    timers: [Pin<Box<Sleep>>; 2],
    /// When each timer's beacon is due, before it is put on a round.
    due: [Instant; 2],
    rounds: Option<(std::time::Instant, Duration)>,
}

impl BeaconClock {
    /// Both timers at `first`: the first beacon goes out then, and
    /// [`BeaconClock::rearm`] spaces out the ones after it.
    fn new(first: Instant, rounds: Option<(std::time::Instant, Duration)>) -> Self {
        BeaconClock {
            timers: [Box::pin(sleep_until(first)), Box::pin(sleep_until(first))],
            due: [first; 2],
            rounds,
        }
    }

    fn set(&mut self, i: usize, due: Instant, gap: Duration) {
        self.due[i] = due;
        let at = pacing::on_round(due.into_std(), gap, self.rounds);
        self.timers[i].as_mut().reset(Instant::from_std(at));
    }

    /// Waits for the next beacon; returns which timer it was. Cancel-safe
    /// (only polls timers).
    fn next(&mut self) -> impl Future<Output = usize> + '_ {
        std::future::poll_fn(|cx| {
            // The earlier one first, so that two timers due together
            // fire in order.
            let mut order = [0, 1];
            if self.timers[1].deadline() < self.timers[0].deadline() {
                order.swap(0, 1);
            }
            for i in order {
                if self.timers[i].as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(i);
                }
            }
            std::task::Poll::Pending
        })
    }

    /// Timer `fired` fired at `now`: the other one is the next beacon, this
    /// one is re-armed `gap` after it. The other one is re-armed too if it
    /// is already due (the first round, or a stall): the next beacon then
    /// comes `gap` after this one, never two at once.
    fn rearm(&mut self, fired: usize, now: Instant, gap: Duration) {
        let other = 1 - fired;
        if self.timers[other].deadline() <= now {
            self.set(other, now + gap, gap);
        }
        self.set(fired, self.due[other] + gap, gap);
    }
}

/// Hands one received datagram to the main loop; counts a drop when its
/// queue is full.
fn forward(tx: &mpsc::Sender<Incoming>, stats: &Stats, data: &[u8], src: SocketAddr) {
    let item = Incoming {
        data: Bytes::copy_from_slice(data),
        src,
    };
    if tx.try_send(item).is_err() {
        stats.drops.record(now_std(), "queue_full");
    }
}

/// Reads what the group socket holds right after a multicast send, without
/// waiting: our own echo is usually there already, and reading it before
/// the runtime polls again spares the node a wake-up per beacon. Whatever
/// is not there yet is read by the group socket's reader as usual.
fn drain_echo(
    group: &AsyncFd<UdpSocket>,
    tx: &mpsc::Sender<Incoming>,
    stats: &Stats,
    buf: &mut [u8],
) {
    for _ in 0..ECHO_DRAIN {
        match group.get_ref().recv_from(buf) {
            Ok((n, src)) => forward(tx, stats, &buf[..n], src),
            // Nothing (more) waiting, or an error the reader will see too.
            Err(_) => break,
        }
    }
}

/// Wall-clock ms since the Unix epoch: the send time of sealed beacons.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The driver's clock, from tokio so that paused-time tests control it.
fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lo() -> Interface {
        Interface {
            name: "lo".into(),
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            prefix: 8,
            index: 0,
        }
    }

    /// A group and port of this test's own (a free port, so that parallel
    /// tests and other processes do not hear each other).
    fn unique_group() -> SocketAddr {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port")
            .port();
        SocketAddr::from(([239, 255, 91, (port % 250) as u8 + 1], port))
    }

    fn config(group: SocketAddr) -> Config {
        Config {
            group,
            interfaces: vec![lo()],
            ttl: 0,
            interval: Duration::from_millis(50),
            cluster: "t".into(),
            limits: Limits::default(),
            allow_advertise: Vec::new(),
            keyring: None,
            members: None,
            incarnation: None,
            rounds: None,
        }
    }

    fn identity(id: u128) -> LocalIdentity {
        LocalIdentity {
            id: NodeId(id),
            incarnation: 1,
            name: format!("n{id}"),
            data_port: 7000 + id as u16,
            advertise: None,
            digest: 0,
        }
    }

    /// Two nodes on loopback hear each other (events) and themselves (the
    /// echo the writer reads right after sending), and each round of
    /// announces is notified with the interval in use.
    #[tokio::test]
    async fn nodes_hear_each_other_and_their_own_echo() {
        let group = unique_group();
        let cancel = CancellationToken::new();
        let mut rxs = Vec::new();
        let mut stats = Vec::new();
        for id in [1, 2] {
            let Ok(bound) = bind(config(group), identity(id)) else {
                eprintln!("no multicast on loopback here: skipped");
                return;
            };
            stats.push(bound.stats());
            let (tx, rx) = mpsc::channel(64);
            rxs.push(rx);
            tokio::spawn(bound.run(tx, cancel.clone()));
        }
        let heard = async {
            for (i, rx) in rxs.iter_mut().enumerate() {
                let Some(DiscoveryEvent::Beacon {
                    beacon, interval, ..
                }) = rx.recv().await
                else {
                    panic!("discovery ended");
                };
                assert_ne!(beacon.id, NodeId(i as u128 + 1), "own beacon as an event");
                // Two members: unscaled, so the interval is the configured one.
                assert_eq!(interval, Duration::from_millis(50));
            }
            for s in &stats {
                while s.own_heard.load(Ordering::Relaxed) == 0 {
                    s.beacon_round.notified().await;
                }
                assert_eq!(s.interval_ms.load(Ordering::Relaxed), 50);
                assert!(s.loops_back.load(Ordering::Relaxed));
            }
        };
        tokio::time::timeout(Duration::from_secs(10), heard)
            .await
            .expect("both nodes heard within 10 s");
        cancel.cancel();
    }
}
