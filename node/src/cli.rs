//! The CLI subcommands: thin clients of the control API that render its JSON
//! for people (or print it as is with `--json`).
//!
//! Exit codes: 0 success, 1 the daemon answered with an error, 2 usage,
//! 3 no daemon at the socket.
//!
//! Whatever the daemon says is untrusted text by the time it reaches a
//! terminal (peer names and tags come from the network): every string it
//! sends goes through [`escape`] before it is printed, so control
//! characters (C0, DEL, C1: ESC, `\n`, ...) show as `\x1b`, `\n` and so on
//! and can neither break a table nor rewrite the screen. `--json` output
//! stays JSON, with the same characters as `\u` escapes ([`json_safe`]).

use std::borrow::Cow;
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

/// `s` with every control character (C0, DEL, C1) and the backslash
/// escaped: `\n`, `\r`, `\t`, `\\`, else `\xNN`. Printable text,
/// including non-ASCII, is unchanged.
pub fn escape(s: &str) -> Cow<'_, str> {
    let needs = |c: char| c == '\\' || c.is_control();
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // `char::is_control` is exactly C0, DEL and C1.
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Serialised JSON made safe for a terminal: serde already escapes C0; this
/// escapes DEL and C1 too (as `\u007f`...), which keeps the JSON equal.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    let raw = |c: char| ('\u{7f}'..='\u{9f}').contains(&c);
    if !json.chars().any(raw) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if raw(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The string field `k` of `v`, escaped ("" if absent).
fn text(v: &Value, k: &str) -> String {
    escape(v.get(k).and_then(Value::as_str).unwrap_or("")).into_owned()
}

/// Any value for people: a string escaped, anything else as JSON, escaped.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => escape(s).into_owned(),
        other => escape(&other.to_string()).into_owned(),
    }
}

/// Like [`text`], with `default` when absent.
fn text_or(v: &Value, k: &str, default: &str) -> String {
    escape(v.get(k).and_then(Value::as_str).unwrap_or(default)).into_owned()
}

fn fail(e: ClientError) -> ExitCode {
    eprintln!("constellationd: {}", escape(&e.to_string()));
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
    eprintln!("constellationd: {} ({status})", escape(msg));
    ExitCode::from(EXIT_API)
}

fn print_json(v: &Value) {
    let pretty = serde_json::to_string_pretty(v).unwrap_or_default();
    println!("{}", json_safe(&pretty));
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

/// The first 8 characters of an id, escaped.
fn short(id: &str) -> String {
    let cut = id.char_indices().nth(8).map_or(id, |(i, _)| &id[..i]);
    escape(cut).into_owned()
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
            let s = |k: &str| text(p, k);
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
                        .map(|(k, v)| format!("{}={}", escape(k), escape(v.as_str().unwrap_or(""))))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            [
                s("name"),
                short(p.get("id").and_then(Value::as_str).unwrap_or("")),
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
    let s = |k: &str| text(v, k);
    let c = &v["counters"];
    let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
    let list = |k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(escape)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let ifaces = v["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| format!("{} ({})", text(i, "name"), text(i, "addr")))
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
                    .map(|(k, v)| format!("{}={}", escape(k), shown(v)))
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
        shown(&v["incarnation"]),
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
        shown(&v["ttl"]),
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
        shown(&v["links_up"]),
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
            out.push_str(&format!("  - {}\n", escape(w)));
        }
    }
    out
}

/// One event line for people.
pub fn render_event(v: &Value) -> String {
    let kind = text_or(v, "type", "?");
    let at = v["at"].as_str().unwrap_or("");
    let time = escape(at.get(11..23).unwrap_or(at));
    match kind.as_str() {
        "message" => format!(
            "{time}  message from {} [{}]: {}",
            v["from_name"]
                .as_str()
                .map(|n| escape(n).into_owned())
                .unwrap_or_else(|| text_or(v, "from", "?")),
            text(v, "topic"),
            v["payload"]
                .as_str()
                .map(|p| escape(p).into_owned())
                .unwrap_or_else(|| format!("(binary, base64 {})", text(v, "payload_b64")))
        ),
        "dropped" => format!(
            "{time}  ... {} events dropped (reader too slow)",
            shown(&v["count"])
        ),
        "subscribed" => format!("{time}  watching events (Ctrl-C to stop)"),
        _ => {
            let p = &v["peer"];
            format!(
                "{time}  {kind:<15} {} ({}) {} state={} link={}",
                text_or(p, "name", "?"),
                short(p["id"].as_str().unwrap_or("")),
                text(p, "addr"),
                text(p, "state"),
                text(p, "link")
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
        Command::Ops(c) => crate::cli_ops::run(c).await,
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
                        text_or(&v, "status", "?"),
                        shown(&v["alive_peers"]),
                        shown(&v["min_peers"])
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
            eprintln!("warning: {}", escape(w));
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
        out.push_str(&format!("{:<16}  {role}\n", text_or(k, "fingerprint", "?")));
    }
    out
}

/// The outcome of `send` or `broadcast`, one line per recipient.
pub fn render_results(v: &Value) -> String {
    let results = v["results"].as_array().cloned().unwrap_or_default();
    if results.is_empty() {
        return "no linked peers; nothing sent\n".into();
    }
    let mut out = String::new();
    for r in &results {
        let (name, id) = (
            text_or(r, "name", "?"),
            short(r["id"].as_str().unwrap_or("")),
        );
        out.push_str(&match r["status"].as_str() {
            Some("sent") => format!("sent to {name} ({id})\n"),
            _ => format!("FAILED {name} ({id}): {}\n", text(r, "error")),
        });
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
                print!("{}", render_results(&v));
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
            let line_text = String::from_utf8_lossy(&line[..line.len() - 1]).to_string();
            let mut out = stdout.lock();
            let res = match serde_json::from_str::<Value>(&line_text) {
                // The daemon's line as is (C1 and DEL escaped), or rendered.
                Ok(_) if json => writeln!(out, "{}", json_safe(&line_text)),
                Ok(v) => writeln!(out, "{}", render_event(&v)),
                Err(_) => writeln!(out, "{}", escape(&line_text)),
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

    const EVIL: &str = "evil\x1b[2J\nname\u{9b}31m\x7f\\";
    const SHOWN: &str = "evil\\x1b[2J\\nname\\x9b31m\\x7f\\\\";

    /// No control character at all, except the newlines between lines.
    fn clean(out: &str) -> bool {
        !out.chars().any(|c| c != '\n' && c.is_control())
    }

    #[test]
    fn escape_shows_control_characters_and_keeps_the_rest() {
        assert_eq!(escape(EVIL), SHOWN);
        assert_eq!(escape("tab\there\r"), "tab\\there\\r");
        assert_eq!(escape("\0\u{1}\u{85}"), "\\x00\\x01\\x85");
        assert!(matches!(escape("plain é ☃"), Cow::Borrowed("plain é ☃")));
    }

    #[test]
    fn json_output_escapes_del_and_c1_and_stays_the_same_json() {
        let v = json!({ "name": EVIL });
        let text = serde_json::to_string(&v).unwrap();
        let safe = json_safe(&text);
        assert!(clean(&safe), "{safe}");
        assert_eq!(serde_json::from_str::<Value>(&safe).unwrap(), v);
    }

    #[test]
    fn every_human_rendering_escapes_what_the_daemon_sent() {
        let peer = json!({"id": format!("0123{EVIL}"), "name": EVIL, "state": EVIL, "addr": EVIL,
            "link": EVIL, "rtt_ms": null, "last_seen_ms": 1, "tags": {EVIL: EVIL}});
        let peers = render_peers(&json!({ "peers": [peer.clone()] }), false);
        assert_eq!(peers.lines().count(), 2, "{peers}");
        assert!(clean(&peers) && peers.contains(SHOWN), "{peers}");

        let status = render_status(&json!({
            "name": EVIL, "id": EVIL, "cluster": EVIL, "addresses": [EVIL], "listen": EVIL,
            "interfaces": [{"name": EVIL, "addr": EVIL}], "group": EVIL, "ttl": EVIL,
            "incarnation": EVIL, "links_up": EVIL,
            "counters": {"beacons_dropped": {EVIL: 1}, "links_refused": {EVIL: EVIL}},
            "warnings": [EVIL],
        }));
        assert!(clean(&status) && status.contains(SHOWN), "{status}");

        for ev in [
            json!({"type": "peer_joined", "at": EVIL, "peer": peer}),
            json!({"type": EVIL, "at": "2024-01-01T00:00:00.000000Z", "peer": peer}),
            json!({"type": "message", "at": EVIL, "from_name": EVIL, "topic": EVIL, "payload": EVIL}),
            json!({"type": "message", "from": EVIL, "payload": null, "payload_b64": EVIL}),
            json!({"type": "dropped", "count": EVIL}),
        ] {
            let line = render_event(&ev);
            assert!(clean(&line) && line.contains(SHOWN), "{line}");
        }

        let keys = render_keys(&json!({"keys": [{"fingerprint": EVIL, "primary": true}]}));
        assert!(clean(&keys) && keys.contains(SHOWN), "{keys}");

        let sent = render_results(&json!({"results": [
            {"id": EVIL, "name": EVIL, "status": "sent"},
            {"id": EVIL, "name": EVIL, "status": "failed", "error": EVIL},
        ]}));
        assert_eq!(sent.lines().count(), 2, "{sent}");
        assert!(clean(&sent) && sent.contains(SHOWN), "{sent}");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(urlencode("role:db x"), "role%3Adb%20x");
    }
}
