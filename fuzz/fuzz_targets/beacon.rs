//! Any datagram: the beacon decoder returns (a beacon or a typed error),
//! never panics, and always consumes the whole datagram.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::BeaconCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(beacon)) = BeaconCodec.decode(&mut buf) {
        // Whatever decodes must re-encode and decode to the same value.
        let again = beacon.encode().expect("a decoded beacon re-encodes");
        assert_eq!(proto::Beacon::decode(&again).expect("round trip"), beacon);
    }
    assert!(buf.is_empty(), "the datagram must be consumed");
});
