use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::overlay::Overlay;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);
const D: NodeId = NodeId(4);

fn msg(text: &'static str) -> AppMessage {
    AppMessage {
        topic: "t".into(),
        payload: Bytes::from_static(text.as_bytes()),
    }
}

fn relayed(origin: NodeId, seq: u64, text: &'static str) -> Relayed {
    Relayed {
        origin,
        seq,
        to: None,
        ttl: 16,
        topic: "t".into(),
        payload: Bytes::from_static(text.as_bytes()),
    }
}

fn transmits(f: &mut Flood) -> Vec<(NodeId, u64)> {
    std::iter::from_fn(|| f.poll_transmit())
        .map(|(to, r)| (to, r.seq))
        .collect()
}

fn delivered(f: &mut Flood) -> Vec<(NodeId, u64)> {
    std::iter::from_fn(|| f.poll_delivery())
        .map(|r| (r.origin, r.seq))
        .collect()
}

#[test]
fn a_message_goes_to_every_link_and_is_passed_on_to_all_but_its_source_and_origin() {
    let mut a = Flood::new(A, Config::default());
    assert_eq!(a.originate(None, msg("x"), &[B, C, A]), 1);
    assert_eq!(transmits(&mut a), vec![(B, 1), (C, 1)]);
    assert!(
        delivered(&mut a).is_empty(),
        "a broadcast is not delivered to its sender"
    );

    let now = Instant::now();
    let mut b = Flood::new(B, Config::default());
    b.on_relayed(now, C, relayed(A, 1, "x"), &[A, C, D]);
    let out: Vec<_> = std::iter::from_fn(|| b.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, D);
    assert_eq!(out[0].1.ttl, 15, "one hop spent");
    assert_eq!(delivered(&mut b), vec![(A, 1)]);
    assert_eq!(b.stats().forwarded, 1);
}

#[test]
fn a_copy_already_handled_is_dropped_and_counted() {
    let now = Instant::now();
    let mut b = Flood::new(B, Config::default());
    b.on_relayed(now, A, relayed(A, 1, "x"), &[A, C]);
    b.on_relayed(now, C, relayed(A, 1, "x"), &[A, C]);
    assert_eq!(transmits(&mut b), vec![(C, 1)]);
    assert_eq!(delivered(&mut b), vec![(A, 1)]);
    assert_eq!(b.stats().duplicates, 1);
    // Our own message coming back is a duplicate too.
    b.on_relayed(now, C, relayed(B, 1, "own"), &[A, C]);
    assert_eq!(b.stats().duplicates, 2);
    assert!(transmits(&mut b).is_empty());
}

#[test]
fn messages_ahead_of_a_gap_are_passed_on_at_once_and_delivered_in_order() {
    let now = Instant::now();
    let mut b = Flood::new(B, Config::default());
    b.on_relayed(now, A, relayed(A, 1, "1"), &[A, C]);
    b.on_relayed(now, A, relayed(A, 3, "3"), &[A, C]);
    b.on_relayed(now, A, relayed(A, 4, "4"), &[A, C]);
    assert_eq!(transmits(&mut b), vec![(C, 1), (C, 3), (C, 4)]);
    assert_eq!(delivered(&mut b), vec![(A, 1)]);
    assert!(b.next_deadline().is_some(), "waiting for 2");
    b.on_relayed(now, C, relayed(A, 2, "2"), &[A, C]);
    assert_eq!(delivered(&mut b), vec![(A, 2), (A, 3), (A, 4)]);
    assert_eq!(b.next_deadline(), None);
    assert_eq!(b.stats().skipped, 0);
}

#[test]
fn a_gap_that_does_not_fill_is_given_up_after_the_hold_and_its_message_is_then_late() {
    let cfg = Config::default();
    let now = Instant::now();
    let mut b = Flood::new(B, cfg);
    b.on_relayed(now, A, relayed(A, 1, "1"), &[A]);
    b.on_relayed(now, A, relayed(A, 3, "3"), &[A]);
    assert_eq!(delivered(&mut b), vec![(A, 1)]);
    // More arrivals behind the gap do not extend the wait.
    b.on_relayed(now + cfg.hold / 2, A, relayed(A, 4, "4"), &[A]);
    assert_eq!(b.next_deadline(), Some(now + cfg.hold));
    b.on_tick(now + cfg.hold / 2);
    assert!(delivered(&mut b).is_empty(), "not yet");
    b.on_tick(now + cfg.hold);
    assert_eq!(delivered(&mut b), vec![(A, 3), (A, 4)]);
    assert_eq!(b.stats().skipped, 1);
    b.on_relayed(now + cfg.hold, A, relayed(A, 2, "2"), &[A]);
    assert!(delivered(&mut b).is_empty());
    assert_eq!(b.stats().duplicates, 1);
}

#[test]
fn the_first_message_heard_from_an_origin_waits_briefly_unless_it_is_its_first() {
    let cfg = Config::default();
    let now = Instant::now();
    let mut b = Flood::new(B, cfg);
    b.on_relayed(now, A, relayed(A, 1, "1"), &[A]);
    assert_eq!(delivered(&mut b), vec![(A, 1)]);

    // C has sent 6 messages before we heard of it.
    b.on_relayed(now, C, relayed(C, 7, "7"), &[C]);
    assert!(delivered(&mut b).is_empty());
    assert_eq!(b.next_deadline(), Some(now + cfg.first_hold));
    // One on a longer path, just behind.
    b.on_relayed(now, D, relayed(C, 6, "6"), &[C, D]);
    b.on_tick(now + cfg.first_hold);
    assert_eq!(delivered(&mut b), vec![(C, 6), (C, 7)]);
    assert_eq!(b.stats().skipped, 5);
}

#[test]
fn an_addressed_message_is_delivered_by_the_member_named_and_passed_on_by_the_rest() {
    let now = Instant::now();
    let mut b = Flood::new(B, Config::default());
    let mut r = relayed(A, 1, "for c");
    r.to = Some(C);
    b.on_relayed(now, A, r.clone(), &[A, D]);
    assert!(delivered(&mut b).is_empty());
    assert_eq!(transmits(&mut b), vec![(D, 1)]);
    // The next broadcast from A is in order (the addressed one counted).
    b.on_relayed(now, A, relayed(A, 2, "all"), &[A, D]);
    assert_eq!(delivered(&mut b), vec![(A, 2)]);

    let mut c = Flood::new(C, Config::default());
    c.on_relayed(now, D, r, &[D]);
    assert_eq!(delivered(&mut c), vec![(A, 1)]);
}

#[test]
fn forged_sequence_numbers_at_the_ends_are_dropped_without_harm() {
    let cfg = Config::default();
    let now = Instant::now();
    let mut b = Flood::new(B, cfg);
    for seq in [0, u64::MAX] {
        b.on_relayed(now, A, relayed(A, seq, "x"), &[A, C]);
    }
    assert!(transmits(&mut b).is_empty());
    assert_eq!(b.stats().duplicates, 2);
    // A huge gap is given up like any other, and counted without overflow.
    b.on_relayed(now, A, relayed(A, u64::MAX - 1, "x"), &[A]);
    b.on_tick(now + cfg.first_hold);
    b.on_relayed(now + cfg.first_hold, C, relayed(C, u64::MAX - 1, "x"), &[C]);
    b.on_tick(now + cfg.first_hold * 2);
    assert_eq!(
        delivered(&mut b),
        vec![(A, u64::MAX - 1), (C, u64::MAX - 1)]
    );
    assert_eq!(b.stats().skipped, u64::MAX, "saturated");
}

#[test]
fn a_spent_ttl_is_delivered_but_not_passed_on() {
    let now = Instant::now();
    let mut b = Flood::new(B, Config::default());
    let mut r = relayed(A, 1, "x");
    r.ttl = 0;
    b.on_relayed(now, A, r, &[A, C]);
    assert!(transmits(&mut b).is_empty());
    assert_eq!(delivered(&mut b), vec![(A, 1)]);
}

#[test]
fn too_much_held_gives_up_the_gap() {
    let cfg = Config {
        max_held: 3,
        ..Config::default()
    };
    let now = Instant::now();
    let mut b = Flood::new(B, cfg);
    b.on_relayed(now, A, relayed(A, 1, "1"), &[A]);
    for seq in 3..=6 {
        b.on_relayed(now, A, relayed(A, seq, "n"), &[A]);
    }
    assert_eq!(
        delivered(&mut b),
        vec![(A, 1), (A, 3), (A, 4), (A, 5), (A, 6)]
    );
    assert_eq!(b.stats().skipped, 1);
    assert_eq!(b.next_deadline(), None);
}

#[test]
fn too_many_bytes_held_gives_up_every_gap() {
    // Each test message holds 2 bytes (topic "t" and one payload byte).
    let cfg = Config {
        max_held_bytes: 4,
        ..Config::default()
    };
    let now = Instant::now();
    let mut b = Flood::new(B, cfg);
    b.on_relayed(now, A, relayed(A, 1, "1"), &[A]);
    b.on_relayed(now, A, relayed(A, 3, "3"), &[A]);
    b.on_relayed(now, C, relayed(C, 1, "1"), &[C]);
    b.on_relayed(now, C, relayed(C, 4, "4"), &[C]);
    assert_eq!(delivered(&mut b), vec![(A, 1), (C, 1)], "4 bytes held fit");
    b.on_relayed(now, A, relayed(A, 5, "5"), &[A]);
    let mut got = delivered(&mut b);
    got.sort();
    // Both waits ended (A's for 2, C's for 2 and 3); A now waits for 4.
    assert_eq!(got, vec![(A, 3), (C, 4)], "every gap given up");
    assert_eq!(b.stats().skipped, 1 + 2);
    assert_eq!(b.held_bytes, 2, "A's 5 only");
}

#[test]
fn origins_are_forgotten_oldest_first_past_the_bound() {
    let cfg = Config {
        max_origins: 2,
        ..Config::default()
    };
    let t0 = Instant::now();
    let mut b = Flood::new(B, cfg);
    for (i, origin) in [A, C, D].into_iter().enumerate() {
        b.on_relayed(
            t0 + Duration::from_millis(i as u64),
            origin,
            relayed(origin, 1, "x"),
            &[],
        );
    }
    assert_eq!(b.origins.len(), 2);
    assert!(!b.origins.contains_key(&A), "heard from longest ago");
}

/// A network of floods over links of an overlay graph: frames in flight on
/// each directed link keep their order (TCP), and the links are served in
/// a random order.
struct Net {
    nodes: BTreeMap<NodeId, Flood>,
    adj: BTreeMap<NodeId, Vec<NodeId>>,
    inflight: BTreeMap<(NodeId, NodeId), std::collections::VecDeque<Relayed>>,
    /// Copies carried per (directed link, origin, seq).
    carried: BTreeMap<(NodeId, NodeId, NodeId, u64), u32>,
    got: BTreeMap<NodeId, Vec<(NodeId, u64)>>,
}

impl Net {
    /// `n` nodes with random ids, linked as an overlay of `k` links each.
    fn over(rng: &mut StdRng, n: usize, k: usize) -> (Net, Vec<NodeId>) {
        let ids: Vec<NodeId> = (0..n).map(|_| NodeId(rng.gen())).collect();
        let mut o = Overlay::new(k);
        o.set_members(ids.iter().copied());
        let mut adj: BTreeMap<NodeId, Vec<NodeId>> =
            ids.iter().map(|id| (*id, Vec::new())).collect();
        for (a, b) in o.edges() {
            adj.entry(a).or_default().push(b);
            adj.entry(b).or_default().push(a);
        }
        for peers in adj.values_mut() {
            peers.sort_unstable();
            peers.dedup();
        }
        let net = Net {
            nodes: ids
                .iter()
                .map(|&id| (id, Flood::new(id, Config::default())))
                .collect(),
            adj,
            inflight: BTreeMap::new(),
            carried: BTreeMap::new(),
            got: BTreeMap::new(),
        };
        (net, ids)
    }

    fn collect(&mut self, id: NodeId) {
        let f = self.nodes.get_mut(&id).unwrap();
        while let Some((to, r)) = f.poll_transmit() {
            *self.carried.entry((id, to, r.origin, r.seq)).or_default() += 1;
            self.inflight.entry((id, to)).or_default().push_back(r);
        }
        while let Some(r) = f.poll_delivery() {
            self.got.entry(id).or_default().push((r.origin, r.seq));
        }
    }

    /// Drops the next frame in flight on a random busy link.
    fn lose(&mut self, rng: &mut StdRng) {
        let busy: Vec<_> = self
            .inflight
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if let Some(k) = busy.get(rng.gen_range(0..busy.len().max(1))) {
            self.inflight.get_mut(k).unwrap().pop_front();
        }
    }

    fn step(&mut self, rng: &mut StdRng, now: Instant) -> bool {
        let busy: Vec<_> = self
            .inflight
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if busy.is_empty() {
            return false;
        }
        let (from, to) = busy[rng.gen_range(0..busy.len())];
        let r = self
            .inflight
            .get_mut(&(from, to))
            .unwrap()
            .pop_front()
            .unwrap();
        let linked = self.adj[&to].clone();
        self.nodes
            .get_mut(&to)
            .unwrap()
            .on_relayed(now, from, r, &linked);
        self.collect(to);
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Over a random overlay, with sends interleaved with delivery in a
    /// random order: every node delivers every broadcast of every other
    /// exactly once, each origin's in order, and no directed link carries
    /// a message twice.
    #[test]
    fn every_broadcast_reaches_every_node_once_in_order(
        seed in any::<u64>(),
        n in 5usize..40,
        k in prop::sample::select(vec![2usize, 4, 6]),
        sends in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4), 1..40),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut net, ids) = Net::over(&mut rng, n, k);
        let now = Instant::now();
        let mut sent: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (who, steps) in sends {
            let origin = ids[who.index(n)];
            let linked = net.adj[&origin].clone();
            net.nodes.get_mut(&origin).unwrap().originate(None, msg("m"), &linked);
            *sent.entry(origin).or_default() += 1;
            net.collect(origin);
            for _ in 0..steps {
                net.step(&mut rng, now);
            }
        }
        while net.step(&mut rng, now) {}
        for &id in &ids {
            let want: Vec<(NodeId, u64)> = sent
                .iter()
                .filter(|(o, _)| **o != id)
                .flat_map(|(o, c)| (1..=*c).map(move |s| (*o, s)))
                .collect();
            let mut got = net.got.get(&id).cloned().unwrap_or_default();
            // In order per origin: sorting by origin keeps each origin's
            // relative order (a stable sort), which must then be 1, 2, ...
            got.sort_by_key(|(o, _)| *o);
            prop_assert_eq!(got, want, "node {:?}", id);
            prop_assert_eq!(net.nodes[&id].stats().skipped, 0);
        }
        for (key, copies) in &net.carried {
            prop_assert_eq!(*copies, 1, "{:?} carried twice", key);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With frames lost (a link that died with them in flight) and time
    /// passing: no node ever delivers a message twice or out of its
    /// origin's order, every message is delivered or counted as given up
    /// at every node, and nothing stays held once every wait has ended.
    #[test]
    fn lost_frames_never_reorder_or_repeat(
        seed in any::<u64>(),
        n in 5usize..30,
        sends in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<bool>()), 1..40),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut net, ids) = Net::over(&mut rng, n, 4);
        let mut now = Instant::now();
        let mut sent: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (who, steps, lose) in sends {
            let origin = ids[who.index(n)];
            let linked = net.adj[&origin].clone();
            net.nodes.get_mut(&origin).unwrap().originate(None, msg("m"), &linked);
            *sent.entry(origin).or_default() += 1;
            net.collect(origin);
            if lose {
                net.lose(&mut rng);
            }
            for _ in 0..steps {
                net.step(&mut rng, now);
            }
            now += Duration::from_millis(rng.gen_range(0..300));
            for id in &ids {
                net.nodes.get_mut(id).unwrap().on_tick(now);
                net.collect(*id);
            }
        }
        while net.step(&mut rng, now) {}
        now += Config::default().hold;
        for id in &ids {
            net.nodes.get_mut(id).unwrap().on_tick(now);
            net.collect(*id);
        }
        for &id in &ids {
            let got = net.got.get(&id).cloned().unwrap_or_default();
            let mut last: BTreeMap<NodeId, u64> = BTreeMap::new();
            for (origin, seq) in &got {
                let prev = last.insert(*origin, *seq).unwrap_or(0);
                prop_assert!(*seq > prev, "{:?}: {:?} {} after {}", id, origin, seq, prev);
            }
            let f = &net.nodes[&id];
            prop_assert_eq!(f.next_deadline(), None, "still waiting");
            // Every message of every origin this node heard of is delivered
            // or given up (the ones after the last it heard, it never knew).
            let heard: u64 = sent
                .iter()
                .filter(|(o, _)| **o != id)
                .map(|(o, _)| f.origins.get(o).map_or(0, |st| st.next - 1))
                .sum();
            prop_assert_eq!(f.stats().delivered + f.stats().skipped, heard);
        }
    }
}
