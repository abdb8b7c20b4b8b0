//! Small scenarios at CI size, written as lists of operations on a
//! simulated cluster (in the manner of chitchat's cluster tests), each
//! asserting on what the tables themselves reported, in virtual time.

use std::time::Duration;

use proto::membership::{EventKind, LinkState, PeerState};
use sim::{Op, SimConfig, World};

mod support;
use support::{others, start_all_until, MS};

fn world(nodes: usize, seed: u64, loss: f64) -> World {
    World::new(SimConfig {
        loss,
        ..SimConfig::new(nodes, seed)
    })
}

/// Starts every node at once and runs until the cluster has converged,
/// failing after `within`.
fn converge(w: &mut World, within: Duration) -> Duration {
    start_all_until(w, within, "convergence", |w| w.observer().converged())
}

#[test]
fn cold_start_converges_in_milliseconds() {
    let mut w = world(32, 1, 0.0);
    let took = converge(&mut w, Duration::from_secs(2));
    assert!(took < 100 * MS, "converged after {took:?}");
    // Every table: 31 confirmed peers, alive, link up, and no pending left.
    for s in 0..32 {
        let node = w.node(s).expect("running");
        let peers: Vec<_> = node.table.peers().collect();
        assert_eq!(peers.len(), 31, "node {s}");
        assert!(peers
            .iter()
            .all(|p| p.confirmed() && p.state == PeerState::Alive && p.link == LinkState::Up));
        assert_eq!(node.links(), 31, "one link per pair");
    }
    assert_eq!(w.observer().false_verdicts(), &[]);
}

#[test]
fn cold_start_converges_under_loss() {
    let mut w = world(32, 2, 0.05);
    let took = converge(&mut w, Duration::from_secs(10));
    // Loss costs TCP retransmissions (200 ms and up) and SYN retries (1 s).
    assert!(took < Duration::from_secs(5), "converged after {took:?}");
}

#[test]
fn crash_is_seen_failed_by_all_within_100ms() {
    let mut w = world(32, 3, 0.0);
    converge(&mut w, Duration::from_secs(2));
    w.apply(&Op::RunFor(Duration::from_secs(1)));
    let victim = 5;
    let id = w.observer().id(victim).unwrap();
    let observers = others(&w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Failed, now, [id], observers);
    w.apply(&Op::Crash(victim));
    w.run_until(now + Duration::from_secs(5), |w| {
        w.observer().seen_by_all(watch).is_some()
    });
    let seen = w.observer().seen_by_all(watch).expect("seen by all");
    assert!(seen <= 100 * MS, "crash seen by all after {seen:?}");
    assert_eq!(w.observer().false_failures(), 0);
}

#[test]
fn graceful_leave_is_seen_by_all_within_50ms() {
    let mut w = world(32, 4, 0.0);
    converge(&mut w, Duration::from_secs(2));
    let victim = 9;
    let id = w.observer().id(victim).unwrap();
    let observers = others(&w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Left, now, [id], observers);
    w.apply_all(&[Op::Leave(victim), Op::RunFor(Duration::from_secs(1))]);
    let seen = w.observer().seen_by_all(watch).expect("seen by all");
    assert!(seen <= 50 * MS, "leave seen by all after {seen:?}");
    assert_eq!(w.observer().false_failures(), 0);
}

#[test]
fn silent_loss_is_seen_within_dead_after_plus_slack() {
    let mut w = world(32, 5, 0.0);
    converge(&mut w, Duration::from_secs(2));
    w.apply(&Op::RunFor(Duration::from_secs(1)));
    let dead_after = w.settings().table.dead_after;
    let victim = 17;
    let id = w.observer().id(victim).unwrap();
    let observers = others(&w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Failed, now, [id], observers);
    let rest: Vec<u32> = (0..32).filter(|s| *s != victim).collect();
    w.apply_all(&[
        Op::Partition(vec![vec![victim], rest]),
        Op::RunFor(dead_after * 3),
    ]);
    let seen = w.observer().seen_by_all(watch).expect("seen by all");
    // Its last frames arrived at most one ping interval before the cut.
    let slack = w.settings().ping_interval + 200 * MS;
    assert!(
        seen + w.settings().ping_interval >= dead_after && seen <= dead_after + slack,
        "silent loss seen by all after {seen:?} (dead after {dead_after:?})"
    );
    assert_eq!(
        w.observer().false_failures(),
        0,
        "the cut is no false failure"
    );
}

#[test]
fn no_false_failures_over_60_seconds_at_5_percent_loss() {
    let mut w = world(16, 6, 0.05);
    converge(&mut w, Duration::from_secs(10));
    w.apply(&Op::RunFor(Duration::from_secs(60)));
    let (suspicions, failures) = w.observer().verdicts();
    assert_eq!(
        w.observer()
            .false_verdicts()
            .iter()
            .filter(|v| v.kind == "peer_failed")
            .collect::<Vec<_>>(),
        Vec::<&sim::FalseVerdict>::new(),
        "{failures} failures, {suspicions} suspicions"
    );
    assert_eq!(failures, 0);
    assert_eq!(w.observer().live(), 16);
}

#[test]
fn a_50_50_partition_heals_to_one_table() {
    let mut w = world(32, 7, 0.0);
    converge(&mut w, Duration::from_secs(2));
    let (a, b): (Vec<u32>, Vec<u32>) = (0..32).partition(|s| s % 2 == 0);
    w.apply_all(&[
        Op::Partition(vec![a.clone(), b.clone()]),
        Op::RunFor(Duration::from_secs(4)),
    ]);
    // Each side holds the other failed, itself converged.
    let failed_across = |w: &World, x: u32, y: u32| {
        let id = w.observer().id(y).unwrap();
        w.node(x)
            .and_then(|n| n.table.get(&id))
            .is_some_and(|p| p.state == PeerState::Failed)
    };
    assert!(a
        .iter()
        .all(|x| b.iter().all(|y| failed_across(&w, *x, *y))));
    assert!(b
        .iter()
        .all(|x| a.iter().all(|y| failed_across(&w, *x, *y))));
    assert!(!w.observer().one_table());
    w.apply(&Op::Heal);
    let healed = w.now();
    let back = w
        .run_until(healed + Duration::from_secs(5), |w| {
            w.observer().converged()
        })
        .expect("one table again");
    // A failed peer is dialed again when its next beacon arrives: about
    // one beacon interval.
    assert!(
        back - healed <= Duration::from_secs(2),
        "healed after {:?}",
        back - healed
    );
    assert!(w.observer().one_table());
    assert_eq!(w.observer().false_failures(), 0);
}

#[test]
fn a_paused_node_does_not_fail_running_peers_on_waking() {
    let mut w = world(16, 8, 0.0);
    converge(&mut w, Duration::from_secs(2));
    let victim = 3;
    let before = w.node(victim).unwrap().table.stalls();
    w.apply_all(&[
        Op::Pause(victim),
        Op::RunFor(Duration::from_secs(3)),
        Op::Resume(victim),
    ]);
    let resumed = w.now();
    w.run_until(resumed + Duration::from_secs(3), |_| false);
    let woken: Vec<_> = w
        .observer()
        .false_verdicts()
        .iter()
        .filter(|v| v.judge == victim)
        .cloned()
        .collect();
    assert_eq!(woken, vec![], "the woken node judged its running peers");
    assert!(
        w.node(victim).unwrap().table.stalls() > before,
        "the woken table noticed its own lateness"
    );
    assert!(w.observer().converged(), "everyone linked again");
    assert_eq!(w.observer().false_failures(), 0);
}

#[test]
fn a_restarted_node_replaces_its_old_entry_everywhere() {
    let mut w = world(16, 9, 0.0);
    converge(&mut w, Duration::from_secs(2));
    let victim = 11;
    let old = w.observer().id(victim).unwrap();
    w.apply_all(&[
        Op::Crash(victim),
        Op::RunFor(Duration::from_millis(500)),
        Op::Start(victim),
    ]);
    let started = w.now();
    let new = w.observer().id(victim).unwrap();
    assert_ne!(old, new);
    let back = w
        .run_until(started + Duration::from_secs(3), |w| {
            w.observer().converged()
        })
        .expect("converged again");
    assert!(
        back - started <= 100 * MS,
        "restart took {:?}",
        back - started
    );
    let inc = w.node(victim).unwrap().incarnation;
    for s in (0..16).filter(|s| *s != victim) {
        let t = &w.node(s).unwrap().table;
        assert!(t.get(&old).is_none(), "node {s} still lists the old id");
        let p = t.get(&new).expect("the new id");
        assert_eq!((p.name.as_str(), p.incarnation), ("node-11", inc));
    }
}

#[test]
fn the_secured_mode_converges_and_detects_a_crash() {
    let mut w = World::new(SimConfig {
        secured: true,
        ..SimConfig::new(12, 10)
    });
    converge(&mut w, Duration::from_secs(2));
    let victim = 2;
    let id = w.observer().id(victim).unwrap();
    let observers = others(&w, victim);
    let now = w.now();
    let watch = w
        .observer_mut()
        .watch(EventKind::Failed, now, [id], observers);
    w.apply_all(&[Op::Crash(victim), Op::RunFor(Duration::from_secs(1))]);
    assert!(w.observer().seen_by_all(watch).expect("seen") <= 100 * MS);
}

/// Bounded overlay (`--max-links 8`) at 64 nodes: every node still knows
/// every other (by beacon here), holds links to about 8 neighbours only,
/// and a crash is seen by its neighbours in milliseconds, by everyone once
/// its beacons stop. Non-neighbours stay unconfirmed entries: the peer table
/// confirms a member only over a link of its own (what is left to build).
#[test]
fn overlay_bounds_links_and_its_observers_see_a_crash_at_once() {
    let p = sim::Params::new(
        SimConfig {
            max_links: Some(8),
            ..SimConfig::new(64, 3)
        },
        Duration::from_secs(8),
    );
    let r = sim::scenario::overlay(&p);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    assert!(f("all_known_ms") < 1000.0, "{r}");
    assert!(r["links"]["min"].as_u64() >= Some(8), "{r}");
    assert!(r["links"]["mean"].as_f64() <= Some(16.0), "{r}");
    assert!(f("crash_neighbours") >= 8.0, "{r}");
    assert!(f("crash_seen_by_neighbours_ms") < 100.0, "{r}");
    assert!(f("crash_known_by_all_ms") < 4000.0, "{r}");
    assert_eq!(r["false_failures"], 0, "{r}");
    // Far fewer messages than the full mesh's 63 links per node.
    assert!(f("idle_msgs_per_node_per_s") < 150.0, "{r}");
}
