//! Process tests of who may claim a name, revive a node or slander one:
//! impostors with a live node's name, forged beacons and hellos, replayed
//! sealed beacons of a dead node, and a node that was paused.
//!
//! Every forged datagram or hello advertises a loopback address only.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::frame::VERSION;
use proto::{Beacon, BeaconKind, FrameCodec, Hello, Message, NodeId, Tags};
use serde_json::Value;
use support::multicast::{capture_where, sender};
use support::{keygen, secret_file, unique_group, wait_until, Daemon, TempDir};
use tokio_util::codec::Encoder;

/// `watch --json` against a daemon, into a file; killed on drop.
struct Watch {
    child: Child,
    out: PathBuf,
}

impl Watch {
    fn start(d: &Daemon, dir: &Path) -> Watch {
        let out = dir.join(format!("{}-{}.events", d.name, rand::random::<u32>()));
        let file = std::fs::File::create(&out).expect("events file");
        let child = Command::new(support::bin())
            .args(["watch", "--json", "--socket"])
            .arg(&d.socket)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watch");
        let w = Watch { child, out };
        wait_until(Duration::from_secs(10), "watch subscribed", || {
            w.events().iter().any(|e| e["type"] == "subscribed")
        });
        w
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Events about the peer with this id.
    fn about(&self, id: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["peer"]["id"] == id)
            .map(|e| e["type"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Ours, by PID; it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(d: &Daemon) -> Value {
    let out = d.cli(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn named<'a>(peers: &'a [Value], name: &str) -> Vec<&'a Value> {
    peers.iter().filter(|p| p["name"] == name).collect()
}

/// The one entry named `name` on `d`, if there is exactly one.
fn only(d: &Daemon, name: &str) -> Option<Value> {
    let peers = d.peers();
    match named(&peers, name)[..] {
        [p] => Some(p.clone()),
        _ => None,
    }
}

fn normal_entry(d: &Daemon, name: &str, id: &str) -> bool {
    only(d, name).is_some_and(|p| {
        p["id"] == id && p["state"] == "alive" && p["link"] == "up" && p["conflict"].is_null()
    })
}

fn meshed(nodes: &[&Daemon]) -> bool {
    nodes.iter().all(|d| d.linked() == nodes.len() - 1)
}

/// A port nothing listens on (bound, then released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Samples a steady state for `how_long`: `ok` must hold at every look.
fn holds_for(how_long: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        assert!(ok(), "{what}");
        std::thread::sleep(Duration::from_millis(200)); // sampling, not synchronisation
    }
}

#[test]
fn a_second_process_with_a_live_nodes_name_never_removes_it() {
    let dir = TempDir::new("impostor");
    let group = unique_group();
    let ttl = ["--tombstone-ttl", "5s"];
    let e1 = Daemon::start(dir.path(), "e1", &group, &ttl);
    let e2 = Daemon::start(dir.path(), "e2", &group, &ttl);
    let e3 = Daemon::start(dir.path(), "e3", &group, &ttl);
    wait_until(Duration::from_secs(10), "mesh of 3", || {
        meshed(&[&e1, &e2, &e3])
    });
    let real = status(&e3)["id"].as_str().unwrap().to_string();
    let watch = Watch::start(&e1, dir.path());

    // A fourth process, also named e3 (its own socket directory).
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let mut impostor = Daemon::start(&other_dir, "e3", &group, &ttl);
    wait_until(
        Duration::from_secs(10),
        "both e3 listed, in conflict",
        || {
            let peers = e1.peers();
            let both = named(&peers, "e3");
            both.len() == 2 && both.iter().all(|p| !p["conflict"].is_null())
        },
    );
    let peers = e1.peers();
    let addrs: Vec<&str> = named(&peers, "e3")
        .iter()
        .filter_map(|p| p["addr"].as_str())
        .collect();
    assert_ne!(addrs[0], addrs[1], "both addresses shown: {addrs:?}");

    impostor.child.kill().unwrap();
    impostor.wait_exit(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), "the real e3 alone again", || {
        normal_entry(&e1, "e3", &real) && normal_entry(&e2, "e3", &real)
    });
    // Past the tombstone TTL, the real e3 is still listed, alive and linked,
    // and e1 can send to it.
    holds_for(
        Duration::from_secs(6),
        "the real e3 stays listed on e1",
        || normal_entry(&e1, "e3", &real),
    );
    let sent = e1.cli(&["send", "e3", "hello"]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let about = watch.about(&real);
    assert!(
        !about
            .iter()
            .any(|t| t == "peer_reaped" || t == "peer_failed" || t == "link_down"),
        "the real e3 was never touched: {about:?}"
    );
}

#[test]
fn forged_beacons_and_a_forged_hello_never_replace_a_live_node() {
    let dir = TempDir::new("forged");
    let group = unique_group();
    let g: SocketAddrV4 = group.parse().unwrap();
    let v1 = Daemon::start(dir.path(), "v1", &group, &[]);
    let e3 = Daemon::start(dir.path(), "e3", &group, &[]);
    wait_until(Duration::from_secs(10), "linked", || meshed(&[&v1, &e3]));
    let st = status(&e3);
    let real = st["id"].as_str().unwrap().to_string();
    let inc = st["incarnation"].as_u64().unwrap();
    let watch = Watch::start(&v1, dir.path());

    // A beacon with a new id, the victim's name and a newer incarnation;
    // another with the largest incarnation there is.
    let out = sender();
    let forged = |incarnation| Beacon {
        cluster: "default".into(),
        id: NodeId::random(),
        incarnation,
        name: "e3".into(),
        addr: SocketAddr::from(([127, 0, 0, 1], dead_port())),
        kind: BeaconKind::Announce,
        digest: 0,
    };
    for b in [forged(inc + 5), forged(u64::MAX)] {
        out.send_to(&b.encode().unwrap(), g).unwrap();
    }
    wait_until(Duration::from_secs(5), "the far-future one counted", || {
        status(&v1)["counters"]["beacons_dropped"]["incarnation_ahead"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    });
    // Past the time a pending entry is kept (3 beacon intervals).
    holds_for(Duration::from_secs(4), "the victim stays put", || {
        normal_entry(&v1, "e3", &real)
    });

    // A hello with the victim's name and a higher incarnation, on a real
    // TCP connection: a conflict at most, over when the connection ends.
    let listen = status(&v1)["listen"].as_str().unwrap().to_string();
    let mut tcp = std::net::TcpStream::connect(&listen).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = Hello {
        protocol: VERSION,
        cluster: "default".into(),
        id: NodeId::random(),
        incarnation: inc + 10,
        name: "e3".into(),
        addr: SocketAddr::from(([127, 0, 0, 1], dead_port())),
        tags: Tags::new(),
    };
    let mut buf = BytesMut::new();
    FrameCodec::new(1 << 20)
        .encode(Message::Hello(hello), &mut buf)
        .unwrap();
    tcp.write_all(&buf).unwrap();
    let mut first = [0u8; 4];
    tcp.read_exact(&mut first).expect("an answer to the hello");
    wait_until(Duration::from_secs(5), "a conflict, both listed", || {
        named(&v1.peers(), "e3").len() == 2
    });
    drop(tcp);
    wait_until(Duration::from_secs(10), "the forger gone", || {
        normal_entry(&v1, "e3", &real)
    });
    let about = watch.about(&real);
    assert!(
        !about
            .iter()
            .any(|t| t == "peer_reaped" || t == "peer_failed" || t == "link_down"),
        "the real e3 was never touched: {about:?}"
    );
}

fn start_secured(dir: &Path, name: &str, group: &str, key: &str) -> Daemon {
    let path = secret_file(dir, name, &[key]);
    Daemon::start(dir, name, group, &["--secret-file", path.to_str().unwrap()])
}

/// Captures a sealed beacon of the node `id` (opened with `key` to tell
/// whose it is).
fn capture_of(group: SocketAddrV4, key: &str, id: &str) -> Vec<u8> {
    let ring = proto::secure::Keyring::parse(key).unwrap();
    capture_where(
        group,
        Duration::from_secs(15),
        &format!("beacon of {id}"),
        |d| proto::secure::open_beacon(&ring, d).is_ok_and(|(b, _)| b.id.to_string() == id),
    )
}

#[test]
fn a_replayed_sealed_beacon_never_revives_a_dead_node() {
    let dir = TempDir::new("replay-dead");
    let group = unique_group();
    let g: SocketAddrV4 = group.parse().unwrap();
    let key = keygen();
    let d1 = start_secured(dir.path(), "d1", &group, &key);
    let mut d2 = start_secured(dir.path(), "d2", &group, &key);
    let d3 = start_secured(dir.path(), "d3", &group, &key);
    wait_until(Duration::from_secs(10), "mesh of 3", || {
        meshed(&[&d1, &d2, &d3])
    });
    let d2_id = status(&d2)["id"].as_str().unwrap().to_string();
    let beacon = capture_of(g, &key, &d2_id);
    let w1 = Watch::start(&d1, dir.path());
    let w3 = Watch::start(&d3, dir.path());
    d2.child.kill().unwrap();
    d2.wait_exit(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), "d2 failed on d1 and d3", || {
        d1.state_of("d2").as_deref() == Some("failed")
            && d3.state_of("d2").as_deref() == Some("failed")
    });
    let d4 = start_secured(dir.path(), "d4", &group, &key);
    wait_until(Duration::from_secs(10), "d4 joined", || {
        meshed(&[&d1, &d3, &d4])
    });
    let w4 = Watch::start(&d4, dir.path());
    // Replay d2's beacon to everyone (d4 has never heard of d2).
    sender().send_to(&beacon, g).unwrap();
    holds_for(
        Duration::from_secs(4),
        "d2 stays failed and unlisted",
        || {
            d1.state_of("d2").as_deref() == Some("failed")
                && d3.state_of("d2").as_deref() == Some("failed")
                && d4.state_of("d2").is_none()
        },
    );
    for (w, who) in [(&w1, "d1"), (&w3, "d3"), (&w4, "d4")] {
        let about = w.about(&d2_id);
        assert!(
            !about
                .iter()
                .any(|t| t == "peer_alive" || t == "peer_joined" || t == "peer_restarted"),
            "{who} revived d2: {about:?}"
        );
    }
}

#[test]
fn a_paused_node_does_not_fail_the_running_ones() {
    let dir = TempDir::new("paused");
    let group = unique_group();
    let p1 = Daemon::start(dir.path(), "p1", &group, &[]);
    let p2 = Daemon::start(dir.path(), "p2", &group, &[]);
    let p3 = Daemon::start(dir.path(), "p3", &group, &[]);
    wait_until(Duration::from_secs(10), "mesh of 3", || {
        meshed(&[&p1, &p2, &p3])
    });
    let watch = Watch::start(&p1, dir.path());
    p1.signal("-STOP");
    // The others see p1 fail while it is stopped.
    wait_until(Duration::from_secs(10), "p1 failed on p2", || {
        p2.state_of("p1").as_deref() == Some("failed")
    });
    std::thread::sleep(Duration::from_secs(1)); // keep p1 stopped past every deadline it has
    p1.signal("-CONT");
    wait_until(Duration::from_secs(10), "p1 back on p2 and p3", || {
        meshed(&[&p1, &p2, &p3])
    });
    let slander: Vec<Value> = watch
        .events()
        .into_iter()
        .filter(|e| e["type"] == "peer_failed" || e["type"] == "peer_suspect")
        .collect();
    assert!(slander.is_empty(), "p1 accused running peers: {slander:?}");
    let stalls = status(&p1)["counters"]["stalls"].as_u64();
    assert!(
        stalls.is_some_and(|n| n >= 1),
        "the stall was noticed: {stalls:?}"
    );
}
