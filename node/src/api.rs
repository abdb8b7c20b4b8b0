//! The control API: HTTP/1.1 + JSON on a Unix socket.
//!
//! `curl --unix-socket PATH http://localhost/v1/peers` works with nothing of
//! ours installed; the CLI is a client of exactly this API. Every body, sent
//! or received, is a type of [`proto::control`] (the CLI reads the same
//! types), so the wire's field names live in one place. Request bodies are
//! read by the [`JsonBody`] extractor whatever their content type. Every
//! error is a JSON object `{"error": "..."}` ([`ErrorBody`]) with a fitting
//! status, and quotes at most [`QUOTE_MAX`] bytes of anything the client
//! sent. `/metrics` is in the Prometheus text format (see [`metrics`]).
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
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::control::{
    self, DroppedEvent, ErrorBody, EventBody, Health, HealthQuery, HealthStatus, InterfaceInfo,
    KeyEntry, KeyRequest, Keys, Leaving, LinkTraffic, NodeCounters, NodeInfo, PeerEntry, PeerList,
    PeersQuery, QueryError, SendRequest, SendResult, SendResults, SendStatus,
};
use proto::control::{TagsInfo, TagsRequest};
use proto::frame::AppMessage;
use proto::membership::{LinkState, Peer};
use proto::secure::{Key, KeyError, Keyring, SharedKeyring};
use proto::NodeId;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use serde_json::error::Category;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use transport::LinkCounters;

use crate::state::{now_rfc3339, peer_json, FindError, Item, NodeState};

mod metrics;

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
    (status, Json(ErrorBody { error: msg.into() })).into_response()
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
        .route("/v1/self/tags", get(get_tags).patch(patch_tags))
        .route("/v1/queries", post(post_query))
        .route("/v1/queries/{id}/responses", post(post_query_response))
        .route(
            "/v1/cluster/keys",
            get(get_cluster_keys).post(post_cluster_key_install),
        )
        .route("/v1/cluster/keys/use", post(post_cluster_key_use))
        .route("/v1/cluster/keys/remove", post(post_cluster_key_remove))
        .route("/v1/peers", get(get_peers))
        .route("/v1/peers/{key}", get(get_peer))
        .route("/v1/peers/{key}/remove", post(post_remove))
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
    let body = ErrorBody {
        error: format!("too many control connections (at most {bound}); try again later"),
    };
    // A struct of one string always serialises.
    let body = serde_json::to_string(&body).unwrap_or_default();
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

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// What a request body should look like, for error messages.
trait RequestShape {
    const SHAPE: &'static str;
}

impl RequestShape for control::SendRequest {
    const SHAPE: &'static str = r#"{"to": "<peer name or id>" (or null to broadcast), "topic": "<topic>", "payload": "<text>" (or "payload_b64": "<base64>")}"#;
}

impl RequestShape for TagsRequest {
    const SHAPE: &'static str =
        r#"{"set": {"<key>": "<value>", ...}, "delete": ["<key>", ...]} (either may be absent)"#;
}

impl RequestShape for control::QueryRequest {
    const SHAPE: &'static str = r#"{"name": "<query>", "payload": "<text>" (or "payload_b64"), "nodes": ["<name or id>", ...], "tags": {"<key>": "<value>"}, "timeout_ms": 1000} (all but name optional)"#;
}

impl RequestShape for control::RemoveRequest {
    const SHAPE: &'static str = r#"{"prune": false} (or no body)"#;
}

impl RequestShape for control::QueryAnswer {
    const SHAPE: &'static str = r#"{"payload": "<text>"} (or "payload_b64": "<base64>")"#;
}

impl RequestShape for control::KeyRequest {
    const SHAPE: &'static str = r#"{"key": "<base64 key or fingerprint>"}"#;
}

/// A JSON request body of type `T`. Read whatever the content type says
/// (`curl -d` says form-urlencoded); refusals are [`ApiError`]s: `400`
/// naming the field at fault, or the status of a body that could not be read.
#[derive(Debug)]
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + RequestShape> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|rej| ApiError(rej.status(), rej.body_text()))?;
        parse_body(&body).map(JsonBody)
    }
}

fn parse_body<T: DeserializeOwned + RequestShape>(body: &[u8]) -> Result<T, ApiError> {
    let not_json =
        |e: serde_json::Error| ApiError::bad_request(format!("body is not valid JSON: {e}"));
    // serde would read a struct from an array too: only objects are bodies.
    if body.trim_ascii_start().first() != Some(&b'{') {
        serde_json::from_slice::<IgnoredAny>(body).map_err(not_json)?;
        return Err(ApiError::bad_request(format!(
            "body must be a JSON object: {}",
            T::SHAPE
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.classify() != Category::Data {
                return Err(not_json(inner));
            }
            let at = if path == "." {
                String::new()
            } else {
                format!("\"{path}\": ")
            };
            // serde may quote a value the client sent ("invalid type:
            // string ..."): keep it as short as other quotes.
            let what = inner.to_string();
            let what = match what.char_indices().nth(2 * QUOTE_MAX) {
                Some((cut, _)) => format!("{}...", &what[..cut]),
                None => what,
            };
            return Err(ApiError::bad_request(format!(
                "{at}{what}; the body is {}",
                T::SHAPE
            )));
        }
    };
    de.end().map_err(not_json)?;
    Ok(value)
}

/// The decoded query pairs, or the `400` of a malformed query string.
fn query_pairs(
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Vec<(String, String)>, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|_| ApiError::bad_request("malformed query string"))
}

fn query_error(e: QueryError) -> ApiError {
    ApiError::bad_request(match &e {
        QueryError::UnknownParameter(p) => format!("unknown parameter {}", quote(p)),
        QueryError::UnknownState(s) => {
            format!("unknown state {} (alive, suspect, failed, left)", quote(s))
        }
        QueryError::BadTag(_) | QueryError::NotANumber(_) => e.to_string(),
    })
}

/// The peer `key` names, or its `404` / `409`.
fn find(state: &NodeState, key: &str) -> Result<Peer, ApiError> {
    state.find_peer(key).map_err(|e| match e {
        FindError::Unknown => ApiError(StatusCode::NOT_FOUND, format!("no peer {}", quote(key))),
        FindError::Ambiguous => ApiError(StatusCode::CONFLICT, format!("{}: {e}", quote(key))),
    })
}

/// Label -> count, as the API spells maps.
fn counts<K: ToString, V: TryInto<u64>>(m: impl IntoIterator<Item = (K, V)>) -> control::Counts {
    m.into_iter()
        .map(|(k, v)| (k.to_string(), v.try_into().unwrap_or(u64::MAX)))
        .collect()
}

fn traffic(c: Option<&LinkCounters>) -> LinkTraffic {
    let get = |f: fn(&LinkCounters) -> &AtomicU64| c.map_or(0, |c| f(c).load(Ordering::Relaxed));
    LinkTraffic {
        messages_in: get(|c| &c.msgs_in),
        messages_out: get(|c| &c.msgs_out),
        bytes_in: get(|c| &c.bytes_in),
        bytes_out: get(|c| &c.bytes_out),
    }
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

fn peer_entry(p: &Peer, now: Instant, counters: &HashMap<NodeId, Arc<LinkCounters>>) -> PeerEntry {
    PeerEntry {
        peer: peer_json(p, now),
        traffic: traffic(counters.get(&p.id).map(|c| &**c)),
    }
}

async fn get_peers(
    State(api): State<Api>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<PeerList>, ApiError> {
    let q = PeersQuery::from_pairs(query_pairs(q)?).map_err(query_error)?;
    // Patterns are quoted short: a regex error never echoes a long value.
    let filter = crate::filter::PeerFilter::new(&q).map_err(|e| {
        let cut = e
            .char_indices()
            .nth(4 * QUOTE_MAX)
            .map_or(e.len(), |(i, _)| i);
        ApiError::bad_request(&e[..cut])
    })?;
    let counters = link_counters(&api.state).await;
    let now = Instant::now();
    let mut peers: Vec<Peer> = api
        .state
        .peers
        .iter()
        .filter(|p| filter.matches(p))
        .map(|r| r.clone())
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    let peers = peers
        .iter()
        .map(|p| peer_entry(p, now, &counters))
        .collect();
    Ok(Json(PeerList { peers }))
}

async fn get_peer(
    State(api): State<Api>,
    key: Result<Path<String>, PathRejection>,
) -> Result<Json<PeerEntry>, ApiError> {
    let Path(key) = key.map_err(|rej| ApiError(rej.status(), rej.body_text()))?;
    let p = find(&api.state, &key)?;
    let counters = link_counters(&api.state).await;
    Ok(Json(peer_entry(&p, Instant::now(), &counters)))
}

/// Plain-language warnings for `status`.
fn warnings(state: &NodeState, uptime: Duration) -> Vec<String> {
    let mut w = Vec::new();
    let grace = state.beacon_interval * 3;
    if state.multicast && uptime > grace && !state.discovery.loops_back.load(Ordering::Relaxed) {
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

fn self_info(state: &NodeState) -> NodeInfo {
    let uptime = state.started.elapsed();
    let d = &state.discovery;
    let t = state.transport.stats();
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    let mut links_up = 0;
    for p in state.peers.iter() {
        *by_state.entry(p.state.as_str()).or_default() += 1;
        links_up += u64::from(p.link == LinkState::Up);
    }
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    NodeInfo {
        id: state.id.to_string(),
        name: state.name.clone(),
        cluster: state.cluster.clone(),
        incarnation: state.current_incarnation(),
        addresses: state.advertised.iter().map(|a| a.to_string()).collect(),
        listen: state.listen.to_string(),
        interfaces: state
            .interfaces
            .iter()
            .map(|i| InterfaceInfo {
                name: i.name.clone(),
                addr: i.addr.to_string(),
            })
            .collect(),
        group: state.group.to_string(),
        ttl: state.ttl,
        uptime_ms: uptime.as_millis() as u64,
        tags: state.tags.get(),
        multicast_loops_back: d.loops_back.load(Ordering::Relaxed),
        secured: state.keyring.is_some(),
        peers: counts(by_state),
        transitions: counts(state.transitions.snapshot()),
        links_up,
        counters: NodeCounters {
            beacons_sent: n(&d.beacons_sent),
            beacons_received: n(&d.beacons_received),
            replies_sent: n(&d.replies_sent),
            beacon_send_errors: n(&d.send_errors),
            beacons_dropped: counts(d.drops.snapshot()),
            frames_in: n(&t.frames_in),
            frames_out: n(&t.frames_out),
            links_established: n(&t.links_established),
            dials: n(&t.dials),
            dial_failures: n(&t.dial_failures),
            links_refused: counts(t.drops.snapshot()),
            messages_in: n(&state.messages_in),
            messages_out: n(&state.messages_out),
            peers_pending: n(&state.table.pending),
            peers_admitted: n(&state.table.admitted),
            pending_refused: n(&state.table.refused),
            stalls: n(&state.table.stalls),
            event_subscribers: state.events.subscribers() as u64,
            events_dropped: state.events.dropped(),
            queries: state.queries.counters.snapshot(),
        },
        warnings: warnings(state, uptime),
        multicast: state.multicast,
        beacon_interval_ms: n(&d.interval_ms),
        seeds: state.seeds.lock().map(|s| s.clone()).unwrap_or_default(),
        state_dir: state.state_dir.as_ref().map(|d| d.display().to_string()),
        handlers: state.handlers.snapshot(),
        overlay: (state.overlay.max_links > 0).then(|| proto::control::OverlayInfo {
            max_links: state.overlay.max_links,
            neighbours: n(&state.overlay.neighbours),
            refutations: n(&state.overlay.refutations),
            relay: state.relay.counters.snapshot(),
        }),
    }
}

async fn get_self(State(api): State<Api>) -> Json<NodeInfo> {
    Json(self_info(&api.state))
}

async fn get_health(
    State(api): State<Api>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<(StatusCode, Json<Health>), ApiError> {
    let HealthQuery { min_peers } =
        HealthQuery::from_pairs(query_pairs(q)?).map_err(query_error)?;
    let alive_peers = api.state.peers.iter().filter(|p| p.is_live()).count();
    let (status, code) = if alive_peers >= min_peers {
        (HealthStatus::Ok, StatusCode::OK)
    } else {
        (HealthStatus::Waiting, StatusCode::SERVICE_UNAVAILABLE)
    };
    let body = Health {
        status,
        alive_peers,
        min_peers,
    };
    Ok((code, Json(body)))
}

/// One line of the event stream built here (not by the membership task).
fn stream_line<B: Serialize>(kind: &str, body: B) -> Bytes {
    let event = control::Event {
        kind: kind.into(),
        at: now_rfc3339(),
        body,
    };
    // A struct of strings and numbers always serialises.
    let mut line = serde_json::to_vec(&event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn get_events(State(api): State<Api>) -> Response {
    // Dropping the stream (client gone, node stopping) drops the
    // subscription, and with it the backlog.
    let sub = api.state.events.subscribe();
    let first = stream_line(control::EVENT_SUBSCRIBED, EventBody::Other {});
    let cancel = api.cancel.clone();
    let stream = futures::stream::unfold(
        (sub, cancel, Some(first)),
        |(sub, cancel, first)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, Infallible>(first), (sub, cancel, None)));
            }
            let line = tokio::select! {
                () = cancel.cancelled() => return None,
                item = sub.next() => match item {
                    Item::Line(line) => line,
                    // This reader fell behind: say how much it missed, go on.
                    Item::Dropped(count) => stream_line(control::EVENT_DROPPED, DroppedEvent { count }),
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

async fn post_message(
    State(api): State<Api>,
    JsonBody(req): JsonBody<SendRequest>,
) -> Result<(StatusCode, Json<SendResults>), ApiError> {
    let topic = req
        .topic()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let payload = req
        .payload()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if payload.len() > api.max_payload {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                api.max_payload
            ),
        ));
    }
    let state = &api.state;
    let msg = AppMessage {
        topic: topic.into(),
        payload: Bytes::from(payload),
    };
    let wait = state.transport.send_timeout();
    let links = state.transport.links().await;
    let overlay = state.overlay.max_links > 0;
    let targets: Vec<_> = match &req.to {
        Some(key) => {
            let peer = find(state, key)?;
            match links.into_iter().find(|l| l.id == peer.id) {
                Some(l) => vec![(l, peer.name)],
                // A live member that is not a neighbour: over the overlay.
                None if overlay && peer.is_live() => {
                    return relay(state, Some(&peer), msg).await;
                }
                None => {
                    return Err(ApiError(
                        StatusCode::CONFLICT,
                        format!(
                            "no link to {} (state {}, link {})",
                            peer.name,
                            peer.state.as_str(),
                            peer.link.as_str()
                        ),
                    ))
                }
            }
        }
        // Every member, over the overlay, unless every live member is
        // linked (a cluster of at most K + 1 is a full mesh): then one
        // frame per link, as without the overlay, rather than a flood.
        None if overlay
            && state
                .peers
                .iter()
                .any(|p| p.is_live() && !links.iter().any(|l| l.id == p.id)) =>
        {
            return relay(state, None, msg).await
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
    let mut failed = false;
    let results = outcomes
        .into_iter()
        .map(|(id, name, res)| {
            let (status, error) = match res {
                Ok(()) => {
                    state.messages_out.fetch_add(1, Ordering::Relaxed);
                    (SendStatus::Sent, None)
                }
                Err(e) => {
                    failed = true;
                    (SendStatus::Failed, Some(e.to_string()))
                }
            };
            SendResult {
                id: id.to_string(),
                name,
                status,
                error,
            }
        })
        .collect();
    // A send to one named peer fails as a whole (the link closed or stayed
    // full); a broadcast reports each recipient and succeeds.
    let status = if req.to.is_some() && failed {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    Ok((status, Json(SendResults { results })))
}

/// `POST /v1/messages` in the bounded overlay: the message goes to every
/// live member (`to: None`) or to one that is not a neighbour, relayed over
/// the links (see `crate::relay`). Each recipient is listed as `relayed`; a
/// node without a link relays nothing (no recipients, or 409 for `to`).
async fn relay(
    state: &NodeState,
    to: Option<&Peer>,
    msg: AppMessage,
) -> Result<(StatusCode, Json<SendResults>), ApiError> {
    let handed = state.relay.send(to.map(|p| p.id), msg).await;
    if handed.is_empty() {
        return match to {
            Some(p) => Err(ApiError(
                StatusCode::CONFLICT,
                format!("no link to {} and none to relay it over", p.name),
            )),
            None => Ok((StatusCode::OK, Json(SendResults { results: vec![] }))),
        };
    }
    state.messages_out.fetch_add(1, Ordering::Relaxed);
    let relayed = |p: &Peer| SendResult {
        id: p.id.to_string(),
        name: p.name.clone(),
        status: SendStatus::Relayed,
        error: None,
    };
    let mut results: Vec<SendResult> = match to {
        Some(p) => vec![relayed(p)],
        None => state
            .peers
            .iter()
            .filter(|p| p.is_live())
            .map(|p| relayed(&p))
            .collect(),
    };
    results.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    Ok((StatusCode::OK, Json(SendResults { results })))
}

/// The keyring, or the 409 of a node without a secret.
fn keyring(state: &NodeState) -> Result<&SharedKeyring, ApiError> {
    state.keyring.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            "this node runs without a cluster secret; start it with --secret-file to use keys"
                .into(),
        )
    })
}

fn keys_info(state: &NodeState, ring: &Keyring) -> Keys {
    Keys {
        secured: true,
        keys: ring
            .list()
            .into_iter()
            .map(|k| KeyEntry {
                fingerprint: k.fingerprint,
                primary: k.primary,
            })
            .collect(),
        secret_file: state.secret_file.as_ref().map(|p| p.display().to_string()),
        changed: None,
        warning: None,
    }
}

async fn get_keys(State(api): State<Api>) -> Result<Json<Keys>, ApiError> {
    let ring = keyring(&api.state)?;
    let ring = ring.read().unwrap_or_else(|e| e.into_inner());
    Ok(Json(keys_info(&api.state, &ring)))
}

fn key_error_status(e: &KeyError) -> StatusCode {
    match e {
        KeyError::Invalid(_) => StatusCode::BAD_REQUEST,
        KeyError::NotInstalled(_) => StatusCode::NOT_FOUND,
        KeyError::Primary(_) | KeyError::Full | KeyError::Empty => StatusCode::CONFLICT,
    }
}

/// A keyring edit's body, read after the keyring check (a node without a
/// secret answers 409 whatever the body).
type KeyBody = Result<JsonBody<KeyRequest>, ApiError>;

/// Applies one keyring edit, persists it to the secret file, and answers
/// with the new keyring (and a warning when it could not be saved).
fn edit_keys(
    state: &NodeState,
    body: KeyBody,
    what: &str,
    edit: impl FnOnce(&mut Keyring, &str) -> Result<bool, KeyError>,
) -> Result<Json<Keys>, ApiError> {
    let ring = keyring(state)?;
    let JsonBody(KeyRequest { key }) = body?;
    // The std lock is held for the edit and the small file write only.
    let mut ring = ring.write().unwrap_or_else(|e| e.into_inner());
    let changed =
        edit(&mut ring, &key).map_err(|e| ApiError(key_error_status(&e), e.to_string()))?;
    let mut out = keys_info(state, &ring);
    out.changed = Some(changed);
    if let (true, Some(path)) = (changed, &state.secret_file) {
        if let Err(e) = crate::secret::save(path, &ring) {
            let msg = format!(
                "keyring changed in memory but not saved to {}: {e}",
                path.display()
            );
            tracing::warn!("{msg}");
            out.warning = Some(msg);
        }
    }
    let keys: Vec<String> = ring.list().iter().map(|k| k.fingerprint.clone()).collect();
    tracing::info!(action = what, changed, primary = %keys[0], keys = ?keys, "keyring edited");
    Ok(Json(out))
}

/// A keyring edit by name (`install`, `use`, `remove`; `list` reads), for
/// the cluster-wide key operation: the keyring afterwards, or why not.
pub(crate) fn key_op(state: &NodeState, op: &str, key: &str) -> Result<Keys, String> {
    let body = || {
        Ok(JsonBody(KeyRequest {
            key: key.to_string(),
        }))
    };
    let res = match op {
        "list" => keyring(state).map(|ring| {
            let ring = ring.read().unwrap_or_else(|e| e.into_inner());
            Json(keys_info(state, &ring))
        }),
        "install" => edit_keys(state, body(), "install", |ring, key| {
            ring.install(Key::from_base64(key)?)
        }),
        "use" => edit_keys(state, body(), "use", |ring, key| {
            let before = ring.primary().clone();
            ring.use_key(key)?;
            Ok(ring.primary() != &before)
        }),
        "remove" => edit_keys(state, body(), "remove", |ring, key| {
            ring.remove(key).map(|()| true)
        }),
        other => Err(ApiError::bad_request(format!(
            "unknown key operation {}",
            quote(other)
        ))),
    };
    res.map(|Json(k)| k).map_err(|ApiError(_, msg)| msg)
}

async fn post_key_install(State(api): State<Api>, body: KeyBody) -> Result<Json<Keys>, ApiError> {
    edit_keys(&api.state, body, "install", |ring, key| {
        ring.install(Key::from_base64(key)?)
    })
}

async fn post_key_use(State(api): State<Api>, body: KeyBody) -> Result<Json<Keys>, ApiError> {
    edit_keys(&api.state, body, "use", |ring, key| {
        let before = ring.primary().clone();
        ring.use_key(key)?;
        Ok(ring.primary() != &before)
    })
}

async fn post_key_remove(State(api): State<Api>, body: KeyBody) -> Result<Json<Keys>, ApiError> {
    edit_keys(&api.state, body, "remove", |ring, key| {
        ring.remove(key).map(|()| true)
    })
}

async fn get_tags(State(api): State<Api>) -> Json<TagsInfo> {
    Json(api.state.tags.info())
}

/// Changes this node's tags at once and tells every linked peer (see
/// [`crate::tags`]).
async fn patch_tags(
    State(api): State<Api>,
    JsonBody(req): JsonBody<TagsRequest>,
) -> Result<Json<TagsInfo>, ApiError> {
    let state = &api.state;
    let (tags, version, changed, warning) = state
        .tags
        .apply(&req)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(w) = &warning {
        warn!("{w}");
    }
    let sent_to = if changed {
        tracing::info!(tags = ?tags, version, "tags changed");
        state.publish(
            "self_updated",
            || serde_json::json!({ "tags": tags, "tags_version": version }),
        );
        state.send_self_record(state.linked())
    } else {
        0
    };
    let mut info = state.tags.info();
    info.changed = Some(changed);
    info.sent_to = Some(sent_to);
    info.warning = warning;
    Ok(Json(info))
}

fn ask_error(e: crate::query::HandleError) -> ApiError {
    use crate::query::HandleError;
    use proto::query::AskError;
    let status = match &e {
        HandleError::Ask(AskError::TooLarge(..)) => StatusCode::PAYLOAD_TOO_LARGE,
        HandleError::Ask(AskError::Busy(_)) | HandleError::Stopped => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError(status, e.to_string())
}

/// Maps one step of an ask to its stream line.
fn query_line(p: crate::query::Progress) -> control::QueryLine {
    use crate::query::Progress;
    match p {
        Progress::Ack(from) => control::QueryLine::Ack { from },
        Progress::Answer(from, payload) => control::QueryLine::Answer {
            from,
            payload: std::str::from_utf8(&payload).ok().map(String::from),
            payload_b64: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                &payload,
            ),
        },
        Progress::Done { summary, timed_out } => control::QueryLine::Done {
            asked: summary.asked,
            acked: summary.acked,
            answered: summary.answered,
            timed_out,
        },
    }
}

fn ndjson(line: &control::QueryLine) -> Bytes {
    // A struct of strings and numbers always serialises.
    let mut v = serde_json::to_vec(line).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Asks a query and streams its acks and answers as NDJSON lines
/// ([`control::QueryLine`]), ending with a summary at the timeout.
/// Dropping the stream stops waiting for answers.
async fn post_query(
    State(api): State<Api>,
    JsonBody(req): JsonBody<control::QueryRequest>,
) -> Result<Response, ApiError> {
    let payload = req
        .bytes()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let spec = crate::query::AskSpec {
        name: req.name,
        payload: Bytes::from(payload),
        filter: proto::query::Filter {
            nodes: req.nodes,
            tags: req.tags.into_iter().collect(),
        },
        timeout: Duration::from_millis(req.timeout_ms.unwrap_or(control::QUERY_TIMEOUT_MS)),
        expect: crate::query::Expect::Live,
        internal: false,
    };
    let asked = api.state.queries.ask(spec).await.map_err(ask_error)?;
    let first = ndjson(&control::QueryLine::Asked {
        id: asked.id,
        asked: asked.asked,
    });
    let stream = futures::stream::unfold(
        (Some(first), asked.progress),
        |(first, mut rx)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, Infallible>(first), (None, rx)));
            }
            let p = rx.recv().await?;
            Some((Ok(ndjson(&query_line(p))), (None, rx)))
        },
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "cannot build stream")))
}

/// A local answerer's answer to a query this node was asked.
async fn post_query_response(
    State(api): State<Api>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<control::QueryAnswer>,
) -> Result<Json<control::QueryAnswered>, ApiError> {
    use crate::query::HandleError;
    use proto::query::RespondError;
    let payload = req
        .bytes()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    match api.state.queries.respond(&id, Bytes::from(payload)).await {
        Ok(()) => Ok(Json(control::QueryAnswered {
            status: "answered".into(),
        })),
        Err(e) => {
            let status = match &e {
                HandleError::BadId => StatusCode::BAD_REQUEST,
                HandleError::Respond(RespondError::Unknown) => StatusCode::NOT_FOUND,
                HandleError::Respond(RespondError::Answered) => StatusCode::CONFLICT,
                HandleError::Respond(RespondError::Late) => StatusCode::GONE,
                HandleError::Respond(RespondError::TooLarge(..)) => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Err(ApiError(status, format!("{}: {e}", quote(&id))))
        }
    }
}

/// Force-leave: a failed peer is marked `left` (or with `prune`, dropped)
/// on every live node, over the links. `409` for a peer that is alive or
/// suspect here; each node that still hears it refuses too (and says so).
async fn post_remove(
    State(api): State<Api>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Json<control::Removed>, ApiError> {
    use crate::query::{Outcome, Progress, RemoveOp};
    let state = &api.state;
    let req: control::RemoveRequest = if body.trim_ascii().is_empty() {
        control::RemoveRequest::default()
    } else {
        parse_body(&body)?
    };
    let peer = find(state, &key)?;
    if peer.is_live() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "{} is {}: only a failed peer can be removed (a live one leaves with `constellationd leave` on its host)",
                peer.name,
                peer.state.as_str()
            ),
        ));
    }
    let payload = serde_json::to_vec(&RemoveOp {
        id: peer.id.to_string(),
        prune: req.prune,
    })
    .unwrap_or_default();
    let spec = crate::query::AskSpec {
        name: crate::query::REMOVE_QUERY.into(),
        payload: Bytes::from(payload),
        filter: proto::query::Filter::default(),
        timeout: CLUSTER_KEYS_TIMEOUT,
        expect: crate::query::Expect::Live,
        internal: true,
    };
    let mut asked = state.queries.ask(spec).await.map_err(ask_error)?;
    let mut answers: HashMap<String, Outcome> = HashMap::new();
    while let Some(p) = asked.progress.recv().await {
        match p {
            Progress::Answer(from, payload) => {
                let out = serde_json::from_slice(&payload).unwrap_or(Outcome {
                    ok: false,
                    error: Some("unreadable answer".into()),
                });
                answers.insert(from.id, out);
            }
            Progress::Ack(_) => {}
            Progress::Done { .. } => break,
        }
    }
    let mut results: Vec<control::NodeOutcome> = asked
        .asked
        .into_iter()
        .map(|node| {
            let out = answers.remove(&node.id).unwrap_or(Outcome {
                ok: false,
                error: Some(format!(
                    "no answer within {} ms",
                    CLUSTER_KEYS_TIMEOUT.as_millis()
                )),
            });
            control::NodeOutcome {
                node,
                ok: out.ok,
                error: out.error,
            }
        })
        .collect();
    results.sort_by(|a, b| a.ok.cmp(&b.ok).then(a.node.name.cmp(&b.node.name)));
    let ok = results.iter().filter(|r| r.ok).count();
    tracing::info!(peer = %peer.name, prune = req.prune, nodes = results.len(), ok, "force-leave");
    Ok(Json(control::Removed {
        peer: control::NodeRef {
            id: peer.id.to_string(),
            name: peer.name,
        },
        prune: req.prune,
        nodes: results.len(),
        ok,
        results,
    }))
}

/// How long a cluster-wide key operation waits for the nodes' answers.
pub const CLUSTER_KEYS_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a key operation on every node (this one included) over the
/// links, and reports each node's outcome.
async fn cluster_keys(
    state: &NodeState,
    op: &str,
    key: String,
) -> Result<Json<control::ClusterKeys>, ApiError> {
    use crate::query::{KeyOp, KeyOutcome, Progress};
    keyring(state)?;
    let payload = serde_json::to_vec(&KeyOp { op: op.into(), key }).unwrap_or_default();
    let spec = crate::query::AskSpec {
        name: crate::query::KEYS_QUERY.into(),
        payload: Bytes::from(payload),
        filter: proto::query::Filter::default(),
        timeout: CLUSTER_KEYS_TIMEOUT,
        expect: crate::query::Expect::NotLeft,
        internal: true,
    };
    let mut asked = state.queries.ask(spec).await.map_err(ask_error)?;
    let mut answers: HashMap<String, KeyOutcome> = HashMap::new();
    while let Some(p) = asked.progress.recv().await {
        match p {
            Progress::Answer(from, payload) => {
                let out = serde_json::from_slice(&payload).unwrap_or(KeyOutcome {
                    ok: false,
                    error: Some("unreadable answer".into()),
                    keys: Vec::new(),
                });
                answers.insert(from.id, out);
            }
            Progress::Ack(_) => {}
            Progress::Done { .. } => break,
        }
    }
    let mut results: Vec<control::NodeKeys> = asked
        .asked
        .into_iter()
        .map(|node| match answers.remove(&node.id) {
            Some(out) => control::NodeKeys {
                node,
                ok: out.ok,
                error: out.error,
                keys: out.keys,
            },
            None => {
                let why = node
                    .id
                    .parse::<NodeId>()
                    .ok()
                    .and_then(|id| state.peers.get(&id).map(|p| (p.state, p.link)))
                    .map(|(s, l)| format!(" (peer {}, link {})", s.as_str(), l.as_str()))
                    .unwrap_or_default();
                control::NodeKeys {
                    node,
                    ok: false,
                    error: Some(format!(
                        "no answer within {} ms{why}",
                        CLUSTER_KEYS_TIMEOUT.as_millis()
                    )),
                    keys: Vec::new(),
                }
            }
        })
        .collect();
    results.sort_by(|a, b| a.ok.cmp(&b.ok).then(a.node.name.cmp(&b.node.name)));
    let mut keys: BTreeMap<String, control::ClusterKey> = BTreeMap::new();
    for r in &results {
        for k in &r.keys {
            let e = keys
                .entry(k.fingerprint.clone())
                .or_insert_with(|| control::ClusterKey {
                    fingerprint: k.fingerprint.clone(),
                    nodes: 0,
                    primary_on: Vec::new(),
                });
            e.nodes += 1;
            if k.primary {
                e.primary_on.push(r.node.name.clone());
            }
        }
    }
    let ok = results.iter().filter(|r| r.ok).count();
    tracing::info!(op, nodes = results.len(), ok, "cluster key operation");
    Ok(Json(control::ClusterKeys {
        nodes: results.len(),
        ok,
        results,
        keys: keys.into_values().collect(),
    }))
}

async fn get_cluster_keys(State(api): State<Api>) -> Result<Json<control::ClusterKeys>, ApiError> {
    cluster_keys(&api.state, "list", String::new()).await
}

async fn cluster_edit(
    api: &Api,
    body: KeyBody,
    op: &str,
) -> Result<Json<control::ClusterKeys>, ApiError> {
    keyring(&api.state)?;
    let JsonBody(KeyRequest { key }) = body?;
    if op == "install" {
        // Checked here, so that a bad key is one 400, not N failures.
        Key::from_base64(&key).map_err(|e| ApiError(key_error_status(&e), e.to_string()))?;
    }
    cluster_keys(&api.state, op, key).await
}

async fn post_cluster_key_install(
    State(api): State<Api>,
    body: KeyBody,
) -> Result<Json<control::ClusterKeys>, ApiError> {
    cluster_edit(&api, body, "install").await
}

async fn post_cluster_key_use(
    State(api): State<Api>,
    body: KeyBody,
) -> Result<Json<control::ClusterKeys>, ApiError> {
    cluster_edit(&api, body, "use").await
}

async fn post_cluster_key_remove(
    State(api): State<Api>,
    body: KeyBody,
) -> Result<Json<control::ClusterKeys>, ApiError> {
    cluster_edit(&api, body, "remove").await
}

async fn post_leave(State(api): State<Api>) -> (StatusCode, Json<Leaving>) {
    api.cancel.cancel();
    let body = Leaving {
        status: "leaving".into(),
    };
    (StatusCode::ACCEPTED, Json(body))
}

async fn get_metrics(State(api): State<Api>) -> Response {
    let snapshot = metrics::Snapshot::take(&api.state).await;
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode(snapshot),
    )
        .into_response()
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

    #[derive(Debug, serde::Deserialize)]
    struct Numbered {
        #[allow(dead_code)] // read by serde only
        n: u64,
    }

    impl RequestShape for Numbered {
        const SHAPE: &'static str = r#"{"n": 1}"#;
    }

    #[test]
    fn request_bodies_are_objects_and_refusals_name_the_field_briefly() {
        let refusal = |body: &str| parse_body::<Numbered>(body.as_bytes()).unwrap_err();
        assert!(parse_body::<Numbered>(br#" {"n": 1, "extra": [true]}"#).is_ok());
        let ApiError(status, msg) = refusal("[1]");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(msg.starts_with("body must be a JSON object"), "{msg}");
        assert!(refusal("[1").1.starts_with("body is not valid JSON"));
        assert!(refusal(r#"{"n": 1} {}"#)
            .1
            .starts_with("body is not valid JSON"));
        assert!(refusal("{}").1.starts_with("missing field `n`"));
        let long = format!(r#"{{"n": "{}"}}"#, "x".repeat(10_000));
        let ApiError(_, msg) = refusal(&long);
        assert!(msg.starts_with("\"n\": invalid type: string"), "{msg}");
        assert!(msg.len() < 4 * QUOTE_MAX, "{} bytes", msg.len());
    }

    #[test]
    fn the_connection_bound_follows_the_descriptor_limit() {
        let bound = connection_bound();
        assert!((8..=MAX_CONNECTIONS).contains(&bound), "{bound}");
        let refusal = String::from_utf8(refusal(bound)).unwrap();
        let (head, body) = refusal.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: ErrorBody = serde_json::from_str(body).unwrap();
        assert!(v.error.contains("too many"));
    }
}
