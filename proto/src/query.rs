//! Queries: a request that fans out over the links, and the acks and
//! answers that come back.
//!
//! Wire: [`Query`] (frame kind 9) and [`QueryResponse`] (kind 10), msgpack
//! maps like every frame. A query is named by its `(origin, id)`: `origin`
//! is the asking node, `id` a number it never reuses in its life (a node's
//! id is new at every start). Every node handles a given query at most once
//! (duplicates are dropped and counted) and answers it at most once.
//!
//! Routing is reverse-path, so that the same frames work over a partial
//! overlay: a node that forwards a query (`ttl > 0`) to its other links
//! remembers which link it came from, and sends responses for it back that
//! way. In the full mesh the asker sends with `ttl = 0` to every linked
//! peer and nobody forwards; in the bounded overlay ([`Queries::set_ttl`])
//! every node forwards a query once, so it reaches every member.
//!
//! [`Queries`] is the sans-IO engine of one node: `ask`, `respond` and the
//! `on_*` inputs take `now`; [`Queries::poll_action`] yields frames to
//! send, [`Queries::poll_event`] what the node must act on (a query to
//! answer locally, acks, answers, a finished query's summary), and
//! [`Queries::next_deadline`] when to call [`Queries::on_tick`].
//!
//! Bounds: names of [`MAX_NAME`] bytes, payloads and answers of
//! [`Limits::max_payload`] bytes, at most [`Limits::max_outstanding`] own
//! queries at once, a timeout of at most [`Limits::max_timeout`], and a
//! duplicate-suppression memory of [`Limits::max_seen`] queries (oldest
//! forgotten first; a query is remembered until [`REMEMBER_LATE`] past its
//! timeout).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Tags};

/// Longest query name, in bytes.
pub const MAX_NAME: usize = 128;
/// Most entries in a filter (nodes plus tags).
pub const MAX_FILTER: usize = 64;
/// How long past its timeout a query is still remembered: duplicates
/// are still recognised, and a late answer is told it is late.
pub const REMEMBER_LATE: Duration = Duration::from_secs(30);
/// Names starting with this are the nodes' own (cluster-wide key
/// operations, force-leave); an application cannot ask or answer them.
pub const INTERNAL_PREFIX: char = '_';

/// Which nodes a query is for. Empty: every node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Filter {
    /// Node names or ids (32 hex digits); a node matches if either is
    /// listed. Empty: any node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Tags a node must all carry, with exactly these values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<(String, String)>,
}

impl Filter {
    /// Whether the node `id` named `name` with `tags` is asked.
    pub fn matches(&self, id: NodeId, name: &str, tags: &Tags) -> bool {
        let node_ok = self.nodes.is_empty()
            || self
                .nodes
                .iter()
                .any(|n| n == name || n.parse::<NodeId>() == Ok(id));
        node_ok
            && self
                .tags
                .iter()
                .all(|(k, v)| tags.get(k).is_some_and(|t| t == v))
    }

    fn len(&self) -> usize {
        self.nodes.len() + self.tags.len()
    }
}

/// A query, as it travels on a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// The asking node.
    pub origin: NodeId,
    /// Its name, for the answerers.
    #[serde(default)]
    pub origin_name: String,
    /// Unique per origin and life.
    pub id: u64,
    /// What is asked (answerers register for names).
    pub name: String,
    /// Opaque payload (msgpack `bin`).
    #[serde(default)]
    pub payload: Bytes,
    /// Which nodes answer.
    #[serde(default)]
    pub filter: Filter,
    /// How long the asker waits, in ms from when a node receives it: past
    /// that, answers are pointless and refused.
    pub timeout_ms: u64,
    /// How many more times the query may be forwarded (0: not at all).
    #[serde(default)]
    pub ttl: u8,
}

/// What a [`QueryResponse`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseKind {
    /// "The query reached me and matches me": sent on receipt.
    Ack,
    /// The answer (its payload).
    Answer,
}

/// An ack or an answer, travelling back to the asker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryResponse {
    /// The asking node.
    pub origin: NodeId,
    /// The query's id at the origin.
    pub id: u64,
    /// The responding node.
    pub from: NodeId,
    /// Its name.
    #[serde(default)]
    pub from_name: String,
    /// Ack or answer.
    pub kind: ResponseKind,
    /// The answer (empty for an ack).
    #[serde(default)]
    pub payload: Bytes,
    /// How many more times the response may be forwarded toward the origin.
    #[serde(default)]
    pub ttl: u8,
}

/// Either query frame, as the link hands it to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryMessage {
    /// A query.
    Query(Query),
    /// An ack or answer.
    Response(QueryResponse),
}

/// The engine's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest query payload and answer, in bytes.
    pub max_payload: usize,
    /// Most own queries waiting for answers at once.
    pub max_outstanding: usize,
    /// Longest timeout a query may ask for (longer ones are cut to it).
    pub max_timeout: Duration,
    /// Most queries remembered for duplicate suppression and routing.
    pub max_seen: usize,
}

impl Limits {
    /// [`Limits::max_payload`] by default (answerers outside the engine,
    /// such as query handlers, bound their output by it).
    pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: Self::DEFAULT_MAX_PAYLOAD,
            max_outstanding: 64,
            max_timeout: Duration::from_secs(300),
            max_seen: 4096,
        }
    }
}

/// What a node asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// Query name.
    pub name: String,
    /// Payload.
    pub payload: Bytes,
    /// Which nodes answer.
    pub filter: Filter,
    /// How long to wait.
    pub timeout: Duration,
    /// The linked peers to send it to.
    pub targets: Vec<NodeId>,
    /// The nodes this node believes match the filter (itself included
    /// when it matches): the `asked` of the summary.
    pub expected: Vec<NodeId>,
}

/// This node, as filters see it.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its tags now.
    pub tags: &'a Tags,
}

/// Why a query cannot be asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// Empty or longer than [`MAX_NAME`].
    #[error("a query name must be 1 to {MAX_NAME} bytes")]
    Name,
    /// Reserved for the nodes' own queries.
    #[error("query names starting with '_' are reserved")]
    Reserved,
    /// Payload over [`Limits::max_payload`].
    #[error("payload of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    /// More than [`MAX_FILTER`] filter entries.
    #[error("at most {MAX_FILTER} filter entries")]
    Filter,
    /// [`Limits::max_outstanding`] queries already wait.
    #[error("too many queries in flight (at most {0}); try again later")]
    Busy(usize),
    /// A zero timeout.
    #[error("the timeout must be at least 1 ms")]
    Timeout,
}

/// Why an answer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RespondError {
    /// No such query is waiting for this node's answer (never delivered,
    /// or forgotten after its timeout).
    #[error("no such query waiting for an answer")]
    Unknown,
    /// This node answered it already.
    #[error("this node already answered that query")]
    Answered,
    /// Its timeout has passed.
    #[error("the query's timeout has passed")]
    Late,
    /// Over [`Limits::max_payload`].
    #[error("answer of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
}

/// The outcome of one of this node's queries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// Nodes believed to match when it was asked.
    pub asked: usize,
    /// Nodes that acknowledged it.
    pub acked: usize,
    /// Nodes that answered.
    pub answered: usize,
    /// Expected nodes that did not answer in time.
    pub timed_out: Vec<NodeId>,
}

/// What the node must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryEvent {
    /// A query this node matches: hand it to the local answerers, who may
    /// call [`Queries::respond`] once before `deadline`.
    Deliver {
        /// The asker.
        origin: NodeId,
        /// Its name.
        origin_name: String,
        /// The query's id at the origin.
        id: u64,
        /// Query name.
        name: String,
        /// Payload.
        payload: Bytes,
        /// Answers are refused after this.
        deadline: Instant,
    },
    /// A node acknowledged one of our queries.
    Ack {
        /// Our query.
        id: u64,
        /// Who.
        from: NodeId,
        /// Its name.
        from_name: String,
    },
    /// A node answered one of our queries.
    Answer {
        /// Our query.
        id: u64,
        /// Who.
        from: NodeId,
        /// Its name.
        from_name: String,
        /// The answer.
        payload: Bytes,
    },
    /// One of our queries timed out (or every expected node answered).
    Done {
        /// Our query.
        id: u64,
        /// Its outcome.
        summary: Summary,
    },
}

/// A frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// A linked peer.
    pub to: NodeId,
    /// What.
    pub msg: QueryMessage,
}

/// Counts of what the engine refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueryStats {
    /// Queries received more than once (dropped).
    pub duplicates: u64,
    /// Frames over the limits (dropped).
    pub oversize: u64,
    /// Responses for queries this node no longer waits for.
    pub late: u64,
    /// Queries forwarded to other links.
    pub forwarded: u64,
}

#[derive(Debug)]
struct Seen {
    /// The link it came from (`None`: asked here).
    from: Option<NodeId>,
    forget_at: Instant,
}

#[derive(Debug)]
struct Delivered {
    reply_to: Option<NodeId>,
    deadline: Instant,
    answered: bool,
}

#[derive(Debug)]
struct Outstanding {
    deadline: Instant,
    expected: BTreeSet<NodeId>,
    acked: BTreeSet<NodeId>,
    answered: BTreeSet<NodeId>,
}

/// The sans-IO query engine of one node. See the module docs.
#[derive(Debug)]
pub struct Queries {
    local: NodeId,
    local_name: String,
    limits: Limits,
    next_id: u64,
    seen: HashMap<(NodeId, u64), Seen>,
    /// Insertion order of `seen`, to forget the oldest first.
    order: VecDeque<(NodeId, u64)>,
    delivered: HashMap<(NodeId, u64), Delivered>,
    outstanding: HashMap<u64, Outstanding>,
    events: VecDeque<QueryEvent>,
    transmits: VecDeque<Transmit>,
    stats: QueryStats,
    /// The `ttl` of this node's queries (0: the full mesh, nobody
    /// forwards).
    ttl: u8,
}

impl Queries {
    /// The engine of node `local` named `name`.
    pub fn new(local: NodeId, name: &str, limits: Limits) -> Self {
        Queries {
            local,
            local_name: name.to_string(),
            limits,
            next_id: 1,
            seen: HashMap::new(),
            order: VecDeque::new(),
            delivered: HashMap::new(),
            outstanding: HashMap::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            stats: QueryStats::default(),
            ttl: 0,
        }
    }

    /// How many times this node's queries may be forwarded: 0 (the
    /// default) in the full mesh, where the asker reaches every member
    /// itself; more than any path's hops in the bounded overlay, where
    /// duplicates are dropped anyway.
    pub fn set_ttl(&mut self, ttl: u8) {
        self.ttl = ttl;
    }

    /// The bounds.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What was refused so far.
    pub fn stats(&self) -> QueryStats {
        self.stats
    }

    /// Own queries waiting for answers.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Drains one frame to send.
    pub fn poll_action(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Drains one event.
    pub fn poll_event(&mut self) -> Option<QueryEvent> {
        self.events.pop_front()
    }

    /// Asks an application query (names starting with `_` are refused).
    pub fn ask(&mut self, now: Instant, ask: Ask, local: Local<'_>) -> Result<u64, AskError> {
        if ask.name.starts_with(INTERNAL_PREFIX) {
            return Err(AskError::Reserved);
        }
        self.ask_any(now, ask, local)
    }

    /// Asks any query, the nodes' own (`_...`) included.
    pub fn ask_internal(
        &mut self,
        now: Instant,
        ask: Ask,
        local: Local<'_>,
    ) -> Result<u64, AskError> {
        self.ask_any(now, ask, local)
    }

    fn ask_any(&mut self, now: Instant, ask: Ask, local: Local<'_>) -> Result<u64, AskError> {
        if ask.name.is_empty() || ask.name.len() > MAX_NAME {
            return Err(AskError::Name);
        }
        if ask.payload.len() > self.limits.max_payload {
            return Err(AskError::TooLarge(
                ask.payload.len(),
                self.limits.max_payload,
            ));
        }
        if ask.filter.len() > MAX_FILTER {
            return Err(AskError::Filter);
        }
        if ask.timeout.is_zero() {
            return Err(AskError::Timeout);
        }
        if self.outstanding.len() >= self.limits.max_outstanding {
            return Err(AskError::Busy(self.limits.max_outstanding));
        }
        let timeout = ask.timeout.min(self.limits.max_timeout);
        let id = self.next_id;
        self.next_id += 1;
        let deadline = now + timeout;
        self.remember(now, (self.local, id), None, deadline);
        let q = Query {
            origin: self.local,
            origin_name: self.local_name.clone(),
            id,
            name: ask.name,
            payload: ask.payload,
            filter: ask.filter,
            timeout_ms: timeout.as_millis() as u64,
            ttl: self.ttl,
        };
        let mut targets = ask.targets;
        targets.sort_unstable();
        targets.dedup();
        targets.retain(|t| *t != self.local);
        for to in targets {
            self.transmits.push_back(Transmit {
                to,
                msg: QueryMessage::Query(q.clone()),
            });
        }
        self.outstanding.insert(
            id,
            Outstanding {
                deadline,
                expected: ask.expected.into_iter().collect(),
                acked: BTreeSet::new(),
                answered: BTreeSet::new(),
            },
        );
        if q.filter.matches(self.local, local.name, local.tags) {
            self.deliver(now, q, None);
        }
        Ok(id)
    }

    /// A query arrived on the link from `from`; `linked` are the peers this
    /// node could forward it to.
    pub fn on_query(
        &mut self,
        now: Instant,
        from: NodeId,
        q: Query,
        local: Local<'_>,
        linked: &[NodeId],
    ) {
        if q.name.is_empty()
            || q.name.len() > MAX_NAME
            || q.payload.len() > self.limits.max_payload
            || q.filter.len() > MAX_FILTER
        {
            self.stats.oversize += 1;
            return;
        }
        let key = (q.origin, q.id);
        if q.origin == self.local || self.seen.contains_key(&key) {
            self.stats.duplicates += 1;
            return;
        }
        let timeout = Duration::from_millis(q.timeout_ms).min(self.limits.max_timeout);
        self.remember(now, key, Some(from), now + timeout);
        if q.ttl > 0 {
            let fwd = Query {
                ttl: q.ttl - 1,
                ..q.clone()
            };
            let mut to: Vec<NodeId> = linked
                .iter()
                .copied()
                .filter(|p| *p != from && *p != q.origin && *p != self.local)
                .collect();
            to.sort_unstable();
            to.dedup();
            for t in to {
                self.stats.forwarded += 1;
                self.transmits.push_back(Transmit {
                    to: t,
                    msg: QueryMessage::Query(fwd.clone()),
                });
            }
        }
        if q.filter.matches(self.local, local.name, local.tags) {
            let q = Query {
                timeout_ms: timeout.as_millis() as u64,
                ..q
            };
            self.deliver(now, q, Some(from));
        }
    }

    /// Records a matching query, acks it and hands it to the answerers.
    fn deliver(&mut self, now: Instant, q: Query, reply_to: Option<NodeId>) {
        let deadline = now + Duration::from_millis(q.timeout_ms);
        self.delivered.insert(
            (q.origin, q.id),
            Delivered {
                reply_to,
                deadline,
                answered: false,
            },
        );
        let ack = QueryResponse {
            origin: q.origin,
            id: q.id,
            from: self.local,
            from_name: self.local_name.clone(),
            kind: ResponseKind::Ack,
            payload: Bytes::new(),
            ttl: u8::MAX,
        };
        self.events.push_back(QueryEvent::Deliver {
            origin: q.origin,
            origin_name: q.origin_name,
            id: q.id,
            name: q.name,
            payload: q.payload,
            deadline,
        });
        self.reply(now, reply_to, ack);
    }

    /// Sends a response toward the origin (or takes it here, when this
    /// node is the origin).
    fn reply(&mut self, now: Instant, via: Option<NodeId>, r: QueryResponse) {
        match via {
            Some(to) => self.transmits.push_back(Transmit {
                to,
                msg: QueryMessage::Response(r),
            }),
            None => self.on_response(now, self.local, r),
        }
    }

    /// This node's answer to the query `(origin, id)` delivered earlier.
    /// Once only, before its deadline.
    pub fn respond(
        &mut self,
        now: Instant,
        origin: NodeId,
        id: u64,
        payload: Bytes,
    ) -> Result<(), RespondError> {
        let max = self.limits.max_payload;
        let d = self
            .delivered
            .get_mut(&(origin, id))
            .ok_or(RespondError::Unknown)?;
        if d.answered {
            return Err(RespondError::Answered);
        }
        if now >= d.deadline {
            return Err(RespondError::Late);
        }
        if payload.len() > max {
            return Err(RespondError::TooLarge(payload.len(), max));
        }
        d.answered = true;
        let via = d.reply_to;
        let r = QueryResponse {
            origin,
            id,
            from: self.local,
            from_name: self.local_name.clone(),
            kind: ResponseKind::Answer,
            payload,
            ttl: u8::MAX,
        };
        self.reply(now, via, r);
        Ok(())
    }

    /// A response arrived on the link from `from` (or from this node).
    pub fn on_response(&mut self, _now: Instant, from: NodeId, r: QueryResponse) {
        if r.payload.len() > self.limits.max_payload {
            self.stats.oversize += 1;
            return;
        }
        if r.origin != self.local {
            // Not ours: back along the path the query came by.
            let via = self.seen.get(&(r.origin, r.id)).and_then(|s| s.from);
            match via {
                Some(to) if r.ttl > 0 && to != from => {
                    self.stats.forwarded += 1;
                    self.transmits.push_back(Transmit {
                        to,
                        msg: QueryMessage::Response(QueryResponse {
                            ttl: r.ttl - 1,
                            ..r
                        }),
                    });
                }
                _ => self.stats.late += 1,
            }
            return;
        }
        let Some(o) = self.outstanding.get_mut(&r.id) else {
            self.stats.late += 1;
            return;
        };
        let first_word = o.acked.insert(r.from);
        if first_word {
            self.events.push_back(QueryEvent::Ack {
                id: r.id,
                from: r.from,
                from_name: r.from_name.clone(),
            });
        }
        if r.kind == ResponseKind::Answer && o.answered.insert(r.from) {
            self.events.push_back(QueryEvent::Answer {
                id: r.id,
                from: r.from,
                from_name: r.from_name,
                payload: r.payload,
            });
        }
        // Everyone expected answered: no need to wait out the timeout.
        if !o.expected.is_empty() && o.expected.is_subset(&o.answered) {
            self.finish(r.id);
        }
    }

    fn finish(&mut self, id: u64) {
        let Some(o) = self.outstanding.remove(&id) else {
            return;
        };
        let summary = Summary {
            asked: o.expected.len(),
            acked: o.acked.len(),
            answered: o.answered.len(),
            timed_out: o.expected.difference(&o.answered).copied().collect(),
        };
        self.events.push_back(QueryEvent::Done { id, summary });
    }

    /// Stops waiting for one of our queries now (the asker went away).
    pub fn cancel(&mut self, id: u64) {
        self.outstanding.remove(&id);
    }

    /// Times out our queries and forgets old ones.
    pub fn on_tick(&mut self, now: Instant) {
        let mut due: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for id in due {
            self.finish(id);
        }
        self.delivered
            .retain(|_, d| d.deadline + REMEMBER_LATE > now);
        while let Some(key) = self.order.front() {
            match self.seen.get(key) {
                Some(s) if s.forget_at > now => break,
                _ => {
                    self.seen.remove(key);
                    self.order.pop_front();
                }
            }
        }
    }

    /// When [`Queries::on_tick`] must next be called, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let own = self.outstanding.values().map(|o| o.deadline).min();
        let forget = self
            .order
            .front()
            .and_then(|k| self.seen.get(k))
            .map(|s| s.forget_at);
        match (own, forget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Remembers a query for duplicate suppression and routing, forgetting
    /// the oldest when full.
    fn remember(
        &mut self,
        _now: Instant,
        key: (NodeId, u64),
        from: Option<NodeId>,
        until: Instant,
    ) {
        while self.seen.len() >= self.limits.max_seen {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.seen.remove(&old);
            self.delivered.remove(&old);
        }
        self.seen.insert(
            key,
            Seen {
                from,
                forget_at: until + REMEMBER_LATE,
            },
        );
        self.order.push_back(key);
    }
}

#[cfg(test)]
mod tests;
