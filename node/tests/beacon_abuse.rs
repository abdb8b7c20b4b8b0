//! Forged plaintext beacons against a real daemon on loopback (interface lo,
//! TTL 0, a unique group each): addresses a node must never dial, a flood of
//! new identities that must stay within the discovery budget, and reserved
//! flag bits. Every forged beacon advertises a loopback address or one the
//! address rule refuses before anything is sent to it.

mod support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use proto::{Beacon, BeaconKind, NodeId};
use serde_json::Value;
use support::{unique_group, wait_until, Daemon, TempDir};

/// Default budget for admitting new identities (discovery `Limits`):
/// sustained per second and burst.
const NEW_PEER_RATE: f64 = 32.0;
const NEW_PEER_BURST: f64 = 128.0;
/// Default budget for unicast replies to announces.
const REPLY_RATE: f64 = 20.0;
const REPLY_BURST: f64 = 64.0;

fn status(d: &Daemon) -> Value {
    let out = d.cli(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or(0)
}

fn dropped(v: &Value, reason: &str) -> u64 {
    v["counters"]["beacons_dropped"][reason]
        .as_u64()
        .unwrap_or(0)
}

/// Inbound datagrams dropped, all reasons (`reply_budget` counts replies
/// not sent, not datagrams received).
fn dropped_inbound(v: &Value) -> u64 {
    v["counters"]["beacons_dropped"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "reply_budget")
                .filter_map(|(_, v)| v.as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Names in `GET /v1/peers`, through the node's socket.
fn peer_names(d: &Daemon) -> Vec<String> {
    let (code, body) = support::curl(&d.socket, &["http://localhost/v1/peers"]);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("peers json");
    v["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A socket that sends to the group over loopback only (multicast
/// interface 127.0.0.1, TTL 0).
fn sender() -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let s2 = socket2::SockRef::from(&sock);
    s2.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s2.set_multicast_ttl_v4(0).unwrap();
    sock
}

/// The cluster of these tests' nodes and forgeries: a ghost's port may by
/// chance be another test's listener, and a link to it must be refused.
const CLUSTER: &str = "abuse";

fn forged(name: &str, addr: SocketAddr) -> Beacon {
    Beacon {
        cluster: CLUSTER.into(),
        id: NodeId::random(),
        incarnation: 1,
        name: name.into(),
        addr,
        kind: BeaconKind::Announce,
        digest: 0,
    }
}

/// Polls `cond` until it holds or `limit` passes; unlike `wait_until` it
/// does not panic (pacing, not an assertion).
fn poll(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn unspecified_and_unroutable_advertised_addresses_are_refused_and_never_dialled() {
    let dir = TempDir::new("abuse-addr");
    let group = unique_group();
    let g: SocketAddrV4 = group.parse().unwrap();
    let a = Daemon::start(dir.path(), "a", &group, &["--cluster", CLUSTER]);
    let listen: SocketAddr = status(&a)["listen"].as_str().unwrap().parse().unwrap();

    let out = sender();
    // The node's own port on 0.0.0.0: it would dial itself.
    let own = forged(
        "self-dial",
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, listen.port())),
    );
    // TEST-NET-2: reachable through no interface the node was given; the
    // rule refuses it before any dial, so nothing is ever sent there.
    let far = forged("far-away", "198.51.100.1:9".parse().unwrap());
    // A loopback address from a loopback source: allowed (control).
    let near = forged("near", SocketAddr::from((Ipv4Addr::LOCALHOST, 9)));
    for b in [&own, &far, &near] {
        out.send_to(&b.encode().unwrap(), g).unwrap();
    }
    // One reader queue, in order: once `near` is admitted (a pending entry,
    // dialed; listed only once a link confirms it), the two before it have
    // been decided.
    wait_until(
        Duration::from_secs(10),
        "the control beacon admitted",
        || counter(&status(&a), "peers_admitted") >= 1,
    );
    assert_eq!(counter(&status(&a), "peers_admitted"), 1);
    let names = peer_names(&a);
    assert!(
        !names.contains(&"self-dial".to_string()),
        "0.0.0.0 admitted: {names:?}"
    );
    assert!(
        !names.contains(&"far-away".to_string()),
        "198.51.100.1 admitted: {names:?}"
    );
    let v = status(&a);
    assert_eq!(dropped(&v, "address"), 2, "{}", v["counters"]);
    let (_, metrics) = support::curl(&a.socket, &["http://localhost/metrics"]);
    assert!(
        metrics.contains("constellation_beacons_dropped_total{reason=\"address\"} 2"),
        "{metrics}"
    );
    // Still refused when sent again (no state let them in).
    for b in [&own, &far] {
        out.send_to(&b.encode().unwrap(), g).unwrap();
    }
    wait_until(Duration::from_secs(10), "repeats refused", || {
        dropped(&status(&a), "address") == 4
    });
    let names = peer_names(&a);
    assert!(!names.contains(&"self-dial".to_string()), "{names:?}");
    assert!(!names.contains(&"far-away".to_string()), "{names:?}");
}

#[test]
fn reserved_flag_bits_are_refused_and_counted() {
    let dir = TempDir::new("abuse-flags");
    let group = unique_group();
    let g: SocketAddrV4 = group.parse().unwrap();
    let a = Daemon::start(dir.path(), "a", &group, &["--cluster", CLUSTER]);
    let out = sender();
    let odd = forged("odd-flags", SocketAddr::from((Ipv4Addr::LOCALHOST, 9)));
    let mut datagram = odd.encode().unwrap().to_vec();
    datagram[5] = 0x80; // a reserved bit; SEALED clear
    out.send_to(&datagram, g).unwrap();
    let near = forged("near", SocketAddr::from((Ipv4Addr::LOCALHOST, 9)));
    out.send_to(&near.encode().unwrap(), g).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the control beacon admitted",
        || counter(&status(&a), "peers_admitted") >= 1,
    );
    assert_eq!(
        counter(&status(&a), "peers_admitted"),
        1,
        "only the control"
    );
    assert!(!peer_names(&a).contains(&"odd-flags".to_string()));
    let v = status(&a);
    assert_eq!(dropped(&v, "reserved_flags"), 1, "{}", v["counters"]);
}

#[test]
fn a_flood_of_new_identities_stays_within_the_admission_and_reply_budgets() {
    const N: usize = 1000;
    const BATCH: usize = 50;
    let dir = TempDir::new("abuse-budget");
    let group = unique_group();
    let g: SocketAddrV4 = group.parse().unwrap();
    let a = Daemon::start(dir.path(), "a", &group, &["--cluster", CLUSTER]);
    let base = status(&a);
    let accounted = |v: &Value| -> u64 {
        counter(v, "beacons_received") + dropped_inbound(v)
            - counter(&base, "beacons_received")
            - dropped_inbound(&base)
    };

    // Each ghost from a socket of its own (a source never heard before),
    // advertising 127.0.0.1 at the socket's port number, where no TCP
    // listener is. Sent in batches the receive buffer holds; each batch is
    // given time to be processed, but nothing depends on every datagram
    // arriving.
    let mut socks: Vec<UdpSocket> = Vec::with_capacity(N);
    let start = Instant::now();
    while socks.len() < N {
        let before = accounted(&status(&a));
        for _ in 0..BATCH {
            let s = sender();
            s.set_nonblocking(true).unwrap();
            let port = s.local_addr().unwrap().port();
            let b = forged(
                &format!("ghost-{}", socks.len()),
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            );
            s.send_to(&b.encode().unwrap(), g).unwrap();
            socks.push(s);
        }
        poll(Duration::from_secs(5), || {
            accounted(&status(&a)) >= before + BATCH as u64
        });
    }
    poll(Duration::from_secs(10), || {
        accounted(&status(&a)) >= N as u64
    });
    let elapsed = start.elapsed().as_secs_f64();

    // Every unicast reply the node sent reaches one of our sockets.
    let mut replies = 0u64;
    let mut buf = [0u8; 2048];
    poll(Duration::from_secs(10), || {
        for s in &socks {
            while s.recv_from(&mut buf).is_ok() {
                replies += 1;
            }
        }
        replies >= counter(&status(&a), "replies_sent")
    });

    let v = status(&a);
    // Admitted: a pending entry (dialed, never listed: no link confirms a
    // ghost).
    let admitted = (counter(&v, "peers_admitted") - counter(&base, "peers_admitted")) as f64;
    assert!(
        !peer_names(&a).iter().any(|n| n.starts_with("ghost-")),
        "no ghost is ever listed"
    );
    let admit_bound = NEW_PEER_BURST + NEW_PEER_RATE * elapsed + 10.0;
    let reply_bound = REPLY_BURST + REPLY_RATE * elapsed + 10.0;
    let refused = dropped(&v, "new_peer_budget");
    let replies_refused = dropped(&v, "reply_budget");
    eprintln!(
        "{N} forged beacons in {elapsed:.1}s: {} accounted, {admitted} peers admitted \
         (bound {admit_bound:.0}), {refused} refused; {replies} replies received \
         (bound {reply_bound:.0}), {replies_refused} refused; {} dials",
        accounted(&v),
        counter(&v, "dials"),
    );
    assert!(
        accounted(&v) >= (N as u64) * 9 / 10,
        "most of the flood reached the node: {}",
        v["counters"]
    );
    assert!(
        admitted <= admit_bound,
        "{admitted} ghost peers admitted in {elapsed:.1}s (bound {admit_bound:.0})"
    );
    assert!(
        (replies as f64) <= reply_bound,
        "{replies} replies in {elapsed:.1}s (bound {reply_bound:.0})"
    );
    assert_eq!(
        replies,
        counter(&v, "replies_sent"),
        "every reply sent was received"
    );
    // The refusals are counted, in `status` and `/metrics`: every ghost
    // beacon that arrived was admitted or refused.
    assert_eq!(
        admitted as u64 + refused,
        accounted(&v),
        "{}",
        v["counters"]
    );
    if (admit_bound as usize) < N {
        assert!(refused > 0, "{}", v["counters"]);
    }
    assert!(
        replies + replies_refused >= admitted as u64,
        "every admitted announce was answered or its refusal counted: {}",
        v["counters"]
    );
    let (_, metrics) = support::curl(&a.socket, &["http://localhost/metrics"]);
    assert!(
        metrics.contains("constellation_beacons_dropped_total{reason=\"new_peer_budget\"}"),
        "{metrics}"
    );
    // Nor counted by health: ghosts never linked, nobody vouched for them.
    let (code, body) = support::curl(&a.socket, &["http://localhost/v1/health?min_peers=1"]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"alive_peers\":0"), "{body}");
    // The node is still itself: it answers and lists no entry for itself.
    assert_eq!(v["name"], "a");
}

#[test]
fn a_bad_allow_advertise_value_is_refused_before_anything_binds() {
    let dir = TempDir::new("abuse-flag");
    let sock = dir.path().join("x.sock");
    for bad in ["nat-gateway", "10.0.0.0/33", "224.0.0.0/4"] {
        let out = std::process::Command::new(support::bin())
            .args(support::loopback_args("x", &unique_group(), &sock))
            .args(["--allow-advertise", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--allow-advertise"), "{bad}: {err}");
        assert!(!sock.exists(), "nothing was bound");
    }
}
