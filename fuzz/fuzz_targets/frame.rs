//! Any byte stream: the frame decoder yields frames, asks for more, or
//! fails with a typed error; it never panics and never buffers past its limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::FrameCodec;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(64 * 1024);
    // Feed in two pieces to exercise the incomplete path too.
    let split = data.len() / 2;
    let mut buf = BytesMut::from(&data[..split]);
    let mut fed_rest = false;
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(msg)) => {
                let mut out = BytesMut::new();
                codec.encode(msg.clone(), &mut out).expect("a decoded frame re-encodes");
                assert_eq!(codec.decode(&mut out).expect("round trip"), Some(msg));
            }
            Ok(None) if !fed_rest => {
                buf.extend_from_slice(&data[split..]);
                fed_rest = true;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
