//! The transport actor: sole owner of the link map, plus the listener and
//! the dial tasks that feed it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use proto::frame::{AppMessage, Reject};
use proto::membership::DialFailure;
use proto::secure::SharedKeyring;
use proto::stats::Tally;
use proto::{Hello, Message, NodeId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::handshake::{self, Halves, HandshakeError};
use crate::link::{spawn_link, LinkHandle, LinkSpec};

/// Transport settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our handshake: identity, cluster, advertised address, tags.
    pub local: Hello,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
    /// How often each side pings on each link.
    pub ping_interval: Duration,
    /// A link silent this long is closed.
    pub link_timeout: Duration,
    /// Bound on a whole handshake.
    pub handshake_timeout: Duration,
    /// Bound on a TCP connect.
    pub connect_timeout: Duration,
    /// Per-link outbound queue, in messages.
    pub queue: usize,
    /// How long an application send waits for queue room before the link is
    /// judged stuck and dropped.
    pub send_timeout: Duration,
    /// Most inbound handshakes in progress at once; more are refused.
    pub max_pending_handshakes: usize,
    /// How often links that carried frames are reported as
    /// [`TransportEvent::Heard`].
    pub liveness_report: Duration,
    /// The cluster secret: when set, every link is a Noise handshake under
    /// one of these keys and every frame is sealed; plaintext is refused.
    pub keyring: Option<SharedKeyring>,
}

impl Config {
    /// Defaults around `local`.
    pub fn new(local: Hello) -> Self {
        Config {
            local,
            max_frame: proto::frame::DEFAULT_MAX_FRAME,
            ping_interval: Duration::from_millis(200),
            link_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            queue: 1024,
            send_timeout: Duration::from_secs(2),
            max_pending_handshakes: 64,
            liveness_report: Duration::from_millis(50),
            keyring: None,
        }
    }
}

/// Transport counters, shared with the control API.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames read on established links.
    pub frames_in: AtomicU64,
    /// Frames written on established links.
    pub frames_out: AtomicU64,
    /// Links established (both directions, duplicates excluded).
    pub links_established: AtomicU64,
    /// Dials started.
    pub dials: AtomicU64,
    /// Dials that ended without a link.
    pub dial_failures: AtomicU64,
    /// Dropped connections and frames by reason.
    pub drops: Tally,
}

/// What the transport tells the membership task.
#[derive(Debug)]
pub enum TransportEvent {
    /// A link completed its handshake and is now the link to that peer.
    LinkUp {
        /// The peer's handshake.
        hello: Hello,
        /// We dialed.
        outbound: bool,
        /// The remote socket address.
        remote: SocketAddr,
    },
    /// The link to `id` closed.
    LinkDown {
        /// Peer.
        id: NodeId,
        /// The peer said goodbye (it is leaving).
        goodbye: bool,
        /// Closed on purpose (goodbye or duplicate), not lost.
        graceful: bool,
        /// For logs.
        reason: String,
    },
    /// A dial ended without a link.
    DialFailed {
        /// Peer.
        id: NodeId,
        /// Where we dialed.
        addr: SocketAddr,
        /// Refused, duplicate or other.
        why: DialFailure,
        /// For logs.
        detail: String,
    },
    /// Links that carried frames since the last report: when each peer was
    /// last heard on its link, and the link's round-trip time when known.
    /// Sent at most every [`Config::liveness_report`], so that keep-alive
    /// traffic costs the node one wake-up per interval, not one per frame.
    Heard(Vec<Heard>),
    /// A peer-list message (probe or report) arrived.
    Peers {
        /// Sender.
        id: NodeId,
        /// What it says.
        list: proto::frame::PeerList,
    },
    /// An application message arrived.
    Message {
        /// Sender.
        id: NodeId,
        /// The message.
        msg: AppMessage,
    },
}

/// One entry of [`TransportEvent::Heard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    /// Peer.
    pub id: NodeId,
    /// When a frame from it last arrived.
    pub at: std::time::Instant,
    /// The link's round-trip time, once measured.
    pub rtt: Option<Duration>,
}

/// Why an application message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No link to that peer.
    #[error("no link to that peer")]
    NoLink,
    /// The link closed.
    #[error("the link closed")]
    Closed,
    /// The peer did not drain its queue in time; the link was dropped.
    #[error("the peer is not reading; link dropped")]
    Stalled,
}

/// One live link, as the control API sees it.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// Peer.
    pub id: NodeId,
    /// Handle to its writer and counters.
    pub handle: LinkHandle,
    /// We dialed.
    pub outbound: bool,
    /// Remote socket address.
    pub remote: SocketAddr,
}

pub(crate) enum Internal {
    Established {
        hello: Hello,
        halves: Box<Halves>,
        outbound: bool,
        remote: SocketAddr,
    },
    Closed {
        id: NodeId,
        conn: u64,
        graceful: bool,
        goodbye: bool,
        reason: String,
    },
}

enum Command {
    Dial { id: NodeId, addr: SocketAddr },
    Links(oneshot::Sender<Vec<LinkInfo>>),
}

pub(crate) struct Shared {
    pub cfg: Config,
    /// Origin of the links' `heard_us` counters.
    pub epoch: std::time::Instant,
    /// Ping rounds: every dialer writer pings when this ticks. Rounds fall on
    /// multiples of the ping interval of the wall clock, so across the whole
    /// cluster pings and pongs travel together and each node wakes a few
    /// times per round instead of once per link.
    pub ping_rounds: watch::Receiver<u64>,
    pub stats: Arc<Stats>,
    pub events: mpsc::Sender<TransportEvent>,
    pub internal: mpsc::Sender<Internal>,
}

struct Entry {
    info: LinkInfo,
    dialer: NodeId,
    conn: u64,
    /// `heard_us` as of the last liveness report.
    reported_us: u64,
}

/// Cheap cloneable handle to the transport. Dropping every handle does not
/// stop it; the cancellation token does (after goodbyes on every link).
#[derive(Clone, Debug)]
pub struct Transport {
    cmd: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    send_timeout: Duration,
}

impl Transport {
    /// Starts the listener and the actor on `tracker`. When `cancel` fires,
    /// every link gets a goodbye and closes.
    pub fn start(
        listener: TcpListener,
        cfg: Config,
        events: mpsc::Sender<TransportEvent>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Transport {
        let stats = Arc::new(Stats::default());
        let (internal_tx, internal_rx) = mpsc::channel(256);
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let send_timeout = cfg.send_timeout;
        let (rounds_tx, ping_rounds) = watch::channel(0u64);
        let ping_interval = cfg.ping_interval;
        let shared = Arc::new(Shared {
            cfg,
            epoch: std::time::Instant::now(),
            ping_rounds,
            stats: stats.clone(),
            events,
            internal: internal_tx,
        });
        tracker.spawn(accept_loop(
            listener,
            shared.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        let actor = Actor {
            shared,
            links: HashMap::new(),
            next_conn: 0,
            // Not a child of `cancel`: links must outlive it long enough to
            // carry their goodbyes.
            links_cancel: CancellationToken::new(),
            tracker: tracker.clone(),
        };
        tracker.spawn(ping_rounds_task(rounds_tx, ping_interval, cancel.clone()));
        tracker.spawn(actor.run(cmd_rx, internal_rx, cancel));
        Transport {
            cmd: cmd_tx,
            stats,
            send_timeout,
        }
    }

    /// Asks for a dial to `id` at `addr`; the outcome arrives as an event.
    /// Returns false if the transport is gone or its queue is full.
    pub fn dial(&self, id: NodeId, addr: SocketAddr) -> bool {
        self.cmd.try_send(Command::Dial { id, addr }).is_ok()
    }

    /// The current links.
    pub async fn links(&self) -> Vec<LinkInfo> {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Links(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Queues a control message (peer-list probe or report) to `id` without
    /// waiting: best effort, dropped when the link's queue is full.
    pub async fn try_send(&self, id: NodeId, msg: Message) -> Result<(), SendError> {
        let link = self.links().await.into_iter().find(|l| l.id == id);
        let Some(link) = link else {
            return Err(SendError::NoLink);
        };
        link.handle.tx.try_send(msg).map_err(|_| SendError::Closed)
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// How long sends wait for room.
    pub fn send_timeout(&self) -> Duration {
        self.send_timeout
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    // An essential subsystem: if it ends, the node ends.
    let _stop_node_on_exit = cancel.clone().drop_guard();
    let pending = Arc::new(Semaphore::new(shared.cfg.max_pending_handshakes));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted, // cancel-safe
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(error) => {
                // EMFILE and friends: back off briefly rather than spin.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            shared
                .stats
                .drops
                .record(std::time::Instant::now(), "handshake_backlog");
            continue; // dropping the stream closes it
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let cfg = &shared.cfg;
            match handshake::accept(stream, cfg).await {
                Ok((hello, halves)) => {
                    let est = Internal::Established {
                        hello,
                        halves: Box::new(halves),
                        outbound: false,
                        remote,
                    };
                    if shared.internal.send(est).await.is_err() {
                        debug!("transport stopped during handshake");
                    }
                }
                Err(e) => log_handshake_failure(&shared, remote, &e),
            }
        });
    }
}

/// Ticks the ping rounds on multiples of `every` of the wall clock until
/// `cancel` fires (dropping the sender then stops the rounds).
async fn ping_rounds_task(tx: watch::Sender<u64>, every: Duration, cancel: CancellationToken) {
    let every_us = every.as_micros().max(1) as u64;
    let mut round = 0u64;
    loop {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let wait = Duration::from_micros(every_us - now_us % every_us);
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        round += 1;
        tx.send_replace(round);
    }
}

fn log_handshake_failure(shared: &Shared, remote: SocketAddr, e: &HandshakeError) {
    match e.drop_reason {
        Some(reason) => {
            if shared.stats.drops.record(std::time::Instant::now(), reason) {
                warn!(%remote, error = %e, "refused link (further refusals of this kind are counted)");
            }
        }
        None => debug!(%remote, error = %e, "inbound handshake failed"),
    }
}

struct Actor {
    shared: Arc<Shared>,
    links: HashMap<NodeId, Entry>,
    next_conn: u64,
    links_cancel: CancellationToken,
    tracker: TaskTracker,
}

/// How long shutdown waits for goodbyes to be queued and flushed.
const GOODBYE_WAIT: Duration = Duration::from_millis(300);

impl Actor {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::Receiver<Command>,
        mut internal_rx: mpsc::Receiver<Internal>,
        cancel: CancellationToken,
    ) {
        let _stop_node_on_exit = cancel.clone().drop_guard();
        let mut report = tokio::time::interval(self.shared.cfg.liveness_report);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(internal) = internal_rx.recv() => self.on_internal(internal).await,
                Some(cmd) = cmd_rx.recv() => self.on_command(cmd),
                _ = report.tick() => self.report_liveness(),
            }
        }
        // Goodbye on every link, concurrently, bounded.
        let goodbyes = self
            .links
            .values()
            .map(|e| e.info.handle.clone())
            .collect::<Vec<_>>();
        let sends = goodbyes.iter().map(|h| h.goodbye("shutdown", GOODBYE_WAIT));
        futures::future::join_all(sends).await;
        // Writers exit after flushing the goodbye; give them a moment, then
        // cut whatever is left.
        let flushed = async {
            for h in &goodbyes {
                h.tx.closed().await;
            }
        };
        if tokio::time::timeout(GOODBYE_WAIT, flushed).await.is_err() {
            debug!("some goodbyes were not flushed in time");
        }
        self.links_cancel.cancel();
        info!(links = goodbyes.len(), "transport stopped");
    }

    /// Reports the links that carried frames since the last report, in one
    /// event. A full event queue skips a report; the next one carries the
    /// same (newer) information.
    fn report_liveness(&mut self) {
        let epoch = self.shared.epoch;
        let mut heard = Vec::new();
        for e in self.links.values_mut() {
            let c = &e.info.handle.counters;
            let at_us = c.heard_us.load(Ordering::Relaxed);
            if at_us == 0 || at_us == e.reported_us {
                continue;
            }
            let rtt_us = c.rtt_us.load(Ordering::Relaxed);
            heard.push(Heard {
                id: e.info.id,
                at: epoch + Duration::from_micros(at_us),
                rtt: (rtt_us > 0).then(|| Duration::from_micros(rtt_us)),
            });
            e.reported_us = at_us;
        }
        if !heard.is_empty()
            && self
                .shared
                .events
                .try_send(TransportEvent::Heard(heard))
                .is_err()
        {
            for e in self.links.values_mut() {
                e.reported_us = 0; // report again next time
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { id, addr } => self.dial(id, addr),
            Command::Links(reply) => {
                let links = self.links.values().map(|e| e.info.clone()).collect();
                // The asker may have given up; nothing to do then.
                let _ignored = reply.send(links);
            }
        }
    }

    fn dial(&mut self, id: NodeId, addr: SocketAddr) {
        self.shared.stats.dials.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.clone();
        self.tracker.spawn(async move {
            let cfg = &shared.cfg;
            let res = handshake::dial(addr, cfg).await;
            match res {
                Ok((hello, halves)) => {
                    let est = Internal::Established {
                        hello,
                        halves: Box::new(halves),
                        outbound: true,
                        remote: addr,
                    };
                    if shared.internal.send(est).await.is_err() {
                        debug!("transport stopped during dial");
                    }
                }
                Err(e) => {
                    shared.stats.dial_failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(reason) = e.drop_reason {
                        shared.stats.drops.record(std::time::Instant::now(), reason);
                    }
                    let ev = TransportEvent::DialFailed {
                        id,
                        addr,
                        why: e.why,
                        detail: e.detail,
                    };
                    if shared.events.send(ev).await.is_err() {
                        debug!("node stopped during dial");
                    }
                }
            }
        });
    }

    async fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Established {
                hello,
                halves,
                outbound,
                remote,
            } => self.established(hello, *halves, outbound, remote).await,
            Internal::Closed {
                id,
                conn,
                graceful,
                goodbye,
                reason,
            } => {
                let current = self.links.get(&id).is_some_and(|e| e.conn == conn);
                if !current {
                    return; // a replaced duplicate; the current link is fine
                }
                self.links.remove(&id);
                let ev = TransportEvent::LinkDown {
                    id,
                    goodbye,
                    graceful,
                    reason,
                };
                if self.shared.events.send(ev).await.is_err() {
                    debug!("node stopped");
                }
            }
        }
    }

    async fn established(
        &mut self,
        hello: Hello,
        halves: Halves,
        outbound: bool,
        remote: SocketAddr,
    ) {
        let local = self.shared.cfg.local.id;
        let id = hello.id;
        let dialer = if outbound { local } else { id };
        let preferred = local.min(id);
        let replacing = match self.links.get(&id) {
            None => None,
            // Same direction again: the old one is half-dead; the new wins.
            Some(cur) if cur.dialer == dialer => Some(cur.info.handle.clone()),
            Some(cur) if dialer == preferred => Some(cur.info.handle.clone()),
            Some(_) => {
                // The current link is the preferred one: refuse this one.
                let (_rd, mut wr) = halves;
                let reject = Message::Reject(Reject {
                    code: "duplicate".into(),
                    detail: "a link between these nodes already exists".into(),
                });
                let wait = self.shared.cfg.handshake_timeout;
                self.tracker.spawn(async move {
                    // Best effort: the other side resolves the race the same way.
                    let _best_effort = tokio::time::timeout(wait, wr.send(reject)).await;
                });
                return;
            }
        };
        if let Some(old) = &replacing {
            let reject = Message::Reject(Reject {
                code: "duplicate".into(),
                detail: "replaced by the preferred link".into(),
            });
            if old.tx.try_send(reject).is_err() {
                old.close();
            }
        }
        self.next_conn += 1;
        let conn = self.next_conn;
        let (reader, writer) = halves;
        let handle = spawn_link(
            LinkSpec {
                peer: id,
                conn,
                reader,
                writer,
                pings: outbound,
            },
            &self.shared,
            &self.links_cancel,
            &self.tracker,
        );
        self.links.insert(
            id,
            Entry {
                info: LinkInfo {
                    id,
                    handle,
                    outbound,
                    remote,
                },
                dialer,
                conn,
                reported_us: 0,
            },
        );
        if replacing.is_some() {
            return; // the peer was linked before and still is
        }
        self.shared
            .stats
            .links_established
            .fetch_add(1, Ordering::Relaxed);
        let ev = TransportEvent::LinkUp {
            hello,
            outbound,
            remote,
        };
        if self.shared.events.send(ev).await.is_err() {
            debug!("node stopped");
        }
    }
}
