//! The control API's bodies: what the daemon's HTTP/JSON API on its Unix
//! socket answers and accepts, shared by the server (`node::api`) and its
//! clients (the CLI), so that a field renamed on one side fails to compile on
//! the other.
//!
//! Plain serde types and the rules both sides must agree on (query
//! parameters, the payload of a message); no IO, no clock. The struct field
//! names *are* the wire (documented in the README's "Control API" section):
//! renaming one is an API change, whatever the Rust code says. Ids and
//! addresses travel in their text forms, instants as RFC 3339 strings,
//! durations as whole milliseconds.
//!
//! Deliberately lenient when reading: unknown fields are ignored, so a client
//! reads the answers of a daemon that has since grown fields. Maps keyed by a
//! reason or a state ([`NodeCounters::beacons_dropped`], [`NodeInfo::peers`],
//! [`NodeInfo::transitions`]) hold only the keys seen so far; a missing key
//! means zero.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::{Incarnation, Tags};

/// Counts by a short stable label (a drop reason, a state, an event kind).
pub type Counts = BTreeMap<String, u64>;

/// Every error answer, with a 4xx or 5xx status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for people; quotes at most a short prefix of any
    /// value the client sent.
    pub error: String,
}

/// `GET /v1/self`: this node, its counters and plain-language warnings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id (32 hex digits).
    pub id: String,
    /// Node name.
    pub name: String,
    /// Cluster name.
    pub cluster: String,
    /// Incarnation (higher after every restart).
    pub incarnation: Incarnation,
    /// Data address advertised on each interface.
    pub addresses: Vec<String>,
    /// TCP listen address.
    pub listen: String,
    /// Interfaces discovery runs on.
    pub interfaces: Vec<InterfaceInfo>,
    /// Multicast group and port.
    pub group: String,
    /// Multicast TTL.
    pub ttl: u32,
    /// Time since start.
    pub uptime_ms: u64,
    /// This node's tags.
    pub tags: Tags,
    /// Whether this node hears its own multicast beacons.
    pub multicast_loops_back: bool,
    /// Whether the node runs with a cluster secret.
    pub secured: bool,
    /// Listed peers by state (`alive`, `suspect`, ...).
    pub peers: Counts,
    /// Peer state changes by event kind (`peer_failed`, ...).
    pub transitions: Counts,
    /// Data links up.
    pub links_up: u64,
    /// Counters since start.
    pub counters: NodeCounters,
    /// Plain-language warnings (empty when all is well).
    pub warnings: Vec<String>,
    /// Whether multicast discovery runs (`--no-multicast` turns it off).
    #[serde(default = "yes")]
    pub multicast: bool,
    /// The current mean interval between this node's beacons, in ms: the
    /// configured `--beacon-interval` in a group of up to 40 members, longer
    /// in a larger one (PROTOCOL.md, "Beacon pacing"); 0 without multicast
    /// or before the first beacon.
    #[serde(default)]
    pub beacon_interval_ms: u64,
    /// Seeds (`--seed`, and remembered peers), each with its last outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<SeedInfo>,
    /// Where peers are remembered for the next start (`--state-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// Event handlers (`--handler`); absent when none ever ran or was
    /// configured.
    #[serde(default, skip_serializing_if = "HandlerCounters::is_zero")]
    pub handlers: HandlerCounters,
    /// The bounded overlay (`--max-links`); absent in a full mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayInfo>,
}

/// [`NodeInfo::overlay`]: this node's place in the bounded overlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayInfo {
    /// `--max-links`: about this many links per node.
    pub max_links: u64,
    /// Gauge: the members this node wants links with now (every other
    /// live member while the group has at most `max_links + 1`).
    pub neighbours: u64,
    /// Times this node refuted a report of its own failure by raising its
    /// incarnation.
    pub refutations: u64,
    /// Messages relayed over the overlay.
    #[serde(default)]
    pub relay: RelayCounts,
}

/// [`OverlayInfo::relay`]: application messages carried over the overlay
/// (broadcasts, and messages for members without a link), totals since
/// start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayCounts {
    /// Sent by this node.
    pub originated: u64,
    /// Copies passed on to other links.
    pub forwarded: u64,
    /// Delivered here.
    pub delivered: u64,
    /// Copies of messages already handled, dropped.
    pub duplicates: u64,
    /// Messages given up: a gap in an origin's order not filled in time.
    pub skipped: u64,
    /// Frames dropped: the relay's or a link's queue was full.
    pub dropped: u64,
}

/// [`NodeInfo::handlers`]: totals since start (gauges where said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerCounters {
    /// Gauge: handlers configured.
    pub configured: u64,
    /// Programs started.
    pub started: u64,
    /// Runs that exited with status 0.
    pub succeeded: u64,
    /// Runs that could not start, exited non-zero or died of a signal.
    pub failed: u64,
    /// Runs killed at the timeout.
    pub timed_out: u64,
    /// Runs dropped because the backlog was full (or events the dispatcher
    /// missed on the event bus).
    pub dropped: u64,
    /// Gauge: programs running now.
    pub running: u64,
    /// Gauge: runs waiting for a slot.
    pub queued: u64,
}

impl HandlerCounters {
    /// Whether every counter is zero (then `status` leaves it out).
    pub fn is_zero(&self) -> bool {
        *self == HandlerCounters::default()
    }
}

fn yes() -> bool {
    true
}

/// One seed in [`NodeInfo::seeds`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedInfo {
    /// As given (`HOST[:PORT]`), or a remembered address.
    pub seed: String,
    /// What it resolved to at the last attempt.
    pub resolved: Vec<String>,
    /// How the last attempt ended: `pending`, `linked`, `unresolved` or
    /// `dial_failed`.
    pub outcome: String,
    /// Why, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Attempts so far.
    pub attempts: u64,
}

/// One interface in [`NodeInfo::interfaces`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    /// Interface name (`lo`, `eth0`).
    pub name: String,
    /// Its IPv4 address.
    pub addr: String,
}

/// [`NodeInfo::counters`]: totals since start (gauges where said).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounters {
    /// Multicast beacons sent.
    pub beacons_sent: u64,
    /// Valid beacons received.
    pub beacons_received: u64,
    /// Unicast beacon replies sent.
    pub replies_sent: u64,
    /// Beacons that could not be sent.
    pub beacon_send_errors: u64,
    /// Datagrams dropped, by reason.
    pub beacons_dropped: Counts,
    /// Frames read on links.
    pub frames_in: u64,
    /// Frames written on links.
    pub frames_out: u64,
    /// Links established.
    pub links_established: u64,
    /// Dials started.
    pub dials: u64,
    /// Dials that failed.
    pub dial_failures: u64,
    /// Connections or frames refused, by reason.
    pub links_refused: Counts,
    /// Application messages received.
    pub messages_in: u64,
    /// Application messages sent.
    pub messages_out: u64,
    /// Gauge: peers heard, not yet confirmed by a link.
    pub peers_pending: u64,
    /// Pending entries ever created.
    pub peers_admitted: u64,
    /// New ids refused because too many were pending.
    pub pending_refused: u64,
    /// Times the node noticed its own lateness and held its verdicts.
    pub stalls: u64,
    /// Gauge: current `/v1/events` subscribers.
    pub event_subscribers: u64,
    /// Events dropped for slow subscribers.
    pub events_dropped: u64,
    /// Queries (see [`QueryCounts`]).
    #[serde(default)]
    pub queries: QueryCounts,
}

/// [`NodeCounters::queries`]: totals since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueryCounts {
    /// Queries asked by this node (its own cluster-wide operations included).
    pub asked: u64,
    /// Queries received that this node matched.
    pub delivered: u64,
    /// Answers this node gave.
    pub answered: u64,
    /// Query frames received more than once (dropped).
    pub duplicates: u64,
    /// Query frames over the limits (dropped).
    pub oversize: u64,
    /// Responses to queries no longer waited for.
    pub late: u64,
    /// Inputs dropped because the query task was behind, and progress
    /// lines an asker could not take.
    pub dropped: u64,
}

/// A peer as events show it (`peer` in a peer event); [`PeerEntry`] adds
/// the link's traffic for `/v1/peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Peer id (32 hex digits).
    pub id: String,
    /// Peer name.
    pub name: String,
    /// `alive`, `suspect`, `failed` or `left` (see [`PEER_STATES`]).
    pub state: String,
    /// Its data address.
    pub addr: String,
    /// `up`, `connecting` or `down`.
    pub link: String,
    /// Round-trip time of the link, in ms with µs precision; `None` (null)
    /// until measured.
    pub rtt_ms: Option<f64>,
    /// Time since last heard from.
    pub last_seen_ms: u64,
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// Its tags.
    pub tags: Tags,
    /// The other address when two live nodes claim this name, else null.
    pub conflict: Option<String>,
    /// One path to it is bad (link down, beacons arriving), the node is not.
    pub degraded: bool,
    /// Time in the current state.
    pub since_ms: u64,
}

/// Application traffic on the current link to a peer (zero without one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkTraffic {
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
}

/// `GET /v1/peers/{key}`, and each item of [`PeerList`]: one flat object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// The peer.
    #[serde(flatten)]
    pub peer: PeerInfo,
    /// Its link's traffic.
    #[serde(flatten)]
    pub traffic: LinkTraffic,
}

/// `GET /v1/peers`: sorted by name, then id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerList {
    /// The peers.
    pub peers: Vec<PeerEntry>,
}

/// The peer states, as [`PeerInfo::state`] and the `state` filter spell them.
pub const PEER_STATES: [&str; 4] = ["alive", "suspect", "failed", "left"];

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A parameter this endpoint does not take.
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    /// `state=` with a value not in [`PEER_STATES`].
    #[error("unknown state {0:?} (alive, suspect, failed, left)")]
    UnknownState(String),
    /// `tag=` without a `:`.
    #[error("tag filters are key:value")]
    BadTag(String),
    /// A parameter that must be a whole number.
    #[error("{0} is a whole number")]
    NotANumber(&'static str),
}

/// The query of `GET /v1/peers`: `state=S` and `name=REGEX` (at most one
/// each: the last wins) and any number of `tag=KEY:REGEX`; a peer must
/// match all of them. Each regex must match the whole name or tag value
/// (it is anchored: `db` matches `db` only, `db.*` matches `db-1`); the
/// daemon compiles them (this crate only carries the text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeersQuery {
    /// Only peers in this state.
    pub state: Option<String>,
    /// Only peers whose name matches this regex.
    pub name: Option<String>,
    /// Only peers with every one of these tags, each value matching its
    /// regex.
    pub tags: Vec<(String, String)>,
}

impl PeersQuery {
    /// Reads decoded query pairs.
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, QueryError> {
        let mut q = PeersQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "state" if PEER_STATES.contains(&v.as_str()) => q.state = Some(v),
                "state" => return Err(QueryError::UnknownState(v)),
                "name" => q.name = Some(v),
                "tag" => match v.split_once(':') {
                    Some((k, v)) => q.tags.push((k.to_string(), v.to_string())),
                    None => return Err(QueryError::BadTag(v)),
                },
                _ => return Err(QueryError::UnknownParameter(k)),
            }
        }
        Ok(q)
    }

    /// The path and query to ask for: `/v1/peers`, `/v1/peers?state=alive&tag=role%3Adb`.
    pub fn uri(&self) -> String {
        let mut q: Vec<String> = Vec::new();
        if let Some(s) = &self.state {
            q.push(format!("state={}", urlencode(s)));
        }
        if let Some(n) = &self.name {
            q.push(format!("name={}", urlencode(n)));
        }
        for (k, v) in &self.tags {
            q.push(format!("tag={}", urlencode(&format!("{k}:{v}"))));
        }
        if q.is_empty() {
            "/v1/peers".into()
        } else {
            format!("/v1/peers?{}", q.join("&"))
        }
    }
}

/// The query of `GET /v1/health`: `min_peers=N` (default 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthQuery {
    /// Alive peers needed for `ok`.
    pub min_peers: usize,
}

impl HealthQuery {
    /// Reads decoded query pairs.
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, QueryError> {
        let mut q = HealthQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "min_peers" => {
                    q.min_peers = v.parse().map_err(|_| QueryError::NotANumber("min_peers"))?
                }
                _ => return Err(QueryError::UnknownParameter(k)),
            }
        }
        Ok(q)
    }

    /// The path and query to ask for.
    pub fn uri(&self) -> String {
        format!("/v1/health?min_peers={}", self.min_peers)
    }
}

/// [`Health::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Enough alive peers (status 200).
    Ok,
    /// Not yet (status 503).
    Waiting,
}

impl HealthStatus {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Ok => "ok",
            HealthStatus::Waiting => "waiting",
        }
    }
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `waiting`.
    pub status: HealthStatus,
    /// Peers alive now.
    pub alive_peers: usize,
    /// What was asked for.
    pub min_peers: usize,
}

/// Longest topic of a message, in bytes.
pub const MAX_TOPIC: usize = 1024;

/// `POST /v1/messages`. `to` is required, and `null` (`None`) means every
/// linked peer; the payload is `payload` (UTF-8) or `payload_b64`, not both
/// (neither: empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// A peer's name, id or id prefix (8+ hex digits), or `None` to
    /// broadcast. Always on the wire, as `null` for a broadcast.
    #[serde(deserialize_with = "required_nullable")]
    pub to: Option<String>,
    /// Topic, at most [`MAX_TOPIC`] bytes (absent or null: empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The payload as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload in base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
}

/// Without `#[serde(default)]`, a missing `to` is an error rather than `None`.
fn required_nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// Why a [`SendRequest`] is refused before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendRequestError {
    /// The topic is over [`MAX_TOPIC`].
    #[error("\"topic\" must be a string of at most 1024 bytes")]
    TopicTooLong,
    /// Both payload fields are set.
    #[error("give either \"payload\" (a string) or \"payload_b64\", not both")]
    BothPayloads,
    /// `payload_b64` does not decode.
    #[error("payload_b64 is not base64: {0}")]
    NotBase64(String),
}

impl SendRequest {
    /// A request with a text payload; `to: None` broadcasts.
    pub fn text(to: Option<String>, topic: String, payload: String) -> Self {
        SendRequest {
            to,
            topic: Some(topic),
            payload: Some(payload),
            payload_b64: None,
        }
    }

    /// The topic (empty when absent), checked against [`MAX_TOPIC`].
    pub fn topic(&self) -> Result<&str, SendRequestError> {
        let topic = self.topic.as_deref().unwrap_or("");
        if topic.len() > MAX_TOPIC {
            return Err(SendRequestError::TopicTooLong);
        }
        Ok(topic)
    }

    /// The payload's bytes.
    pub fn payload(&self) -> Result<Vec<u8>, SendRequestError> {
        match (&self.payload, &self.payload_b64) {
            (Some(_), Some(_)) => Err(SendRequestError::BothPayloads),
            (Some(text), None) => Ok(text.clone().into_bytes()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| SendRequestError::NotBase64(e.to_string())),
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// [`SendResult::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendStatus {
    /// Queued on the link.
    Sent,
    /// Handed to the bounded overlay (`--max-links`), which carries it to
    /// this member over other members' links.
    Relayed,
    /// Not sent; see [`SendResult::error`].
    Failed,
}

/// One recipient's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResult {
    /// Peer id.
    pub id: String,
    /// Peer name.
    pub name: String,
    /// `sent` or `failed`.
    pub status: SendStatus,
    /// Why it failed (only when it did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of `POST /v1/messages` (200; 409 when the one recipient
/// named failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResults {
    /// One entry per recipient (none: no linked peer).
    pub results: Vec<SendResult>,
}

/// `POST /v1/keys`, `/v1/keys/use`, `/v1/keys/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRequest {
    /// A key in base64 (install), or a key or its fingerprint (use, remove).
    pub key: String,
}

/// One key of [`Keys::keys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// The key's fingerprint (never the key).
    pub fingerprint: String,
    /// Whether this key seals what the node sends.
    pub primary: bool,
}

/// `GET /v1/keys`, and the answer of every keyring edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keys {
    /// Always true (a node without a secret answers 409).
    pub secured: bool,
    /// Installed keys, primary first.
    pub keys: Vec<KeyEntry>,
    /// Where the keyring is saved.
    pub secret_file: Option<String>,
    /// Edits only: whether the edit changed anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Edits only: the keyring changed in memory but could not be saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `POST /v1/leave` (status 202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaving {
    /// Always `leaving`.
    pub status: String,
}

/// [`Event::kind`] of the first line of every stream.
pub const EVENT_SUBSCRIBED: &str = "subscribed";
/// [`Event::kind`] of the line that stands for events a slow reader missed.
pub const EVENT_DROPPED: &str = "dropped";
/// [`Event::kind`] of an application message.
pub const EVENT_MESSAGE: &str = "message";

/// One line of `GET /v1/events` (NDJSON): `type`, `at`, then the body's
/// fields. The server builds lines with any map-like body; clients read
/// [`EventBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event<B = EventBody> {
    /// `subscribed`, `dropped`, `message`, or a peer event kind
    /// (`peer_joined`, `link_up`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// When it happened (RFC 3339, µs).
    pub at: String,
    /// The rest of the line.
    #[serde(flatten)]
    pub body: B,
}

/// What follows `type` and `at`, by shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventBody {
    /// Every peer event.
    Peer {
        /// The peer, after the change.
        peer: PeerInfo,
    },
    /// `message`.
    Message(MessageEvent),
    /// `dropped`.
    Dropped(DroppedEvent),
    /// `subscribed`, or a kind this client does not know.
    Other {},
}

/// An application message received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    /// Sender id.
    pub from: String,
    /// Sender name, when it is listed.
    pub from_name: Option<String>,
    /// Topic.
    pub topic: String,
    /// The payload when it is UTF-8, else null.
    pub payload: Option<String>,
    /// The payload in base64, always.
    pub payload_b64: String,
}

/// Events a slow reader missed, in their place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedEvent {
    /// How many.
    pub count: u64,
}

/// `PATCH /v1/self/tags`: set and delete tags of this node at runtime.
/// Deletions apply first, so a key in both ends up set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TagsRequest {
    /// Tags to add or change.
    #[serde(default)]
    pub set: Tags,
    /// Keys to remove (absent keys are ignored).
    #[serde(default)]
    pub delete: Vec<String>,
}

/// `GET /v1/self/tags` and the answer to a [`TagsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagsInfo {
    /// This node's tags now.
    pub tags: Tags,
    /// How many runtime changes this node's life has made (0: the tags it
    /// started with). Peers apply a change only over a lower version.
    pub version: u64,
    /// Whether the request changed anything (absent for `GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Where runtime changes are kept across restarts (`--state-dir`);
    /// absent when they are not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_in: Option<String>,
    /// Linked peers the change was sent to (absent for `GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_to: Option<u64>,
    /// A problem that did not stop the change (it could not be saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `POST /v1/queries`: ask the matching nodes (this one included) and
/// stream their acks and answers ([`QueryLine`], NDJSON) until the timeout.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueryRequest {
    /// Query name (answerers follow names); not starting with `_`.
    pub name: String,
    /// Payload as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Payload as base64 (binary), instead of `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
    /// Only these nodes (names or ids); empty: every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Only nodes with all these tags (exact values).
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    pub tags: Tags,
    /// How long to wait for answers, in ms (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The default query timeout, in ms.
pub const QUERY_TIMEOUT_MS: u64 = 1000;

/// A node, in query results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
}

/// One line of the `POST /v1/queries` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum QueryLine {
    /// First line: the query is on its way.
    Asked {
        /// The query's id (`ORIGIN-N`), as answerers see it.
        id: String,
        /// The nodes believed to match (this node's view).
        asked: Vec<NodeRef>,
    },
    /// A node has the query.
    Ack {
        /// Who.
        from: NodeRef,
    },
    /// A node's answer.
    Answer {
        /// Who.
        from: NodeRef,
        /// The answer when it is UTF-8, else null.
        payload: Option<String>,
        /// The answer in base64, always.
        payload_b64: String,
    },
    /// Last line.
    Done {
        /// How many nodes were believed to match.
        asked: usize,
        /// How many acknowledged.
        acked: usize,
        /// How many answered.
        answered: usize,
        /// The matching nodes that did not answer in time.
        timed_out: Vec<NodeRef>,
    },
}

/// The body of a `query` event on `/v1/events`: a query this node should
/// answer (`POST /v1/queries/{id}/responses`, once, within `timeout_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryEvent {
    /// The query's id (`ORIGIN-N`).
    pub id: String,
    /// Query name.
    pub name: String,
    /// The asking node.
    pub from: NodeRef,
    /// The payload when it is UTF-8, else null.
    pub payload: Option<String>,
    /// The payload in base64, always.
    pub payload_b64: String,
    /// Answers are refused after this many ms from now.
    pub timeout_ms: u64,
}

/// `POST /v1/queries/{id}/responses`: this node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueryAnswer {
    /// The answer as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The answer as base64, instead of `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
}

impl QueryAnswer {
    /// The answer's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, SendRequestError> {
        payload_bytes(self.payload.as_deref(), self.payload_b64.as_deref())
    }
}

impl QueryRequest {
    /// The payload's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, SendRequestError> {
        payload_bytes(self.payload.as_deref(), self.payload_b64.as_deref())
    }
}

/// Text or base64, not both; neither is empty.
fn payload_bytes(text: Option<&str>, b64: Option<&str>) -> Result<Vec<u8>, SendRequestError> {
    match (text, b64) {
        (Some(_), Some(_)) => Err(SendRequestError::BothPayloads),
        (Some(t), None) => Ok(t.as_bytes().to_vec()),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| SendRequestError::NotBase64(e.to_string())),
        (None, None) => Ok(Vec::new()),
    }
}

/// `POST /v1/queries/{id}/responses` accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryAnswered {
    /// `answered`.
    pub status: String,
}

/// One node's outcome of a cluster-wide key operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKeys {
    /// The node.
    pub node: NodeRef,
    /// Whether it applied the operation.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its keyring after the operation (when it answered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyEntry>,
}

/// A key in a cluster-wide list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKey {
    /// Its fingerprint.
    pub fingerprint: String,
    /// How many nodes hold it.
    pub nodes: usize,
    /// The nodes where it is primary (names).
    pub primary_on: Vec<String>,
}

/// `POST /v1/cluster/keys[/use|/remove]` and `GET /v1/cluster/keys`: a key
/// operation fanned out to every node over the links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKeys {
    /// Nodes asked (every listed node that has not left, this one included).
    pub nodes: usize,
    /// Nodes that applied it.
    pub ok: usize,
    /// Each node's outcome, failed ones first.
    pub results: Vec<NodeKeys>,
    /// Every key seen, with how many nodes hold it.
    pub keys: Vec<ClusterKey>,
}

/// `POST /v1/peers/{id}/remove` (the body may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// Drop its tombstone at once everywhere, rather than keep it `left`
    /// until the tombstone TTL.
    #[serde(default)]
    pub prune: bool,
}

/// One node's outcome of a cluster-wide operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOutcome {
    /// The node.
    pub node: NodeRef,
    /// Whether it applied the operation.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to `POST /v1/peers/{id}/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The removed peer.
    pub peer: NodeRef,
    /// Whether its tombstone was dropped.
    pub prune: bool,
    /// Live nodes asked (this one included).
    pub nodes: usize,
    /// Nodes that marked it left (or dropped it).
    pub ok: usize,
    /// Each node's outcome, failed ones first.
    pub results: Vec<NodeOutcome>,
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{LinkState, PeerState};

    #[test]
    fn the_state_names_are_the_peer_tables() {
        let names = [
            PeerState::Alive,
            PeerState::Suspect,
            PeerState::Failed,
            PeerState::Left,
        ]
        .map(PeerState::as_str);
        assert_eq!(names, PEER_STATES);
        // Links are shown by the same names the table uses.
        assert_eq!(LinkState::Connecting.as_str(), "connecting");
    }

    #[test]
    fn peer_queries_round_trip_and_refuse_what_they_do_not_know() {
        let q = PeersQuery {
            state: Some("alive".into()),
            name: Some("web-[0-9]+".into()),
            tags: vec![("role".into(), "db x".into())],
        };
        assert_eq!(
            q.uri(),
            "/v1/peers?state=alive&name=web-%5B0-9%5D%2B&tag=role%3Adb%20x"
        );
        let pairs = [
            ("state", "alive"),
            ("name", "web-[0-9]+"),
            ("tag", "role:db x"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        assert_eq!(PeersQuery::from_pairs(pairs), Ok(q));
        assert_eq!(PeersQuery::default().uri(), "/v1/peers");
        let one = |k: &str, v: &str| PeersQuery::from_pairs([(k.to_string(), v.to_string())]);
        assert_eq!(
            one("state", "sleepy"),
            Err(QueryError::UnknownState("sleepy".into()))
        );
        assert_eq!(one("tag", "x"), Err(QueryError::BadTag("x".into())));
        assert_eq!(
            one("foo", "1"),
            Err(QueryError::UnknownParameter("foo".into()))
        );
        let h = HealthQuery::from_pairs([("min_peers".to_string(), "x".to_string())]);
        assert_eq!(h, Err(QueryError::NotANumber("min_peers")));
        assert_eq!(HealthQuery { min_peers: 4 }.uri(), "/v1/health?min_peers=4");
    }

    #[test]
    fn a_send_request_needs_to_even_when_broadcasting() {
        let b: SendRequest = serde_json::from_str(r#"{"to":null,"payload_b64":"AAE="}"#).unwrap();
        assert_eq!((b.to.as_deref(), b.payload().unwrap()), (None, vec![0, 1]));
        let missing = serde_json::from_str::<SendRequest>(r#"{"payload":"x"}"#).unwrap_err();
        assert!(
            missing.to_string().contains("missing field `to`"),
            "{missing}"
        );
        let out = serde_json::to_string(&SendRequest::text(None, "t".into(), "hi".into())).unwrap();
        assert_eq!(out, r#"{"to":null,"topic":"t","payload":"hi"}"#);
        let both = SendRequest {
            payload_b64: Some("AA==".into()),
            ..SendRequest::text(None, String::new(), "x".into())
        };
        assert_eq!(both.payload(), Err(SendRequestError::BothPayloads));
        let long = SendRequest::text(None, "t".repeat(MAX_TOPIC + 1), String::new());
        assert_eq!(long.topic(), Err(SendRequestError::TopicTooLong));
    }

    fn peer() -> PeerInfo {
        PeerInfo {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "n2".into(),
            state: "alive".into(),
            addr: "127.0.0.1:1".into(),
            link: "up".into(),
            rtt_ms: Some(0.25),
            last_seen_ms: 3,
            incarnation: 7,
            tags: Tags::new(),
            conflict: None,
            degraded: false,
            since_ms: 9,
        }
    }

    #[test]
    fn a_peer_entry_is_one_flat_object() {
        let e = PeerEntry {
            peer: peer(),
            traffic: LinkTraffic {
                bytes_out: 5,
                ..LinkTraffic::default()
            },
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["name"], "n2");
        assert_eq!(v["bytes_out"], 5);
        assert!(v["conflict"].is_null() && v["rtt_ms"] == 0.25);
        assert_eq!(serde_json::from_value::<PeerEntry>(v).unwrap(), e);
    }

    #[test]
    fn event_lines_are_read_by_shape() {
        let line = |s: &str| serde_json::from_str::<Event>(s).unwrap();
        let peer_line = serde_json::to_string(&Event {
            kind: "peer_joined".into(),
            at: "t".into(),
            body: EventBody::Peer { peer: peer() },
        })
        .unwrap();
        assert!(peer_line.starts_with(r#"{"type":"peer_joined","at":"t","peer":{"#));
        assert!(matches!(line(&peer_line).body, EventBody::Peer { .. }));
        let m = line(
            r#"{"type":"message","at":"t","from":"f","from_name":null,"topic":"","payload":null,"payload_b64":"AA=="}"#,
        );
        assert!(matches!(
            m.body,
            EventBody::Message(MessageEvent { payload: None, .. })
        ));
        let d = line(r#"{"type":"dropped","at":"t","count":3}"#);
        assert_eq!(d.body, EventBody::Dropped(DroppedEvent { count: 3 }));
        let s = line(r#"{"type":"subscribed","at":"t"}"#);
        assert_eq!(
            (s.kind.as_str(), s.body),
            (EVENT_SUBSCRIBED, EventBody::Other {})
        );
        let future = line(r#"{"type":"peer_renamed","at":"t","old":"x"}"#);
        assert_eq!(future.body, EventBody::Other {});
    }

    #[test]
    fn edit_only_fields_are_absent_from_a_listing() {
        let keys = Keys {
            secured: true,
            keys: vec![],
            secret_file: None,
            changed: None,
            warning: None,
        };
        assert_eq!(
            serde_json::to_string(&keys).unwrap(),
            r#"{"secured":true,"keys":[],"secret_file":null}"#
        );
    }
}
