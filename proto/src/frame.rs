//! TCP link frames.
//!
//! Layout (big-endian; details and a hex dump in `PROTOCOL.md`):
//!
//! ```text
//! length (4) | version (1) | flags (1) | kind (1) | msgpack body | [tag]
//! ```
//!
//! `length` counts every byte after itself and is checked against the
//! codec's maximum *before* anything is buffered ([`LengthDelimitedCodec`]
//! does that). Bodies are msgpack maps with named fields; unknown fields are
//! ignored. Unknown kinds and versions are typed errors. The tag (16 bytes,
//! present iff `flags` has [`FLAG_TAGGED`]) is reserved for the cluster-secret
//! mode, so that adding it changes no layout.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::id::{Incarnation, NodeId, Tags};
use crate::secure::{FrameCipher, TAG_LEN};
use crate::wire::addr_str;

/// The frame envelope version this crate speaks. Also the protocol version
/// carried in the handshake.
pub const VERSION: u8 = 1;
/// Default maximum frame length (after the length prefix): 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// Bytes between the length prefix and the body.
pub const FRAME_HEADER: usize = 3;
/// Flag: a 16-byte authentication tag ends the frame (cluster-secret mode).
pub const FLAG_TAGGED: u8 = 0x01;

/// First frame on a link, sent by the dialer; the acceptor answers with
/// [`Message::Welcome`] carrying its own identity, or [`Message::Reject`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the sender speaks.
    pub protocol: u8,
    /// Cluster name; a mismatch is rejected.
    pub cluster: String,
    /// Sender's node id.
    pub id: NodeId,
    /// Sender's incarnation.
    pub incarnation: Incarnation,
    /// Sender's human name.
    pub name: String,
    /// Address peers should dial to reach the sender.
    #[serde(with = "addr_str")]
    pub addr: SocketAddr,
    /// Sender's metadata.
    #[serde(default)]
    pub tags: Tags,
}

/// Keep-alive probe; the answer echoes it as [`Message::Pong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Sequence number, per link.
    pub seq: u64,
    /// Sender's clock in microseconds since the link started; only the sender
    /// interprets it (to compute the round-trip time from the echo).
    pub ts_us: u64,
}

/// One entry of a peer-list exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Peer id.
    pub id: NodeId,
    /// Peer incarnation as the sender knows it.
    pub incarnation: Incarnation,
    /// Peer name.
    pub name: String,
    /// Peer data address.
    #[serde(with = "addr_str")]
    pub addr: SocketAddr,
    /// Peer state as the sender sees it (`alive`, `failed`, `left`, ...), or
    /// `probe` in a request: "have you heard from this peer yourself?".
    pub state: String,
    /// How long ago the sender last heard from the peer *directly* (its own
    /// link or beacons, never hearsay), in milliseconds.
    #[serde(default)]
    pub age_ms: Option<u64>,
}

/// The sender's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerList {
    /// Known peers.
    pub peers: Vec<PeerRecord>,
}

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppMessage {
    /// Free-form topic.
    pub topic: String,
    /// Opaque payload (msgpack `bin`).
    pub payload: Bytes,
}

/// The sender is shutting down gracefully.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why, for logs.
    #[serde(default)]
    pub reason: String,
}

/// The handshake (or a later frame) was refused; the link closes after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Machine-readable reason (`cluster`, `version`, `self`, `duplicate`, ...).
    pub code: String,
    /// Human-readable explanation, logged by the other side.
    #[serde(default)]
    pub detail: String,
}

/// Every message that can travel on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Handshake from the dialer.
    Hello(Hello),
    /// Handshake answer from the acceptor.
    Welcome(Hello),
    /// Keep-alive probe.
    Ping(Ping),
    /// Keep-alive answer.
    Pong(Ping),
    /// Peer-table exchange.
    Peers(PeerList),
    /// Application payload.
    App(AppMessage),
    /// Graceful close.
    Goodbye(Goodbye),
    /// Refusal, then close.
    Reject(Reject),
}

impl Message {
    /// The kind byte on the wire.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Welcome(_) => 2,
            Message::Ping(_) => 3,
            Message::Pong(_) => 4,
            Message::Peers(_) => 5,
            Message::App(_) => 6,
            Message::Goodbye(_) => 7,
            Message::Reject(_) => 8,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Ping(_) => "ping",
            Message::Pong(_) => "pong",
            Message::Peers(_) => "peers",
            Message::App(_) => "app",
            Message::Goodbye(_) => "goodbye",
            Message::Reject(_) => "reject",
        }
    }

    /// This message as a handshake payload: its kind byte, then its body.
    pub fn to_payload(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = vec![self.kind()];
        out.extend(
            self.encode_body()
                .map_err(|e| FrameError::Encode(e.to_string()))?,
        );
        Ok(out)
    }

    /// Reads a handshake payload written by [`Message::to_payload`].
    pub fn from_payload(payload: &[u8]) -> Result<Self, FrameError> {
        match payload.split_first() {
            Some((kind, body)) => Self::decode_body(*kind, body),
            None => Err(FrameError::Truncated),
        }
    }

    fn encode_body(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        match self {
            Message::Hello(m) | Message::Welcome(m) => rmp_serde::to_vec_named(m),
            Message::Ping(m) | Message::Pong(m) => rmp_serde::to_vec_named(m),
            Message::Peers(m) => rmp_serde::to_vec_named(m),
            Message::App(m) => rmp_serde::to_vec_named(m),
            Message::Goodbye(m) => rmp_serde::to_vec_named(m),
            Message::Reject(m) => rmp_serde::to_vec_named(m),
        }
    }

    fn decode_body(kind: u8, body: &[u8]) -> Result<Self, FrameError> {
        fn de<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
            let mut rest = body;
            let v = T::deserialize(&mut rmp_serde::Deserializer::new(&mut rest))
                .map_err(|e| FrameError::Malformed(e.to_string()))?;
            if !rest.is_empty() {
                return Err(FrameError::Malformed(format!(
                    "{} bytes after the body map",
                    rest.len()
                )));
            }
            Ok(v)
        }
        Ok(match kind {
            1 => Message::Hello(de(body)?),
            2 => Message::Welcome(de(body)?),
            3 => Message::Ping(de(body)?),
            4 => Message::Pong(de(body)?),
            5 => Message::Peers(de(body)?),
            6 => Message::App(de(body)?),
            7 => Message::Goodbye(de(body)?),
            8 => Message::Reject(de(body)?),
            other => return Err(FrameError::UnknownKind(other)),
        })
    }
}

/// Why bytes on a link are not a frame. Every variant is fatal for the link
/// that produced it (the stream position is lost or untrusted) and leaves the
/// peer table untouched; the link driver closes the link and counts the
/// reason.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the configured maximum; nothing was buffered.
    #[error("frame exceeds the {max}-byte limit")]
    TooLarge {
        /// The configured maximum.
        max: usize,
    },
    /// Fewer than [`FRAME_HEADER`] bytes after the length prefix.
    #[error("frame too short for its header")]
    Truncated,
    /// A frame version this build does not speak.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// A kind byte this build does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A tagged frame on a link without a cluster secret.
    #[error("authenticated frame but this link has no cluster secret")]
    Tagged,
    /// A plaintext frame on a secured link: a node with a secret never
    /// accepts plaintext.
    #[error("plaintext frame on a secured link")]
    Plaintext,
    /// A tagged frame that the link's key does not open (tampering, or
    /// frames out of order).
    #[error("frame not authenticated by the link key")]
    AuthFailed,
    /// The body does not decode as the kind's msgpack map.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// Encoding failed.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The underlying stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// A short, stable label for drop counters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Truncated => "truncated",
            FrameError::UnsupportedVersion(_) => "version",
            FrameError::UnknownKind(_) => "unknown_kind",
            FrameError::Tagged | FrameError::Plaintext => "security_mismatch",
            FrameError::AuthFailed => "auth",
            FrameError::Malformed(_) => "malformed",
            FrameError::Encode(_) => "encode",
            FrameError::Io(_) => "io",
        }
    }
}

/// Checks a peer's handshake against ours (sans-IO): the answer to send is
/// `Welcome` on `Ok`, the returned [`Reject`] otherwise.
pub fn check_hello(local: &Hello, remote: &Hello) -> Result<(), Reject> {
    if remote.protocol != VERSION {
        return Err(Reject {
            code: "version".into(),
            detail: format!(
                "protocol {} is not supported (this node speaks {VERSION})",
                remote.protocol
            ),
        });
    }
    if remote.cluster != local.cluster {
        return Err(Reject {
            code: "cluster".into(),
            detail: format!(
                "cluster {:?} is not this node's cluster {:?}",
                remote.cluster, local.cluster
            ),
        });
    }
    if remote.id == local.id {
        return Err(Reject {
            code: "self".into(),
            detail: "a node cannot link to itself".into(),
        });
    }
    Ok(())
}

/// Length-delimited msgpack frames with an explicit maximum, for
/// `FramedRead`/`FramedWrite` over the halves of a TCP stream. On a secured
/// link each half's codec holds that direction's [`FrameCipher`]: every
/// frame is then tagged, its body encrypted with the 3-byte header as
/// associated data, and a plaintext frame is an error.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    max: usize,
    cipher: Option<FrameCipher>,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec refusing frames longer than `max` bytes (after the prefix).
    pub fn new(max: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(max)
            .new_codec();
        FrameCodec {
            inner,
            max,
            cipher: None,
        }
    }

    /// A codec for one direction of a secured link.
    pub fn secured(max: usize, cipher: FrameCipher) -> Self {
        FrameCodec {
            cipher: Some(cipher),
            ..Self::new(max)
        }
    }

    /// The configured maximum.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Decodes one complete frame (without the length prefix).
    pub fn decode_frame(frame: &[u8]) -> Result<Message, FrameError> {
        if frame.len() < FRAME_HEADER {
            return Err(FrameError::Truncated);
        }
        let mut hdr = &frame[..FRAME_HEADER];
        let version = hdr.get_u8();
        let flags = hdr.get_u8();
        let kind = hdr.get_u8();
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        if flags & FLAG_TAGGED != 0 {
            return Err(FrameError::Tagged);
        }
        Message::decode_body(kind, &frame[FRAME_HEADER..])
    }
}

/// Opens one whole frame of a secured link (without the length prefix).
fn open_frame(cipher: &mut FrameCipher, mut frame: BytesMut) -> Result<Message, FrameError> {
    if frame.len() < FRAME_HEADER {
        return Err(FrameError::Truncated);
    }
    let header: [u8; FRAME_HEADER] = [frame[0], frame[1], frame[2]];
    let [version, flags, kind] = header;
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    if flags & FLAG_TAGGED == 0 {
        return Err(FrameError::Plaintext);
    }
    if frame.len() < FRAME_HEADER + TAG_LEN {
        return Err(FrameError::Truncated);
    }
    let tag_at = frame.len() - TAG_LEN;
    let (body, tag) = frame[FRAME_HEADER..].split_at_mut(tag_at - FRAME_HEADER);
    if !cipher.open(&header, body, tag) {
        return Err(FrameError::AuthFailed);
    }
    Message::decode_body(kind, body)
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        match self.inner.decode(src) {
            Ok(Some(frame)) => match &mut self.cipher {
                None => Self::decode_frame(&frame).map(Some),
                Some(cipher) => open_frame(cipher, frame).map(Some),
            },
            Ok(None) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(FrameError::TooLarge { max: self.max })
            }
            Err(e) => Err(FrameError::Io(e)),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        let mut body = item
            .encode_body()
            .map_err(|e| FrameError::Encode(e.to_string()))?;
        let tag_len = if self.cipher.is_some() { TAG_LEN } else { 0 };
        let len = FRAME_HEADER + body.len() + tag_len;
        if len > self.max {
            return Err(FrameError::TooLarge { max: self.max });
        }
        let flags = if self.cipher.is_some() {
            FLAG_TAGGED
        } else {
            0
        };
        let header = [VERSION, flags, item.kind()];
        dst.reserve(4 + len);
        // Cannot truncate: len <= max, and max is a usize we chose well under 4 GiB.
        dst.put_u32(len as u32);
        dst.put_slice(&header);
        match &mut self.cipher {
            None => dst.put_slice(&body),
            Some(cipher) => {
                let tag = cipher.seal(&header, &mut body);
                dst.put_slice(&body);
                dst.put_slice(&tag);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn hello() -> Hello {
        let mut tags = Tags::new();
        tags.insert("role".into(), "db".into());
        Hello {
            protocol: VERSION,
            cluster: "default".into(),
            id: NodeId(42),
            incarnation: 7,
            name: "node1".into(),
            addr: "192.0.2.1:6777".parse().unwrap(),
            tags,
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(hello()),
            Message::Welcome(hello()),
            Message::Ping(Ping { seq: 1, ts_us: 99 }),
            Message::Pong(Ping { seq: 1, ts_us: 99 }),
            Message::Peers(PeerList {
                peers: vec![PeerRecord {
                    id: NodeId(1),
                    incarnation: 2,
                    name: "n".into(),
                    addr: "127.0.0.1:1".parse().unwrap(),
                    state: "alive".into(),
                    age_ms: Some(12),
                }],
            }),
            Message::App(AppMessage {
                topic: "t".into(),
                payload: Bytes::from_static(b"\x00\xffhello"),
            }),
            Message::Goodbye(Goodbye {
                reason: "shutdown".into(),
            }),
            Message::Reject(Reject {
                code: "cluster".into(),
                detail: "other".into(),
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_through_the_codec() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for m in all_messages() {
            codec.encode(m.clone(), &mut buf).unwrap();
        }
        for m in all_messages() {
            assert_eq!(codec.decode(&mut buf).unwrap(), Some(m));
        }
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn partial_frame_is_incomplete_not_invalid() {
        let mut codec = FrameCodec::default();
        let mut full = BytesMut::new();
        codec
            .encode(Message::Ping(Ping { seq: 3, ts_us: 4 }), &mut full)
            .unwrap();
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(codec.decode(&mut part).unwrap(), None);
        part.extend_from_slice(&full[full.len() - 1..]);
        assert!(codec.decode(&mut part).unwrap().is_some());
    }

    #[test]
    fn handshake_checks_version_cluster_and_self() {
        let local = hello();
        let mut other = hello();
        other.id = NodeId(43);
        assert!(check_hello(&local, &other).is_ok());
        assert_eq!(check_hello(&local, &local).unwrap_err().code, "self");
        let mut c = other.clone();
        c.cluster = "x".into();
        assert_eq!(check_hello(&local, &c).unwrap_err().code, "cluster");
        let mut v = other;
        v.protocol = 99;
        assert_eq!(check_hello(&local, &v).unwrap_err().code, "version");
    }

    #[test]
    fn oversize_prefix_is_refused_before_buffering() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(1025);
        buf.put_slice(&[0u8; 8]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { max: 1024 })
        ));
        let big = Message::App(AppMessage {
            topic: String::new(),
            payload: Bytes::from(vec![0u8; 2048]),
        });
        assert!(matches!(
            codec.encode(big, &mut BytesMut::new()),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn typed_errors_for_version_kind_and_tag() {
        let mut codec = FrameCodec::default();
        for (hdr, check) in [
            ([9u8, 0, 3], "version"),
            ([VERSION, 0, 99], "unknown_kind"),
            ([VERSION, FLAG_TAGGED, 3], "security_mismatch"),
            ([VERSION, 0, 3], "malformed"),
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(4);
            buf.put_slice(&hdr);
            buf.put_u8(0xc1); // never-used msgpack byte
            let err = codec.decode(&mut buf).unwrap_err();
            assert_eq!(err.reason(), check, "{err}");
        }
    }

    pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
        let hello = (
            any::<u8>(),
            "\\PC{0,20}",
            any::<u128>(),
            any::<u64>(),
            "\\PC{0,20}",
            any::<([u8; 4], u16)>(),
            proptest::collection::btree_map("[a-z]{1,8}", "\\PC{0,8}", 0..4),
        )
            .prop_map(
                |(protocol, cluster, id, inc, name, (ip, port), tags)| Hello {
                    protocol,
                    cluster,
                    id: NodeId(id),
                    incarnation: inc,
                    name,
                    addr: SocketAddr::from((ip, port)),
                    tags,
                },
            );
        let ping = (any::<u64>(), any::<u64>()).prop_map(|(seq, ts_us)| Ping { seq, ts_us });
        let rec = (any::<u128>(), any::<u64>(), "\\PC{0,10}", "[a-z]{0,8}").prop_map(
            |(id, incarnation, name, state)| PeerRecord {
                id: NodeId(id),
                incarnation,
                name,
                addr: "[::1]:9".parse().unwrap(),
                state,
                age_ms: None,
            },
        );
        prop_oneof![
            hello.clone().prop_map(Message::Hello),
            hello.prop_map(Message::Welcome),
            ping.clone().prop_map(Message::Ping),
            ping.prop_map(Message::Pong),
            proptest::collection::vec(rec, 0..5)
                .prop_map(|peers| Message::Peers(PeerList { peers })),
            ("\\PC{0,20}", proptest::collection::vec(any::<u8>(), 0..256)).prop_map(
                |(topic, p)| {
                    Message::App(AppMessage {
                        topic,
                        payload: Bytes::from(p),
                    })
                }
            ),
            "\\PC{0,20}".prop_map(|reason| Message::Goodbye(Goodbye { reason })),
            ("[a-z]{0,8}", "\\PC{0,20}")
                .prop_map(|(code, detail)| Message::Reject(Reject { code, detail })),
        ]
    }

    proptest! {
        #[test]
        fn prop_encode_decode(m in arb_message()) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            codec.encode(m.clone(), &mut buf).unwrap();
            prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(m));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut codec = FrameCodec::new(4096);
            let mut buf = BytesMut::from(&data[..]);
            // Drive the decoder like FramedRead would, until it needs more or fails.
            for _ in 0..64 {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
