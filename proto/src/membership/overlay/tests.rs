//! Overlay-mode rules of the peer table, with synthetic time: confirmation
//! through a confirmed neighbour, relay once per link without loops,
//! verdicts (hard evidence, several observers for silence), refutation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::beacon::{Beacon, BeaconKind};
use crate::frame::{Hello, PeerList, PeerRecord, VERSION};
use crate::id::{NodeId, Tags};
use crate::membership::{
    Action, Config, DialFailure, EventKind, LinkState, PeerState, PeerTable, RECHECK_SPREAD,
};

const LOCAL: NodeId = NodeId(500);

fn addr(id: NodeId) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + (id.0 % 1000) as u16))
}

fn hello(id: NodeId, inc: u64) -> Hello {
    Hello {
        protocol: VERSION,
        cluster: "c".into(),
        id,
        incarnation: inc,
        name: format!("n{}", id.0),
        addr: addr(id),
        tags: Tags::new(),
    }
}

/// The announce beacon of `id` at incarnation 1.
fn announce(id: NodeId) -> Beacon {
    Beacon {
        cluster: "c".into(),
        id,
        incarnation: 1,
        name: format!("n{}", id.0),
        addr: addr(id),
        kind: BeaconKind::Announce,
        digest: 0,
    }
}

fn member(id: NodeId, inc: u64, state: &str) -> PeerRecord {
    PeerRecord {
        id,
        incarnation: inc,
        name: format!("n{}", id.0),
        addr: addr(id),
        state: state.into(),
        age_ms: None,
        tags: Tags::new(),
        tags_version: 0,
        by: None,
    }
}

fn alert(id: NodeId, inc: u64, by: NodeId) -> PeerRecord {
    PeerRecord {
        by: Some(by),
        ..member(id, inc, "suspect")
    }
}

fn list(records: Vec<PeerRecord>) -> PeerList {
    PeerList { peers: records }
}

fn overlay_table(local: NodeId) -> PeerTable {
    let cfg = Config {
        overlay: Some(4),
        ..Config::default()
    };
    let mut t = PeerTable::new(local, cfg, 1);
    t.set_local(&hello(local, 1));
    t
}

fn events(t: &mut PeerTable) -> Vec<(NodeId, EventKind)> {
    std::iter::from_fn(|| t.poll_event())
        .map(|e| (e.id, e.kind))
        .collect()
}

fn actions(t: &mut PeerTable) -> Vec<Action> {
    std::iter::from_fn(|| t.poll_action()).collect()
}

/// (recipient, [(subject, state)]) of every send, sorted.
fn sends(actions: &[Action]) -> Vec<(NodeId, Vec<(NodeId, String)>)> {
    let mut out: Vec<(NodeId, Vec<(NodeId, String)>)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to, list } => Some((
                *to,
                list.peers.iter().map(|r| (r.id, r.state.clone())).collect(),
            )),
            Action::Dial { .. } => None,
        })
        .collect();
    out.sort();
    out
}

fn dials(actions: &[Action]) -> Vec<NodeId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Dial { id, .. } => Some(*id),
            Action::Send { .. } => None,
        })
        .collect()
}

/// A table linked to each of `ids` (all neighbours), with queues drained.
fn linked(t0: Instant, ids: &[NodeId]) -> PeerTable {
    let mut t = overlay_table(LOCAL);
    t.set_neighbours(t0, ids.iter().copied(), |_| false);
    for &id in ids {
        t.on_link_up(t0, &hello(id, 1));
    }
    events(&mut t);
    actions(&mut t);
    t
}

#[test]
fn a_record_confirms_only_over_a_confirmed_linked_peer() {
    let t0 = Instant::now();
    let mut t = overlay_table(LOCAL);
    let (pending, n, x) = (NodeId(100), NodeId(200), NodeId(300));
    // A peer heard by beacon only: its word is a claim like its beacon.
    t.on_beacon(t0, &announce(pending));
    t.on_peer_list(t0, pending, &list(vec![member(x, 1, "alive")]));
    assert!(
        t.get(&x).is_none(),
        "a pending peer's word confirms nothing"
    );
    assert!(events(&mut t).is_empty());
    // A confirmed neighbour's word confirms.
    t.set_neighbours(t0, [n], |_| false);
    t.on_link_up(t0, &hello(n, 1));
    events(&mut t);
    t.on_peer_list(t0, n, &list(vec![member(x, 1, "alive")]));
    assert_eq!(events(&mut t), vec![(x, EventKind::Joined)]);
    let p = t.get(&x).unwrap();
    assert!(p.confirmed() && p.remote());
    assert!(!p.degraded(), "no link is expected with a remote member");
    // Not a neighbour: never dialed, never judged on silence.
    assert!(dials(&actions(&mut t)).is_empty());
    let later = t0 + Duration::from_secs(60);
    t.on_link_down(t0, n, true); // nothing else speaks for anyone
    t.on_tick(later);
    assert_eq!(t.get(&x).unwrap().state, PeerState::Alive);
    // The same record from a peer whose link is down changes nothing.
    t.on_peer_list(later, n, &list(vec![member(NodeId(400), 1, "alive")]));
    assert!(t.get(&NodeId(400)).is_none());
}

#[test]
fn news_is_relayed_once_to_every_other_link_and_old_news_not_at_all() {
    let t0 = Instant::now();
    let (a, b, c, x) = (NodeId(100), NodeId(200), NodeId(300), NodeId(900));
    let mut t = linked(t0, &[a, b, c]);
    t.on_peer_list(t0, a, &list(vec![member(x, 5, "alive")]));
    let alive = || vec![(x, "alive".to_string())];
    assert_eq!(
        sends(&actions(&mut t)),
        vec![(b, alive()), (c, alive())],
        "every link but the one it came over"
    );
    // The same fact over another link, or an older life: no news.
    t.on_peer_list(t0, b, &list(vec![member(x, 5, "alive")]));
    t.on_peer_list(t0, c, &list(vec![member(x, 4, "alive")]));
    assert!(sends(&actions(&mut t)).is_empty());
    // A verdict is news once; `alive` of the same life does not undo it.
    t.on_peer_list(t0, b, &list(vec![member(x, 5, "failed")]));
    assert_eq!(t.get(&x).unwrap().state, PeerState::Failed);
    let failed = || vec![(x, "failed".to_string())];
    assert_eq!(sends(&actions(&mut t)), vec![(a, failed()), (c, failed())]);
    t.on_peer_list(t0, c, &list(vec![member(x, 5, "failed")]));
    t.on_peer_list(t0, a, &list(vec![member(x, 5, "alive")]));
    assert!(sends(&actions(&mut t)).is_empty());
    assert_eq!(t.get(&x).unwrap().state, PeerState::Failed);
    // `left` goes further than `failed`; a higher incarnation is news.
    t.on_peer_list(t0, c, &list(vec![member(x, 5, "left")]));
    assert_eq!(t.get(&x).unwrap().state, PeerState::Left);
    assert_eq!(sends(&actions(&mut t)).len(), 2);
}

#[test]
fn a_crash_seen_by_one_observer_is_failed_and_spread() {
    let t0 = Instant::now();
    let (a, b, s) = (NodeId(100), NodeId(200), NodeId(900));
    let mut t = linked(t0, &[a, b, s]);
    // FIN, then the redial is refused: hard evidence.
    t.on_link_down(t0, s, false);
    assert_eq!(dials(&actions(&mut t)), vec![s]);
    t.on_dial_failed(t0, s, DialFailure::Refused);
    assert!(events(&mut t).contains(&(s, EventKind::Failed)));
    let failed = || vec![(s, "failed".to_string())];
    assert_eq!(sends(&actions(&mut t)), vec![(a, failed()), (b, failed())]);
}

#[test]
fn silence_fails_a_member_only_on_two_observers_alerts() {
    let t0 = Instant::now();
    let (a, b, s, o) = (NodeId(100), NodeId(200), NodeId(900), NodeId(950));
    let mut t = linked(t0, &[a, b, s]);
    // The link to `s` dies of silence and redials time out.
    let dead = t.config().dead_after;
    t.on_link_down(t0 + Duration::from_millis(900), s, false);
    actions(&mut t);
    t.on_dial_failed(t0 + Duration::from_millis(950), s, DialFailure::Other);
    events(&mut t);
    t.on_tick(t0 + dead);
    // Our own verdict is one alert: sent, but no failure yet.
    assert_eq!(t.get(&s).unwrap().state, PeerState::Suspect);
    assert!(!events(&mut t).contains(&(s, EventKind::Failed)));
    let a1 = actions(&mut t);
    let alerts: Vec<&PeerRecord> = a1
        .iter()
        .filter_map(|x| match x {
            Action::Send { list, .. } => Some(list.peers.iter()),
            Action::Dial { .. } => None,
        })
        .flatten()
        .filter(|r| r.id == s && r.by == Some(LOCAL))
        .collect();
    assert_eq!(alerts.len(), 2, "to a and b (s is not linked)");
    // No spin: the index has no silence deadline left for it.
    assert!(t
        .next_deadline()
        .is_none_or(|d| d > t0 + dead + Duration::from_millis(1)));
    // The same observer again counts once; a second observer fails it.
    t.on_peer_list(t0 + dead, a, &list(vec![alert(s, 1, LOCAL)]));
    assert_eq!(t.get(&s).unwrap().state, PeerState::Suspect);
    t.on_peer_list(t0 + dead, a, &list(vec![alert(s, 1, o)]));
    assert_eq!(t.get(&s).unwrap().state, PeerState::Failed);
    assert!(events(&mut t).contains(&(s, EventKind::Failed)));
}

#[test]
fn a_neighbour_no_dial_reaches_is_alerted_on_and_two_alerts_fail_it() {
    let t0 = Instant::now();
    let (a, b, x) = (NodeId(100), NodeId(200), NodeId(900));
    let mut t = linked(t0, &[a, b]);
    // x is known by word, then becomes a neighbour: dialed at once.
    t.on_peer_list(t0, a, &list(vec![member(x, 1, "alive")]));
    t.set_neighbours(t0, [a, b, x], |_| false);
    assert_eq!(dials(&actions(&mut t)), vec![x]);
    let dead = t.config().dead_after;
    let later = t0 + dead * 2;
    // a and b are heard all along.
    t.on_traffic(later, a);
    t.on_traffic(later, b);
    // While the first dial is under way, its silence says nothing.
    t.on_tick(later);
    assert_eq!(t.get(&x).unwrap().state, PeerState::Alive);
    assert!(sends(&actions(&mut t))
        .iter()
        .all(|(_, records)| records.iter().all(|(id, _)| *id != x)));
    // The dial fails: now it is judged, and its silence is long past.
    t.on_dial_failed(later, x, DialFailure::Other);
    t.on_tick(later);
    let alerts: Vec<NodeId> = actions(&mut t)
        .iter()
        .filter_map(|act| match act {
            Action::Send { to, list } => list
                .peers
                .iter()
                .any(|r| r.id == x && r.by == Some(LOCAL))
                .then_some(*to),
            Action::Dial { .. } => None,
        })
        .collect();
    assert_eq!(alerts, vec![a, b], "our alert, to every link");
    assert!(t.get(&x).unwrap().is_live(), "one alert fails nobody");
    t.on_peer_list(later, a, &list(vec![alert(x, 1, NodeId(7))]));
    assert_eq!(t.get(&x).unwrap().state, PeerState::Failed);
}

#[test]
fn the_first_link_to_a_member_known_by_word_gets_the_view() {
    let t0 = Instant::now();
    let (a, x) = (NodeId(100), NodeId(900));
    let mut t = linked(t0, &[a]);
    t.on_peer_list(t0, a, &list(vec![member(x, 1, "alive")]));
    t.set_neighbours(t0, [a, x], |_| false);
    actions(&mut t);
    t.on_link_up(t0, &hello(x, 1));
    let to_x: Vec<_> = sends(&actions(&mut t))
        .into_iter()
        .filter(|(to, _)| *to == x)
        .collect();
    assert_eq!(to_x, vec![(x, vec![(a, "alive".to_string())])]);
    // A later link to it, after a graceful close, sends nothing again.
    t.on_link_down(t0, x, true);
    t.on_link_up(t0, &hello(x, 1));
    assert!(sends(&actions(&mut t)).iter().all(|(to, _)| *to != x));
}

#[test]
fn one_remote_alert_alone_fails_nobody() {
    let t0 = Instant::now();
    let (a, b, x) = (NodeId(100), NodeId(200), NodeId(900));
    let mut t = linked(t0, &[a, b]);
    t.on_peer_list(t0, a, &list(vec![member(x, 1, "alive")]));
    actions(&mut t);
    t.on_peer_list(t0, a, &list(vec![alert(x, 1, NodeId(1))]));
    assert_eq!(t.get(&x).unwrap().state, PeerState::Alive);
    // Relayed once (to b), not back to a; again from b: no news.
    assert_eq!(
        sends(&actions(&mut t)),
        vec![(b, vec![(x, "suspect".to_string())])]
    );
    t.on_peer_list(t0, b, &list(vec![alert(x, 1, NodeId(1))]));
    assert!(actions(&mut t).is_empty());
    // Another observer's: failed.
    t.on_peer_list(t0, b, &list(vec![alert(x, 1, NodeId(2))]));
    assert_eq!(t.get(&x).unwrap().state, PeerState::Failed);
}

#[test]
fn a_node_reported_failed_refutes_and_the_refutation_revives_it() {
    let t0 = Instant::now();
    let (a, b) = (NodeId(100), NodeId(200));
    let mut t = linked(t0, &[a, b]);
    assert_eq!(t.local_incarnation(), Some(1));
    t.on_peer_list(t0, a, &list(vec![member(LOCAL, 1, "failed")]));
    assert_eq!(t.local_incarnation(), Some(2));
    assert_eq!(t.refutations(), 1);
    let mine = || vec![(LOCAL, "alive".to_string())];
    assert_eq!(sends(&actions(&mut t)), vec![(a, mine()), (b, mine())]);
    // An older report is answered already.
    t.on_peer_list(t0, b, &list(vec![member(LOCAL, 1, "failed")]));
    assert_eq!(t.local_incarnation(), Some(2));
    // Elsewhere: the refutation overrides the verdict.
    let mut u = overlay_table(NodeId(300));
    u.set_neighbours(t0, [a], |_| false);
    u.on_link_up(t0, &hello(a, 1));
    u.on_peer_list(t0, a, &list(vec![member(LOCAL, 1, "alive")]));
    u.on_peer_list(t0, a, &list(vec![member(LOCAL, 1, "failed")]));
    events(&mut u);
    u.on_peer_list(t0, a, &list(vec![member(LOCAL, 2, "alive")]));
    assert_eq!(u.get(&LOCAL).unwrap().state, PeerState::Alive);
    assert_eq!(events(&mut u), vec![(LOCAL, EventKind::Joined)]);
}

#[test]
fn a_member_held_failed_whose_beacons_arrive_is_dialed_once_and_told() {
    let t0 = Instant::now();
    let (a, x) = (NodeId(100), NodeId(900));
    let mut t = linked(t0, &[a]);
    t.on_peer_list(t0, a, &list(vec![member(x, 1, "alive")]));
    let t1 = t0 + Duration::from_millis(10);
    t.on_peer_list(t1, a, &list(vec![member(x, 1, "failed")]));
    assert_eq!(t.get(&x).unwrap().state, PeerState::Failed);
    events(&mut t);
    actions(&mut t);
    // No neighbour, never linked: without a beacon, never dialed.
    t.on_tick(t1 + RECHECK_SPREAD * 2);
    assert!(dials(&actions(&mut t)).is_empty());
    let beacon = announce(x);
    // Beacons every 500 ms: one dial within the spread, not one per beacon.
    let t2 = t1 + RECHECK_SPREAD * 3;
    let step = Duration::from_millis(50);
    let mut now = t2;
    let mut dialed = Vec::new();
    while now <= t2 + RECHECK_SPREAD + step {
        if (now - t2).as_millis() % 500 == 0 {
            t.on_beacon(now, &beacon);
        }
        t.on_tick(now);
        dialed.extend(dials(&actions(&mut t)).into_iter().map(|id| (id, now)));
        now += step;
    }
    assert_eq!(dialed.len(), 1, "{dialed:?}");
    let (id, at) = dialed[0];
    assert_eq!(id, x);
    let due = at;
    // The link proves it alive here and tells it of the verdict, so that
    // it refutes for everyone else.
    t.on_link_up(due, &hello(x, 1));
    assert_eq!(t.get(&x).unwrap().state, PeerState::Alive);
    assert!(sends(&actions(&mut t)).contains(&(x, vec![(x, "failed".to_string())])));
}

#[test]
fn a_member_heard_on_our_own_link_is_not_failed_by_word() {
    let t0 = Instant::now();
    let (a, s) = (NodeId(100), NodeId(900));
    let mut t = linked(t0, &[a, s]);
    t.on_traffic(t0 + Duration::from_millis(10), s);
    t.on_peer_list(
        t0 + Duration::from_millis(20),
        a,
        &list(vec![member(s, 1, "failed")]),
    );
    assert_eq!(t.get(&s).unwrap().state, PeerState::Alive);
    // The verdict goes to the member itself, so that it refutes.
    assert_eq!(
        sends(&actions(&mut t)),
        vec![(s, vec![(s, "failed".to_string())])]
    );
}

#[test]
fn only_neighbours_are_dialed_and_a_closed_surplus_link_is_not_redialed() {
    let t0 = Instant::now();
    let (n, x) = (NodeId(900), NodeId(950));
    let mut t = overlay_table(LOCAL);
    t.set_neighbours(t0, [n], |_| false);
    t.on_link_up(t0, &hello(n, 1));
    t.on_peer_list(t0, n, &list(vec![member(x, 1, "alive")]));
    assert!(dials(&actions(&mut t)).is_empty(), "x is no neighbour");
    t.set_neighbours(t0, [n, x], |_| false);
    assert_eq!(dials(&actions(&mut t)), vec![x]);
    t.on_link_up(t0, &hello(x, 1));
    // No longer wanted: closed as "not a neighbour" (graceful).
    t.set_neighbours(t0, [n], |_| false);
    t.on_link_down(t0, x, true);
    assert!(t.get(&x).unwrap().remote());
    t.on_tick(t0 + Duration::from_secs(30));
    assert!(dials(&actions(&mut t)).is_empty());
    assert_eq!(t.get(&x).unwrap().link, LinkState::Down);
    assert_eq!(t.get(&x).unwrap().state, PeerState::Alive);
}

#[test]
fn the_word_of_a_member_never_displaces_a_name_heard_on_our_link() {
    let t0 = Instant::now();
    let (a, old, new) = (NodeId(100), NodeId(800), NodeId(850));
    let mut t = linked(t0, &[a, old]);
    let mut r = member(new, 9, "alive");
    r.name = format!("n{}", old.0);
    t.on_peer_list(t0, a, &list(vec![r.clone()]));
    assert!(!t.get(&new).unwrap().confirmed(), "stays pending");
    assert!(t.get(&old).unwrap().confirmed());
    // Once the old holder is gone (link closed, remote), a later start
    // replaces it.
    let mut u = linked(t0, &[a]);
    let mut held = member(old, 1, "alive");
    held.name = r.name.clone();
    u.on_peer_list(t0, a, &list(vec![held]));
    events(&mut u);
    u.on_peer_list(t0, a, &list(vec![r]));
    assert_eq!(
        events(&mut u),
        vec![(old, EventKind::Reaped), (new, EventKind::Restarted)]
    );
}

/// One fact carried over a link: (subject, incarnation, state, observer).
type Fact = (NodeId, u64, String, Option<NodeId>);

/// A small overlay of tables, linked along `edges`, delivering every send
/// in order until none is left (bounded).
struct Mesh {
    tables: BTreeMap<NodeId, PeerTable>,
    /// (from, to) -> records carried, per (subject, state, by).
    carried: BTreeMap<(NodeId, NodeId), Vec<Fact>>,
}

impl Mesh {
    fn new(t0: Instant, n: u128, edges: &BTreeSet<(u128, u128)>) -> Mesh {
        let mut tables: BTreeMap<NodeId, PeerTable> = (1..=n)
            .map(|i| (NodeId(i), overlay_table(NodeId(i))))
            .collect();
        for (&id, t) in tables.iter_mut() {
            let nb: Vec<NodeId> = edges
                .iter()
                .filter_map(|&(a, b)| {
                    (NodeId(a) == id)
                        .then_some(NodeId(b))
                        .or((NodeId(b) == id).then_some(NodeId(a)))
                })
                .collect();
            t.set_neighbours(t0, nb.iter().copied(), |_| false);
            for other in nb {
                t.on_link_up(t0, &hello(other, 1));
            }
        }
        let mut m = Mesh {
            tables,
            carried: BTreeMap::new(),
        };
        m.run(t0);
        m.carried.clear();
        m
    }

    /// Delivers sends until quiet; false if the bound was hit.
    fn run(&mut self, now: Instant) -> bool {
        let mut queue: VecDeque<(NodeId, NodeId, PeerList)> = VecDeque::new();
        for _ in 0..10_000 {
            for (&id, t) in self.tables.iter_mut() {
                while let Some(a) = t.poll_action() {
                    if let Action::Send { to, list } = a {
                        queue.push_back((id, to, list));
                    }
                }
            }
            let Some((from, to, list)) = queue.pop_front() else {
                return true;
            };
            let Some(t) = self.tables.get_mut(&to) else {
                continue;
            };
            if t.get(&from).is_none_or(|p| p.link != LinkState::Up) {
                continue;
            }
            let c = self.carried.entry((from, to)).or_default();
            c.extend(
                list.peers
                    .iter()
                    .map(|r| (r.id, r.incarnation, r.state.clone(), r.by)),
            );
            t.on_peer_list(now, from, &list);
        }
        false
    }
}

fn arb_graph() -> impl Strategy<Value = (u128, BTreeSet<(u128, u128)>)> {
    (4u128..10).prop_flat_map(|n| {
        // A ring (connected) plus random chords.
        let chords = proptest::collection::btree_set((1..=n, 1..=n), 0..(n as usize * 2));
        (Just(n), chords).prop_map(|(n, chords)| {
            let mut edges: BTreeSet<(u128, u128)> = (1..=n)
                .map(|i| (i.min(i % n + 1), i.max(i % n + 1)))
                .collect();
            edges.extend(
                chords
                    .into_iter()
                    .filter(|(a, b)| a != b)
                    .map(|(a, b)| (a.min(b), a.max(b))),
            );
            (n, edges)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A join, a failure verdict and two alerts injected at random nodes
    /// reach every node, nothing loops, and no link carries one fact twice
    /// in one direction.
    #[test]
    fn prop_each_fact_crosses_each_link_once((n, edges) in arb_graph(), at in 1u128..100) {
        let t0 = Instant::now();
        let mut m = Mesh::new(t0, n, &edges);
        let x = NodeId(1000);
        let first = NodeId(at % n + 1);
        // Everyone learns of x from one node's neighbour.
        let from = m.tables[&first]
            .peers()
            .find(|p| p.link == LinkState::Up)
            .map(|p| p.id)
            .unwrap();
        m.tables.get_mut(&first).unwrap().on_peer_list(t0, from, &list(vec![member(x, 1, "alive")]));
        prop_assert!(m.run(t0), "quiet within the bound");
        for t in m.tables.values() {
            prop_assert!(t.get(&x).is_some_and(|p| p.confirmed() && p.is_live()));
        }
        // Two observers' alerts from two places: failed everywhere.
        let second = NodeId((at / 7) % n + 1);
        for (who, by) in [(first, NodeId(2000)), (second, NodeId(2001))] {
            let from = m.tables[&who].peers().find(|p| p.link == LinkState::Up).map(|p| p.id).unwrap();
            m.tables.get_mut(&who).unwrap().on_peer_list(t0, from, &list(vec![alert(x, 1, by)]));
            prop_assert!(m.run(t0));
        }
        for t in m.tables.values() {
            prop_assert_eq!(t.get(&x).map(|p| p.state), Some(PeerState::Failed));
        }
        for (link, facts) in &m.carried {
            let unique: BTreeSet<_> = facts.iter().collect();
            prop_assert_eq!(unique.len(), facts.len(), "a fact twice over {:?}", link);
        }
    }
}
