//! Process tests of the automation features with the real binary: runtime
//! tags, queries, cluster-wide keys, force-leave.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{http, unique_group, wait_until, Daemon, EventStream, TempDir};

const LIMIT: Duration = Duration::from_secs(20);

/// `n` nodes named `n1`.. on one group, every one linked to every other.
/// `extra(i)` adds flags to node `i` (0-based).
fn mesh(dir: &TempDir, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Vec<Daemon> {
    let group = unique_group();
    let nodes: Vec<Daemon> = (0..n)
        .map(|i| {
            let flags = extra(i);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            Daemon::start(dir.path(), &format!("n{}", i + 1), &group, &flags)
        })
        .collect();
    for d in &nodes {
        wait_until(LIMIT, &format!("{} linked to all", d.name), || {
            d.linked() == n - 1
        });
    }
    nodes
}

/// Reads `ev` until an event satisfies `want`; panics at the end of the
/// stream. Returns every event read (the match last).
fn read_until(ev: &mut EventStream, what: &str, want: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let Some(e) = ev.next() else {
            panic!("event stream ended waiting for {what}; saw {seen:?}");
        };
        let hit = want(&e);
        seen.push(e);
        if hit {
            return seen;
        }
    }
}

fn transitions(d: &Daemon) -> Value {
    support::self_info(&d.socket)["transitions"].clone()
}

fn updated_with(
    name: &'static str,
    key: &'static str,
    value: Option<&'static str>,
) -> impl Fn(&Value) -> bool {
    move |e: &Value| {
        e["type"] == "peer_updated"
            && e["peer"]["name"] == name
            && match value {
                Some(v) => e["peer"]["tags"][key] == v,
                None => e["peer"]["tags"].get(key).is_none(),
            }
    }
}

#[test]
fn runtime_tags_reach_every_peer_without_a_flap_and_survive_a_restart() {
    let dir = TempDir::new("auto-tags");
    let state = dir.path().join("n1-state");
    let state_s = state.display().to_string();
    let nodes = mesh(&dir, 3, |i| {
        if i == 0 {
            vec![
                "--tag".into(),
                "role=web".into(),
                "--state-dir".into(),
                state_s.clone(),
            ]
        } else {
            vec![]
        }
    });
    let mut streams: Vec<EventStream> = nodes[1..]
        .iter()
        .map(|d| EventStream::open(&d.socket).expect("subscribe"))
        .collect();

    let out = nodes[0].cli(&["tags", "set", "role=db", "zone=b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sent to 2 linked peers"), "{text}");
    assert!(
        text.contains("role=db") && text.contains("zone=b"),
        "{text}"
    );
    for ev in &mut streams {
        read_until(ev, "role=db", updated_with("n1", "role", Some("db")));
    }
    // The CLI's view of the peers agrees.
    for d in &nodes[1..] {
        let p = d.peers().into_iter().find(|p| p["name"] == "n1").unwrap();
        assert_eq!(
            (&p["tags"]["role"], &p["tags"]["zone"]),
            (&"db".into(), &"b".into())
        );
    }

    // Delete over the API (curl-able), the same way.
    let (code, body) = http(
        &nodes[0].socket,
        "PATCH",
        "/v1/self/tags",
        br#"{"delete": ["zone"]}"#,
    );
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info["version"].as_u64(), &info["changed"]),
        (Some(2), &Value::Bool(true))
    );
    for ev in &mut streams {
        read_until(ev, "zone deleted", updated_with("n1", "zone", None));
    }

    // A bad tag is a 400 and changes nothing.
    let (code, _) = http(
        &nodes[0].socket,
        "PATCH",
        "/v1/self/tags",
        br#"{"set": {"bad key": "x"}}"#,
    );
    assert_eq!(code, 400);
    let out = nodes[0].cli(&["tags", "set", "novalue"]);
    assert_eq!(out.status.code(), Some(2), "usage error");

    // No link went down, nobody restarted or was suspected.
    for d in &nodes[1..] {
        let t = transitions(d);
        for kind in ["link_down", "peer_restarted", "peer_suspect", "peer_failed"] {
            assert!(t.get(kind).is_none(), "{}: {kind} in {t}", d.name);
        }
    }

    // Restarted with the same state dir, n1 keeps its runtime tags.
    let mut nodes = nodes;
    let n1 = nodes.remove(0);
    n1.signal("-TERM");
    let mut n1 = n1;
    assert_eq!(n1.wait_exit(LIMIT), Some(0));
    let group = {
        let args = support::self_info(&nodes[0].socket);
        args["group"].as_str().unwrap().to_string()
    };
    let again = Daemon::start(
        dir.path(),
        "n1",
        &group,
        &["--tag", "role=web", "--state-dir", &state_s],
    );
    let out = again.cli(&["tags", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tags"], serde_json::json!({"role": "db"}), "{v}");
    wait_until(LIMIT, "peers see n1's saved tags after its restart", || {
        nodes.iter().all(|d| {
            d.peers()
                .iter()
                .any(|p| p["name"] == "n1" && p["state"] == "alive" && p["tags"]["role"] == "db")
        })
    });
}

/// Follows `d`'s events until a `query` event named `name`; returns it.
fn next_query(ev: &mut EventStream, name: &str) -> Value {
    read_until(ev, "a query event", |e| {
        e["type"] == "query" && e["name"] == name
    })
    .pop()
    .unwrap()
}

fn answer(d: &Daemon, id: &str, text: &str) -> (u16, String) {
    let body = serde_json::json!({ "payload": text }).to_string();
    http(
        &d.socket,
        "POST",
        &format!("/v1/queries/{id}/responses"),
        body.as_bytes(),
    )
}

#[test]
fn a_query_with_a_tag_filter_is_answered_by_matching_nodes_only_and_times_out_the_slow_one() {
    let dir = TempDir::new("auto-query");
    let role = |i: usize| match i {
        1..=3 => vec!["--tag".to_string(), "role=db".to_string()],
        4 => vec!["--tag".to_string(), "role=web".to_string()],
        _ => vec![],
    };
    let nodes = mesh(&dir, 5, role);
    // Answerers: local programs following /v1/events on n2..n4 (n4 slow:
    // it answers only after the asker has given up), and n5 (not asked).
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (slow_tx, slow_rx) = std::sync::mpsc::channel::<(u16, String)>();
    let mut answerers = Vec::new();
    let mut streams: Vec<EventStream> = nodes
        .iter()
        .map(|d| EventStream::open(&d.socket).expect("subscribe"))
        .collect();
    let slow_stream = streams.remove(3);
    let slow_socket = nodes[3].socket.clone();
    answerers.push(std::thread::spawn(move || {
        let mut ev = slow_stream;
        let q = next_query(&mut ev, "load");
        let heard = std::time::Instant::now();
        done_rx.recv().unwrap(); // the asker's summary is out
                                 // A slow program: it answers past the query's timeout as this
                                 // node counts it (from when it received the query).
        let timeout = Duration::from_millis(q["timeout_ms"].as_u64().unwrap() + 50);
        std::thread::sleep(timeout.saturating_sub(heard.elapsed()));
        let body = br#"{"payload": "too late"}"#;
        let uri = format!("/v1/queries/{}/responses", q["id"].as_str().unwrap());
        slow_tx
            .send(http(&slow_socket, "POST", &uri, body))
            .unwrap();
    }));
    for (i, mut ev) in streams
        .drain(..)
        .enumerate()
        .filter(|(i, _)| (1..=2).contains(i))
    {
        let socket = nodes[i].socket.clone();
        let name = nodes[i].name.clone();
        answerers.push(std::thread::spawn(move || {
            let q = next_query(&mut ev, "load");
            assert_eq!(
                (&q["payload"], &q["from"]["name"]),
                (&"hello".into(), &"n1".into())
            );
            let id = q["id"].as_str().unwrap();
            let body = serde_json::json!({ "payload": format!("{name} load 0.{}", i) });
            let uri = format!("/v1/queries/{id}/responses");
            let (code, text) = http(&socket, "POST", &uri, body.to_string().as_bytes());
            assert_eq!(code, 200, "{text}");
            // A node never answers one query twice.
            let (code, _) = http(&socket, "POST", &uri, br#"{"payload": "again"}"#);
            assert_eq!(code, 409);
        }));
    }

    let out = nodes[0].cli(&[
        "query",
        "load",
        "hello",
        "--tag",
        "role=db",
        "--timeout",
        "3s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    done_tx.send(()).unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(lines[0]["type"], "asked");
    assert_eq!(names(&lines[0]["asked"]), ["n2", "n3", "n4"]);
    let mut answered: Vec<String> = lines
        .iter()
        .filter(|l| l["type"] == "answer")
        .map(|l| l["from"]["name"].as_str().unwrap().to_string())
        .collect();
    answered.sort();
    assert_eq!(answered, ["n2", "n3"]);
    let done = lines.last().unwrap();
    assert_eq!(done["type"], "done", "{lines:?}");
    assert_eq!(
        (&done["asked"], &done["acked"], &done["answered"]),
        (&3.into(), &3.into(), &2.into()),
        "n5 (role=web) and n1 never ack: {done}"
    );
    assert_eq!(names(&done["timed_out"]), ["n4"]);
    let (code, text) = slow_rx.recv().unwrap();
    assert_eq!(code, 410, "an answer past the timeout is refused: {text}");
    for a in answerers {
        a.join().unwrap();
    }

    // Counted where it happened.
    let q = |d: &Daemon| support::self_info(&d.socket)["counters"]["queries"].clone();
    assert_eq!(q(&nodes[0])["asked"], 1);
    assert_eq!(
        (&q(&nodes[1])["delivered"], &q(&nodes[1])["answered"]),
        (&1.into(), &1.into())
    );
    assert_eq!(q(&nodes[4])["delivered"], 0, "n5 was not asked");

    // The human rendering, and the errors.
    let out = nodes[0].cli(&["query", "load", "--node", "n5", "--timeout", "200ms"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("asked 1 nodes: n5"), "{text}");
    assert!(
        text.contains("asked 1, acked 1, answered 0, timed out 1: n5"),
        "{text}"
    );
    let out = nodes[0].cli(&["query", "_keys"]);
    assert_eq!(out.status.code(), Some(1), "reserved names are refused");
    let (code, _) = answer(&nodes[1], "nonsense", "x");
    assert_eq!(code, 400);
    let (code, _) = answer(&nodes[1], &format!("{}-99", "0".repeat(32)), "x");
    assert_eq!(code, 404);
}

fn keygen() -> String {
    let out = std::process::Command::new(support::bin())
        .arg("keygen")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn cluster_wide_key_rotation_reports_each_node_and_the_stopped_one_as_failed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("auto-keys");
    let old = keygen();
    let new = keygen();
    let files: Vec<String> = (0..5)
        .map(|i| {
            let p = dir.path().join(format!("n{}.key", i + 1));
            std::fs::write(&p, format!("{old}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p.display().to_string()
        })
        .collect();
    let mut nodes = mesh(&dir, 5, |i| vec!["--secret-file".into(), files[i].clone()]);

    let out = nodes[0].cli(&["keys", "install", "--cluster", &new]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("installed on 5/5 nodes"), "{text}");
    // Saved on every node.
    for f in &files {
        assert!(std::fs::read_to_string(f).unwrap().contains(&new), "{f}");
    }

    for d in &nodes {
        let t = transitions(d);
        for kind in ["link_down", "peer_suspect"] {
            assert!(
                t.get(kind).is_none(),
                "{}: {kind} after install: {t}",
                d.name
            );
        }
    }

    // n5 stops; the next step reaches the other four and names it.
    let mut n5 = nodes.pop().unwrap();
    n5.signal("-KILL");
    n5.wait_exit(LIMIT);
    wait_until(LIMIT, "n1 sees n5 failed", || {
        nodes[0].state_of("n5").as_deref() == Some("failed")
    });
    let out = nodes[0].cli(&["keys", "use", "--cluster", &new]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed node fails the command: {text}"
    );
    assert!(text.contains("now primary on 4/5 nodes"), "{text}");
    assert!(
        text.contains("failed: n5: no answer") && text.contains("peer failed"),
        "{text}"
    );

    let out = nodes[1].cli(&["keys", "list", "--cluster", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v["nodes"], &v["ok"]), (&5.into(), &4.into()), "{v}");
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{v}");
    let primary: Vec<_> = keys
        .iter()
        .filter(|k| k["primary_on"].as_array().unwrap().len() == 4)
        .collect();
    assert_eq!(primary.len(), 1, "the new key is primary on the four: {v}");
    assert!(keys.iter().all(|k| k["nodes"] == 4));

    // The links stayed up through the rotation (sealed with the new key):
    // the one link lost on each node is n5's.
    for d in &nodes {
        assert_eq!(d.linked(), 3, "{}", d.name);
        let t = transitions(d);
        assert!(t.get("peer_restarted").is_none(), "{}: {t}", d.name);
        assert_eq!(t["link_down"], 1, "{}: {t}", d.name);
    }
    // Bad input: one 400, nothing fanned out.
    let out = nodes[0].cli(&["keys", "install", "--cluster", "not-a-key"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn remove_marks_a_failed_node_left_everywhere_refuses_a_live_one_and_prunes() {
    let dir = TempDir::new("auto-remove");
    let mut nodes = mesh(&dir, 4, |_| vec![]);
    let out = nodes[0].cli(&["remove", "n2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("409") && err.contains("alive"), "{err}");
    let (code, _) = http(&nodes[0].socket, "POST", "/v1/peers/nobody/remove", b"");
    assert_eq!(code, 404);

    let mut n4 = nodes.pop().unwrap();
    n4.signal("-KILL");
    n4.wait_exit(LIMIT);
    for d in &nodes {
        wait_until(LIMIT, &format!("{} sees n4 failed", d.name), || {
            d.state_of("n4").as_deref() == Some("failed")
        });
    }
    let out = nodes[1].cli(&["remove", "n4"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("n4 marked left on 3/3 nodes"), "{text}");
    // Marked left on every node by the time the command returns.
    for d in &nodes {
        assert_eq!(d.state_of("n4").as_deref(), Some("left"), "{}", d.name);
    }
    let (code, body) = http(
        &nodes[2].socket,
        "POST",
        "/v1/peers/n4/remove",
        br#"{"prune": true}"#,
    );
    assert_eq!(code, 200, "{body}");
    for d in &nodes {
        assert_eq!(d.state_of("n4"), None, "{} still lists n4", d.name);
        assert_eq!(d.linked(), 2);
    }
}

/// The lines of a `query --json` run, which must succeed.
fn query_lines(d: &Daemon, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["query"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = d.cli(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn query_handlers_answer_with_their_output_and_a_failing_one_gives_no_answer() {
    let dir = TempDir::new("auto-qhandler");
    for program in ["/bin/cat", "/bin/false"] {
        assert!(std::path::Path::new(program).exists(), "{program} needed");
    }
    let handlers = |_| {
        ["query:echo=/bin/cat", "query:fail=/bin/false"]
            .iter()
            .flat_map(|h| ["--handler".to_string(), h.to_string()])
            .collect()
    };
    let nodes = mesh(&dir, 3, handlers);

    // Every node (the asker too) runs `cat` on the payload: 3 answers, each
    // the payload, and the summary comes as soon as the last one is in.
    let payload = "hello \u{e9}\n{\"x\": 1}";
    let lines = query_lines(&nodes[0], &["echo", payload, "--timeout", "10s"]);
    let answers: Vec<&Value> = lines.iter().filter(|l| l["type"] == "answer").collect();
    assert_eq!(answers.len(), 3, "{lines:?}");
    for a in &answers {
        assert_eq!(a["payload"], payload, "{a}");
    }
    let mut from: Vec<&str> = answers
        .iter()
        .map(|a| a["from"]["name"].as_str().unwrap())
        .collect();
    from.sort();
    assert_eq!(from, ["n1", "n2", "n3"]);
    let done = lines.last().unwrap();
    assert_eq!(
        (&done["type"], &done["answered"], &done["timed_out"]),
        (&"done".into(), &3.into(), &Value::Array(vec![])),
        "{done}"
    );

    // A handler that fails answers nothing; the asker counts every node as
    // not answering, and each node counts the failed run.
    let lines = query_lines(&nodes[0], &["fail", "x", "--timeout", "1500ms"]);
    let done = lines.last().unwrap();
    assert_eq!(
        (&done["acked"], &done["answered"]),
        (&3.into(), &0.into()),
        "{done}"
    );
    assert_eq!(done["timed_out"].as_array().unwrap().len(), 3, "{done}");
    for d in &nodes {
        wait_until(LIMIT, &format!("{}: failed run counted", d.name), || {
            support::self_info(&d.socket)["handlers"]["failed"] == 1
        });
        let info = support::self_info(&d.socket);
        assert_eq!(info["handlers"]["succeeded"], 1, "the echo run: {info}");
        assert_eq!(
            info["counters"]["queries"]["answered"], 1,
            "the echo answer only: {info}"
        );
    }
}
