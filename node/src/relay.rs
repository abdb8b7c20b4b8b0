//! The relay task: sole owner of the node's sans-IO relay
//! ([`proto::overlay::flood::Flood`]), which carries application messages
//! over the bounded overlay (`--max-links`): broadcasts to every member, and
//! messages for a member this node has no link to.
//!
//! Inputs arrive on one bounded channel ([`RelayHandle`]): relayed frames
//! from the links (forwarded by the membership task) and sends from the
//! control API. Outputs: frames to linked peers, and a `message` event on
//! the event bus for every message delivered here, exactly as for a message
//! that came straight over a link (its `from` is the origin).
//!
//! Frames are queued on the links without waiting: a copy that finds its
//! link's queue full is dropped and counted ([`RelayCounters::dropped`]);
//! the message still travels every other path. The full mesh does not use
//! this task for its own messages (a broadcast is one frame per link there),
//! but relays what overlay nodes send through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::frame::AppMessage;
use proto::overlay::flood::{Config, Flood, Relayed};
use proto::{Message, NodeId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use transport::{LinkHandle, QueueError};

use crate::state::NodeState;

/// Commands queued for the relay task.
const COMMANDS: usize = 4096;

#[derive(Debug)]
enum Command {
    Frame {
        from: NodeId,
        msg: Relayed,
    },
    Send {
        to: Option<NodeId>,
        msg: AppMessage,
        reply: oneshot::Sender<Vec<NodeId>>,
    },
}

/// Counters of the relay task.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Frames dropped: the task's queue or a link's queue was full.
    pub dropped: AtomicU64,
    /// The engine's own counts, mirrored after every input.
    pub originated: AtomicU64,
    /// See [`proto::overlay::flood::FloodStats::forwarded`].
    pub forwarded: AtomicU64,
    /// See [`proto::overlay::flood::FloodStats::delivered`].
    pub delivered: AtomicU64,
    /// See [`proto::overlay::flood::FloodStats::duplicates`].
    pub duplicates: AtomicU64,
    /// See [`proto::overlay::flood::FloodStats::skipped`].
    pub skipped: AtomicU64,
}

impl RelayCounters {
    /// As the API shows them.
    pub fn snapshot(&self) -> proto::control::RelayCounts {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        proto::control::RelayCounts {
            originated: n(&self.originated),
            forwarded: n(&self.forwarded),
            delivered: n(&self.delivered),
            duplicates: n(&self.duplicates),
            skipped: n(&self.skipped),
            dropped: n(&self.dropped),
        }
    }
}

/// A cheap handle to the relay task.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    tx: mpsc::Sender<Command>,
    /// Counters.
    pub counters: Arc<RelayCounters>,
}

/// The task's end of the [`RelayHandle`] channel.
#[derive(Debug)]
pub struct RelayInbox(mpsc::Receiver<Command>);

impl RelayHandle {
    /// A handle and the receiving end the task runs on.
    pub fn new() -> (RelayHandle, RelayInbox) {
        let (tx, rx) = mpsc::channel(COMMANDS);
        (
            RelayHandle {
                tx,
                counters: Arc::default(),
            },
            RelayInbox(rx),
        )
    }

    /// A frame from the link of `from`; dropped (and counted) when the
    /// task is behind.
    pub fn frame(&self, from: NodeId, msg: Relayed) {
        if self.tx.try_send(Command::Frame { from, msg }).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `msg` over the overlay, to every member or to `to`; waits for
    /// room in the task's queue. Returns the linked peers it was handed to
    /// (empty: this node has no link, or is stopping).
    pub async fn send(&self, to: Option<NodeId>, msg: AppMessage) -> Vec<NodeId> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Send { to, msg, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

struct Task {
    engine: Flood,
    state: Arc<NodeState>,
    counters: Arc<RelayCounters>,
    /// The transport's link handles, refreshed when a frame is for a peer
    /// missing here or whose link closed.
    links: HashMap<NodeId, LinkHandle>,
}

/// Runs until `cancel` fires.
pub async fn run(state: Arc<NodeState>, inbox: RelayInbox, cancel: CancellationToken) {
    let RelayInbox(mut rx) = inbox;
    let mut task = Task {
        engine: Flood::new(state.id, Config::default()),
        counters: state.relay.counters.clone(),
        state,
        links: HashMap::new(),
    };
    let idle = Duration::from_secs(3600);
    loop {
        let deadline = task
            .engine
            .next_deadline()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + idle);
        let reply = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            cmd = rx.recv() => match cmd {
                Some(cmd) => task.on_command(cmd),
                None => break,
            },
            () = sleep_until(deadline) => {
                task.engine.on_tick(now_std());
                None
            }
        };
        let sent = task.drain().await;
        if let Some(reply) = reply {
            let _asker_gone = reply.send(sent);
        }
    }
}

impl Task {
    /// Feeds one command to the engine; a send's reply waits for the
    /// frames to be queued.
    fn on_command(&mut self, cmd: Command) -> Option<oneshot::Sender<Vec<NodeId>>> {
        let linked = self.state.linked();
        match cmd {
            Command::Frame { from, msg } => {
                self.engine.on_relayed(now_std(), from, msg, &linked);
                None
            }
            Command::Send { to, msg, reply } => {
                self.engine.originate(to, msg, &linked);
                Some(reply)
            }
        }
    }

    /// Queues the engine's frames on the links and publishes what it
    /// delivered; returns the peers frames were queued for.
    async fn drain(&mut self) -> Vec<NodeId> {
        let mut sent = Vec::new();
        while let Some((to, r)) = self.engine.poll_transmit() {
            if self.queue(to, r).await {
                sent.push(to);
            } else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(to = %to.short(), "relayed frame not queued");
            }
        }
        while let Some(r) = self.engine.poll_delivery() {
            let from_name = self.state.peers.get(&r.origin).map(|p| p.name.clone());
            self.state
                .deliver_message(r.origin, from_name.as_deref(), &r.message());
        }
        let st = self.engine.stats();
        let c = &self.counters;
        c.originated.store(st.originated, Ordering::Relaxed);
        c.forwarded.store(st.forwarded, Ordering::Relaxed);
        c.delivered.store(st.delivered, Ordering::Relaxed);
        c.duplicates.store(st.duplicates, Ordering::Relaxed);
        c.skipped.store(st.skipped, Ordering::Relaxed);
        sent
    }

    /// Queues one frame on the link to `to`, without waiting for room.
    async fn queue(&mut self, to: NodeId, r: Relayed) -> bool {
        let mut msg = Message::Relay(r);
        for fresh in [false, true] {
            if fresh || !self.links.contains_key(&to) {
                self.links = self
                    .state
                    .transport
                    .links()
                    .await
                    .into_iter()
                    .map(|l| (l.id, l.handle))
                    .collect();
            }
            let Some(link) = self.links.get(&to) else {
                return false;
            };
            match link.try_queue(msg) {
                Ok(()) => return true,
                Err(QueueError::Full) => return false,
                // Closed since we looked: look again, once.
                Err(QueueError::Closed(back)) => msg = *back,
            }
        }
        false
    }
}
