//! The control API: HTTP/1.1 + JSON on a Unix socket.
//!
//! `curl --unix-socket PATH http://localhost/v1/peers` works with nothing of
//! ours installed; the CLI is a client of exactly this API. Every error is a
//! JSON object `{"error": "..."}` with a fitting status, and quotes at most
//! [`QUOTE_MAX`] bytes of anything the client sent.
//!
//! Limits, so that a careless or hostile local client cannot pin the node:
//! - a client that connects and sends no request head within
//!   [`HEADER_TIMEOUT`] is dropped, and a whole request (head and body, from
//!   its first byte) must arrive within [`REQUEST_TIMEOUT`], else `408` and
//!   the connection is closed;
//! - at most [`connection_bound`] connections are served at once (event
//!   streams included); past it a new connection gets `503` at once and is
//!   closed, it does not wait;
//! - accept errors (out of file descriptors) back off from 100 ms to 1 s and
//!   are logged at most every [`ACCEPT_LOG_EVERY`];
//! - each `/v1/events` subscriber has its own byte-bounded backlog
//!   (see [`crate::state::EventBus`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::frame::AppMessage;
use proto::membership::{LinkState, Peer};
use proto::secure::{Key, KeyError, Keyring, SharedKeyring};
use proto::NodeId;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use transport::{LinkCounters, SendError};

use crate::state::{now_rfc3339, peer_json, FindError, Item, NodeState};

/// A client must send its request head within this time (hyper's timer,
/// which also closes idle keep-alive connections).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole request, head and body, must arrive within this time of its
/// first byte. (A response, such as an event stream, may last longer.)
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most control connections served at once (see [`connection_bound`]).
pub const MAX_CONNECTIONS: usize = 256;
/// Longest prefix of a client-supplied value quoted in an error message.
pub const QUOTE_MAX: usize = 64;
/// Accept errors are logged at most this often (with a count of the rest).
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Largest request body (a message payload, base64 and JSON escaping included).
pub const MAX_BODY: usize = 8 << 20;
/// Room a frame needs besides the payload (topic and envelope).
const FRAME_OVERHEAD: usize = 4096;

#[derive(Clone)]
struct Api {
    state: Arc<NodeState>,
    cancel: CancellationToken,
    max_payload: usize,
}

/// A JSON error response.
fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// Builds the router (public for in-process tests).
pub fn router(state: Arc<NodeState>, cancel: CancellationToken, max_frame: usize) -> Router {
    let api = Api {
        state,
        cancel,
        max_payload: max_frame.saturating_sub(FRAME_OVERHEAD),
    };
    Router::new()
        .route("/v1/self", get(get_self))
        .route("/v1/peers", get(get_peers))
        .route("/v1/peers/{key}", get(get_peer))
        .route("/v1/events", get(get_events))
        .route("/v1/messages", post(post_message))
        .route("/v1/leave", post(post_leave))
        .route("/v1/health", get(get_health))
        .route("/v1/keys", get(get_keys).post(post_key_install))
        .route("/v1/keys/use", post(post_key_use))
        .route("/v1/keys/remove", post(post_key_remove))
        .route("/metrics", get(get_metrics))
        .merge(crate::ops::router(api.state.clone(), api.cancel.clone()))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint; see the API section of the README",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(axum::middleware::from_fn(whole_request))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// `s` quoted for an error message: at most [`QUOTE_MAX`] bytes of it (cut on
/// a character boundary), escaped, with its full length when cut.
pub fn quote(s: &str) -> String {
    if s.len() <= QUOTE_MAX {
        return format!("{s:?}");
    }
    let mut end = QUOTE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &s[..end], s.len())
}

/// When the request being read on one connection began (its first byte).
/// Written by [`ClockedIo`] on reads, consumed by [`whole_request`].
#[derive(Debug, Default)]
struct RequestClock {
    started: Mutex<Option<tokio::time::Instant>>,
}

impl RequestClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        // The data is one `Option<Instant>`: always consistent.
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: the first ones since the last request start one.
    fn heard(&self) {
        self.lock().get_or_insert_with(tokio::time::Instant::now);
    }

    /// The deadline of the request now being read.
    fn deadline(&self) -> tokio::time::Instant {
        self.lock().unwrap_or_else(tokio::time::Instant::now) + REQUEST_TIMEOUT
    }

    /// The request is fully read: the next byte starts the next one.
    fn done(&self) {
        *self.lock() = None;
    }
}

/// The control connection's stream, noting when each request's first byte
/// arrives (hyper's own timer covers the head only).
struct ClockedIo {
    inner: UnixStream,
    clock: Arc<RequestClock>,
}

impl AsyncRead for ClockedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.heard();
        }
        res
    }
}

impl AsyncWrite for ClockedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the whole body before any handler runs, within the request's
/// deadline ([`REQUEST_TIMEOUT`] from its first byte) and [`MAX_BODY`].
async fn whole_request(req: Request, next: Next) -> Response {
    let clock = req.extensions().get::<Arc<RequestClock>>().cloned();
    let deadline = clock.as_ref().map_or_else(
        || tokio::time::Instant::now() + REQUEST_TIMEOUT,
        |c| c.deadline(),
    );
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout_at(deadline, Limited::new(body, MAX_BODY).collect()).await;
    let body = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            )
        }
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
        Err(_elapsed) => {
            let mut resp = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request did not arrive within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            );
            // The rest of the body will never be read: close.
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return resp;
        }
    };
    if let Some(c) = clock {
        c.done();
    }
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// How many control connections are served at once: [`MAX_CONNECTIONS`],
/// or a quarter of the open-file limit when that is lower (at least 8), so
/// that local clients cannot take the descriptors links need.
pub fn connection_bound() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        });
    match soft {
        Some(n) => (n / 4).clamp(8, MAX_CONNECTIONS),
        None => MAX_CONNECTIONS,
    }
}

/// What a connection past the bound is told before it is closed.
fn refusal(bound: usize) -> Vec<u8> {
    let body = json!({
        "error": format!("too many control connections (at most {bound}); try again later")
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Back-off and log rate for accept errors (sans-IO: takes `now`).
#[derive(Debug, Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
    last_log: Option<Instant>,
    unlogged: u64,
}

/// First and longest pause after an accept error.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

impl AcceptBackoff {
    /// An accept failed at `now`: how long to pause, and whether to log it
    /// (with how many failures were not logged since the last line).
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let delay = self
            .delay
            .map_or(ACCEPT_BACKOFF.0, |d| (d * 2).min(ACCEPT_BACKOFF.1));
        self.delay = Some(delay);
        let log = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= ACCEPT_LOG_EVERY);
        if log {
            self.last_log = Some(now);
            let skipped = self.unlogged;
            self.unlogged = 0;
            (delay, Some(skipped))
        } else {
            self.unlogged += 1;
            (delay, None)
        }
    }

    /// An accept succeeded: the next error starts from the shortest pause.
    fn succeeded(&mut self) {
        self.delay = None;
    }
}

/// Serves `router` on `listener` until `cancel` fires; in-flight requests get
/// a moment to finish. At most [`connection_bound`] connections at once.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let _stop_node_on_exit = cancel.clone().drop_guard();
    let bound = connection_bound();
    let slots = Arc::new(Semaphore::new(bound));
    let refused = refusal(bound);
    let mut backoff = AcceptBackoff::default();
    // Only its log budget is used: refusing costs nothing, so no pause.
    let mut refusals = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            // The client gave up before we took it: nothing to wait for.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(error) => {
                // Typically EMFILE: the connection stays in the backlog, so
                // retrying at once would spin.
                let (pause, log) = backoff.failed(tokio::time::Instant::now().into_std());
                if let Some(unlogged) = log {
                    warn!(%error, pause_ms = pause.as_millis() as u64, unlogged, "control socket accept failed; backing off");
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Told at once, not queued: a fresh socket's buffer takes these
            // few bytes without blocking; if not, closing says enough.
            if let Err(error) = stream.try_write(&refused) {
                debug!(%error, "refusal not written");
            }
            if let (_, Some(unlogged)) = refusals.failed(tokio::time::Instant::now().into_std()) {
                warn!(bound, unlogged, "control connection refused: too many open");
            }
            continue;
        };
        let clock = Arc::new(RequestClock::default());
        let io = ClockedIo {
            inner: stream,
            clock: clock.clone(),
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(clock.clone());
            let mut router = router.clone();
            async move {
                std::future::poll_fn(|cx| {
                    tower::Service::<Request<hyper::body::Incoming>>::poll_ready(&mut router, cx)
                })
                .await?;
                tower::Service::call(&mut router, req).await
            }
        });
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _slot = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let res = tokio::select! {
                res = conn.as_mut() => res,
                () = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(Duration::from_millis(500), conn.as_mut()).await {
                        Ok(res) => res,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(error) = res {
                debug!(%error, "control connection ended with an error");
            }
        });
    }
}

fn counters_json(c: Option<&LinkCounters>) -> Value {
    let get = |f: fn(&LinkCounters) -> u64| c.map(f).unwrap_or(0);
    json!({
        "messages_in": get(|c| c.msgs_in.load(Ordering::Relaxed)),
        "messages_out": get(|c| c.msgs_out.load(Ordering::Relaxed)),
        "bytes_in": get(|c| c.bytes_in.load(Ordering::Relaxed)),
        "bytes_out": get(|c| c.bytes_out.load(Ordering::Relaxed)),
    })
}

async fn link_counters(state: &NodeState) -> HashMap<NodeId, Arc<LinkCounters>> {
    state
        .transport
        .links()
        .await
        .into_iter()
        .map(|l| (l.id, l.handle.counters.clone()))
        .collect()
}

fn full_peer_json(p: &Peer, now: Instant, counters: &HashMap<NodeId, Arc<LinkCounters>>) -> Value {
    let mut v = peer_json(p, now);
    if let (Value::Object(m), Value::Object(c)) =
        (&mut v, counters_json(counters.get(&p.id).map(|c| &**c)))
    {
        m.extend(c);
    }
    v
}

async fn get_peers(
    State(api): State<Api>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "malformed query string");
    };
    let mut state_filter = None;
    let mut tags = Vec::new();
    for (k, v) in q {
        match k.as_str() {
            "state" => match v.as_str() {
                "alive" | "suspect" | "failed" | "left" => state_filter = Some(v),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("unknown state {} (alive, suspect, failed, left)", quote(&v)),
                    )
                }
            },
            "tag" => match v.split_once(':') {
                Some((k, v)) => tags.push((k.to_string(), v.to_string())),
                None => return error(StatusCode::BAD_REQUEST, "tag filters are key:value"),
            },
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {}", quote(other)),
                )
            }
        }
    }
    let counters = link_counters(&api.state).await;
    let now = Instant::now();
    let mut peers: Vec<Peer> = api
        .state
        .peers
        .iter()
        .filter(|p| {
            state_filter
                .as_deref()
                .is_none_or(|s| p.state.as_str() == s)
        })
        .filter(|p| tags.iter().all(|(k, v)| p.tags.get(k) == Some(v)))
        .map(|r| r.clone())
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    let list: Vec<Value> = peers
        .iter()
        .map(|p| full_peer_json(p, now, &counters))
        .collect();
    Json(json!({ "peers": list })).into_response()
}

async fn get_peer(State(api): State<Api>, Path(key): Path<String>) -> Response {
    match api.state.find_peer(&key) {
        Ok(p) => {
            let counters = link_counters(&api.state).await;
            Json(full_peer_json(&p, Instant::now(), &counters)).into_response()
        }
        Err(FindError::Unknown) => error(StatusCode::NOT_FOUND, format!("no peer {}", quote(&key))),
        Err(e @ FindError::Ambiguous) => {
            error(StatusCode::CONFLICT, format!("{}: {e}", quote(&key)))
        }
    }
}

/// Plain-language warnings for `status`.
fn warnings(state: &NodeState, uptime: Duration) -> Vec<String> {
    let mut w = Vec::new();
    let grace = state.beacon_interval * 3;
    if uptime > grace && !state.discovery.loops_back.load(Ordering::Relaxed) {
        let names: Vec<&str> = state.interfaces.iter().map(|i| i.name.as_str()).collect();
        w.push(format!(
            "own multicast beacons are not looping back — multicast may be blocked on {}",
            names.join(", ")
        ));
    }
    let now = Instant::now();
    let last_heard = state.peers.iter().map(|p| p.last_seen).max();
    let silent = match last_heard {
        Some(t) => now.saturating_duration_since(t),
        None => uptime,
    };
    if silent >= Duration::from_secs(30) {
        w.push(format!("no peer heard for {} s", silent.as_secs()));
    }
    for p in state.peers.iter() {
        if let Some(other) = p.conflict {
            w.push(format!(
                "two live nodes claim the name {:?}: {} and {}",
                p.name, p.addr, other
            ));
        }
    }
    let unlinked = state
        .table
        .unlinked
        .lock()
        .map(|n| n.clone())
        .unwrap_or_default();
    if !unlinked.is_empty() {
        w.push(format!(
            "heard but never linked (not listed until a link confirms them): {} — is TCP to their data port blocked?",
            unlinked.join(", ")
        ));
    }
    let drops = state.discovery.drops.snapshot();
    let mismatch = drops.get("security_mismatch").copied().unwrap_or(0)
        + state
            .transport
            .stats()
            .drops
            .snapshot()
            .get("security_mismatch")
            .copied()
            .unwrap_or(0);
    if mismatch > 0 {
        w.push(if state.keyring.is_some() {
            format!("security mismatch: {mismatch} plaintext beacons or links refused — a node without the cluster secret is on the group")
        } else {
            format!("security mismatch: {mismatch} sealed beacons or links refused — a secured cluster is on the group; this node has no --secret-file")
        });
    }
    let auth = drops.get("auth").copied().unwrap_or(0);
    if auth > 0 {
        w.push(format!(
            "{auth} sealed beacons did not open with any installed key (another secret, or tampering)"
        ));
    }
    if !drops.is_empty() {
        let list: Vec<String> = drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        w.push(format!("datagrams dropped: {}", list.join(", ")));
    }
    let tdrops = state.transport.stats().drops.snapshot();
    if !tdrops.is_empty() {
        let list: Vec<String> = tdrops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        w.push(format!(
            "connections or frames refused: {}",
            list.join(", ")
        ));
    }
    w
}

fn self_json(state: &NodeState) -> Value {
    let uptime = state.started.elapsed();
    let d = &state.discovery;
    let t = state.transport.stats();
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    let mut links_up = 0;
    for p in state.peers.iter() {
        *by_state.entry(p.state.as_str()).or_default() += 1;
        links_up += usize::from(p.link == LinkState::Up);
    }
    json!({
        "id": state.id.to_string(),
        "name": state.name,
        "cluster": state.cluster,
        "incarnation": state.incarnation,
        "addresses": state.advertised.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "listen": state.listen.to_string(),
        "interfaces": state.interfaces.iter().map(|i| json!({"name": i.name, "addr": i.addr.to_string()})).collect::<Vec<_>>(),
        "group": state.group.to_string(),
        "ttl": state.ttl,
        "uptime_ms": uptime.as_millis() as u64,
        "tags": state.tags,
        "multicast_loops_back": d.loops_back.load(Ordering::Relaxed),
        "secured": state.keyring.is_some(),
        "peers": by_state,
        "transitions": state.transitions.snapshot(),
        "links_up": links_up,
        "counters": {
            "beacons_sent": d.beacons_sent.load(Ordering::Relaxed),
            "beacons_received": d.beacons_received.load(Ordering::Relaxed),
            "replies_sent": d.replies_sent.load(Ordering::Relaxed),
            "beacon_send_errors": d.send_errors.load(Ordering::Relaxed),
            "beacons_dropped": d.drops.snapshot(),
            "frames_in": t.frames_in.load(Ordering::Relaxed),
            "frames_out": t.frames_out.load(Ordering::Relaxed),
            "links_established": t.links_established.load(Ordering::Relaxed),
            "dials": t.dials.load(Ordering::Relaxed),
            "dial_failures": t.dial_failures.load(Ordering::Relaxed),
            "links_refused": t.drops.snapshot(),
            "messages_in": state.messages_in.load(Ordering::Relaxed),
            "messages_out": state.messages_out.load(Ordering::Relaxed),
            "peers_pending": state.table.pending.load(Ordering::Relaxed),
            "peers_admitted": state.table.admitted.load(Ordering::Relaxed),
            "pending_refused": state.table.refused.load(Ordering::Relaxed),
            "stalls": state.table.stalls.load(Ordering::Relaxed),
            "event_subscribers": state.events.subscribers(),
            "events_dropped": state.events.dropped(),
        },
        "warnings": warnings(state, uptime),
    })
}

async fn get_self(State(api): State<Api>) -> Response {
    Json(self_json(&api.state)).into_response()
}

async fn get_health(
    State(api): State<Api>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "malformed query string");
    };
    let mut min_peers = 0usize;
    for (k, v) in q {
        match (k.as_str(), v.parse::<usize>()) {
            ("min_peers", Ok(n)) => min_peers = n,
            ("min_peers", Err(_)) => {
                return error(StatusCode::BAD_REQUEST, "min_peers is a whole number")
            }
            (other, _) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}"),
                )
            }
        }
    }
    let alive = api.state.peers.iter().filter(|p| p.is_live()).count();
    let body = json!({ "status": if alive >= min_peers { "ok" } else { "waiting" }, "alive_peers": alive, "min_peers": min_peers });
    let status = if alive >= min_peers {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn get_events(State(api): State<Api>) -> Response {
    // Dropping the stream (client gone, node stopping) drops the
    // subscription, and with it the backlog.
    let sub = api.state.events.subscribe();
    let first = json!({ "type": "subscribed", "at": now_rfc3339() }).to_string() + "\n";
    let cancel = api.cancel.clone();
    let stream = futures::stream::unfold(
        (sub, cancel, Some(first)),
        |(sub, cancel, first)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, Infallible>(Bytes::from(first)), (sub, cancel, None)));
            }
            let line = tokio::select! {
                () = cancel.cancelled() => return None,
                item = sub.next() => match item {
                    Item::Line(line) => line,
                    // This reader fell behind: say how much it missed, go on.
                    Item::Dropped(n) => Bytes::from(json!({ "type": "dropped", "at": now_rfc3339(), "count": n }).to_string() + "\n"),
                },
            };
            Some((Ok(line), (sub, cancel, None)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "cannot build stream"))
}

fn send_error_status(e: SendError) -> (StatusCode, String) {
    (StatusCode::CONFLICT, e.to_string())
}

async fn post_message(State(api): State<Api>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rej) => return error(rej.status(), rej.body_text()),
    };
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body is not valid JSON: {e}"),
            )
        }
    };
    let Some(obj) = req.as_object() else {
        return error(StatusCode::BAD_REQUEST, "body must be a JSON object");
    };
    let to = match obj.get("to") {
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "missing \"to\": a peer name or id, or null to broadcast",
            )
        }
        Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return error(StatusCode::BAD_REQUEST, "\"to\" must be a string or null"),
    };
    let topic = match obj.get("topic") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.len() <= 1024 => s.clone(),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "\"topic\" must be a string of at most 1024 bytes",
            )
        }
    };
    let payload: Bytes = match (obj.get("payload"), obj.get("payload_b64")) {
        (Some(Value::String(s)), None) => Bytes::from(s.clone().into_bytes()),
        (None, Some(Value::String(b))) => match base64::engine::general_purpose::STANDARD.decode(b)
        {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("payload_b64 is not base64: {e}"),
                )
            }
        },
        (None, None) => Bytes::new(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either \"payload\" (a string) or \"payload_b64\", not both",
            )
        }
    };
    if payload.len() > api.max_payload {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                api.max_payload
            ),
        );
    }
    let state = &api.state;
    let msg = AppMessage { topic, payload };
    let wait = state.transport.send_timeout();
    let links = state.transport.links().await;
    let targets: Vec<_> = match &to {
        Some(key) => {
            let peer = match state.find_peer(key) {
                Ok(p) => p,
                Err(FindError::Unknown) => {
                    return error(StatusCode::NOT_FOUND, format!("no peer {}", quote(key)))
                }
                Err(e) => return error(StatusCode::CONFLICT, format!("{}: {e}", quote(key))),
            };
            match links.into_iter().find(|l| l.id == peer.id) {
                Some(l) => vec![(l, peer.name)],
                None => {
                    return error(
                        StatusCode::CONFLICT,
                        format!(
                            "no link to {} (state {}, link {})",
                            peer.name,
                            peer.state.as_str(),
                            peer.link.as_str()
                        ),
                    )
                }
            }
        }
        None => links
            .into_iter()
            .map(|l| {
                let name = state
                    .peers
                    .get(&l.id)
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                (l, name)
            })
            .collect(),
    };
    let sends = targets.iter().map(|(l, name)| {
        let msg = msg.clone();
        async move {
            let res = l.handle.send_app(msg, wait).await;
            (l.id, name.clone(), res)
        }
    });
    let outcomes = futures::future::join_all(sends).await;
    let mut failed = None;
    let results: Vec<Value> = outcomes
        .into_iter()
        .map(|(id, name, res)| match res {
            Ok(()) => {
                state.messages_out.fetch_add(1, Ordering::Relaxed);
                json!({ "id": id.to_string(), "name": name, "status": "sent" })
            }
            Err(e) => {
                failed = Some(send_error_status(e));
                json!({ "id": id.to_string(), "name": name, "status": "failed", "error": e.to_string() })
            }
        })
        .collect();
    let status = match (&to, failed) {
        (Some(_), Some((status, _))) => status,
        _ => StatusCode::OK,
    };
    (status, Json(json!({ "results": results }))).into_response()
}

/// The keyring, or the 409 of a node without a secret.
fn keyring(state: &NodeState) -> Result<&SharedKeyring, (StatusCode, String)> {
    state.keyring.as_ref().ok_or_else(|| {
        (
            StatusCode::CONFLICT,
            "this node runs without a cluster secret; start it with --secret-file to use keys"
                .into(),
        )
    })
}

fn keys_json(state: &NodeState, ring: &Keyring) -> Value {
    json!({
        "secured": true,
        "keys": ring.list(),
        "secret_file": state.secret_file.as_ref().map(|p| p.display().to_string()),
    })
}

async fn get_keys(State(api): State<Api>) -> Response {
    match keyring(&api.state) {
        Err((status, msg)) => error(status, msg),
        Ok(ring) => {
            let ring = ring.read().unwrap_or_else(|e| e.into_inner());
            Json(keys_json(&api.state, &ring)).into_response()
        }
    }
}

/// The `"key"` string of a keyring request body.
fn key_field(body: Result<Bytes, BytesRejection>) -> Result<String, (StatusCode, String)> {
    let body = body.map_err(|rej| (rej.status(), rej.body_text()))?;
    let req: Value = serde_json::from_slice(&body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    match req.get("key") {
        Some(Value::String(k)) => Ok(k.clone()),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "body must be {\"key\": \"<base64 key or fingerprint>\"}".into(),
        )),
    }
}

fn key_error_status(e: &KeyError) -> StatusCode {
    match e {
        KeyError::Invalid(_) => StatusCode::BAD_REQUEST,
        KeyError::NotInstalled(_) => StatusCode::NOT_FOUND,
        KeyError::Primary(_) | KeyError::Full | KeyError::Empty => StatusCode::CONFLICT,
    }
}

/// Applies one keyring edit, persists it to the secret file, and answers
/// with the new keyring (and a warning when it could not be saved).
fn edit_keys(
    state: &NodeState,
    body: Result<Bytes, BytesRejection>,
    what: &str,
    edit: impl FnOnce(&mut Keyring, &str) -> Result<bool, KeyError>,
) -> Response {
    let (ring, key) = match keyring(state).and_then(|r| Ok((r, key_field(body)?))) {
        Ok(x) => x,
        Err((status, msg)) => return error(status, msg),
    };
    // The std lock is held for the edit and the small file write only.
    let mut ring = ring.write().unwrap_or_else(|e| e.into_inner());
    let changed = match edit(&mut ring, &key) {
        Ok(c) => c,
        Err(e) => return error(key_error_status(&e), e.to_string()),
    };
    let mut out = keys_json(state, &ring);
    out["changed"] = json!(changed);
    if let (true, Some(path)) = (changed, &state.secret_file) {
        if let Err(e) = crate::secret::save(path, &ring) {
            let msg = format!(
                "keyring changed in memory but not saved to {}: {e}",
                path.display()
            );
            tracing::warn!("{msg}");
            out["warning"] = json!(msg);
        }
    }
    let keys: Vec<String> = ring.list().iter().map(|k| k.fingerprint.clone()).collect();
    tracing::info!(action = what, changed, primary = %keys[0], keys = ?keys, "keyring edited");
    Json(out).into_response()
}

async fn post_key_install(State(api): State<Api>, body: Result<Bytes, BytesRejection>) -> Response {
    edit_keys(&api.state, body, "install", |ring, key| {
        ring.install(Key::from_base64(key)?)
    })
}

async fn post_key_use(State(api): State<Api>, body: Result<Bytes, BytesRejection>) -> Response {
    edit_keys(&api.state, body, "use", |ring, key| {
        let before = ring.primary().clone();
        ring.use_key(key)?;
        Ok(ring.primary() != &before)
    })
}

async fn post_key_remove(State(api): State<Api>, body: Result<Bytes, BytesRejection>) -> Response {
    edit_keys(&api.state, body, "remove", |ring, key| {
        ring.remove(key).map(|()| true)
    })
}

async fn post_leave(State(api): State<Api>) -> Response {
    api.cancel.cancel();
    (StatusCode::ACCEPTED, Json(json!({ "status": "leaving" }))).into_response()
}

async fn get_metrics(State(api): State<Api>) -> Response {
    let s = &api.state;
    let d = &s.discovery;
    let t = s.transport.stats();
    let mut out = String::new();
    let mut by_state: BTreeMap<&str, usize> =
        [("alive", 0), ("suspect", 0), ("failed", 0), ("left", 0)]
            .into_iter()
            .collect();
    let mut links_up = 0;
    for p in s.peers.iter() {
        *by_state.entry(p.state.as_str()).or_default() += 1;
        links_up += usize::from(p.link == LinkState::Up);
    }
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP constellation_peers Peers by state.\n# TYPE constellation_peers gauge"
    );
    for (k, v) in &by_state {
        let _ = writeln!(out, "constellation_peers{{state=\"{k}\"}} {v}");
    }
    let _ = writeln!(out, "# HELP constellation_links_up Data links up.\n# TYPE constellation_links_up gauge\nconstellation_links_up {links_up}");
    let keys = s.keyring.as_ref().map_or(0, |r| {
        r.read().unwrap_or_else(|e| e.into_inner()).keys().len()
    });
    let _ = writeln!(out, "# HELP constellation_keys Installed cluster keys (0: no secret, plaintext).\n# TYPE constellation_keys gauge\nconstellation_keys {keys}");
    let pending = s.table.pending.load(Ordering::Relaxed);
    let _ = writeln!(out, "# HELP constellation_peers_pending Peers heard by beacon or report, not yet confirmed by a link.\n# TYPE constellation_peers_pending gauge\nconstellation_peers_pending {pending}");
    let counters: [(&str, &str, u64); 14] = [
        (
            "beacons_sent_total",
            "Multicast beacons sent.",
            d.beacons_sent.load(Ordering::Relaxed),
        ),
        (
            "beacon_replies_sent_total",
            "Unicast replies sent.",
            d.replies_sent.load(Ordering::Relaxed),
        ),
        (
            "beacons_received_total",
            "Valid beacons received.",
            d.beacons_received.load(Ordering::Relaxed),
        ),
        (
            "frames_in_total",
            "Frames read on links.",
            t.frames_in.load(Ordering::Relaxed),
        ),
        (
            "frames_out_total",
            "Frames written on links.",
            t.frames_out.load(Ordering::Relaxed),
        ),
        (
            "links_established_total",
            "Links established.",
            t.links_established.load(Ordering::Relaxed),
        ),
        (
            "dials_total",
            "Dials started (connects and reconnects).",
            t.dials.load(Ordering::Relaxed),
        ),
        (
            "dial_failures_total",
            "Dials that failed.",
            t.dial_failures.load(Ordering::Relaxed),
        ),
        (
            "messages_in_total",
            "Application messages received.",
            s.messages_in.load(Ordering::Relaxed),
        ),
        (
            "messages_out_total",
            "Application messages sent.",
            s.messages_out.load(Ordering::Relaxed),
        ),
        (
            "peers_admitted_total",
            "Pending entries created (new ids heard by beacon or report).",
            s.table.admitted.load(Ordering::Relaxed),
        ),
        (
            "pending_refused_total",
            "New ids refused because too many entries were pending.",
            s.table.refused.load(Ordering::Relaxed),
        ),
        (
            "stalls_total",
            "Times the node noticed its own lateness and held its verdicts.",
            s.table.stalls.load(Ordering::Relaxed),
        ),
        (
            "uptime_seconds_total",
            "Seconds since start.",
            s.started.elapsed().as_secs(),
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP constellation_{name} {help}\n# TYPE constellation_{name} counter\nconstellation_{name} {v}");
    }
    let counters = link_counters(s).await;
    let (bytes_in, bytes_out) = counters.values().fold((0, 0), |(i, o), c| {
        (
            i + c.bytes_in.load(Ordering::Relaxed),
            o + c.bytes_out.load(Ordering::Relaxed),
        )
    });
    let _ = writeln!(out, "# HELP constellation_payload_bytes Application payload bytes on current links.\n# TYPE constellation_payload_bytes gauge\nconstellation_payload_bytes{{direction=\"in\"}} {bytes_in}\nconstellation_payload_bytes{{direction=\"out\"}} {bytes_out}");
    let _ = writeln!(out, "# HELP constellation_transitions_total Peer state changes, by event.\n# TYPE constellation_transitions_total counter");
    for (kind, v) in s.transitions.snapshot() {
        let _ = writeln!(
            out,
            "constellation_transitions_total{{event=\"{kind}\"}} {v}"
        );
    }
    let _ = writeln!(out, "# HELP constellation_beacons_dropped_total Datagrams dropped, by reason.\n# TYPE constellation_beacons_dropped_total counter");
    for (reason, v) in d.drops.snapshot() {
        let _ = writeln!(
            out,
            "constellation_beacons_dropped_total{{reason=\"{reason}\"}} {v}"
        );
    }
    let _ = writeln!(out, "# HELP constellation_links_refused_total Connections or frames refused, by reason.\n# TYPE constellation_links_refused_total counter");
    for (reason, v) in t.drops.snapshot() {
        let _ = writeln!(
            out,
            "constellation_links_refused_total{{reason=\"{reason}\"}} {v}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short_and_cut_on_a_character_boundary() {
        assert_eq!(quote("node2"), "\"node2\"");
        let long = "é".repeat(100);
        let q = quote(&long);
        assert!(q.len() < QUOTE_MAX + 40, "{q}");
        assert!(q.ends_with("... (200 bytes)"), "{q}");
        assert_eq!(quote("a\u{1b}b"), "\"a\\u{1b}b\"");
    }

    #[test]
    fn accept_errors_back_off_doubling_to_a_cap_and_log_rarely() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = AcceptBackoff::default();
        assert_eq!(b.failed(t0), (ms(100), Some(0)), "the first is logged");
        assert_eq!(b.failed(t0 + ms(100)), (ms(200), None));
        assert_eq!(b.failed(t0 + ms(300)), (ms(400), None));
        assert_eq!(b.failed(t0 + ms(700)), (ms(800), None));
        assert_eq!(b.failed(t0 + ms(1500)), (ms(1000), None), "capped");
        assert_eq!(b.failed(t0 + ms(2500)).0, ms(1000));
        let at = t0 + ACCEPT_LOG_EVERY;
        assert_eq!(
            b.failed(at),
            (ms(1000), Some(5)),
            "logged again, with the count"
        );
        b.succeeded();
        assert_eq!(
            b.failed(at + ms(10)),
            (ms(100), None),
            "fresh pause, same log budget"
        );
    }

    #[test]
    fn the_connection_bound_follows_the_descriptor_limit() {
        let bound = connection_bound();
        assert!((8..=MAX_CONNECTIONS).contains(&bound), "{bound}");
        let refusal = String::from_utf8(refusal(bound)).unwrap();
        let (head, body) = refusal.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("too many"));
    }
}
