//! Peer filters with the real binary: `peers --name REGEX --tag KEY=REGEX
//! --state S` and the same parameters on `GET /v1/peers`, including the
//! refusals (exit 2 in the CLI, 400 in the API). Nodes on loopback.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{curl, unique_group, wait_until, Daemon, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

/// The names `peers --json ARGS` lists, sorted.
fn names(d: &Daemon, args: &[&str]) -> Vec<String> {
    let mut argv = vec!["peers", "--json"];
    argv.extend_from_slice(args);
    let out = d.cli(&argv);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// The names of `GET URI`'s answer (status 200 required).
fn api_names(d: &Daemon, uri: &str) -> Vec<String> {
    let (code, body) = curl(&d.socket, &[&format!("http://localhost{uri}")]);
    assert_eq!(code, 200, "{uri}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn peers_filter_by_name_tag_and_state_regexes() {
    let dir = TempDir::new("filters");
    let group = unique_group();
    let a = Daemon::start(
        dir.path(),
        "a",
        &group,
        &["--tag", "role=db", "--tag", "zone=eu-2"],
    );
    let w1 = Daemon::start(
        dir.path(),
        "web-1",
        &group,
        &["--tag", "role=web", "--tag", "zone=eu-1"],
    );
    let w2 = Daemon::start(
        dir.path(),
        "web-2",
        &group,
        &["--tag", "role=web", "--tag", "zone=us-1"],
    );
    wait_until(LIMIT, "3-node mesh", || {
        [&a, &w1, &w2].iter().all(|d| d.linked() == 2)
    });

    assert_eq!(names(&a, &["--name", "web-[0-9]+"]), ["web-1", "web-2"]);
    assert!(names(&a, &["--name", "web"]).is_empty(), "anchored");
    assert_eq!(
        names(&a, &["--tag", "role=web", "--tag", "zone=eu-.*"]),
        ["web-1"],
        "every tag must match"
    );
    assert!(names(&a, &["--tag", "role=we"]).is_empty(), "anchored");
    assert!(
        names(&a, &["--tag", "rack=.*"]).is_empty(),
        "a missing tag never matches"
    );
    assert_eq!(names(&w1, &["--tag", "zone=eu-.*"]), ["a"]);
    assert_eq!(
        names(&w1, &["--state", "alive", "--name", "a|web-2"]),
        ["a", "web-2"]
    );
    // The table too.
    let out = a.cli(&["peers", "--name", "web-2"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("web-2") && !table.contains("web-1"),
        "{table}"
    );

    // The same through the API.
    assert_eq!(api_names(&a, "/v1/peers?name=web-1"), ["web-1"]);
    assert_eq!(
        api_names(&a, "/v1/peers?tag=zone:eu-.%2A&state=alive"),
        ["web-1"]
    );
    assert_eq!(
        api_names(&a, "/v1/peers?name=web-.%2A&tag=role:web"),
        ["web-1", "web-2"]
    );

    // State: a killed node is failed, then listed by --state failed only.
    w2.signal("-KILL");
    wait_until(LIMIT, "web-2 failed", || {
        names(&a, &["--state", "failed"]) == ["web-2"]
    });
    assert_eq!(
        names(&a, &["--state", "alive", "--name", "web-.*"]),
        ["web-1"]
    );

    // Refusals: usage errors in the CLI, 400 in the API.
    for bad in [
        &["--name", "("][..],
        &["--tag", "role=(web"],
        &["--tag", "novalue"],
        &["--state", "sleepy"],
    ] {
        let mut argv = vec!["peers"];
        argv.extend_from_slice(bad);
        let out = a.cli(&argv);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(err.contains(bad[0]), "{bad:?}: {err}");
    }
    let err = String::from_utf8_lossy(&a.cli(&["peers", "--name", "web-("]).stderr).to_string();
    assert!(
        err.contains("invalid regex") && err.contains("unclosed"),
        "{err}"
    );
    let (code, body) = curl(&a.socket, &["http://localhost/v1/peers?name=%28"]);
    assert_eq!(code, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let msg = v["error"].as_str().unwrap();
    assert!(msg.starts_with("name: invalid regex"), "{msg}");
    let (code, body) = curl(&a.socket, &["http://localhost/v1/peers?tag=role:%5B"]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("tag role: invalid regex"), "{body}");
}
