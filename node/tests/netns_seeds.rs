//! Multi-host tests of joining where multicast does not reach: two subnets
//! behind a router (multicast is not routed), multicast dropped by a
//! firewall, and a seed name whose addresses change in the hosts file.
//! Every node lives in a network namespace of its own; the bridges and the
//! router live in namespaces of their own too, and every address exists
//! only inside them. Nothing touches the host's interfaces.
//!
//! Needs root, `ip` (iproute2), `sysctl` and `nft`. Where not root the test
//! fails saying so, unless CONSTELLATION_SKIP_NETNS=1 is set. The lab is
//! `support::netns::Lab`.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::netns::Lab;
use support::{wait_until, Daemon, TempDir};

fn status(d: &Daemon) -> Value {
    let out = d.cli(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// True when `d` lists exactly the nodes named `h{j}` for `j` in `others`,
/// each once, alive with its link up, and nothing else.
fn table_is(d: &Daemon, others: &[usize]) -> bool {
    let peers = d.peers();
    let want: BTreeSet<String> = others.iter().map(|j| format!("h{j}")).collect();
    let got: BTreeSet<String> = peers
        .iter()
        .filter(|p| p["state"] == "alive" && p["link"] == "up")
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    peers.len() == want.len() && got == want
}

/// Every node `i` in `nodes` lists all the others of `nodes`, and only them.
fn full(lab: &Lab, nodes: &[usize]) -> bool {
    nodes.iter().all(|&i| {
        let others: Vec<usize> = nodes.iter().copied().filter(|&j| j != i).collect();
        table_is(lab.node(i), &others)
    })
}

/// Transition counters of a node (`/v1/self`).
fn transitions(d: &Daemon) -> Value {
    support::self_info(&d.socket)["transitions"].clone()
}

/// The remembered peers of a node (its `peers.json`), if written yet.
fn remembered(state: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(state.join("peers.json")).unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or_default();
    v["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The addresses a node's `status` lists as seeds (given and remembered)
/// with their outcomes.
fn seed_outcomes(d: &Daemon) -> Vec<(String, String)> {
    status(d)["seeds"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["seed"].as_str().unwrap_or("").to_string(),
                        s["outcome"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_subnets_behind_a_router_join_through_one_seed_and_survive_its_loss() {
    let Some(mut lab) = Lab::new() else { return };
    let dir = TempDir::new("nsseed-router");
    lab.bridge("br1");
    lab.bridge("br2");
    for i in 1..=3 {
        lab.host(i, &format!("10.78.1.{i}/24"), "br1");
    }
    for i in 4..=6 {
        lab.host(i, &format!("10.78.2.{i}/24"), "br2");
    }
    lab.router(&[("br1", "10.78.1.254/24"), ("br2", "10.78.2.254/24")]);
    for i in 1..=3 {
        lab.default_route(i, "10.78.1.254");
    }
    for i in 4..=6 {
        lab.default_route(i, "10.78.2.254");
    }
    let state = |i: usize| dir.path().join(format!("state{i}"));
    let state_arg = |i: usize| state(i).to_str().unwrap().to_string();
    let all = [1, 2, 3, 4, 5, 6];

    // Everyone but h1, multicast only: each side finds its own, and
    // nothing crosses the router.
    let t0 = Instant::now();
    for i in 2..=6 {
        let st = state_arg(i);
        lab.start(dir.path(), i, &["--state-dir", &st]);
    }
    let took = wait_until(Duration::from_secs(15), "each side meshed", || {
        full(&lab, &[2, 3]) && full(&lab, &[4, 5, 6])
    });
    eprintln!("multicast alone: each side meshed {took:?} after the last start, nothing across the router");

    // h1 joins with one seed on the other side.
    let st = state_arg(1);
    lab.start(dir.path(), 1, &["--state-dir", &st, "--seed", "10.78.2.4"]);
    let took = wait_until(
        Duration::from_secs(15),
        "full tables on all 6 through one seed",
        || full(&lab, &all),
    );
    eprintln!(
        "router, one seed: full tables on all 6 nodes {took:?} after h1 started ({:?} after the first node started)",
        t0.elapsed()
    );
    wait_until(Duration::from_secs(15), "h1's seed judged linked", || {
        let v = status(lab.node(1));
        v["seeds"][0]["outcome"] == "linked" && v["seeds"][0]["resolved"][0] == "10.78.2.4:6777"
    });

    // Every node remembers the five others (written within a second).
    wait_until(Duration::from_secs(10), "peers remembered", || {
        all.iter().all(|&i| remembered(&state(i)).len() == 5)
    });

    // The seed h4 crashes: the others stay linked to each other, across
    // the router too (direct TCP links, nothing goes through h4).
    let crashed = Instant::now();
    lab.crash(4);
    let rest = [1, 2, 3, 5, 6];
    let took = wait_until(Duration::from_secs(10), "h4 failed on the others", || {
        rest.iter()
            .all(|&i| lab.node(i).state_of("h4").as_deref() == Some("failed"))
    });
    eprintln!("seed h4 killed: failed on the other five after {took:?}");
    for &i in &rest {
        let d = lab.node(i);
        let peers = d.peers();
        for p in &peers {
            if p["name"] != "h4" {
                assert!(p["state"] == "alive" && p["link"] == "up", "h{i}: {p}");
            }
        }
        assert_eq!(peers.len(), 5, "h{i}: {peers:?}");
        let t = transitions(d);
        assert_eq!(t["peer_failed"], 1, "h{i}: only h4 failed: {t}");
    }

    // h4 again, no seed flag: back from its state dir.
    let st = state_arg(4);
    lab.start(dir.path(), 4, &["--state-dir", &st]);
    let took = wait_until(Duration::from_secs(15), "h4 rejoined", || full(&lab, &all));
    eprintln!(
        "h4 restarted with its state dir: full tables again {took:?} after its start ({:?} after the crash)",
        crashed.elapsed()
    );
    // Its remembered peers across the router were its seeds.
    wait_until(
        Duration::from_secs(15),
        "h4's remembered peers linked",
        || {
            let seeds = seed_outcomes(lab.node(4));
            (1..=3).all(|i| {
                let addr = format!("10.78.1.{i}:6777");
                seeds.iter().any(|(s, o)| *s == addr && o == "linked")
            })
        },
    );

    // The node that had the seed flag crashes, and comes back without it
    // (once it remembers h4 again: h4's failure was written at once, its
    // return within a second).
    wait_until(Duration::from_secs(10), "h1 remembers h4 again", || {
        remembered(&state(1)).len() == 5
    });
    lab.crash(1);
    let rest = [2, 3, 4, 5, 6];
    wait_until(Duration::from_secs(10), "h1 failed on the others", || {
        rest.iter()
            .all(|&i| lab.node(i).state_of("h1").as_deref() == Some("failed"))
    });
    for &i in &rest {
        let peers = lab.node(i).peers();
        for p in peers.iter().filter(|p| p["name"] != "h1") {
            assert!(p["state"] == "alive" && p["link"] == "up", "h{i}: {p}");
        }
        assert_eq!(peers.len(), 5, "h{i}: {peers:?}");
    }
    let st = state_arg(1);
    lab.start(dir.path(), 1, &["--state-dir", &st]);
    let took = wait_until(Duration::from_secs(15), "h1 rejoined", || full(&lab, &all));
    eprintln!(
        "h1 restarted with its state dir and no --seed: full tables again {took:?} after its start"
    );
    assert_eq!(
        seed_outcomes(lab.node(1)).len(),
        5,
        "its five remembered peers are its seeds"
    );
    wait_until(
        Duration::from_secs(15),
        "h1's remembered peers linked",
        || {
            let seeds = seed_outcomes(lab.node(1));
            (4..=6).all(|i| {
                let addr = format!("10.78.2.{i}:6777");
                seeds.iter().any(|(s, o)| *s == addr && o == "linked")
            })
        },
    );
}

#[test]
fn multicast_dropped_by_a_firewall_six_nodes_join_through_one_seed_and_restart_from_memory() {
    let Some(mut lab) = Lab::new() else { return };
    let dir = TempDir::new("nsseed-nomcast");
    lab.bridge("br1");
    let all: Vec<usize> = (1..=6).collect();
    for &i in &all {
        lab.host(i, &format!("10.78.3.{i}/24"), "br1");
        lab.drop_multicast(i);
    }
    let state = |i: usize| dir.path().join(format!("state{i}"));
    let args = |i: usize, seed: bool| -> Vec<String> {
        let mut a = vec!["--state-dir".to_string(), state(i).display().to_string()];
        if seed && i != 1 {
            a.extend(["--seed".to_string(), "10.78.3.1".to_string()]);
        }
        a
    };
    let start_all = |lab: &mut Lab, seed: bool| {
        for &i in &all {
            let a = args(i, seed);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            lab.start(dir.path(), i, &a);
        }
    };

    // Multicast on (the default) but dropped: only the seed brings them in.
    let t0 = Instant::now();
    start_all(&mut lab, true);
    let started = t0.elapsed();
    let took = wait_until(
        Duration::from_secs(15),
        "full tables through one seed",
        || full(&lab, &all),
    );
    eprintln!(
        "multicast dropped, one seed: full tables on all 6 {took:?} after the last start ({:?} after the first; starting took {started:?})",
        t0.elapsed()
    );
    // The firewall did drop the beacons: nobody heard one.
    for &i in &all {
        assert!(
            lab.multicast_dropped(i) > 0,
            "h{i}: the rule dropped nothing"
        );
        let v = status(lab.node(i));
        assert_eq!(v["counters"]["beacons_received"], 0, "h{i}: {v}");
    }
    wait_until(Duration::from_secs(10), "peers remembered", || {
        all.iter().all(|&i| remembered(&state(i)).len() == 5)
    });

    // The whole cluster stops at once (SIGTERM), then starts again with no
    // seed flag anywhere.
    for &i in &all {
        lab.node(i).signal("-TERM");
    }
    for &i in &all {
        let code = lab.node_mut(i).wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(0), "h{i} stopped cleanly");
    }
    for &i in &all {
        assert!(
            !remembered(&state(i)).is_empty(),
            "h{i} still remembers someone"
        );
    }
    let t0 = Instant::now();
    start_all(&mut lab, false);
    let started = t0.elapsed();
    let took = wait_until(Duration::from_secs(15), "full tables from memory", || {
        full(&lab, &all)
    });
    eprintln!(
        "multicast dropped, whole cluster restarted with no seed flag: full tables {took:?} after the last start ({:?} after the first; starting took {started:?})",
        t0.elapsed()
    );
}

#[test]
fn a_seed_name_is_resolved_again_until_it_names_live_nodes_and_every_address_is_joined() {
    let Some(mut lab) = Lab::new() else { return };
    let dir = TempDir::new("nsseed-dns");
    lab.bridge("br1");
    for i in 1..=3 {
        lab.host(i, &format!("10.78.4.{i}/24"), "br1");
    }
    // At first the name points where no node is (no host has 10.78.4.99).
    lab.hosts_file(1, "10.78.4.99 seeds.cluster.test\n");
    // No multicast anywhere: h2 and h3 only meet through h1.
    lab.start(dir.path(), 2, &["--no-multicast"]);
    lab.start(dir.path(), 3, &["--no-multicast"]);
    lab.start(
        dir.path(),
        1,
        &["--no-multicast", "--seed", "seeds.cluster.test"],
    );
    wait_until(
        Duration::from_secs(30),
        "the dead address judged a failure",
        || status(lab.node(1))["seeds"][0]["outcome"] == "dial_failed",
    );
    let v = status(lab.node(1));
    assert_eq!(
        v["seeds"][0]["resolved"],
        serde_json::json!(["10.78.4.99:6777"]),
        "{v}"
    );
    assert_eq!(lab.node(1).peers().len(), 0);

    // The name now lists the two live nodes; h1 is not restarted.
    lab.hosts_file(
        1,
        "10.78.4.2 seeds.cluster.test\n10.78.4.3 seeds.cluster.test\n",
    );
    let took = wait_until(Duration::from_secs(30), "h1 joined both", || {
        full(&lab, &[1, 2, 3])
    });
    eprintln!(
        "seed name re-resolved: h1 linked to both of its addresses, and they to each other, {took:?} after the hosts file changed"
    );
    // One name, two addresses, both in `status`.
    let both = serde_json::json!(["10.78.4.2:6777", "10.78.4.3:6777"]);
    wait_until(Duration::from_secs(15), "the seed judged linked", || {
        let v = status(lab.node(1));
        v["seeds"][0]["outcome"] == "linked" && v["seeds"][0]["resolved"] == both
    });
    // h2 never heard of h3 but through h1 (its own seed list is empty).
    assert!(status(lab.node(2))["seeds"]
        .as_array()
        .is_none_or(|a| a.is_empty()));
}
