//! Operations routes of the control API: the log level and format, and the
//! log monitor. Merged into [`crate::api::router`], so the same limits
//! (request deadline, body bound, connection bound) apply.
//!
//! - `GET /v1/log-level`: `{"level", "filter", "format", "monitors",
//!   "monitor_lines_dropped"}`.
//! - `PUT /v1/log-level` with `{"level": "debug"}` and/or
//!   `{"format": "json"}`: changes them now (until the next restart, or a
//!   reload whose file changes them); answers like `GET`.
//! - `GET /v1/monitor?level=debug` (default `info`): the node's log lines
//!   as they happen, one JSON object per line (`timestamp`, `level`,
//!   `fields`, `target`), after a first `{"type": "subscribed"}` line. A
//!   monitor that reads too slowly loses lines, and reads
//!   `{"type": "dropped", "count": N}` in their place; it never slows the
//!   node. The level is the monitor's own: `debug` lines are streamed even
//!   when the node logs at `info`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::api::quote;
use crate::logging::{LogControl, LogFormat, LogLevel, MonitorItem};
use crate::state::{now_rfc3339, NodeState};

#[derive(Clone)]
struct Ops {
    log: Option<LogControl>,
    cancel: CancellationToken,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// The operations routes, for any router state (they carry their own).
pub fn router<S>(state: Arc<NodeState>, cancel: CancellationToken) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let ops = Ops {
        log: state.log.clone(),
        cancel,
    };
    Router::new()
        .route("/v1/log-level", get(get_log_level).put(put_log_level))
        .route("/v1/monitor", get(get_monitor))
        .with_state(ops)
}

fn no_control() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this node runs without log control (embedded in another process)",
    )
}

fn level_json(log: &LogControl) -> Value {
    json!({
        "level": log.level().to_string().to_lowercase(),
        "filter": log.filter(),
        "format": log.format().as_str(),
        "monitors": log.hub().subscribers(),
        "monitor_lines_dropped": log.hub().dropped(),
    })
}

async fn get_log_level(State(ops): State<Ops>) -> Response {
    match &ops.log {
        Some(log) => Json(level_json(log)).into_response(),
        None => no_control(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelChange {
    level: Option<String>,
    format: Option<String>,
}

async fn put_log_level(State(ops): State<Ops>, body: Result<Bytes, BytesRejection>) -> Response {
    let Some(log) = &ops.log else {
        return no_control();
    };
    let body = match body {
        Ok(b) => b,
        Err(rej) => return error(rej.status(), rej.body_text()),
    };
    let change: LevelChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"level\": \"debug\"}} and/or {{\"format\": \"json\"}}: {e}"),
            )
        }
    };
    let level = match change.level.as_deref().map(str::parse::<LogLevel>) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown level {} (error, warn, info, debug, trace)",
                    quote(change.level.as_deref().unwrap_or(""))
                ),
            )
        }
    };
    let format = match change.format.as_deref() {
        None => None,
        Some("text") => Some(LogFormat::Text),
        Some("json") => Some(LogFormat::Json),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown format {} (text, json)", quote(other)),
            )
        }
    };
    if level.is_none() && format.is_none() {
        return error(StatusCode::BAD_REQUEST, "give \"level\" and/or \"format\"");
    }
    let before = log.filter();
    if let Some(level) = level {
        if let Err(e) = log.set_level(level) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    }
    if let Some(format) = format {
        log.set_format(format);
    }
    tracing::info!(
        from = %before,
        to = %log.filter(),
        format = log.format().as_str(),
        "log level changed over the control socket"
    );
    Json(level_json(log)).into_response()
}

async fn get_monitor(
    State(ops): State<Ops>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Some(log) = &ops.log else {
        return no_control();
    };
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "malformed query string");
    };
    let mut level = LogLevel::Info;
    for (k, v) in q {
        match (k.as_str(), v.parse::<LogLevel>()) {
            ("level", Ok(l)) => level = l,
            ("level", Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown level {} (error, warn, info, debug, trace)",
                        quote(&v)
                    ),
                )
            }
            (other, _) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {}", quote(other)),
                )
            }
        }
    }
    // Dropping the stream (client gone, node stopping) drops the
    // subscription and its backlog.
    let sub = log.hub().subscribe(level);
    let first = json!({ "type": "subscribed", "at": now_rfc3339(), "level": level.as_str() })
        .to_string()
        + "\n";
    let stream = futures::stream::unfold(
        (sub, ops.cancel.clone(), Some(first)),
        |(sub, cancel, first)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, Infallible>(Bytes::from(first)), (sub, cancel, None)));
            }
            let line = tokio::select! {
                () = cancel.cancelled() => return None,
                item = sub.next() => match item {
                    MonitorItem::Line(line) => line,
                    MonitorItem::Dropped(n) => Bytes::from(
                        json!({ "type": "dropped", "at": now_rfc3339(), "count": n }).to_string() + "\n",
                    ),
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
