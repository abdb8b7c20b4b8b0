//! Process tests of joining without multicast: seeds (by address and by
//! name, up early or late), membership carried over links, and a whole
//! cluster restarted from its remembered peers. Loopback only.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{unique_group, wait_until, Daemon, TempDir};

fn status(d: &Daemon) -> Value {
    let out = d.cli(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn listen(d: &Daemon) -> String {
    status(d)["listen"].as_str().unwrap().to_string()
}

fn meshed(nodes: &[&Daemon]) -> bool {
    nodes.iter().all(|d| d.linked() == nodes.len() - 1)
}

/// A TCP port that was free a moment ago (for nodes that must come back
/// on the same address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn start(dir: &TempDir, name: &str, extra: &[&str]) -> Daemon {
    // A group of its own per node: even if multicast were on, nobody would
    // hear anybody by beacon.
    let mut args = vec!["--no-multicast"];
    args.extend_from_slice(extra);
    Daemon::start(dir.path(), name, &unique_group(), &args)
}

#[test]
fn without_multicast_every_node_joins_through_one_seed() {
    let dir = TempDir::new("seed-join");
    let s1 = start(&dir, "s1", &[]);
    let seed = listen(&s1);
    let others: Vec<Daemon> = (2..=5)
        .map(|i| start(&dir, &format!("s{i}"), &["--seed", &seed]))
        .collect();
    let mut all: Vec<&Daemon> = vec![&s1];
    all.extend(others.iter());
    let took = wait_until(
        Duration::from_secs(15),
        "full mesh through one seed",
        || meshed(&all),
    );
    eprintln!("5 nodes meshed through one seed in {took:?}");
    // s5 never dialed s2 by seed: it learned of it over a link.
    let v = status(&others[3]);
    assert_eq!(v["multicast"], false);
    let seeds = v["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 1, "{v}");
    assert_eq!(seeds[0]["outcome"], "linked", "{v}");
    assert_eq!(seeds[0]["resolved"][0], seed.as_str());
    assert_eq!(v["counters"]["beacons_sent"], 0, "no multicast at all");
}

#[test]
fn a_seed_that_comes_up_late_is_joined_without_a_manual_step() {
    let dir = TempDir::new("seed-late");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let early = start(&dir, "early", &["--seed", &addr]);
    wait_until(
        Duration::from_secs(10),
        "the seed's failure reported",
        || status(&early)["seeds"][0]["outcome"] == "dial_failed",
    );
    let late = Daemon::start(
        dir.path(),
        "late",
        &unique_group(),
        &["--no-multicast", "--listen", &addr],
    );
    let took = wait_until(
        Duration::from_secs(20),
        "linked once the seed is up",
        || meshed(&[&early, &late]),
    );
    eprintln!("joined a late seed {took:?} after it started");
    let log = early.log_text();
    let failures = log.matches("not reachable").count();
    assert_eq!(failures, 1, "one log line per failure class: {log}");
    assert_eq!(log.matches("joined through seed").count(), 1, "{log}");
}

#[test]
fn a_seed_name_is_resolved_and_every_address_is_tried() {
    let dir = TempDir::new("seed-name");
    let s1 = start(&dir, "s1", &[]);
    let port = listen(&s1).rsplit_once(':').unwrap().1.to_string();
    let s2 = start(&dir, "s2", &["--seed", &format!("localhost:{port}")]);
    wait_until(Duration::from_secs(15), "joined by name", || {
        meshed(&[&s1, &s2])
    });
    let v = status(&s2);
    let resolved: Vec<&str> = v["seeds"][0]["resolved"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        resolved.contains(&format!("127.0.0.1:{port}").as_str()),
        "{v}"
    );
}

#[test]
fn a_whole_cluster_restarted_without_multicast_finds_itself_from_its_state_dirs() {
    let dir = TempDir::new("seed-restart");
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let state = |i: usize| dir.path().join(format!("state{i}"));
    let run = |i: usize, seed: Option<&str>| {
        let listen = format!("127.0.0.1:{}", ports[i]);
        let st = state(i);
        let mut args = vec![
            "--no-multicast",
            "--listen",
            &listen,
            "--state-dir",
            st.to_str().unwrap(),
        ];
        if let Some(s) = seed {
            args.extend(["--seed", s]);
        }
        Daemon::start(dir.path(), &format!("r{i}"), &unique_group(), &args)
    };
    let seed = format!("127.0.0.1:{}", ports[0]);
    let mut nodes: Vec<Daemon> = (0..4)
        .map(|i| run(i, (i > 0).then_some(seed.as_str())))
        .collect();
    wait_until(Duration::from_secs(15), "first mesh", || {
        meshed(&nodes.iter().collect::<Vec<_>>())
    });
    // Every node remembers the other three (written within a second).
    wait_until(Duration::from_secs(10), "peers remembered", || {
        (0..4).all(|i| {
            std::fs::read_to_string(state(i).join("peers.json"))
                .map(|t| t.matches("127.0.0.1:").count() == 3)
                .unwrap_or(false)
        })
    });
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state(1).join("peers.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    for n in &mut nodes {
        n.signal("-TERM");
        assert_eq!(n.wait_exit(Duration::from_secs(10)), Some(0));
    }
    drop(nodes);
    // All four again, no seed flag anywhere.
    let start = std::time::Instant::now();
    let nodes: Vec<Daemon> = (0..4).map(|i| run(i, None)).collect();
    let took = wait_until(Duration::from_secs(15), "mesh from memory", || {
        meshed(&nodes.iter().collect::<Vec<_>>())
    });
    eprintln!(
        "whole cluster restarted from state dirs: meshed {took:?} after the last start, {:?} after the first",
        start.elapsed()
    );
    // A corrupt memory is reported and ignored, never fatal.
    drop(nodes);
    std::fs::write(
        state(0).join("peers.json"),
        b"{\"version\": 1, \"peers\": [",
    )
    .unwrap();
    let lone = run(0, None);
    wait_until(Duration::from_secs(10), "corrupt file reported", || {
        lone.log_text().contains("remembered peers not used")
    });
    assert!(status(&lone)["name"] == "r0", "still running");
}
