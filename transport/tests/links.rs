//! The transport on real loopback sockets (127.0.0.1, port 0): two
//! transports, or one transport and a hand-driven peer built from
//! `proto::link` and the frame codec. Timing tests run on tokio's paused
//! clock; every wait is bounded.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::frame::{AppMessage, Message, Ping, Reject, VERSION};
use proto::link::{
    CloseReason, Established, GoodbyeReason, Handshake, HandshakeConfig, LocalClose, RejectCode,
};
use proto::membership::DialFailure;
use proto::secure::{Key, Keyring};
use proto::{Hello, NodeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transport::{
    Config, SendError, Transport, TransportEvent, MESSAGE_BATCH_BYTES, MESSAGE_BATCH_LEN,
};

/// Bound on any single wait of these tests (virtual time in paused tests).
const WAIT: Duration = Duration::from_secs(10);

fn hello(id: NodeId, name: &str, addr: SocketAddr) -> Hello {
    Hello {
        protocol: VERSION,
        cluster: "test".into(),
        id,
        incarnation: 1,
        name: name.into(),
        addr,
        tags: Default::default(),
    }
}

struct Node {
    transport: Transport,
    events: mpsc::Receiver<TransportEvent>,
    id: NodeId,
    addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Node {
    async fn start(name: &str, tweak: impl FnOnce(&mut Config)) -> Node {
        Node::with_id(NodeId::random(), name, tweak).await
    }

    async fn with_id(id: NodeId, name: &str, tweak: impl FnOnce(&mut Config)) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = Config::new(hello(id, name, addr));
        tweak(&mut cfg);
        let (tx, events) = mpsc::channel(1024);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let transport = Transport::start(listener, cfg, tx, cancel.clone(), &tracker);
        Node {
            transport,
            events,
            id,
            addr,
            cancel,
            tracker,
        }
    }

    /// The next event that `pick` accepts; others are skipped.
    async fn next<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(TransportEvent) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => {
                    if let Some(t) = pick(ev) {
                        return t;
                    }
                }
                Ok(None) => panic!("{what}: transport gone"),
                Err(_) => panic!("{what}: nothing within {WAIT:?}"),
            }
        }
    }

    async fn link_up(&mut self) -> (Hello, bool) {
        self.next("link up", |ev| match ev {
            TransportEvent::LinkUp {
                hello, outbound, ..
            } => Some((*hello, outbound)),
            _ => None,
        })
        .await
    }

    async fn link_down(&mut self) -> (NodeId, bool, bool, CloseReason) {
        self.next("link down", |ev| match ev {
            TransportEvent::LinkDown {
                id,
                goodbye,
                graceful,
                reason,
            } => Some((id, goodbye, graceful, reason)),
            _ => None,
        })
        .await
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        timeout(WAIT, self.tracker.wait())
            .await
            .expect("transport stops");
    }
}

/// Polls `cond` until it holds, within [`WAIT`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn keyring(key: &Key) -> Option<proto::secure::SharedKeyring> {
    Some(Arc::new(RwLock::new(
        Keyring::new(vec![key.clone()]).unwrap(),
    )))
}

fn app(i: u32) -> AppMessage {
    AppMessage {
        topic: "t".into(),
        payload: Bytes::from(i.to_be_bytes().to_vec()),
    }
}

#[tokio::test]
async fn two_transports_link_up_and_exchange_messages_both_ways() {
    for secured in [false, true] {
        let key = Key::generate();
        let secret = |c: &mut Config| {
            if secured {
                c.keyring = keyring(&key);
            }
        };
        let mut a = Node::start("a", secret).await;
        let mut b = Node::start("b", secret).await;
        assert!(a.transport.dial(b.id, b.addr));
        let (seen_by_a, a_dialed) = a.link_up().await;
        let (seen_by_b, b_dialed) = b.link_up().await;
        assert_eq!((seen_by_a.id, seen_by_b.id), (b.id, a.id));
        assert!(a_dialed && !b_dialed);

        let ab = a.transport.links().await.remove(0);
        let ba = b.transport.links().await.remove(0);
        assert_eq!((ab.id, ab.outbound), (b.id, true));
        assert_eq!((ba.id, ba.outbound), (a.id, false));
        let wait = a.transport.send_timeout();
        for i in 0..200 {
            ab.handle.send_app(app(i), wait).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 200 {
            let (from, msgs) = b
                .next("message", |ev| match ev {
                    TransportEvent::Messages { id, msgs } => Some((id, msgs)),
                    _ => None,
                })
                .await;
            assert!(!msgs.is_empty(), "a batch is never empty");
            got.extend(msgs.into_iter().map(|m| (from, m)));
        }
        for (i, (from, msg)) in (0..200).zip(got) {
            assert_eq!((from, msg), (a.id, app(i)), "in order, intact");
        }
        ba.handle.send_app(app(7), wait).await.unwrap();
        let back = a
            .next("reply", |ev| match ev {
                TransportEvent::Messages { msgs, .. } => Some(msgs),
                _ => None,
            })
            .await;
        assert_eq!(back, vec![app(7)]);

        // Counters, and the RTT on both ends: the dialer measures it, the
        // acceptor learns it from the dialer's pings.
        let (ca, cb) = (ab.handle.counters.clone(), ba.handle.counters.clone());
        eventually("counters", || {
            ca.msgs_out.load(Ordering::Relaxed) == 200
                && cb.msgs_in.load(Ordering::Relaxed) == 200
                && cb.bytes_in.load(Ordering::Relaxed) == 800
                && ca.msgs_in.load(Ordering::Relaxed) == 1
        })
        .await;
        eventually("rtt known on both ends", || {
            ca.rtt_us.load(Ordering::Relaxed) > 0 && cb.rtt_us.load(Ordering::Relaxed) > 0
        })
        .await;
        let heard = b
            .next("liveness report", |ev| match ev {
                TransportEvent::Heard(h) => h.into_iter().find(|h| h.id == a.id && h.rtt.is_some()),
                _ => None,
            })
            .await;
        assert!(heard.rtt.unwrap() > Duration::ZERO);
        assert!(a.transport.stats().frames_out.load(Ordering::Relaxed) >= 200);
        assert!(b.transport.stats().frames_in.load(Ordering::Relaxed) >= 200);
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test]
async fn a_closed_link_reports_its_typed_reason() {
    // The peer leaving: a goodbye, graceful.
    let mut a = Node::start("a", |_| {}).await;
    let mut b = Node::start("b", |_| {}).await;
    assert!(a.transport.dial(b.id, b.addr));
    a.link_up().await;
    b.link_up().await;
    let b_id = b.id;
    b.stop().await;
    let (id, goodbye, graceful, reason) = a.link_down().await;
    assert_eq!(id, b_id);
    assert_eq!(reason, CloseReason::Goodbye(GoodbyeReason::Shutdown));
    assert!(goodbye && graceful);

    // Closed without a word by one end: this end says why, the other sees
    // the stream end.
    let mut b = Node::start("b", |_| {}).await;
    assert!(a.transport.dial(b.id, b.addr));
    a.link_up().await;
    b.link_up().await;
    a.transport.links().await.remove(0).handle.close();
    let (_, goodbye, graceful, reason) = a.link_down().await;
    assert_eq!(reason, CloseReason::Local(LocalClose::Dropped));
    assert!(!goodbye && !graceful);
    let (id, goodbye, graceful, reason) = b.link_down().await;
    assert_eq!(id, a.id);
    assert_eq!(reason, CloseReason::Eof);
    assert!(!goodbye && !graceful);
    assert!(a.transport.links().await.is_empty());
    let res = a
        .transport
        .try_send(b.id, Message::Ping(Ping::default()))
        .await;
    assert_eq!(res, Err(SendError::NoLink));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn duplicate_dials_resolve_to_the_link_the_lower_id_dialed() {
    for round in 0..8 {
        let (lo, hi) = (NodeId(2 * round + 1), NodeId(2 * round + 2));
        let mut a = Node::with_id(lo, "a", |_| {}).await;
        let mut b = Node::with_id(hi, "b", |_| {}).await;
        // Both dial at once.
        assert!(a.transport.dial(b.id, b.addr));
        assert!(b.transport.dial(a.id, a.addr));
        a.link_up().await;
        b.link_up().await;
        let settled = |links: &[transport::LinkInfo], outbound: bool| {
            links.len() == 1 && links[0].outbound == outbound
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let (la, lb) = (a.transport.links().await, b.transport.links().await);
            // Both keep the connection the lower id (a) dialed.
            if settled(&la, true) && settled(&lb, false) {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: {la:?} / {lb:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The loser links never surface as a link going up or down.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for n in [&mut a, &mut b] {
            while let Ok(ev) = n.events.try_recv() {
                assert!(
                    !matches!(
                        ev,
                        TransportEvent::LinkUp { .. } | TransportEvent::LinkDown { .. }
                    ),
                    "round {round}: {ev:?}"
                );
            }
        }
        assert_eq!(a.transport.links().await.len(), 1);
        a.stop().await;
        b.stop().await;
    }
}

/// The duplicate rule's losing end: the peer (node 77, the lower id)
/// rejects `a`'s link as a duplicate before its own, preferred link has
/// completed its handshake at `a`. Sent in that order, and the second only
/// once `a` has closed the first (so `a`'s actor hears of the close before
/// the new link).
async fn rejected_as_duplicate(a: &mut Node) -> (TcpStream, SocketAddr) {
    let (mut old, mut est, mut buf) = dialed_by(a).await;
    a.link_up().await;
    let new = TcpStream::connect(a.addr).await.unwrap();
    let reject = Message::Reject(Reject {
        code: RejectCode::Duplicate,
        detail: "a link between these nodes already exists".into(),
    });
    let mut out = BytesMut::new();
    est.encoder.encode(reject, &mut out).unwrap();
    old.write_all(&out).await.unwrap();
    while timeout(WAIT, read_frame(&mut old, &mut est, &mut buf))
        .await
        .expect("a closes the rejected link")
        .is_some()
    {}
    let addr = old.local_addr().unwrap();
    (new, addr)
}

#[tokio::test]
async fn a_link_rejected_as_a_duplicate_hands_over_to_the_preferred_one_without_going_down() {
    let mut a = Node::with_id(NodeId(200), "a", |c| {
        // A generous wait: the handover must not depend on the machine's
        // speed. The default is checked by the next test's bound.
        c.handover_wait = WAIT;
    })
    .await;
    let (mut new, addr) = rejected_as_duplicate(&mut a).await;
    let dial = Handshake::dial(Instant::now().into_std(), peer_cfg(addr));
    let (_est, _buf) = handshake(&mut new, dial).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let links = a.transport.links().await;
        if links.len() == 1 && !links[0].outbound {
            break; // the peer's link is now a's link to it
        }
        assert!(Instant::now() < deadline, "{links:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The actor heard of the close before the new link: had it reported
    // it, the event would be queued by now.
    while let Ok(ev) = a.events.try_recv() {
        assert!(
            !matches!(
                ev,
                TransportEvent::LinkUp { .. } | TransportEvent::LinkDown { .. }
            ),
            "{ev:?}"
        );
    }
    a.stop().await;
}

#[tokio::test]
async fn a_link_rejected_as_a_duplicate_with_no_preferred_one_goes_down_after_the_wait() {
    let wait = Duration::from_millis(50);
    let mut a = Node::with_id(NodeId(200), "a", |c| c.handover_wait = wait).await;
    let rejected = Instant::now();
    let (_new, _) = rejected_as_duplicate(&mut a).await;
    let (id, goodbye, graceful, reason) = a.link_down().await;
    assert!(rejected.elapsed() >= wait, "held for the wait");
    assert_eq!(id, NodeId(77));
    assert!(graceful && !goodbye);
    assert!(
        matches!(
            reason,
            CloseReason::Rejected {
                code: RejectCode::Duplicate,
                ..
            }
        ),
        "{reason:?}"
    );
    a.stop().await;
}

#[tokio::test]
async fn a_link_closed_with_a_farewell_reads_on_until_the_peer_closes() {
    // `a` closes its link to a hand-driven peer as no longer a neighbour
    // while bytes from the peer wait unread in its socket: its node takes
    // no events (a channel of one), so its reader is held. Closing the
    // socket then would reset the connection, and a reset can overtake the
    // reject; `a` reads on instead, until the peer closes (the drain is
    // made long here so that a slow machine cannot end it first).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = listener.local_addr().unwrap();
    let mut cfg = Config::new(hello(NodeId(200), "a", a_addr));
    cfg.farewell_drain = WAIT;
    let (tx, mut events) = mpsc::channel(1);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let transport = Transport::start(listener, cfg, tx, cancel.clone(), &tracker);
    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(transport.dial(NodeId(77), peer.local_addr().unwrap()));
    let (mut stream, _) = peer.accept().await.unwrap();
    let accept = Handshake::accept(
        Instant::now().into_std(),
        peer_cfg(peer.local_addr().unwrap()),
    );
    let (mut est, mut buf) = handshake(&mut stream, accept).await;
    let up = timeout(WAIT, events.recv()).await.unwrap().unwrap();
    assert!(matches!(up, TransportEvent::LinkUp { .. }), "{up:?}");
    // Messages, one write each, until the reader is held: the first batch
    // fills the channel, the next waits, and the rest stay in the socket.
    let mut out = BytesMut::new();
    for i in 0..64 {
        out.clear();
        est.encoder.encode(Message::App(app(i)), &mut out).unwrap();
        stream.write_all(&out).await.unwrap();
    }
    assert!(transport.close_not_neighbour(NodeId(77)));
    let mut rejected = false;
    while let Some((_, m)) = timeout(WAIT, read_frame(&mut stream, &mut est, &mut buf))
        .await
        .expect("the reject, then the end of the stream")
    {
        rejected |= matches!(
            m,
            Message::Reject(Reject {
                code: RejectCode::NotNeighbour,
                ..
            })
        );
    }
    assert!(rejected, "the reject came before the end of the stream");
    // `a` still reads: what the peer sends now draws no reset.
    for _ in 0..20 {
        out.clear();
        est.encoder
            .encode(Message::Ping(Ping::default()), &mut out)
            .unwrap();
        stream
            .write_all(&out)
            .await
            .expect("the closing end still reads");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(stream);
    cancel.cancel();
    tracker.close();
    let drained = async {
        while let Some(ev) = events.recv().await {
            if let TransportEvent::LinkDown { reason, .. } = ev {
                assert_eq!(reason, CloseReason::Local(LocalClose::NotNeighbour));
            }
        }
    };
    timeout(WAIT, drained).await.expect("events end");
    timeout(WAIT, tracker.wait())
        .await
        .expect("transport stops");
}

#[tokio::test]
async fn refusals_are_typed_dial_failures_and_counted_by_the_refuser() {
    let mut a = Node::start("a", |c| c.local.cluster = "other".into()).await;
    let b = Node::start("b", |_| {}).await;
    assert!(a.transport.dial(b.id, b.addr));
    let why = a
        .next("dial failed", |ev| match ev {
            TransportEvent::DialFailed { why, detail, .. } => Some((why, detail)),
            _ => None,
        })
        .await;
    assert_eq!(why.0, DialFailure::Other, "{}", why.1);
    assert!(why.1.contains("cluster"), "{}", why.1);
    let bs = b.transport.stats();
    eventually("refusal counted", || {
        bs.drops.snapshot().get("cluster").copied().unwrap_or(0) == 1
    })
    .await;
    assert_eq!(a.transport.stats().dial_failures.load(Ordering::Relaxed), 1);

    // A secret on one side only: a security mismatch at the acceptor.
    let key = Key::generate();
    let mut s = Node::start("s", |c| c.keyring = keyring(&key)).await;
    assert!(s.transport.dial(b.id, b.addr));
    s.next("dial failed", |ev| {
        matches!(ev, TransportEvent::DialFailed { .. }).then_some(())
    })
    .await;
    eventually("mismatch counted", || {
        bs.drops
            .snapshot()
            .get("security_mismatch")
            .copied()
            .unwrap_or(0)
            == 1
    })
    .await;

    // A closed port is refused; a connection dropped before any answer is
    // a reset (a dying process), retried at once by the peer table.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    let dropper = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dropper_addr = dropper.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = dropper.accept().await {
            drop(conn);
        }
    });
    for (addr, expected) in [
        (gone_addr, DialFailure::Refused),
        (dropper_addr, DialFailure::Reset),
    ] {
        assert!(a.transport.dial(NodeId(9), addr));
        let why = a
            .next("dial failed", |ev| match ev {
                TransportEvent::DialFailed { why, .. } => Some(why),
                _ => None,
            })
            .await;
        assert_eq!(why, expected, "{addr}");
    }
    for n in [a, b, s] {
        n.stop().await;
    }
}

// ---- a peer driven by hand, on the paused clock ----

/// Runs `hs` over `stream` as the transport does, for the test's own end.
async fn handshake(stream: &mut TcpStream, mut hs: Handshake) -> (Established, BytesMut) {
    let mut buf = BytesMut::new();
    loop {
        while let Some(bytes) = hs.poll_transmit() {
            stream.write_all(&bytes).await.unwrap();
        }
        if let Some(outcome) = hs.poll_outcome() {
            return (outcome.expect("handshake"), buf);
        }
        let n = timeout(WAIT, stream.read_buf(&mut buf))
            .await
            .expect("handshake bytes")
            .unwrap();
        let now = Instant::now().into_std();
        if n == 0 {
            hs.on_eof(now);
        } else {
            hs.on_bytes(now, &mut buf);
        }
    }
}

/// A peer driven by hand that `a` dials (as node 77): the accepted
/// stream, after the handshake, with the link's state and leftover bytes.
async fn dialed_by(a: &Node) -> (TcpStream, Established, BytesMut) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(a.transport.dial(NodeId(77), addr));
    let (mut stream, _) = listener.accept().await.unwrap();
    let (est, buf) = handshake(
        &mut stream,
        Handshake::accept(Instant::now().into_std(), peer_cfg(addr)),
    )
    .await;
    (stream, est, buf)
}

fn peer_cfg(addr: SocketAddr) -> HandshakeConfig {
    HandshakeConfig {
        local: hello(NodeId(77), "peer", addr),
        keyring: None,
        max_frame: 1 << 20,
        timeout: Duration::from_secs(2),
    }
}

/// The next frame from the transport, and the (virtual) time it arrived.
async fn read_frame(
    stream: &mut TcpStream,
    est: &mut Established,
    buf: &mut BytesMut,
) -> Option<(Instant, Message)> {
    loop {
        if let Some(m) = est.decoder.decode(buf).unwrap() {
            return Some((Instant::now(), m));
        }
        if stream.read_buf(buf).await.unwrap() == 0 {
            return None;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_dialer_pings_at_once_then_every_interval_and_carries_the_rtt() {
    let interval = Duration::from_millis(100);
    let delay = Duration::from_millis(30);
    let a = Node::start("a", |c| {
        c.ping_interval = interval;
        c.link_timeout = Duration::from_secs(5);
    })
    .await;
    let (mut stream, mut est, mut buf) = dialed_by(&a).await;

    let mut pings = Vec::new();
    while pings.len() < 5 {
        let (_, frame) = read_frame(&mut stream, &mut est, &mut buf)
            .await
            .expect("pings keep coming");
        let Message::Ping(p) = frame else {
            panic!("only pings on an idle link, got {frame:?}")
        };
        pings.push(p);
        // Answer after `delay`: that is the round-trip time the dialer sees.
        tokio::time::sleep(delay).await;
        let mut out = BytesMut::new();
        est.encoder.encode(Message::Pong(p), &mut out).unwrap();
        stream.write_all(&out).await.unwrap();
    }
    assert_eq!(
        (pings[0].seq, pings[0].ts_us, pings[0].rtt_us),
        (1, 0, 0),
        "first at once"
    );
    // Then one per round, rounds `interval` apart (the first round comes
    // within an interval: rounds are anchored on the wall clock).
    assert!(Duration::from_micros(pings[1].ts_us) <= interval);
    for w in pings[1..].windows(2) {
        assert_eq!(
            Duration::from_micros(w[1].ts_us - w[0].ts_us),
            interval,
            "{pings:?}"
        );
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    // Each ping carries the last RTT. With real sockets under a paused
    // clock, tokio may advance time to its next timer while a pong is in
    // flight, so the measured value is at least the peer's delay and at most
    // one ping round more.
    for p in &pings[2..] {
        let rtt = Duration::from_micros(p.rtt_us);
        assert!(rtt >= delay && rtt <= delay + interval, "{pings:?}");
    }
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_closed_after_the_link_timeout_and_the_acceptor_never_pings() {
    let link_timeout = Duration::from_millis(900);
    let mut a = Node::start("a", |c| c.link_timeout = link_timeout).await;
    // A dialer that completes the handshake, then says nothing at all.
    let mut stream = TcpStream::connect(a.addr).await.unwrap();
    let ours = stream.local_addr().unwrap();
    let (mut est, mut buf) = handshake(
        &mut stream,
        Handshake::dial(Instant::now().into_std(), peer_cfg(ours)),
    )
    .await;
    a.link_up().await;
    let up = Instant::now();
    let (id, goodbye, graceful, reason) = a.link_down().await;
    let took = up.elapsed();
    assert_eq!(id, NodeId(77));
    assert_eq!(reason, CloseReason::Silent(link_timeout));
    assert!(!goodbye && !graceful);
    assert!(
        took >= link_timeout && took <= link_timeout + Duration::from_millis(5),
        "closed after {took:?}"
    );
    // The acceptor sent nothing before it closed: only the dialer pings.
    assert!(read_frame(&mut stream, &mut est, &mut buf).await.is_none());
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_stalls_its_senders_and_loses_the_link() {
    let mut a = Node::start("a", |c| {
        c.queue = 4;
        c.send_timeout = Duration::from_secs(2);
        c.link_timeout = Duration::from_secs(60);
    })
    .await;
    let (stream, _est, _buf) = dialed_by(&a).await;
    a.link_up().await;
    let link = a.transport.links().await.remove(0);
    // The peer reads nothing more: the socket buffers fill, then the queue.
    let big = AppMessage {
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 256 << 10]),
    };
    let wait = a.transport.send_timeout();
    let mut sent = 0;
    let err = loop {
        match link.handle.send_app(big.clone(), wait).await {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "the queue never filled");
    };
    assert_eq!(err, SendError::Stalled);
    let (_, _, graceful, reason) = a.link_down().await;
    assert_eq!(reason, CloseReason::Local(LocalClose::Stalled));
    assert!(!graceful);
    drop(stream);
    a.stop().await;
}

#[tokio::test]
async fn a_dialer_flooded_by_its_peer_keeps_pinging() {
    // Only the dialer pings; if a steady inbound stream starved its timer,
    // a peer that only sends would hear nothing back and close the link.
    let interval = Duration::from_millis(20);
    let mut a = Node::start("a", |c| {
        c.ping_interval = interval;
        c.link_timeout = Duration::from_secs(30);
    })
    .await;
    let (stream, mut est, mut buf) = dialed_by(&a).await;
    a.link_up().await;
    let (mut rd, mut wr) = stream.into_split();
    // One write of many small frames, again and again, for a second.
    let mut burst = BytesMut::new();
    for i in 0..2000 {
        est.encoder
            .encode(Message::App(app(i)), &mut burst)
            .unwrap();
    }
    let burst = burst.freeze();
    let flood = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(1);
        let mut bursts = 0u32;
        // Until the window ends, or the link does.
        while Instant::now() < end && wr.write_all(&burst).await.is_ok() {
            bursts += 1;
        }
        bursts
    });
    // Count the pings that arrive while the flood lasts, draining a's
    // events so that its reader never waits for the node.
    let end = Instant::now() + Duration::from_secs(1);
    let mut pings = 0;
    loop {
        while let Some(m) = est.decoder.decode(&mut buf).unwrap() {
            pings += usize::from(matches!(m, Message::Ping(_)));
        }
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            ev = a.events.recv() => assert!(ev.is_some(), "transport gone"),
            n = rd.read_buf(&mut buf) => assert!(n.unwrap() > 0, "link closed during the flood"),
        }
    }
    assert!(pings >= 10, "{pings} pings in 1 s at one per {interval:?}");
    // Stopping `a` ends the link, which ends the flood if it still writes.
    a.stop().await;
    assert!(flood.await.unwrap() > 0);
}

/// Messages arrive in batches (one event per read, not per message), in
/// the order sent, and no batch exceeds the documented bounds.
#[tokio::test]
async fn messages_arrive_in_order_in_bounded_batches() {
    for secured in [false, true] {
        let key = Key::generate();
        let secret = |c: &mut Config| {
            if secured {
                c.keyring = keyring(&key);
            }
        };
        let mut a = Node::start("a", secret).await;
        let mut b = Node::start("b", secret).await;
        assert!(a.transport.dial(b.id, b.addr));
        a.link_up().await;
        b.link_up().await;
        let ab = a.transport.links().await.remove(0);
        let wait = a.transport.send_timeout();
        let big = |i: u32| AppMessage {
            topic: format!("big{i}").into(),
            payload: Bytes::from(vec![i as u8; 40 << 10]),
        };
        let sent: Vec<AppMessage> = (0..3000).map(app).chain((0..12).map(big)).collect();
        let sender = {
            let (handle, sent) = (ab.handle.clone(), sent.clone());
            tokio::spawn(async move {
                for m in sent {
                    handle.send_app(m, wait).await.unwrap();
                }
            })
        };
        let (mut got, mut batches) = (Vec::new(), 0usize);
        while got.len() < sent.len() {
            let (from, msgs) = b
                .next("messages", |ev| match ev {
                    TransportEvent::Messages { id, msgs } => Some((id, msgs)),
                    _ => None,
                })
                .await;
            assert_eq!(from, a.id);
            assert!(!msgs.is_empty(), "a batch is never empty");
            assert!(msgs.len() <= MESSAGE_BATCH_LEN, "{} messages", msgs.len());
            let before_last: usize = msgs[..msgs.len() - 1].iter().map(|m| m.payload.len()).sum();
            assert!(
                before_last < MESSAGE_BATCH_BYTES,
                "{before_last} bytes before the last"
            );
            batches += 1;
            got.extend(msgs);
        }
        sender.await.unwrap();
        assert!(
            got == sent,
            "every message, in order, intact (secured: {secured})"
        );
        assert!(
            batches < 3000,
            "{batches} events for {} messages",
            sent.len()
        );
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test]
async fn a_saturated_dialer_keeps_pinging_and_its_link_stays_up() {
    // The dialer sends without pause for several link timeouts; its peer
    // only receives. The peer's pongs are all the dialer hears, so the
    // dialer's pings must get out past its own full queue.
    let link_timeout = Duration::from_millis(300);
    let tweak = |c: &mut Config| {
        c.ping_interval = Duration::from_millis(50);
        c.link_timeout = link_timeout;
    };
    let mut a = Node::start("a", tweak).await;
    let mut b = Node::start("b", tweak).await;
    assert!(a.transport.dial(b.id, b.addr));
    a.link_up().await;
    b.link_up().await;
    let link = a.transport.links().await.remove(0);
    let drain = tokio::spawn(async move {
        let mut got = 0u64;
        while let Some(ev) = b.events.recv().await {
            match ev {
                TransportEvent::Messages { msgs, .. } => got += msgs.len() as u64,
                TransportEvent::LinkDown { reason, .. } => panic!("b lost the link: {reason}"),
                _ => {}
            }
        }
        got
    });
    let big = AppMessage {
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 64 << 10]),
    };
    let end = Instant::now() + 5 * link_timeout;
    let mut sent = 0u64;
    while Instant::now() < end {
        let res = link.handle.send_app(big.clone(), WAIT).await;
        assert_eq!(res, Ok(()), "after {sent} messages");
        sent += 1;
        // Nothing else on a's side: a lost link would show here.
        if let Ok(ev) = a.events.try_recv() {
            assert!(!matches!(ev, TransportEvent::LinkDown { .. }), "{ev:?}");
        }
    }
    assert!(sent > 100, "{sent}");
    assert_eq!(a.transport.links().await.len(), 1);
    a.stop().await;
    drain.abort();
}
