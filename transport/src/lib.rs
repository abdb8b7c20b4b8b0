//! TCP data links: listener, dialer, handshake, and one reader plus one
//! writer task per link.
//!
//! ## Shape
//! - [`Transport`] is a cheap cloneable handle; the *actor* task behind it is
//!   the single owner of the link map (`NodeId -> link`), so "exactly one link
//!   per pair" is decided in one place without locks.
//! - The listener task accepts connections and runs each inbound handshake in
//!   its own task (bounded by a semaphore and a timeout); dials run in their
//!   own tasks too. Completed handshakes are handed to the actor.
//! - Each link is split into owned halves: a reader task (`FramedRead`) and a
//!   writer task (`FramedWrite`) that alone writes, draining a bounded mpsc
//!   queue fed by [`LinkHandle`]s (split-plus-channel writer).
//!
//! ## Exactly one link per pair
//! Both sides may dial at once. When a second link to the same peer
//! completes, both ends keep the link *dialed by the lower node id* and close
//! the other with `Reject{code: "duplicate"}`. Both ends apply the same rule to
//! the same two connections, so they converge on the same one.
//!
//! ## Slow peers
//! A link's queue is bounded ([`Config::queue`]). Application sends wait for
//! room up to [`Config::send_timeout`]; if the peer still does not drain, the
//! link is dropped (and redialed by membership) rather than letting one peer
//! stall its senders or grow memory. Pings use `try_send` and are skipped
//! when the queue is full.
//!
//! ## Liveness
//! Each side pings every [`Config::ping_interval`]; the pong gives the RTT. A
//! link on which nothing arrives for [`Config::link_timeout`] is closed: that
//! is how a silent loss (cable pulled, partition) ends a link.
//!
//! It does not decide who is alive or whom to dial: `proto::membership` does,
//! fed by the [`TransportEvent`]s this crate emits.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod actor;
mod handshake;
mod link;

pub use actor::{Config, Heard, LinkInfo, SendError, Stats, Transport, TransportEvent};
pub use link::{LinkCounters, LinkHandle};
pub use proto::membership::DialFailure;
