//! The CLI subcommands: thin clients of the control API that render its
//! answers for people (or print its JSON as is with `--json`). Answers are
//! read as the [`proto::control`] types the daemon writes, so the two cannot
//! disagree on a field name.
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
use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use hyper::{Method, StatusCode};
use proto::control::{
    Event, EventBody, Health, HealthQuery, KeyRequest, Keys, NodeInfo, PeerList, PeersQuery,
    SendRequest, SendResults, SendStatus,
};
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::client::{Answer, Client, ClientError};
use crate::config::{Command, KeysAction, SocketArg};
use crate::socket;

/// Exit code: the daemon answered with an error.
pub const EXIT_API: u8 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no daemon at the socket.
pub const EXIT_NO_DAEMON: u8 = 3;

pub(crate) fn client(sock: &SocketArg) -> Client {
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

pub(crate) fn fail(e: ClientError) -> ExitCode {
    eprintln!("constellationd: {}", escape(&e.to_string()));
    match e {
        ClientError::NoDaemon { .. } => ExitCode::from(EXIT_NO_DAEMON),
        ClientError::Http { .. } => ExitCode::from(EXIT_API),
    }
}

/// An error answer: its message on stderr, exit 1.
pub(crate) fn api_error(answer: &Answer) -> ExitCode {
    let msg = answer.error_message();
    eprintln!("constellationd: {} ({})", escape(&msg), answer.status);
    ExitCode::from(EXIT_API)
}

/// `--json`: the daemon's answer as it sent it, pretty-printed.
pub(crate) fn print_json(answer: &Answer) -> ExitCode {
    match answer.json() {
        Ok(v) => {
            let pretty = serde_json::to_string_pretty(&v).unwrap_or_default();
            println!("{}", json_safe(&pretty));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `s`, escaped, as an owned string.
pub(crate) fn esc(s: &str) -> String {
    escape(s).into_owned()
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
pub(crate) fn short(id: &str) -> String {
    let cut = id.char_indices().nth(8).map_or(id, |(i, _)| &id[..i]);
    escape(cut).into_owned()
}

/// Renders the peers table (sorted by name by the API).
pub fn render_peers(list: &PeerList, colour: bool) -> String {
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
    let rows: Vec<[String; 8]> = list
        .peers
        .iter()
        .map(|e| {
            let p = &e.peer;
            let state = if p.conflict.is_some() {
                format!("{} (conflict)", esc(&p.state))
            } else if p.degraded {
                format!("{} (degraded)", esc(&p.state))
            } else {
                esc(&p.state)
            };
            let rtt = p
                .rtt_ms
                .map(|r| format!("{r:.2}ms"))
                .unwrap_or_else(|| "-".into());
            let tags = p
                .tags
                .iter()
                .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
                .collect::<Vec<_>>()
                .join(",");
            [
                esc(&p.name),
                short(&p.id),
                state,
                esc(&p.addr),
                esc(&p.link),
                rtt,
                human_ms(p.last_seen_ms),
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
    if list.peers.is_empty() {
        out.push_str("(no peers yet)\n");
    }
    out
}

/// `k=v, ...` of a count map, escaped (`none` when empty).
fn counts(m: &proto::control::Counts) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{}={v}", escape(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn render_status(v: &NodeInfo) -> String {
    let c = &v.counters;
    let list = |a: &[String]| a.iter().map(|s| escape(s)).collect::<Vec<_>>().join(", ");
    let ifaces = v
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", escape(&i.name), escape(&i.addr)))
        .collect::<Vec<_>>()
        .join(", ");
    let pc = |k: &str| v.peers.get(k).copied().unwrap_or(0);
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
        esc(&v.name),
        esc(&v.id),
        v.incarnation,
        esc(&v.cluster),
        if v.secured {
            "secured: beacons and links authenticated and encrypted"
        } else {
            "no cluster secret: plaintext"
        },
        list(&v.addresses),
        esc(&v.listen),
        ifaces,
        esc(&v.group),
        v.ttl,
        if v.multicast_loops_back { "yes" } else { "no" },
        human_ms(v.uptime_ms),
        pc("alive"),
        pc("suspect"),
        pc("failed"),
        pc("left"),
        v.links_up,
        c.beacons_sent,
        c.beacons_received,
        c.replies_sent,
        counts(&c.beacons_dropped),
        c.links_established,
        c.dials,
        c.dial_failures,
        counts(&c.links_refused),
        c.frames_in,
        c.frames_out,
        c.messages_in,
        c.messages_out,
    );
    let q = &c.queries;
    if q.asked + q.delivered + q.duplicates + q.oversize + q.dropped > 0 {
        out.push_str(&format!(
            "queries:     asked {}, received {}, answered {}; dropped: duplicates {}, oversize {}, late {}, overflow {}\n",
            q.asked, q.delivered, q.answered, q.duplicates, q.oversize, q.late, q.dropped
        ));
    }
    if !v.multicast {
        out.push_str("multicast:   off (--no-multicast)\n");
    }
    if let Some(o) = &v.overlay {
        out.push_str(&format!(
            "overlay:     --max-links {}: {} neighbours; refuted own failure {} times\n",
            o.max_links, o.neighbours, o.refutations
        ));
        let r = &o.relay;
        out.push_str(&format!(
            "relay:       sent {}, forwarded {}, delivered {}; dropped: duplicates {}, gaps given up {}, queue full {}\n",
            r.originated, r.forwarded, r.delivered, r.duplicates, r.skipped, r.dropped
        ));
    }
    for s in &v.seeds {
        let resolved = if s.resolved.is_empty() {
            String::new()
        } else {
            format!(" -> {}", list(&s.resolved))
        };
        let detail = s
            .detail
            .as_ref()
            .map(|d| format!(" ({})", escape(d)))
            .unwrap_or_default();
        out.push_str(&format!(
            "seed:        {}{resolved}: {}{detail}, {} attempts\n",
            escape(&s.seed),
            escape(&s.outcome),
            s.attempts
        ));
    }
    if let Some(dir) = &v.state_dir {
        out.push_str(&format!("state dir:   {}\n", escape(dir)));
    }
    if !v.handlers.is_zero() {
        let h = &v.handlers;
        out.push_str(&format!(
            "handlers:    {} configured; running {}, queued {}; started {}, succeeded {}, failed {}, timed out {}, dropped {}\n",
            h.configured, h.running, h.queued, h.started, h.succeeded, h.failed, h.timed_out, h.dropped
        ));
    }
    if v.warnings.is_empty() {
        out.push_str("warnings:    none\n");
    } else {
        out.push_str("warnings:\n");
        for w in &v.warnings {
            out.push_str(&format!("  - {}\n", escape(w)));
        }
    }
    out
}

/// One event line for people.
pub fn render_event(ev: &Event) -> String {
    let kind = escape(&ev.kind);
    let at = ev.at.as_str();
    let time = escape(at.get(11..23).unwrap_or(at));
    match &ev.body {
        EventBody::Message(m) => format!(
            "{time}  message from {} [{}]: {}",
            esc(m.from_name.as_deref().unwrap_or(&m.from)),
            escape(&m.topic),
            m.payload
                .as_deref()
                .map(esc)
                .unwrap_or_else(|| format!("(binary, base64 {})", escape(&m.payload_b64)))
        ),
        EventBody::Dropped(d) => {
            format!("{time}  ... {} events dropped (reader too slow)", d.count)
        }
        EventBody::Peer { peer: p } => format!(
            "{time}  {kind:<15} {} ({}) {} state={} link={}",
            escape(&p.name),
            short(&p.id),
            escape(&p.addr),
            escape(&p.state),
            escape(&p.link)
        ),
        EventBody::Other {} if ev.kind == proto::control::EVENT_SUBSCRIBED => {
            format!("{time}  watching events (Ctrl-C to stop)")
        }
        EventBody::Other {} => format!("{time}  {kind}"),
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
        Command::Keys {
            sock,
            action,
            cluster: true,
        } => crate::cli_auto::cluster_keys(&sock, action).await,
        Command::Keys { sock, action, .. } => keys(&sock, action).await,
        Command::Ops(c) => crate::cli_ops::run(c).await,
        Command::Auto(c) => crate::cli_auto::run(c).await,
        Command::Peers {
            sock,
            json,
            state,
            name,
            tag,
        } => {
            let uri = PeersQuery {
                state,
                name,
                tags: tag,
            }
            .uri();
            let answer = client(&sock).get(&uri).await;
            show(answer, json, |v| render_peers(v, colour()))
        }
        Command::Status { sock, json } => {
            show(client(&sock).get("/v1/self").await, json, render_status)
        }
        Command::Watch { sock, json } => watch(&client(&sock), json).await,
        Command::Send {
            sock,
            node,
            topic,
            message,
            json,
        } => send(&sock, Some(node), topic, message, json).await,
        Command::Broadcast {
            sock,
            topic,
            message,
            json,
        } => send(&sock, None, topic, message, json).await,
        Command::Leave { sock } => match client(&sock).post::<()>("/v1/leave", None).await {
            Err(e) => fail(e),
            Ok(a) if !a.status.is_success() => api_error(&a),
            Ok(_) => {
                println!("leaving the cluster");
                ExitCode::SUCCESS
            }
        },
        Command::Health { sock, min_peers } => {
            let uri = HealthQuery { min_peers }.uri();
            match client(&sock).get(&uri).await {
                Err(e) => fail(e),
                Ok(a)
                    if a.status == StatusCode::OK
                        || a.status == StatusCode::SERVICE_UNAVAILABLE =>
                {
                    let h: Health = match a.parse() {
                        Ok(h) => h,
                        Err(e) => return fail(e),
                    };
                    println!(
                        "{}: {} of {} alive peers",
                        h.status.as_str(),
                        h.alive_peers,
                        h.min_peers
                    );
                    if a.status == StatusCode::OK {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_API)
                    }
                }
                Ok(a) => api_error(&a),
            }
        }
    }
}

/// `keys list|install|use|remove`.
async fn keys(sock: &SocketArg, action: KeysAction) -> ExitCode {
    let c = client(sock);
    let edit = |key: &String| KeyRequest { key: key.clone() };
    let (answer, json_out) = match &action {
        KeysAction::List { json } => (c.get("/v1/keys").await, *json),
        KeysAction::Install { key } => (c.post("/v1/keys", Some(&edit(key))).await, false),
        KeysAction::Use { key } => (c.post("/v1/keys/use", Some(&edit(key))).await, false),
        KeysAction::Remove { key } => (c.post("/v1/keys/remove", Some(&edit(key))).await, false),
    };
    show(answer, json_out, |v: &Keys| {
        let done = match (&action, v.changed) {
            (KeysAction::List { .. }, _) => "",
            (KeysAction::Install { .. }, Some(false)) => "already installed\n",
            (KeysAction::Install { .. }, _) => "installed\n",
            (KeysAction::Use { .. }, Some(false)) => "already primary\n",
            (KeysAction::Use { .. }, _) => "now primary\n",
            (KeysAction::Remove { .. }, _) => "removed\n",
        };
        if let Some(w) = &v.warning {
            eprintln!("warning: {}", escape(w));
        }
        format!("{done}{}", render_keys(v))
    })
}

/// One answer printed: the API's JSON with `--json`, else what `render`
/// makes of it (read as `T`) for people.
pub(crate) fn show<T: DeserializeOwned>(
    answer: Result<Answer, ClientError>,
    json: bool,
    render: impl FnOnce(&T) -> String,
) -> ExitCode {
    match answer {
        Err(e) => fail(e),
        Ok(a) if !a.status.is_success() => api_error(&a),
        Ok(a) if json => print_json(&a),
        Ok(a) => match a.parse::<T>() {
            Ok(v) => {
                print!("{}", render(&v));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

/// The keyring as a table: fingerprint and role.
pub fn render_keys(v: &Keys) -> String {
    let mut out = String::from("FINGERPRINT       ROLE\n");
    for k in &v.keys {
        let role = if k.primary {
            "primary (seals, accepts)"
        } else {
            "accepts"
        };
        out.push_str(&format!("{:<16}  {role}\n", escape(&k.fingerprint)));
    }
    out
}

/// The outcome of `send` or `broadcast`, one line per recipient.
pub fn render_results(v: &SendResults) -> String {
    if v.results.is_empty() {
        return "no linked peers; nothing sent\n".into();
    }
    let mut out = String::new();
    for r in &v.results {
        let (name, id) = (escape(&r.name), short(&r.id));
        out.push_str(&match r.status {
            SendStatus::Sent => format!("sent to {name} ({id})\n"),
            SendStatus::Relayed => format!("relayed to {name} ({id})\n"),
            SendStatus::Failed => format!(
                "FAILED {name} ({id}): {}\n",
                escape(r.error.as_deref().unwrap_or(""))
            ),
        });
    }
    out
}

/// `send` and `broadcast`: `to` is a peer, or `None` for every linked peer.
async fn send(
    sock: &SocketArg,
    to: Option<String>,
    topic: String,
    message: Option<String>,
    json: bool,
) -> ExitCode {
    let payload = match read_message(message) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let body = SendRequest::text(to, topic, payload);
    let answer = match client(sock).post("/v1/messages", Some(&body)).await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    // A failed send to one peer is a 409 that still lists the outcome.
    let Ok(results) = answer.parse::<SendResults>() else {
        return api_error(&answer);
    };
    if json {
        print_json(&answer);
    } else {
        print!("{}", render_results(&results));
    }
    if answer.status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_API)
    }
}

async fn watch(client: &Client, json: bool) -> ExitCode {
    let resp = match client
        .request(Method::GET, "/v1/events", Default::default())
        .await
    {
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
    crate::cli_ops::follow_lines(resp, "event", |text| {
        if json {
            // The daemon's line as is (C1 and DEL escaped).
            match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => json_safe(text).into_owned(),
                Err(_) => escape(text).into_owned(),
            }
        } else {
            match serde_json::from_str::<Event>(text) {
                Ok(ev) => render_event(&ev),
                Err(_) => escape(text).into_owned(),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::{
        DroppedEvent, InterfaceInfo, KeyEntry, LinkTraffic, MessageEvent, NodeCounters, PeerEntry,
        PeerInfo, SendResult,
    };
    use proto::Tags;
    use serde_json::{json, Value};

    #[test]
    fn durations_are_human() {
        assert_eq!(human_ms(5), "5ms");
        assert_eq!(human_ms(1500), "1.5s");
        assert_eq!(human_ms(125_000), "2m5s");
        assert_eq!(human_ms(7_500_000), "2h5m");
    }

    /// Reads what the daemon would send as the type the CLI reads.
    fn read<T: DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).expect("the daemon's shape")
    }

    #[test]
    fn peers_table_is_aligned_and_plain_without_colour() {
        let peer =
            |id: &str, name: &str, state: &str, link: &str, rtt: Value, seen: u64, tags: Value| {
                json!({"id": id, "name": name, "state": state, "addr": "127.0.0.1:1", "link": link,
                "rtt_ms": rtt, "last_seen_ms": seen, "incarnation": 1, "tags": tags,
                "conflict": null, "degraded": false, "since_ms": 1, "messages_in": 0,
                "messages_out": 0, "bytes_in": 0, "bytes_out": 0})
            };
        let v = json!({"peers": [
            peer("0123456789abcdef0123456789abcdef", "a", "alive", "up", json!(0.25), 20, json!({"role": "db"})),
            peer("fedcba9876543210fedcba9876543210", "longer-name", "failed", "down", Value::Null, 4000, json!({})),
        ]});
        let out = render_peers(&read(v), false);
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

    fn evil_peer() -> PeerInfo {
        let e = || EVIL.to_string();
        PeerInfo {
            id: format!("0123{EVIL}"),
            name: e(),
            state: e(),
            addr: e(),
            link: e(),
            rtt_ms: None,
            last_seen_ms: 1,
            incarnation: 1,
            tags: Tags::from([(e(), e())]),
            conflict: None,
            degraded: false,
            since_ms: 1,
        }
    }

    /// Every string the daemon sends may carry control characters (numbers
    /// cannot, now that they are read as numbers).
    #[test]
    fn every_human_rendering_escapes_what_the_daemon_sent() {
        let e = || EVIL.to_string();
        let list = PeerList {
            peers: vec![PeerEntry {
                peer: evil_peer(),
                traffic: LinkTraffic::default(),
            }],
        };
        let peers = render_peers(&list, false);
        assert_eq!(peers.lines().count(), 2, "{peers}");
        assert!(clean(&peers) && peers.contains(SHOWN), "{peers}");

        let status = render_status(&NodeInfo {
            id: e(),
            name: e(),
            cluster: e(),
            incarnation: 1,
            addresses: vec![e()],
            listen: e(),
            interfaces: vec![InterfaceInfo {
                name: e(),
                addr: e(),
            }],
            group: e(),
            ttl: 0,
            uptime_ms: 0,
            tags: Tags::new(),
            multicast_loops_back: true,
            secured: false,
            peers: [(e(), 1)].into(),
            transitions: [(e(), 1)].into(),
            links_up: 0,
            counters: NodeCounters {
                beacons_sent: 0,
                beacons_received: 0,
                replies_sent: 0,
                beacon_send_errors: 0,
                beacons_dropped: [(e(), 1)].into(),
                frames_in: 0,
                frames_out: 0,
                links_established: 0,
                dials: 0,
                dial_failures: 0,
                links_refused: [(e(), 2)].into(),
                messages_in: 0,
                messages_out: 0,
                peers_pending: 0,
                peers_admitted: 0,
                pending_refused: 0,
                stalls: 0,
                event_subscribers: 0,
                events_dropped: 0,
                queries: Default::default(),
            },
            warnings: vec![e()],
            multicast: true,
            beacon_interval_ms: 0,
            seeds: Vec::new(),
            state_dir: None,
            handlers: Default::default(),
            overlay: None,
        });
        assert!(clean(&status) && status.contains(SHOWN), "{status}");

        let event = |kind: &str, at: &str, body: EventBody| Event {
            kind: kind.into(),
            at: at.into(),
            body,
        };
        let message = |from_name: Option<String>, payload: Option<String>| {
            EventBody::Message(MessageEvent {
                from: e(),
                from_name,
                topic: e(),
                payload,
                payload_b64: e(),
            })
        };
        let peer = || EventBody::Peer { peer: evil_peer() };
        for ev in [
            event("peer_joined", EVIL, peer()),
            event(EVIL, "2024-01-01T00:00:00.000000Z", peer()),
            event("message", EVIL, message(Some(e()), Some(e()))),
            event("message", "", message(None, None)),
            event(
                "dropped",
                EVIL,
                EventBody::Dropped(DroppedEvent { count: 1 }),
            ),
            event(EVIL, "", EventBody::Other {}),
        ] {
            let line = render_event(&ev);
            assert!(clean(&line) && line.contains(SHOWN), "{line}");
        }

        let keys = render_keys(&Keys {
            secured: true,
            keys: vec![KeyEntry {
                fingerprint: e(),
                primary: true,
            }],
            secret_file: None,
            changed: None,
            warning: None,
        });
        assert!(clean(&keys) && keys.contains(SHOWN), "{keys}");

        let result = |status, error| SendResult {
            id: e(),
            name: e(),
            status,
            error,
        };
        let sent = render_results(&SendResults {
            results: vec![
                result(SendStatus::Sent, None),
                result(SendStatus::Relayed, None),
                result(SendStatus::Failed, Some(e())),
            ],
        });
        assert_eq!(sent.lines().count(), 3, "{sent}");
        assert!(clean(&sent) && sent.contains(SHOWN), "{sent}");
    }

    #[test]
    fn events_render_by_shape() {
        let line = |s: &str| render_event(&serde_json::from_str::<Event>(s).unwrap());
        let at = "2024-01-01T10:20:30.123456Z";
        assert_eq!(
            line(&format!(r#"{{"type":"subscribed","at":"{at}"}}"#)),
            "10:20:30.123  watching events (Ctrl-C to stop)"
        );
        assert_eq!(
            line(&format!(r#"{{"type":"dropped","at":"{at}","count":7}}"#)),
            "10:20:30.123  ... 7 events dropped (reader too slow)"
        );
        let msg = format!(
            r#"{{"type":"message","at":"{at}","from":"f","from_name":null,"topic":"t","payload":null,"payload_b64":"AAE="}}"#
        );
        assert_eq!(
            line(&msg),
            "10:20:30.123  message from f [t]: (binary, base64 AAE=)"
        );
    }
}
