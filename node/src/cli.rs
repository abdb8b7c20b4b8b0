//! The CLI subcommands: thin clients of the control API that render its JSON
//! for people (or print it as is with `--json`).
//!
//! Exit codes: 0 success, 1 the daemon answered with an error, 2 usage,
//! 3 no daemon at the socket.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::config::{Command, KeysAction, SocketArg};
use crate::socket;

/// Exit code: the daemon answered with an error.
pub const EXIT_API: u8 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no daemon at the socket.
pub const EXIT_NO_DAEMON: u8 = 3;

fn client(sock: &SocketArg) -> Client {
    Client::new(&socket::resolve(sock.socket.as_deref()))
}

fn fail(e: ClientError) -> ExitCode {
    eprintln!("constellationd: {e}");
    match e {
        ClientError::NoDaemon { .. } => ExitCode::from(EXIT_NO_DAEMON),
        ClientError::Http { .. } => ExitCode::from(EXIT_API),
    }
}

fn api_error(status: StatusCode, v: &Value) -> ExitCode {
    let msg = v
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("request failed");
    eprintln!("constellationd: {msg} ({status})");
    ExitCode::from(EXIT_API)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Whether to colour output: a terminal, and `NO_COLOR` unset.
fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn paint(text: &str, state: &str, on: bool) -> String {
    if !on {
        return text.to_string();
    }
    let code = match state {
        "alive" | "up" => "32",
        "failed" | "down" => "31",
        "left" | "suspect" | "connecting" | "conflict" => "33",
        _ => return text.to_string(),
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// `1234` ms -> `1.2s`, and so on.
pub fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
        _ => format!("{}h{}m", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Renders the peers table (sorted by name by the API).
pub fn render_peers(v: &Value, colour: bool) -> String {
    let peers = v
        .get("peers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let header = [
        "NAME",
        "ID",
        "STATE",
        "ADDRESS",
        "LINK",
        "RTT",
        "LAST-SEEN",
        "TAGS",
    ];
    let rows: Vec<[String; 8]> = peers
        .iter()
        .map(|p| {
            let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let state = if p.get("conflict").is_some_and(|c| !c.is_null()) {
                format!("{} (conflict)", s("state"))
            } else if p.get("degraded") == Some(&Value::Bool(true)) {
                format!("{} (degraded)", s("state"))
            } else {
                s("state")
            };
            let rtt = p
                .get("rtt_ms")
                .and_then(Value::as_f64)
                .map(|r| format!("{r:.2}ms"))
                .unwrap_or_else(|| "-".into());
            let seen = p
                .get("last_seen_ms")
                .and_then(Value::as_u64)
                .map(human_ms)
                .unwrap_or_default();
            let tags = p
                .get("tags")
                .and_then(Value::as_object)
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            [
                s("name"),
                short(&s("id")).to_string(),
                state,
                s("addr"),
                s("link"),
                rtt,
                seen,
                tags,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: [String; 8], colour: bool| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            let padded = if i + 1 == cells.len() {
                c.clone()
            } else {
                format!("{c:<w$}  ")
            };
            let key = c.split_whitespace().next().unwrap_or("");
            l.push_str(&if i == 2 || i == 4 {
                paint(&padded, key, colour)
            } else {
                padded
            });
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.map(String::from), false));
    for r in rows {
        out.push_str(&line(r, colour));
    }
    if peers.is_empty() {
        out.push_str("(no peers yet)\n");
    }
    out
}

fn render_status(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let c = &v["counters"];
    let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
    let list = |k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let ifaces = v["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    format!(
                        "{} ({})",
                        i["name"].as_str().unwrap_or(""),
                        i["addr"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let peers = &v["peers"];
    let pc = |k: &str| peers.get(k).and_then(Value::as_u64).unwrap_or(0);
    let drops = |k: &str| {
        c.get(k)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "none".into())
    };
    let mut out = format!(
        "name:        {} (id {}, incarnation {})\n\
         cluster:     {} ({})\n\
         addresses:   {}\n\
         listen:      {}\n\
         interfaces:  {}\n\
         group:       {} ttl {}\n\
         multicast loops back: {}\n\
         uptime:      {}\n\
         peers:       alive {}, suspect {}, failed {}, left {}; links up {}\n\
         beacons:     sent {}, received {}, replies sent {}; dropped: {}\n\
         links:       established {}, dials {}, failed dials {}; refused: {}\n\
         frames:      in {}, out {}; messages in {}, out {}\n",
        s("name"),
        s("id"),
        v["incarnation"],
        s("cluster"),
        if v["secured"].as_bool() == Some(true) {
            "secured: beacons and links authenticated and encrypted"
        } else {
            "no cluster secret: plaintext"
        },
        list("addresses"),
        s("listen"),
        ifaces,
        s("group"),
        v["ttl"],
        if v["multicast_loops_back"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        },
        human_ms(v["uptime_ms"].as_u64().unwrap_or(0)),
        pc("alive"),
        pc("suspect"),
        pc("failed"),
        pc("left"),
        v["links_up"],
        n("beacons_sent"),
        n("beacons_received"),
        n("replies_sent"),
        drops("beacons_dropped"),
        n("links_established"),
        n("dials"),
        n("dial_failures"),
        drops("links_refused"),
        n("frames_in"),
        n("frames_out"),
        n("messages_in"),
        n("messages_out"),
    );
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if warnings.is_empty() {
        out.push_str("warnings:    none\n");
    } else {
        out.push_str("warnings:\n");
        for w in warnings {
            out.push_str(&format!("  - {w}\n"));
        }
    }
    out
}

/// One event line for people.
pub fn render_event(v: &Value) -> String {
    let kind = v["type"].as_str().unwrap_or("?");
    let at = v["at"].as_str().unwrap_or("");
    let time = at.get(11..23).unwrap_or(at);
    match kind {
        "message" => format!(
            "{time}  message from {} [{}]: {}",
            v["from_name"]
                .as_str()
                .unwrap_or_else(|| v["from"].as_str().unwrap_or("?")),
            v["topic"].as_str().unwrap_or(""),
            v["payload"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!(
                    "(binary, base64 {})",
                    v["payload_b64"].as_str().unwrap_or("")
                ))
        ),
        "dropped" => format!(
            "{time}  ... {} events dropped (reader too slow)",
            v["count"]
        ),
        "subscribed" => format!("{time}  watching events (Ctrl-C to stop)"),
        _ => {
            let p = &v["peer"];
            format!(
                "{time}  {kind:<15} {} ({}) {} state={} link={}",
                p["name"].as_str().unwrap_or("?"),
                short(p["id"].as_str().unwrap_or("")),
                p["addr"].as_str().unwrap_or(""),
                p["state"].as_str().unwrap_or(""),
                p["link"].as_str().unwrap_or("")
            )
        }
    }
}

fn read_message(message: Option<String>) -> Result<String, ExitCode> {
    match message.as_deref() {
        Some(m) if m != "-" => Ok(m.to_string()),
        _ => {
            let mut buf = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut buf) {
                eprintln!("constellationd: cannot read the message from standard input: {e}");
                return Err(ExitCode::from(EXIT_USAGE));
            }
            Ok(buf)
        }
    }
}

/// Runs a client subcommand.
pub fn main(cmd: Command) -> ExitCode {
    let rt = match crate::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("constellationd: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_API);
        }
    };
    rt.block_on(run(cmd))
}

async fn run(cmd: Command) -> ExitCode {
    match cmd {
        Command::Run(_) | Command::Keygen => unreachable!("handled in main"),
        Command::Keys { sock, action } => keys(&sock, action).await,
        Command::Peers {
            sock,
            json,
            state,
            tag,
        } => {
            let mut q: Vec<String> = Vec::new();
            if let Some(s) = state {
                q.push(format!("state={}", urlencode(&s)));
            }
            for (k, v) in tag {
                q.push(format!("tag={}", urlencode(&format!("{k}:{v}"))));
            }
            let uri = if q.is_empty() {
                "/v1/peers".to_string()
            } else {
                format!("/v1/peers?{}", q.join("&"))
            };
            show(&sock, Method::GET, &uri, None, json, |v| {
                render_peers(v, colour())
            })
            .await
        }
        Command::Status { sock, json } => {
            show(&sock, Method::GET, "/v1/self", None, json, render_status).await
        }
        Command::Watch { sock, json } => watch(&client(&sock), json).await,
        Command::Send {
            sock,
            node,
            topic,
            message,
            json,
        } => send(&sock, Value::from(node), topic, message, json).await,
        Command::Broadcast {
            sock,
            topic,
            message,
            json,
        } => send(&sock, Value::Null, topic, message, json).await,
        Command::Leave { sock } => {
            match client(&sock).json(Method::POST, "/v1/leave", None).await {
                Err(e) => fail(e),
                Ok((st, v)) if !st.is_success() => api_error(st, &v),
                Ok(_) => {
                    println!("leaving the cluster");
                    ExitCode::SUCCESS
                }
            }
        }
        Command::Health { sock, min_peers } => {
            let uri = format!("/v1/health?min_peers={min_peers}");
            match client(&sock).json(Method::GET, &uri, None).await {
                Err(e) => fail(e),
                Ok((st, v)) if st == StatusCode::OK || st == StatusCode::SERVICE_UNAVAILABLE => {
                    println!(
                        "{}: {} of {} alive peers",
                        v["status"].as_str().unwrap_or("?"),
                        v["alive_peers"],
                        v["min_peers"]
                    );
                    if st == StatusCode::OK {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_API)
                    }
                }
                Ok((st, v)) => api_error(st, &v),
            }
        }
    }
}

/// `keys list|install|use|remove`.
async fn keys(sock: &SocketArg, action: KeysAction) -> ExitCode {
    let (method, uri, body, json_out) = match &action {
        KeysAction::List { json } => (Method::GET, "/v1/keys", None, *json),
        KeysAction::Install { key } => {
            (Method::POST, "/v1/keys", Some(json!({ "key": key })), false)
        }
        KeysAction::Use { key } => (
            Method::POST,
            "/v1/keys/use",
            Some(json!({ "key": key })),
            false,
        ),
        KeysAction::Remove { key } => (
            Method::POST,
            "/v1/keys/remove",
            Some(json!({ "key": key })),
            false,
        ),
    };
    show(sock, method, uri, body, json_out, |v| {
        let done = match (&action, v["changed"].as_bool()) {
            (KeysAction::List { .. }, _) => "",
            (KeysAction::Install { .. }, Some(false)) => "already installed\n",
            (KeysAction::Install { .. }, _) => "installed\n",
            (KeysAction::Use { .. }, Some(false)) => "already primary\n",
            (KeysAction::Use { .. }, _) => "now primary\n",
            (KeysAction::Remove { .. }, _) => "removed\n",
        };
        if let Some(w) = v["warning"].as_str() {
            eprintln!("warning: {w}");
        }
        format!("{done}{}", render_keys(v))
    })
    .await
}

/// One request, its answer printed: the API's JSON with `--json`, else what
/// `render` makes of it for people.
async fn show(
    sock: &SocketArg,
    method: Method,
    uri: &str,
    body: Option<Value>,
    json: bool,
    render: impl FnOnce(&Value) -> String,
) -> ExitCode {
    match client(sock).json(method, uri, body).await {
        Err(e) => fail(e),
        Ok((st, v)) if !st.is_success() => api_error(st, &v),
        Ok((_, v)) if json => {
            print_json(&v);
            ExitCode::SUCCESS
        }
        Ok((_, v)) => {
            print!("{}", render(&v));
            ExitCode::SUCCESS
        }
    }
}

/// The keyring as a table: fingerprint and role.
pub fn render_keys(v: &Value) -> String {
    let mut out = String::from("FINGERPRINT       ROLE\n");
    for k in v["keys"].as_array().into_iter().flatten() {
        let role = if k["primary"].as_bool() == Some(true) {
            "primary (seals, accepts)"
        } else {
            "accepts"
        };
        out.push_str(&format!(
            "{:<16}  {role}\n",
            k["fingerprint"].as_str().unwrap_or("?")
        ));
    }
    out
}

/// `send` and `broadcast`: `to` is a peer, or null for every linked peer.
async fn send(
    sock: &SocketArg,
    to: Value,
    topic: String,
    message: Option<String>,
    json: bool,
) -> ExitCode {
    let payload = match read_message(message) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let body = json!({ "to": to, "topic": topic, "payload": payload });
    match client(sock)
        .json(Method::POST, "/v1/messages", Some(body))
        .await
    {
        Err(e) => fail(e),
        Ok((st, v)) if v.get("error").is_some() => api_error(st, &v),
        Ok((st, v)) => {
            if json {
                print_json(&v);
            } else {
                let results = v["results"].as_array().cloned().unwrap_or_default();
                if results.is_empty() {
                    println!("no linked peers; nothing sent");
                }
                for r in &results {
                    match r["status"].as_str() {
                        Some("sent") => println!(
                            "sent to {} ({})",
                            r["name"].as_str().unwrap_or("?"),
                            short(r["id"].as_str().unwrap_or(""))
                        ),
                        _ => println!(
                            "FAILED {} ({}): {}",
                            r["name"].as_str().unwrap_or("?"),
                            short(r["id"].as_str().unwrap_or("")),
                            r["error"].as_str().unwrap_or("")
                        ),
                    }
                }
            }
            if st.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_API)
            }
        }
    }
}

async fn watch(client: &Client, json: bool) -> ExitCode {
    let resp = match client.request(Method::GET, "/v1/events", None).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if !resp.status().is_success() {
        eprintln!(
            "constellationd: the daemon refused the event stream ({})",
            resp.status()
        );
        return ExitCode::from(EXIT_API);
    }
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let stdout = std::io::stdout();
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        };
        let Some(frame) = frame else {
            eprintln!("constellationd: the daemon closed the event stream");
            return ExitCode::SUCCESS;
        };
        let Ok(frame) = frame else {
            eprintln!("constellationd: the event stream broke");
            return ExitCode::from(EXIT_API);
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).to_string();
            let mut out = stdout.lock();
            let res = if json {
                writeln!(out, "{text}")
            } else {
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) => writeln!(out, "{}", render_event(&v)),
                    Err(_) => writeln!(out, "{text}"),
                }
            };
            if res.and_then(|()| out.flush()).is_err() {
                return ExitCode::SUCCESS; // stdout closed (e.g. piped into head)
            }
        }
    }
}

/// Percent-encodes a query value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_human() {
        assert_eq!(human_ms(5), "5ms");
        assert_eq!(human_ms(1500), "1.5s");
        assert_eq!(human_ms(125_000), "2m5s");
        assert_eq!(human_ms(7_500_000), "2h5m");
    }

    #[test]
    fn peers_table_is_aligned_and_plain_without_colour() {
        let v = json!({"peers": [
            {"id": "0123456789abcdef0123456789abcdef", "name": "a", "state": "alive", "addr": "127.0.0.1:1", "link": "up", "rtt_ms": 0.25, "last_seen_ms": 20, "tags": {"role": "db"}},
            {"id": "fedcba9876543210fedcba9876543210", "name": "longer-name", "state": "failed", "addr": "127.0.0.1:22", "link": "down", "rtt_ms": null, "last_seen_ms": 4000, "tags": {}}
        ]});
        let out = render_peers(&v, false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NAME         ID        STATE"),
            "{out}"
        );
        assert!(
            lines[1].contains("01234567")
                && lines[1].contains("role=db")
                && lines[1].contains("0.25ms")
        );
        assert!(lines[2].contains("4.0s") && lines[2].contains(" - "));
        assert!(!out.contains('\x1b'));
        assert_eq!(lines[1].find("01234567"), lines[2].find("fedcba98"));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(urlencode("role:db x"), "role%3Adb%20x");
    }
}
