//! Automation subcommands: `tags` (runtime tags), `query` (ask matching
//! nodes and print their answers as they arrive) and `remove` (force-leave).
//! Clients of `/v1/self/tags`, `/v1/queries` and `/v1/peers/{id}/remove`.
//!
//! Exit codes as for every CLI subcommand: 0 success, 1 the daemon answered
//! with an error, 2 usage, 3 no daemon at the socket.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Subcommand;
use http_body_util::BodyExt;
use hyper::Method;
use proto::control::{
    ClusterKeys, KeyRequest, NodeRef, QueryLine, QueryRequest, RemoveRequest, Removed, TagsInfo,
    TagsRequest,
};

use crate::cli::{client, esc, escape, fail, json_safe, show, EXIT_API, EXIT_USAGE};
use crate::config::{parse_tag, KeysAction, SocketArg};

/// The automation subcommands (flattened into [`crate::config::Command`]).
#[derive(Debug, Subcommand)]
pub enum AutoCommand {
    /// Show this node's tags, or change them now (no restart).
    ///
    /// Peers see the change as `peer_updated` within milliseconds. With
    /// --state-dir, changes are kept there (tags.json) and laid over the
    /// configured --tag values at the next start.
    #[command(
        after_help = "Examples:\n  constellationd tags\n  constellationd tags set role=db zone=b\n  constellationd tags delete zone"
    )]
    Tags {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// What to do (nothing: list them).
        #[command(subcommand)]
        action: Option<TagsAction>,
        /// Print the API's JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Ask the matching nodes (this one included) and print their acks
    /// and answers as they arrive, then a summary at the timeout.
    ///
    /// Each matching node acks at once; it answers when a local program
    /// following /v1/events (a `query` event) posts an answer to
    /// /v1/queries/{id}/responses. Exit 0 when the query ran, whatever
    /// was answered.
    #[command(
        after_help = "Examples:\n  constellationd query load --tag role=db --timeout 500ms\n  echo report | constellationd query disk - --node n2 --node n3 --json"
    )]
    Query {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Query name (answerers follow names).
        name: String,
        /// Payload; `-` reads standard input; absent: empty.
        payload: Option<String>,
        /// Only this node (name or id); repeatable.
        #[arg(long = "node", value_name = "NODE")]
        nodes: Vec<String>,
        /// Only nodes with this tag (KEY=VALUE, exact); repeatable.
        #[arg(long, value_parser = parse_tag)]
        tag: Vec<(String, String)>,
        /// How long to wait for answers (`500ms`, `2s`).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the API's NDJSON lines as they arrive.
        #[arg(long)]
        json: bool,
    },
    /// Force-leave: mark a failed peer `left` on every node at once
    /// (refused for a peer that is alive).
    #[command(
        after_help = "Examples:\n  constellationd remove node4\n  constellationd remove node4 --prune   # drop its tombstone everywhere"
    )]
    Remove {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// The peer (name, id, or id prefix of 8+ digits).
        node: String,
        /// Drop its tombstone at once instead of keeping it `left`.
        #[arg(long)]
        prune: bool,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `constellationd tags ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum TagsAction {
    /// Add or change tags.
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true, value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Remove tags (absent keys are ignored).
    Delete {
        /// Keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

/// Runs an automation subcommand.
pub async fn run(cmd: AutoCommand) -> ExitCode {
    match cmd {
        AutoCommand::Tags { sock, action, json } => tags(&sock, action, json).await,
        AutoCommand::Remove {
            sock,
            node,
            prune,
            json,
        } => remove(&sock, &node, prune, json).await,
        AutoCommand::Query {
            sock,
            name,
            payload,
            nodes,
            tag,
            timeout,
            json,
        } => {
            let payload = match payload.as_deref() {
                Some("-") => {
                    let mut buf = Vec::new();
                    if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
                        eprintln!("constellationd: cannot read standard input: {e}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                    buf
                }
                Some(p) => p.as_bytes().to_vec(),
                None => Vec::new(),
            };
            let (payload, payload_b64) = match String::from_utf8(payload) {
                Ok(t) => (Some(t), None),
                Err(e) => (
                    None,
                    Some(base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        e.into_bytes(),
                    )),
                ),
            };
            let req = QueryRequest {
                name,
                payload,
                payload_b64,
                nodes,
                tags: tag.into_iter().collect(),
                timeout_ms: Some(timeout.as_millis().max(1) as u64),
            };
            query(&sock, &req, json).await
        }
    }
}

async fn tags(sock: &SocketArg, action: Option<TagsAction>, json: bool) -> ExitCode {
    let c = client(sock);
    let req = match action {
        None => return show(c.get("/v1/self/tags").await, json, render_tags),
        Some(TagsAction::Set { tags }) => TagsRequest {
            set: tags.into_iter().collect(),
            delete: Vec::new(),
        },
        Some(TagsAction::Delete { keys }) => TagsRequest {
            set: Default::default(),
            delete: keys,
        },
    };
    let answer = c.send(Method::PATCH, "/v1/self/tags", Some(&req)).await;
    show(answer, json, |v: &TagsInfo| {
        let mut out = match (v.changed, v.sent_to) {
            (Some(false), _) => "unchanged\n".to_string(),
            (_, Some(n)) => format!(
                "changed (version {}), sent to {n} linked peers\n",
                v.version
            ),
            _ => String::new(),
        };
        out.push_str(&render_tags(v));
        if let Some(w) = &v.warning {
            out.push_str(&format!("warning: {}\n", escape(w)));
        }
        out
    })
}

/// Tags one per line, `KEY=VALUE`, escaped.
pub fn render_tags(v: &TagsInfo) -> String {
    if v.tags.is_empty() {
        return "(no tags)\n".into();
    }
    v.tags
        .iter()
        .map(|(k, val)| format!("{}={}\n", escape(k), escape(val)))
        .collect()
}

fn who(n: &NodeRef) -> String {
    if n.name.is_empty() {
        esc(&n.id)
    } else {
        esc(&n.name)
    }
}

/// One stream line for people.
pub fn render_query_line(line: &QueryLine) -> String {
    match line {
        QueryLine::Asked { id, asked } => format!(
            "query {} asked {} nodes: {}",
            escape(id),
            asked.len(),
            asked.iter().map(who).collect::<Vec<_>>().join(", ")
        ),
        QueryLine::Ack { from } => format!("ack     {}", who(from)),
        QueryLine::Answer {
            from,
            payload,
            payload_b64,
        } => match payload {
            Some(p) => format!(
                "answer  {}: {}",
                who(from),
                escape(p.trim_end_matches('\n'))
            ),
            None => format!("answer  {} (base64): {}", who(from), escape(payload_b64)),
        },
        QueryLine::Done {
            asked,
            acked,
            answered,
            timed_out,
        } => {
            let mut s = format!(
                "asked {asked}, acked {acked}, answered {answered}, timed out {}",
                timed_out.len()
            );
            if !timed_out.is_empty() {
                s.push_str(": ");
                s.push_str(&timed_out.iter().map(who).collect::<Vec<_>>().join(", "));
            }
            s
        }
    }
}

async fn query(sock: &SocketArg, req: &QueryRequest, json: bool) -> ExitCode {
    let c = client(sock);
    let body = match serde_json::to_vec(req) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            eprintln!("constellationd: request not encoded: {e}");
            return ExitCode::from(EXIT_API);
        }
    };
    let resp = match c.request(Method::POST, "/v1/queries", body).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let msg = serde_json::from_slice::<proto::control::ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| "request failed".into());
        eprintln!("constellationd: {} ({status})", escape(&msg));
        return ExitCode::from(EXIT_API);
    }
    let mut pending = Vec::new();
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            eprintln!("constellationd: the query stream broke");
            return ExitCode::from(EXIT_API);
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).to_string();
            let shown = if json {
                json_safe(&text).into_owned()
            } else {
                match serde_json::from_str::<QueryLine>(&text) {
                    Ok(l) => render_query_line(&l),
                    Err(_) => esc(&text),
                }
            };
            let mut out = stdout.lock();
            if writeln!(out, "{shown}").and_then(|()| out.flush()).is_err() {
                return ExitCode::SUCCESS; // stdout closed
            }
        }
    }
    ExitCode::SUCCESS
}

/// `keys list|install|use|remove --cluster`: the operation on every node,
/// over the links; prints `n/N nodes` and each failure with its reason.
/// Exit 1 when any node failed.
pub async fn cluster_keys(sock: &SocketArg, action: KeysAction) -> ExitCode {
    let c = client(sock);
    let edit = |key: &String| KeyRequest { key: key.clone() };
    let (answer, json, verb) = match &action {
        KeysAction::List { json } => (c.get("/v1/cluster/keys").await, *json, "listed"),
        KeysAction::Install { key } => (
            c.post("/v1/cluster/keys", Some(&edit(key))).await,
            false,
            "installed",
        ),
        KeysAction::Use { key } => (
            c.post("/v1/cluster/keys/use", Some(&edit(key))).await,
            false,
            "now primary",
        ),
        KeysAction::Remove { key } => (
            c.post("/v1/cluster/keys/remove", Some(&edit(key))).await,
            false,
            "removed",
        ),
    };
    let all_ok = match &answer {
        Ok(a) => a
            .parse::<ClusterKeys>()
            .map(|k| k.ok == k.nodes)
            .unwrap_or(true),
        Err(_) => true,
    };
    let code = show(answer, json, |v: &ClusterKeys| render_cluster_keys(v, verb));
    if code == ExitCode::SUCCESS && !all_ok {
        return ExitCode::from(EXIT_API);
    }
    code
}

/// `n/N nodes`, the failures, then the keys with where they are held.
pub fn render_cluster_keys(v: &ClusterKeys, verb: &str) -> String {
    let mut out = format!("{verb} on {}/{} nodes\n", v.ok, v.nodes);
    for r in v.results.iter().filter(|r| !r.ok) {
        out.push_str(&format!(
            "  failed: {}: {}\n",
            who(&r.node),
            escape(r.error.as_deref().unwrap_or("unknown"))
        ));
    }
    if !v.keys.is_empty() {
        out.push_str("FINGERPRINT       NODES  PRIMARY ON\n");
        for k in &v.keys {
            let primary = if k.primary_on.is_empty() {
                "-".to_string()
            } else {
                k.primary_on
                    .iter()
                    .map(|n| esc(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push_str(&format!(
                "{:<16}  {:>2}/{:<3} {primary}\n",
                escape(&k.fingerprint),
                k.nodes,
                v.nodes
            ));
        }
    }
    out
}

async fn remove(sock: &SocketArg, node: &str, prune: bool, json: bool) -> ExitCode {
    let c = client(sock);
    let uri = format!("/v1/peers/{}/remove", proto::control::urlencode(node));
    let answer = c.post(&uri, Some(&RemoveRequest { prune })).await;
    let all_ok = match &answer {
        Ok(a) => a
            .parse::<Removed>()
            .map(|r| r.ok == r.nodes)
            .unwrap_or(true),
        Err(_) => true,
    };
    let code = show(answer, json, |v: &Removed| {
        let mut out = format!(
            "{} {} on {}/{} nodes\n",
            who(&v.peer),
            if v.prune { "pruned" } else { "marked left" },
            v.ok,
            v.nodes
        );
        for r in v.results.iter().filter(|r| !r.ok) {
            out.push_str(&format!(
                "  failed: {}: {}\n",
                who(&r.node),
                escape(r.error.as_deref().unwrap_or("unknown"))
            ));
        }
        out
    });
    if code == ExitCode::SUCCESS && !all_ok {
        return ExitCode::from(EXIT_API);
    }
    code
}
