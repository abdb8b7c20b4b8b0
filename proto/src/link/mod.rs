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
    nearest_round, next_round, wall_clock_anchor, CloseReason, Link, LinkConfig, LinkEvent,
    LinkTiming, LocalClose, Role, FAREWELL_DRAIN,
};

use std::time::{Duration, Instant};

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

/// How long a link closed by the peer's `reject{duplicate}` waits for the
/// peer's preferred link before it is reported down, by default (see
/// [`Handovers`]).
/// Far below the suspicion deadline, so that the peer table, which still
/// takes the peer as linked meanwhile, never judges it by the wait.
pub const HANDOVER_WAIT: Duration = Duration::from_millis(200);

/// Links whose end is held back because another link between the same two
/// nodes is on its way: the duplicate rule's losing end.
///
/// When two dials cross, both ends keep the link dialed by the lower id
/// ([`resolve_duplicate`]). The end that completes the preferred link first
/// closes the other with `reject{duplicate}`, and that reject may reach the
/// other end before the preferred link's handshake completes there. A
/// `link_down` followed a moment later by a `link_up` would tell the peer
/// table (and the log, and the overlay, which would pick a replacement
/// neighbour) of a loss that is none. So the driver holds such a close for
/// up to `wait` ([`HANDOVER_WAIT`] by default): a link to the same peer
/// completing meanwhile takes the old one's place silently (as a
/// replacement does when the order is the other way round); otherwise the
/// close is reported as it came.
/// The transport's actor and the simulator both drive one.
#[derive(Debug, Default)]
pub struct Handovers {
    held: Vec<(NodeId, Instant, CloseReason)>,
}

impl Handovers {
    /// The current link to `id` closed with `reason`: true if its report is
    /// held for up to `wait` (the peer rejected it as a duplicate), false
    /// to report it now.
    pub fn hold(&mut self, now: Instant, id: NodeId, reason: &CloseReason, wait: Duration) -> bool {
        let duplicate = matches!(
            reason,
            CloseReason::Rejected {
                code: RejectCode::Duplicate,
                ..
            }
        );
        if duplicate {
            self.held.retain(|(h, ..)| *h != id);
            self.held.push((id, now + wait, reason.clone()));
        }
        duplicate
    }

    /// A link to `id` completed while none was current: true if it replaces
    /// a held one (no `link_up` then: the peer never stopped being linked).
    pub fn take(&mut self, id: NodeId) -> bool {
        let before = self.held.len();
        self.held.retain(|(h, ..)| *h != id);
        self.held.len() < before
    }

    /// The held closes whose wait is over at `now`, to report now.
    pub fn expired(&mut self, now: Instant) -> Vec<(NodeId, CloseReason)> {
        let mut due = Vec::new();
        self.held.retain(|(id, until, reason)| {
            let over = *until <= now;
            if over {
                due.push((*id, reason.clone()));
            }
            !over
        });
        due
    }

    /// When the next held close is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|(_, until, _)| *until).min()
    }
}

#[cfg(test)]
mod tests;
