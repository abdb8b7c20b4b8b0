//! The link protocol as sans-IO state machines: what one TCP data link
//! between two nodes decides, from its first byte to its close.
//!
//! A link's life has two machines:
//!
//! 1. [`Handshake`] (bytes in, bytes out), for both roles and both modes:
//!    plaintext `hello`/`welcome`, or the Noise `NNpsk0` exchange with key
//!    confirmation when a cluster secret is set. It ends in [`Established`]
//!    (the peer's identity and the link's codecs) or a typed
//!    [`HandshakeError`].
//! 2. [`Link`] (frames in, frames out): liveness of the established link:
//!    the dialer's ping rounds, the round-trip time, the silence deadline,
//!    and a typed [`CloseReason`] when it ends.
//!
//! Both follow the crate's shape: `on_*(now, ..)` inputs, `poll_*`
//! outputs, `next_deadline()` for the driver's one timer. Neither reads a
//! clock or touches a socket, so every decision here is a function of its
//! inputs and `now`, tested with synthetic instants, and the same code can
//! run under a simulator. The drivers (`transport`) own the sockets, the
//! clock and the queues.
//!
//! What this module does not decide: whom to dial and what a closed link
//! means for the peer's state (the peer table does), and which of two links
//! between the same nodes survives beyond the pure rule of
//! [`resolve_duplicate`] (the transport owns the link map).
//!
//! The codes that travel in `reject` and `goodbye` frames are typed
//! ([`RejectCode`], [`GoodbyeReason`]) and encoded as the same strings as
//! before (`PROTOCOL.md`).

mod codes;
mod handshake;
mod liveness;

pub use codes::{GoodbyeReason, RejectCode};
pub use handshake::{Established, Handshake, HandshakeConfig, HandshakeError};
pub use liveness::{
    next_round, CloseReason, Link, LinkConfig, LinkEvent, LinkTiming, LocalClose, Role,
};

use crate::id::NodeId;

/// What to do when a second link to a peer completes while one is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    /// The new link replaces the current one (which is closed with
    /// `reject{duplicate}`).
    KeepNew,
    /// The new link is refused with `reject{duplicate}`.
    KeepCurrent,
}

/// The tie-break between two links of the same pair of nodes: both ends
/// keep the link *dialed by the lower node id*, so that, applying the same
/// rule to the same two connections, they converge on the same one. A
/// second link dialed in the same direction as the current one replaces it:
/// a peer dialing again has lost the old link (it is half-dead). Two dials
/// in the *same* direction at once could leave each end keeping a different
/// one (the ends may see them complete in either order); the peer table
/// never starts a dial while one is in progress or a link is up.
pub fn resolve_duplicate(
    local: NodeId,
    peer: NodeId,
    current_dialer: NodeId,
    new_dialer: NodeId,
) -> Duplicate {
    if new_dialer == current_dialer || new_dialer == local.min(peer) {
        Duplicate::KeepNew
    } else {
        Duplicate::KeepCurrent
    }
}

#[cfg(test)]
mod tests;
