//! Prints a real beacon and a real frame as hex dumps (used for PROTOCOL.md).

use bytes::BytesMut;
use proto::beacon::{Beacon, BeaconKind};
use proto::frame::{AppMessage, FrameCodec, Message, PeerList, PeerRecord};
use proto::NodeId;
use tokio_util::codec::Encoder;

fn dump(bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
            .collect();
        println!("{:04x}  {:<48}  {text}", i * 16, hex.join(" "));
    }
}

fn main() {
    let beacon = Beacon {
        cluster: "default".into(),
        id: NodeId(0x3f2a_9c41_0b7e_4d2f_8a61_5c3e_9d0f_1b27),
        incarnation: 1_795_642_108_031,
        name: "node1".into(),
        addr: "192.0.2.10:6777".parse().expect("addr"),
        kind: BeaconKind::Announce,
        digest: 0,
    };
    let bytes = beacon.encode().expect("beacon");
    println!("beacon ({} bytes):", bytes.len());
    dump(&bytes);
    let mut out = BytesMut::new();
    let msg = Message::App(AppMessage {
        topic: "greet".into(),
        payload: bytes::Bytes::from_static(b"hello"),
    });
    FrameCodec::default().encode(msg, &mut out).expect("frame");
    println!("\nframe ({} bytes):", out.len());
    dump(&out);
    // Membership over links: one record of the push-pull (or of a change),
    // then a runtime tag change (the node's own record, tags version 1).
    for (title, role, tags_version) in [("peers frame", "db", 0), ("tags change", "web", 1)] {
        let mut out = BytesMut::new();
        let msg = Message::Peers(PeerList {
            peers: vec![PeerRecord {
                id: NodeId(0x5d1c_0a3e_77b2_4e19_a0c4_6f3d_2b81_9e05),
                incarnation: 1_795_642_109_412,
                name: "node2".into(),
                addr: "192.0.2.11:6777".parse().expect("addr"),
                state: "alive".into(),
                age_ms: None,
                tags: [("role".to_string(), role.to_string())]
                    .into_iter()
                    .collect(),
                tags_version,
                by: None,
            }],
        });
        FrameCodec::default().encode(msg, &mut out).expect("frame");
        println!("\n{title} ({} bytes):", out.len());
        dump(&out);
    }
    // A query and its answer.
    let origin = NodeId(0x3f2a_9c41_0b7e_4d2f_8a61_5c3e_9d0f_1b27);
    let mut out = BytesMut::new();
    let msg = Message::Query(proto::query::Query {
        origin,
        origin_name: "node1".into(),
        id: 1,
        name: "load".into(),
        payload: bytes::Bytes::from_static(b"now"),
        filter: proto::query::Filter {
            nodes: vec![],
            tags: vec![("role".into(), "db".into())],
        },
        timeout_ms: 1000,
        ttl: 0,
    });
    FrameCodec::default().encode(msg, &mut out).expect("frame");
    println!("\nquery ({} bytes):", out.len());
    dump(&out);
    let mut out = BytesMut::new();
    let msg = Message::QueryResponse(proto::query::QueryResponse {
        origin,
        id: 1,
        from: NodeId(0x5d1c_0a3e_77b2_4e19_a0c4_6f3d_2b81_9e05),
        from_name: "node2".into(),
        kind: proto::query::ResponseKind::Answer,
        payload: bytes::Bytes::from_static(b"0.25"),
        ttl: 255,
    });
    FrameCodec::default().encode(msg, &mut out).expect("frame");
    println!("\nquery response ({} bytes):", out.len());
    dump(&out);
}
