//! The transport actor, sole owner of the link map, and the [`Transport`]
//! handle that talks to it.
//!
//! The actor decides which connection becomes a peer's link (the
//! tie-break of [`proto::link::resolve_duplicate`]), reports links up and
//! down, batches liveness reports, and says goodbye on every link at
//! shutdown. It never touches a socket: the listener, the dials and the
//! link loops do, and tell it what happened through its inbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::link::{resolve_duplicate, CloseReason, Duplicate, Handovers, Role};
use proto::{Message, NodeId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::config::{now, tokio_instant, Config};
use crate::event::{Heard, SendError, TransportEvent};
use crate::handshake::Linked;
use crate::heard::Board;
use crate::inbox::{Handoff, LinkClosed, ToActor};
use crate::link::{self, Env, LinkHandle};
use crate::stats::Stats;
use crate::{dialer, listener};

/// Room in the actor's inbox (handshakes completed, links ended).
const INBOX: usize = 256;
/// Room for commands from [`Transport`] handles.
const COMMANDS: usize = 1024;
/// How long shutdown waits for goodbyes to be queued and flushed.
const GOODBYE_WAIT: Duration = Duration::from_millis(300);

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

enum Command {
    Dial {
        id: NodeId,
        addr: SocketAddr,
    },
    Links(oneshot::Sender<Vec<LinkInfo>>),
    NotNeighbour {
        id: NodeId,
    },
    TrySend {
        id: NodeId,
        msg: Message,
        reply: oneshot::Sender<Result<(), SendError>>,
    },
}

/// Cheap cloneable handle to the transport. Dropping every handle does not
/// stop it; the cancellation token does (after goodbyes on every link).
#[derive(Clone, Debug)]
pub struct Transport {
    cmd: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    board: Arc<Board>,
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
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMANDS);
        let epoch = now();
        let board = Arc::new(Board::new(epoch));
        let env = Arc::new(Env {
            events,
            inbox: inbox_tx,
            stats: stats.clone(),
            epoch,
            liveness: cfg.liveness(epoch),
            queue: cfg.queue,
            secured: cfg.keyring.is_some(),
            farewell_drain: cfg.farewell_drain,
        });
        let cfg = Arc::new(cfg);
        tracker.spawn(listener::run(
            listener,
            cfg.clone(),
            stats.clone(),
            env.inbox.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        let send_timeout = cfg.send_timeout;
        let actor = Actor {
            cfg,
            env,
            links: HashMap::new(),
            board: board.clone(),
            next_conn: 0,
            handovers: Handovers::default(),
            // Not a child of `cancel`: links must outlive it long enough to
            // carry their goodbyes.
            links_cancel: CancellationToken::new(),
            tracker: tracker.clone(),
        };
        tracker.spawn(actor.run(cmd_rx, inbox_rx, cancel));
        Transport {
            cmd: cmd_tx,
            stats,
            board,
            send_timeout,
        }
    }

    /// Asks for a dial to `id` at `addr`; the outcome arrives as an event.
    /// Returns false if the transport is gone or its queue is full.
    pub fn dial(&self, id: NodeId, addr: SocketAddr) -> bool {
        self.cmd.try_send(Command::Dial { id, addr }).is_ok()
    }

    /// Closes the link to `id` (if there is one) with
    /// `reject{not-neighbour}`: the bounded overlay no longer wants it.
    /// Its end arrives as a graceful [`TransportEvent::LinkDown`]. Returns
    /// false if the transport is gone or its queue is full (the overlay
    /// asks again at its next trim).
    pub fn close_not_neighbour(&self, id: NodeId) -> bool {
        self.cmd.try_send(Command::NotNeighbour { id }).is_ok()
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
        let (reply, rx) = oneshot::channel();
        if self
            .cmd
            .send(Command::TrySend { id, msg, reply })
            .await
            .is_err()
        {
            return Err(SendError::NoLink);
        }
        rx.await.unwrap_or(Err(SendError::NoLink))
    }

    /// Every link heard since it was last reported, at once and marked
    /// reported: what the next [`TransportEvent::Heard`] would have said.
    /// The node reads it before it judges a silence, so that the report's
    /// pace (once per ping round) never makes a live peer look silent.
    pub fn heard(&self) -> Vec<Heard> {
        self.board.take()
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

struct Entry {
    info: LinkInfo,
    dialer: NodeId,
    conn: u64,
}

struct Actor {
    cfg: Arc<Config>,
    env: Arc<Env>,
    links: HashMap<NodeId, Entry>,
    /// What the current links last heard, for the liveness reports.
    board: Arc<Board>,
    next_conn: u64,
    /// Links the peer rejected as duplicates, reported down only if its
    /// preferred link does not complete here soon.
    handovers: Handovers,
    links_cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Actor {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<ToActor>,
        cancel: CancellationToken,
    ) {
        let _stop_node_on_exit = cancel.clone().drop_guard();
        // Reports fall on the ping rounds (when the report's period is the
        // ping interval, as the node sets it): the node is awake then anyway.
        let live = self.env.liveness;
        let first = proto::link::next_round(live.ping_anchor, self.cfg.liveness_report, now());
        let mut report = tokio::time::interval_at(first.into(), self.cfg.liveness_report);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // One timer for held duplicate closes, moved only when the next
        // one changes (the loop runs once per command and link event).
        let mut handover = None;
        let handover_due = tokio::time::sleep_until(tokio_instant(handover));
        tokio::pin!(handover_due);
        loop {
            let next = self.handovers.next_deadline();
            if next != handover {
                handover = next;
                handover_due.as_mut().reset(tokio_instant(next));
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(msg) = inbox.recv() => match msg {
                    ToActor::Linked(h) => self.established(*h).await,
                    ToActor::Closed(c) => self.closed(c).await,
                },
                Some(cmd) = cmd_rx.recv() => self.on_command(cmd),
                // No links, nothing to report: the timer is not polled, so
                // a node without peers does not wake for it.
                _ = report.tick(), if !self.links.is_empty() => self.report_liveness(),
                () = &mut handover_due, if handover.is_some() => {
                    for (id, reason) in self.handovers.expired(now()) {
                        self.link_down(id, reason).await;
                    }
                }
            }
        }
        // Goodbye on every link, concurrently, bounded.
        let handles = self
            .links
            .values()
            .map(|e| e.info.handle.clone())
            .collect::<Vec<_>>();
        futures::future::join_all(handles.iter().map(|h| h.goodbye(GOODBYE_WAIT))).await;
        // Writers end after flushing their goodbye; give them a moment,
        // then cut whatever is left.
        let flushed = async {
            for h in &handles {
                h.closed().await;
            }
        };
        if tokio::time::timeout(GOODBYE_WAIT, flushed).await.is_err() {
            debug!("some goodbyes were not flushed in time");
        }
        self.links_cancel.cancel();
        info!(links = handles.len(), "transport stopped");
    }

    /// Reports the links that carried frames since the last report, in one
    /// event. A full event queue skips a report; the next one carries the
    /// same (newer) information.
    fn report_liveness(&mut self) {
        let heard = self.board.take();
        if !heard.is_empty()
            && self
                .env
                .events
                .try_send(TransportEvent::Heard(heard))
                .is_err()
        {
            self.board.unreport(); // report again next time
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { id, addr } => {
                self.env.stats.dials.fetch_add(1, Ordering::Relaxed);
                self.tracker.spawn(dialer::run(
                    id,
                    addr,
                    self.cfg.clone(),
                    self.env.stats.clone(),
                    self.env.inbox.clone(),
                    self.env.events.clone(),
                ));
            }
            Command::Links(reply) => {
                let links = self.links.values().map(|e| e.info.clone()).collect();
                // The asker may have given up; nothing to do then.
                let _ignored = reply.send(links);
            }
            Command::NotNeighbour { id } => {
                if let Some(e) = self.links.get(&id) {
                    e.info.handle.close_not_neighbour();
                }
            }
            Command::TrySend { id, msg, reply } => {
                let sent = match self.links.get(&id) {
                    Some(e) => e.info.handle.try_send(msg),
                    None => Err(SendError::NoLink),
                };
                // The asker may have given up; nothing to do then.
                let _ignored = reply.send(sent);
            }
        }
    }

    async fn closed(&mut self, c: LinkClosed) {
        let current = self.links.get(&c.id).is_some_and(|e| e.conn == c.conn);
        if !current {
            return; // a replaced duplicate; the current link is fine
        }
        self.links.remove(&c.id);
        self.board.forget(c.id);
        if self
            .handovers
            .hold(now(), c.id, &c.reason, self.cfg.handover_wait)
        {
            return; // the peer's preferred link is on its way
        }
        self.link_down(c.id, c.reason).await;
    }

    async fn link_down(&mut self, id: NodeId, reason: CloseReason) {
        let ev = TransportEvent::LinkDown {
            id,
            goodbye: reason.is_goodbye(),
            graceful: reason.is_graceful(),
            reason,
        };
        if self.env.events.send(ev).await.is_err() {
            debug!("node stopped");
        }
    }

    async fn established(&mut self, h: Handoff) {
        let local = self.cfg.local.id;
        let hello = h.linked.remote.clone();
        let id = hello.id;
        let dialer = if h.outbound { local } else { id };
        let replacing = match self.links.get(&id) {
            None => None,
            Some(cur) => match resolve_duplicate(local, id, cur.dialer, dialer) {
                Duplicate::KeepNew => Some(cur.info.handle.clone()),
                Duplicate::KeepCurrent => {
                    // Refused as a link in its own right that closes at
                    // once with `reject{duplicate}`: what the peer sent on
                    // it meanwhile still reaches the node (see
                    // `Link::hands_on`). Never current, so its close is no
                    // event.
                    let (refused, _) = self.spawn_link(id, h.outbound, h.linked);
                    refused.replace();
                    return;
                }
            },
        };
        if let Some(old) = &replacing {
            old.replace();
        }
        let (handle, conn) = self.spawn_link(id, h.outbound, h.linked);
        self.board.watch(id, handle.counters.clone());
        self.links.insert(
            id,
            Entry {
                info: LinkInfo {
                    id,
                    handle,
                    outbound: h.outbound,
                    remote: h.addr,
                },
                dialer,
                conn,
            },
        );
        if replacing.is_some() || self.handovers.take(id) {
            return; // the peer was linked before and still is
        }
        self.env
            .stats
            .links_established
            .fetch_add(1, Ordering::Relaxed);
        let ev = TransportEvent::LinkUp {
            hello: Box::new(hello),
            outbound: h.outbound,
            remote: h.addr,
        };
        if self.env.events.send(ev).await.is_err() {
            debug!("node stopped");
        }
    }

    /// Starts the loops of a link to `id` under a new connection number.
    fn spawn_link(&mut self, id: NodeId, outbound: bool, linked: Linked) -> (LinkHandle, u64) {
        self.next_conn += 1;
        let conn = self.next_conn;
        let role = if outbound {
            Role::Dialer
        } else {
            Role::Acceptor
        };
        let spec = link::Spec {
            peer: id,
            conn,
            role,
            linked,
        };
        let handle = link::spawn(spec, &self.env, &self.links_cancel, &self.tracker);
        (handle, conn)
    }
}
