//! The control API: HTTP/1.1 + JSON on a Unix socket.
//!
//! `curl --unix-socket PATH http://localhost/v1/peers` works with nothing of
//! ours installed; the CLI is a client of exactly this API. Every error is a
//! JSON object `{"error": "..."}` with a fitting status. A client that
//! connects and sends no request head within [`HEADER_TIMEOUT`] is dropped.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use proto::frame::AppMessage;
use proto::membership::{LinkState, Peer};
use proto::secure::{Key, KeyError, Keyring, SharedKeyring};
use proto::NodeId;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;
use transport::{LinkCounters, SendError};

use crate::state::{now_rfc3339, peer_json, FindError, NodeState};

/// A client must send its request head within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
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
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// Serves `router` on `listener` until `cancel` fires; in-flight requests get
/// a moment to finish.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let _stop_node_on_exit = cancel.clone().drop_guard();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                debug!(%error, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
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
                        format!("unknown state {v:?} (alive, suspect, failed, left)"),
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
                    format!("unknown parameter {other:?}"),
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
        Err(FindError::Unknown) => error(StatusCode::NOT_FOUND, format!("no peer {key:?}")),
        Err(e @ FindError::Ambiguous) => error(StatusCode::CONFLICT, format!("{key:?}: {e}")),
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
    let rx = api.state.events.subscribe();
    let first = json!({ "type": "subscribed", "at": now_rfc3339() }).to_string() + "\n";
    let cancel = api.cancel.clone();
    let stream = futures::stream::unfold(
        (rx, cancel, Some(first)),
        |(mut rx, cancel, first)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, Infallible>(Bytes::from(first)), (rx, cancel, None)));
            }
            let line = tokio::select! {
                () = cancel.cancelled() => return None,
                got = rx.recv() => match got {
                    Ok(line) => format!("{line}\n"),
                    // This reader fell behind: say how much it missed, go on.
                    Err(RecvError::Lagged(n)) => json!({ "type": "dropped", "at": now_rfc3339(), "count": n }).to_string() + "\n",
                    Err(RecvError::Closed) => return None,
                },
            };
            Some((Ok(Bytes::from(line)), (rx, cancel, None)))
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
                    return error(StatusCode::NOT_FOUND, format!("no peer {key:?}"))
                }
                Err(e) => return error(StatusCode::CONFLICT, format!("{key:?}: {e}")),
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
