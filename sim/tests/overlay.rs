//! The bounded overlay at CI size (`--max-links K`): each node links to
//! about K neighbours, and membership (joins, crashes, leaves, silent
//! losses, heals) must still reach every table. Each test asserts on what
//! the tables reported, in virtual time, with generous bounds (the release
//! figures are in the README); each is a function of its seed.

use std::time::Duration;

use proto::membership::{EventKind, PeerState};
use sim::{Op, SimConfig, World};

mod support;
use support::{others, start_all_until, MS};

fn world(nodes: usize, seed: u64, loss: f64, k: usize) -> World {
    World::new(SimConfig {
        loss,
        max_links: Some(k),
        ..SimConfig::new(nodes, seed)
    })
}

/// Starts every node and runs until every table lists every node
/// (confirmed, live), failing after `within`.
fn one_table(w: &mut World, within: Duration) -> Duration {
    start_all_until(w, within, "a single table", |w| w.observer().one_table())
}

/// (mean, max) links per running node.
fn degree(w: &World) -> (f64, usize) {
    let links: Vec<usize> = (0..w.config().nodes as u32)
        .filter_map(|s| w.node(s))
        .map(|n| n.links())
        .collect();
    let mean = links.iter().sum::<usize>() as f64 / links.len().max(1) as f64;
    (mean, links.into_iter().max().unwrap_or(0))
}

fn failures(w: &World) -> Vec<sim::FalseVerdict> {
    w.observer()
        .false_verdicts()
        .iter()
        .filter(|v| v.kind == "peer_failed")
        .cloned()
        .collect()
}

#[test]
fn cold_start_reaches_one_table_with_bounded_degree() {
    let mut w = world(96, 11, 0.0, 8);
    let took = one_table(&mut w, Duration::from_secs(5));
    assert!(took < 500 * MS, "one table after {took:?}");
    // Surplus links are closed once settled.
    w.apply(&Op::RunFor(Duration::from_secs(3)));
    let (mean, max) = degree(&w);
    assert!(mean <= 10.0 && max <= 14, "degree mean {mean}, max {max}");
    assert!(mean >= 6.0, "degree mean {mean}: the overlay fell apart");
    assert!(w.observer().one_table());
    assert_eq!(failures(&w), vec![]);
}

#[test]
fn cold_start_under_loss_has_no_false_failures() {
    let mut w = world(64, 12, 0.05, 6);
    let took = one_table(&mut w, Duration::from_secs(10));
    assert!(took < Duration::from_secs(2), "one table after {took:?}");
    w.apply(&Op::RunFor(Duration::from_secs(8)));
    assert!(w.observer().one_table());
    assert_eq!(failures(&w), vec![]);
    let (mean, _) = degree(&w);
    assert!(mean <= 9.0, "degree mean {mean}");
}

/// Crash one node after convergence; returns when all others had it
/// failed.
fn crash_seen(w: &mut World, victim: u32) -> Duration {
    w.apply(&Op::RunFor(Duration::from_secs(2)));
    let id = w.observer().id(victim).unwrap();
    let observers = others(w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Failed, now, [id], observers);
    w.apply(&Op::Crash(victim));
    w.run_until(now + Duration::from_secs(5), |w| {
        w.observer().seen_by_all(watch).is_some()
    });
    w.observer().seen_by_all(watch).expect("crash seen by all")
}

#[test]
fn crash_is_known_by_all_over_the_overlay() {
    let mut w = world(64, 13, 0.0, 8);
    one_table(&mut w, Duration::from_secs(5));
    let seen = crash_seen(&mut w, 7);
    assert!(seen <= 100 * MS, "crash known by all after {seen:?}");
    assert_eq!(failures(&w), vec![]);
}

#[test]
fn crash_is_known_by_all_under_loss() {
    let mut w = world(64, 14, 0.05, 6);
    one_table(&mut w, Duration::from_secs(10));
    let seen = crash_seen(&mut w, 21);
    // A lost segment waits 200 ms for its retransmission; several paths
    // race it.
    assert!(seen <= 700 * MS, "crash known by all after {seen:?}");
    assert_eq!(failures(&w), vec![]);
}

#[test]
fn leave_is_known_by_all() {
    let mut w = world(64, 15, 0.05, 8);
    one_table(&mut w, Duration::from_secs(10));
    w.apply(&Op::RunFor(Duration::from_secs(1)));
    let victim = 30;
    let id = w.observer().id(victim).unwrap();
    let observers = others(&w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Left, now, [id], observers);
    w.apply_all(&[Op::Leave(victim), Op::RunFor(Duration::from_secs(1))]);
    let seen = w.observer().seen_by_all(watch).expect("leave seen by all");
    assert!(seen <= 500 * MS, "leave known by all after {seen:?}");
    assert_eq!(failures(&w), vec![]);
}

#[test]
fn silent_loss_takes_two_observers_and_heals() {
    let n = 64;
    let mut w = world(n, 16, 0.0, 8);
    one_table(&mut w, Duration::from_secs(5));
    w.apply(&Op::RunFor(Duration::from_secs(2)));
    let dead_after = w.settings().table.dead_after;
    let victim = 40;
    let id = w.observer().id(victim).unwrap();
    let observers = others(&w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Failed, now, [id], observers);
    let rest: Vec<u32> = (0..n as u32).filter(|s| *s != victim).collect();
    w.apply_all(&[
        Op::Partition(vec![vec![victim], rest]),
        Op::RunFor(Duration::from_secs(4)),
    ]);
    let seen = w.observer().seen_by_all(watch).expect("silent loss seen");
    assert!(
        seen + w.settings().ping_interval >= dead_after && seen <= dead_after + 400 * MS,
        "silent loss known by all after {seen:?} (dead after {dead_after:?})"
    );
    // Healed: it refutes its failure and is listed everywhere again.
    w.apply(&Op::Heal);
    let healed = w.now();
    let back = w
        .run_until(healed + Duration::from_secs(8), |w| {
            w.observer().one_table()
        })
        .expect("one table again");
    assert!(
        back - healed <= Duration::from_secs(5),
        "healed after {:?}",
        back - healed
    );
    assert!(w.node(victim).unwrap().table.refutations() >= 1);
    assert_eq!(failures(&w), vec![]);
}

#[test]
fn a_50_50_partition_is_seen_and_heals_to_one_table() {
    let n = 64;
    let mut w = world(n, 17, 0.0, 8);
    one_table(&mut w, Duration::from_secs(5));
    w.apply(&Op::RunFor(Duration::from_secs(1)));
    let (a, b): (Vec<u32>, Vec<u32>) = (0..n as u32).partition(|s| s % 2 == 0);
    w.apply_all(&[
        Op::Partition(vec![a.clone(), b.clone()]),
        // A member with fewer than two observers on the other side is
        // failed once the observers that replace the failed ones alert.
        Op::RunFor(Duration::from_secs(6)),
    ]);
    let failed_across = |w: &World, x: u32, y: u32| {
        let id = w.observer().id(y).unwrap();
        w.node(x)
            .and_then(|n| n.table.get(&id))
            .is_some_and(|p| p.state == PeerState::Failed)
    };
    let seen = a
        .iter()
        .flat_map(|x| b.iter().map(move |y| (*x, *y)))
        .filter(|&(x, y)| failed_across(&w, x, y) && failed_across(&w, y, x))
        .count();
    // Nearly every pair across, both ways (a side judges the other on its
    // observers' alerts; a node cut off from its own side while the
    // verdicts spread keeps the far side listed until the heal).
    let all = a.len() * b.len();
    assert!(
        seen * 100 >= all * 90,
        "{seen} of {all} pairs failed both ways"
    );
    w.apply(&Op::Heal);
    let healed = w.now();
    let back = w
        .run_until(healed + Duration::from_secs(10), |w| {
            w.observer().one_table()
        })
        .expect("one table again");
    assert!(
        back - healed <= Duration::from_secs(6),
        "healed after {:?}",
        back - healed
    );
    assert_eq!(failures(&w), vec![]);
}

#[test]
fn an_overlay_world_is_a_function_of_its_seed() {
    let run = || {
        let mut w = world(48, 18, 0.05, 6);
        one_table(&mut w, Duration::from_secs(10));
        w.apply_all(&[Op::Crash(3), Op::RunFor(Duration::from_secs(2))]);
        (w.observer().trace_hash(), w.sent_total().total())
    };
    assert_eq!(run(), run());
}

#[test]
fn silent_loss_under_loss_is_seen_without_false_failures() {
    let n = 64;
    let mut w = world(n, 19, 0.05, 8);
    one_table(&mut w, Duration::from_secs(10));
    w.apply(&Op::RunFor(Duration::from_secs(2)));
    let victim = 12;
    let id = w.observer().id(victim).unwrap();
    let observers = others(&w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Failed, now, [id], observers);
    let rest: Vec<u32> = (0..n as u32).filter(|s| *s != victim).collect();
    w.apply_all(&[
        Op::Partition(vec![vec![victim], rest]),
        Op::RunFor(Duration::from_secs(4)),
    ]);
    let seen = w.observer().seen_by_all(watch).expect("silent loss seen");
    let dead_after = w.settings().table.dead_after;
    assert!(
        seen <= dead_after + 600 * MS,
        "silent loss known by all after {seen:?}"
    );
    w.apply(&Op::Heal);
    let healed = w.now();
    w.run_until(healed + Duration::from_secs(10), |w| {
        w.observer().one_table()
    })
    .expect("one table again");
    assert_eq!(failures(&w), vec![]);
}

#[test]
fn broadcasts_reach_every_node_once_in_order_under_loss() {
    let n = 64;
    let mut w = world(n, 23, 0.05, 6);
    one_table(&mut w, Duration::from_secs(10));
    w.apply(&Op::RunFor(Duration::from_secs(2)));
    let sent = w.now();
    let names: Vec<(proto::NodeId, u64)> = (0..5)
        .map(|_| w.broadcast(3).expect("slot 3 runs"))
        .collect();
    let delivered_all = |w: &World| {
        (0..n as u32).filter(|&s| s != 3).all(|s| {
            let node = w.node(s).expect("running");
            names.iter().all(|(o, q)| node.delivered(*o, *q).is_some())
        })
    };
    let done = w.run_until(sent + Duration::from_secs(5), delivered_all);
    assert!(done.is_some(), "five broadcasts not delivered everywhere");
    for s in (0..n as u32).filter(|&s| s != 3) {
        let node = w.node(s).expect("running");
        let at: Vec<_> = names
            .iter()
            .map(|(o, q)| node.delivered(*o, *q).expect("delivered"))
            .collect();
        assert!(at.windows(2).all(|p| p[0] <= p[1]), "slot {s} out of order");
        let st = node.flood_stats();
        assert_eq!((st.delivered, st.skipped), (5, 0), "slot {s}: {st:?}");
    }
    // Each node passes each message on at most once per other link.
    let copies: u64 = (0..n as u32)
        .filter_map(|s| w.node(s))
        .map(|node| node.flood_stats().forwarded)
        .sum();
    let links: usize = (0..n as u32)
        .filter_map(|s| w.node(s))
        .map(|n| n.links())
        .sum();
    assert!(
        copies <= 5 * links as u64,
        "{copies} copies over {links} link ends"
    );
}
