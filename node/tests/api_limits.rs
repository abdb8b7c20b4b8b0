//! Process tests of the control API's resource limits: the event stream's
//! per-subscriber byte budget, the request deadline, the connection bound,
//! accept back-off, short error quotes, the socket file's mode under a
//! permissive umask, and signals. Real binary, loopback only, children
//! killed on drop.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    bin, cpu_ticks, http, loopback_args, rss_kib, self_info, unique_group, wait_until, Daemon,
    EventStream, TempDir,
};

/// Two linked nodes: `a` receives, `b` sends.
fn pair(dir: &TempDir) -> (Daemon, Daemon) {
    let group = unique_group();
    let a = Daemon::start(dir.path(), "a", &group, &[]);
    let b = Daemon::start(dir.path(), "b", &group, &[]);
    wait_until(Duration::from_secs(15), "a and b linked", || {
        a.linked() == 1 && b.linked() == 1
    });
    (a, b)
}

fn messages_in(d: &Daemon) -> u64 {
    self_info(&d.socket)["counters"]["messages_in"]
        .as_u64()
        .unwrap_or(0)
}

/// Sends `payload` from `from` to the peer named `to`; asserts it was sent.
fn send(from: &Daemon, to: &str, payload: &str) {
    let body = json!({ "to": to, "topic": "t", "payload": payload }).to_string();
    let (code, answer) = http(&from.socket, "POST", "/v1/messages", body.as_bytes());
    assert_eq!(code, 200, "{}", answer.get(..200).unwrap_or(&answer));
}

/// Sends `n` messages of about 1 MB, one at a time: each is received by
/// `to` before the next leaves, so what `to` holds afterwards is what it
/// kept, not a burst still in flight.
fn send_big(from: &Daemon, to: &Daemon, n: u64) {
    let body = json!({ "to": to.name, "topic": "t", "payload": "x".repeat(1_000_000) }).to_string();
    let base = messages_in(to);
    for i in 1..=n {
        let (code, answer) = http(&from.socket, "POST", "/v1/messages", body.as_bytes());
        assert_eq!(code, 200, "{}", answer.get(..200).unwrap_or(&answer));
        wait_until(Duration::from_secs(20), "big message received", || {
            messages_in(to) >= base + i
        });
    }
}

#[test]
fn a_reader_that_never_reads_does_not_pin_the_nodes_memory() {
    let dir = TempDir::new("ev-rss");
    let (a, b) = pair(&dir);
    let stuck = EventStream::open(&a.socket).expect("subscribe");
    let before = rss_kib(a.child.id());
    send_big(&b, &a, 300);
    let after = rss_kib(a.child.id());
    eprintln!(
        "receiver RSS with one stuck /v1/events reader: {} MiB before, {} MiB after 300 x 1 MB messages",
        before / 1024,
        after / 1024
    );
    assert!(
        after < 150 * 1024,
        "RSS grew to {} MiB (from {} MiB)",
        after / 1024,
        before / 1024
    );
    let dropped = self_info(&a.socket)["counters"]["events_dropped"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        dropped > 250,
        "the stuck reader's events were dropped ({dropped})"
    );
    drop(stuck);
}

#[test]
fn a_slow_reader_is_told_what_it_missed_and_the_stream_goes_on() {
    let dir = TempDir::new("ev-slow");
    let (a, b) = pair(&dir);
    let mut ev = EventStream::open(&a.socket).expect("subscribe");
    assert_eq!(ev.next().expect("first line")["type"], "subscribed");
    // 12 events of ~2.3 MB each (payload and base64) against an 8 MiB budget.
    send_big(&b, &a, 12);
    let (mut big, mut dropped) = (0u64, 0u64);
    while dropped == 0 {
        let v = ev.next().expect("an event or a dropped line");
        match v["type"].as_str() {
            Some("message") => big += 1,
            Some("dropped") => dropped = v["count"].as_u64().expect("count"),
            _ => {} // peer events
        }
    }
    assert!(big < 12, "only part of the burst was kept ({big} of 12)");
    // The stream goes on: later events arrive after the gap.
    send(&b, "a", "after the gap");
    loop {
        let v = ev.next().expect("the stream goes on");
        match (v["type"].as_str(), v["payload"].as_str()) {
            (Some("message"), Some("after the gap")) => break,
            (Some("message"), _) => big += 1,
            (Some("dropped"), _) => dropped += v["count"].as_u64().expect("count"),
            _ => {}
        }
    }
    assert!(
        big + dropped >= 12,
        "every message is either delivered or counted ({big} + {dropped})"
    );
}

#[test]
fn closed_subscribers_are_forgotten() {
    let dir = TempDir::new("ev-close");
    let (a, b) = pair(&dir);
    let subs: Vec<EventStream> = (0..200)
        .map(|_| EventStream::open(&a.socket).expect("subscribe"))
        .collect();
    let count = || {
        self_info(&a.socket)["counters"]["event_subscribers"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    assert_eq!(count(), 200);
    send(&b, "a", "to everyone");
    let before = rss_kib(a.child.id());
    drop(subs);
    wait_until(Duration::from_secs(10), "subscribers forgotten", || {
        count() == 0
    });
    eprintln!(
        "receiver RSS with 200 subscribers: {} MiB; after they closed: {} MiB",
        before / 1024,
        rss_kib(a.child.id()) / 1024
    );
}

/// Writes one byte every `every` until the daemon closes the connection;
/// returns how long that took (`None` past `limit`) and what it answered.
fn trickle(
    sock: &std::path::Path,
    head: &[u8],
    every: Duration,
    limit: Duration,
) -> (Option<Duration>, String) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(every)).expect("timeout");
    let started = Instant::now();
    s.write_all(head).expect("head");
    let mut answer = Vec::new();
    while started.elapsed() < limit {
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => {
                return (
                    Some(started.elapsed()),
                    String::from_utf8_lossy(&answer).into(),
                )
            }
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (
                    Some(started.elapsed()),
                    String::from_utf8_lossy(&answer).into(),
                )
            }
            Err(_) => {} // read timeout: time for the next byte
        }
        if s.write_all(b"x").is_err() {
            return (
                Some(started.elapsed()),
                String::from_utf8_lossy(&answer).into(),
            );
        }
    }
    (None, String::from_utf8_lossy(&answer).into())
}

#[test]
fn a_trickled_body_is_cut_off_at_the_request_deadline() {
    let dir = TempDir::new("trickle");
    let d = Daemon::start(dir.path(), "t", &unique_group(), &[]);
    let head = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n";
    let (closed, answer) = trickle(
        &d.socket,
        head,
        Duration::from_secs(2),
        Duration::from_secs(40),
    );
    let closed = closed.unwrap_or_else(|| panic!("still open after 40 s; got {answer:?}"));
    assert!(
        closed >= Duration::from_secs(9) && closed < Duration::from_secs(25),
        "closed after {closed:?} (deadline 10 s)"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert_eq!(
        self_info(&d.socket)["name"],
        "t",
        "the daemon still answers"
    );
}

#[test]
fn a_trickled_head_is_cut_off_too() {
    let dir = TempDir::new("trickle-head");
    let d = Daemon::start(dir.path(), "t", &unique_group(), &[]);
    let head = b"GET /v1/self HTTP/1.1\r\nX-Slow: ";
    let (closed, answer) = trickle(
        &d.socket,
        head,
        Duration::from_secs(1),
        Duration::from_secs(40),
    );
    let closed = closed.unwrap_or_else(|| panic!("still open after 40 s; got {answer:?}"));
    assert!(closed < Duration::from_secs(20), "closed after {closed:?}");
}

#[test]
fn connections_past_the_bound_are_refused_with_503_until_one_closes() {
    let dir = TempDir::new("bound");
    let d = Daemon::start(dir.path(), "c", &unique_group(), &[]);
    // The daemon inherits our open-file limit: 256, or a quarter of it.
    let nofile: usize = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap();
    let bound = (nofile / 4).clamp(8, 256);
    // Event streams hold their connection for as long as they like.
    let mut held: Vec<EventStream> = (0..bound)
        .map(|i| EventStream::open(&d.socket).unwrap_or_else(|e| panic!("stream {i}: {e}")))
        .collect();
    let started = Instant::now();
    let (code, body) = http(&d.socket, "GET", "/v1/self", b"");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("connections"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    held.pop();
    wait_until(
        Duration::from_secs(10),
        "a slot frees when a stream closes",
        || http(&d.socket, "GET", "/v1/self", b"").0 == 200,
    );
}

#[test]
fn accept_errors_back_off_and_are_logged_rate_limited() {
    let dir = TempDir::new("emfile");
    let d = Daemon::start(dir.path(), "e", &unique_group(), &[]);
    let pid = d.child.id();
    wait_until(Duration::from_secs(10), "daemon answers", || {
        http(&d.socket, "GET", "/v1/self", b"").0 == 200
    });
    // Leave the daemon room for 3 more descriptors, then hold 10 connections.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 3;
    let ok = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .status()
        .expect("prlimit")
        .success();
    assert!(ok, "prlimit on our own child");
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = UnixStream::connect(&d.socket).expect("connect (the backlog takes it)");
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        held.push(s);
    }
    wait_until(Duration::from_secs(10), "accept fails", || {
        d.log_text().contains("accept failed")
    });
    let lines = || d.log_text().matches("accept failed").count();
    let (lines0, cpu0, t0) = (lines(), cpu_ticks(pid), Instant::now());
    // A measurement window, not a synchronisation: what does the daemon do
    // while the descriptor table stays full?
    std::thread::sleep(Duration::from_secs(3));
    let (lines1, cpu1, took) = (lines(), cpu_ticks(pid), t0.elapsed());
    eprintln!(
        "while out of descriptors for {took:?}: {} log lines, {} CPU ticks",
        lines1 - lines0,
        cpu1 - cpu0
    );
    assert!(
        lines1 - lines0 <= 2,
        "logged {} times in 3 s",
        lines1 - lines0
    );
    assert!(cpu1 - cpu0 < 100, "no busy loop ({} ticks)", cpu1 - cpu0);
    drop(held);
    let ok = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:"])
        .status()
        .expect("prlimit")
        .success();
    assert!(ok);
    wait_until(Duration::from_secs(10), "the API serves again", || {
        http(&d.socket, "GET", "/v1/self", b"").0 == 200
    });
}

#[test]
fn error_messages_quote_only_a_short_prefix_of_client_fields() {
    let dir = TempDir::new("quote");
    let d = Daemon::start(dir.path(), "q", &unique_group(), &[]);
    let long = "g".repeat(1_000_000);
    let body = json!({ "to": long, "payload": "x" }).to_string();
    let (code, answer) = http(&d.socket, "POST", "/v1/messages", body.as_bytes());
    assert_eq!(code, 404);
    assert!(
        answer.len() < 300,
        "{} bytes: {}",
        answer.len(),
        answer.get(..200).unwrap_or("")
    );
    let v: Value = serde_json::from_str(&answer).expect("JSON error");
    assert!(v["error"].as_str().unwrap().contains("ggg"), "{v}");
    let key = "k".repeat(4000);
    for uri in [
        format!("/v1/peers/{key}"),
        format!("/v1/peers?state={key}"),
        format!("/v1/peers?{key}=1"),
    ] {
        let (code, answer) = http(&d.socket, "GET", &uri, b"");
        assert!(code == 404 || code == 400, "{code} {uri}");
        assert!(answer.len() < 300, "{uri}: {} bytes", answer.len());
    }
}

#[test]
fn the_socket_file_is_never_wider_than_socket_mode_even_with_umask_000() {
    let dir = TempDir::new("umask");
    let group = unique_group();
    let mut widest = 0;
    for i in 0..8 {
        let name = format!("u{i}");
        let socket = dir.path().join(format!("{name}.sock"));
        let log_path = dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg("umask 000; exec \"$0\" \"$@\"")
            .arg(bin())
            .args(loopback_args(&name, &group, &socket))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        let d = Daemon {
            child,
            name,
            socket: socket.clone(),
            log: log_path,
        };
        // Watch the path from before it exists, as closely as we can.
        let started = Instant::now();
        let mut seen = 0;
        while seen < 200 && started.elapsed() < Duration::from_secs(10) {
            if let Ok(m) = std::fs::symlink_metadata(&socket) {
                widest |= m.permissions().mode() & 0o777;
                seen += 1;
            }
        }
        assert!(seen > 0, "socket appeared");
        drop(d);
    }
    assert_eq!(widest & !0o600, 0, "socket mode seen: {widest:o}");
}

#[test]
fn sighup_is_logged_and_ignored() {
    let dir = TempDir::new("hup");
    let (mut a, b) = pair(&dir);
    a.signal("-HUP");
    wait_until(Duration::from_secs(10), "SIGHUP logged", || {
        a.log_text().contains("SIGHUP received")
    });
    assert_eq!(a.wait_exit(Duration::from_millis(0)), None, "still running");
    assert_eq!(self_info(&a.socket)["name"], "a", "still answers /v1/self");
    // The link still carries traffic both ways, and b never saw a go.
    send(&b, "a", "still there?");
    send(&a, "b", "yes");
    let transitions = &self_info(&b.socket)["transitions"];
    assert!(
        transitions.get("peer_failed").is_none() && transitions.get("peer_left").is_none(),
        "{transitions}"
    );
    assert_eq!(b.state_of("a").as_deref(), Some("alive"));
}

#[test]
fn sigquit_stops_the_node_gracefully() {
    let dir = TempDir::new("quit");
    let (mut a, b) = pair(&dir);
    a.signal("-QUIT");
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0), "clean exit");
    assert!(a.log_text().contains("SIGQUIT received"));
    assert!(!a.socket.exists(), "socket file removed");
    wait_until(Duration::from_secs(10), "b sees a leave", || {
        b.state_of("a").as_deref() == Some("left")
    });
}
