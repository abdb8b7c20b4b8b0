//! The query task: sole owner of the node's sans-IO query engine
//! ([`proto::query::Queries`]).
//!
//! Inputs arrive on one bounded channel ([`QueryHandle`]): query frames
//! from the links (forwarded by the membership task), asks from the control
//! API, answers from local answerers. Outputs: frames to linked peers, each
//! ask's progress on its own bounded channel (the API streams it as
//! NDJSON), and a `query` event on the event bus for every query this node
//! matches.
//!
//! ## Hook for answerers
//! A query this node should answer is published on the [`EventBus`] as an
//! event of type `query` ([`proto::control::QueryEvent`]: `id`, `name`,
//! `from`, `payload`, `timeout_ms`). Anything in the node that follows the
//! bus (a `query:NAME` handler) answers with [`QueryHandle::respond`]; a
//! local program following `/v1/events` answers with
//! `POST /v1/queries/{id}/responses`. The first answer counts; later ones
//! are refused, as are answers past the timeout.
//!
//! Names starting with `_` are the nodes' own: `_keys` (cluster-wide key
//! operations) is answered here, never published.
//!
//! [`EventBus`]: crate::state::EventBus

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use proto::control::{KeyEntry, NodeRef};
use proto::membership::PeerState;
use proto::query::{
    Ask, AskError, Filter, Limits, Local, Queries, QueryEvent, QueryMessage, RespondError, Summary,
};
use proto::{Message, NodeId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::state::NodeState;

/// Commands queued for the query task.
const COMMANDS: usize = 1024;
/// Progress items queued per ask (acks and answers of up to this many
/// nodes are never lost; past it, they are counted and dropped).
const PROGRESS: usize = 4096;

/// The name of the cluster-wide key operation.
pub const KEYS_QUERY: &str = "_keys";
/// The name of the cluster-wide force-leave.
pub const REMOVE_QUERY: &str = "_remove";

/// A force-leave, the `_remove` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveOp {
    /// The peer's id.
    pub id: String,
    /// Drop the entry rather than keep it `left`.
    #[serde(default)]
    pub prune: bool,
}

/// A node's answer to a `_keys` or `_remove` query.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Applied.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// One step of an ask, for its asker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A node has the query.
    Ack(NodeRef),
    /// A node's answer.
    Answer(NodeRef, Bytes),
    /// Finished (timeout, or every expected node answered).
    Done {
        /// The engine's summary.
        summary: Summary,
        /// `summary.timed_out`, named.
        timed_out: Vec<NodeRef>,
    },
}

/// What an accepted ask gives back.
#[derive(Debug)]
pub struct Asked {
    /// The query's id as answerers see it (`ORIGIN-N`).
    pub id: String,
    /// The nodes believed to match.
    pub asked: Vec<NodeRef>,
    /// Its progress; ends after [`Progress::Done`]. Dropping it cancels.
    pub progress: mpsc::Receiver<Progress>,
}

/// Which nodes an ask expects answers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Live peers (alive, suspect) that match, and this node if it does.
    Live,
    /// Every listed peer that has not left, failed ones included (so that
    /// they are reported as not answering), and this node.
    NotLeft,
}

/// An ask, as the API hands it over.
#[derive(Debug, Clone)]
pub struct AskSpec {
    /// Query name.
    pub name: String,
    /// Payload.
    pub payload: Bytes,
    /// Which nodes.
    pub filter: Filter,
    /// How long.
    pub timeout: Duration,
    /// Whose answers are expected.
    pub expect: Expect,
    /// A node's own query (`_...`).
    pub internal: bool,
}

#[derive(Debug)]
enum Command {
    Frame {
        from: NodeId,
        msg: QueryMessage,
    },
    Ask {
        spec: AskSpec,
        reply: oneshot::Sender<Result<Asked, AskError>>,
    },
    Respond {
        origin: NodeId,
        id: u64,
        payload: Bytes,
        reply: oneshot::Sender<Result<(), RespondError>>,
    },
}

/// Counters of the query task.
#[derive(Debug, Default)]
pub struct QueryCounters {
    /// Queries asked here.
    pub asked: AtomicU64,
    /// Queries received that this node matched.
    pub delivered: AtomicU64,
    /// Answers given by this node.
    pub answered: AtomicU64,
    /// Inputs dropped because the task's queue was full.
    pub dropped: AtomicU64,
    /// The engine's own counts, mirrored after every input.
    pub duplicates: AtomicU64,
    /// See [`proto::query::QueryStats::oversize`].
    pub oversize: AtomicU64,
    /// See [`proto::query::QueryStats::late`].
    pub late: AtomicU64,
}

impl QueryCounters {
    /// As the API shows them.
    pub fn snapshot(&self) -> proto::control::QueryCounts {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        proto::control::QueryCounts {
            asked: n(&self.asked),
            delivered: n(&self.delivered),
            answered: n(&self.answered),
            duplicates: n(&self.duplicates),
            oversize: n(&self.oversize),
            late: n(&self.late),
            dropped: n(&self.dropped),
        }
    }
}

/// A cheap handle to the query task.
#[derive(Debug, Clone)]
pub struct QueryHandle {
    tx: mpsc::Sender<Command>,
    /// Counters.
    pub counters: Arc<QueryCounters>,
}

/// Why a command did not reach the task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The engine refused the ask.
    #[error(transparent)]
    Ask(#[from] AskError),
    /// The engine refused the answer.
    #[error(transparent)]
    Respond(#[from] RespondError),
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopped,
    /// A query id that is not `ORIGIN-N`.
    #[error("not a query id (ORIGIN-N)")]
    BadId,
}

impl QueryHandle {
    /// A handle and the receiving end the task runs on.
    pub fn new() -> (QueryHandle, QueryInbox) {
        let (tx, rx) = mpsc::channel(COMMANDS);
        (
            QueryHandle {
                tx,
                counters: Arc::default(),
            },
            QueryInbox(rx),
        )
    }

    /// A frame from the link of `from`; dropped (and counted) when the
    /// task is behind.
    pub fn frame(&self, from: NodeId, msg: QueryMessage) {
        if self.tx.try_send(Command::Frame { from, msg }).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Asks a query.
    pub async fn ask(&self, spec: AskSpec) -> Result<Asked, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ask { spec, reply })
            .await
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx.await.map_err(|_| HandleError::Stopped)??)
    }

    /// This node's answer to the query `id` (`ORIGIN-N`).
    pub async fn respond(&self, id: &str, payload: Bytes) -> Result<(), HandleError> {
        let (origin, id) = parse_id(id).ok_or(HandleError::BadId)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Respond {
                origin,
                id,
                payload,
                reply,
            })
            .await
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx.await.map_err(|_| HandleError::Stopped)??)
    }
}

/// The task's end of the [`QueryHandle`] channel.
#[derive(Debug)]
pub struct QueryInbox(mpsc::Receiver<Command>);

/// `ORIGIN-N`, as answerers see a query.
pub fn query_id(origin: NodeId, id: u64) -> String {
    format!("{origin}-{id}")
}

/// Reads [`query_id`].
pub fn parse_id(s: &str) -> Option<(NodeId, u64)> {
    let (o, n) = s.split_once('-')?;
    Some((o.parse().ok()?, n.parse().ok()?))
}

fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

/// A cluster-wide key operation, the `_keys` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOp {
    /// `install`, `use`, `remove` or `list`.
    pub op: String,
    /// The key (base64) or fingerprint (`use`, `remove`); empty for `list`.
    #[serde(default)]
    pub key: String,
}

/// A node's answer to a `_keys` query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOutcome {
    /// Applied.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
    /// The keyring afterwards.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

struct Task {
    engine: Queries,
    state: Arc<NodeState>,
    counters: Arc<QueryCounters>,
    /// Progress channels of our asks, by id.
    askers: std::collections::HashMap<u64, mpsc::Sender<Progress>>,
}

/// Runs until `cancel` fires.
pub async fn run(state: Arc<NodeState>, inbox: QueryInbox, cancel: CancellationToken) {
    let QueryInbox(mut rx) = inbox;
    let mut task = Task {
        engine: Queries::new(state.id, &state.name, Limits::default()),
        counters: state.queries.counters.clone(),
        state,
        askers: Default::default(),
    };
    let idle = Duration::from_secs(3600);
    loop {
        let deadline = task
            .engine
            .next_deadline()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + idle);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            cmd = rx.recv() => match cmd {
                Some(cmd) => task.on_command(cmd),
                None => break,
            },
            () = sleep_until(deadline) => task.engine.on_tick(now_std()),
        }
        task.drain();
    }
}

impl Task {
    fn linked(&self) -> Vec<NodeId> {
        self.state.linked()
    }

    fn on_command(&mut self, cmd: Command) {
        let now = now_std();
        let tags = self.state.tags.get();
        let local = Local {
            name: &self.state.name,
            tags: &tags,
        };
        match cmd {
            Command::Frame {
                from,
                msg: QueryMessage::Query(q),
            } => {
                let linked = self.linked();
                self.engine.on_query(now, from, q, local, &linked);
            }
            Command::Frame {
                from,
                msg: QueryMessage::Response(r),
            } => self.engine.on_response(now, from, r),
            Command::Ask { spec, reply } => {
                let (expected, asked) = self.expected(&spec, &tags);
                // In the bounded overlay, unless every live member is
                // linked (a cluster of at most K + 1), every node forwards
                // the query, so that it reaches members without a link.
                let forward = self.state.overlay.max_links > 0
                    && self
                        .state
                        .peers
                        .iter()
                        .any(|p| p.is_live() && p.link != proto::membership::LinkState::Up);
                self.engine.set_ttl(if forward {
                    proto::overlay::flood::Config::default().ttl
                } else {
                    0
                });
                let ask = Ask {
                    name: spec.name,
                    payload: spec.payload,
                    filter: spec.filter,
                    timeout: spec.timeout,
                    targets: self.linked(),
                    expected,
                };
                let res = if spec.internal {
                    self.engine.ask_internal(now, ask, local)
                } else {
                    self.engine.ask(now, ask, local)
                };
                let answer = res.map(|id| {
                    self.counters.asked.fetch_add(1, Ordering::Relaxed);
                    let (tx, progress) = mpsc::channel(PROGRESS);
                    self.askers.insert(id, tx);
                    Asked {
                        id: query_id(self.state.id, id),
                        asked,
                        progress,
                    }
                });
                if let Err(Ok(asked)) = reply.send(answer) {
                    // The asker went away before hearing back.
                    self.askers
                        .remove(&parse_id(&asked.id).map_or(0, |(_, n)| n));
                }
            }
            Command::Respond {
                origin,
                id,
                payload,
                reply,
            } => {
                let res = self.engine.respond(now, origin, id, payload);
                if res.is_ok() {
                    self.counters.answered.fetch_add(1, Ordering::Relaxed);
                }
                let _asker_gone = reply.send(res);
            }
        }
    }

    /// The nodes an ask expects answers from (by this node's read-model).
    fn expected(&self, spec: &AskSpec, tags: &proto::Tags) -> (Vec<NodeId>, Vec<NodeRef>) {
        let s = &self.state;
        let mut out: Vec<(NodeId, String)> = s
            .peers
            .iter()
            .filter(|p| match spec.expect {
                Expect::Live => p.is_live(),
                Expect::NotLeft => p.state != PeerState::Left,
            })
            .filter(|p| spec.filter.matches(p.id, &p.name, &p.tags))
            .map(|p| (p.id, p.name.clone()))
            .collect();
        if spec.filter.matches(s.id, &s.name, tags) {
            out.push((s.id, s.name.clone()));
        }
        out.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        let refs = out
            .iter()
            .map(|(id, name)| NodeRef {
                id: id.to_string(),
                name: name.clone(),
            })
            .collect();
        (out.into_iter().map(|(id, _)| id).collect(), refs)
    }

    fn node_ref(&self, id: NodeId, name: String) -> NodeRef {
        let name = if name.is_empty() {
            self.state
                .peers
                .get(&id)
                .map(|p| p.name.clone())
                .unwrap_or_default()
        } else {
            name
        };
        NodeRef {
            id: id.to_string(),
            name,
        }
    }

    fn progress(&mut self, id: u64, item: Progress) {
        let done = matches!(item, Progress::Done { .. });
        let Some(tx) = self.askers.get(&id) else {
            return;
        };
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The asker went away: stop waiting for it.
                self.askers.remove(&id);
                self.engine.cancel(id);
                return;
            }
        }
        if done {
            self.askers.remove(&id);
        }
    }

    /// Passes the engine's output on: frames to the links, progress to
    /// askers, deliveries to the bus (or the node's own answerers).
    fn drain(&mut self) {
        let mut frames = Vec::new();
        loop {
            while let Some(t) = self.engine.poll_action() {
                let msg = match t.msg {
                    QueryMessage::Query(q) => Message::Query(q),
                    QueryMessage::Response(r) => Message::QueryResponse(r),
                };
                frames.push((t.to, msg));
            }
            let Some(ev) = self.engine.poll_event() else {
                break;
            };
            match ev {
                QueryEvent::Deliver {
                    origin,
                    origin_name,
                    id,
                    name,
                    payload,
                    deadline,
                } => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if name == KEYS_QUERY {
                        // Answered here and now (never published).
                        let out = self.keys(&payload);
                        let out = serde_json::to_vec(&out).unwrap_or_default();
                        if let Err(e) = self.engine.respond(now_std(), origin, id, out.into()) {
                            debug!(error = %e, "key operation not answered");
                        }
                        continue;
                    }
                    if name == REMOVE_QUERY {
                        self.remove(origin, id, &payload);
                        continue;
                    }
                    if name.starts_with(proto::query::INTERNAL_PREFIX) {
                        continue; // a node's own query this build does not know
                    }
                    let timeout_ms =
                        deadline.saturating_duration_since(now_std()).as_millis() as u64;
                    let from = self.node_ref(origin, origin_name);
                    self.state.publish("query", || proto::control::QueryEvent {
                        id: query_id(origin, id),
                        name,
                        from,
                        payload: std::str::from_utf8(&payload).ok().map(String::from),
                        payload_b64: base64::engine::general_purpose::STANDARD.encode(&payload),
                        timeout_ms,
                    });
                }
                QueryEvent::Ack {
                    id,
                    from,
                    from_name,
                } => {
                    let r = self.node_ref(from, from_name);
                    self.progress(id, Progress::Ack(r));
                }
                QueryEvent::Answer {
                    id,
                    from,
                    from_name,
                    payload,
                } => {
                    let r = self.node_ref(from, from_name);
                    self.progress(id, Progress::Answer(r, payload));
                }
                QueryEvent::Done { id, summary } => {
                    let timed_out = summary
                        .timed_out
                        .iter()
                        .map(|n| {
                            if *n == self.state.id {
                                self.node_ref(*n, self.state.name.clone())
                            } else {
                                self.node_ref(*n, String::new())
                            }
                        })
                        .collect();
                    self.progress(id, Progress::Done { summary, timed_out });
                }
            }
        }
        let st = self.engine.stats();
        self.counters
            .duplicates
            .store(st.duplicates, Ordering::Relaxed);
        self.counters.oversize.store(st.oversize, Ordering::Relaxed);
        self.counters.late.store(st.late, Ordering::Relaxed);
        if frames.is_empty() {
            return;
        }
        let transport = self.state.transport.clone();
        tokio::spawn(async move {
            for (to, msg) in frames {
                if let Err(error) = transport.try_send(to, msg).await {
                    debug!(to = %to.short(), %error, "query frame not sent");
                }
            }
        });
    }

    /// Applies a `_remove` through the membership task, then answers.
    fn remove(&self, origin: NodeId, id: u64, payload: &[u8]) {
        let handle = self.state.queries.clone();
        let table = self.state.table_commands.clone();
        let op = serde_json::from_slice::<RemoveOp>(payload)
            .ok()
            .and_then(|op| Some((op.id.parse::<NodeId>().ok()?, op.prune)));
        let own = self.state.id;
        tokio::spawn(async move {
            let out = match op {
                None => Outcome {
                    ok: false,
                    error: Some("bad remove operation".into()),
                },
                Some((peer, _)) if peer == own => Outcome {
                    ok: false,
                    error: Some("this node is alive: it cannot be removed".into()),
                },
                Some((peer, prune)) => {
                    let (reply, rx) = oneshot::channel();
                    let cmd = crate::table_task::TableCommand::ForceLeave {
                        id: peer,
                        prune,
                        reply,
                    };
                    match (table.send(cmd).await, rx.await) {
                        (Ok(()), Ok(Ok(()))) => Outcome {
                            ok: true,
                            error: None,
                        },
                        (Ok(()), Ok(Err(proto::membership::ForceLeaveError::Unknown))) => {
                            // Never known here, or already reaped: nothing to do.
                            Outcome {
                                ok: true,
                                error: None,
                            }
                        }
                        (Ok(()), Ok(Err(e))) => Outcome {
                            ok: false,
                            error: Some(e.to_string()),
                        },
                        _ => Outcome {
                            ok: false,
                            error: Some("the node is stopping".into()),
                        },
                    }
                }
            };
            let bytes = serde_json::to_vec(&out).unwrap_or_default();
            if let Err(e) = handle.respond(&query_id(origin, id), bytes.into()).await {
                debug!(error = %e, "remove not answered");
            }
        });
    }

    /// Applies a `_keys` operation to this node's keyring.
    fn keys(&self, payload: &[u8]) -> KeyOutcome {
        let op: KeyOp = match serde_json::from_slice(payload) {
            Ok(op) => op,
            Err(e) => {
                return KeyOutcome {
                    ok: false,
                    error: Some(format!("bad key operation: {e}")),
                    keys: Vec::new(),
                }
            }
        };
        match crate::api::key_op(&self.state, &op.op, &op.key) {
            Ok(keys) => KeyOutcome {
                ok: true,
                error: keys.warning.clone(),
                keys: keys.keys,
            },
            Err(e) => {
                warn!(op = %op.op, error = %e, "cluster key operation failed here");
                KeyOutcome {
                    ok: false,
                    error: Some(e),
                    keys: Vec::new(),
                }
            }
        }
    }
}
