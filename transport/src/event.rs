//! What the transport tells the node, and why a send was refused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::frame::{AppMessage, PeerList};
use proto::link::CloseReason;
use proto::membership::DialFailure;
use proto::{Hello, NodeId};

/// What the transport tells the membership task.
#[derive(Debug)]
pub enum TransportEvent {
    /// A link completed its handshake and is now the link to that peer.
    LinkUp {
        /// The peer's handshake (boxed: it is by far the largest field,
        /// and every event pays for the largest variant).
        hello: Box<Hello>,
        /// We dialed.
        outbound: bool,
        /// The remote socket address.
        remote: SocketAddr,
    },
    /// The link to `id` closed.
    LinkDown {
        /// Peer.
        id: NodeId,
        /// The peer said goodbye (it is leaving): `reason.is_goodbye()`.
        goodbye: bool,
        /// Closed on purpose (goodbye or duplicate), not lost:
        /// `reason.is_graceful()`.
        graceful: bool,
        /// Why, typed.
        reason: CloseReason,
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
    /// Sent at most every [`Config::liveness_report`](crate::Config::liveness_report),
    /// so that keep-alive traffic costs the node one wake-up per interval,
    /// not one per frame.
    Heard(Vec<Heard>),
    /// A peer-list message (probe or report) arrived.
    Peers {
        /// Sender.
        id: NodeId,
        /// What it says.
        list: PeerList,
    },
    /// A query or query response arrived.
    Query {
        /// Sender (the link's peer).
        id: NodeId,
        /// The frame.
        msg: proto::query::QueryMessage,
    },
    /// A message relayed over the overlay arrived.
    Relay {
        /// Sender (the link's peer, not the message's origin).
        id: NodeId,
        /// The frame.
        msg: proto::overlay::flood::Relayed,
    },
    /// Application messages arrived from one peer: those of one read of
    /// its link, in the order they were sent (one event per message would
    /// cost the node a channel hop per message; a batch costs one per
    /// read). Never empty. A batch holds at most
    /// [`MESSAGE_BATCH_LEN`](crate::MESSAGE_BATCH_LEN) messages and, besides
    /// its last message, less than
    /// [`MESSAGE_BATCH_BYTES`](crate::MESSAGE_BATCH_BYTES) of payload, so
    /// that the node's bounded channel still bounds what it holds.
    Messages {
        /// Sender.
        id: NodeId,
        /// The messages, oldest first.
        msgs: Vec<AppMessage>,
    },
}

/// One entry of [`TransportEvent::Heard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    /// Peer.
    pub id: NodeId,
    /// When a frame from it last arrived.
    pub at: Instant,
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
