//! The bounded overlay (`--max-links`) with real processes on loopback:
//! every node lists every member while linking to a bounded few,
//! broadcasts, unicasts and queries reach members without a link, and a
//! crash of several nodes at once reaches every survivor over the overlay.
//!
//! Each node runs on interface lo with multicast TTL 0, a TCP port the OS
//! picks and a multicast group no other test uses. The process count is
//! `CONSTELLATION_OVERLAY_NODES` (default 48); figures go to standard error
//! (`cargo test -p constellationd --test overlay -- --nocapture`).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::{http, unique_group, wait_until, Daemon, EventStream, TempDir};

/// `--max-links` of every node.
const K: usize = 6;

/// The peers a node lists, as (name, state, link) triples; empty if it does
/// not answer.
fn peers(d: &Daemon) -> Vec<(String, String, String)> {
    let (status, body) = http(&d.socket, "GET", "/v1/peers", b"");
    if status != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                    (s("name"), s("state"), s("link"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Does `d` list exactly `alive` as live (alive, or suspect for a moment
/// on a busy machine) and `failed` as failed (and nobody else)?
fn lists(d: &Daemon, alive: &BTreeSet<String>, failed: &BTreeSet<String>) -> bool {
    let listed = peers(d);
    let is = |states: &[&str]| -> BTreeSet<String> {
        listed
            .iter()
            .filter(|(_, s, _)| states.contains(&s.as_str()))
            .map(|(n, _, _)| n.clone())
            .collect()
    };
    listed.len() == alive.len() + failed.len()
        && is(&["alive", "suspect"]) == *alive
        && is(&["failed"]) == *failed
}

/// (min, mean, max) of `xs`.
fn spread(xs: &[usize]) -> (usize, f64, usize) {
    let min = xs.iter().copied().min().unwrap_or(0);
    let max = xs.iter().copied().max().unwrap_or(0);
    let mean = xs.iter().sum::<usize>() as f64 / xs.len().max(1) as f64;
    (min, mean, max)
}

#[test]
fn forty_eight_nodes_with_max_links_6_converge_and_see_a_crash_of_five() {
    let n: usize = std::env::var("CONSTELLATION_OVERLAY_NODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    let dir = TempDir::new("overlay");
    let group = unique_group();
    let k = K.to_string();
    let started = Instant::now();
    let mut nodes: Vec<Daemon> = (1..=n)
        .map(|i| {
            Daemon::start_logging(
                dir.path(),
                &format!("o{i}"),
                &group,
                &["--max-links", &k],
                "info",
            )
        })
        .collect();
    let all_started = started.elapsed();
    let names: Vec<String> = nodes.iter().map(|d| d.name.clone()).collect();
    let others =
        |me: &str| -> BTreeSet<String> { names.iter().filter(|x| *x != me).cloned().collect() };
    let none = BTreeSet::new();

    // One full table everywhere: n - 1 peers listed alive on every node.
    let converged = {
        let start = Instant::now();
        loop {
            if nodes.iter().all(|d| lists(d, &others(&d.name), &none)) {
                break start.elapsed();
            }
            if start.elapsed() > Duration::from_secs(120) {
                // What each node lists instead, for the failure message.
                let seen: Vec<String> = nodes
                    .iter()
                    .map(|d| {
                        let listed = peers(d);
                        let count = |st: &str| listed.iter().filter(|(_, s, _)| s == st).count();
                        format!(
                            "{}: {} alive, {} suspect, {} listed",
                            d.name,
                            count("alive"),
                            count("suspect"),
                            listed.len()
                        )
                    })
                    .collect();
                panic!("no full table in 120 s: {seen:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    eprintln!(
        "{n} nodes, --max-links {K}: all started in {all_started:?}, one full table {converged:?} after the last start"
    );

    // Links stay bounded: by the rings, K wanted per node, plus fill-ins
    // others want (at most K + 2 by the overlay's own tests). Views of the
    // member set may differ for a moment, so the bound is checked once the
    // unwanted links had time to be trimmed (1 s to settle, 250 ms trims).
    let bound = K + 2;
    let links = |nodes: &[Daemon]| -> Vec<usize> {
        nodes
            .iter()
            .map(|d| peers(d).iter().filter(|(_, _, l)| l == "up").count())
            .collect()
    };
    let trimmed = wait_until(Duration::from_secs(30), "links bounded by K + 2", || {
        links(&nodes).iter().all(|&l| l <= bound)
    });
    let counts = links(&nodes);
    let (min, mean, max) = spread(&counts);
    eprintln!(
        "links per node: min {min}, mean {mean:.2}, max {max} (bound {bound}; trimmed {trimmed:?} after convergence)"
    );
    assert!(min >= 1, "every node has a link: {counts:?}");
    for d in &nodes {
        let v = support::self_info(&d.socket);
        assert_eq!(v["overlay"]["max_links"], K as u64, "{}", d.name);
        let neighbours = v["overlay"]["neighbours"].as_u64().unwrap_or(0);
        assert!(
            (1..=K as u64).contains(&neighbours),
            "{}: {neighbours} neighbours",
            d.name
        );
    }

    // A member that is not a neighbour: listed alive, no link, no RTT,
    // not degraded.
    let (_, body) = http(&nodes[0].socket, "GET", "/v1/peers", b"");
    let v: serde_json::Value = serde_json::from_str(&body).expect("peers json");
    let remote = v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["link"] != "up")
        .expect("a member that is not a neighbour")
        .clone();
    assert_eq!(remote["state"], "alive", "{remote}");
    assert_eq!(remote["link"], "down", "{remote}");
    assert!(remote["rtt_ms"].is_null(), "{remote}");
    assert_eq!(remote["degraded"], false, "{remote}");
    let remote_name = remote["name"].as_str().expect("name").to_string();

    messages_cross_the_overlay(&nodes, &remote_name);

    // kill -9 five at once (spread over the member list).
    let victims: Vec<usize> = (0..5).map(|j| j * n / 5 + 1).collect();
    let crashed = Instant::now();
    for &i in &victims {
        nodes[i].signal("-KILL");
    }
    for &i in &victims {
        // SIGKILL ends it at once; reaped here (no exit code: a signal).
        nodes[i].child.wait().expect("killed child reaped");
    }
    let failed: BTreeSet<String> = victims.iter().map(|&i| names[i].clone()).collect();
    let survivors: Vec<&Daemon> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| !victims.contains(i))
        .map(|(_, d)| d)
        .collect();
    // When each survivor first showed the right table (a survivor that
    // did once keeps it: nothing else changes).
    let mut first: Vec<Option<Duration>> = vec![None; survivors.len()];
    wait_until(
        Duration::from_secs(60),
        "every survivor lists the five failed and the rest alive",
        || {
            for (j, d) in survivors.iter().enumerate() {
                if first[j].is_some() {
                    continue;
                }
                let alive: BTreeSet<String> = others(&d.name)
                    .into_iter()
                    .filter(|x| !failed.contains(x))
                    .collect();
                if lists(d, &alive, &failed) {
                    first[j] = Some(crashed.elapsed());
                }
            }
            first.iter().all(Option::is_some)
        },
    );
    let mut times: Vec<Duration> = first.into_iter().flatten().collect();
    times.sort();
    eprintln!(
        "survivors with the right table: first at {:?}, median {:?}, last {:?}",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    // Every survivor still lists it (no late flip back).
    for d in &survivors {
        let alive: BTreeSet<String> = others(&d.name)
            .into_iter()
            .filter(|x| !failed.contains(x))
            .collect();
        assert!(lists(d, &alive, &failed), "{} changed its mind", d.name);
    }
    // (The figure is the last survivor's first right answer; each poll
    // round of every survivor's table takes a few hundred ms here, so it
    // bounds the true time from above.)
    eprintln!(
        "crash of five seen by all {} survivors within {:?} (checked again {:?} after the kill)",
        survivors.len(),
        times[times.len() - 1],
        crashed.elapsed()
    );
    let refutations: u64 = survivors
        .iter()
        .map(|d| {
            support::self_info(&d.socket)["overlay"]["refutations"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    eprintln!("refutations on survivors: {refutations}");
    drop(survivors);
    nodes.clear();
}

/// The message events `stream` shows until one has `last` as its payload
/// (the read times out after 30 s: then the list ends without it).
fn messages_until(stream: &mut EventStream, last: &str) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while let Some(ev) = stream.next() {
        if ev["type"] != "message" {
            continue;
        }
        let s = |k: &str| ev[k].as_str().unwrap_or_default().to_string();
        got.push((s("from_name"), s("payload")));
        if ev["payload"] == last {
            break;
        }
    }
    got
}

/// Broadcasts, a unicast to a non-neighbour and a query, all from the
/// first node, reach members it has no link to.
fn messages_cross_the_overlay(nodes: &[Daemon], remote: &str) {
    let first = &nodes[0];
    let mut streams: Vec<(String, EventStream)> = nodes[1..]
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                EventStream::open(&d.socket).expect("events"),
            )
        })
        .collect();

    // Ten broadcasts: every other node gets each once, in order.
    let sent: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    let started = Instant::now();
    for p in &sent {
        let req = serde_json::json!({ "to": null, "topic": "t", "payload": p }).to_string();
        let (status, body) = http(&first.socket, "POST", "/v1/messages", req.as_bytes());
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("results");
        let results = v["results"].as_array().expect("results");
        assert_eq!(results.len(), nodes.len() - 1, "every live member: {body}");
        assert!(results.iter().all(|r| r["status"] == "relayed"), "{body}");
    }
    let want: Vec<(String, String)> = sent
        .iter()
        .map(|p| (first.name.clone(), p.clone()))
        .collect();
    for (name, stream) in &mut streams {
        assert_eq!(messages_until(stream, "b9"), want, "{name}");
    }
    eprintln!(
        "ten broadcasts from {} delivered in order by all {} others within {:?}",
        first.name,
        streams.len(),
        started.elapsed()
    );

    // A unicast to a member without a link goes over the overlay, and
    // only that member delivers it.
    let req = serde_json::json!({ "to": remote, "topic": "t", "payload": "u" }).to_string();
    let (status, body) = http(&first.socket, "POST", "/v1/messages", req.as_bytes());
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"relayed\""), "{body}");
    let mark = serde_json::json!({ "to": null, "topic": "t", "payload": "end" }).to_string();
    let (status, body) = http(&first.socket, "POST", "/v1/messages", mark.as_bytes());
    assert_eq!(status, 200, "{body}");
    for (name, stream) in &mut streams {
        let got = messages_until(stream, "end");
        let mut want = vec![(first.name.clone(), "end".to_string())];
        if name == remote {
            want.insert(0, (first.name.clone(), "u".to_string()));
        }
        assert_eq!(got, want, "{name}");
    }
    drop(streams);

    // A query reaches every member: each one acks.
    let out = first.cli(&["query", "overlay-ping", "x", "--timeout", "2s", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let done: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a done line");
    assert_eq!(done["type"], "done", "{stdout}");
    assert_eq!(done["asked"], nodes.len() as u64, "{done}");
    assert_eq!(done["acked"], nodes.len() as u64, "{done}");

    // The relay counted what it carried, and lost nothing.
    let relay = &support::self_info(&first.socket)["overlay"]["relay"];
    assert_eq!(relay["originated"], 12, "{relay}");
    let skipped: u64 = nodes
        .iter()
        .map(|d| {
            support::self_info(&d.socket)["overlay"]["relay"]["skipped"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(skipped, 0, "gaps given up");
}
