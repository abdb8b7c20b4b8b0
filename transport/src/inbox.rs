//! What the drivers (listener, dials, links) tell the actor, on its one
//! ordered channel.

use std::net::SocketAddr;

use proto::link::CloseReason;
use proto::NodeId;

use crate::handshake::Linked;

/// A message to the actor.
pub(crate) enum ToActor {
    /// A handshake completed; the actor decides whether it becomes the
    /// peer's link.
    Linked(Box<Handoff>),
    /// A link's reader ended.
    Closed(LinkClosed),
}

/// A connection whose handshake completed.
pub(crate) struct Handoff {
    pub linked: Linked,
    /// We dialed.
    pub outbound: bool,
    /// The remote socket address.
    pub addr: SocketAddr,
}

/// A link ended. `conn` tells a replaced duplicate (whose end changes
/// nothing) from the peer's current link.
pub(crate) struct LinkClosed {
    pub id: NodeId,
    pub conn: u64,
    pub reason: CloseReason,
}
