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
