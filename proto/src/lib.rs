//! The constellationd protocol: identities, wire envelopes, codecs and the
//! sans-IO membership core.
//!
//! This crate is everything that *is* protocol and nothing that *does* IO.
//! It never opens a socket, never spawns a task and never reads a clock:
//! every input that depends on time carries the `now` it happened at, so the
//! whole crate is tested with synthetic instants and addresses. The drivers
//! (`discovery` for UDP, `transport` for TCP) and the daemon (`node`) own the
//! sockets and the clock and feed this crate.
//!
//! - [`id`]: [`NodeId`] (128-bit, random per node) and incarnations.
//! - [`beacon`]: the UDP beacon datagram and its codec (magic, version, flags,
//!   msgpack body, optional authentication trailer).
//! - [`addr_rule`]: which advertised data addresses a node may dial.
//! - [`control`]: the bodies of the daemon's local control API (HTTP/JSON),
//!   shared by its server and its CLI.
//! - [`frame`]: the TCP frame envelope, the link message kinds and a
//!   length-delimited codec with an explicit maximum.
//! - [`secure`]: the cluster secret: keyring, sealed beacons, Noise link
//!   handshake and per-frame ciphers.
//! - [`link`]: the link machines: handshake (both roles, with and without
//!   a secret), then liveness (ping rounds, RTT, silence, typed close
//!   reasons).
//! - [`membership`]: the peer table state machine (`on_*` inputs,
//!   `poll_event`/`poll_action` outputs, `next_deadline`).
//! - [`query`]: queries over the links (fan-out, duplicate suppression,
//!   acks and answers, timeouts) as a sans-IO engine.
//!
//! The byte layouts are documented in `PROTOCOL.md` at the repository root.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod addr_rule;
pub mod beacon;
pub mod control;
pub mod frame;
pub mod id;
pub mod link;
pub mod membership;
pub mod overlay;
pub mod query;
pub mod secure;
pub mod stats;
mod wire;

pub use beacon::{Beacon, BeaconCodec, BeaconError, BeaconKind};
pub use frame::{FrameCodec, FrameError, Hello, Message};
pub use id::{tags_digest, Incarnation, NodeId, Tags};
