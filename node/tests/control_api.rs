//! Process tests of the control API's contract: answers read as the shared
//! `proto::control` types, request errors are JSON and say what is wrong,
//! and `/metrics` passes a strict parser of the Prometheus text format (and
//! `promtool check metrics` when it is on PATH). Real binary, loopback
//! only, children killed on drop.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use proto::control::{
    ErrorBody, Event, EventBody, Health, HealthStatus, NodeInfo, PeerEntry, PeerList, SendResults,
};
use serde::de::DeserializeOwned;
use support::{curl, http, unique_group, wait_until, Daemon, EventStream, TempDir};

/// Two linked nodes.
fn pair(dir: &TempDir) -> (Daemon, Daemon) {
    let group = unique_group();
    let a = Daemon::start(dir.path(), "a", &group, &[]);
    let b = Daemon::start(dir.path(), "b", &group, &[]);
    wait_until(Duration::from_secs(15), "a and b linked", || {
        a.linked() == 1 && b.linked() == 1
    });
    (a, b)
}

/// `GET uri` read as `T`, with its status.
fn get<T: DeserializeOwned>(d: &Daemon, uri: &str) -> (u16, T) {
    let (code, body) = http(&d.socket, "GET", uri, b"");
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{uri}: {e}: {body}"));
    (code, v)
}

/// A request that must fail: its status and error text.
fn refused(d: &Daemon, method: &str, uri: &str, body: &str) -> (u16, String) {
    let (code, answer) = http(&d.socket, method, uri, body.as_bytes());
    let e: ErrorBody =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{uri}: not JSON ({e}): {answer}"));
    (code, e.error)
}

#[test]
fn every_answer_reads_as_the_shared_types() {
    let dir = TempDir::new("ctl-types");
    let (a, b) = pair(&dir);
    let mut ev = EventStream::open(&b.socket).expect("subscribe");

    let (code, me): (_, NodeInfo) = get(&a, "/v1/self");
    assert_eq!((code, me.name.as_str(), me.links_up), (200, "a", 1));
    let (_, peers): (_, PeerList) = get(&a, "/v1/peers?state=alive");
    assert_eq!(peers.peers.len(), 1);
    assert_eq!(peers.peers[0].peer.name, "b");
    let (_, one): (_, PeerEntry) = get(&a, &format!("/v1/peers/{}", &peers.peers[0].peer.id[..8]));
    assert_eq!(one.peer.id, peers.peers[0].peer.id);
    let (code, h): (_, Health) = get(&a, "/v1/health?min_peers=2");
    assert_eq!(
        (code, h.status, h.alive_peers),
        (503, HealthStatus::Waiting, 1)
    );

    let body = r#"{"to":"b","topic":"typed","payload":"hi"}"#;
    let (code, answer) = http(&a.socket, "POST", "/v1/messages", body.as_bytes());
    let sent: SendResults = serde_json::from_str(&answer).expect("results");
    assert_eq!((code, sent.results.len()), (200, 1));

    // Every line of the stream reads as an event; the message by its shape.
    let first: Event = serde_json::from_value(ev.next().expect("first line")).expect("event");
    assert_eq!(first.kind, "subscribed");
    loop {
        let line = ev.next().expect("the message");
        let e: Event = serde_json::from_value(line.clone()).expect("event");
        if let EventBody::Message(m) = e.body {
            assert_eq!((e.kind.as_str(), m.topic.as_str()), ("message", "typed"));
            assert_eq!(
                (m.from_name.as_deref(), m.payload.as_deref()),
                (Some("a"), Some("hi"))
            );
            break;
        }
    }
}

#[test]
fn request_errors_are_json_and_say_what_is_wrong() {
    let dir = TempDir::new("ctl-errors");
    let d = Daemon::start(dir.path(), "e", &unique_group(), &[]);
    let m = "/v1/messages";
    let (code, e) = refused(&d, "POST", m, "[\"node2\"]");
    assert!(code == 400 && e.contains("JSON object"), "{code} {e}");
    let (code, e) = refused(&d, "POST", m, r#"{"payload":"x"}"#);
    assert!(
        code == 400 && e.contains("`to`") && e.contains("null to broadcast"),
        "{e}"
    );
    let (code, e) = refused(&d, "POST", m, r#"{"to":5}"#);
    assert!(code == 400 && e.starts_with("\"to\": "), "{code} {e}");
    let (code, e) = refused(&d, "POST", m, r#"{"to":null,"topic":7}"#);
    assert!(code == 400 && e.starts_with("\"topic\": "), "{code} {e}");
    let (code, e) = refused(&d, "POST", m, r#"{"to":null} x"#);
    assert!(code == 400 && e.contains("not valid JSON"), "{code} {e}");
    let (code, e) = refused(
        &d,
        "POST",
        m,
        r#"{"to":null,"payload":"x","payload_b64":"AA=="}"#,
    );
    assert!(code == 400 && e.contains("not both"), "{code} {e}");
    // The keyring is checked before the body: no secret is 409 whatever it is.
    let (code, e) = refused(&d, "POST", "/v1/keys", "nope");
    assert!(code == 409 && e.contains("--secret-file"), "{code} {e}");
}

/// Regression: `/v1/health` echoed an unknown parameter in full, and a
/// path that is not UTF-8 got axum's plain-text refusal.
#[test]
fn every_refusal_is_short_json() {
    let dir = TempDir::new("ctl-short");
    let d = Daemon::start(dir.path(), "s", &unique_group(), &[]);
    // A path that is not UTF-8 gets a JSON error too.
    let (code, e) = refused(&d, "GET", "/v1/peers/%FF", "");
    assert_eq!(code, 400, "{e}");
    // Unknown query parameters are quoted short, on every endpoint.
    let key = "k".repeat(4000);
    for uri in [format!("/v1/health?{key}=1"), format!("/v1/peers?{key}=1")] {
        let (code, e) = refused(&d, "GET", &uri, "");
        assert!(code == 400 && e.len() < 200, "{code}: {} bytes", e.len());
        assert!(e.contains("unknown parameter") && e.contains("kkk"), "{e}");
    }
}

/// One metric family of a scrape.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    samples: BTreeMap<String, f64>,
}

fn is_name(s: &str, colons: bool) -> bool {
    let ok = |c: char, first: bool| {
        c == '_'
            || (colons && c == ':')
            || c.is_ascii_alphabetic()
            || (!first && c.is_ascii_digit())
    };
    let mut cs = s.chars();
    cs.next().is_some_and(|c| ok(c, true)) && cs.all(|c| ok(c, false))
}

/// Reads `{a="x",b="y"}` (already stripped of its braces) into its
/// canonical text, refusing bad names, escapes and repeats.
fn labels(mut s: &str) -> Result<String, String> {
    let mut seen = BTreeMap::new();
    while !s.is_empty() {
        let (name, rest) = s
            .split_once("=\"")
            .ok_or(format!("label without =\": {s}"))?;
        if !is_name(name, false) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape in a label value: {other:?}")),
                },
                Some((_, '\n')) => return Err("raw newline in a label value".into()),
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        if seen.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        s = &rest[end + 1..];
        s = match s.strip_prefix(',') {
            Some("") => return Err("trailing comma in labels".into()),
            Some(r) => r,
            None if s.is_empty() => s,
            None => return Err(format!("junk after a label: {s}")),
        };
    }
    Ok(format!("{seen:?}"))
}

/// A strict reader of the Prometheus text format 0.0.4: every family is
/// `# HELP`, `# TYPE`, then its samples, once; names, label escapes and
/// values as the format defines them; no repeated series; counters named
/// `_total` and never negative.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, Family>, String> {
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| at("HELP without text".into()))?;
            if !is_name(name, true) || families.contains_key(name) {
                return Err(at("bad or repeated family".into()));
            }
            if help.replace("\\\\", "").replace("\\n", "").contains('\\') {
                return Err(at("bad escape in HELP".into()));
            }
            families.insert(
                name.into(),
                Family {
                    help: help.into(),
                    ..Family::default()
                },
            );
            current = Some(name.into());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type".into()))?;
            let f = match &current {
                Some(c) if c == name => families.get_mut(name).expect("current family"),
                _ => return Err(at("TYPE not right after its HELP".into())),
            };
            if !f.kind.is_empty() || !["counter", "gauge", "untyped"].contains(&kind) {
                return Err(at("repeated or unexpected TYPE".into()));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at("a counter's name ends in _total".into()));
            }
            f.kind = kind.into();
        } else if line.starts_with('#') || line.is_empty() {
            return Err(at("unexpected comment or empty line".into()));
        } else {
            let (series, rest) = match line.find('{') {
                Some(i) => {
                    let close = line
                        .find("} ")
                        .ok_or_else(|| at("unclosed labels".into()))?;
                    let ls = labels(&line[i + 1..close]).map_err(at)?;
                    ((&line[..i], ls), &line[close + 2..])
                }
                None => {
                    let (name, rest) = line.split_once(' ').ok_or_else(|| at("no value".into()))?;
                    ((name, String::new()), rest)
                }
            };
            let (name, ls) = series;
            let f = match &current {
                Some(c) if c == name => families.get_mut(name).expect("current family"),
                _ => return Err(at("sample outside its family".into())),
            };
            if f.kind.is_empty() {
                return Err(at("sample before TYPE".into()));
            }
            let mut parts = rest.split(' ');
            let value: f64 = parts
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| at("value is not a float".into()))?;
            if parts.next().is_some_and(|t| t.parse::<i64>().is_err()) || parts.next().is_some() {
                return Err(at("junk after the value".into()));
            }
            if f.kind == "counter" && (value.is_nan() || value < 0.0) {
                return Err(at("a counter below zero".into()));
            }
            if f.samples.insert(ls, value).is_some() {
                return Err(at("repeated series".into()));
            }
        }
    }
    Ok(families)
}

#[test]
fn the_strict_parser_refuses_what_prometheus_would() {
    let ok = "# HELP x_total A \\\\ help.\n# TYPE x_total counter\nx_total{a=\"q\\\"\\n\",b=\"\"} 1\nx_total 2\n";
    let f = parse_exposition(ok).expect("valid");
    assert_eq!(f["x_total"].samples.len(), 2);
    let head = "# HELP x_total h\n# TYPE x_total counter\n";
    for bad in [
        format!("{head}x_total 1\nx_total 2\n"), // repeated series
        format!("{head}x_total{{a=\"1\",a=\"2\"}} 1\n"), // repeated label
        format!("{head}x_total{{a=\"\\t\"}} 1\n"), // bad escape
        format!("{head}x_total{{a=\"1\",}} 1\n"), // trailing comma
        format!("{head}x_total one\n"),          // not a float
        format!("{head}x_total -1\n"),           // negative counter
        format!("{head}y_total 1\n"),            // outside its family
        format!("{head}x_total 1"),              // no final newline
        "# HELP x h\n# TYPE x counter\nx 1\n".to_string(), // counter without _total
        "# TYPE x gauge\nx 1\n".to_string(),     // TYPE without HELP
        format!("{head}\nx_total 1\n"),          // empty line
        format!("{head}{head}"),                 // family twice
    ] {
        assert!(parse_exposition(&bad).is_err(), "accepted: {bad:?}");
    }
}

/// `promtool check metrics` on `text`, when promtool is on PATH: `None`
/// when it is not (an error if `CONSTELLATION_REQUIRE_PROMTOOL` is set).
fn promtool(text: &str) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CONSTELLATION_REQUIRE_PROMTOOL").is_none(),
                "promtool is required (CONSTELLATION_REQUIRE_PROMTOOL) but not on PATH"
            );
            return None;
        }
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Some((out.status.success(), said))
}

#[test]
fn metrics_parse_strictly_and_keep_their_names() {
    let dir = TempDir::new("ctl-metrics");
    let (a, b) = pair(&dir);
    let body = r#"{"to":"b","payload":"count me"}"#;
    assert_eq!(
        http(&a.socket, "POST", "/v1/messages", body.as_bytes()).0,
        200
    );
    wait_until(Duration::from_secs(10), "message received", || {
        support::self_info(&b.socket)["counters"]["messages_in"] == 1
    });
    let (code, text) = curl(&a.socket, &["http://localhost/metrics"]);
    assert_eq!(code, 200);
    let families = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let gauges = [
        "peers",
        "links_up",
        "keys",
        "peers_pending",
        "overlay_neighbours",
        "payload_bytes",
        "handlers",
        "handler_running",
        "handler_queued",
    ];
    let counters = [
        "beacons_sent",
        "beacon_replies_sent",
        "beacons_received",
        "frames_in",
        "frames_out",
        "links_established",
        "dials",
        "dial_failures",
        "messages_in",
        "messages_out",
        "peers_admitted",
        "pending_refused",
        "stalls",
        "refutations",
        "uptime_seconds",
        "transitions",
        "beacons_dropped",
        "links_refused",
        "handler_started",
        "handler_runs",
        "queries_asked",
        "queries_delivered",
        "queries_answered",
        "queries_discarded",
        "relayed",
    ];
    let mut want: Vec<(String, &str)> = gauges
        .iter()
        .map(|g| (format!("constellation_{g}"), "gauge"))
        .chain(
            counters
                .iter()
                .map(|c| (format!("constellation_{c}_total"), "counter")),
        )
        .collect();
    want.sort();
    let got: Vec<(String, &str)> = families
        .iter()
        .map(|(k, f)| (k.clone(), f.kind.as_str()))
        .collect();
    assert_eq!(got, want, "the same families as ever");
    assert!(families.values().all(|f| f.help.ends_with('.')));

    let sample = |family: &str, labels: &str| {
        families[family]
            .samples
            .get(labels)
            .copied()
            .unwrap_or_else(|| panic!("{family}{labels} missing: {:?}", families[family].samples))
    };
    let states: Vec<&String> = families["constellation_peers"].samples.keys().collect();
    assert_eq!(states.len(), 4, "every state, zero or not: {states:?}");
    assert_eq!(sample("constellation_peers", r#"{"state": "alive"}"#), 1.0);
    assert_eq!(sample("constellation_links_up", ""), 1.0);
    assert_eq!(sample("constellation_keys", ""), 0.0);
    assert_eq!(sample("constellation_messages_out_total", ""), 1.0);
    assert_eq!(
        sample("constellation_payload_bytes", r#"{"direction": "out"}"#),
        8.0
    );
    assert!(
        sample(
            "constellation_transitions_total",
            r#"{"event": "peer_joined"}"#
        ) >= 1.0
    );

    match promtool(&text) {
        Some((ok, said)) => assert!(ok, "promtool check metrics: {said}\n{text}"),
        None => eprintln!("promtool not on PATH: only the strict parser checked /metrics"),
    }
}
