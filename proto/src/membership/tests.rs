//! Peer table tests with synthetic time and addresses.

use super::*;
use crate::frame::VERSION;
use proptest::prelude::*;

const LOCAL: NodeId = NodeId(500);
const LOW: NodeId = NodeId(100); // lower than LOCAL: it dials us
const HIGH: NodeId = NodeId(900); // higher than LOCAL: we dial it

fn beacon(id: NodeId, inc: u64, kind: BeaconKind) -> Beacon {
    Beacon {
        cluster: "c".into(),
        id,
        incarnation: inc,
        name: format!("n{}", id.0),
        addr: SocketAddr::from(([192, 0, 2, (id.0 % 250) as u8 + 1], 6777)),
        kind,
        digest: 0,
    }
}

fn hello(id: NodeId, inc: u64) -> Hello {
    Hello {
        protocol: VERSION,
        cluster: "c".into(),
        id,
        incarnation: inc,
        name: format!("n{}", id.0),
        addr: SocketAddr::from(([192, 0, 2, (id.0 % 250) as u8 + 1], 6777)),
        tags: Tags::new(),
    }
}

fn events(t: &mut PeerTable) -> Vec<EventKind> {
    std::iter::from_fn(|| t.poll_event())
        .map(|e| e.kind)
        .collect()
}

fn actions(t: &mut PeerTable) -> Vec<Action> {
    std::iter::from_fn(|| t.poll_action()).collect()
}

fn table() -> PeerTable {
    PeerTable::new(LOCAL, Config::default(), 1)
}

#[test]
fn lower_id_dials_at_once_higher_waits_for_fallback() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_beacon(t0, &beacon(HIGH, 1, BeaconKind::Announce));
    t.on_beacon(t0, &beacon(LOW, 1, BeaconKind::Announce));
    assert_eq!(events(&mut t), vec![], "beacons alone announce nobody");
    assert_eq!(t.pending(), 2);
    let a = actions(&mut t);
    assert_eq!(a.len(), 1);
    assert!(matches!(a[0], Action::Dial { id, .. } if id == HIGH));
    assert_eq!(t.get(&HIGH).unwrap().link, LinkState::Connecting);
    // The lower node has not dialed us within the fallback: we dial it.
    let fallback = t0 + t.config().dial_fallback;
    assert_eq!(t.next_deadline(), Some(fallback));
    t.on_tick(fallback);
    assert!(matches!(actions(&mut t)[..], [Action::Dial { id, .. }] if id == LOW));
    // The link confirms it: now it joins.
    t.on_link_up(fallback, &hello(LOW, 1));
    assert_eq!(events(&mut t), vec![EventKind::Joined, EventKind::LinkUp]);
    assert_eq!(t.pending(), 1);
}

#[test]
fn a_pending_peer_that_falls_silent_is_forgotten_without_a_word() {
    let t0 = Instant::now();
    let mut t = table();
    let dead = t.config().beacon_dead_after;
    t.on_beacon(t0, &beacon(LOW, 1, BeaconKind::Announce));
    t.on_tick(t0 + dead - Duration::from_millis(1));
    assert_eq!(
        t.get(&LOW).unwrap().state,
        PeerState::Alive,
        "a lost beacon is no failure"
    );
    t.on_tick(t0 + dead);
    assert_eq!(events(&mut t), vec![]);
    assert!(t.is_empty());
    assert_eq!(t.pending(), 0);
}

#[test]
fn silent_linked_peer_is_suspect_then_failed() {
    let t0 = Instant::now();
    let mut t = table();
    let cfg = *t.config();
    t.on_link_up(t0, &hello(LOW, 1));
    events(&mut t);
    assert_eq!(t.next_deadline(), Some(t0 + cfg.suspect_after));
    t.on_tick(t0 + cfg.suspect_after);
    assert_eq!(events(&mut t), vec![EventKind::Suspect]);
    // A pong in time brings it back.
    let t1 = t0 + cfg.suspect_after + Duration::from_millis(10);
    t.on_pong(t1, LOW, Duration::from_millis(1));
    assert_eq!(events(&mut t), vec![EventKind::Recovered]);
    t.on_tick(t1 + cfg.suspect_after);
    t.on_tick(t1 + cfg.dead_after);
    assert_eq!(events(&mut t), vec![EventKind::Suspect, EventKind::Failed]);
}

#[test]
fn pinging_peer_stays_alive() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(LOW, 1));
    assert_eq!(events(&mut t), vec![EventKind::Joined, EventKind::LinkUp]);
    for i in 1..300 {
        let now = t0 + Duration::from_millis(200 * i);
        t.on_pong(now, LOW, Duration::from_millis(1));
        t.on_tick(now);
    }
    assert_eq!(t.get(&LOW).unwrap().state, PeerState::Alive);
    assert!(events(&mut t).is_empty());
}

#[test]
fn crash_is_detected_by_a_refused_redial() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_beacon(t0, &beacon(HIGH, 1, BeaconKind::Announce));
    actions(&mut t);
    t.on_link_up(t0, &hello(HIGH, 1));
    events(&mut t);
    let t1 = t0 + Duration::from_millis(10);
    t.on_link_down(t1, HIGH, false);
    assert_eq!(
        events(&mut t),
        vec![EventKind::LinkDown, EventKind::Suspect]
    );
    assert!(matches!(actions(&mut t)[..], [Action::Dial { id, .. }] if id == HIGH));
    t.on_dial_failed(t1, HIGH, DialFailure::Refused);
    assert_eq!(events(&mut t), vec![EventKind::Failed]);
}

#[test]
fn a_dying_peer_that_resets_the_redial_is_retried_at_once_then_failed() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(HIGH, 1));
    t.on_link_down(t0, HIGH, false);
    actions(&mut t);
    t.on_dial_failed(t0, HIGH, DialFailure::Reset);
    let retry = t0 + Duration::from_millis(10);
    assert!(t.next_deadline().unwrap() <= retry);
    t.on_tick(retry);
    assert!(actions(&mut t)
        .iter()
        .any(|a| matches!(a, Action::Dial { .. })));
    t.on_dial_failed(retry, HIGH, DialFailure::Refused);
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Failed);
}

#[test]
fn reports_from_others_keep_a_peer_with_a_broken_link_alive() {
    let t0 = Instant::now();
    let mut t = table();
    let cfg = *t.config();
    t.on_link_up(t0, &hello(HIGH, 1));
    t.on_link_up(t0, &hello(LOW, 1)); // a linked helper
    let lost = t0 + Duration::from_millis(100);
    t.on_link_down(lost, HIGH, false);
    events(&mut t);
    actions(&mut t);
    t.on_tick(lost);
    let asked = actions(&mut t);
    assert!(
        asked.iter().any(|a| matches!(a, Action::Send { to, list }
            if *to == LOW && list.peers[0].id == HIGH && list.peers[0].state == RECORD_PROBE)),
        "{asked:?}"
    );
    // A report older than our loss proves nothing (it may predate a crash).
    t.on_vouch(
        lost + Duration::from_millis(10),
        HIGH,
        1,
        Duration::from_millis(50),
    );
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Suspect);
    // A fresh one does: alive, degraded, never failed while reports continue.
    let mut now = lost;
    for _ in 0..40 {
        now += Duration::from_millis(250);
        t.on_pong(now, LOW, Duration::from_millis(1));
        t.on_vouch(now, HIGH, 1, Duration::from_millis(30));
        t.on_tick(now);
        while let Some(a) = t.poll_action() {
            if let Action::Dial { .. } = a {
                t.on_dial_failed(now, HIGH, DialFailure::Other);
            }
        }
    }
    let p = t.get(&HIGH).unwrap();
    assert_eq!(p.state, PeerState::Alive);
    assert!(p.degraded());
    assert!(!events(&mut t).contains(&EventKind::Failed));
    // Reports stop: failed once the last one is beacon_dead_after old.
    t.on_tick(now + cfg.beacon_dead_after);
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Failed);
    // A report of what was seen before the verdict never brings it back...
    let failed_at = now + cfg.beacon_dead_after;
    t.on_vouch(
        failed_at + Duration::from_millis(5),
        HIGH,
        1,
        Duration::from_millis(10),
    );
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Failed);
    // ...nor one about an earlier life; a fresh one does (only our path is broken).
    t.on_vouch(
        failed_at + Duration::from_millis(5),
        HIGH,
        0,
        Duration::ZERO,
    );
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Failed);
    t.on_vouch(
        failed_at + Duration::from_millis(50),
        HIGH,
        1,
        Duration::from_millis(10),
    );
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Alive);
}

#[test]
fn one_bad_link_with_beacons_is_degraded_not_failed() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(HIGH, 1));
    t.on_link_down(t0, HIGH, false);
    events(&mut t);
    actions(&mut t);
    t.on_beacon(
        t0 + Duration::from_millis(5),
        &beacon(HIGH, 1, BeaconKind::Announce),
    );
    assert_eq!(events(&mut t), vec![EventKind::Recovered]);
    t.on_dial_failed(t0 + Duration::from_millis(6), HIGH, DialFailure::Refused);
    let p = t.get(&HIGH).unwrap();
    assert_eq!(p.state, PeerState::Alive);
    assert!(p.degraded());
    // Beacons every second (one of them lost) keep it alive for a minute.
    for i in 1..60u64 {
        let now = t0 + Duration::from_secs(i);
        if i % 7 != 0 {
            t.on_beacon(now, &beacon(HIGH, 1, BeaconKind::Announce));
        }
        t.on_tick(now);
        while let Some(Action::Dial { .. }) = t.poll_action() {
            t.on_dial_failed(now, HIGH, DialFailure::Other);
        }
    }
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Alive);
    assert!(!events(&mut t).contains(&EventKind::Failed));
}

/// A large group paces its beacons (2 s here, where our own interval is
/// 1 s): a degraded peer survives a lost paced beacon, and is failed only
/// once three of its intervals pass in silence.
#[test]
fn a_degraded_peer_with_paced_beacons_survives_a_lost_one() {
    let t0 = Instant::now();
    let (ours, paced) = (Duration::from_secs(1), Duration::from_secs(2));
    let mut t = table();
    t.on_link_up(t0, &hello(HIGH, 1));
    t.on_link_down(t0, HIGH, false);
    let heard = |t: &mut PeerTable, at: Duration| {
        t.on_beacon(t0 + at, &beacon(HIGH, 1, BeaconKind::Announce));
        t.on_beacon_interval(HIGH, paced, ours);
    };
    heard(&mut t, Duration::from_millis(5));
    t.on_dial_failed(t0 + Duration::from_millis(6), HIGH, DialFailure::Refused);
    assert!(t.get(&HIGH).unwrap().degraded());
    // The beacon due at 2 s is lost; the one at 4 s arrives. Unpaced, the
    // 4 s gap would pass `beacon_dead_after` (3 s).
    let mut failed_at = None;
    for ms in (10..=12_000u64).step_by(10) {
        let now = t0 + Duration::from_millis(ms);
        if ms == 4_000 {
            heard(&mut t, Duration::from_millis(ms));
        }
        t.on_tick(now);
        while let Some(Action::Dial { .. }) = t.poll_action() {
            t.on_dial_failed(now, HIGH, DialFailure::Other);
        }
        if failed_at.is_none() && t.get(&HIGH).is_some_and(|p| p.state == PeerState::Failed) {
            failed_at = Some(ms);
        }
    }
    // Silent from 4 s: failed 3 paced intervals (6 s) later, not before.
    let at = failed_at.expect("failed once its beacons stop");
    assert!((10_000..=10_100).contains(&at), "failed at {at} ms");
    // Beacons back at the configured rate: the usual allowance again.
    t.on_beacon_interval(HIGH, ours, ours);
    assert_eq!(t.get(&HIGH).unwrap().beacon_interval, None);
}

#[test]
fn silent_loss_fails_dead_after_the_last_word() {
    let t0 = Instant::now();
    let mut t = table();
    let cfg = *t.config();
    t.on_beacon(t0, &beacon(HIGH, 1, BeaconKind::Announce));
    t.on_link_up(t0, &hello(HIGH, 1));
    let last = t0 + Duration::from_millis(200);
    t.on_pong(last, HIGH, Duration::from_millis(1));
    // The transport notices the silence and drops the link.
    t.on_link_down(last + Duration::from_secs(1), HIGH, false);
    actions(&mut t);
    t.on_dial_failed(last + Duration::from_secs(1), HIGH, DialFailure::Other);
    t.on_tick(last + cfg.dead_after - Duration::from_millis(1));
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Suspect);
    t.on_tick(last + cfg.dead_after);
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Failed);
}

#[test]
fn leave_and_goodbye_make_left_and_stale_beacons_do_not_resurrect() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(LOW, 5));
    t.on_beacon(t0, &beacon(LOW, 5, BeaconKind::Leave));
    assert_eq!(
        events(&mut t),
        vec![EventKind::Joined, EventKind::LinkUp, EventKind::Left]
    );
    t.on_link_down(t0, LOW, true);
    events(&mut t);
    t.on_beacon(t0, &beacon(LOW, 5, BeaconKind::Announce));
    t.on_beacon(t0, &beacon(LOW, 4, BeaconKind::Announce));
    assert_eq!(t.get(&LOW).unwrap().state, PeerState::Left);
    assert!(events(&mut t).is_empty());
    // A higher incarnation is dialed at once, and its link brings it back.
    t.on_beacon(t0, &beacon(LOW, 6, BeaconKind::Announce));
    assert!(matches!(actions(&mut t)[..], [Action::Dial { id, .. }] if id == LOW));
    assert_eq!(t.get(&LOW).unwrap().state, PeerState::Left);
    t.on_link_up(t0, &hello(LOW, 6));
    assert_eq!(
        events(&mut t),
        vec![EventKind::Restarted, EventKind::LinkUp]
    );
    let p = t.get(&LOW).unwrap();
    assert_eq!((p.state, p.incarnation), (PeerState::Alive, 6));
    t.on_goodbye(t0, LOW);
    assert_eq!(events(&mut t), vec![EventKind::Left]);
}

#[test]
fn a_failed_peer_is_brought_back_by_a_link_not_by_a_beacon() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(LOW, 1));
    t.on_link_down(t0, LOW, false);
    actions(&mut t);
    t.on_dial_failed(t0, LOW, DialFailure::Other);
    t.on_tick(t0 + Duration::from_secs(10));
    assert_eq!(t.get(&LOW).unwrap().state, PeerState::Failed);
    events(&mut t);
    actions(&mut t);
    // A beacon (perhaps replayed) only makes us dial.
    let t1 = t0 + Duration::from_secs(11);
    t.on_beacon(t1, &beacon(LOW, 1, BeaconKind::Announce));
    assert_eq!(events(&mut t), vec![]);
    assert_eq!(t.get(&LOW).unwrap().state, PeerState::Failed);
    assert!(matches!(actions(&mut t)[..], [Action::Dial { id, .. }] if id == LOW));
    // The dial is refused (the node is dead, the beacon was a replay): still failed.
    t.on_dial_failed(t1, LOW, DialFailure::Refused);
    assert_eq!(t.get(&LOW).unwrap().state, PeerState::Failed);
    // The next beacon dials again; this time the node is there.
    t.on_beacon(
        t1 + Duration::from_secs(1),
        &beacon(LOW, 1, BeaconKind::Announce),
    );
    assert_eq!(actions(&mut t).len(), 1);
    t.on_link_up(t1 + Duration::from_secs(1), &hello(LOW, 1));
    assert_eq!(events(&mut t), vec![EventKind::Joined, EventKind::LinkUp]);
}

#[test]
fn tombstones_are_reaped_after_ttl() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(LOW, 1));
    t.on_goodbye(t0, LOW);
    t.on_link_down(t0, LOW, true);
    events(&mut t);
    let ttl = t.config().tombstone_ttl;
    assert_eq!(t.next_deadline(), Some(t0 + ttl));
    t.on_tick(t0 + ttl);
    assert_eq!(events(&mut t), vec![EventKind::Reaped]);
    assert!(t.is_empty());
}

#[test]
fn failed_dials_back_off_exponentially() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_beacon(t0, &beacon(HIGH, 1, BeaconKind::Announce));
    let mut now = t0;
    let mut gaps = Vec::new();
    for _ in 0..5 {
        assert_eq!(actions(&mut t).len(), 1);
        t.on_dial_failed(now, HIGH, DialFailure::Other);
        let next = t.next_deadline().unwrap();
        gaps.push(next - now);
        now = next;
        // Keep it alive with beacons so it never fails.
        t.on_beacon(now, &beacon(HIGH, 1, BeaconKind::Announce));
        t.on_tick(now);
    }
    assert!(gaps.windows(2).all(|w| w[1] > w[0]), "{gaps:?}");
}

#[test]
fn own_id_is_never_an_entry() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_beacon(t0, &beacon(LOCAL, 1, BeaconKind::Announce));
    t.on_link_up(t0, &hello(LOCAL, 1));
    assert!(t.is_empty());
}

fn named(id: NodeId, inc: u64, name: &str) -> Beacon {
    Beacon {
        name: name.into(),
        ..beacon(id, inc, BeaconKind::Announce)
    }
}

#[test]
fn restart_under_a_new_id_replaces_the_entry_by_name() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_beacon(t0, &named(NodeId(10), 1, "node3"));
    t.on_link_up(
        t0,
        &Hello {
            name: "node3".into(),
            ..hello(NodeId(10), 1)
        },
    );
    t.on_link_down(t0, NodeId(10), false);
    events(&mut t);
    // node3 restarts: new id, higher incarnation. Its beacon alone changes
    // nothing; its link replaces the entry at once.
    t.on_beacon(
        t0 + Duration::from_millis(50),
        &named(NodeId(11), 2, "node3"),
    );
    assert_eq!(events(&mut t), vec![]);
    t.on_link_up(
        t0 + Duration::from_millis(51),
        &Hello {
            name: "node3".into(),
            ..hello(NodeId(11), 2)
        },
    );
    let ev: Vec<_> = std::iter::from_fn(|| t.poll_event())
        .filter(|e| e.kind != EventKind::LinkUp)
        .collect();
    assert_eq!(
        ev,
        vec![
            Event {
                id: NodeId(10),
                kind: EventKind::Reaped
            },
            Event {
                id: NodeId(11),
                kind: EventKind::Restarted
            }
        ]
    );
    assert_eq!(t.len(), 1);
    // A late beacon of the old life resurrects nothing: at most a pending
    // entry, which is never listed and never replaces the new life.
    t.on_beacon(
        t0 + Duration::from_millis(60),
        &named(NodeId(10), 1, "node3"),
    );
    assert!(events(&mut t).is_empty());
    assert!(!t.get(&NodeId(10)).unwrap().confirmed());
    assert_eq!(t.get(&NodeId(11)).unwrap().state, PeerState::Alive);
}

fn named_hello(id: NodeId, inc: u64, name: &str, port: u16) -> Hello {
    Hello {
        name: name.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        ..hello(id, inc)
    }
}

/// Confirmed entries named `name`, with their conflict flags.
fn claimants(t: &PeerTable, name: &str) -> Vec<(NodeId, bool)> {
    let mut v: Vec<_> = t
        .peers()
        .filter(|p| p.confirmed() && p.name == name)
        .map(|p| (p.id, p.conflict.is_some()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_live_process_with_one_name_is_a_conflict_and_the_first_survives_it() {
    let t0 = Instant::now();
    let mut t = table();
    let (real, other) = (NodeId(10), NodeId(11));
    t.on_link_up(t0, &named_hello(real, 1, "e3", 7001));
    events(&mut t);
    // Another process claims "e3" with a newer incarnation while the real
    // one is still linked: both are listed, each flagged, nothing replaced.
    let t1 = t0 + Duration::from_millis(100);
    t.on_link_up(t1, &named_hello(other, 2, "e3", 7002));
    assert_eq!(claimants(&t, "e3"), vec![(real, true), (other, true)]);
    assert_eq!(
        t.get(&real).unwrap().conflict,
        Some(SocketAddr::from(([127, 0, 0, 1], 7002)))
    );
    let ev: Vec<_> = std::iter::from_fn(|| t.poll_event()).collect();
    assert!(ev.contains(&Event {
        id: real,
        kind: EventKind::Updated
    }));
    assert!(!ev
        .iter()
        .any(|e| e.id == real && e.kind != EventKind::Updated));
    // The impostor is killed: its link drops and its port refuses.
    let t2 = t1 + Duration::from_millis(1500);
    t.on_pong(t2, real, Duration::from_millis(1));
    t.on_link_down(t2, other, false);
    actions(&mut t);
    t.on_dial_failed(t2, other, DialFailure::Refused);
    // It is gone; the real one is a normal entry again, never touched.
    assert!(t.get(&other).is_none());
    assert_eq!(claimants(&t, "e3"), vec![(real, false)]);
    let p = t.get(&real).unwrap();
    assert_eq!((p.state, p.link), (PeerState::Alive, LinkState::Up));
    let ev: Vec<_> = std::iter::from_fn(|| t.poll_event()).collect();
    assert!(ev.contains(&Event {
        id: real,
        kind: EventKind::Updated
    }));
    assert!(ev.contains(&Event {
        id: other,
        kind: EventKind::Reaped
    }));
    // Long after any tombstone TTL the real one is still there.
    let mut now = t2;
    for _ in 0..100 {
        now += Duration::from_millis(200);
        t.on_pong(now, real, Duration::from_millis(1));
        t.on_beacon(now, &named(real, 1, "e3"));
        t.on_tick(now);
    }
    assert_eq!(t.get(&real).unwrap().state, PeerState::Alive);
}

#[test]
fn when_the_first_of_two_claimants_stops_the_second_is_a_normal_entry() {
    let t0 = Instant::now();
    let mut t = table();
    let (first, second) = (NodeId(10), NodeId(11));
    t.on_link_up(t0, &named_hello(first, 2, "dup", 7001));
    t.on_link_up(t0, &named_hello(second, 1, "dup", 7002));
    assert_eq!(claimants(&t, "dup"), vec![(first, true), (second, true)]);
    t.on_goodbye(t0 + Duration::from_millis(5), first);
    assert!(t.get(&first).is_none());
    assert_eq!(claimants(&t, "dup"), vec![(second, false)]);
    // The survivor now holds the name: a restart of it replaces it.
    t.on_link_down(t0 + Duration::from_millis(6), second, false);
    t.on_link_up(
        t0 + Duration::from_millis(9),
        &named_hello(NodeId(12), 3, "dup", 7003),
    );
    assert_eq!(claimants(&t, "dup"), vec![(NodeId(12), false)]);
}

#[test]
fn spoofed_beacons_and_hellos_never_remove_a_live_node() {
    let t0 = Instant::now();
    let mut t = table();
    let victim = NodeId(10);
    t.on_link_up(t0, &named_hello(victim, 1_000, "e3", 7001));
    events(&mut t);
    // One spoofed beacon: new id, the victim's name, a newer (or the
    // largest) incarnation. Nothing changes, nothing is said.
    t.on_beacon(t0, &named(NodeId(66), 1_001, "e3"));
    t.on_beacon(t0, &named(NodeId(67), u64::MAX, "e3"));
    assert!(events(&mut t).is_empty());
    assert_eq!(claimants(&t, "e3"), vec![(victim, false)]);
    // The spoofed entries are dialed, never answer, and are forgotten.
    let mut now = t0;
    for _ in 0..40 {
        now += Duration::from_millis(200);
        t.on_pong(now, victim, Duration::from_millis(1));
        t.on_tick(now);
        while let Some(a) = t.poll_action() {
            if let Action::Dial { id, .. } = a {
                t.on_dial_failed(now, id, DialFailure::Refused);
            }
        }
    }
    assert!(t.get(&NodeId(66)).is_none() && t.get(&NodeId(67)).is_none());
    assert!(events(&mut t).is_empty());
    // A hello with the victim's name and a higher incarnation: a conflict at
    // most, which ends when the forger's link does.
    t.on_link_up(now, &named_hello(NodeId(68), 2_000, "e3", 7666));
    assert_eq!(
        claimants(&t, "e3"),
        vec![(victim, true), (NodeId(68), true)]
    );
    t.on_link_down(now, NodeId(68), false);
    actions(&mut t);
    t.on_dial_failed(now, NodeId(68), DialFailure::Refused);
    assert_eq!(claimants(&t, "e3"), vec![(victim, false)]);
    assert_eq!(t.get(&victim).unwrap().link, LinkState::Up);
}

#[test]
fn a_late_loop_holds_its_verdicts_until_the_links_speak() {
    let t0 = Instant::now();
    let mut t = table();
    let cfg = *t.config();
    t.on_link_up(t0, &hello(LOW, 1));
    t.on_link_up(t0, &hello(HIGH, 1));
    events(&mut t);
    actions(&mut t);
    let mut now = t0;
    for _ in 0..5 {
        now += Duration::from_millis(150);
        t.on_pong(now, LOW, Duration::from_millis(1));
        t.on_pong(now, HIGH, Duration::from_millis(1));
        let d = t.next_deadline().unwrap();
        assert!(d > now);
    }
    // The process is stopped for 3 s: the tick it asked for comes late.
    let woke = now + Duration::from_secs(3);
    t.on_tick(woke);
    assert_eq!(events(&mut t), vec![], "no verdict on our own silence");
    assert_eq!(t.stalls(), 1);
    // Links the others closed meanwhile are redialed, without suspicion.
    t.on_link_down(woke, HIGH, false);
    assert_eq!(events(&mut t), vec![EventKind::LinkDown]);
    // The buffered pings arrive: LOW speaks; HIGH's link is back.
    let after = woke + Duration::from_millis(20);
    t.on_pong(after, LOW, Duration::from_millis(1));
    t.on_link_up(after, &hello(HIGH, 1));
    assert_eq!(events(&mut t), vec![EventKind::LinkUp]);
    // Past the grace period, ordinary rules again: LOW goes silent for real.
    assert!(t.next_deadline().unwrap() > woke);
    let mut now = after;
    while now < after + cfg.dead_after + cfg.suspect_after {
        now += Duration::from_millis(100);
        t.on_pong(now, HIGH, Duration::from_millis(1));
        if t.next_deadline().is_some_and(|d| d <= now) {
            t.on_tick(now);
        }
    }
    assert_eq!(t.get(&LOW).unwrap().state, PeerState::Failed);
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Alive);
}

#[test]
fn probes_are_answered_with_link_evidence_only() {
    let t0 = Instant::now();
    let mut t = table();
    let (asker, linked, beaconing) = (NodeId(1), NodeId(2), NodeId(3));
    for id in [asker, linked, beaconing] {
        t.on_link_up(t0, &hello(id, 1));
    }
    // `beaconing` lost its link long ago; only its beacons (perhaps
    // replayed) still arrive.
    t.on_link_down(t0, beaconing, false);
    let now = t0 + Duration::from_secs(2);
    t.on_pong(now, asker, Duration::from_millis(1));
    t.on_pong(now, linked, Duration::from_millis(1));
    t.on_beacon(now, &beacon(beaconing, 1, BeaconKind::Announce));
    actions(&mut t);
    let probe = |id| PeerRecord {
        id,
        incarnation: 1,
        name: format!("n{}", id.0),
        addr: "127.0.0.1:9".parse().unwrap(),
        state: RECORD_PROBE.into(),
        age_ms: None,
        tags: Tags::new(),
        tags_version: 0,
        by: None,
    };
    t.on_peer_list(
        now,
        asker,
        &PeerList {
            peers: vec![probe(linked), probe(beaconing), probe(NodeId(77))],
        },
    );
    let sent = actions(&mut t);
    let [Action::Send { to, list }] = &sent[..] else {
        panic!("one answer expected: {sent:?}");
    };
    assert_eq!(*to, asker);
    assert_eq!(list.peers.len(), 1, "{list:?}");
    assert_eq!(
        (list.peers[0].id, list.peers[0].state.as_str()),
        (linked, RECORD_ALIVE)
    );
}

fn member(id: NodeId, inc: u64, state: &str) -> PeerRecord {
    PeerRecord {
        id,
        incarnation: inc,
        name: format!("n{}", id.0),
        addr: SocketAddr::from(([127, 0, 0, 1], 7000 + (id.0 % 1000) as u16)),
        state: state.into(),
        age_ms: None,
        tags: Tags::new(),
        tags_version: 0,
        by: None,
    }
}

fn sends(actions: &[Action]) -> Vec<(NodeId, Vec<NodeId>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to, list } => Some((*to, list.peers.iter().map(|r| r.id).collect())),
            Action::Dial { .. } => None,
        })
        .collect()
}

#[test]
fn a_node_that_knows_only_a_seed_learns_every_member_over_the_link() {
    let t0 = Instant::now();
    let mut t = table(); // LOCAL = 500
    let seed = NodeId(700);
    t.on_link_up(t0, &hello(seed, 1));
    assert_eq!(events(&mut t), vec![EventKind::Joined, EventKind::LinkUp]);
    actions(&mut t);
    // The seed's view: two members we have never heard of.
    let (a, b) = (NodeId(100), NodeId(900));
    t.on_peer_list(
        t0,
        seed,
        &PeerList {
            peers: vec![
                member(a, 1, "alive"),
                member(b, 1, "alive"),
                member(LOCAL, 1, "alive"),
            ],
        },
    );
    assert!(events(&mut t).is_empty(), "hearsay announces nobody");
    assert_eq!(t.pending(), 2);
    // We dial the higher id at once; the lower one dials us (it learns of us
    // from the seed) or we dial it after the fallback.
    let dials: Vec<NodeId> = actions(&mut t)
        .iter()
        .filter_map(|x| match x {
            Action::Dial { id, .. } => Some(*id),
            Action::Send { .. } => None,
        })
        .collect();
    assert_eq!(dials, vec![b]);
    t.on_link_up(t0, &hello(b, 1));
    t.on_link_up(t0, &hello(a, 1));
    let ev = events(&mut t);
    assert_eq!(ev.iter().filter(|k| **k == EventKind::Joined).count(), 2);
    assert_eq!(t.pending(), 0);
}

#[test]
fn a_new_link_gets_our_view_and_every_other_link_gets_the_news_once() {
    let t0 = Instant::now();
    let mut t = table();
    let (a, b, n) = (NodeId(100), NodeId(200), NodeId(300));
    t.on_link_up(t0, &hello(a, 1));
    t.on_link_up(t0, &hello(b, 1));
    actions(&mut t);
    t.on_link_up(t0, &hello(n, 1));
    let mut s = sends(&actions(&mut t));
    for (_, ids) in &mut s {
        ids.sort();
    }
    s.sort();
    assert_eq!(s, vec![(a, vec![n]), (b, vec![n]), (n, vec![a, b])]);
    // A relink of the same life is no news: nothing is sent.
    t.on_link_down(t0, n, true);
    t.on_link_up(t0, &hello(n, 1));
    assert!(sends(&actions(&mut t)).is_empty());
}

#[test]
fn hearsay_never_resurrects_a_tombstone() {
    let t0 = Instant::now();
    let mut t = table();
    let (seed, gone) = (NodeId(700), NodeId(100));
    t.on_link_up(t0, &hello(seed, 1));
    t.on_link_up(t0, &hello(gone, 3));
    t.on_link_down(t0, gone, false);
    actions(&mut t);
    t.on_dial_failed(t0, gone, DialFailure::Refused);
    assert_eq!(t.get(&gone).unwrap().state, PeerState::Failed);
    events(&mut t);
    for inc in [2, 3] {
        t.on_peer_list(
            t0,
            seed,
            &PeerList {
                peers: vec![member(gone, inc, "alive")],
            },
        );
    }
    assert!(events(&mut t).is_empty());
    assert!(!actions(&mut t)
        .iter()
        .any(|x| matches!(x, Action::Dial { .. })));
    // A newer life of the same id is worth a dial (its link decides).
    t.on_peer_list(
        t0,
        seed,
        &PeerList {
            peers: vec![member(gone, 4, "alive")],
        },
    );
    assert!(actions(&mut t)
        .iter()
        .any(|x| matches!(x, Action::Dial { id, .. } if *id == gone)));
    assert_eq!(t.get(&gone).unwrap().state, PeerState::Failed);
}

#[derive(Debug, Clone)]
enum Input {
    Beacon(u8, u64, u8),
    LinkUp(u8, u64),
    LinkDown(u8, bool),
    DialFailed(u8, u8),
    Goodbye(u8),
    Pong(u8),
    Report(u8, u8, u64, u8),
    Tick,
}

fn arb_input() -> impl Strategy<Value = (u64, Input)> {
    let id = 0u8..6;
    let input = prop_oneof![
        (id.clone(), 1u64..4, 0u8..3).prop_map(|(i, n, k)| Input::Beacon(i, n, k)),
        (id.clone(), 1u64..4).prop_map(|(i, n)| Input::LinkUp(i, n)),
        (id.clone(), any::<bool>()).prop_map(|(i, g)| Input::LinkDown(i, g)),
        (id.clone(), 0u8..4).prop_map(|(i, w)| Input::DialFailed(i, w)),
        id.clone().prop_map(Input::Goodbye),
        id.clone().prop_map(Input::Pong),
        (id.clone(), id.clone(), 1u64..4, 0u8..4)
            .prop_map(|(f, i, n, s)| Input::Report(f, i, n, s)),
        Just(Input::Tick),
    ];
    (0u64..2_000, input)
}

proptest! {
    /// Arbitrary input sequences with non-decreasing `now` keep the table
    /// coherent: every event names a peer whose first event was `Joined`,
    /// reaped peers are gone, link events alternate, and an alive peer that
    /// was heard from within `dead_after` and has no lost link is never failed.
    #[test]
    fn prop_table_stays_consistent(inputs in proptest::collection::vec(arb_input(), 1..200)) {
        stays_consistent(Config::default(), inputs)?;
    }

    /// The same in overlay mode, with records relayed by any peer (trusted
    /// only when it is confirmed and linked) and neighbours named at random.
    #[test]
    fn prop_overlay_table_stays_consistent(inputs in proptest::collection::vec(arb_input(), 1..200)) {
        let cfg = Config { overlay: Some(2), ..Config::default() };
        stays_consistent(cfg, inputs)?;
    }
}

fn stays_consistent(cfg: Config, inputs: Vec<(u64, Input)>) -> Result<(), TestCaseError> {
    let overlay = cfg.overlay.is_some();
    {
        let t0 = Instant::now();
        let mut t = PeerTable::new(NodeId(3), cfg, 7);
        t.set_local(&hello(NodeId(3), 2));
        let mut now = t0;
        let mut known: HashMap<NodeId, bool> = HashMap::new(); // id -> link up per events
        for (dt, input) in inputs {
            now += Duration::from_millis(dt);
            let nid = |i: u8| NodeId(i as u128);
            match input {
                Input::Beacon(i, n, k) => {
                    let kind =
                        [BeaconKind::Announce, BeaconKind::Reply, BeaconKind::Leave][k as usize];
                    // Names collide across ids so restarts and conflicts happen.
                    let b = Beacon {
                        name: format!("n{}", i % 3),
                        ..beacon(nid(i), n, kind)
                    };
                    t.on_beacon(now, &b);
                }
                Input::LinkUp(i, n) => t.on_link_up(
                    now,
                    &Hello {
                        name: format!("n{}", i % 3),
                        ..hello(nid(i), n)
                    },
                ),
                Input::LinkDown(i, g) => t.on_link_down(now, nid(i), g),
                Input::DialFailed(i, w) => {
                    let why = [
                        DialFailure::Refused,
                        DialFailure::Other,
                        DialFailure::Duplicate,
                        DialFailure::Reset,
                    ][w as usize];
                    t.on_dial_failed(now, nid(i), why);
                }
                Input::Goodbye(i) => t.on_goodbye(now, nid(i)),
                Input::Pong(i) => t.on_pong(now, nid(i), Duration::from_millis(1)),
                Input::Report(from, i, n, st) => {
                    let state = ["alive", "suspect", "failed", "left"][st as usize];
                    let r = PeerRecord {
                        name: format!("n{}", i % 3),
                        ..member(nid(i), n, state)
                    };
                    t.on_peer_list(now, nid(from), &PeerList { peers: vec![r] });
                }
                Input::Tick => {
                    // Overlay mode: the neighbours change with time.
                    t.set_neighbours(
                        now,
                        (0..6u128)
                            .filter(|i| (now - t0).as_millis() % (i + 2) == 0)
                            .map(NodeId),
                        |i| i.0 % 2 == 0,
                    );
                    t.on_tick(now);
                    // Never a deadline in the past after a tick: the driver would spin.
                    if let Some(d) = t.next_deadline() {
                        prop_assert!(d > now, "deadline {:?} not after the tick", d - now);
                    }
                }
            }
            while let Some(e) = t.poll_event() {
                prop_assert!(e.id != NodeId(3), "own id in an event");
                match e.kind {
                    EventKind::Joined | EventKind::Restarted if !known.contains_key(&e.id) => {
                        known.insert(e.id, false);
                    }
                    EventKind::Reaped => {
                        prop_assert!(known.remove(&e.id).is_some());
                        prop_assert!(t.get(&e.id).is_none());
                    }
                    EventKind::LinkUp => {
                        let up = known.get_mut(&e.id);
                        prop_assert!(up.is_some(), "link_up before joined");
                        let up = up.unwrap();
                        prop_assert!(!*up, "two link_up in a row");
                        *up = true;
                    }
                    EventKind::LinkDown => {
                        let up = known.get_mut(&e.id);
                        prop_assert!(
                            up.is_some() && *up.as_deref().unwrap(),
                            "link_down without link_up"
                        );
                        *up.unwrap() = false;
                    }
                    _ => prop_assert!(known.contains_key(&e.id), "{:?} before joined", e.kind),
                }
            }
            while let Some(action) = t.poll_action() {
                match action {
                    Action::Dial { id, .. } => {
                        // (The overlay test names neighbours and ticks in one
                        // step: a dial may be for a pending entry the tick
                        // then forgot.)
                        if let Some(p) = t.get(&id) {
                            prop_assert_eq!(p.link, LinkState::Connecting);
                        } else {
                            prop_assert!(overlay, "a dial for no entry");
                        }
                    }
                    Action::Send { to, list } => {
                        // Probes go to linked peers, about peers without a link.
                        prop_assert_eq!(t.get(&to).unwrap().link, LinkState::Up);
                        for r in &list.peers {
                            if overlay && r.id == NodeId(3) {
                                // A refutation: our own record, higher.
                                prop_assert_eq!(Some(r.incarnation), t.local_incarnation());
                                continue;
                            }
                            let Some(p) = t.get(&r.id) else {
                                // A verdict relayed about an entry that the
                                // same input removed (a stopped rival).
                                prop_assert!(
                                    overlay && ["left", "failed"].contains(&r.state.as_str())
                                );
                                continue;
                            };
                            prop_assert!(p.confirmed(), "records only about confirmed entries");
                            if r.state == RECORD_PROBE {
                                prop_assert!(p.state != PeerState::Left);
                                prop_assert!(p.link != LinkState::Up);
                            } else if !overlay || r.state == "alive" {
                                // (In overlay mode a verdict or an alert does
                                // go to its subject, which refutes it.)
                                prop_assert!(r.id != to, "a peer is not told about itself");
                            }
                        }
                    }
                }
            }
            let mut names: HashMap<String, Vec<&Peer>> = HashMap::new();
            for p in t.peers() {
                if !p.confirmed() {
                    prop_assert!(!known.contains_key(&p.id), "events about a pending entry");
                    continue;
                }
                names.entry(p.name.clone()).or_default().push(p);
                prop_assert_eq!(known.get(&p.id).copied(), Some(p.link == LinkState::Up));
                if let Some(d) = t.next_deadline() {
                    prop_assert!(d + Duration::from_secs(3600) > now);
                }
            }
            // One confirmed entry per name, or several live ones all flagged
            // as a conflict.
            for (name, holders) in names {
                if holders.len() > 1 {
                    for p in holders {
                        prop_assert!(
                            p.is_live() && p.conflict.is_some(),
                            "{} claimed twice: {:?}",
                            name,
                            p
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn tagged(id: NodeId, inc: u64, version: u64, role: &str) -> PeerList {
    PeerList {
        peers: vec![PeerRecord {
            tags: [("role".to_string(), role.to_string())].into(),
            tags_version: version,
            by: None,
            ..member(id, inc, "alive")
        }],
    }
}

#[test]
fn a_newer_tag_version_updates_the_peer_and_stale_ones_change_nothing() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(HIGH, 1));
    events(&mut t);
    actions(&mut t);
    t.on_peer_list(t0, HIGH, &tagged(HIGH, 1, 2, "db"));
    assert_eq!(events(&mut t), vec![EventKind::Updated]);
    assert_eq!(t.get(&HIGH).unwrap().tags["role"], "db");
    // A late record (version 1) and a repeat (version 2) change nothing.
    t.on_peer_list(t0, HIGH, &tagged(HIGH, 1, 1, "web"));
    t.on_peer_list(t0, HIGH, &tagged(HIGH, 1, 2, "web"));
    assert_eq!(events(&mut t), vec![]);
    assert_eq!(t.get(&HIGH).unwrap().tags["role"], "db");
    // A relink of the same life carries the start-time tags: kept out.
    t.on_link_down(t0, HIGH, false);
    t.on_link_up(t0, &hello(HIGH, 1));
    assert!(!events(&mut t).contains(&EventKind::Updated));
    assert_eq!(t.get(&HIGH).unwrap().tags["role"], "db");
    // A beacon's digest (of the start-time tags) is no news either.
    t.on_beacon(t0, &beacon(HIGH, 1, BeaconKind::Announce));
    assert!(!events(&mut t).contains(&EventKind::Updated));
    // A record of another life (a restart not yet seen) is not applied.
    t.on_peer_list(t0, HIGH, &tagged(HIGH, 2, 9, "web"));
    assert_eq!(t.get(&HIGH).unwrap().tags["role"], "db");
    // A restart starts the versions again from its handshake.
    t.on_link_down(t0, HIGH, true);
    t.on_link_up(t0, &hello(HIGH, 3));
    assert!(t.get(&HIGH).unwrap().tags.is_empty());
    assert_eq!(t.get(&HIGH).unwrap().tags_version, 0);
    t.on_peer_list(t0, HIGH, &tagged(HIGH, 3, 1, "web"));
    assert_eq!(t.get(&HIGH).unwrap().tags["role"], "web");
}

#[test]
fn force_leave_marks_a_failed_peer_left_refuses_a_live_one_and_prunes_on_request() {
    let t0 = Instant::now();
    let mut t = table();
    t.on_link_up(t0, &hello(HIGH, 1));
    t.on_link_up(t0, &hello(LOW, 1));
    events(&mut t);
    assert_eq!(
        t.force_leave(t0, HIGH, false),
        Err(ForceLeaveError::Alive(PeerState::Alive))
    );
    assert_eq!(
        t.force_leave(t0, NodeId(7), false),
        Err(ForceLeaveError::Unknown)
    );
    t.on_link_down(t0, HIGH, false);
    t.on_dial_failed(t0, HIGH, DialFailure::Other);
    actions(&mut t);
    t.on_dial_failed(t0, HIGH, DialFailure::Refused);
    // Make sure it is failed, whichever way the table got there.
    let later = t0 + Duration::from_secs(5);
    t.on_pong(later, LOW, Duration::from_millis(1));
    t.on_tick(later);
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Failed);
    events(&mut t);
    t.force_leave(later, HIGH, false).unwrap();
    assert_eq!(events(&mut t), vec![EventKind::Left]);
    assert_eq!(t.get(&HIGH).unwrap().state, PeerState::Left);
    // No more probes or dials about it: a beacon of the same life is ignored.
    t.on_beacon(later, &beacon(HIGH, 1, BeaconKind::Announce));
    assert!(actions(&mut t).is_empty());
    t.force_leave(later, HIGH, true).unwrap();
    assert_eq!(events(&mut t), vec![EventKind::Reaped]);
    assert!(t.get(&HIGH).is_none());
}

#[test]
fn unlinked_lists_pending_entries_heard_for_a_while_as_of_each_tick() {
    let mut t = table();
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let unlinked_at = |t: &mut PeerTable, at: Duration| {
        // Both keep beaconing: they stay pending, never silent.
        t.on_beacon(t0 + at, &beacon(HIGH, 1, BeaconKind::Announce));
        if at >= ms(2000) {
            t.on_beacon(t0 + at, &beacon(LOW, 1, BeaconKind::Announce));
        }
        t.on_tick(t0 + at);
        t.unlinked().to_vec()
    };
    for s in 0..5 {
        assert!(unlinked_at(&mut t, ms(1000 * s)).is_empty());
    }
    assert!(unlinked_at(&mut t, ms(4999)).is_empty());
    assert_eq!(unlinked_at(&mut t, ms(5000)), ["n900"]);
    assert_eq!(unlinked_at(&mut t, ms(6000)), ["n900"]);
    assert_eq!(unlinked_at(&mut t, ms(7000)), ["n100", "n900"]);
    t.on_link_up(t0 + ms(7100), &hello(HIGH, 1));
    assert_eq!(unlinked_at(&mut t, ms(7200)), ["n100"]);
}

/// The largest record the daemon lets through: every field set to its
/// widest, 64 tags at the tag limits, a scoped IPv6 address.
fn widest_record(id: NodeId) -> PeerRecord {
    let tags: Tags = (0..64)
        .map(|i| {
            (
                format!("{i:0>64}"),
                "v".repeat(crate::id::MAX_TAG_VALUE_LEN),
            )
        })
        .collect();
    PeerRecord {
        id,
        incarnation: u64::MAX,
        name: "n".repeat(255),
        addr: "[fe80::1234:5678:9abc:def0%4294967295]:65535"
            .parse()
            .unwrap(),
        state: PeerState::Suspect.as_str().into(),
        age_ms: Some(u64::MAX),
        tags,
        tags_version: u64::MAX,
        by: Some(NodeId(u128::MAX)),
    }
}

#[test]
fn record_bound_is_an_upper_bound_of_the_encoding() {
    let wide = widest_record(NodeId(u128::MAX));
    let narrow = PeerRecord {
        tags: Tags::new(),
        age_ms: None,
        by: None,
        tags_version: 0,
        name: String::new(),
        ..wide.clone()
    };
    for r in [wide, narrow] {
        for n in [1, 3] {
            let list = PeerList {
                peers: vec![r.clone(); n],
            };
            let body = rmp_serde::to_vec_named(&list).unwrap().len();
            // The list's own map and array headers: a few bytes.
            assert!(
                body <= n * record_bound(&r) + 16,
                "{body} > {n} × {}",
                record_bound(&r)
            );
        }
    }
}

#[test]
fn a_view_larger_than_the_frame_budget_goes_as_several_frames() {
    let t0 = Instant::now();
    let cfg = Config {
        overlay: Some(8),
        max_list_bytes: 64 << 10,
        ..Config::default()
    };
    let mut t = PeerTable::new(LOCAL, cfg, 1);
    let wide_hello = |id: NodeId| Hello {
        tags: widest_record(id).tags,
        ..hello(id, 1)
    };
    let members: Vec<NodeId> = (1..=20).map(|i| NodeId(1000 + i)).collect();
    for &id in &members {
        t.on_link_up(t0, &wide_hello(id));
    }
    actions(&mut t);
    let newcomer = NodeId(2000);
    t.on_link_up(t0, &hello(newcomer, 1));
    let lists: Vec<PeerList> = actions(&mut t)
        .into_iter()
        .filter_map(|a| match a {
            Action::Send { to, list } if to == newcomer => Some(list),
            _ => None,
        })
        .collect();
    assert!(
        lists.len() > 1,
        "20 members of ~21 KB each in 64 KiB frames"
    );
    let mut sent = Vec::new();
    for l in &lists {
        let bound: usize = l.peers.iter().map(record_bound).sum();
        assert!(bound <= 64 << 10, "a frame of {bound} bytes");
        sent.extend(l.peers.iter().map(|r| r.id));
    }
    sent.sort_unstable();
    assert_eq!(sent, members, "every member, once, in order");
}
