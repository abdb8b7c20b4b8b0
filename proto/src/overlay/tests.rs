use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;

fn ids(n: usize, seed: u64) -> Vec<NodeId> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| NodeId(rng.gen())).collect()
}

fn overlay(k: usize, members: &[NodeId]) -> Overlay {
    let mut o = Overlay::new(k);
    o.set_members(members.iter().copied());
    o
}

/// Each member's neighbours over undirected links (either side wanting a
/// link is enough for it to exist).
fn adjacency(edges: &BTreeSet<(NodeId, NodeId)>) -> BTreeMap<NodeId, BTreeSet<NodeId>> {
    let mut adj: BTreeMap<NodeId, BTreeSet<NodeId>> = BTreeMap::new();
    for &(a, b) in edges {
        adj.entry(a).or_default().insert(b);
        adj.entry(b).or_default().insert(a);
    }
    adj
}

/// Are the `alive` members connected by `edges` restricted to them?
fn connected(edges: &BTreeSet<(NodeId, NodeId)>, alive: &BTreeSet<NodeId>) -> bool {
    let adj = adjacency(edges);
    let Some(&start) = alive.first() else {
        return true;
    };
    let mut seen = BTreeSet::from([start]);
    let mut todo = VecDeque::from([start]);
    while let Some(a) = todo.pop_front() {
        for b in adj.get(&a).into_iter().flatten() {
            if alive.contains(b) && seen.insert(*b) {
                todo.push_back(*b);
            }
        }
    }
    seen.len() == alive.len()
}

#[test]
fn small_clusters_are_a_full_mesh() {
    for n in 1..=9 {
        let m = ids(n, n as u64);
        let o = overlay(8, &m);
        for &me in &m {
            let want = o.want_links(me);
            assert_eq!(want.len(), n - 1, "n = {n}");
            assert!(!want.contains(&me));
        }
    }
}

#[test]
fn large_clusters_hold_at_most_k_links_and_at_least_k_observers() {
    for (n, k) in [(10, 8), (64, 8), (256, 8), (1024, 8), (256, 4), (100, 6)] {
        let m = ids(n, 7);
        let o = overlay(k, &m);
        let adj = adjacency(&o.edges());
        for &me in &m {
            let want = o.want_links(me);
            assert_eq!(want.len(), k.min(n - 1), "wanted links, n = {n}, k = {k}");
            // Links are undirected: everyone it wants, plus whoever wants it.
            let degree = adj[&me].len();
            assert!(
                degree >= k.min(n - 1),
                "observers of a node, n = {n}, k = {k}"
            );
            assert!(degree <= k + 2, "degree {degree} at n = {n}, k = {k}");
        }
    }
}

#[test]
fn ring_neighbours_are_symmetric_and_subjects_mirror_observers() {
    let m = ids(300, 3);
    let o = overlay(8, &m);
    for &a in &m {
        for b in o.subjects(a) {
            assert!(
                o.observers(b).contains(&a),
                "a watches b, so b is watched by a"
            );
        }
        // One per ring, fewer when two rings agree on the same one.
        assert!((1..=4).contains(&o.subjects(a).len()));
        assert!((1..=4).contains(&o.observers(a).len()));
    }
    let total: usize = m.iter().map(|&a| o.subjects(a).len()).sum();
    assert!(total >= 300 * 4 * 9 / 10, "rings rarely agree: {total}");
}

#[test]
fn the_choice_depends_on_the_set_not_on_the_order_it_was_learned_in() {
    let mut m = ids(200, 11);
    let a = overlay(8, &m);
    m.shuffle(&mut StdRng::seed_from_u64(1));
    let mut b = Overlay::new(8);
    for &id in &m {
        b.insert(id);
    }
    for &me in &m {
        assert_eq!(a.want_links(me), b.want_links(me));
    }
    // A node not yet in the set asks as if it were.
    let newcomer = NodeId(42);
    let mut with = a.clone();
    with.insert(newcomer);
    assert_eq!(a.want_links(newcomer), with.want_links(newcomer));
}

#[test]
fn stays_connected_when_k_minus_one_members_fail_at_once_before_any_repair() {
    let k = 8;
    for seed in 0..40 {
        let m = ids(256, 100 + seed);
        let o = overlay(k, &m);
        let edges = o.edges();
        let mut rng = StdRng::seed_from_u64(seed);
        let failed: BTreeSet<NodeId> = m.choose_multiple(&mut rng, k - 1).copied().collect();
        let alive: BTreeSet<NodeId> = m
            .iter()
            .filter(|id| !failed.contains(id))
            .copied()
            .collect();
        assert!(connected(&edges, &alive), "seed {seed}");
    }
}

#[test]
fn stays_connected_when_a_node_and_all_but_one_of_its_neighbours_fail() {
    // The worst case for one survivor: its neighbours fail but one.
    let m = ids(256, 5);
    let o = overlay(8, &m);
    let edges = o.edges();
    for &me in m.iter().take(32) {
        let nbrs: Vec<NodeId> = adjacency(&edges)[&me].iter().copied().collect();
        let failed: BTreeSet<NodeId> = nbrs[1..].iter().copied().collect();
        let alive: BTreeSet<NodeId> = m
            .iter()
            .filter(|id| !failed.contains(id))
            .copied()
            .collect();
        assert!(connected(&edges, &alive));
    }
}

#[test]
fn repair_after_a_failure_changes_only_a_few_links() {
    let k = 8;
    let m = ids(512, 9);
    let mut o = overlay(k, &m);
    let before = o.edges();
    let mut worst = 0;
    for &gone in m.iter().take(20) {
        let mut after = o.clone();
        after.remove(gone);
        let new = after.edges();
        let added = new.difference(&before).count();
        let removed = before.difference(&new).count();
        let incident = before
            .iter()
            .filter(|(a, b)| *a == gone || *b == gone)
            .count();
        // Every link of the failed node goes, and about one link per ring
        // joins its former predecessor and successor.
        assert!(removed >= incident);
        assert!(
            added + removed <= 3 * k + 4,
            "added {added} removed {removed}"
        );
        worst = worst.max(added + removed);
        // Every survivor still has its full complement.
        for &me in m.iter().filter(|&&id| id != gone) {
            assert_eq!(after.want_links(me).len(), k);
        }
    }
    assert!(worst > 0);
    // A join is as local as a failure.
    let newcomer = NodeId(7);
    o.insert(newcomer);
    let joined = o.edges();
    let changed = joined.symmetric_difference(&before).count();
    assert!(changed <= 3 * k + 4, "a join changed {changed} links");
}

proptest! {
    #[test]
    fn any_member_set_gives_every_member_enough_distinct_neighbours(
        seed in any::<u64>(),
        n in 1usize..300,
        k in 2usize..12,
    ) {
        let m = ids(n, seed);
        let o = overlay(k, &m);
        let edges = o.edges();
        let all: BTreeSet<NodeId> = m.iter().copied().collect();
        prop_assert!(connected(&edges, &all));
        for &me in &m {
            let want = o.want_links(me);
            prop_assert!(!want.contains(&me));
            prop_assert!(want.iter().all(|id| all.contains(id)));
            // Odd k uses k - 1 ring links, filled up to k.
            prop_assert_eq!(want.len(), k.max(2).min(n - 1));
        }
    }
}
