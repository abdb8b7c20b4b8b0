//! Event handlers: programs the node runs on cluster events (`--handler`).
//!
//! A handler is `[EVENTS=]PROGRAM [ARG...]`. `EVENTS` is a comma list of
//! event types ([`EVENT_TYPES`], e.g. `peer_joined,peer_failed`),
//! `message:TOPIC` (messages on one topic) or `query:NAME` (queries of
//! that name, which the handler answers); without it the handler gets
//! every event but queries. `PROGRAM` is a path (or a name looked up in `PATH` at
//! start) followed by whitespace-separated arguments: there is no shell, no
//! quoting, no expansion. Both are checked when the flag (or the config
//! file key) is parsed, so an unknown event type, a missing program or one
//! that is not executable is a usage error (exit 2) before anything binds.
//!
//! The contract with the program (also in the README):
//! - standard input: the event's JSON object, exactly the line
//!   `/v1/events` would stream (newline included), then end of file; for
//!   a `query:NAME` handler, the query's raw payload instead (as Serf
//!   gives it: `cat` answers with the payload), the rest of the query in
//!   the environment;
//! - environment: the node's own, plus the `CONSTELLATION_*` variables of
//!   [`event_env`];
//! - at most `--handler-concurrency` programs run at once; events wait in a
//!   backlog of `--handler-backlog` runs, and a run that does not fit is
//!   dropped and counted (the node never waits for a handler);
//! - a program still running after `--handler-timeout` is killed (SIGKILL)
//!   and counted; its own children are not (a script should `exec` its
//!   last command);
//! - its exit status and the first [`CAPTURE_MAX`] bytes of its standard
//!   error are logged when it fails (at most [`LOG_LINES`] lines per
//!   [`LOG_WINDOW`], then a count); standard output is read and discarded
//!   past [`CAPTURE_MAX`] bytes, so a flood of output never blocks it or
//!   fills memory.
//! - a `query:NAME` handler answers with its standard output when it exits
//!   with status 0 and the output fits a query answer ([`ANSWER_MAX`]
//!   bytes); it is killed at the query's timeout if that comes before
//!   `--handler-timeout`. A failure, a timeout or an oversize output gives
//!   no answer (counted as failed or timed out, and logged). The first
//!   answer counts: a second handler for the same name is refused.
//!
//! The dispatcher is one task, a subscriber of the [`EventBus`] like a
//! `/v1/events` client: the bus never waits for it (events it cannot take
//! are counted as dropped), and it subscribes only while handlers are
//! configured, so a node without handlers pays nothing. It is not an
//! essential subsystem: if it ends, the node runs on without handlers.
//! When the node stops, handlers still running are killed.
//!
//! [`EventBus`]: crate::state::EventBus

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::control::HandlerCounters;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::state::{Item, NodeState, Subscription};

/// Handlers running at once unless `--handler-concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Runs waiting for a free slot unless `--handler-backlog` says otherwise.
pub const DEFAULT_BACKLOG: usize = 256;
/// Bytes of a handler's standard error (and output) kept; the rest is
/// read and discarded.
pub const CAPTURE_MAX: usize = 4096;
/// Bytes of standard error quoted in a log line.
pub const LOG_EXCERPT: usize = 256;
/// After the program exits, how long its pipes may stay open (held by a
/// child it left behind) before they are abandoned.
pub const IO_GRACE: Duration = Duration::from_millis(200);
/// Failure log lines allowed per window...
pub const LOG_LINES: u32 = 5;
/// ...of this length; the rest are counted and the count logged.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);
/// The largest answer a `query:NAME` handler may give: the query engine's
/// own bound on answers (a longer output gives no answer).
pub const ANSWER_MAX: usize = proto::query::Limits::DEFAULT_MAX_PAYLOAD;
/// The event type of a query this node should answer.
pub const QUERY_EVENT: &str = "query";

/// The event types a handler may name (those of the event stream, less the
/// stream's own `subscribed` and `dropped`).
pub const EVENT_TYPES: [&str; 11] = [
    "peer_joined",
    "peer_restarted",
    "peer_updated",
    "peer_suspect",
    "peer_alive",
    "peer_failed",
    "peer_left",
    "link_up",
    "link_down",
    "peer_reaped",
    "message",
];

/// Which events a handler runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every event of this type.
    Kind(String),
    /// Messages on this topic (`message:TOPIC`).
    Topic(String),
    /// Queries of this name (`query:NAME`), answered by the handler.
    Query(String),
}

/// One `--handler` value, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerSpec {
    /// The events it runs on; empty: every event.
    pub events: Vec<Filter>,
    /// The program, resolved (a path).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

impl HandlerSpec {
    /// Parses `[EVENTS=]PROGRAM [ARG...]` without touching the file system.
    ///
    /// The text before the first `=` is an event list when it has no
    /// whitespace and no `/` outside a `message:` item; otherwise the whole
    /// value is the program (so `/opt/a=b/run` is a program).
    pub fn parse(s: &str) -> Result<HandlerSpec, String> {
        let (events, program) = match s.split_once('=') {
            Some((list, rest)) if is_event_list(list) => (parse_events(list)?, rest),
            _ => (Vec::new(), s),
        };
        let mut words = program.split_whitespace();
        let Some(program) = words.next() else {
            return Err("expected [EVENTS=]PROGRAM [ARG...], e.g. peer_joined,peer_failed=/usr/local/bin/on-change".into());
        };
        Ok(HandlerSpec {
            events,
            program: PathBuf::from(program),
            args: words.map(String::from).collect(),
        })
    }

    /// Whether an event of type `kind` runs this; `topic` is a message's
    /// topic or a query's name. A query runs only the handlers that name
    /// it (their output is an answer), never a catch-all one.
    pub fn matches(&self, kind: &str, topic: Option<&str>) -> bool {
        if kind == QUERY_EVENT {
            return self
                .events
                .iter()
                .any(|f| matches!(f, Filter::Query(n) if topic == Some(n.as_str())));
        }
        self.events.is_empty()
            || self.events.iter().any(|f| match f {
                Filter::Kind(k) => k == kind,
                Filter::Topic(t) => kind == "message" && topic == Some(t.as_str()),
                Filter::Query(_) => false,
            })
    }

    /// Whether this handler answers queries (names a `query:NAME`).
    pub fn answers_queries(&self) -> bool {
        self.events.iter().any(|f| matches!(f, Filter::Query(_)))
    }
}

fn is_event_list(list: &str) -> bool {
    !list.is_empty()
        && !list.contains(char::is_whitespace)
        && list.split(',').all(|item| {
            item.starts_with("message:") || item.starts_with("query:") || !item.contains('/')
        })
}

fn parse_events(list: &str) -> Result<Vec<Filter>, String> {
    list.split(',')
        .map(|item| {
            if let Some(name) = item.strip_prefix("query:") {
                return match name {
                    "" => Err("query: needs a name (query:NAME)".to_string()),
                    n if n.len() > proto::query::MAX_NAME => Err(format!(
                        "query name longer than {} bytes",
                        proto::query::MAX_NAME
                    )),
                    n if n.starts_with(proto::query::INTERNAL_PREFIX) => {
                        Err(format!("query names starting with '_' are reserved: {n:?}"))
                    }
                    n => Ok(Filter::Query(n.to_string())),
                };
            }
            match item.strip_prefix("message:") {
                Some("") => Err("message: needs a topic (message:TOPIC)".to_string()),
                Some(topic) => Ok(Filter::Topic(topic.to_string())),
                None if EVENT_TYPES.contains(&item) => Ok(Filter::Kind(item.to_string())),
                None => Err(format!(
                    "unknown event type {item:?} (one of {}, message:TOPIC or query:NAME)",
                    EVENT_TYPES.join(", ")
                )),
            }
        })
        .collect()
}

/// `program` as it will be run: a path that exists and is executable. A
/// name without `/` is looked up in `path` (the value of `PATH`).
pub fn resolve(program: &Path, path: Option<&std::ffi::OsStr>) -> Result<PathBuf, String> {
    let executable = |p: &Path| -> Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", p.display()));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!("{}: not executable (chmod +x?)", p.display()));
        }
        Ok(())
    };
    if program.as_os_str().to_string_lossy().contains('/') {
        executable(program)?;
        return Ok(program.to_path_buf());
    }
    let dirs = path.map(std::env::split_paths).into_iter().flatten();
    for dir in dirs {
        let candidate = dir.join(program);
        if executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "{}: not found in PATH (give a path to the program)",
        program.display()
    ))
}

/// The `--handler` value parser: syntax, event names, and the program.
pub fn parse_handler(s: &str) -> Result<HandlerSpec, String> {
    let mut spec = HandlerSpec::parse(s)?;
    spec.program = resolve(&spec.program, std::env::var_os("PATH").as_deref())?;
    Ok(spec)
}

/// What the dispatcher runs, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The handlers (none: the dispatcher idles, unsubscribed).
    pub handlers: Vec<Arc<HandlerSpec>>,
    /// Most programs running at once.
    pub concurrency: usize,
    /// Most runs waiting for a slot.
    pub backlog: usize,
    /// A run's time limit.
    pub timeout: Duration,
    /// The control socket, for `CONSTELLATION_SOCKET`.
    pub socket: PathBuf,
}

impl Config {
    /// The handler part of `run`'s flags.
    pub fn from_args(args: &crate::config::RunArgs, socket: &Path) -> Config {
        Config {
            handlers: args.handler.iter().cloned().map(Arc::new).collect(),
            concurrency: args.handler_concurrency as usize,
            backlog: args.handler_backlog as usize,
            timeout: args.handler_timeout,
            socket: socket.to_path_buf(),
        }
    }
}

/// The dispatcher's counters (read by `status` and `/metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Gauge: handlers configured.
    pub configured: AtomicU64,
    /// Programs started.
    pub started: AtomicU64,
    /// Runs that exited with status 0.
    pub succeeded: AtomicU64,
    /// Runs that could not start, exited non-zero or died of a signal.
    pub failed: AtomicU64,
    /// Runs killed at the timeout.
    pub timed_out: AtomicU64,
    /// Runs dropped: the backlog was full, or the event bus dropped events
    /// for the dispatcher.
    pub dropped: AtomicU64,
    /// Gauge: programs running.
    pub running: AtomicU64,
    /// Gauge: runs waiting for a slot.
    pub queued: AtomicU64,
}

impl Stats {
    /// The counters as `status` shows them.
    pub fn snapshot(&self) -> HandlerCounters {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HandlerCounters {
            configured: n(&self.configured),
            started: n(&self.started),
            succeeded: n(&self.succeeded),
            failed: n(&self.failed),
            timed_out: n(&self.timed_out),
            dropped: n(&self.dropped),
            running: n(&self.running),
            queued: n(&self.queued),
        }
    }
}

/// Changes the running dispatcher's configuration (SIGHUP).
#[derive(Debug, Clone)]
pub struct Control {
    tx: Arc<watch::Sender<Arc<Config>>>,
}

impl Control {
    /// Applies `cfg` from the next event on; runs in progress finish.
    pub fn apply(&self, cfg: Config) {
        self.tx.send_replace(Arc::new(cfg));
    }
}

/// Starts the dispatcher. Subscribes before returning, so that no event
/// published after this call is missed.
pub fn spawn(
    state: Arc<NodeState>,
    cfg: Config,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Control {
    let sub = (!cfg.handlers.is_empty()).then(|| state.events.subscribe());
    let (tx, rx) = watch::channel(Arc::new(cfg));
    tracker.spawn(run(state, rx, sub, cancel));
    Control { tx: Arc::new(tx) }
}

/// One run waiting for a slot.
#[derive(Debug)]
struct Job {
    handler: Arc<HandlerSpec>,
    /// Its standard input: the event line, or a query's payload.
    event: Bytes,
    env: Vec<(&'static str, String)>,
    kind: String,
    /// For a query: where its answer goes.
    answer: Option<Answer>,
}

/// The query a run answers.
#[derive(Debug, Clone)]
struct Answer {
    /// `ORIGIN-N`.
    id: String,
    /// The query's own deadline (the run is killed there if that is
    /// sooner than the handler timeout: a later answer is refused anyway).
    deadline: tokio::time::Instant,
    queries: crate::query::QueryHandle,
}

/// How a run ended.
#[derive(Debug)]
enum Outcome {
    /// The program could not be started.
    NotStarted(std::io::Error),
    /// It exited (or died of a signal).
    Exited { status: ExitStatus, stderr: Vec<u8> },
    /// It was killed at the timeout.
    TimedOut { stderr: Vec<u8> },
    /// A query handler that exited with status 0 but gave no usable
    /// answer (more than [`ANSWER_MAX`] bytes, or output left open).
    NoAnswer { why: String },
}

/// What the dispatcher logs about a run.
#[derive(Debug)]
struct Finished {
    program: PathBuf,
    kind: String,
    took: Duration,
    outcome: Outcome,
}

async fn run(
    state: Arc<NodeState>,
    mut rx: watch::Receiver<Arc<Config>>,
    mut sub: Option<Subscription>,
    cancel: CancellationToken,
) {
    let stats = &state.handlers;
    let mut cfg = rx.borrow_and_update().clone();
    stats
        .configured
        .store(cfg.handlers.len() as u64, Ordering::Relaxed);
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut running: JoinSet<Finished> = JoinSet::new();
    let mut budget = LogBudget::new(LOG_LINES, LOG_WINDOW);
    let mut reloads = true;
    loop {
        while running.len() < cfg.concurrency {
            let Some(job) = queue.pop_front() else { break };
            stats.started.fetch_add(1, Ordering::Relaxed);
            running.spawn(execute(job, cfg.timeout));
        }
        stats.running.store(running.len() as u64, Ordering::Relaxed);
        stats.queued.store(queue.len() as u64, Ordering::Relaxed);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(done) = running.join_next(), if !running.is_empty() => match done {
                Ok(f) => {
                    let now = tokio::time::Instant::now().into_std();
                    record(stats, &f, &mut budget, now);
                }
                // Only a panic of `execute` (a bug) ends a run this way.
                Err(error) => warn!(%error, "handler run ended abnormally"),
            },
            changed = rx.changed(), if reloads => {
                if changed.is_err() {
                    reloads = false; // no more reloads; keep what we have
                    continue;
                }
                cfg = rx.borrow_and_update().clone();
                stats.configured.store(cfg.handlers.len() as u64, Ordering::Relaxed);
                // Subscribed only while there is something to run.
                match (cfg.handlers.is_empty(), sub.is_some()) {
                    (true, true) => sub = None,
                    (false, false) => sub = Some(state.events.subscribe()),
                    _ => {}
                }
                // Runs already queued keep their handler; a smaller backlog
                // drops the newest.
                while queue.len() > cfg.backlog {
                    queue.pop_back();
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            item = next(&sub) => match item {
                Item::Line(line) => {
                    let now = tokio::time::Instant::now().into_std();
                    enqueue(&state, &cfg, line, &mut queue, &mut budget, now);
                }
                Item::Dropped(n) => {
                    stats.dropped.fetch_add(n, Ordering::Relaxed);
                    let now = tokio::time::Instant::now().into_std();
                    if let Some(unlogged) = budget.take(now) {
                        warn!(count = n, unlogged, "events dropped before reaching the handlers (the dispatcher fell behind the event bus)");
                    }
                }
            },
        }
    }
    // Dropping `running` aborts the runs, and each child is killed on drop.
    stats.running.store(0, Ordering::Relaxed);
}

/// The next item of `sub`; never, without one. Cancel-safe.
async fn next(sub: &Option<Subscription>) -> Item {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The fields of an event line the dispatcher reads (the rest is passed on
/// untouched).
#[derive(Debug, Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    at: String,
    #[serde(default)]
    peer: Option<PeerHead>,
    /// A message's sender id (a string), or a query's asker (`{id, name}`).
    #[serde(default)]
    from: Option<serde_json::Value>,
    #[serde(default)]
    from_name: Option<String>,
    #[serde(default)]
    topic: Option<String>,
}

/// The fields of a `query` event line a query handler needs.
#[derive(Debug, Deserialize)]
struct QueryHead {
    id: String,
    name: String,
    payload_b64: String,
    #[serde(default)]
    timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
struct PeerHead {
    id: String,
    name: String,
    state: String,
    addr: String,
}

/// The environment of a handler run for `head`, besides the node's own:
///
/// | variable | value |
/// |---|---|
/// | `CONSTELLATION_EVENT` | the event type (`peer_joined`, `message`, ...) |
/// | `CONSTELLATION_EVENT_AT` | when it happened (RFC 3339, µs) |
/// | `CONSTELLATION_NODE_NAME`, `CONSTELLATION_NODE_ID` | this node |
/// | `CONSTELLATION_CLUSTER` | the cluster name |
/// | `CONSTELLATION_SOCKET` | this node's control socket |
/// | `CONSTELLATION_PEER_NAME`, `CONSTELLATION_PEER_ID` | the peer (for a message: its sender; the name may be empty) |
/// | `CONSTELLATION_PEER_STATE`, `CONSTELLATION_PEER_ADDR` | peer events only |
/// | `CONSTELLATION_TOPIC` | messages only |
/// | `CONSTELLATION_QUERY_ID`, `CONSTELLATION_QUERY_NAME` | queries only (the peer is the asker) |
/// | `CONSTELLATION_QUERY_TIMEOUT_MS` | queries only: ms left to answer when the event was published |
///
/// A value holding a NUL byte (possible only in a topic) is left out.
fn event_env(
    state: &NodeState,
    socket: &Path,
    head: &Head,
    query: Option<&QueryHead>,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CONSTELLATION_EVENT", head.kind.clone()),
        ("CONSTELLATION_EVENT_AT", head.at.clone()),
        ("CONSTELLATION_NODE_NAME", state.name.clone()),
        ("CONSTELLATION_NODE_ID", state.id.to_string()),
        ("CONSTELLATION_CLUSTER", state.cluster.clone()),
        ("CONSTELLATION_SOCKET", socket.display().to_string()),
    ];
    if let Some(p) = &head.peer {
        env.extend([
            ("CONSTELLATION_PEER_NAME", p.name.clone()),
            ("CONSTELLATION_PEER_ID", p.id.clone()),
            ("CONSTELLATION_PEER_STATE", p.state.clone()),
            ("CONSTELLATION_PEER_ADDR", p.addr.clone()),
        ]);
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    match &head.from {
        Some(serde_json::Value::String(id)) => {
            env.push(("CONSTELLATION_PEER_ID", id.clone()));
            env.push((
                "CONSTELLATION_PEER_NAME",
                head.from_name.clone().unwrap_or_default(),
            ));
        }
        Some(node @ serde_json::Value::Object(_)) => {
            env.push(("CONSTELLATION_PEER_ID", text(&node["id"])));
            env.push(("CONSTELLATION_PEER_NAME", text(&node["name"])));
        }
        _ => {}
    }
    if let Some(t) = &head.topic {
        env.push(("CONSTELLATION_TOPIC", t.clone()));
    }
    if let Some(q) = query {
        env.extend([
            ("CONSTELLATION_QUERY_ID", q.id.clone()),
            ("CONSTELLATION_QUERY_NAME", q.name.clone()),
            ("CONSTELLATION_QUERY_TIMEOUT_MS", q.timeout_ms.to_string()),
        ]);
    }
    env.retain(|(_, v)| !v.contains('\0'));
    env
}

/// Queues a run of every handler `line` matches, or counts it dropped.
fn enqueue(
    state: &NodeState,
    cfg: &Config,
    line: Bytes,
    queue: &mut VecDeque<Job>,
    budget: &mut LogBudget,
    now: Instant,
) {
    let head: Head = match serde_json::from_slice(&line) {
        Ok(h) => h,
        // The bus carries only lines the node built: a bug, not input.
        Err(error) => {
            warn!(%error, "event line not understood; no handler run");
            return;
        }
    };
    // A query: its name is what handlers match, its payload their input.
    let query = if head.kind == QUERY_EVENT {
        match query_input(&line) {
            Ok(q) => Some(q),
            Err(error) => {
                warn!(%error, "query event not understood; no handler run");
                return;
            }
        }
    } else {
        None
    };
    let topic = match &query {
        Some((q, _)) => Some(q.name.as_str()),
        None => head.topic.as_deref(),
    };
    let mut env = None;
    for h in &cfg.handlers {
        if !h.matches(&head.kind, topic) {
            continue;
        }
        if queue.len() >= cfg.backlog {
            state.handlers.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(unlogged) = budget.take(now) {
                warn!(
                    event = %head.kind, program = %h.program.display(), backlog = cfg.backlog, unlogged,
                    "handler backlog full; run dropped"
                );
            }
            continue;
        }
        let env = env
            .get_or_insert_with(|| {
                event_env(state, &cfg.socket, &head, query.as_ref().map(|q| &q.0))
            })
            .clone();
        let (event, answer) = match &query {
            Some((q, payload)) => (
                payload.clone(),
                Some(Answer {
                    id: q.id.clone(),
                    deadline: tokio::time::Instant::from_std(now)
                        + Duration::from_millis(q.timeout_ms),
                    queries: state.queries.clone(),
                }),
            ),
            None => (line.clone(), None),
        };
        queue.push_back(Job {
            handler: h.clone(),
            event,
            env,
            kind: head.kind.clone(),
            answer,
        });
    }
}

/// A query event's fields and its payload, decoded.
fn query_input(line: &[u8]) -> Result<(QueryHead, Bytes), String> {
    use base64::Engine as _;
    let q: QueryHead = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&q.payload_b64)
        .map_err(|e| format!("payload_b64: {e}"))?;
    Ok((q, Bytes::from(payload)))
}

/// Counts and logs one finished run.
fn record(stats: &Stats, f: &Finished, budget: &mut LogBudget, now: Instant) {
    let program = f.program.display();
    let took_ms = f.took.as_millis() as u64;
    match &f.outcome {
        Outcome::Exited { status, .. } if status.success() => {
            stats.succeeded.fetch_add(1, Ordering::Relaxed);
            debug!(%program, event = %f.kind, took_ms, "handler succeeded");
        }
        outcome => {
            match outcome {
                Outcome::TimedOut { .. } => &stats.timed_out,
                _ => &stats.failed,
            }
            .fetch_add(1, Ordering::Relaxed);
            let Some(unlogged) = budget.take(now) else {
                return;
            };
            match outcome {
                Outcome::NotStarted(error) => {
                    warn!(%program, event = %f.kind, %error, unlogged, "handler could not start")
                }
                Outcome::Exited { status, stderr } => warn!(
                    %program, event = %f.kind, %status, took_ms, stderr = %excerpt(stderr), unlogged,
                    "handler failed"
                ),
                Outcome::TimedOut { stderr } => warn!(
                    %program, event = %f.kind, took_ms, stderr = %excerpt(stderr), unlogged,
                    "handler timed out and was killed"
                ),
                Outcome::NoAnswer { why } => warn!(
                    %program, event = %f.kind, %why, unlogged,
                    "query handler gave no answer"
                ),
            }
        }
    }
}

/// The start of `stderr`, on one line, control characters escaped.
fn excerpt(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(&stderr[..stderr.len().min(LOG_EXCERPT)]);
    let mut out = crate::cli::escape(text.trim_end()).into_owned();
    if stderr.len() > LOG_EXCERPT {
        out.push_str("...");
    }
    out
}

/// Runs one job to its end: start, feed, read, wait, kill at the timeout.
async fn execute(job: Job, timeout: Duration) -> Finished {
    let started = tokio::time::Instant::now();
    let mut deadline = started + timeout;
    if let Some(a) = &job.answer {
        deadline = deadline.min(a.deadline);
    }
    let (outcome, stdout) = run_program(&job, deadline).await;
    let outcome = match (&job.answer, outcome) {
        (Some(a), Outcome::Exited { status, stderr }) if status.success() => {
            match stdout {
                (_, None) => Outcome::NoAnswer {
                    why: "its output was still open after it exited".into(),
                },
                (_, Some(len)) if len > ANSWER_MAX => Outcome::NoAnswer {
                    why: format!("{len} bytes of output, more than an answer's {ANSWER_MAX}"),
                },
                (kept, Some(_)) => {
                    // Refused only when the query is already answered (another
                    // handler) or over: the run itself succeeded.
                    if let Err(error) = a.queries.respond(&a.id, Bytes::from(kept)).await {
                        debug!(id = %a.id, %error, "query handler answer refused");
                    }
                    Outcome::Exited { status, stderr }
                }
            }
        }
        (_, outcome) => outcome,
    };
    Finished {
        program: job.handler.program.clone(),
        kind: job.kind,
        took: started.elapsed(),
        outcome,
    }
}

/// Runs the program; also returns its standard output (kept up to
/// [`ANSWER_MAX`] bytes for a query, [`CAPTURE_MAX`] otherwise) and its
/// full length (none: not read to its end).
async fn run_program(
    job: &Job,
    deadline: tokio::time::Instant,
) -> (Outcome, (Vec<u8>, Option<usize>)) {
    let mut cmd = tokio::process::Command::new(&job.handler.program);
    cmd.args(&job.handler.args)
        .envs(job.env.iter().map(|(k, v)| (OsString::from(k), v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropped (node stopping, or the timeout path below): SIGKILL.
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (Outcome::NotStarted(e), (Vec::new(), None)),
    };
    let out_max = if job.answer.is_some() {
        ANSWER_MAX
    } else {
        CAPTURE_MAX
    };
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let mut err_buf = Vec::new();
    let mut out_buf = Vec::new();
    let (status, out_len) = {
        let feed = async {
            if let Some(mut stdin) = stdin {
                // A program that does not read its input closes the pipe
                // early (EPIPE): that is its right, not an error.
                if let Err(error) = stdin.write_all(&job.event).await {
                    debug!(%error, "handler did not read the whole event");
                }
            }
        };
        let io = async {
            tokio::join!(
                feed,
                capture(stdout, &mut out_buf, out_max),
                capture(stderr, &mut err_buf, CAPTURE_MAX)
            )
        };
        tokio::pin!(io);
        let mut io_done = None;
        let status = loop {
            tokio::select! {
                // `Child::wait` is cancel-safe; `io` is polled by reference.
                status = child.wait() => break Some(status),
                ((), out, _) = &mut io, if io_done.is_none() => io_done = Some(out),
                () = tokio::time::sleep_until(deadline) => break None,
            }
        };
        if status.is_some() && io_done.is_none() {
            // Exited, but a child of its own may hold the pipes.
            let grace = (tokio::time::Instant::now() + IO_GRACE).min(deadline);
            match tokio::time::timeout_at(grace, &mut io).await {
                Ok(((), out, _)) => io_done = Some(out),
                Err(_) => debug!("handler pipes still open after it exited; abandoned"),
            }
        }
        (status, io_done)
    };
    let outcome = match status {
        Some(Ok(status)) => Outcome::Exited {
            status,
            stderr: err_buf,
        },
        Some(Err(e)) => Outcome::NotStarted(e),
        None => {
            if let Err(error) = child.start_kill() {
                debug!(%error, "handler already gone at the timeout");
            }
            // SIGKILL cannot be ignored: this returns at once (and reaps).
            if let Err(error) = child.wait().await {
                debug!(%error, "handler not reaped");
            }
            Outcome::TimedOut { stderr: err_buf }
        }
    };
    (outcome, (out_buf, out_len))
}

/// Reads `pipe` to its end, keeping the first `max` bytes; returns how
/// many it read in all.
async fn capture(pipe: Option<impl AsyncRead + Unpin>, keep: &mut Vec<u8>, max: usize) -> usize {
    let Some(mut pipe) = pipe else { return 0 };
    let mut buf = [0u8; 8192];
    let mut total = 0usize;
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return total, // end of output either way
            Ok(n) => {
                total = total.saturating_add(n);
                let room = max.saturating_sub(keep.len());
                keep.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// A log rate limit (sans-IO: takes `now`): at most `lines` per `window`.
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    window: Duration,
    start: Option<Instant>,
    used: u32,
    unlogged: u64,
}

impl LogBudget {
    /// A budget of `lines` per `window`.
    pub fn new(lines: u32, window: Duration) -> Self {
        LogBudget {
            lines,
            window,
            start: None,
            used: 0,
            unlogged: 0,
        }
    }

    /// Whether a line may be logged at `now`: `Some(lines not logged since
    /// the last one)`, or `None` (counted).
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if fresh {
            self.start = Some(now);
            self.used = 0;
        }
        if self.used < self.lines {
            self.used += 1;
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        }
    }
}

/// `constellationd handler-log [--stamp] FILE`: appends standard input to
/// FILE as one line (for images without a shell; see the README). With
/// `stamp`, the line starts with the time this process started (RFC 3339,
/// µs) and a space.
pub fn handler_log(file: &Path, stamp: bool) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let started = crate::state::now_rfc3339();
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    while input.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        input.pop();
    }
    let mut line = Vec::with_capacity(input.len() + 40);
    if stamp {
        line.extend_from_slice(started.as_bytes());
        line.push(b' ');
    }
    line.extend_from_slice(&input);
    line.push(b'\n');
    // One write of the whole line to an O_APPEND file: lines of concurrent
    // handlers do not interleave.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?
        .write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::membership::EventKind;

    #[test]
    fn every_peer_event_kind_can_be_named() {
        use EventKind::*;
        for k in [
            Joined, Restarted, Updated, Suspect, Recovered, Failed, Left, LinkUp, LinkDown, Reaped,
        ] {
            assert!(EVENT_TYPES.contains(&k.as_str()), "{}", k.as_str());
        }
        assert!(EVENT_TYPES.contains(&proto::control::EVENT_MESSAGE));
    }

    #[test]
    fn specs_parse_events_program_and_arguments() {
        let s = HandlerSpec::parse("peer_joined,peer_failed=/bin/x -a  b").unwrap();
        assert_eq!(
            s.events,
            vec![
                Filter::Kind("peer_joined".into()),
                Filter::Kind("peer_failed".into())
            ]
        );
        assert_eq!(s.program, PathBuf::from("/bin/x"));
        assert_eq!(s.args, vec!["-a", "b"]);
        assert!(s.matches("peer_failed", None) && !s.matches("peer_left", None));

        let all = HandlerSpec::parse("/bin/x --flag=1").unwrap();
        assert!(all.events.is_empty() && all.matches("anything", None));
        assert_eq!(all.args, vec!["--flag=1"]);
        // A `/` before the `=`: a program path, not an event list.
        let path = HandlerSpec::parse("/opt/a=b/run").unwrap();
        assert_eq!(path.program, PathBuf::from("/opt/a=b/run"));

        let topic = HandlerSpec::parse("message:app/deploy,peer_left=run-me").unwrap();
        assert!(topic.matches("message", Some("app/deploy")));
        assert!(!topic.matches("message", Some("other")));
        assert!(!topic.matches("message", None));
        assert!(topic.matches("peer_left", None));
        let any_message = HandlerSpec::parse("message=/bin/x").unwrap();
        assert!(any_message.matches("message", Some("t")));

        let query = HandlerSpec::parse("query:app/load,peer_left=/bin/cat").unwrap();
        assert_eq!(query.events[0], Filter::Query("app/load".into()));
        assert!(query.answers_queries());
        assert!(query.matches("query", Some("app/load")));
        assert!(!query.matches("query", Some("other")));
        assert!(!query.matches("message", Some("app/load")));
        assert!(query.matches("peer_left", None));
        // A catch-all handler never answers queries.
        assert!(!all.matches("query", Some("app/load")) && !all.answers_queries());

        for (bad, want) in [
            ("peer_joind=/bin/x", "unknown event type \"peer_joind\""),
            ("message:=/bin/x", "needs a topic"),
            ("query:=/bin/x", "needs a name"),
            ("query:_keys=/bin/x", "reserved"),
            ("peer_joined=", "expected [EVENTS=]PROGRAM"),
            ("   ", "expected [EVENTS=]PROGRAM"),
        ] {
            let err = HandlerSpec::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn a_query_event_gives_its_payload_and_every_event_parses() {
        let line = br#"{"type":"query","at":"t","id":"7-3","name":"echo","from":{"id":"7","name":"n1"},"payload":"hi","payload_b64":"aGk=","timeout_ms":900}"#;
        let (q, payload) = query_input(line).unwrap();
        assert_eq!((q.id.as_str(), q.name.as_str()), ("7-3", "echo"));
        assert_eq!((&payload[..], q.timeout_ms), (&b"hi"[..], 900));
        // The head of a query event (its `from` an object) parses too, as
        // does a message's (`from` a string).
        let head: Head = serde_json::from_slice(line).unwrap();
        assert_eq!(head.kind, "query");
        let msg = br#"{"type":"message","at":"t","from":"7","from_name":"n1","topic":"x"}"#;
        let head: Head = serde_json::from_slice(msg).unwrap();
        assert_eq!(head.topic.as_deref(), Some("x"));
        let bad = br#"{"type":"query","id":"7-3","name":"echo","payload_b64":"%%"}"#;
        assert!(query_input(bad).unwrap_err().contains("payload_b64"));
    }

    #[test]
    fn programs_must_exist_and_be_executable() {
        let dir = std::env::temp_dir().join(format!("cst-handlers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve(&plain, None).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve(&plain, None).unwrap(), plain);
        assert!(resolve(&dir.join("missing"), None)
            .unwrap_err()
            .contains("No such file"));
        assert!(resolve(&dir, None)
            .unwrap_err()
            .contains("not a regular file"));
        let found = resolve(Path::new("plain"), Some(dir.as_os_str())).unwrap();
        assert_eq!(found, plain);
        assert!(resolve(Path::new("plain"), None)
            .unwrap_err()
            .contains("not found in PATH"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_log_budget_allows_a_few_lines_per_window_and_counts_the_rest() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = LogBudget::new(2, s(10));
        assert_eq!(b.take(t0), Some(0));
        assert_eq!(b.take(t0), Some(0));
        assert_eq!(b.take(t0 + s(1)), None);
        assert_eq!(b.take(t0 + s(9)), None);
        assert_eq!(b.take(t0 + s(10)), Some(2), "a new window, with the count");
        assert_eq!(b.take(t0 + s(11)), Some(0));
        assert_eq!(b.take(t0 + s(12)), None);
    }

    #[test]
    fn excerpts_are_short_and_on_one_line() {
        assert_eq!(excerpt(b"boom\n"), "boom");
        assert_eq!(excerpt(b"a\x1b[2Jb\nc"), "a\\x1b[2Jb\\nc");
        let long = excerpt(&[b'x'; 1000]);
        assert_eq!(long.len(), LOG_EXCERPT + 3);
    }
}
