//! Process tests: the real binary, several instances on loopback, driven
//! through the CLI and through `curl --unix-socket`. Children are killed on
//! drop.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{bin, curl, unique_group, wait_until, Daemon, TempDir};

fn three(dir: &TempDir) -> Vec<Daemon> {
    let group = unique_group();
    let nodes: Vec<Daemon> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            Daemon::start(
                dir.path(),
                n,
                &group,
                &[
                    "--tag",
                    &format!("role={}", if *n == "n1" { "db" } else { "web" }),
                ],
            )
        })
        .collect();
    wait_until(Duration::from_secs(10), "3-node full mesh", || {
        nodes.iter().all(|n| n.linked() == 2)
    });
    nodes
}

/// A `watch --json` child whose output lines arrive on a channel.
struct Watch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watch {
    fn start(d: &Daemon) -> Watch {
        let mut child = Command::new(bin())
            .args(["watch", "--json", "--socket"])
            .arg(&d.socket)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("watch");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let w = Watch { child, lines };
        w.expect(|v| v["type"] == "subscribed", "subscribed");
        w
    }

    /// Waits for an event matching `pred`.
    fn expect(&self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no event: {what}"));
            let v: Value = serde_json::from_str(&line).expect("event is JSON");
            assert!(v["type"].is_string() && v["at"].is_string(), "{v}");
            if pred(&v) {
                return v;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill(); // ours; may have exited already
        let _ = self.child.wait();
    }
}

#[test]
fn three_processes_discover_each_other_and_answer_every_endpoint() {
    let dir = TempDir::new("api");
    let nodes = three(&dir);
    let (n1, n2) = (&nodes[0], &nodes[1]);

    // The table, for people and as JSON.
    let out = n1.cli(&["peers"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("n2") && table.contains("n3") && table.contains("alive"),
        "{table}"
    );
    assert!(!table.contains('\x1b'), "no colour when not a terminal");

    // Every endpoint through curl.
    let (code, body) = curl(&n1.socket, &["http://localhost/v1/self"]);
    assert_eq!(code, 200);
    let me: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(me["name"], "n1");
    assert_eq!(me["multicast_loops_back"], true);
    assert_eq!(me["tags"]["role"], "db");
    let (code, body) = curl(&n1.socket, &["http://localhost/v1/peers?state=alive"]);
    assert_eq!(code, 200);
    let peers: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(peers["peers"].as_array().unwrap().len(), 2);
    for key in [
        "id",
        "name",
        "state",
        "addr",
        "link",
        "rtt_ms",
        "last_seen_ms",
        "incarnation",
        "tags",
        "messages_in",
        "bytes_out",
    ] {
        assert!(peers["peers"][0].get(key).is_some(), "peer field {key}");
    }
    let (_, body) = curl(&n2.socket, &["http://localhost/v1/peers?tag=role:db"]);
    let db: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(db["peers"].as_array().unwrap().len(), 1);
    assert_eq!(db["peers"][0]["name"], "n1");
    let id = db["peers"][0]["id"].as_str().unwrap().to_string();
    let (code, body) = curl(
        &n2.socket,
        &[&format!("http://localhost/v1/peers/{}", &id[..10])],
    );
    assert_eq!(
        (
            code,
            serde_json::from_str::<Value>(&body).unwrap()["name"].clone()
        ),
        (200, Value::from("n1"))
    );
    let (code, body) = curl(&n2.socket, &["http://localhost/v1/peers/nobody"]);
    assert_eq!(code, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    let (code, _) = curl(&n1.socket, &["http://localhost/v1/health?min_peers=2"]);
    assert_eq!(code, 200);
    let (code, _) = curl(&n1.socket, &["http://localhost/v1/health?min_peers=3"]);
    assert_eq!(code, 503);
    let (code, body) = curl(&n1.socket, &["http://localhost/metrics"]);
    assert_eq!(code, 200);
    assert!(
        body.contains("constellation_peers{state=\"alive\"} 2"),
        "{body}"
    );
    assert!(body.contains("constellation_links_up 2"));

    // Bad requests get JSON errors, not hangs.
    let (code, body) = curl(
        &n1.socket,
        &[
            "-X",
            "POST",
            "-d",
            "{not json",
            "http://localhost/v1/messages",
        ],
    );
    assert_eq!(code, 400, "{body}");
    let (code, _) = curl(&n1.socket, &["http://localhost/v1/peers?state=sleepy"]);
    assert_eq!(code, 400);
    let (code, _) = curl(&n1.socket, &["http://localhost/v2/nothing"]);
    assert_eq!(code, 404);
    let (code, _) = curl(
        &n1.socket,
        &[
            "-X",
            "POST",
            "-d",
            r#"{"to":"ghost","payload":"x"}"#,
            "http://localhost/v1/messages",
        ],
    );
    assert_eq!(code, 404);
    let big = format!(r#"{{"to":null,"payload":"{}"}}"#, "x".repeat(1_100_000));
    let big_file = dir.path().join("big.json");
    std::fs::write(&big_file, big).unwrap();
    let (code, body) = curl(
        &n1.socket,
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", big_file.display()),
            "http://localhost/v1/messages",
        ],
    );
    assert_eq!(code, 413, "{body}");

    // CLI status and health.
    let out = n1.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("multicast loops back: yes") && text.contains("alive 2"),
        "{text}"
    );
    assert!(n1.cli(&["health", "--min-peers", "2"]).status.success());
    assert_eq!(
        n1.cli(&["health", "--min-peers", "5"]).status.code(),
        Some(1)
    );
    assert_eq!(n1.cli(&["send", "ghost", "x"]).status.code(), Some(1));
}

#[test]
fn messages_and_membership_changes_reach_the_event_streams() {
    let dir = TempDir::new("msg");
    let mut nodes = three(&dir);
    let w2 = Watch::start(&nodes[1]);
    let w3 = Watch::start(&nodes[2]);

    // Unicast, through the CLI, in order.
    for i in 0..5 {
        let out = nodes[0].cli(&["send", "n2", "--topic", "greet", &format!("hello {i}")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..5 {
        let m = w2.expect(|v| v["type"] == "message", "message on n2");
        assert_eq!(
            (m["from_name"].as_str(), m["topic"].as_str()),
            (Some("n1"), Some("greet"))
        );
        assert_eq!(m["payload"], format!("hello {i}"), "per-link order");
    }
    // Broadcast, through curl, binary payload.
    let (code, body) = curl(
        &nodes[0].socket,
        &[
            "-X",
            "POST",
            "-d",
            r#"{"to":null,"topic":"all","payload_b64":"AAEC/w=="}"#,
            "http://localhost/v1/messages",
        ],
    );
    assert_eq!(code, 200, "{body}");
    let res: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(res["results"].as_array().unwrap().len(), 2);
    for w in [&w2, &w3] {
        let m = w.expect(
            |v| v["type"] == "message" && v["topic"] == "all",
            "broadcast",
        );
        assert_eq!(m["payload_b64"], "AAEC/w==");
    }
    // Stdin as the message.
    let mut child = Command::new(bin())
        .args(["broadcast", "--topic", "stdin", "-", "--socket"])
        .arg(&nodes[0].socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    assert!(child.wait().unwrap().success());
    w3.expect(
        |v| v["topic"] == "stdin" && v["payload"] == "from stdin",
        "stdin broadcast",
    );

    // Join and leave on the stream.
    let n4 = Daemon::start(dir.path(), "n4", &peer_group(&nodes[0]), &[]);
    w2.expect(
        |v| v["type"] == "peer_joined" && v["peer"]["name"] == "n4",
        "n4 joined",
    );
    w2.expect(
        |v| v["type"] == "link_up" && v["peer"]["name"] == "n4",
        "link to n4 up",
    );
    let out = n4.cli(&["leave"]);
    assert!(out.status.success());
    w2.expect(
        |v| v["type"] == "peer_left" && v["peer"]["name"] == "n4",
        "n4 left",
    );

    // SIGTERM: clean exit, socket removed, peers see it left.
    nodes[2].signal("-TERM");
    assert_eq!(nodes[2].wait_exit(Duration::from_secs(3)), Some(0));
    assert!(!nodes[2].socket.exists(), "socket removed on shutdown");
    wait_until(Duration::from_secs(1), "n3 left on n1", || {
        nodes[0].state_of("n3").as_deref() == Some("left")
    });
}

fn peer_group(d: &Daemon) -> String {
    let (_, body) = curl(&d.socket, &["http://localhost/v1/self"]);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["group"].as_str().unwrap().to_string()
}

#[test]
fn crash_is_failed_and_restart_replaces_the_entry() {
    let dir = TempDir::new("crash");
    let nodes = three(&dir);
    let group = peer_group(&nodes[0]);
    let before: Value = nodes[0]
        .peers()
        .into_iter()
        .find(|p| p["name"] == "n3")
        .unwrap();
    nodes[2].signal("-KILL");
    let took = wait_until(Duration::from_secs(3), "n3 failed on n1 and n2", || {
        nodes[..2]
            .iter()
            .all(|n| n.state_of("n3").as_deref() == Some("failed"))
    });
    eprintln!("kill -9 detected in {took:?}");
    // The socket file is left behind by the killed daemon: a new one replaces it.
    assert!(nodes[2].socket.exists());
    let n3 = Daemon::start(dir.path(), "n3", &group, &[]);
    wait_until(Duration::from_secs(5), "n3 alive again on both", || {
        nodes[..2]
            .iter()
            .all(|n| n.state_of("n3").as_deref() == Some("alive"))
    });
    for n in &nodes[..2] {
        let entries: Vec<Value> = n
            .peers()
            .into_iter()
            .filter(|p| p["name"] == "n3")
            .collect();
        assert_eq!(entries.len(), 1, "single entry after restart");
        assert!(entries[0]["incarnation"].as_u64() > before["incarnation"].as_u64());
    }
    drop(n3);
}

#[test]
fn control_socket_rules_and_usage_errors() {
    let dir = TempDir::new("sock");
    let group = unique_group();
    let d = Daemon::start(dir.path(), "s1", &group, &[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A second daemon on the same path is refused, naming the path.
    let out = Command::new(bin())
        .args(support::loopback_args("s2", &group, &d.socket))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another constellationd is serving"), "{err}");

    // An over-long path fails before binding, naming the limit.
    let long = dir.path().join("x".repeat(120));
    let out = Command::new(bin())
        .args(support::loopback_args("x", &group, &long))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("107"));

    // Bad flag values: exit 2, one line naming the flag.
    for (flag, value) in [
        ("--ttl", "300"),
        ("--group", "10.1.2.3:5"),
        ("--beacon-interval", "soon"),
        ("--tag", "novalue"),
        ("--socket-mode", "0400"),
        ("--max-links", "1"),
        ("--max-links", "many"),
    ] {
        let out = Command::new(bin())
            .args(["run", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag}: {err}");
    }
    // Environment variables are flags too.
    let out = Command::new(bin())
        .args(["run"])
        .env("CONSTELLATION_TTL", "999")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin())
        .args(["run"])
        .env("CONSTELLATION_MAX_LINKS", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin())
        .args([
            "run",
            "--interface",
            "no-such-if9",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--interface"));

    // No daemon: exit 3, naming the path and how to change it.
    let out = Command::new(bin())
        .args(["peers", "--socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none.sock") && err.contains("--socket"),
        "{err}"
    );

    // Every subcommand has help with an example.
    for sub in [
        "run",
        "peers",
        "status",
        "watch",
        "send",
        "broadcast",
        "leave",
        "health",
    ] {
        let out = Command::new(bin()).args([sub, "--help"]).output().unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Example"),
            "{sub}"
        );
    }

    // Garbage on the control socket: an error status or a closed connection, and the daemon lives on.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _closed = s.read_to_end(&mut buf); // any answer; it must not hang
    assert!(buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 4"));
    assert!(
        d.cli(&["status"]).status.success(),
        "daemon survived garbage"
    );

    // A client that connects and says nothing is disconnected (5 s header timeout).
    let mut idle = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut one = [0u8; 64];
    let got = loop {
        match idle.read(&mut one) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue, // a signal, not an answer
            other => break other,
        }
    };
    assert!(
        got.is_ok(),
        "expected EOF or an answer, not {got:?} after {:?}",
        started.elapsed()
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(14),
        "idle client was not timed out"
    );
    assert!(
        waited >= Duration::from_secs(4),
        "idle client dropped too early ({waited:?})"
    );
}
