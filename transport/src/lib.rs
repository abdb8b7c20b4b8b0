//! TCP data links: thin IO loops around the sans-IO link machines of
//! [`proto::link`].
//!
//! ## Shape
//! Modules depend on one another in one direction only (each line uses
//! only those below it):
//!
//! ```text
//! actor      the link map and the Transport handle; spawns the rest
//! listener   accept loop: one task per inbound handshake (semaphore-bounded)
//! dialer     one task per dial: connect, then the dialer's handshake
//! link       per link: a reader loop and a writer loop, and LinkHandle
//! inbox      what those drivers tell the actor
//! handshake  drives proto::link::Handshake over a TcpStream
//! config, event, stats   settings, what the node is told, counters
//! ```
//!
//! - [`Transport`] is a cheap cloneable handle; the *actor* task behind it
//!   is the single owner of the link map (`NodeId -> link`), so "exactly
//!   one link per pair" is decided in one place without locks.
//! - Handshakes are [`proto::link::Handshake`] machines driven over the
//!   stream until they yield the peer's identity and the link's codecs.
//! - Each link is split into owned halves: a reader task that owns the
//!   decoder and the link's [`proto::link::Link`] machine (ping rounds,
//!   RTT, silence, close reasons), and a writer task that alone writes,
//!   draining a bounded queue fed by [`LinkHandle`]s (split-plus-channel
//!   writer) plus a short lane for the reader's pings and pongs.
//! - Every timestamp and timer is tokio's (`tokio::time::Instant::now()`),
//!   so `#[tokio::test(start_paused = true)]` controls all of them.
//!
//! ## Exactly one link per pair
//! Both sides may dial at once. When a second link to the same peer
//! completes, both ends keep the link *dialed by the lower node id* and close
//! the other with `reject{duplicate}` ([`proto::link::resolve_duplicate`]).
//! Both ends apply the same rule to the same two connections, so they
//! converge on the same one.
//!
//! ## Slow peers
//! A link's queue is bounded ([`Config::queue`]). Application sends wait for
//! room up to [`Config::send_timeout`]; if the peer still does not drain, the
//! link is dropped (and redialed by membership) rather than letting one peer
//! stall its senders or grow memory. Peer lists use `try_send` and are
//! skipped when the queue is full; pings and pongs have a lane of their own.
//!
//! ## Liveness
//! The dialing side pings every [`Config::ping_interval`], on multiples of
//! the interval of the wall clock; the pong gives the RTT, and each ping
//! carries it to the other side. Any frame counts as heard. A link on which
//! nothing arrives for [`Config::link_timeout`] is closed, with
//! [`CloseReason::Silent`]: that is how a silent loss (cable pulled,
//! partition) ends a link.
//!
//! It does not decide who is alive or whom to dial: `proto::membership` does,
//! fed by the [`TransportEvent`]s this crate emits.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod actor;
mod config;
mod dialer;
mod event;
mod handshake;
mod heard;
mod inbox;
mod link;
mod listener;
mod stats;

pub use actor::{LinkInfo, Transport};
pub use config::Config;
pub use event::{Heard, SendError, TransportEvent};
pub use link::{LinkCounters, LinkHandle, QueueError, MESSAGE_BATCH_BYTES, MESSAGE_BATCH_LEN};
pub use proto::link::CloseReason;
pub use proto::membership::DialFailure;
pub use stats::Stats;
