//! A run is a function of its seed: two runs of one seed produce the same
//! trace, item for item; another seed produces another.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::frame::{Hello, VERSION};
use proto::membership::{Action, Config, PeerTable};
use proto::NodeId;
use sim::{Op, SimConfig, TraceItem, World};

/// Runs `ops` on 12 nodes at 5 % loss; returns the trace, its hash and
/// the number of events processed.
fn run(seed: u64, ops: &[Op]) -> (Vec<TraceItem>, u64, u64) {
    let mut w = World::new(SimConfig {
        loss: 0.05,
        record_trace: true,
        ..SimConfig::new(12, seed)
    });
    w.apply_all(ops);
    let trace = w.observer().recorded().expect("recorded").to_vec();
    (trace, w.observer().trace_hash(), w.processed())
}

fn assert_same(a: &[TraceItem], b: &[TraceItem]) {
    if let Some(i) = (0..a.len().min(b.len())).find(|&i| a[i] != b[i]) {
        panic!(
            "traces differ at item {i} of {}: {:?} vs {:?}",
            a.len(),
            a[i],
            b[i]
        );
    }
    assert_eq!(a.len(), b.len());
}

/// Cold start under loss, a crash, a restart, a leave.
fn busy() -> Vec<Op> {
    let s = Duration::from_secs(1);
    vec![
        Op::StartAll {
            spread: Duration::from_millis(5),
        },
        Op::RunFor(s * 2),
        Op::Crash(1),
        Op::RunFor(s),
        Op::Start(1),
        Op::RunFor(s),
        Op::Leave(8),
        Op::RunFor(s),
    ]
}

#[test]
fn same_seed_same_trace() {
    let (a, ha, na) = run(42, &busy());
    let (b, hb, nb) = run(42, &busy());
    assert!(a.len() > 300, "a trace worth comparing: {} items", a.len());
    assert_same(&a, &b);
    assert_eq!((ha, na), (hb, nb));
}

#[test]
fn another_seed_another_trace() {
    let (_, ha, _) = run(42, &busy());
    let (_, hb, _) = run(43, &busy());
    assert_ne!(ha, hb);
}

/// PROTOCOL BUG (proto/src/membership.rs, `PeerTable::on_tick` and
/// `probe`): the table's seeded choices depend on hash-map order. When
/// several peers are due for a probe in one tick (a node waking from a
/// pause reads the close of all its links at once; peers failed in one
/// tick are re-probed together a second later), `on_tick` collects them
/// in `HashMap` iteration order and each `probe` draws its helpers from the
/// table's RNG (`helpers.shuffle`), so which helpers are asked about which
/// peer varies from one `PeerTable` instance to the next for the same seed
/// and inputs. A simulation with a pause or a partition is therefore not
/// reproducible. Fails until `probes` is sorted before probing.
#[test]
fn same_seed_same_trace_through_a_pause_and_a_partition() {
    let s = Duration::from_secs(1);
    let ops = [
        Op::StartAll {
            spread: Duration::from_millis(5),
        },
        Op::RunFor(s * 2),
        Op::Pause(2),
        Op::RunFor(s),
        Op::Resume(2),
        Op::Partition(vec![vec![3, 4, 5], vec![6, 7]]),
        Op::RunFor(s * 2),
        Op::Heal,
        Op::RunFor(s * 2),
    ];
    let (a, _, _) = run(42, &ops);
    let (b, _, _) = run(42, &ops);
    assert_same(&a, &b);
}

fn hello(id: u128) -> Hello {
    Hello {
        protocol: VERSION,
        cluster: "default".into(),
        id: NodeId(id),
        incarnation: 1,
        name: format!("n{id}"),
        addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        tags: Default::default(),
    }
}

/// The probes two tables of one seed send after the same inputs: twelve
/// peers lose their links at one instant, six keep theirs (the helpers).
fn probes(t0: Instant) -> Vec<(NodeId, NodeId)> {
    let mut t = PeerTable::new(NodeId(1), Config::default(), 7);
    for id in 2..20 {
        t.on_link_up(t0, &hello(id));
    }
    let t1 = t0 + Duration::from_millis(10);
    for id in 2..14 {
        t.on_link_down(t1, NodeId(id), false);
    }
    while t.poll_action().is_some() {}
    t.on_tick(t1);
    let mut asked = Vec::new();
    while let Some(a) = t.poll_action() {
        if let Action::Send { to, list } = a {
            asked.extend(list.peers.iter().map(|r| (to, r.id)));
        }
    }
    asked.sort();
    asked
}

/// The same bug, on the table alone: same seed, same inputs, different
/// helpers.
#[test]
fn peer_table_probe_helpers_follow_the_seed_only() {
    let t0 = Instant::now();
    let first = probes(t0);
    assert_eq!(first.len(), 12 * 3, "twelve probes, three helpers each");
    for _ in 0..5 {
        assert_eq!(probes(t0), first);
    }
}

/// The overlay mode is as reproducible: one seed, one report (but for the
/// wall time), at 5 % loss with a cluster larger than the link bound.
#[test]
fn an_overlay_run_is_a_function_of_its_seed() {
    let run = |seed: u64| {
        let p = sim::Params::new(
            SimConfig {
                loss: 0.05,
                max_links: Some(4),
                ..SimConfig::new(24, seed)
            },
            Duration::from_secs(4),
        );
        let mut r = sim::scenario::overlay(&p);
        r.as_object_mut().expect("an object").remove("wall_ms");
        r
    };
    let (a, b) = (run(5), run(5));
    assert_eq!(a, b);
    assert_ne!(a["trace_hash"], run(6)["trace_hash"]);
    assert!(
        a["links"]["max"].as_u64() < Some(23),
        "not a full mesh: {a}"
    );
}
