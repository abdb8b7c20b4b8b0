use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use super::*;
use crate::beacon::tests::{arb_beacon, sample};
use crate::beacon::BeaconKind;
use crate::frame::tests::{arb_message, hello, topic_stream};
use crate::frame::{AppMessage, FrameCodec, FrameError, Message, DEFAULT_MAX_FRAME};

const NOW: u64 = 1_764_000_000_000;

fn ring(keys: &[&Key]) -> Keyring {
    Keyring::new(keys.iter().map(|k| (*k).clone()).collect()).unwrap()
}

fn sealed(key: &Key, sent_ms: u64) -> Bytes {
    seal_beacon(key, &sample(BeaconKind::Announce), sent_ms, [7u8; 24]).unwrap()
}

#[test]
fn key_base64_round_trips_and_debug_hides_it() {
    let k = Key::generate();
    let b64 = k.to_base64();
    assert_eq!(Key::from_base64(&format!("  {b64}\n")).unwrap(), k);
    assert_eq!(Key::from_base64(b64.trim_end_matches('=')).unwrap(), k);
    assert_eq!(k.fingerprint().len(), 16);
    assert!(!format!("{k:?}").contains(&b64));
    assert!(format!("{k:?}").contains(&k.fingerprint()));
    assert!(matches!(
        Key::from_base64("c2hvcnQ="),
        Err(KeyError::Invalid(_))
    ));
    assert!(matches!(
        Key::from_base64("not base64!"),
        Err(KeyError::Invalid(_))
    ));
    assert_ne!(Key::generate(), k);
}

#[test]
fn keyring_install_use_remove() {
    let (a, b) = (Key::generate(), Key::generate());
    let mut r = ring(&[&a]);
    assert_eq!(r.install(b.clone()), Ok(true));
    assert_eq!(r.install(b.clone()), Ok(false));
    assert_eq!(r.primary(), &a);
    // `use` by fingerprint, `remove` by key.
    r.use_key(&b.fingerprint()).unwrap();
    assert_eq!(r.primary(), &b);
    assert!(matches!(
        r.remove(&b.to_base64()),
        Err(KeyError::Primary(_))
    ));
    r.remove(&a.to_base64()).unwrap();
    assert_eq!(r.keys(), std::slice::from_ref(&b));
    let err = r.remove(&a.to_base64()).unwrap_err();
    assert!(matches!(err, KeyError::NotInstalled(_)));
    assert!(
        !err.to_string().contains(&a.to_base64()),
        "errors never echo a key: {err}"
    );
    assert_eq!(
        r.list(),
        vec![KeyInfo {
            fingerprint: b.fingerprint(),
            primary: true
        }]
    );
}

#[test]
fn keyring_file_round_trips_and_refuses_bad_lines() {
    let (a, b) = (Key::generate(), Key::generate());
    let r = ring(&[&a, &b]);
    assert_eq!(Keyring::parse(&r.to_file()).unwrap(), r);
    let text = format!("# comment\n\n{}\n  {}  \n", a.to_base64(), b.to_base64());
    assert_eq!(Keyring::parse(&text).unwrap(), r);
    assert_eq!(Keyring::parse("# nothing\n"), Err(KeyError::Empty));
    assert!(matches!(
        Keyring::parse("AAAA\n"),
        Err(KeyError::Invalid(_))
    ));
    let many: Vec<Key> = (0..=MAX_KEYS).map(|_| Key::generate()).collect();
    assert_eq!(Keyring::new(many), Err(KeyError::Full));
}

#[test]
fn sealed_beacon_opens_with_any_installed_key_and_hides_its_body() {
    let (a, b) = (Key::generate(), Key::generate());
    let d = sealed(&b, NOW);
    let (beacon, sent) = open_beacon(&ring(&[&a, &b]), &d).unwrap();
    assert_eq!(beacon, sample(BeaconKind::Announce));
    assert_eq!(sent, NOW);
    // Name and cluster are not on the wire in clear.
    let hay = String::from_utf8_lossy(&d);
    assert!(!hay.contains("node1") && !hay.contains("default"), "{hay}");
}

#[test]
fn wrong_key_unsealed_and_unknown_sealed_are_typed_drops() {
    let (a, b) = (Key::generate(), Key::generate());
    let err = open_beacon(&ring(&[&a]), &sealed(&b, NOW)).unwrap_err();
    assert_eq!(err.reason(), "auth");
    let plain = sample(BeaconKind::Announce).encode().unwrap();
    let err = open_beacon(&ring(&[&a]), &plain).unwrap_err();
    assert_eq!(err.reason(), "security_mismatch");
    // And the other way round: a node without a secret.
    let err = Beacon::decode(&sealed(&a, NOW)).unwrap_err();
    assert_eq!(err.reason(), "security_mismatch");
}

#[test]
fn any_single_flipped_byte_is_dropped() {
    let k = Key::generate();
    let r = ring(&[&k]);
    let d = sealed(&k, NOW);
    for i in 0..d.len() {
        for bit in [0x01u8, 0x80] {
            let mut v = d.to_vec();
            v[i] ^= bit;
            assert!(
                open_beacon(&r, &v).is_err(),
                "flip {bit:#x} at byte {i} accepted"
            );
        }
    }
}

#[test]
fn replay_guard_refuses_repeats_old_and_stale() {
    let id = NodeId(42);
    let mut g = ReplayGuard::new(30_000);
    g.check(id, NOW, NOW).unwrap();
    assert!(matches!(
        g.check(id, NOW, NOW + 5),
        Err(BeaconError::Replayed)
    ));
    assert!(matches!(
        g.check(id, NOW - 1, NOW + 5),
        Err(BeaconError::Replayed)
    ));
    g.check(id, NOW + 1, NOW + 5).unwrap();
    // Another node has its own sequence.
    g.check(NodeId(43), NOW, NOW + 5).unwrap();
    let err = g.check(NodeId(44), NOW - 31_000, NOW).unwrap_err();
    assert_eq!(err.reason(), "replay_window");
    let err = g.check(NodeId(44), NOW + 31_000, NOW).unwrap_err();
    assert_eq!(err.reason(), "replay_window");
}

#[test]
fn replay_guard_forgets_only_what_the_window_already_refuses() {
    let mut g = ReplayGuard::new(1_000);
    for i in 0..2048u64 {
        g.check(NodeId(i as u128), NOW + i * 10, NOW + i * 10)
            .unwrap();
    }
    assert!(g.last.len() < 2048, "pruned: {}", g.last.len());
    // A replay of a pruned entry is stale anyway.
    assert!(g.check(NodeId(0), NOW, NOW + 20_470).is_err());
}

#[test]
fn send_clock_never_repeats() {
    let mut c = SendClock::default();
    assert_eq!(c.stamp(NOW), NOW);
    assert_eq!(c.stamp(NOW), NOW + 1);
    assert_eq!(c.stamp(NOW - 50), NOW + 2);
    assert_eq!(c.stamp(NOW + 10), NOW + 10);
}

/// Runs a full link handshake; returns (dialer ciphers, acceptor ciphers).
fn handshake(
    dialer: &Key,
    acceptor: &Keyring,
) -> Result<(LinkCiphers, LinkCiphers), LinkSecurityError> {
    let hello_payload = Message::Hello(hello()).to_payload().unwrap();
    let (init, m1) = Initiator::start(dialer, &hello_payload)?;
    let (resp, got) = Responder::read(acceptor, &m1)?;
    assert_eq!(
        Message::from_payload(&got).unwrap(),
        Message::Hello(hello())
    );
    let welcome = Message::Welcome(hello()).to_payload().unwrap();
    let (m2, acc) = resp.finish(&welcome)?;
    let (got, dial) = init.finish(&m2)?;
    assert_eq!(got, welcome);
    Ok((dial, acc))
}

/// A secured link's decoder remembers topics as a plain one does, and
/// never hands one to the wrong message.
#[test]
fn a_secured_stream_of_changing_topics_decodes_as_sent() {
    let k = Key::generate();
    let (dial, acc) = handshake(&k, &ring(&[&k])).unwrap();
    let mut out = FrameCodec::secured(DEFAULT_MAX_FRAME, dial.send);
    let mut inn = FrameCodec::secured(DEFAULT_MAX_FRAME, acc.recv);
    let mut buf = BytesMut::new();
    out.encode(topic_stream(), &mut buf).unwrap();
    let mut got = Vec::new();
    while let Some(m) = inn.decode(&mut buf).unwrap() {
        got.push(m);
    }
    assert_eq!(got, topic_stream());
}

#[test]
fn link_handshake_secures_frames_both_ways() {
    let (a, b) = (Key::generate(), Key::generate());
    // The acceptor holds both keys; the dialer sends with its second.
    let (dial, acc) = handshake(&b, &ring(&[&a, &b])).unwrap();
    let mut out = FrameCodec::secured(DEFAULT_MAX_FRAME, dial.send);
    let mut inn = FrameCodec::secured(DEFAULT_MAX_FRAME, acc.recv);
    let mut back_out = FrameCodec::secured(DEFAULT_MAX_FRAME, acc.send);
    let mut back_in = FrameCodec::secured(DEFAULT_MAX_FRAME, dial.recv);
    let msg = Message::App(AppMessage {
        topic: "t".into(),
        payload: Bytes::from_static(b"secret payload"),
    });
    let mut wire = BytesMut::new();
    for _ in 0..3 {
        out.encode(msg.clone(), &mut wire).unwrap();
    }
    assert!(!String::from_utf8_lossy(&wire).contains("secret payload"));
    for _ in 0..3 {
        assert_eq!(inn.decode(&mut wire).unwrap(), Some(msg.clone()));
    }
    back_out.encode(msg.clone(), &mut wire).unwrap();
    assert_eq!(back_in.decode(&mut wire).unwrap(), Some(msg));
}

#[test]
fn link_handshake_with_a_foreign_key_fails() {
    let (a, b) = (Key::generate(), Key::generate());
    let err = handshake(&a, &ring(&[&b])).unwrap_err();
    assert_eq!(err.reason(), "auth");
}

#[test]
fn each_link_gets_fresh_keys() {
    let k = Key::generate();
    let (mut d1, _) = handshake(&k, &ring(&[&k])).unwrap();
    let (mut d2, _) = handshake(&k, &ring(&[&k])).unwrap();
    let (mut x, mut y) = (*b"same", *b"same");
    d1.send.seal(b"h", &mut x);
    d2.send.seal(b"h", &mut y);
    assert_ne!(x, y);
}

#[test]
fn secured_codec_refuses_tampering_plaintext_and_reordering() {
    let k = Key::generate();
    let msg = Message::Hello(hello());
    // Any flipped byte after the length prefix.
    let (dial, _) = handshake(&k, &ring(&[&k])).unwrap();
    let mut out = FrameCodec::secured(DEFAULT_MAX_FRAME, dial.send);
    let mut wire = BytesMut::new();
    out.encode(msg.clone(), &mut wire).unwrap();
    for i in 4..wire.len() {
        let (d, a) = handshake(&k, &ring(&[&k])).unwrap();
        let mut out = FrameCodec::secured(DEFAULT_MAX_FRAME, d.send);
        let mut inn = FrameCodec::secured(DEFAULT_MAX_FRAME, a.recv);
        let mut w = BytesMut::new();
        out.encode(msg.clone(), &mut w).unwrap();
        w[i] ^= 0x01;
        assert!(inn.decode(&mut w).is_err(), "flip at {i} accepted");
    }
    // Plaintext on a secured link.
    let (_, a) = handshake(&k, &ring(&[&k])).unwrap();
    let mut inn = FrameCodec::secured(DEFAULT_MAX_FRAME, a.recv);
    let mut w = BytesMut::new();
    FrameCodec::default().encode(msg.clone(), &mut w).unwrap();
    assert!(matches!(inn.decode(&mut w), Err(FrameError::Plaintext)));
    // Frames replayed or reordered within a link fail the counter nonce.
    let (d, a) = handshake(&k, &ring(&[&k])).unwrap();
    let mut out = FrameCodec::secured(DEFAULT_MAX_FRAME, d.send);
    let mut inn = FrameCodec::secured(DEFAULT_MAX_FRAME, a.recv);
    let mut first = BytesMut::new();
    out.encode(msg.clone(), &mut first).unwrap();
    let mut copy = first.clone();
    assert!(inn.decode(&mut first).unwrap().is_some());
    assert!(matches!(inn.decode(&mut copy), Err(FrameError::AuthFailed)));
    // A secured frame on a link without a secret.
    let (d, _) = handshake(&k, &ring(&[&k])).unwrap();
    let mut w = BytesMut::new();
    FrameCodec::secured(DEFAULT_MAX_FRAME, d.send)
        .encode(msg, &mut w)
        .unwrap();
    let err = FrameCodec::default().decode(&mut w).unwrap_err();
    assert_eq!(err.reason(), "security_mismatch");
}

#[test]
fn secured_frames_keep_the_size_limit() {
    let k = Key::generate();
    let (d, _) = handshake(&k, &ring(&[&k])).unwrap();
    let mut out = FrameCodec::secured(64, d.send);
    let msg = Message::App(AppMessage {
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 64]),
    });
    let mut w = BytesMut::new();
    assert!(matches!(
        out.encode(msg, &mut w),
        Err(FrameError::TooLarge { .. })
    ));
    // A record may carry a batch of small frames, but never more than a
    // record's worth plus one maximal frame.
    let mut w = BytesMut::new();
    w.put_u32((crate::frame::RECORD_TARGET + 64 + 64) as u32);
    assert!(matches!(
        FrameCodec::secured(64, handshake(&k, &ring(&[&k])).unwrap().1.recv).decode(&mut w),
        Err(FrameError::TooLarge { .. })
    ));
}

proptest! {
    /// The interval is sealed with the beacon, and absent stays absent.
    #[test]
    fn sealed_beacons_carry_their_extensions(b in arb_beacon(), ivl in proptest::option::of(1u64..86_400_000), sent in any::<u64>()) {
        let k = Key::from_bytes([9u8; 32]);
        let ext = crate::beacon::Extensions { interval: ivl.map(std::time::Duration::from_millis) };
        if let Ok(d) = seal_beacon_with(&k, &b, &ext, sent, [3u8; 24]) {
            prop_assert_eq!(open_beacon_with(&ring(&[&k]), &d).unwrap(), (b.clone(), ext, sent));
            prop_assert_eq!(open_beacon(&ring(&[&k]), &d).unwrap(), (b, sent));
        }
    }

    #[test]
    fn sealed_beacons_round_trip(b in arb_beacon(), sent in any::<u64>(), nonce in any::<[u8; 24]>()) {
        let k = Key::from_bytes([9u8; 32]);
        if let Ok(d) = seal_beacon(&k, &b, sent, nonce) {
            prop_assert!(d.len() <= crate::beacon::MAX_BEACON);
            prop_assert_eq!(open_beacon(&ring(&[&k]), &d).unwrap(), (b, sent));
        }
    }

    #[test]
    fn open_beacon_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
        let k = Key::from_bytes([9u8; 32]);
        let _ = open_beacon(&ring(&[&k]), &bytes);
    }

    #[test]
    fn secured_codec_round_trips_any_message(m in arb_message()) {
        let k = Key::from_bytes([3u8; 32]);
        let (d, a) = handshake(&k, &ring(&[&k])).unwrap();
        let mut w = BytesMut::new();
        FrameCodec::secured(DEFAULT_MAX_FRAME, d.send).encode(m.clone(), &mut w).unwrap();
        prop_assert_eq!(FrameCodec::secured(DEFAULT_MAX_FRAME, a.recv).decode(&mut w).unwrap(), Some(m));
    }

    #[test]
    fn secured_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let k = Key::from_bytes([3u8; 32]);
        let (_, a) = handshake(&k, &ring(&[&k])).unwrap();
        let mut codec = FrameCodec::secured(DEFAULT_MAX_FRAME, a.recv);
        let mut w = BytesMut::from(&bytes[..]);
        let _ = codec.decode(&mut w);
        let _ = Responder::read(&ring(&[&k]), &bytes);
    }
}

#[test]
fn a_batch_shares_records_and_arrives_whole_and_in_order() {
    let k = Key::generate();
    let (d, a) = handshake(&k, &ring(&[&k])).unwrap();
    let mut out = FrameCodec::secured(DEFAULT_MAX_FRAME, d.send);
    let mut inn = FrameCodec::secured(DEFAULT_MAX_FRAME, a.recv);
    let batch: Vec<Message> = (0..200u32)
        .map(|i| {
            Message::App(AppMessage {
                topic: format!("t{i}").into(),
                payload: Bytes::from(vec![i as u8; 1000]),
            })
        })
        .collect();
    let mut w = BytesMut::new();
    out.encode(batch.clone(), &mut w).unwrap();
    // 200 KB of frames: more than one record, far fewer than 200.
    let one = {
        let (d, _) = handshake(&k, &ring(&[&k])).unwrap();
        let mut c = FrameCodec::secured(DEFAULT_MAX_FRAME, d.send);
        let mut v = BytesMut::new();
        c.encode(batch[0].clone(), &mut v).unwrap();
        v.len()
    };
    assert!(
        w.len() < one * 200 - 16 * 150,
        "tags shared: {} vs {}",
        w.len(),
        one * 200
    );
    for m in &batch {
        assert_eq!(inn.decode(&mut w).unwrap().as_ref(), Some(m));
    }
    assert_eq!(inn.decode(&mut w).unwrap(), None);
    assert!(w.is_empty());
    // Then single messages go on from there.
    out.encode(batch[0].clone(), &mut w).unwrap();
    assert_eq!(inn.decode(&mut w).unwrap(), Some(batch[0].clone()));
}

#[test]
fn an_unencodable_message_spoils_no_sealed_bytes() {
    let k = Key::generate();
    let (d, _) = handshake(&k, &ring(&[&k])).unwrap();
    let mut out = FrameCodec::secured(4096, d.send);
    let ok = Message::App(AppMessage {
        topic: "t".into(),
        payload: Bytes::from_static(b"x"),
    });
    let big = Message::App(AppMessage {
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 8192]),
    });
    let mut w = BytesMut::new();
    assert!(out.encode(vec![ok, big], &mut w).is_err());
    assert!(w.is_empty(), "nothing half-sealed left in the buffer");
}
