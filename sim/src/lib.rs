//! A deterministic simulator of a constellationd cluster: N nodes running
//! the daemon's own state machines over a virtual network, in virtual
//! time, reproducibly from a seed.
//!
//! ## What runs
//! Each simulated node is one process of today's protocol (full mesh:
//! every node links to every peer it knows). It runs, unchanged:
//! - `proto::membership::PeerTable`, the peer table;
//! - `proto::link::Handshake` and `proto::link::Link` for every
//!   connection (plaintext, or the cluster-secret mode with
//!   [`SimConfig::secured`]: Noise handshake and sealed records), with
//!   `proto::link::resolve_duplicate` for simultaneous dials;
//! - `discovery::sources::SourceTable` and `discovery::budget::Budget`,
//!   which classify beacons and bound replies and new identities.
//!
//! With `SimConfig::max_links` (`--max-links K`) the nodes run the bounded
//! overlay instead: the peer table in its overlay mode
//! (`proto::membership::Config::overlay`: confirmation through a confirmed
//! neighbour, relay once per link, two observers for a failure on silence,
//! refutation), and the daemon's own neighbour maintenance
//! (`proto::overlay::driver`: each node's `proto::overlay` neighbours told
//! to the table, links neither end wants closed with
//! `reject{not-neighbour}`); each node's beacon interval scales with the
//! members it knows.
//!
//! There is no second implementation of the protocol. What the daemon's
//! drivers do around those machines (`node/src/membership.rs`,
//! `transport/`, `discovery/src/driver.rs`) is re-done as thin synchronous
//! glue in [`node`], whose docs say which daemon code each piece mirrors.
//! The settings are derived from the daemon's flags by the daemon's own
//! formulas ([`config::Settings::from_flags`]).
//!
//! ## The virtual network ([`net`])
//! Virtual time is a base `std::time::Instant` plus a duration; an event
//! queue ordered by time, ties broken by scheduling order ([`queue`]).
//! Packets take `latency ± jitter`; each is lost with probability `loss`
//! (TCP retransmits after 200 ms, in order, so a loss delays what follows).
//! Multicast beacons reach every host of the sender's partition group.
//! Partitions (TCP across one: connects time out, segments wait for
//! retransmissions, so links die of silence), crashes (the peers' links
//! are reset after one latency; dials are refused), pauses (the kernel
//! buffers and accepts; the process handles it all late, reads first, then
//! timers), restarts (new id, higher incarnation, same name), graceful
//! leaves (goodbyes and leave beacons).
//!
//! ## Determinism
//! One seeded generator draws everything (ids, latencies, losses, jitter
//! of beacons, the tables' own seeds). Nothing iterates a hash map where
//! the order could change an outcome: the glue sorts what the table hands
//! out in one batch. Two runs of one seed produce the same trace
//! ([`observe::Observer::trace_hash`]), which a test checks.
//!
//! ## Measurements ([`observe`], [`scenario`])
//! Convergence, time for a crash, a leave or a silent loss to be seen by
//! all, partition heal time, false failures (a live, running, reachable
//! node marked failed), and messages per node per second, all from the
//! tables' own events and their virtual timestamps.
//!
//! ## Limits
//! - Cost: the full mesh is N² links and every node hears every beacon;
//!   at a cold start every link that comes up pushes the whole view and
//!   the newcomer's record over every other link (about N³/2 peer-list
//!   messages), and the peer table looks at every entry after every input
//!   (`next_deadline`, dial scheduling). Measured on the 2-core machine
//!   (release): N = 64, a 30-virtual-second scenario in about 2 s of wall
//!   time; N = 256, about 2.5 minutes for the first 5 virtual seconds, most
//!   of it the cold start's 8 million peer lists. N = 1024 (about 256 times
//!   the cold-start work of N = 256) is out of reach until the bounded
//!   overlay replaces the mesh.
//! - The network has no bandwidth, queueing or buffer limits; TCP is
//!   reduced to in-order delivery, a 200 ms retransmission floor with
//!   doubling, SYN retries at 1 s and 3 s, FIN and RST.
//! - The daemon's tasks are collapsed into synchronous calls: no channel
//!   is ever full, no CPU time passes while a node works, no node is slow
//!   unless paused. Beacons are values (not encoded, not sealed); the
//!   address rule is not applied (every simulated address is dialable).
//! - Clocks differ by up to 2 ms (ping rounds follow each node's own wall
//!   clock); they do not drift.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
pub mod net;
pub mod node;
pub mod observe;
mod queue;
mod records;
pub mod scenario;
pub mod world;

pub use config::{DaemonFlags, Settings, SimConfig};
pub use observe::{FalseVerdict, Observer, TraceItem, WatchId};
pub use scenario::{Params, Report, SCENARIOS};
pub use world::{Op, World};
