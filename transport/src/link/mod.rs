//! One established link: a reader loop and a writer loop around the owned
//! halves of its TCP stream, and the handle that feeds the writer.
//!
//! - The **reader** owns the read half, the link's decoder and its
//!   [`proto::link::Link`] machine. It reads whatever the socket has, decodes
//!   every whole frame, feeds them to the machine with one `now` per read,
//!   delivers the machine's events to the node (waiting when the node is
//!   slow: backpressure), and hands the machine's pings and pongs to the
//!   writer. Its one timer is the machine's next deadline.
//! - The **writer** owns the write half and the encoder, and drains two
//!   bounded queues: the link's queue (application messages, peer lists
//!   and the final goodbye or reject, in the order they were sent; a queue
//!   of its own, `queue`, costing one lock per message sent and one per
//!   batch taken) and a short
//!   control lane for the reader's pings and pongs, which never wait behind
//!   a full queue of data. Everything ready is encoded into one reused
//!   buffer and written at once: one syscall (and on a secured link one
//!   seal) per batch.
//! - Everyone else holds a [`LinkHandle`].
//!
//! Either loop ending cancels the link's token, which ends the other. The
//! reader reports the end, with its typed reason, to the actor.
//!
//! The loops carry no `#[instrument]` span: a span is entered on every
//! poll, and these are the hottest futures of a node; their log lines name
//! the peer instead.

mod queue;
mod reader;
mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::frame::AppMessage;
use proto::link::{Link, LinkConfig, LocalClose, Role};
use proto::{Message, NodeId};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::event::{SendError, TransportEvent};
use crate::handshake::Linked;
use crate::inbox::ToActor;
use crate::stats::Stats;

/// Room in the control lane (pings and pongs). One ping per round and one
/// pong per ping: it only fills when the writer is stuck, and then skipping
/// them is right.
const CONTROL_LANE: usize = 16;

/// Most messages in one [`TransportEvent::Messages`].
pub const MESSAGE_BATCH_LEN: usize = 256;
/// A [`TransportEvent::Messages`] is closed once its payloads reach this
/// many bytes: with one message per event, a slot of the node's channel
/// held at most one message's payload; now at most this plus one.
pub const MESSAGE_BATCH_BYTES: usize = 64 << 10;

/// Per-link counters (application messages and their payload bytes).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Application messages received.
    pub msgs_in: AtomicU64,
    /// Application messages sent.
    pub msgs_out: AtomicU64,
    /// Payload bytes received.
    pub bytes_in: AtomicU64,
    /// Payload bytes sent.
    pub bytes_out: AtomicU64,
    /// When a frame last arrived, in microseconds since the transport's
    /// epoch (0: none yet). Read by the actor's liveness report.
    pub heard_us: AtomicU64,
    /// Last round-trip time known on this link, in microseconds (0: none):
    /// measured by the dialer, learnt from its pings by the acceptor.
    pub rtt_us: AtomicU64,
}

/// What the link's queue carries to its writer.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// The hot path, unboxed.
    App(AppMessage),
    /// Anything else (peer lists, the final goodbye or reject): rare, so
    /// boxed to keep the queue's slots small.
    Frame(Box<Message>),
}

/// Why the link is being closed from this side, left by whoever closes it
/// for the reader, which reports it.
#[derive(Debug)]
pub(crate) enum Cause {
    Local(LocalClose),
    WriteFailed(std::io::Error),
}

/// State the handles and both loops share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// First cause wins; read once by the reader when the link's token
    /// fires. A std lock: set and taken once per link, never across await.
    cause: Mutex<Option<Cause>>,
}

impl Shared {
    pub(crate) fn set_cause(&self, cause: Cause) {
        let mut slot = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(cause);
    }

    fn take_cause(&self) -> Option<Cause> {
        self.cause.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Why [`LinkHandle::try_queue`] refused a frame.
#[derive(Debug)]
pub enum QueueError {
    /// The link's queue is full.
    Full,
    /// The link closed; here is the frame back.
    Closed(Box<Message>),
}

/// Cheap, cloneable handle to one link's writer.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    pub(crate) tx: queue::Tx<Outbound>,
    pub(crate) cancel: CancellationToken,
    pub(crate) shared: Arc<Shared>,
    /// Counters of this link.
    pub counters: Arc<LinkCounters>,
}

impl LinkHandle {
    /// Queues an application message, waiting up to `wait` for room. On
    /// timeout the link is closed (slow-peer policy) and
    /// [`SendError::Stalled`] returned.
    pub async fn send_app(&self, msg: AppMessage, wait: Duration) -> Result<(), SendError> {
        // Fast path without a timer: there is room in the queue.
        let msg = match self.tx.try_send(Outbound::App(msg)) {
            Ok(()) => return Ok(()),
            Err(queue::TrySendError::Closed(_)) => return Err(SendError::Closed),
            Err(queue::TrySendError::Full(msg)) => msg,
        };
        match timeout(wait, self.tx.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendError::Closed),
            Err(_) => {
                // The peer does not drain: drop the link.
                self.close_with(LocalClose::Stalled);
                Err(SendError::Stalled)
            }
        }
    }

    /// Queues a control message without waiting: best effort, refused when
    /// the queue is full.
    pub(crate) fn try_send(&self, msg: Message) -> Result<(), SendError> {
        self.try_queue(msg).map_err(|_| SendError::Closed)
    }

    /// Queues a frame without waiting, best effort, and says why it was
    /// refused: a full queue, or a closed link (the frame handed back, for
    /// another link).
    pub fn try_queue(&self, msg: Message) -> Result<(), QueueError> {
        let item = match msg {
            Message::App(m) => Outbound::App(m),
            other => Outbound::Frame(Box::new(other)),
        };
        self.tx.try_send(item).map_err(|e| match e {
            queue::TrySendError::Full(_) => QueueError::Full,
            queue::TrySendError::Closed(Outbound::App(m)) => {
                QueueError::Closed(Box::new(Message::App(m)))
            }
            queue::TrySendError::Closed(Outbound::Frame(m)) => QueueError::Closed(m),
        })
    }

    /// Queues a goodbye behind what is already queued; the writer flushes
    /// it and closes the link. Gives up after `wait` and just closes.
    pub(crate) async fn goodbye(&self, wait: Duration) {
        self.shared.set_cause(Cause::Local(LocalClose::Shutdown));
        let Some(frame) = LocalClose::Shutdown.farewell() else {
            return;
        };
        let item = Outbound::Frame(Box::new(frame));
        if timeout(wait, self.tx.send(item)).await.is_err() {
            self.cancel.cancel(); // cannot say goodbye; just close
        }
    }

    /// Closes the link because a preferred one replaces it: the peer gets
    /// `reject{duplicate}` if there is room for it, or just the close.
    pub(crate) fn replace(&self) {
        self.close_politely(LocalClose::Duplicate);
    }

    /// Closes the link because neither end wants it in the overlay: the
    /// peer gets `reject{not-neighbour}` (which it takes as a graceful
    /// close, without suspicion) behind what is already queued, or just
    /// the close when the queue is full.
    pub fn close_not_neighbour(&self) {
        self.close_politely(LocalClose::NotNeighbour);
    }

    /// Queues `why`'s farewell without waiting (the writer ends after
    /// writing it); closes at once if there is no room for it.
    fn close_politely(&self, why: LocalClose) {
        self.shared.set_cause(Cause::Local(why));
        let sent = why
            .farewell()
            .is_some_and(|f| self.tx.try_send(Outbound::Frame(Box::new(f))).is_ok());
        if !sent {
            self.cancel.cancel();
        }
    }

    /// Closes the link without a farewell.
    pub fn close(&self) {
        self.close_with(LocalClose::Dropped);
    }

    fn close_with(&self, why: LocalClose) {
        self.shared.set_cause(Cause::Local(why));
        self.cancel.cancel();
    }

    /// Resolves once the writer has ended (its queue is gone).
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// What every link of a transport shares.
pub(crate) struct Env {
    /// The node's events.
    pub events: mpsc::Sender<TransportEvent>,
    /// The actor's inbox, for the end of each link.
    pub inbox: mpsc::Sender<ToActor>,
    pub stats: Arc<Stats>,
    /// Origin of the `heard_us` counters.
    pub epoch: Instant,
    pub liveness: LinkConfig,
    /// Per-link queue length.
    pub queue: usize,
    /// A secured link's encoder seals batches into records.
    pub secured: bool,
    /// How long a link closed here with a farewell reads on for the peer's
    /// close.
    pub farewell_drain: Duration,
}

/// One link to start.
pub(crate) struct Spec {
    pub peer: NodeId,
    pub conn: u64,
    pub role: Role,
    pub linked: Linked,
}

/// Spawns the reader and the writer of an established link on `tracker`,
/// under a child of `parent`: a link failing cancels only itself.
pub(crate) fn spawn(
    spec: Spec,
    env: &Arc<Env>,
    parent: &CancellationToken,
    tracker: &TaskTracker,
) -> LinkHandle {
    let Spec {
        peer,
        conn,
        role,
        linked,
    } = spec;
    let (rd, wr) = linked.stream.into_split(); // owned halves, no lock between them
    let (tx, rx) = queue::channel(env.queue);
    let (control_tx, control_rx) = mpsc::channel(CONTROL_LANE);
    let cancel = parent.child_token();
    let shared = Arc::new(Shared::default());
    let counters = Arc::new(LinkCounters::default());
    let machine = Link::new(crate::config::now(), role, env.liveness);

    tracker.spawn(writer::run(writer::Writer {
        peer,
        wr,
        encoder: linked.encoder,
        secured: env.secured,
        queue: rx,
        control: control_rx,
        shared: shared.clone(),
        counters: counters.clone(),
        stats: env.stats.clone(),
        cancel: cancel.clone(),
    }));
    tracker.spawn(reader::run(reader::Reader {
        peer,
        conn,
        rd,
        buf: linked.buf,
        decoder: linked.decoder,
        machine,
        control: control_tx,
        shared: shared.clone(),
        counters: counters.clone(),
        env: env.clone(),
        cancel: cancel.clone(),
        apps: Vec::new(),
        app_bytes: 0,
        batch_hint: 1,
        // A link starts quiet: most links carry only pings and pongs.
        small_reads: reader::QUIET_AFTER,
        filled: false,
        full_reads: 0,
    }));
    LinkHandle {
        tx,
        cancel,
        shared,
        counters,
    }
}

/// Counts `n` application messages of `bytes` payload bytes in `counter`s.
fn add(msgs: &AtomicU64, payload: &AtomicU64, n: u64, bytes: u64) {
    if n > 0 {
        msgs.fetch_add(n, Ordering::Relaxed);
        payload.fetch_add(bytes, Ordering::Relaxed);
    }
}
