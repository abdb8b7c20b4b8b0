//! The node's shared state: identity, the peer read-model and the event bus.
//!
//! The membership task is the single writer of [`NodeState::peers`] (a
//! `DashMap` read-model of the sans-IO `proto::membership::PeerTable` it
//! owns); the control API only reads it, cloning values out. No guard is ever
//! held across an `.await` (clippy enforces it via `clippy.toml`).

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use discovery::Interface;
use proto::membership::Peer;
use proto::secure::SharedKeyring;
use proto::{Incarnation, NodeId, Tags};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use transport::Transport;

/// Events buffered per `watch` client before it is told it lost some.
pub const EVENT_BUFFER: usize = 4096;

/// The peer table's own counters, mirrored by the membership task after
/// every input (the table itself is owned by that task alone).
#[derive(Debug, Default)]
pub struct TableCounters {
    /// Entries heard by beacon or report, not yet confirmed by a link.
    pub pending: AtomicU64,
    /// Pending entries ever created.
    pub admitted: AtomicU64,
    /// New ids refused because too many entries were pending.
    pub refused: AtomicU64,
    /// Times the node noticed its own lateness and held its verdicts.
    pub stalls: AtomicU64,
    /// Peers heard for a while but never linked (names, a few).
    pub unlinked: std::sync::Mutex<Vec<String>>,
}

/// Everything the control API needs.
#[derive(Debug)]
pub struct NodeState {
    /// Node id.
    pub id: NodeId,
    /// Node name.
    pub name: String,
    /// Cluster name.
    pub cluster: String,
    /// Incarnation.
    pub incarnation: Incarnation,
    /// Start time (monotonic).
    pub started: Instant,
    /// Tags.
    pub tags: Tags,
    /// Interfaces in use.
    pub interfaces: Vec<Interface>,
    /// Data address advertised per interface.
    pub advertised: Vec<SocketAddr>,
    /// TCP listen address (after binding).
    pub listen: SocketAddr,
    /// Multicast group.
    pub group: SocketAddrV4,
    /// Multicast TTL.
    pub ttl: u32,
    /// Beacon interval.
    pub beacon_interval: Duration,
    /// Peer read-model (single writer: the membership task).
    pub peers: DashMap<NodeId, Peer>,
    /// Event bus: one JSON line per event.
    pub events: broadcast::Sender<Arc<str>>,
    /// Discovery counters.
    pub discovery: Arc<discovery::Stats>,
    /// Transport handle (and its counters).
    pub transport: Transport,
    /// Peer state changes by event kind (`peer_failed`, ...).
    pub transitions: proto::stats::Tally,
    /// The peer table's own counters.
    pub table: TableCounters,
    /// Application messages received.
    pub messages_in: AtomicU64,
    /// Application messages sent.
    pub messages_out: AtomicU64,
    /// The cluster keyring, when the node runs with a secret.
    pub keyring: Option<SharedKeyring>,
    /// Where the keyring is persisted (`--secret-file`).
    pub secret_file: Option<PathBuf>,
}

/// RFC 3339 timestamp of now, with microseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// How a peer looks in the API (link counters are added by the caller).
pub fn peer_json(p: &Peer, now: Instant) -> Value {
    json!({
        "id": p.id.to_string(),
        "name": p.name,
        "state": p.state.as_str(),
        "addr": p.addr.to_string(),
        "link": p.link.as_str(),
        "rtt_ms": p.rtt.map(|d| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
        "last_seen_ms": now.saturating_duration_since(p.last_seen).as_millis() as u64,
        "incarnation": p.incarnation,
        "tags": p.tags,
        "conflict": p.conflict.map(|a| a.to_string()),
        "degraded": p.degraded(),
        "since_ms": now.saturating_duration_since(p.since).as_millis() as u64,
    })
}

impl NodeState {
    /// Publishes one event (a JSON object with `type` and `at` added).
    /// Nobody listening is fine.
    pub fn publish(&self, kind: &str, mut body: Value) {
        if let Value::Object(map) = &mut body {
            map.insert("type".into(), kind.into());
            map.insert("at".into(), now_rfc3339().into());
        }
        let line: Arc<str> = Arc::from(body.to_string());
        // Err only means no subscriber right now.
        let _no_subscribers = self.events.send(line);
    }

    /// Finds a peer by exact id, unique id prefix (8+ hex digits) or name.
    pub fn find_peer(&self, key: &str) -> Result<Peer, FindError> {
        if let Ok(id) = key.parse::<NodeId>() {
            return self
                .peers
                .get(&id)
                .map(|r| r.clone())
                .ok_or(FindError::Unknown);
        }
        let mut hits: Vec<Peer> = self
            .peers
            .iter()
            .filter(|r| r.name == key)
            .map(|r| r.clone())
            .collect();
        if hits.is_empty() && key.len() >= 8 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
            hits = self
                .peers
                .iter()
                .filter(|r| r.id.has_prefix(key))
                .map(|r| r.clone())
                .collect();
        }
        match hits.len() {
            0 => Err(FindError::Unknown),
            1 => Ok(hits.remove(0)),
            _ => Err(FindError::Ambiguous),
        }
    }
}

/// Why a peer lookup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    /// No such peer.
    #[error("no such peer")]
    Unknown,
    /// Several peers match.
    #[error("several peers match; use more of the id")]
    Ambiguous,
}
