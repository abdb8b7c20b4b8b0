//! In-process multi-node tests on real loopback sockets: every node runs in
//! its own tokio runtime (so one can be "crashed" by dropping its runtime,
//! with no goodbye), on a unique multicast group, interface lo, TTL 0.

mod support;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use node::config::{Cli, Command};
use node::state::NodeState;
use proto::membership::{LinkState, PeerState};
use support::{unique_group, wait_until, TempDir};
use tokio_util::sync::CancellationToken;

struct TestNode {
    rt: Option<tokio::runtime::Runtime>,
    state: Arc<NodeState>,
    cancel: CancellationToken,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestNode {
    fn start(dir: &TempDir, name: &str, group: &str) -> TestNode {
        let sock = dir.path().join(format!("{name}.sock"));
        let argv = std::iter::once("constellationd".into())
            .chain(support::loopback_args(name, group, &sock));
        let Command::Run(args) = Cli::try_parse_from(argv).expect("args").cmd else {
            unreachable!()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let running = rt
            .block_on(node::daemon::start(*args))
            .expect("node starts");
        let (state, cancel) = (running.state.clone(), running.cancel.clone());
        let done = rt.spawn(running.wait());
        TestNode {
            rt: Some(rt),
            state,
            cancel,
            done: Some(done),
        }
    }

    fn linked_alive(&self) -> usize {
        self.state
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Alive && p.link == LinkState::Up)
            .count()
    }

    fn state_of(&self, name: &str) -> Option<PeerState> {
        self.state
            .peers
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.state)
    }

    /// Graceful: leave beacon, goodbyes.
    fn stop(&mut self) {
        self.cancel.cancel();
        if let (Some(rt), Some(done)) = (self.rt.as_ref(), self.done.take()) {
            rt.block_on(done).expect("clean stop");
        }
    }

    /// Abrupt: every task and socket dropped at once, nothing said.
    fn crash(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.crash();
    }
}

#[test]
fn five_nodes_mesh_then_graceful_leave_and_crash_are_seen_by_all() {
    let dir = TempDir::new("mesh");
    let group = unique_group();
    let mut nodes: Vec<TestNode> = (1..=5)
        .map(|i| TestNode::start(&dir, &format!("n{i}"), &group))
        .collect();

    let took = wait_until(Duration::from_secs(10), "full mesh of 5", || {
        nodes.iter().all(|n| n.linked_alive() == 4)
    });
    eprintln!("full mesh of 5 in {took:?}");
    // Exactly one entry per peer, and never ourselves.
    for n in &nodes {
        assert_eq!(n.state.peers.len(), 4);
        assert!(n.state.peers.get(&n.state.id).is_none());
    }

    nodes[4].stop();
    wait_until(Duration::from_secs(2), "n5 left on all", || {
        nodes[..4]
            .iter()
            .all(|n| n.state_of("n5") == Some(PeerState::Left))
    });

    nodes[3].crash();
    let took = wait_until(Duration::from_secs(5), "n4 failed on all", || {
        nodes[..3]
            .iter()
            .all(|n| n.state_of("n4") == Some(PeerState::Failed))
    });
    eprintln!("crash detected in {took:?}");
    // Nobody else was affected.
    for n in &nodes[..3] {
        assert_eq!(n.linked_alive(), 2, "the three survivors stay linked");
    }
}

#[test]
fn nodes_of_another_cluster_stay_out_and_are_counted() {
    let dir = TempDir::new("cluster");
    let group = unique_group();
    let a = TestNode::start(&dir, "a", &group);
    let b = TestNode::start(&dir, "b", &group);
    let sock = dir.path().join("x.sock");
    let argv = std::iter::once("constellationd".into())
        .chain(support::loopback_args("x", &group, &sock))
        .chain(["--cluster".into(), "other".into()]);
    let Command::Run(args) = Cli::try_parse_from(argv).unwrap().cmd else {
        unreachable!()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let x = rt.block_on(node::daemon::start(*args)).unwrap();
    wait_until(Duration::from_secs(5), "a and b linked", || {
        a.linked_alive() == 1 && b.linked_alive() == 1
    });
    wait_until(
        Duration::from_secs(5),
        "other cluster's beacons counted",
        || {
            a.state
                .discovery
                .drops
                .snapshot()
                .get("cluster")
                .copied()
                .unwrap_or(0)
                > 0
        },
    );
    assert!(a.state.peers.iter().all(|p| p.name != "x"));
    assert!(x.state.peers.is_empty(), "x sees nobody of cluster default");
    x.cancel.cancel();
    rt.block_on(x.wait());
}

/// Polls `cond` until it holds or `limit` passes and says which; for pacing
/// a sender (unlike `wait_until`, running out of time is not a failure).
fn poll(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn a_flood_of_garbage_datagrams_is_counted_and_harmless() {
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
    /// Garbage the node must have counted before the test judges it.
    const TARGET: u64 = 2000;
    /// Sent at a time: well within one socket's receive buffer.
    const BATCH: u64 = 40;
    let dir = TempDir::new("flood");
    let group = unique_group();
    let a = TestNode::start(&dir, "a", &group);
    let b = TestNode::start(&dir, "b", &group);
    wait_until(Duration::from_secs(5), "a and b linked", || {
        a.linked_alive() == 1 && b.linked_alive() == 1
    });
    // Loopback only: multicast interface 127.0.0.1, TTL 0.
    let g: SocketAddrV4 = group.parse().unwrap();
    let sender = || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let s2 = socket2::SockRef::from(&sock);
        s2.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
        s2.set_multicast_ttl_v4(0).unwrap();
        sock
    };
    let mut good = proto::Beacon {
        cluster: "default".into(),
        id: proto::NodeId(1),
        incarnation: 1,
        name: "mallory".into(),
        addr: "127.0.0.1:9".parse().unwrap(),
        kind: proto::BeaconKind::Announce,
        digest: 0,
    }
    .encode()
    .unwrap()
    .to_vec();
    let counted = || a.state.discovery.drops.total();
    // Drops, plus the mutated beacons that still decode (accepted as hints).
    let handled = || {
        counted()
            + a.state
                .discovery
                .beacons_received
                .load(std::sync::atomic::Ordering::Relaxed)
    };
    let base = counted();
    // Paced, so the test does not depend on the node keeping up with a
    // burst: each batch (from a socket of its own, so the per-source limit
    // does not hide the decoder) gets time to be counted before the next.
    // On a busy machine the kernel may still drop some; the flood then goes
    // on until the node has counted TARGET, within bounds of count and time.
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while counted() - base < TARGET {
        assert!(
            sent < 10 * TARGET && start.elapsed() < Duration::from_secs(120),
            "only {} of {sent} garbage datagrams counted",
            counted() - base
        );
        let before = handled();
        let sock = sender();
        for _ in 0..BATCH {
            let datagram: Vec<u8> = match sent % 4 {
                0 => b"not a beacon at all".to_vec(),
                1 => vec![0x43, 0x53, 0x54, 0x4c, 9, 0, 0, 0], // unknown version
                2 => {
                    let idx = (sent as usize * 7) % good.len();
                    good[idx] ^= 0x5a; // a flipped byte somewhere
                    good.clone()
                }
                _ => vec![0u8; 1500], // oversize
            };
            if sock.send_to(&datagram, g).is_ok() {
                sent += 1;
            }
        }
        poll(Duration::from_secs(2), || handled() >= before + BATCH);
    }
    let drops = a.state.discovery.drops.snapshot();
    eprintln!(
        "sent {sent} garbage datagrams in {:?}; a counted {drops:?}",
        start.elapsed()
    );
    // Each kind of garbage was decoded and counted under its reason.
    for reason in ["bad_magic", "version", "too_large"] {
        assert!(drops.get(reason).copied().unwrap_or(0) > 0, "{drops:?}");
    }
    // Still one healthy link, no stray entries, nobody failed.
    assert_eq!(a.linked_alive(), 1);
    assert_eq!(b.linked_alive(), 1);
    assert!(
        !a.state.transitions.snapshot().contains_key("peer_failed"),
        "{:?}",
        a.state.transitions.snapshot()
    );
    // Without a cluster secret a well-formed beacon is a hint anyone can send;
    // it never becomes a linked peer, since nothing answers at its address.
    assert!(a
        .state
        .peers
        .iter()
        .all(|p| p.name == "b" || p.link != LinkState::Up));
    // And the control API still answers at once.
    let (code, body) = support::curl(&dir.path().join("a.sock"), &["http://localhost/v1/peers"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"b\""), "{body}");
}
