//! What a simulation runs: the virtual network's parameters, and the
//! daemon's settings derived from its flags exactly as the daemon derives
//! them.

use std::time::Duration;

use discovery::sources::Limits;
use proto::link::LinkTiming;
use proto::membership::Config as TableConfig;
use proto::secure::{Key, Keyring};

/// The daemon flags that shape the protocol's timing (`constellationd run
/// --beacon-interval --suspect-after --dead-after --tombstone-ttl`), with
/// the daemon's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonFlags {
    /// `--beacon-interval`.
    pub beacon_interval: Duration,
    /// `--suspect-after`.
    pub suspect_after: Duration,
    /// `--dead-after`.
    pub dead_after: Duration,
    /// `--tombstone-ttl`.
    pub tombstone_ttl: Duration,
}

impl Default for DaemonFlags {
    fn default() -> Self {
        DaemonFlags {
            beacon_interval: Duration::from_secs(1),
            suspect_after: Duration::from_millis(600),
            dead_after: Duration::from_millis(1400),
            tombstone_ttl: Duration::from_secs(600),
        }
    }
}

/// One simulation: how many nodes, the network, the seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of hosts (node slots); each runs at most one node process.
    pub nodes: usize,
    /// The seed of the one random number generator.
    pub seed: u64,
    /// Mean one-way latency of every packet.
    pub latency: Duration,
    /// Each packet's latency is uniform in `latency ± jitter`.
    pub jitter: Duration,
    /// Probability that a packet is lost (each datagram; each TCP segment,
    /// which TCP then retransmits).
    pub loss: f64,
    /// Links use the cluster-secret mode (Noise handshake, sealed records)
    /// instead of plaintext. Beacons are passed as values in both modes.
    pub secured: bool,
    /// The daemon's timing flags.
    pub flags: DaemonFlags,
    /// Keep every traced item in memory (tests comparing traces), not only
    /// the trace's hash.
    pub record_trace: bool,
    /// Bounded overlay: each node dials only its `proto::overlay`
    /// neighbours (about this many); `None` is today's full mesh.
    pub max_links: Option<usize>,
}

impl SimConfig {
    /// `nodes` nodes, 1 ms ± 0.5 ms, no loss, the daemon's defaults.
    pub fn new(nodes: usize, seed: u64) -> Self {
        SimConfig {
            nodes,
            seed,
            latency: Duration::from_millis(1),
            jitter: Duration::from_micros(500),
            loss: 0.0,
            secured: false,
            flags: DaemonFlags::default(),
            record_trace: false,
            max_links: None,
        }
    }
}

/// The settings each node runs with, derived from [`DaemonFlags`] the way
/// `node/src/daemon.rs` (`run`) derives them for the transport, the peer
/// table and discovery.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The peer table's settings.
    pub table: TableConfig,
    /// The dialer's ping interval on every link.
    pub ping_interval: Duration,
    /// A link silent this long is closed.
    pub link_timeout: Duration,
    /// How often link liveness reaches the table (`Heard` batches).
    pub liveness_report: Duration,
    /// Bound on a handshake (`transport::Config::handshake_timeout`).
    pub handshake_timeout: Duration,
    /// Bound on a TCP connect (`transport::Config::connect_timeout`).
    pub connect_timeout: Duration,
    /// Inbound handshakes in progress at once; more are dropped.
    pub max_pending_handshakes: usize,
    /// Largest frame.
    pub max_frame: usize,
    /// Mean beacon interval (each wait jittered by ±10 %).
    pub beacon_interval: Duration,
    /// Discovery's flood limits and budgets.
    pub limits: Limits,
    /// The cluster keys in secured mode.
    pub keyring: Option<Keyring>,
    /// Bounded overlay (see [`SimConfig::max_links`]).
    pub max_links: Option<usize>,
}

impl Settings {
    /// The derivations of `node/src/daemon.rs`.
    pub fn from_flags(f: &DaemonFlags, secured: bool) -> Settings {
        let LinkTiming {
            ping_interval,
            link_timeout,
            liveness_report,
        } = LinkTiming::derive(f.suspect_after, f.dead_after);
        let table = TableConfig {
            suspect_after: f.suspect_after,
            dead_after: f.dead_after,
            beacon_dead_after: (f.beacon_interval * 3).max(f.dead_after),
            tombstone_ttl: f.tombstone_ttl,
            ..TableConfig::default()
        };
        let keyring = secured.then(|| {
            // A fixed key: the simulation must not depend on the OS's
            // randomness for anything that could change a decision.
            Keyring::new(vec![Key::from_bytes([7; 32])]).expect("one key is a valid keyring")
        });
        Settings {
            table,
            ping_interval,
            link_timeout,
            liveness_report,
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            max_pending_handshakes: 64,
            max_frame: proto::frame::DEFAULT_MAX_FRAME,
            beacon_interval: f.beacon_interval,
            limits: Limits {
                stale_after: f.dead_after,
                ..Limits::default()
            },
            keyring,
            max_links: None,
        }
    }

    /// The longest silence after which any verdict may fall: a verdict
    /// later than this after a disturbance (pause, partition) is the
    /// protocol's own doing.
    pub fn verdict_window(&self) -> Duration {
        self.table.dead_after.max(self.table.beacon_dead_after)
    }
}
