//! The node's shared state: identity, the peer read-model and the event bus.
//!
//! The membership task is the single writer of [`NodeState::peers`] (a
//! `DashMap` read-model of the sans-IO `proto::membership::PeerTable` it
//! owns); the control API only reads it, cloning values out. No guard is ever
//! held across an `.await` (clippy enforces it via `clippy.toml`).
//!
//! The event bus ([`EventBus`]) gives every `/v1/events` subscriber its own
//! backlog, bounded in bytes ([`EVENT_BACKLOG_BYTES`]) and in events
//! ([`EVENT_BACKLOG_EVENTS`]). Publishing never waits: an event that does not
//! fit a subscriber's backlog is counted for that subscriber, which later
//! reads one `dropped` line in its place. A subscriber's backlog is freed when
//! its stream is dropped. With no subscriber, publishing costs one atomic load
//! (the event is not even built).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use discovery::Interface;
use proto::control;
use proto::frame::AppMessage;
use proto::membership::Peer;
use proto::secure::SharedKeyring;
use proto::{Incarnation, NodeId};
use serde::Serialize;
use tokio::sync::Notify;
use tracing::warn;
use transport::Transport;

/// Bytes of event lines buffered per `/v1/events` subscriber before further
/// events are dropped for it (it is told how many). An event larger than this
/// is still queued when the backlog is empty, so one subscriber holds at most
/// `max(EVENT_BACKLOG_BYTES, largest event)`.
pub const EVENT_BACKLOG_BYTES: usize = 8 << 20;
/// Events buffered per subscriber, whatever their size.
pub const EVENT_BACKLOG_EVENTS: usize = 4096;

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

/// The bounded overlay's figures, mirrored by the membership task.
#[derive(Debug, Default)]
pub struct OverlayCounters {
    /// `--max-links` (0: full mesh, and the rest stays 0).
    pub max_links: u64,
    /// The members this node wants links with now.
    pub neighbours: AtomicU64,
    /// Times this node refuted a report of its own failure.
    pub refutations: AtomicU64,
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
    /// Incarnation at start.
    pub incarnation: Incarnation,
    /// Incarnation now: the start's, raised by every refutation of a
    /// report of this node's failure (overlay mode). One cell shared with
    /// discovery's beacons and the transport's handshakes, written only by
    /// the membership task (see [`NodeState::current_incarnation`]).
    pub live_incarnation: Arc<AtomicU64>,
    /// The bounded overlay's figures.
    pub overlay: OverlayCounters,
    /// Start time (monotonic).
    pub started: Instant,
    /// Tags (changeable at runtime; see [`crate::tags`]).
    pub tags: crate::tags::LocalTags,
    /// Interfaces in use.
    pub interfaces: Vec<Interface>,
    /// Data address advertised per interface.
    pub advertised: Vec<SocketAddr>,
    /// TCP listen address (after binding).
    pub listen: SocketAddr,
    /// Multicast group.
    pub group: SocketAddr,
    /// Multicast TTL.
    pub ttl: u32,
    /// Beacon interval.
    pub beacon_interval: Duration,
    /// Peer read-model (single writer: the membership task).
    pub peers: DashMap<NodeId, Peer>,
    /// Event bus: one JSON line per event, a bounded backlog per subscriber.
    pub events: EventBus,
    /// Discovery counters.
    pub discovery: Arc<discovery::Stats>,
    /// Transport handle (and its counters).
    pub transport: Transport,
    /// Peer state changes by event kind (`peer_failed`, ...).
    pub transitions: proto::stats::Tally,
    /// The peer table's own counters.
    pub table: TableCounters,
    /// Whether multicast discovery runs.
    pub multicast: bool,
    /// Seeds and their last outcomes (written by the seed task).
    pub seeds: std::sync::Mutex<Vec<proto::control::SeedInfo>>,
    /// Where peers are remembered (`--state-dir`).
    pub state_dir: Option<PathBuf>,
    /// Application messages received.
    pub messages_in: AtomicU64,
    /// Application messages sent.
    pub messages_out: AtomicU64,
    /// The cluster keyring, when the node runs with a secret.
    pub keyring: Option<SharedKeyring>,
    /// Where the keyring is persisted (`--secret-file`).
    pub secret_file: Option<PathBuf>,
    /// The log level and monitor control (`None` when embedded).
    pub log: Option<crate::logging::LogControl>,
    /// Event handler counters (written by the handler dispatcher).
    pub handlers: crate::handlers::Stats,
    /// The query task (see [`crate::query`]).
    pub queries: crate::query::QueryHandle,
    /// The relay task (see [`crate::relay`]).
    pub relay: crate::relay::RelayHandle,
    /// Operator commands for the membership task.
    pub table_commands: tokio::sync::mpsc::Sender<crate::table_task::TableCommand>,
}

/// RFC 3339 timestamp of now, with microseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// How a peer looks in the API and on the event stream (the link's traffic
/// is added by the caller, in a [`control::PeerEntry`]).
pub fn peer_json(p: &Peer, now: Instant) -> control::PeerInfo {
    control::PeerInfo {
        id: p.id.to_string(),
        name: p.name.clone(),
        state: p.state.as_str().into(),
        addr: p.addr.to_string(),
        link: p.link.as_str().into(),
        // Milliseconds, rounded to the microsecond.
        rtt_ms: p
            .rtt
            .map(|d| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
        last_seen_ms: now.saturating_duration_since(p.last_seen).as_millis() as u64,
        incarnation: p.incarnation,
        tags: p.tags.clone(),
        conflict: p.conflict.map(|a| a.to_string()),
        degraded: p.degraded(),
        since_ms: now.saturating_duration_since(p.since).as_millis() as u64,
    }
}

impl NodeState {
    /// Publishes one event: `type` and `at`, then the fields of `body()`
    /// (a struct or a JSON object). `body` is only called when someone
    /// subscribes, so callers can leave costly fields (a message's base64
    /// payload) to it. Never blocks.
    pub fn publish<B: Serialize>(&self, kind: &str, body: impl FnOnce() -> B) {
        if !self.events.has_subscribers() {
            return;
        }
        // Every backlog full (one stuck reader and nobody else): count the
        // drop without building an event nobody can take.
        if self.events.drop_if_all_full() {
            return;
        }
        let event = control::Event {
            kind: kind.into(),
            at: now_rfc3339(),
            body: body(),
        };
        match serde_json::to_vec(&event) {
            Ok(mut line) => {
                line.push(b'\n');
                self.events.publish(Bytes::from(line));
            }
            // Only a body that is not map-like (a bug of the caller) fails.
            Err(error) => warn!(kind, %error, "event not published: its body is not an object"),
        }
    }

    /// An application message for this node, from `from` (a linked peer,
    /// or the origin of a relayed message): counted, and published as a
    /// `message` event, built only when someone follows the events.
    pub fn deliver_message(&self, from: NodeId, from_name: Option<&str>, msg: &AppMessage) {
        use base64::Engine as _;
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.publish("message", || {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&msg.payload);
            let text = std::str::from_utf8(&msg.payload).ok();
            serde_json::json!({
                "from": from.to_string(),
                "from_name": from_name,
                "topic": msg.topic,
                "payload": text,
                "payload_b64": b64,
            })
        });
    }

    /// This node's incarnation now: the start's unless a refutation
    /// raised it.
    pub fn current_incarnation(&self) -> Incarnation {
        self.incarnation
            .max(self.live_incarnation.load(Ordering::Relaxed))
    }

    /// Sends this node's own membership record (its tags now, and their
    /// version) to each of `to`, off the caller's task; returns how many
    /// were asked. Best effort per peer: a full or closed link loses it,
    /// and a later change or relink sends the news again.
    pub fn send_self_record(&self, to: Vec<NodeId>) -> u64 {
        let (tags, version) = self.tags.versioned();
        let Some(&addr) = self.advertised.first() else {
            return 0;
        };
        let record = crate::tags::self_record(
            self.id,
            self.current_incarnation(),
            &self.name,
            addr,
            tags,
            version,
        );
        let n = to.len() as u64;
        let transport = self.transport.clone();
        tokio::spawn(async move {
            let list = proto::frame::PeerList {
                peers: vec![record],
            };
            for id in to {
                let msg = proto::Message::Peers(list.clone());
                if let Err(error) = transport.try_send(id, msg).await {
                    tracing::debug!(to = %id.short(), %error, "tags not sent");
                }
            }
        });
        n
    }

    /// Ids of the peers with a link up.
    pub fn linked(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|p| p.link == proto::membership::LinkState::Up)
            .map(|p| p.id)
            .collect()
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

/// The event bus: a registry of subscribers, each with its own bounded
/// backlog. Cheap to publish to (one short lock per subscriber), free when
/// nobody subscribes.
#[derive(Debug, Default)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

#[derive(Debug, Default)]
struct BusInner {
    /// Subscribers; std `Mutex`: held to publish, subscribe or leave, never
    /// across an `.await`. Lock order: this, then a subscriber's backlog.
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
    /// `subscribers.len()`, readable without the lock.
    count: AtomicUsize,
    /// Events dropped for slow subscribers, over the node's life.
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Subscriber {
    backlog: Mutex<Backlog>,
    /// Wakes the subscriber's stream (a stored permit: no lost wake-ups).
    ready: Notify,
}

/// One subscriber's queue. Its size is bounded by [`EVENT_BACKLOG_BYTES`] and
/// [`EVENT_BACKLOG_EVENTS`]; a `Dropped` marker is never pushed next to
/// another, so markers are at most one more than lines.
#[derive(Debug, Default)]
struct Backlog {
    items: VecDeque<Item>,
    bytes: usize,
    lines: usize,
}

/// What a subscriber reads next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// One event, as its JSON line (newline included); shared, not copied,
    /// between subscribers.
    Line(Bytes),
    /// This many events did not fit the backlog here.
    Dropped(u64),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data
    // (every critical section is a push, a pop or a retain).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backlog {
    /// Queues `line`, or records it as dropped when the budget is spent.
    /// Returns whether it was queued.
    fn push(&mut self, line: &Bytes) -> bool {
        let fits = self.lines == 0
            || (self.lines < EVENT_BACKLOG_EVENTS
                && self.bytes + line.len() <= EVENT_BACKLOG_BYTES);
        if fits {
            self.bytes += line.len();
            self.lines += 1;
            self.items.push_back(Item::Line(line.clone()));
        } else {
            self.record_drop();
        }
        fits
    }

    /// Whether an event of a few bytes would still be queued.
    fn has_room(&self) -> bool {
        self.lines == 0 || (self.lines < EVENT_BACKLOG_EVENTS && self.bytes < EVENT_BACKLOG_BYTES)
    }

    fn record_drop(&mut self) {
        if let Some(Item::Dropped(n)) = self.items.back_mut() {
            *n += 1;
        } else {
            self.items.push_back(Item::Dropped(1));
        }
    }

    fn pop(&mut self) -> Option<Item> {
        let item = self.items.pop_front()?;
        if let Item::Line(l) = &item {
            self.bytes -= l.len();
            self.lines -= 1;
        }
        Some(item)
    }
}

impl EventBus {
    /// Whether anyone subscribes right now.
    pub fn has_subscribers(&self) -> bool {
        self.inner.count.load(Ordering::Relaxed) > 0
    }

    /// Current subscribers.
    pub fn subscribers(&self) -> usize {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// Events dropped for slow subscribers since start.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// If no subscriber has room for even a small event, counts one dropped
    /// event for each and returns true; else changes nothing.
    pub fn drop_if_all_full(&self) -> bool {
        let subs = lock(&self.inner.subscribers);
        if subs.is_empty() || subs.iter().any(|s| lock(&s.backlog).has_room()) {
            return false;
        }
        // A reader that makes room just now loses this one event: it is
        // counted and reported like any other drop.
        for s in subs.iter() {
            lock(&s.backlog).record_drop();
        }
        self.inner
            .dropped
            .fetch_add(subs.len() as u64, Ordering::Relaxed);
        true
    }

    /// Queues `line` for every subscriber that has room. O(subscribers),
    /// never waits for a reader.
    pub fn publish(&self, line: Bytes) {
        let subs = lock(&self.inner.subscribers);
        let mut dropped = 0;
        for s in subs.iter() {
            if !lock(&s.backlog).push(&line) {
                dropped += 1;
            }
            s.ready.notify_one();
        }
        if dropped > 0 {
            self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// A new subscriber; it sees every event published from now on (or a
    /// count of those that did not fit). Dropping it frees its backlog.
    pub fn subscribe(&self) -> Subscription {
        let sub = Arc::new(Subscriber {
            backlog: Mutex::new(Backlog::default()),
            ready: Notify::new(),
        });
        let mut subs = lock(&self.inner.subscribers);
        subs.push(sub.clone());
        self.inner.count.store(subs.len(), Ordering::Relaxed);
        Subscription {
            bus: self.inner.clone(),
            sub,
        }
    }
}

/// One subscriber's end of the bus.
#[derive(Debug)]
pub struct Subscription {
    bus: Arc<BusInner>,
    sub: Arc<Subscriber>,
}

impl Subscription {
    /// The next item, without waiting.
    pub fn try_next(&self) -> Option<Item> {
        lock(&self.sub.backlog).pop()
    }

    /// The next item, waiting for one. Cancel-safe: an item is only taken
    /// out of the backlog when it is returned.
    pub async fn next(&self) -> Item {
        loop {
            if let Some(item) = self.try_next() {
                return item;
            }
            // A publish between `try_next` and here leaves a permit, so
            // this returns at once.
            self.sub.ready.notified().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = lock(&self.bus.subscribers);
        subs.retain(|s| !Arc::ptr_eq(s, &self.sub));
        self.bus.count.store(subs.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn a_full_backlog_drops_and_says_how_many_in_place() {
        let bus = EventBus::default();
        let sub = bus.subscribe();
        let big = EVENT_BACKLOG_BYTES / 4;
        for _ in 0..6 {
            bus.publish(line(big));
        }
        assert_eq!(bus.dropped(), 2);
        for _ in 0..4 {
            assert!(matches!(sub.try_next(), Some(Item::Line(l)) if l.len() == big));
        }
        assert_eq!(sub.try_next(), Some(Item::Dropped(2)));
        assert_eq!(sub.try_next(), None);
        // Room again: the stream goes on.
        bus.publish(line(1));
        assert!(matches!(sub.try_next(), Some(Item::Line(l)) if l.len() == 1));
    }

    #[test]
    fn the_count_bound_holds_for_tiny_events() {
        let bus = EventBus::default();
        let sub = bus.subscribe();
        for _ in 0..EVENT_BACKLOG_EVENTS + 10 {
            bus.publish(line(1));
        }
        let mut lines = 0;
        while let Some(Item::Line(_)) = sub.try_next() {
            lines += 1;
        }
        assert_eq!(lines, EVENT_BACKLOG_EVENTS);
        assert_eq!(bus.dropped(), 10);
    }

    #[test]
    fn with_every_backlog_full_nothing_is_built() {
        let bus = EventBus::default();
        assert!(!bus.drop_if_all_full(), "no subscriber: nothing to count");
        let sub = bus.subscribe();
        assert!(!bus.drop_if_all_full());
        bus.publish(line(EVENT_BACKLOG_BYTES));
        assert!(bus.drop_if_all_full());
        assert!(bus.drop_if_all_full());
        assert_eq!(bus.dropped(), 2);
        assert!(matches!(sub.try_next(), Some(Item::Line(_))));
        assert_eq!(sub.try_next(), Some(Item::Dropped(2)));
        assert!(!bus.drop_if_all_full(), "room again");
    }

    #[test]
    fn an_event_over_the_budget_passes_an_empty_backlog_only() {
        let bus = EventBus::default();
        let sub = bus.subscribe();
        bus.publish(line(EVENT_BACKLOG_BYTES + 1));
        bus.publish(line(1));
        assert!(matches!(sub.try_next(), Some(Item::Line(_))));
        assert_eq!(sub.try_next(), Some(Item::Dropped(1)));
    }

    #[test]
    fn each_subscriber_has_its_own_budget_and_leaving_frees_it() {
        let bus = EventBus::default();
        let slow = bus.subscribe();
        let fast = bus.subscribe();
        assert_eq!(bus.subscribers(), 2);
        for _ in 0..8 {
            bus.publish(line(EVENT_BACKLOG_BYTES / 4));
            assert!(matches!(fast.try_next(), Some(Item::Line(_))));
        }
        assert_eq!(fast.try_next(), None);
        assert_eq!(bus.dropped(), 4, "only the slow one lost events");
        let weak = Arc::downgrade(&slow.sub);
        drop(slow);
        assert_eq!(bus.subscribers(), 1);
        assert!(weak.upgrade().is_none(), "the slow backlog is freed");
    }

    #[tokio::test]
    async fn next_wakes_on_publish() {
        let bus = Arc::new(EventBus::default());
        let sub = bus.subscribe();
        let b = bus.clone();
        let t = tokio::spawn(async move { sub.next().await });
        tokio::task::yield_now().await;
        b.publish(line(3));
        assert!(matches!(t.await.unwrap(), Item::Line(l) if l.len() == 3));
    }
}
