//! The authenticated decoders, on any bytes: sealed beacons (before and
//! after authentication), secured link frames and the first Noise message.
//! None may panic; a forged datagram must never authenticate.
#![no_main]

use bytes::BytesMut;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use libfuzzer_sys::fuzz_target;
use proto::beacon::{seal_envelope, BeaconError, FLAG_SEALED, HEADER_LEN};
use proto::secure::{open_beacon, FrameCipher, Key, Keyring, Responder};
use proto::FrameCodec;
use tokio_util::codec::Decoder;

const KEY: [u8; 32] = [7u8; 32];

fuzz_target!(|data: &[u8]| {
    let ring = Keyring::new(vec![Key::from_bytes(KEY)]).expect("one key");

    // 1. Raw bytes as a datagram: a forgery never authenticates.
    match open_beacon(&ring, data) {
        Ok(_) => panic!("forged datagram authenticated"),
        Err(BeaconError::Replayed | BeaconError::Stale { .. }) => unreachable!(),
        Err(_) => {}
    }

    // 2. The same bytes as an authentic plaintext (send time + body): the
    //    decoder behind authentication must not panic either.
    let mut body = data.to_vec();
    if let Ok(probe) = seal_envelope(FLAG_SEALED, &body, &[0u8; 40]) {
        let aead = XChaCha20Poly1305::new(&KEY.into());
        let nonce = [1u8; 24];
        let tag = aead
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &probe[..HEADER_LEN], &mut body)
            .expect("seal");
        let mut trailer = nonce.to_vec();
        trailer.extend_from_slice(&tag);
        let datagram = seal_envelope(FLAG_SEALED, &body, &trailer).expect("same size");
        if let Err(e) = open_beacon(&ring, &datagram) {
            assert!(!matches!(e, BeaconError::AuthFailed), "authentic datagram refused");
        }
    }

    // 3. A secured link's byte stream.
    let mut codec = FrameCodec::secured(64 * 1024, FrameCipher::from_raw_key(KEY));
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}

    // 4. The first handshake message.
    let _ = Responder::read(&ring, data);
});
