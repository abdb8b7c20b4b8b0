//! UDP multicast discovery: how nodes find each other.
//!
//! This crate is the UDP *driver*. It owns the sockets and the beacon timer;
//! the decisions about datagrams live in the sans-IO [`sources`] module
//! (demultiplexing by source address, flood limiting, identity conflicts),
//! the node-wide [`budget`] of replies and new peers, the [`pacing`] of
//! beacons and replies as the group grows, `proto::addr_rule`
//! (which advertised addresses may be dialled) and, further up, in `proto::membership` (the peer table), which this crate
//! feeds through a channel of [`DiscoveryEvent`]s.
//!
//! ## Sockets (see DESIGN.md, traps 1 and 2)
//! - One *group* socket bound to the group address and port with
//!   `SO_REUSEADDR`/`SO_REUSEPORT`, joined on every configured interface,
//!   `IP_MULTICAST_ALL=0`. Several nodes on one host share it: every socket
//!   bound to the group port gets a copy of every multicast datagram.
//! - One *send* socket per interface, bound to the interface address and an
//!   ephemeral port, with `IP_MULTICAST_IF`, TTL and loop set. Beacons and
//!   unicast replies leave from it, so the source address of every datagram
//!   identifies exactly one node. It also receives the unicast replies.
//!
//! ## Tasks (split-plus-channel writer)
//! One writer task owns sending on every send socket and drains a bounded
//! channel; one reader task per socket pushes raw datagrams into a bounded
//! channel; the main loop owns all state, decodes, answers newcomers and
//! emits events. Beacons are best-effort: every producer uses `try_send`
//! and a full queue drops (and counts) rather than blocks.
//!
//! It does *not* decide who is alive (that is the peer table's job), and it
//! never trusts a beacon beyond "someone says this id lives at this address",
//! and then only for an address the node may dial.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod budget;
mod driver;
pub mod pacing;
pub mod sources;

pub use driver::{
    bind, Bound, Config, DiscoveryError, DiscoveryEvent, Interface, LocalIdentity, Stats,
};
