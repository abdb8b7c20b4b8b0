//! Any byte stream at either end of a link handshake, with or without a
//! cluster secret: the machine finishes, waits for more or fails with a
//! typed error; it never panics, and never consumes bytes past the
//! handshake.
#![no_main]

use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::frame::{Hello, VERSION};
use proto::link::{Handshake, HandshakeConfig};
use proto::secure::{Key, Keyring};
use proto::NodeId;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cfg = HandshakeConfig {
        local: Hello {
            protocol: VERSION,
            cluster: "fuzz".into(),
            id: NodeId(1),
            incarnation: 1,
            name: "fuzz".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            tags: Default::default(),
        },
        keyring: (mode & 1 == 1).then(|| Keyring::new(vec![Key::from_bytes([7; 32])]).unwrap()),
        max_frame: 64 * 1024,
        timeout: Duration::from_secs(2),
    };
    let t0 = Instant::now();
    let mut hs = if mode & 2 == 2 {
        Handshake::dial(t0, cfg)
    } else {
        Handshake::accept(t0, cfg)
    };
    // Feed in chunks of a size the input chooses, to exercise partial input.
    let chunk = usize::from(mode >> 2).max(1);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        while hs.poll_transmit().is_some() {}
        buf.extend_from_slice(piece);
        let before = buf.len();
        hs.on_bytes(t0, &mut buf);
        assert!(buf.len() <= before);
        if hs.poll_outcome().is_some() {
            return;
        }
    }
    hs.on_eof(t0);
    while hs.poll_transmit().is_some() {}
    assert!(hs.poll_outcome().is_some(), "end of stream ends the handshake");
});
