//! The link machines under synthetic time: two handshakes wired back to
//! back through byte buffers, and established links exchanging frames.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::*;
use crate::frame::{
    AppMessage, FrameCodec, Goodbye, Hello, Message, PeerList, Ping, Reject, FLAG_TAGGED, VERSION,
};
use crate::membership::DialFailure;
use crate::secure::{Key, Keyring};

const TIMEOUT: Duration = Duration::from_secs(2);
const MAX: usize = 1 << 20;

fn hello(id: u128, name: &str) -> Hello {
    Hello {
        protocol: VERSION,
        cluster: "default".into(),
        id: NodeId(id),
        incarnation: 1,
        name: name.into(),
        addr: "127.0.0.1:7000".parse().unwrap(),
        tags: Default::default(),
    }
}

fn cfg(local: Hello, keys: Option<&[&Key]>) -> HandshakeConfig {
    HandshakeConfig {
        local,
        keyring: keys.map(|k| Keyring::new(k.iter().map(|k| (*k).clone()).collect()).unwrap()),
        max_frame: MAX,
        timeout: TIMEOUT,
    }
}

/// Two handshakes joined back to back: what one transmits is what the other
/// reads, in whatever chunking the test chooses.
struct Pair {
    dialer: Handshake,
    acceptor: Handshake,
    /// Bytes in flight towards each side.
    to_dialer: BytesMut,
    to_acceptor: BytesMut,
    now: Instant,
}

type Outcome = Option<Result<Established, HandshakeError>>;

impl Pair {
    fn new(dialer: HandshakeConfig, acceptor: HandshakeConfig) -> Pair {
        let now = Instant::now();
        Pair {
            dialer: Handshake::dial(now, dialer),
            acceptor: Handshake::accept(now, acceptor),
            to_dialer: BytesMut::new(),
            to_acceptor: BytesMut::new(),
            now,
        }
    }

    /// Moves bytes until neither side has anything left to say; returns
    /// both outcomes (`None`: still waiting).
    fn drive(&mut self) -> (Outcome, Outcome) {
        let (mut d, mut a) = (None, None);
        loop {
            let mut moved = false;
            while let Some(b) = self.dialer.poll_transmit() {
                self.to_acceptor.extend_from_slice(&b);
                moved = true;
            }
            if !self.to_acceptor.is_empty() && a.is_none() {
                self.acceptor.on_bytes(self.now, &mut self.to_acceptor);
            }
            while let Some(b) = self.acceptor.poll_transmit() {
                self.to_dialer.extend_from_slice(&b);
                moved = true;
            }
            if !self.to_dialer.is_empty() && d.is_none() {
                self.dialer.on_bytes(self.now, &mut self.to_dialer);
            }
            d = d.or_else(|| self.dialer.poll_outcome());
            a = a.or_else(|| self.acceptor.poll_outcome());
            if !moved {
                return (d, a);
            }
        }
    }
}

fn established(o: Outcome) -> Established {
    match o {
        Some(Ok(e)) => e,
        other => panic!("not established: {other:?}"),
    }
}

fn failed(o: Outcome) -> HandshakeError {
    match o {
        Some(Err(e)) => e,
        other => panic!("did not fail: {other:?}"),
    }
}

/// A frame sent on one established end arrives intact at the other.
fn assert_codecs_agree(a: &mut Established, b: &mut Established) {
    let msg = Message::App(AppMessage {
        topic: "t".into(),
        payload: Bytes::from_static(b"payload"),
    });
    let mut wire = BytesMut::new();
    a.encoder.encode(msg.clone(), &mut wire).unwrap();
    assert_eq!(b.decoder.decode(&mut wire).unwrap(), Some(msg));
    assert!(wire.is_empty());
}

#[test]
fn plaintext_handshake_links_both_ends_with_the_documented_bytes() {
    let (d, a) = (hello(1, "d"), hello(2, "a"));
    let mut pair = Pair::new(cfg(d.clone(), None), cfg(a.clone(), None));
    // The dialer's first bytes are exactly a hello frame.
    let first = pair.dialer.poll_transmit().unwrap();
    let mut expected = BytesMut::new();
    FrameCodec::new(MAX)
        .encode(Message::Hello(d.clone()), &mut expected)
        .unwrap();
    assert_eq!(first, expected.freeze());
    assert_eq!(&first[4..7], &[VERSION, 0, 1]);
    pair.to_acceptor.extend_from_slice(&first);

    let (do_, ao) = pair.drive();
    let (mut de, mut ae) = (established(do_), established(ao));
    assert_eq!(de.remote, a);
    assert_eq!(ae.remote, d);
    assert!(pair.to_dialer.is_empty() && pair.to_acceptor.is_empty());
    assert_codecs_agree(&mut de, &mut ae);
    assert_codecs_agree(&mut ae, &mut de);
    assert_eq!(pair.dialer.next_deadline(), None);
    assert_eq!(pair.acceptor.next_deadline(), None);
}

#[test]
fn secured_handshake_confirms_keys_and_seals_the_link() {
    let key = Key::generate();
    let other = Key::generate();
    let (d, a) = (hello(1, "d"), hello(2, "a"));
    // The acceptor accepts any installed key; the dialer seals with its primary.
    let mut pair = Pair::new(
        cfg(d.clone(), Some(&[&key])),
        cfg(a.clone(), Some(&[&other, &key])),
    );
    let first = pair.dialer.poll_transmit().unwrap();
    assert_eq!(&first[4..7], &[VERSION, FLAG_TAGGED, 1], "tagged hello");
    assert_eq!(
        u32::from_be_bytes(first[..4].try_into().unwrap()) as usize,
        first.len() - 4
    );
    assert!(
        !first.windows(7).any(|w| w == b"default"),
        "the hello is encrypted"
    );
    pair.to_acceptor.extend_from_slice(&first);
    let (do_, ao) = pair.drive();
    let (mut de, mut ae) = (established(do_), established(ao));
    assert_eq!((de.remote.clone(), ae.remote.clone()), (a, d));
    assert_codecs_agree(&mut de, &mut ae);
    assert_codecs_agree(&mut ae, &mut de);
}

#[test]
fn secured_acceptor_waits_for_the_key_confirmation() {
    let key = Key::generate();
    let mut pair = Pair::new(
        cfg(hello(1, "d"), Some(&[&key])),
        cfg(hello(2, "a"), Some(&[&key])),
    );
    // Deliver the dialer's hello, and the acceptor's answer, but not the
    // dialer's confirmation: the acceptor must not count the link yet.
    let m1 = pair.dialer.poll_transmit().unwrap();
    pair.acceptor
        .on_bytes(pair.now, &mut BytesMut::from(&m1[..]));
    let m2 = pair.acceptor.poll_transmit().unwrap();
    assert_eq!(&m2[4..7], &[VERSION, FLAG_TAGGED, 2], "tagged welcome");
    assert!(pair.acceptor.poll_outcome().is_none());
    // A replayer holding only message 1 cannot produce the confirmation:
    // a record it makes up does not open.
    let mut forged = BytesMut::new();
    forged.put_u32(3 + 20);
    forged.put_slice(&[VERSION, FLAG_TAGGED, 0]);
    forged.put_slice(&[0u8; 20]);
    let mut replay = Handshake::accept(pair.now, cfg(hello(2, "a"), Some(&[&key])));
    replay.on_bytes(pair.now, &mut BytesMut::from(&m1[..]));
    assert!(replay.poll_transmit().is_some());
    replay.on_bytes(pair.now, &mut forged);
    let e = failed(replay.poll_outcome());
    assert_eq!(e.drop_reason(), Some("auth"), "{e}");
    // A replay that just waits gets nothing either.
    let mut idle = Handshake::accept(pair.now, cfg(hello(2, "a"), Some(&[&key])));
    idle.on_bytes(pair.now, &mut BytesMut::from(&m1[..]));
    assert!(idle.poll_transmit().is_some());
    idle.on_timeout(pair.now + TIMEOUT);
    assert!(matches!(
        failed(idle.poll_outcome()),
        HandshakeError::NotConfirmed
    ));

    // The real dialer confirms: then the acceptor is up.
    pair.dialer.on_bytes(pair.now, &mut BytesMut::from(&m2[..]));
    let confirm = pair.dialer.poll_transmit().unwrap();
    assert_eq!(
        &confirm[4..7],
        &[VERSION, FLAG_TAGGED, 0],
        "one sealed record"
    );
    assert!(pair.dialer.poll_outcome().unwrap().is_ok());
    pair.acceptor
        .on_bytes(pair.now, &mut BytesMut::from(&confirm[..]));
    assert!(pair.acceptor.poll_outcome().unwrap().is_ok());
}

#[test]
fn bytes_one_at_a_time_and_bytes_after_the_handshake_are_handled() {
    for secured in [false, true] {
        let key = Key::generate();
        let ring = [&key];
        let keys: Option<&[&Key]> = secured.then_some(&ring[..]);
        let now = Instant::now();
        let mut d = Handshake::dial(now, cfg(hello(1, "d"), keys));
        let mut a = Handshake::accept(now, cfg(hello(2, "a"), keys));
        // Bytes in flight, and each side's read buffer (which keeps what
        // the machine did not consume, as a driver's does).
        let (mut to_a, mut to_d) = (BytesMut::new(), BytesMut::new());
        let (mut inbox_a, mut inbox_d) = (BytesMut::new(), BytesMut::new());
        let (mut dout, mut aout): (Outcome, Outcome) = (None, None);
        let ping = Message::Ping(Ping {
            seq: 1,
            ts_us: 0,
            rtt_us: 0,
        });
        for _ in 0..100_000 {
            while let Some(b) = d.poll_transmit() {
                to_a.extend_from_slice(&b);
            }
            while let Some(b) = a.poll_transmit() {
                to_d.extend_from_slice(&b);
            }
            if !to_a.is_empty() {
                inbox_a.extend_from_slice(&to_a.split_to(1));
                if aout.is_none() {
                    a.on_bytes(now, &mut inbox_a);
                }
            }
            if !to_d.is_empty() {
                inbox_d.extend_from_slice(&to_d.split_to(1));
                if dout.is_none() {
                    d.on_bytes(now, &mut inbox_d);
                }
            }
            if dout.is_none() {
                dout = d.poll_outcome();
                if let Some(Ok(de)) = &mut dout {
                    // The dialer's first link frame, right behind its
                    // handshake: it is left for the link's decoder.
                    de.encoder.encode(ping.clone(), &mut to_a).unwrap();
                }
            }
            aout = aout.or_else(|| a.poll_outcome());
            if dout.is_some() && aout.is_some() && to_a.is_empty() {
                break;
            }
        }
        let (mut de, mut ae) = (established(dout), established(aout));
        assert_eq!(ae.decoder.decode(&mut inbox_a).unwrap(), Some(ping));
        assert!(inbox_a.is_empty() && inbox_d.is_empty());
        assert_codecs_agree(&mut ae, &mut de);
    }
}

#[test]
fn every_refusal_is_typed_counted_and_told_to_the_dialer() {
    let mut other_cluster = hello(1, "d");
    other_cluster.cluster = "other".into();
    let mut other_version = hello(1, "d");
    other_version.protocol = VERSION + 1;
    for secured in [false, true] {
        let key = Key::generate();
        let ring = [&key];
        let keys: Option<&[&Key]> = secured.then_some(&ring[..]);
        for (dialer, code, label) in [
            (other_cluster.clone(), RejectCode::Cluster, "cluster"),
            (other_version.clone(), RejectCode::Version, "version"),
            (hello(2, "me"), RejectCode::SelfDial, "self"),
        ] {
            let mut pair = Pair::new(cfg(dialer, keys), cfg(hello(2, "a"), keys));
            let (d, a) = pair.drive();
            let (d, a) = (failed(d), failed(a));
            match &a {
                HandshakeError::Refused { code: c, .. } => assert_eq!(c, &code),
                other => panic!("acceptor: {other}"),
            }
            assert_eq!(a.drop_reason(), Some(label));
            match &d {
                HandshakeError::Rejected { code: c, detail } => {
                    assert_eq!(c, &code);
                    assert!(!detail.is_empty());
                }
                other => panic!("dialer: {other}"),
            }
            assert_eq!(
                d.drop_reason(),
                None,
                "the dialer was refused, not attacked"
            );
            assert_eq!(d.dial_failure(), DialFailure::Other);
        }
    }
}

#[test]
fn the_dialer_checks_the_welcome_too_and_says_why_it_hangs_up() {
    for secured in [false, true] {
        let key = Key::generate();
        let ring = [&key];
        let keys: Option<&[&Key]> = secured.then_some(&ring[..]);
        // An acceptor of a newer protocol that accepts us: we do not.
        let mut newer = hello(2, "a");
        newer.protocol = VERSION + 1;
        let mut pair = Pair::new(cfg(hello(1, "d"), keys), cfg(newer, keys));
        let (d, a) = pair.drive();
        let d = failed(d);
        assert!(
            matches!(&d, HandshakeError::Refused { code: RejectCode::Version, name, .. } if name == "a"),
            "{d}"
        );
        assert_eq!(d.drop_reason(), Some("version"));
        // The plaintext acceptor was up already and reads the reject on the
        // link; the secured one was awaiting the key confirmation and gets
        // it instead. Either way it learns why.
        let reject = match a {
            Some(Ok(mut ae)) => match ae.decoder.decode(&mut pair.to_acceptor).unwrap() {
                Some(Message::Reject(r)) => r.code,
                other => panic!("{other:?}"),
            },
            Some(Err(HandshakeError::Rejected { code, .. })) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(reject, RejectCode::Version);
    }
}

#[test]
fn a_duplicate_reject_is_its_own_dial_failure() {
    let mut d = Handshake::dial(Instant::now(), cfg(hello(1, "d"), None));
    assert!(d.poll_transmit().is_some());
    let mut wire = BytesMut::new();
    FrameCodec::new(MAX)
        .encode(LocalClose::Duplicate.farewell().unwrap(), &mut wire)
        .unwrap();
    d.on_bytes(Instant::now(), &mut wire);
    let e = failed(d.poll_outcome());
    assert!(
        matches!(
            &e,
            HandshakeError::Rejected {
                code: RejectCode::Duplicate,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.dial_failure(), DialFailure::Duplicate);
    assert_eq!(e.drop_reason(), None);
}

#[test]
fn duplicate_links_resolve_to_the_one_the_lower_id_dialed() {
    let (lo, hi) = (NodeId(1), NodeId(2));
    // Both ends judge the same two connections (one dialed by each) the
    // same way, whichever completed first on each end.
    for (local, peer) in [(lo, hi), (hi, lo)] {
        assert_eq!(resolve_duplicate(local, peer, hi, lo), Duplicate::KeepNew);
        assert_eq!(
            resolve_duplicate(local, peer, lo, hi),
            Duplicate::KeepCurrent
        );
        // The same direction again: the old link is half-dead.
        assert_eq!(resolve_duplicate(local, peer, lo, lo), Duplicate::KeepNew);
        assert_eq!(resolve_duplicate(local, peer, hi, hi), Duplicate::KeepNew);
    }
}

#[test]
fn a_duplicate_close_is_held_until_the_preferred_link_or_the_wait_ends() {
    let t0 = Instant::now();
    let wait = Duration::from_millis(200);
    let duplicate = CloseReason::Rejected {
        code: RejectCode::Duplicate,
        detail: String::new(),
    };
    let mut h = Handovers::default();
    // Any other end is reported at once.
    for other in [
        CloseReason::Eof,
        CloseReason::Goodbye(GoodbyeReason::Shutdown),
        CloseReason::Rejected {
            code: RejectCode::NotNeighbour,
            detail: String::new(),
        },
        CloseReason::Local(LocalClose::Duplicate),
    ] {
        assert!(!h.hold(t0, NodeId(1), &other, wait), "{other:?}");
    }
    assert_eq!(h.next_deadline(), None);
    // The preferred link comes: the close is never reported.
    assert!(h.hold(t0, NodeId(1), &duplicate, wait));
    assert!(h.hold(t0 + ms(10), NodeId(2), &duplicate, wait));
    assert_eq!(h.next_deadline(), Some(t0 + wait));
    assert!(h.take(NodeId(1)));
    assert!(!h.take(NodeId(1)), "taken once");
    assert!(!h.take(NodeId(3)), "a first link is no replacement");
    // It does not come: reported, as it came, once the wait is over.
    assert_eq!(h.next_deadline(), Some(t0 + ms(10) + wait));
    assert_eq!(h.expired(t0 + wait), vec![]);
    assert_eq!(
        h.expired(t0 + ms(10) + wait),
        vec![(NodeId(2), duplicate.clone())]
    );
    assert_eq!(h.next_deadline(), None);
    assert!(!h.take(NodeId(2)), "too late: a link now is a new one");
}

#[test]
fn only_a_close_with_a_farewell_drains() {
    assert!(CloseReason::Local(LocalClose::Shutdown).sent_farewell());
    assert!(CloseReason::Local(LocalClose::Duplicate).sent_farewell());
    assert!(CloseReason::Local(LocalClose::NotNeighbour).sent_farewell());
    assert!(!CloseReason::Local(LocalClose::Stalled).sent_farewell());
    assert!(!CloseReason::Local(LocalClose::Dropped).sent_farewell());
    assert!(!CloseReason::Eof.sent_farewell());
    assert!(!CloseReason::Goodbye(GoodbyeReason::Shutdown).sent_farewell());
}

#[test]
fn wrong_key_fails_authentication_and_mixed_modes_are_a_security_mismatch() {
    let (k1, k2) = (Key::generate(), Key::generate());
    // Wrong key: the acceptor counts `auth` and closes unanswered.
    let mut pair = Pair::new(
        cfg(hello(1, "d"), Some(&[&k1])),
        cfg(hello(2, "a"), Some(&[&k2])),
    );
    let (d, a) = pair.drive();
    assert!(d.is_none(), "no answer for the dialer");
    assert!(pair.to_dialer.is_empty());
    let a = failed(a);
    assert_eq!(a.drop_reason(), Some("auth"), "{a}");
    pair.dialer.on_eof(pair.now);
    let d = failed(pair.dialer.poll_outcome());
    assert_eq!(d.dial_failure(), DialFailure::Reset, "{d}");

    // Plaintext dialer, secured acceptor.
    let mut pair = Pair::new(cfg(hello(1, "d"), None), cfg(hello(2, "a"), Some(&[&k1])));
    let (d, a) = pair.drive();
    assert!(d.is_none() && pair.to_dialer.is_empty());
    let a = failed(a);
    assert!(matches!(a, HandshakeError::Plaintext));
    assert_eq!(a.drop_reason(), Some("security_mismatch"));

    // Secured dialer, plaintext acceptor.
    let mut pair = Pair::new(cfg(hello(1, "d"), Some(&[&k1])), cfg(hello(2, "a"), None));
    let (d, a) = pair.drive();
    assert!(d.is_none() && pair.to_dialer.is_empty());
    assert_eq!(failed(a).drop_reason(), Some("security_mismatch"));

    // A secured dialer answered in plaintext.
    let mut d = Handshake::dial(Instant::now(), cfg(hello(1, "d"), Some(&[&k1])));
    assert!(d.poll_transmit().is_some());
    let mut wire = BytesMut::new();
    FrameCodec::new(MAX)
        .encode(Message::Welcome(hello(2, "a")), &mut wire)
        .unwrap();
    d.on_bytes(Instant::now(), &mut wire);
    assert_eq!(
        failed(d.poll_outcome()).drop_reason(),
        Some("security_mismatch")
    );
}

#[test]
fn a_tampered_answer_fails_authentication_at_the_dialer() {
    let key = Key::generate();
    let mut pair = Pair::new(
        cfg(hello(1, "d"), Some(&[&key])),
        cfg(hello(2, "a"), Some(&[&key])),
    );
    let m1 = pair.dialer.poll_transmit().unwrap();
    pair.acceptor
        .on_bytes(pair.now, &mut BytesMut::from(&m1[..]));
    let mut m2 = BytesMut::from(&pair.acceptor.poll_transmit().unwrap()[..]);
    let last = m2.len() - 1;
    m2[last] ^= 1;
    pair.dialer.on_bytes(pair.now, &mut m2);
    let e = failed(pair.dialer.poll_outcome());
    assert_eq!(e.drop_reason(), Some("auth"), "{e}");
}

#[test]
fn wrong_first_frames_and_oversize_prefixes_are_refused() {
    // A ping where the hello belongs.
    let mut a = Handshake::accept(Instant::now(), cfg(hello(2, "a"), None));
    let mut wire = BytesMut::new();
    FrameCodec::new(MAX)
        .encode(Message::Ping(Ping::default()), &mut wire)
        .unwrap();
    a.on_bytes(Instant::now(), &mut wire);
    let e = failed(a.poll_outcome());
    assert!(matches!(
        e,
        HandshakeError::Unexpected {
            expected: "hello",
            got: "ping"
        }
    ));
    assert_eq!(e.drop_reason(), Some("handshake"));

    // A length prefix beyond any Noise message, at a secured acceptor:
    // refused from the prefix alone.
    let key = Key::generate();
    let mut a = Handshake::accept(Instant::now(), cfg(hello(2, "a"), Some(&[&key])));
    let mut wire = BytesMut::new();
    wire.put_u32(1 << 24);
    a.on_bytes(Instant::now(), &mut wire);
    assert_eq!(failed(a.poll_outcome()).drop_reason(), Some("too_large"));

    // An unknown envelope version.
    let mut a = Handshake::accept(Instant::now(), cfg(hello(2, "a"), Some(&[&key])));
    let mut wire = BytesMut::new();
    wire.put_u32(4);
    wire.put_slice(&[9, FLAG_TAGGED, 1, 0]);
    a.on_bytes(Instant::now(), &mut wire);
    assert_eq!(failed(a.poll_outcome()).drop_reason(), Some("version"));
}

#[test]
fn handshake_deadline_is_exact_and_typed_by_step() {
    let t0 = Instant::now();
    let mut a = Handshake::accept(t0, cfg(hello(2, "a"), None));
    assert_eq!(a.next_deadline(), Some(t0 + TIMEOUT));
    a.on_timeout(t0 + TIMEOUT - Duration::from_nanos(1));
    assert!(a.poll_outcome().is_none(), "still inside the window");
    a.on_timeout(t0 + TIMEOUT);
    let e = failed(a.poll_outcome());
    assert!(matches!(e, HandshakeError::NoHello));
    assert_eq!(e.drop_reason(), Some("handshake_timeout"));

    let mut d = Handshake::dial(t0, cfg(hello(1, "d"), None));
    assert!(
        d.poll_outcome().is_none(),
        "the hello must be written first"
    );
    assert!(d.poll_transmit().is_some());
    d.on_timeout(t0 + TIMEOUT);
    let e = failed(d.poll_outcome());
    assert!(matches!(e, HandshakeError::Timeout));
    assert_eq!(
        (e.drop_reason(), e.dial_failure()),
        (None, DialFailure::Other)
    );
    // Closed before an answer: a dying peer, retried at once.
    let mut d = Handshake::dial(t0, cfg(hello(1, "d"), None));
    assert!(d.poll_transmit().is_some());
    d.on_eof(t0);
    assert_eq!(failed(d.poll_outcome()).dial_failure(), DialFailure::Reset);
}

#[test]
fn reject_and_goodbye_codes_keep_their_wire_strings() {
    for (code, wire) in [
        (RejectCode::Version, "version"),
        (RejectCode::Cluster, "cluster"),
        (RejectCode::SelfDial, "self"),
        (RejectCode::Duplicate, "duplicate"),
        (RejectCode::Other("future".into()), "future"),
    ] {
        let typed = rmp_serde::to_vec_named(&Reject {
            code: code.clone(),
            detail: "d".into(),
        })
        .unwrap();
        #[derive(serde::Serialize)]
        struct Old<'a> {
            code: &'a str,
            detail: &'a str,
        }
        let old = rmp_serde::to_vec_named(&Old {
            code: wire,
            detail: "d",
        })
        .unwrap();
        assert_eq!(typed, old, "{wire}");
        let back: Reject = rmp_serde::from_slice(&old).unwrap();
        assert_eq!(back.code, code);
        assert_eq!(code, wire);
    }
    for (reason, wire) in [
        (GoodbyeReason::Shutdown, "shutdown"),
        (GoodbyeReason::Other("bye".into()), "bye"),
        (GoodbyeReason::default(), ""),
    ] {
        let typed = rmp_serde::to_vec_named(&Goodbye {
            reason: reason.clone(),
        })
        .unwrap();
        #[derive(serde::Serialize)]
        struct Old<'a> {
            reason: &'a str,
        }
        assert_eq!(
            typed,
            rmp_serde::to_vec_named(&Old { reason: wire }).unwrap()
        );
        let back: Goodbye = rmp_serde::from_slice(&typed).unwrap();
        assert_eq!(back.reason, reason);
    }
    // An absent reason is allowed, as before.
    #[derive(serde::Serialize)]
    struct Empty {}
    let back: Goodbye =
        rmp_serde::from_slice(&rmp_serde::to_vec_named(&Empty {}).unwrap()).unwrap();
    assert_eq!(back.reason, GoodbyeReason::default());
}

// ---- established links ----

const PING: Duration = Duration::from_millis(100);
const SILENCE: Duration = Duration::from_millis(450);

fn link_cfg(anchor: Instant) -> LinkConfig {
    LinkConfig {
        ping_interval: PING,
        link_timeout: SILENCE,
        ping_anchor: anchor,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pings(link: &mut Link) -> Vec<Ping> {
    let mut out = Vec::new();
    while let Some(m) = link.poll_transmit() {
        match m {
            Message::Ping(p) => out.push(p),
            other => panic!("unexpected transmit {other:?}"),
        }
    }
    out
}

#[test]
fn the_dialer_pings_at_once_then_on_the_rounds_of_the_anchor() {
    let t0 = Instant::now();
    // Rounds at t0 - 30 ms + k * 100 ms: t0 + 70, t0 + 170, ...
    let anchor = t0 - ms(30);
    let mut link = Link::new(t0, Role::Dialer, link_cfg(anchor));
    let first = pings(&mut link);
    assert_eq!(first.len(), 1, "first ping at once");
    assert_eq!((first[0].seq, first[0].ts_us, first[0].rtt_us), (1, 0, 0));
    assert_eq!(link.next_deadline(), Some(t0 + ms(70)));

    link.on_timeout(t0 + ms(69));
    assert!(pings(&mut link).is_empty(), "not before the round");
    // Keep the link heard so silence does not interfere.
    link.on_frame(t0 + ms(60), Message::Pong(first[0]));
    link.on_timeout(t0 + ms(70));
    let p = pings(&mut link);
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].seq, p[0].ts_us), (2, 70_000));
    assert_eq!(p[0].rtt_us, 60_000, "the ping carries the last RTT");
    assert_eq!(link.next_deadline(), Some(t0 + ms(170)));

    // Woken late, past two rounds: one ping, and the next round after now.
    link.on_frame(t0 + ms(300), Message::Pong(p[0]));
    link.on_timeout(t0 + ms(395));
    assert_eq!(pings(&mut link).len(), 1);
    assert_eq!(link.next_deadline(), Some(t0 + ms(470)));
}

#[test]
fn ping_rounds_are_anchored_on_wall_clock_multiples() {
    let now = Instant::now();
    let every = ms(150);
    // 10.26 s after the epoch: the last multiple of 150 ms was 60 ms ago.
    let anchor = wall_clock_anchor(now, ms(10_260), every);
    assert_eq!(now - anchor, ms(60));
    assert_eq!(
        wall_clock_anchor(now, ms(10_200), every),
        now,
        "on a multiple"
    );
}

#[test]
fn the_nearest_round_is_the_later_of_two_equally_near() {
    let a = Instant::now() + ms(1000);
    assert_eq!(nearest_round(a, ms(100), a + ms(140)), a + ms(100));
    assert_eq!(nearest_round(a, ms(100), a + ms(160)), a + ms(200));
    assert_eq!(nearest_round(a, ms(100), a + ms(150)), a + ms(200));
    assert_eq!(nearest_round(a, ms(100), a + ms(200)), a + ms(200));
    assert_eq!(nearest_round(a, ms(100), a - ms(30)), a);
}

#[test]
fn next_round_counts_from_either_side_of_the_anchor() {
    let a = Instant::now() + ms(1000);
    assert_eq!(next_round(a, ms(100), a), a + ms(100));
    assert_eq!(next_round(a, ms(100), a + ms(150)), a + ms(200));
    assert_eq!(next_round(a, ms(100), a - ms(150)), a - ms(100));
    assert_eq!(next_round(a, ms(100), a - ms(100)), a);
    assert_eq!(next_round(a, ms(100), a - ms(1)), a);
}

#[test]
fn the_acceptor_never_pings_answers_pings_and_learns_the_rtt() {
    let t0 = Instant::now();
    let mut link = Link::new(t0, Role::Acceptor, link_cfg(t0));
    assert!(link.poll_transmit().is_none());
    assert_eq!(link.next_deadline(), Some(t0 + SILENCE), "silence only");
    let ping = Ping {
        seq: 4,
        ts_us: 123,
        rtt_us: 800,
    };
    link.on_frame(t0 + ms(10), Message::Ping(ping));
    assert_eq!(link.poll_transmit(), Some(Message::Pong(ping)));
    assert_eq!(link.rtt(), Some(Duration::from_micros(800)));
    // A ping without an RTT yet leaves the known one alone.
    link.on_frame(
        t0 + ms(20),
        Message::Ping(Ping {
            seq: 5,
            ts_us: 1,
            rtt_us: 0,
        }),
    );
    assert_eq!(link.rtt(), Some(Duration::from_micros(800)));
    for t in [100, 200, 300, 400] {
        link.on_timeout(t0 + ms(t));
    }
    link.poll_transmit(); // the pong of seq 5
    assert!(link.poll_transmit().is_none(), "no pings of its own");
}

#[test]
fn silence_closes_the_link_exactly_at_the_timeout_and_any_frame_defers_it() {
    let t0 = Instant::now();
    let mut link = Link::new(t0, Role::Acceptor, link_cfg(t0));
    // An application message counts as heard.
    let app = AppMessage {
        topic: "t".into(),
        payload: Bytes::from_static(b"x"),
    };
    link.on_frame(t0 + ms(100), Message::App(app.clone()));
    assert_eq!(link.poll_event(), Some(LinkEvent::App(app)));
    assert_eq!(link.last_heard(), t0 + ms(100));
    // Data a driver hands on itself counts the same.
    assert!(link.on_data(t0 + ms(50)));
    assert_eq!(link.last_heard(), t0 + ms(100), "never moves back");
    assert_eq!(link.next_deadline(), Some(t0 + ms(100) + SILENCE));
    link.on_timeout(t0 + ms(100) + SILENCE - Duration::from_nanos(1));
    assert!(link.poll_event().is_none() && !link.is_closed());
    link.on_timeout(t0 + ms(100) + SILENCE);
    let reason = CloseReason::Silent(SILENCE);
    assert_eq!(link.poll_event(), Some(LinkEvent::Closed(reason.clone())));
    assert_eq!(link.close_reason(), Some(&reason));
    assert!(!reason.is_graceful() && !reason.is_goodbye());
    assert_eq!(reason.to_string(), "silent for 450ms");
    // Closed: no more deadlines, events or input.
    assert_eq!(link.next_deadline(), None);
    assert!(
        !link.on_data(t0 + ms(600)),
        "data after the close is dropped"
    );
    link.on_frame(t0 + ms(600), Message::Peers(PeerList::default()));
    assert!(link.poll_event().is_none());
}

/// An acceptor's silence deadline moves with every ping it hears: its
/// driver is woken on the ping rounds (when it is awake anyway), and only
/// a deadline that really comes is met at its own instant.
#[test]
fn an_acceptor_is_woken_on_the_rounds_and_at_a_silence_that_comes() {
    let t0 = Instant::now();
    // Rounds at t0 + 20 + k * 100 ms; the dialer's pings arrive 3 ms after.
    let anchor = t0 + ms(20);
    let mut link = Link::new(t0, Role::Acceptor, link_cfg(anchor));
    // Silence due at t0 + 450: the last round before it.
    assert_eq!(link.next_wake(t0), Some(t0 + ms(420)));
    let ping = Ping {
        seq: 1,
        ts_us: 1,
        rtt_us: 500,
    };
    let mut now = t0;
    for k in 0..20u64 {
        let heard = anchor + ms(100 * k + 3);
        link.on_frame(heard, Message::Ping(ping));
        while link.poll_transmit().is_some() {}
        now = heard;
        let wake = link.next_wake(now).expect("open");
        assert!(wake > now, "{k}");
        assert_eq!(
            wake.duration_since(anchor).as_millis() % 100,
            0,
            "on a round: {k}"
        );
        assert!(wake <= now + SILENCE, "{k}");
    }
    // The pings stop: one look on the last round before the deadline,
    // then the deadline itself, met exactly.
    let due = now + SILENCE;
    let round = link.next_wake(now).expect("open");
    assert!(round < due && due - round < PING);
    link.on_timeout(round);
    assert!(!link.is_closed(), "early look");
    assert_eq!(link.next_wake(round), Some(due));
    link.on_timeout(due);
    assert!(link.is_closed());
    assert_eq!(link.next_wake(due), None);
}

#[test]
fn a_timer_that_fires_far_too_late_reads_the_socket_before_judging_silence() {
    let t0 = Instant::now();
    let mut link = Link::new(t0, Role::Acceptor, link_cfg(t0));
    assert_eq!(link.next_deadline(), Some(t0 + SILENCE));
    // The process was stopped for 3 s: its timer fires long past the deadline.
    let woke = t0 + ms(3000);
    link.on_timeout(woke);
    assert!(!link.is_closed(), "our lateness is not the peer's silence");
    assert_eq!(link.next_deadline(), Some(woke + SILENCE / 2));
    // The frames waiting in the socket arrive: the link lives on.
    link.on_frame(woke + ms(1), Message::Peers(PeerList::default()));
    assert!(matches!(link.poll_event(), Some(LinkEvent::Peers(_))));
    link.on_timeout(woke + SILENCE / 2);
    assert!(!link.is_closed());
    // A peer that really is silent is judged once the grace is over.
    let mut other = Link::new(t0, Role::Acceptor, link_cfg(t0));
    other.on_timeout(woke);
    other.on_timeout(woke + SILENCE / 2);
    assert_eq!(
        other.poll_event(),
        Some(LinkEvent::Closed(CloseReason::Silent(SILENCE)))
    );
}

#[test]
fn a_dialer_whose_pongs_stop_closes_after_the_timeout_despite_pinging() {
    let t0 = Instant::now();
    let mut link = Link::new(t0, Role::Dialer, link_cfg(t0));
    let mut t = t0;
    while let Some(deadline) = link.next_deadline() {
        assert!(deadline > t || deadline == t0, "deadlines move forward");
        t = deadline;
        link.on_timeout(t);
        while link.poll_transmit().is_some() {}
    }
    // Pings at 100, 200, 300, 400 ms; silent since t0.
    assert_eq!(t, t0 + SILENCE);
    assert_eq!(
        link.poll_event(),
        Some(LinkEvent::Closed(CloseReason::Silent(SILENCE)))
    );
}

#[test]
fn close_reasons_are_typed_and_say_what_they_mean() {
    let t0 = Instant::now();
    let cases: Vec<(Message, CloseReason, bool, bool)> = vec![
        (
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Shutdown,
            }),
            CloseReason::Goodbye(GoodbyeReason::Shutdown),
            true,
            true,
        ),
        (
            LocalClose::Duplicate.farewell().unwrap(),
            CloseReason::Rejected {
                code: RejectCode::Duplicate,
                detail: "a link between these nodes already exists".into(),
            },
            true,
            false,
        ),
        (
            Message::Reject(Reject {
                code: "future".into(),
                detail: "why".into(),
            }),
            CloseReason::Rejected {
                code: RejectCode::Other("future".into()),
                detail: "why".into(),
            },
            false,
            false,
        ),
        (
            Message::Hello(hello(9, "x")),
            CloseReason::UnexpectedHandshake,
            false,
            false,
        ),
    ];
    for (frame, reason, graceful, goodbye) in cases {
        let mut link = Link::new(t0, Role::Acceptor, link_cfg(t0));
        link.on_frame(t0 + ms(1), frame);
        assert_eq!(link.poll_event(), Some(LinkEvent::Closed(reason.clone())));
        assert_eq!(
            (reason.is_graceful(), reason.is_goodbye()),
            (graceful, goodbye)
        );
        assert_eq!(link.last_heard(), t0 + ms(1), "heard, even when closing");
    }
    assert_eq!(
        CloseReason::UnexpectedHandshake.drop_reason(),
        Some("handshake_after_handshake")
    );
    assert_eq!(
        CloseReason::Goodbye(GoodbyeReason::Shutdown).to_string(),
        "goodbye: shutdown"
    );

    // Stream failures.
    let mut link = Link::new(t0, Role::Dialer, link_cfg(t0));
    link.on_error(t0, &crate::frame::FrameError::AuthFailed);
    let Some(LinkEvent::Closed(r)) = link.poll_event() else {
        panic!("not closed")
    };
    assert_eq!(r.drop_reason(), Some("auth"));
    let mut link = Link::new(t0, Role::Dialer, link_cfg(t0));
    link.on_error(
        t0,
        &crate::frame::FrameError::Io(std::io::ErrorKind::ConnectionReset.into()),
    );
    assert!(matches!(
        link.poll_event(),
        Some(LinkEvent::Closed(CloseReason::Io(_)))
    ));
    let mut link = Link::new(t0, Role::Dialer, link_cfg(t0));
    link.on_eof(t0);
    assert_eq!(link.poll_event(), Some(LinkEvent::Closed(CloseReason::Eof)));

    // Closing from this side queues the farewell, once.
    let mut link = Link::new(t0, Role::Acceptor, link_cfg(t0));
    link.close(t0, LocalClose::Shutdown);
    link.close(t0, LocalClose::Duplicate);
    assert!(matches!(link.poll_transmit(), Some(Message::Goodbye(_))));
    assert!(link.poll_transmit().is_none());
    assert_eq!(
        link.poll_event(),
        Some(LinkEvent::Closed(CloseReason::Local(LocalClose::Shutdown)))
    );
    assert!(LocalClose::Stalled.farewell().is_none());
}

/// Two established links joined by a wire with a fixed one-way delay,
/// stepped in virtual time: the measured RTT is twice the delay, both ends
/// know it, and neither ever closes.
#[test]
fn a_simulated_pair_measures_the_rtt_on_both_ends_and_stays_up() {
    let t0 = Instant::now();
    let delay = ms(7);
    let mut d = Link::new(t0, Role::Dialer, link_cfg(t0));
    let mut a = Link::new(t0, Role::Acceptor, link_cfg(t0));
    // (arrival time, to the acceptor?, frame)
    let mut wire: Vec<(Instant, bool, Message)> = Vec::new();
    let mut now = t0;
    let end = t0 + Duration::from_secs(5);
    while now < end {
        while let Some(m) = d.poll_transmit() {
            wire.push((now + delay, true, m));
        }
        while let Some(m) = a.poll_transmit() {
            wire.push((now + delay, false, m));
        }
        let next_arrival = wire.iter().map(|(t, ..)| *t).min();
        let next = [next_arrival, d.next_deadline(), a.next_deadline()]
            .into_iter()
            .flatten()
            .min()
            .expect("something is always due");
        now = next;
        let (due, later): (Vec<_>, Vec<_>) = wire.drain(..).partition(|(t, ..)| *t <= now);
        wire = later;
        for (_, to_acceptor, m) in due {
            if to_acceptor {
                a.on_frame(now, m)
            } else {
                d.on_frame(now, m)
            }
        }
        d.on_timeout(now);
        a.on_timeout(now);
        assert!(d.poll_event().is_none() && a.poll_event().is_none());
    }
    assert_eq!(d.rtt(), Some(2 * delay));
    assert_eq!(a.rtt(), Some(2 * delay));
}

proptest::proptest! {
    /// Whatever arrives, in whatever pieces, either end of either mode
    /// finishes, waits or fails with a typed error; never a panic, and the
    /// end of the stream always ends the handshake.
    #[test]
    fn arbitrary_bytes_never_panic_a_handshake(
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        mode in 0u8..4,
        chunk in 1usize..64,
    ) {
        let key = Key::from_bytes([7; 32]);
        let ring = [&key];
        let keys: Option<&[&Key]> = (mode & 1 == 1).then_some(&ring[..]);
        let t0 = Instant::now();
        let c = cfg(hello(2, "a"), keys);
        let mut hs = if mode & 2 == 2 { Handshake::dial(t0, c) } else { Handshake::accept(t0, c) };
        let mut buf = BytesMut::new();
        let mut done = false;
        for piece in data.chunks(chunk) {
            while hs.poll_transmit().is_some() {}
            buf.extend_from_slice(piece);
            hs.on_bytes(t0, &mut buf);
            if hs.poll_outcome().is_some() {
                done = true;
                break;
            }
        }
        if !done {
            hs.on_eof(t0);
            while hs.poll_transmit().is_some() {}
            proptest::prop_assert!(hs.poll_outcome().is_some());
        }
    }
}

proptest::proptest! {
    /// A real first message with one byte changed, or cut short, at an
    /// acceptor of either mode: refused with a typed error (or waiting for
    /// more), never a panic, never a link.
    #[test]
    fn a_damaged_hello_is_refused_not_a_panic(
        secured in proptest::prelude::any::<bool>(),
        at in proptest::prelude::any::<proptest::sample::Index>(),
        flip in 1u8..=255,
        cut in proptest::prelude::any::<bool>(),
    ) {
        let key = Key::from_bytes([7; 32]);
        let ring = [&key];
        let keys: Option<&[&Key]> = secured.then_some(&ring[..]);
        let t0 = Instant::now();
        let mut d = Handshake::dial(t0, cfg(hello(1, "d"), keys));
        let mut wire = BytesMut::from(&d.poll_transmit().unwrap()[..]);
        let i = at.index(wire.len());
        if cut {
            wire.truncate(i);
        } else {
            wire[i] ^= flip;
        }
        let mut a = Handshake::accept(t0, cfg(hello(2, "a"), keys));
        a.on_bytes(t0, &mut wire);
        a.on_eof(t0);
        while a.poll_transmit().is_some() {}
        match a.poll_outcome() {
            // A plaintext hello has no integrity: a changed byte may still
            // be a hello (of another id, say). A sealed one never survives.
            Some(Ok(_)) => proptest::prop_assert!(!secured),
            Some(Err(_)) => {}
            None => proptest::prop_assert!(false, "no outcome after the end of the stream"),
        }
    }
}

/// A link closed here as a duplicate still hands on what the peer sent
/// before our reject reached it (another link carries on, and the peer
/// never resends it); pings go unanswered. Any other close drops it all.
#[test]
fn a_link_closed_as_a_duplicate_hands_on_the_peers_data_frames() {
    let t0 = Instant::now();
    let list = PeerList { peers: Vec::new() };
    for (why, hands_on) in [
        (LocalClose::Duplicate, true),
        (LocalClose::NotNeighbour, false),
        (LocalClose::Shutdown, false),
    ] {
        let mut link = Link::new(t0, Role::Acceptor, link_cfg(t0));
        link.close(t0, why);
        while link.poll_transmit().is_some() {}
        assert!(matches!(link.poll_event(), Some(LinkEvent::Closed(_))));
        assert_eq!(link.hands_on(), hands_on, "{why:?}");
        link.on_frame(t0, Message::Ping(Ping::default()));
        link.on_frame(t0, Message::Peers(list.clone()));
        assert_eq!(link.on_data(t0), hands_on, "{why:?}");
        assert!(
            link.poll_transmit().is_none(),
            "{why:?}: no pong once closed"
        );
        let expected = hands_on.then(|| LinkEvent::Peers(list.clone()));
        assert_eq!(link.poll_event(), expected, "{why:?}");
        assert_eq!(link.poll_event(), None);
    }
}
