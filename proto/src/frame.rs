//! TCP link frames.
//!
//! Layout (big-endian; details and a hex dump in `PROTOCOL.md`):
//!
//! ```text
//! length (4) | version (1) | flags (1) | kind (1) | msgpack body | [tag]
//! ```
//!
//! `length` counts every byte after itself and is checked against the
//! codec's maximum *before* anything is buffered. Bodies are msgpack maps with named fields; unknown fields are
//! ignored. Unknown kinds and versions are typed errors. The tag (16 bytes,
//! present iff `flags` has [`FLAG_TAGGED`]) is reserved for the cluster-secret
//! mode, so that adding it changes no layout.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::id::{Incarnation, NodeId, Tags};
pub use crate::link::{GoodbyeReason, RejectCode};
use crate::secure::{FrameCipher, TAG_LEN};
use crate::wire::addr_str;

/// The frame envelope version this crate speaks. Also the protocol version
/// carried in the handshake.
pub const VERSION: u8 = 1;
/// Default maximum frame length (after the length prefix): 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// Bytes between the length prefix and the body.
pub const FRAME_HEADER: usize = 3;
/// Kind byte of [`Message::App`], the hot path.
const KIND_APP: u8 = 6;
/// Kind byte of [`Message::Query`].
const KIND_QUERY: u8 = 9;
/// Kind byte of [`Message::QueryResponse`].
const KIND_QUERY_RESPONSE: u8 = 10;
/// Kind byte of [`Message::Relay`].
const KIND_RELAY: u8 = 11;
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

/// Keep-alive probe, sent by the dialer of a link only; the answer echoes
/// it as [`Message::Pong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ping {
    /// Sequence number, per link.
    pub seq: u64,
    /// Sender's clock in microseconds since the link started; only the sender
    /// interprets it (to compute the round-trip time from the echo).
    pub ts_us: u64,
    /// The round-trip time the sender last measured on this link, in
    /// microseconds (0: not yet known), so that the side that does not ping
    /// knows it too.
    #[serde(default)]
    pub rtt_us: u64,
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
    /// How long ago the sender last heard from the peer *directly* on its
    /// own link (never a beacon, never hearsay), in milliseconds: present in
    /// answers to probes only. A record without it is membership knowledge
    /// (push-pull when a link comes up, and each change afterwards).
    #[serde(default)]
    pub age_ms: Option<u64>,
    /// The peer's tags as the sender knows them (omitted when empty).
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    pub tags: Tags,
    /// Version of `tags` within the peer's incarnation: 0 for the tags it
    /// started with (its handshake's), then one more for each runtime
    /// change. Between records of one incarnation, the higher version wins,
    /// so a late record never undoes a newer change. Omitted when 0 (older
    /// nodes neither send nor read it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tags_version: u64,
    /// In a silence alert (`state` `suspect`, overlay mode): the observer
    /// whose own links and beacons stopped hearing the peer. Alerts from
    /// different observers are counted apart; a failure decided on silence
    /// takes more than one. Omitted otherwise (older nodes neither send nor
    /// read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<NodeId>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
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
    pub topic: Topic,
    /// Opaque payload (msgpack `bin`).
    pub payload: Bytes,
}

/// The topic of an application message: UTF-8 text (a msgpack `str` on the
/// wire), cheap to make, clone and drop. Topics are short in practice, and
/// a topic of at most [`Topic::INLINE`] bytes lives inside the value, so
/// that neither sending nor receiving a message allocates for its topic
/// (with a `String`, every message read from a link cost an allocation,
/// and every message sent one in the sender). A longer topic is shared.
#[derive(Clone)]
pub struct Topic(TopicRepr);

#[derive(Clone)]
enum TopicRepr {
    /// `len` bytes of UTF-8 at the start of `bytes`.
    Inline { len: u8, bytes: [u8; Topic::INLINE] },
    /// Longer than [`Topic::INLINE`].
    Shared(std::sync::Arc<str>),
}

impl Topic {
    /// Longest topic kept inline.
    pub const INLINE: usize = 30;

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            TopicRepr::Inline { len, bytes } => {
                // Every constructor copies valid UTF-8 in: never the empty
                // fallback.
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            TopicRepr::Shared(s) => s,
        }
    }

    /// The topic's UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            TopicRepr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            TopicRepr::Shared(s) => s.as_bytes(),
        }
    }

    /// A topic from bytes that must be UTF-8.
    pub fn from_utf8(bytes: &[u8]) -> Result<Topic, std::str::Utf8Error> {
        std::str::from_utf8(bytes).map(Topic::from)
    }
}

impl Default for Topic {
    fn default() -> Self {
        Topic::from("")
    }
}

impl From<&str> for Topic {
    fn from(s: &str) -> Self {
        match u8::try_from(s.len()) {
            Ok(len) if s.len() <= Topic::INLINE => {
                let mut bytes = [0u8; Topic::INLINE];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                Topic(TopicRepr::Inline { len, bytes })
            }
            _ => Topic(TopicRepr::Shared(s.into())),
        }
    }
}

impl From<String> for Topic {
    fn from(s: String) -> Self {
        if s.len() <= Topic::INLINE {
            Topic::from(s.as_str())
        } else {
            Topic(TopicRepr::Shared(s.into()))
        }
    }
}

impl From<&String> for Topic {
    fn from(s: &String) -> Self {
        Topic::from(s.as_str())
    }
}

impl From<Topic> for String {
    fn from(t: Topic) -> Self {
        t.as_str().to_owned()
    }
}

impl std::ops::Deref for Topic {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Topic {
    fn eq(&self, other: &Topic) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Topic {}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Topic {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Topic {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Topic::from)
    }
}

/// The sender is shutting down gracefully.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why, for logs.
    #[serde(default)]
    pub reason: GoodbyeReason,
}

/// The handshake (or a later frame) was refused; the link closes after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Machine-readable reason (`cluster`, `version`, `self`, `duplicate`, ...).
    pub code: RejectCode,
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
    /// A query fanned out over the links (see [`crate::query`]).
    Query(crate::query::Query),
    /// An ack or answer to a query, on its way back to the asker.
    QueryResponse(crate::query::QueryResponse),
    /// An application message relayed over the bounded overlay (see
    /// [`crate::overlay::flood`]).
    Relay(crate::overlay::flood::Relayed),
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
            Message::App(_) => KIND_APP,
            Message::Goodbye(_) => 7,
            Message::Reject(_) => 8,
            Message::Query(_) => KIND_QUERY,
            Message::QueryResponse(_) => KIND_QUERY_RESPONSE,
            Message::Relay(_) => KIND_RELAY,
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
            Message::Query(_) => "query",
            Message::QueryResponse(_) => "query_response",
            Message::Relay(_) => "relay",
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
        let mut out = Vec::new();
        self.write_body(&mut out)?;
        Ok(out)
    }

    /// Writes the msgpack body (named fields) straight into `w`.
    fn write_body<W: std::io::Write>(&self, w: &mut W) -> Result<(), rmp_serde::encode::Error> {
        use rmp_serde::encode::write_named;
        match self {
            Message::Hello(m) | Message::Welcome(m) => write_named(w, m),
            Message::Ping(m) | Message::Pong(m) => write_named(w, m),
            Message::Peers(m) => write_named(w, m),
            Message::App(m) => {
                // The hot path, by hand with `rmp`'s primitives: exactly the
                // map `write_named` produces, without serde's machinery.
                use rmp::encode::{write_bin, write_map_len, write_str};
                write_map_len(w, 2)?;
                write_str(w, "topic")?;
                write_str(w, m.topic.as_str())?;
                write_str(w, "payload")?;
                write_bin(w, &m.payload)?;
                Ok(())
            }
            Message::Goodbye(m) => write_named(w, m),
            Message::Reject(m) => write_named(w, m),
            Message::Query(m) => write_named(w, m),
            Message::QueryResponse(m) => write_named(w, m),
            Message::Relay(m) => write_named(w, m),
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
        fn hello(body: &[u8]) -> Result<Hello, FrameError> {
            let h: Hello = de(body)?;
            crate::id::check_name(&h.name)?;
            crate::id::check_name(&h.cluster)?;
            crate::id::check_tags(&h.tags)?;
            Ok(h)
        }
        fn peers(body: &[u8]) -> Result<PeerList, FrameError> {
            let list: PeerList = de(body)?;
            for r in &list.peers {
                crate::id::check_name(&r.name)?;
                crate::id::check_tags(&r.tags)?;
            }
            Ok(list)
        }
        Ok(match kind {
            1 => Message::Hello(hello(body)?),
            2 => Message::Welcome(hello(body)?),
            3 => Message::Ping(de(body)?),
            4 => Message::Pong(de(body)?),
            5 => Message::Peers(peers(body)?),
            KIND_APP => Message::App(de(body)?),
            7 => Message::Goodbye(de(body)?),
            8 => Message::Reject(de(body)?),
            KIND_QUERY => Message::Query(de(body)?),
            KIND_QUERY_RESPONSE => Message::QueryResponse(de(body)?),
            KIND_RELAY => Message::Relay(de(body)?),
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
    /// A handshake or peer record whose name, cluster name or tags break the
    /// charset or length rules ([`crate::id::check_name`]).
    #[error("frame refused: {0}")]
    Identity(#[from] crate::id::IdentityError),
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
            FrameError::Identity(e) => e.reason(),
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
            code: RejectCode::Version,
            detail: format!(
                "protocol {} is not supported (this node speaks {VERSION})",
                remote.protocol
            ),
        });
    }
    if remote.cluster != local.cluster {
        return Err(Reject {
            code: RejectCode::Cluster,
            detail: format!(
                "cluster {:?} is not this node's cluster {:?}",
                remote.cluster, local.cluster
            ),
        });
    }
    if remote.id == local.id {
        return Err(Reject {
            code: RejectCode::SelfDial,
            detail: "a node cannot link to itself".into(),
        });
    }
    Ok(())
}

/// Length-delimited msgpack frames with an explicit maximum, for
/// `FramedRead`/`FramedWrite` over the halves of a TCP stream.
///
/// On a secured link each half's codec holds that direction's
/// [`FrameCipher`] and the stream is a sequence of sealed *records*: one
/// record carries one or more ordinary frames, encrypted together with the
/// record's 3-byte header as associated data (as TLS records do). The link
/// writer hands over a whole batch ([`Encoder<Vec<Message>>`]) so that one
/// seal covers up to a batch of small messages; a record is closed once its
/// plaintext reaches [`RECORD_TARGET`] bytes. A plaintext frame on a secured
/// link is an error.
///
/// Frames are split by hand rather than by a [`LengthDelimitedCodec`]: the
/// split is stateless (the prefix stays in the buffer until the whole frame
/// is there), and an application frame is cut once, straight to its
/// payload, which a link reading thousands of frames per wake-up notices.
#[derive(Debug)]
pub struct FrameCodec {
    max: usize,
    secure: Option<Box<Sealing>>,
    /// The topic of the last application message decoded.
    last_topic: Option<Topic>,
}

/// The secured half of a [`FrameCodec`].
#[derive(Debug)]
struct Sealing {
    cipher: FrameCipher,
    /// Splits the stream into records (at most a frame plus a record's worth).
    records: LengthDelimitedCodec,
    /// Frames of the last opened record not yet returned.
    opened: BytesMut,
}

/// A record is sealed once its plaintext reaches this many bytes; so a
/// record is at most this plus one frame.
pub const RECORD_TARGET: usize = 64 << 10;
/// Kind byte of a sealed record.
pub const KIND_RECORD: u8 = 0;

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec refusing frames longer than `max` bytes (after the prefix).
    pub fn new(max: usize) -> Self {
        FrameCodec {
            max,
            secure: None,
            last_topic: None,
        }
    }

    /// A codec for one direction of a secured link.
    pub fn secured(max: usize, cipher: FrameCipher) -> Self {
        let records = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(Self::max_record(max))
            .new_codec();
        FrameCodec {
            secure: Some(Box::new(Sealing {
                cipher,
                records,
                opened: BytesMut::new(),
            })),
            ..Self::new(max)
        }
    }

    /// Largest record (after its prefix) for frames of at most `max` bytes.
    fn max_record(max: usize) -> usize {
        FRAME_HEADER + RECORD_TARGET + 4 + max + TAG_LEN
    }

    /// The configured maximum.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Decodes one complete frame (without the length prefix).
    pub fn decode_frame(frame: &[u8]) -> Result<Message, FrameError> {
        check_plain_header(frame)?;
        Message::decode_body(frame[2], &frame[FRAME_HEADER..])
    }

    /// Appends one plaintext frame: the body is written in place after a
    /// length placeholder, then the length is filled in (no copy).
    fn encode_frame(&self, item: &Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        if let Message::App(m) = item {
            return self.write_app(m, dst);
        }
        let start = dst.len();
        dst.reserve(4 + FRAME_HEADER + 64);
        dst.put_u32(0);
        dst.put_slice(&[VERSION, 0, item.kind()]);
        let body_at = dst.len();
        let mut w = dst.writer();
        if let Err(e) = item.write_body(&mut w) {
            w.into_inner().truncate(start);
            return Err(FrameError::Encode(e.to_string()));
        }
        let dst = w.into_inner();
        let len = dst.len() - body_at + FRAME_HEADER;
        if len > self.max {
            dst.truncate(start);
            return Err(FrameError::TooLarge { max: self.max });
        }
        // Cannot truncate: len <= max, and max is a usize we chose well under 4 GiB.
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

impl FrameCodec {
    /// Appends one application frame, as [`Encoder::encode`] of
    /// `Message::App` does, without a `Message` around it (a writer with a
    /// queue of messages encodes them straight from it). On a secured link
    /// it is sealed alone: batches there go through `Encoder<Vec<Message>>`.
    pub fn encode_app(&mut self, m: &AppMessage, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self.secure {
            None => self.write_app(m, dst),
            Some(_) => self.encode(vec![Message::App(m.clone())], dst),
        }
    }

    /// The hot path of [`FrameCodec::encode_frame`]: an `App` frame written
    /// with `BufMut` calls alone, its size known before the first byte, so
    /// that nothing is written (or truncated) for a frame over the limit.
    /// Byte for byte what the general path writes (a property test checks
    /// it): msgpack's shortest markers, `topic` then `payload`.
    fn write_app(&self, m: &AppMessage, dst: &mut BytesMut) -> Result<(), FrameError> {
        let (topic, payload) = (m.topic.as_bytes(), &m.payload[..]);
        let str_head = match topic.len() {
            0..32 => 1,
            32..256 => 2,
            256..65536 => 3,
            _ => 5,
        };
        let bin_head = match payload.len() {
            0..256 => 2,
            256..65536 => 3,
            _ => 5,
        };
        // map(2), "topic", the topic, "payload", the payload.
        let body = 1 + 6 + str_head + topic.len() + 8 + bin_head + payload.len();
        let len = FRAME_HEADER + body;
        if len > self.max {
            return Err(FrameError::TooLarge { max: self.max });
        }
        dst.reserve(4 + len);
        // Cannot truncate: len <= max, and max is a usize we chose well under 4 GiB.
        dst.put_u32(len as u32);
        dst.put_slice(&[VERSION, 0, KIND_APP, 0x82, 0xa5]);
        dst.put_slice(b"topic");
        match topic.len() {
            n @ 0..32 => dst.put_u8(0xa0 | n as u8),
            n @ 32..256 => dst.put_slice(&[0xd9, n as u8]),
            n @ 256..65536 => {
                dst.put_u8(0xda);
                dst.put_u16(n as u16);
            }
            n => {
                dst.put_u8(0xdb);
                dst.put_u32(n as u32);
            }
        }
        dst.put_slice(topic);
        dst.put_u8(0xa7);
        dst.put_slice(b"payload");
        match payload.len() {
            n @ 0..256 => dst.put_slice(&[0xc4, n as u8]),
            n @ 256..65536 => {
                dst.put_u8(0xc5);
                dst.put_u16(n as u16);
            }
            n => {
                dst.put_u8(0xc6);
                dst.put_u32(n as u32);
            }
        }
        dst.put_slice(payload);
        Ok(())
    }
}

/// One frame as [`FrameCodec::decode_next`] returns it.
#[derive(Debug)]
pub enum Decoded {
    /// An application message: the hot path, unboxed.
    App(AppMessage),
    /// Any other frame.
    Frame(Box<Message>),
}

impl Decoded {
    /// The frame as a [`Message`].
    pub fn into_message(self) -> Message {
        match self {
            Decoded::App(m) => Message::App(m),
            Decoded::Frame(m) => *m,
        }
    }
}

/// Where an open record's header and plaintext start in the output buffer.
struct OpenRecord {
    start: usize,
    body_at: usize,
}

impl Sealing {
    fn begin(dst: &mut BytesMut) -> OpenRecord {
        let start = dst.len();
        dst.put_u32(0);
        dst.put_slice(&[VERSION, FLAG_TAGGED, KIND_RECORD]);
        OpenRecord {
            start,
            body_at: dst.len(),
        }
    }

    fn seal(&mut self, rec: OpenRecord, dst: &mut BytesMut) {
        let header = [VERSION, FLAG_TAGGED, KIND_RECORD];
        let tag = self.cipher.seal(&header, &mut dst[rec.body_at..]);
        dst.put_slice(&tag);
        let len = dst.len() - rec.start - 4;
        // Cannot truncate: a record is at most `max_record`, well under 4 GiB.
        dst[rec.start..rec.start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    }

    /// Opens one whole record (without its prefix) into `self.opened`.
    fn open(&mut self, mut record: BytesMut) -> Result<(), FrameError> {
        if record.len() < FRAME_HEADER + TAG_LEN {
            return Err(FrameError::Truncated);
        }
        let header: [u8; FRAME_HEADER] = [record[0], record[1], record[2]];
        let [version, flags, kind] = header;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        if flags & FLAG_TAGGED == 0 {
            return Err(FrameError::Plaintext);
        }
        if kind != KIND_RECORD {
            return Err(FrameError::UnknownKind(kind));
        }
        let tag_at = record.len() - TAG_LEN;
        let (body, tag) = record[FRAME_HEADER..].split_at_mut(tag_at - FRAME_HEADER);
        if !self.cipher.open(&header, body, tag) {
            return Err(FrameError::AuthFailed);
        }
        if body.is_empty() {
            return Err(FrameError::Truncated); // a record holds at least a frame
        }
        record.truncate(tag_at);
        self.opened = record.split_off(FRAME_HEADER);
        Ok(())
    }
}

/// Version and flags of a frame on a link without a secret.
fn check_plain_header(frame: &[u8]) -> Result<(), FrameError> {
    if frame.len() < FRAME_HEADER {
        return Err(FrameError::Truncated);
    }
    let mut hdr = &frame[..FRAME_HEADER];
    let version = hdr.get_u8();
    let flags = hdr.get_u8();
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    if flags & FLAG_TAGGED != 0 {
        return Err(FrameError::Tagged);
    }
    Ok(())
}

/// Length (after the prefix) of the frame at the start of `src`, once it
/// is all there: `Ok(None)` while the prefix or the frame is incomplete.
/// The prefix is checked against `max` before anything is buffered.
fn whole_frame(src: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = src.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { max });
    }
    Ok((src.len() - 4 >= len).then_some(len))
}

/// Decodes a whole plaintext frame (without its prefix) that the fast path
/// ([`app_at_front`]) did not take: every frame but an application message
/// in the shape this crate writes, through serde.
fn decode_owned(frame: &[u8]) -> Result<Decoded, FrameError> {
    check_plain_header(frame)?;
    Message::decode_body(frame[2], &frame[FRAME_HEADER..]).map(|m| Decoded::Frame(Box::new(m)))
}

/// Where the parts of an `App` body lie, as offsets into the body.
#[derive(Debug, PartialEq, Eq)]
struct AppLayout {
    topic: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
}

/// Reads an `App` body as this crate writes it (a map holding just `topic`
/// and `payload`, in any order) with `rmp`'s primitives. Anything else
/// (unknown fields, other encodings, garbage) is `None`, for the general
/// serde path, so that the wire contract is exactly serde's. The topic's
/// bytes are not checked here: whoever makes a string of them does.
fn app_layout(body: &[u8]) -> Option<AppLayout> {
    app_layout_as_written(body).or_else(|| app_layout_general(body))
}

/// [`app_layout`] for any order of the two fields and any markers.
fn app_layout_general(body: &[u8]) -> Option<AppLayout> {
    use rmp::decode::{read_bin_len, read_map_len, read_str_len};
    /// Skips `n` bytes; returns their range in `body`.
    fn take(body: &[u8], rd: &mut &[u8], n: usize) -> Option<std::ops::Range<usize>> {
        let at = body.len() - rd.len();
        *rd = rd.get(n..)?;
        Some(at..at + n)
    }
    let mut rd: &[u8] = body;
    let (mut topic, mut payload) = (None, None);
    for _ in 0..read_map_len(&mut rd).ok()? {
        let klen = read_str_len(&mut rd).ok()? as usize;
        let key = take(body, &mut rd, klen)?;
        match &body[key] {
            b"topic" if topic.is_none() => {
                let len = read_str_len(&mut rd).ok()? as usize;
                topic = Some(take(body, &mut rd, len)?);
            }
            b"payload" if payload.is_none() => {
                let len = read_bin_len(&mut rd).ok()? as usize;
                payload = Some(take(body, &mut rd, len)?);
            }
            _ => return None,
        }
    }
    if !rd.is_empty() {
        return None;
    }
    Some(AppLayout {
        topic: topic?,
        payload: payload?,
    })
}

/// [`app_layout`] for the exact bytes [`FrameCodec::encode_app`] writes
/// (`topic` first, shortest markers), matched without a parser loop;
/// `None` for anything else, which the general reader then tries.
fn app_layout_as_written(body: &[u8]) -> Option<AppLayout> {
    /// A length of `n` big-endian bytes at `at`.
    fn be(body: &[u8], at: usize, n: usize) -> Option<usize> {
        let b = body.get(at..at + n)?;
        Some(b.iter().fold(0usize, |v, &x| v << 8 | usize::from(x)))
    }
    const HEAD: &[u8] = b"\x82\xa5topic";
    const PAYLOAD_KEY: &[u8] = b"\xa7payload";
    if !body.starts_with(HEAD) {
        return None;
    }
    let at = HEAD.len();
    let (topic_len, topic_at) = match *body.get(at)? {
        m @ 0xa0..=0xbf => (usize::from(m & 0x1f), at + 1),
        0xd9 => (be(body, at + 1, 1)?, at + 2),
        0xda => (be(body, at + 1, 2)?, at + 3),
        0xdb => (be(body, at + 1, 4)?, at + 5),
        _ => return None,
    };
    let key_at = topic_at.checked_add(topic_len)?;
    let at = key_at.checked_add(PAYLOAD_KEY.len())?;
    if body.get(key_at..at)? != PAYLOAD_KEY {
        return None;
    }
    let (payload_len, payload_at) = match *body.get(at)? {
        0xc4 => (be(body, at + 1, 1)?, at + 2),
        0xc5 => (be(body, at + 1, 2)?, at + 3),
        0xc6 => (be(body, at + 1, 4)?, at + 5),
        _ => return None,
    };
    // The payload ends the body exactly.
    (body.len().checked_sub(payload_at)? == payload_len).then_some(AppLayout {
        topic: topic_at..key_at,
        payload: payload_at..body.len(),
    })
}

/// The hot path: the whole frame of `len` bytes after the prefix at the
/// front of `buf`, if it is an `App` frame with a valid plaintext header in
/// the shape [`app_layout`] reads and a UTF-8 topic, becomes its message:
/// the frame leaves `buf` and the payload is cut out of it in place (no
/// copy). Anything else is `None`, and `buf` is untouched.
///
/// `last` is the topic of the link's previous message: a stream of
/// messages mostly shares one, which is then neither checked nor copied
/// again.
fn app_at_front(buf: &mut BytesMut, len: usize, last: &mut Option<Topic>) -> Option<AppMessage> {
    let frame = buf.get(4..4 + len)?;
    let [version, flags, KIND_APP, ..] = *frame else {
        return None;
    };
    if version != VERSION || flags & FLAG_TAGGED != 0 {
        return None; // the general path says why
    }
    let body = &frame[FRAME_HEADER..];
    let at = app_layout(body)?;
    let bytes = &body[at.topic];
    let topic = match last {
        Some(t) if t.as_bytes() == bytes => t.clone(),
        _ => {
            let t = Topic::from_utf8(bytes).ok()?;
            *last = Some(t.clone());
            t
        }
    };
    buf.advance(4 + FRAME_HEADER + at.payload.start);
    let payload = buf.split_to(at.payload.len()).freeze();
    Some(AppMessage { topic, payload })
}

fn length_error(e: std::io::Error, max: usize) -> FrameError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        FrameError::TooLarge { max }
    } else {
        FrameError::Io(e)
    }
}

impl FrameCodec {
    /// [`Decoder::decode`] without wrapping an application message in a
    /// [`Message`]: the link's reader takes thousands per wake-up, and a
    /// `Message` is several times the size of an [`AppMessage`], moved at
    /// each step. Every other frame comes boxed (they are rare).
    pub fn decode_next(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        let Some(sec) = &mut self.secure else {
            let Some(len) = whole_frame(src, self.max)? else {
                // Room for the rest of a frame whose prefix is here, so
                // that the next read can complete it.
                if let Some(prefix) = src.first_chunk::<4>() {
                    let total = 4 + u32::from_be_bytes(*prefix) as usize;
                    src.reserve(total - src.len());
                }
                return Ok(None);
            };
            if let Some(m) = app_at_front(src, len, &mut self.last_topic) {
                return Ok(Some(Decoded::App(m)));
            }
            let frame = src.split_to(4 + len);
            return decode_owned(&frame[4..]).map(Some);
        };
        if sec.opened.is_empty() {
            let record = match sec.records.decode(src) {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(None),
                Err(e) => return Err(length_error(e, Self::max_record(self.max))),
            };
            sec.open(record)?;
        }
        // Frames inside a record are whole: a partial one is an error.
        let Some(len) = whole_frame(&sec.opened, self.max)? else {
            return Err(FrameError::Truncated);
        };
        if let Some(m) = app_at_front(&mut sec.opened, len, &mut self.last_topic) {
            return Ok(Some(Decoded::App(m)));
        }
        let frame = sec.opened.split_to(4 + len);
        decode_owned(&frame[4..]).map(Some)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        Ok(self.decode_next(src)?.map(Decoded::into_message))
    }
}

/// A batch of messages written together: on a secured link they share
/// sealed records; on a plain link it is just the frames one after another.
impl Encoder<Vec<Message>> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, batch: Vec<Message>, dst: &mut BytesMut) -> Result<(), FrameError> {
        let Some(mut sec) = self.secure.take() else {
            return batch.iter().try_for_each(|m| self.encode_frame(m, dst));
        };
        let start = dst.len();
        let mut open: Option<OpenRecord> = None;
        let mut result = Ok(());
        for m in &batch {
            let rec = open.get_or_insert_with(|| Sealing::begin(dst));
            let body_at = rec.body_at;
            if let Err(e) = self.encode_frame(m, dst) {
                result = Err(e);
                break;
            }
            if dst.len() - body_at >= RECORD_TARGET {
                if let Some(rec) = open.take() {
                    sec.seal(rec, dst);
                }
            }
        }
        match (&result, open) {
            (Ok(()), Some(rec)) => sec.seal(rec, dst),
            (Err(_), _) => dst.truncate(start), // nothing half-sealed goes out
            _ => {}
        }
        self.secure = Some(sec);
        result
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self.secure {
            None => self.encode_frame(&item, dst),
            Some(_) => self.encode(vec![item], dst),
        }
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
            Message::Ping(Ping {
                seq: 1,
                ts_us: 99,
                rtt_us: 120,
            }),
            Message::Pong(Ping {
                seq: 1,
                ts_us: 99,
                rtt_us: 0,
            }),
            Message::Peers(PeerList {
                peers: vec![PeerRecord {
                    id: NodeId(1),
                    incarnation: 2,
                    name: "n".into(),
                    addr: "127.0.0.1:1".parse().unwrap(),
                    state: "alive".into(),
                    age_ms: Some(12),
                    tags: Tags::new(),
                    tags_version: 0,
                    by: None,
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
            Message::Query(crate::query::Query {
                origin: NodeId(42),
                origin_name: "node1".into(),
                id: 3,
                name: "load".into(),
                payload: Bytes::from_static(b"now"),
                filter: crate::query::Filter {
                    nodes: vec!["node2".into()],
                    tags: vec![("role".into(), "db".into())],
                },
                timeout_ms: 1000,
                ttl: 0,
            }),
            Message::QueryResponse(crate::query::QueryResponse {
                origin: NodeId(42),
                id: 3,
                from: NodeId(7),
                from_name: "node2".into(),
                kind: crate::query::ResponseKind::Answer,
                payload: Bytes::from_static(b"0.25"),
                ttl: 255,
            }),
            Message::Relay(crate::overlay::flood::Relayed {
                origin: NodeId(42),
                seq: 9,
                to: Some(NodeId(7)),
                ttl: 15,
                topic: "t".into(),
                payload: Bytes::from_static(b"over the overlay"),
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
            .encode(
                Message::Ping(Ping {
                    seq: 3,
                    ts_us: 4,
                    rtt_us: 0,
                }),
                &mut full,
            )
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
            topic: Topic::default(),
            payload: Bytes::from(vec![0u8; 2048]),
        });
        assert!(matches!(
            codec.encode(big, &mut BytesMut::new()),
            Err(FrameError::TooLarge { .. })
        ));
    }

    /// An `App` frame whose body is `body` (any msgpack).
    fn app_frame(body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32((FRAME_HEADER + body.len()) as u32);
        buf.put_slice(&[VERSION, 0, KIND_APP]);
        buf.put_slice(body);
        buf
    }

    /// [`app_at_front`] on one `App` frame of `body`, with no topic
    /// remembered: the message, and nothing left behind.
    fn fast_path(body: &[u8]) -> Option<AppMessage> {
        let mut buf = app_frame(body);
        let len = buf.len() - 4;
        let m = app_at_front(&mut buf, len, &mut None)?;
        assert!(buf.is_empty(), "the whole frame is taken");
        Some(m)
    }

    /// Messages whose topics repeat, change and come back: the stream
    /// [`a_remembered_topic_never_leaks_into_the_next_message`] sends.
    pub(crate) fn topic_stream() -> Vec<Message> {
        let topics = [
            "a",
            "a",
            "bb",
            "",
            "a",
            "é",
            "long-topic-past-the-inline-limit-of-thirty",
            "a",
        ];
        topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Message::App(AppMessage {
                    topic: (*t).into(),
                    payload: Bytes::from(vec![i as u8; i]),
                })
            })
            .collect()
    }

    /// The remembered topic is only a shortcut: a stream whose topics
    /// repeat, change and come back decodes to exactly what was sent (the
    /// secured case is in `secure/tests.rs`).
    #[test]
    fn a_remembered_topic_never_leaks_into_the_next_message() {
        let (mut enc, mut dec) = (FrameCodec::default(), FrameCodec::default());
        let mut buf = BytesMut::new();
        enc.encode(topic_stream(), &mut buf).unwrap();
        let mut got = Vec::new();
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
        assert_eq!(got, topic_stream());
    }

    #[test]
    fn app_payload_is_sliced_not_copied() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let msg = AppMessage {
            topic: "t".into(),
            payload: Bytes::from(vec![7u8; 4096]),
        };
        codec.encode(Message::App(msg.clone()), &mut buf).unwrap();
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Some(Message::App(got)) = codec.decode(&mut buf).unwrap() else {
            panic!("not an app message")
        };
        assert_eq!(got, msg);
        assert!(
            range.contains(&(got.payload.as_ptr() as usize)),
            "payload points into the read buffer"
        );
    }

    #[test]
    fn app_with_unknown_fields_or_other_layouts_still_decodes() {
        #[derive(Serialize)]
        struct Future<'a> {
            payload: &'a serde_bytes_like::Bin,
            extra: u32,
            topic: &'a str,
        }
        mod serde_bytes_like {
            /// Serialises as msgpack `bin`.
            pub struct Bin(pub Vec<u8>);
            impl serde::Serialize for Bin {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_bytes(&self.0)
                }
            }
        }
        let bin = serde_bytes_like::Bin(b"hi".to_vec());
        let body = rmp_serde::to_vec_named(&Future {
            payload: &bin,
            extra: 9,
            topic: "x",
        })
        .unwrap();
        let got = FrameCodec::default().decode(&mut app_frame(&body)).unwrap();
        assert_eq!(
            got,
            Some(Message::App(AppMessage {
                topic: "x".into(),
                payload: Bytes::from_static(b"hi"),
            }))
        );
        // Trailing bytes after the map, duplicate keys, a missing payload:
        // refused by the general path, whatever the fast path thought.
        let mut body2 = body.clone();
        body2.push(0xc0);
        assert!(FrameCodec::default()
            .decode(&mut app_frame(&body2))
            .is_err());
        let only_topic = rmp_serde::to_vec_named(&Goodbye { reason: "x".into() }).unwrap();
        assert!(FrameCodec::default()
            .decode(&mut app_frame(&only_topic))
            .is_err());
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
            "[A-Za-z0-9._-]{1,20}",
            any::<u128>(),
            any::<u64>(),
            "[A-Za-z0-9._-]{1,20}",
            any::<([u8; 4], u16)>(),
            proptest::collection::btree_map("[a-z]{1,8}", "[^\\p{Cc}]{0,8}", 0..4),
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
        let ping = (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(seq, ts_us, rtt_us)| Ping { seq, ts_us, rtt_us });
        let rec = (
            any::<u128>(),
            any::<u64>(),
            "[A-Za-z0-9._-]{1,10}",
            "[a-z]{0,8}",
        )
            .prop_map(|(id, incarnation, name, state)| PeerRecord {
                id: NodeId(id),
                incarnation,
                name,
                addr: "[::1]:9".parse().unwrap(),
                state,
                age_ms: None,
                tags: [("role".to_string(), "db".to_string())]
                    .into_iter()
                    .take((incarnation % 2) as usize)
                    .collect(),
                tags_version: incarnation % 3,
                by: None,
            });
        let query = (
            any::<u128>(),
            any::<u64>(),
            "[a-z:]{1,12}",
            proptest::collection::vec(any::<u8>(), 0..32),
            proptest::collection::vec("[a-z0-9]{1,8}", 0..3),
            any::<u64>(),
            any::<u8>(),
        )
            .prop_map(|(origin, id, name, payload, nodes, timeout_ms, ttl)| {
                crate::query::Query {
                    origin: NodeId(origin),
                    origin_name: "n".into(),
                    id,
                    name,
                    payload: Bytes::from(payload),
                    filter: crate::query::Filter {
                        nodes,
                        tags: vec![("role".into(), "db".into())]
                            .into_iter()
                            .take((id % 2) as usize)
                            .collect(),
                    },
                    timeout_ms,
                    ttl,
                }
            });
        let response = (
            any::<u128>(),
            any::<u64>(),
            any::<u128>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..32),
        )
            .prop_map(
                |(origin, id, from, ack, payload)| crate::query::QueryResponse {
                    origin: NodeId(origin),
                    id,
                    from: NodeId(from),
                    from_name: String::new(),
                    kind: if ack {
                        crate::query::ResponseKind::Ack
                    } else {
                        crate::query::ResponseKind::Answer
                    },
                    payload: Bytes::from(payload),
                    ttl: (id % 256) as u8,
                },
            );
        let relay = (
            any::<u128>(),
            any::<u64>(),
            proptest::option::of(any::<u128>()),
            any::<u8>(),
            "\\PC{0,20}",
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(origin, seq, to, ttl, topic, payload)| {
                crate::overlay::flood::Relayed {
                    origin: NodeId(origin),
                    seq,
                    to: to.map(NodeId),
                    ttl,
                    topic: topic.into(),
                    payload: Bytes::from(payload),
                }
            });
        prop_oneof![
            relay.prop_map(Message::Relay),
            query.prop_map(Message::Query),
            response.prop_map(Message::QueryResponse),
            hello.clone().prop_map(Message::Hello),
            hello.prop_map(Message::Welcome),
            ping.clone().prop_map(Message::Ping),
            ping.prop_map(Message::Pong),
            proptest::collection::vec(rec, 0..5)
                .prop_map(|peers| Message::Peers(PeerList { peers })),
            ("\\PC{0,20}", proptest::collection::vec(any::<u8>(), 0..256)).prop_map(
                |(topic, p)| {
                    Message::App(AppMessage {
                        topic: topic.into(),
                        payload: Bytes::from(p),
                    })
                }
            ),
            "\\PC{0,20}".prop_map(|reason| Message::Goodbye(Goodbye {
                reason: reason.into()
            })),
            ("[a-z]{0,8}", "\\PC{0,20}").prop_map(|(code, detail)| Message::Reject(Reject {
                code: code.into(),
                detail
            })),
        ]
    }

    proptest! {
        #[test]
        fn app_encoding_by_hand_is_what_serde_writes(topic in "\\PC{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let msg = AppMessage { topic: topic.into(), payload: Bytes::from(payload) };
            prop_assert_eq!(Message::App(msg.clone()).encode_body().unwrap(), rmp_serde::to_vec_named(&msg).unwrap());
        }

        /// A topic is its text whatever its length (inline or shared), and
        /// serialises exactly as that text does.
        #[test]
        fn topic_is_its_text(text in "\\PC{0,40}") {
            let t = Topic::from(text.as_str());
            prop_assert_eq!(t.as_str(), text.as_str());
            prop_assert_eq!(t.as_bytes(), text.as_bytes());
            prop_assert_eq!(&t, &Topic::from(text.clone()));
            prop_assert_eq!(t.clone(), t.clone());
            prop_assert_eq!(format!("{t}"), text.clone());
            prop_assert_eq!(format!("{t:?}"), format!("{text:?}"));
            prop_assert_eq!(rmp_serde::to_vec_named(&t).unwrap(), rmp_serde::to_vec_named(&text).unwrap());
            prop_assert_eq!(serde_json::to_string(&t).unwrap(), serde_json::to_string(&text).unwrap());
            let back: Topic = rmp_serde::from_slice(&rmp_serde::to_vec_named(&text).unwrap()).unwrap();
            prop_assert_eq!(&back, &t);
            prop_assert_eq!(String::from(back), text);
        }

        /// The hand-written `App` frame is the general path's frame, at
        /// every size class of msgpack's markers.
        #[test]
        fn app_frame_by_hand_is_the_general_frame(topic_len in prop::sample::select(vec![0usize, 1, 31, 32, 255, 256, 300, 65535, 65536]), payload_len in prop::sample::select(vec![0usize, 1, 255, 256, 65535, 65536, 70000]), fill in any::<u8>()) {
            let msg = AppMessage { topic: ("é".repeat(topic_len / 2) + &"t".repeat(topic_len % 2)).into(), payload: Bytes::from(vec![fill; payload_len]) };
            let mut codec = FrameCodec::new(1 << 20);
            let mut fast = BytesMut::new();
            codec.encode_app(&msg, &mut fast).unwrap();
            let body = Message::App(msg.clone()).encode_body().unwrap();
            let mut general = BytesMut::new();
            general.put_u32((FRAME_HEADER + body.len()) as u32);
            general.put_slice(&[VERSION, 0, KIND_APP]);
            general.put_slice(&body);
            prop_assert_eq!(&fast[..], &general[..]);
            // And a limit one byte short refuses it without writing.
            let mut short = FrameCodec::new(fast.len() - 5);
            let mut out = BytesMut::from(&b"xy"[..]);
            let refused = matches!(short.encode_app(&msg, &mut out), Err(FrameError::TooLarge { .. }));
            prop_assert!(refused);
            prop_assert_eq!(&out[..], b"xy");
        }

        #[test]
        fn app_fast_path_agrees_with_serde(topic in "\\PC{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let msg = AppMessage { topic: topic.into(), payload: Bytes::from(payload) };
            let body = rmp_serde::to_vec_named(&msg).unwrap();
            prop_assert_eq!(fast_path(&body), Some(msg.clone()));
            prop_assert_eq!(Message::decode_body(KIND_APP, &body).unwrap(), Message::App(msg));
        }

        /// The exact-bytes matcher answers for what this crate writes, and
        /// wherever it answers, the general reader reads the same layout.
        #[test]
        fn app_layout_as_written_agrees(topic in "\\PC{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let msg = AppMessage { topic: topic.into(), payload: Bytes::from(payload) };
            let body = rmp_serde::to_vec_named(&msg).unwrap();
            let fast = app_layout_as_written(&body);
            prop_assert!(fast.is_some());
            prop_assert_eq!(fast, app_layout_general(&body));
            let mut damaged = body.clone();
            damaged[cut.index(body.len())] = byte;
            if let Some(at) = app_layout_as_written(&damaged) {
                prop_assert_eq!(Some(at), app_layout_general(&damaged));
            }
            let short = &body[..cut.index(body.len())];
            prop_assert_eq!(app_layout_as_written(short), None);
        }

        #[test]
        fn app_fast_path_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(m) = fast_path(&body) {
                // Whatever it accepts, the general decoder accepts identically.
                prop_assert_eq!(Message::decode_body(KIND_APP, &body).unwrap(), Message::App(m));
            }
        }
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

        /// A stream of frames arriving in arbitrary pieces decodes to the
        /// same messages: the split keeps no state between calls.
        #[test]
        fn prop_stream_in_pieces(ms in proptest::collection::vec(arb_message(), 1..8), cuts in proptest::collection::vec(1usize..200, 1..40)) {
            let mut codec = FrameCodec::default();
            let mut wire = BytesMut::new();
            for m in &ms {
                codec.encode(m.clone(), &mut wire).unwrap();
            }
            let (mut buf, mut got, mut cut) = (BytesMut::new(), Vec::new(), cuts.iter().cycle());
            while !wire.is_empty() || !buf.is_empty() {
                let n = (*cut.next().unwrap()).min(wire.len());
                buf.extend_from_slice(&wire.split_to(n));
                while let Some(m) = codec.decode(&mut buf).unwrap() {
                    got.push(m);
                }
                if wire.is_empty() {
                    break;
                }
            }
            prop_assert_eq!(got, ms);
            prop_assert!(buf.is_empty());
        }

        /// The hand-made split agrees with tokio-util's length-delimited
        /// codec on any bytes: the same frames, "need more" at the same
        /// point, and a too-large prefix refused as such.
        #[test]
        fn prop_split_agrees_with_length_delimited(data in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..300) {
            let mut ldc = LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(max).new_codec();
            let (mut a, mut b) = (BytesMut::from(&data[..]), BytesMut::from(&data[..]));
            loop {
                let ours = whole_frame(&a, max);
                let theirs = ldc.decode(&mut b);
                match (ours, theirs) {
                    (Ok(Some(len)), Ok(Some(frame))) => {
                        let mine = a.split_to(4 + len);
                        prop_assert_eq!(&mine[4..], &frame[..]);
                    }
                    (Ok(None), Ok(None)) => break,
                    (Err(FrameError::TooLarge { .. }), Err(e)) => {
                        prop_assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
                        break;
                    }
                    (ours, theirs) => prop_assert!(false, "{ours:?} vs {theirs:?}"),
                }
            }
        }

        /// App frames damaged anywhere: the fast path never panics, and
        /// decodes exactly what the general path decodes (or both refuse).
        #[test]
        fn prop_damaged_app_frames_agree(topic in "\\PC{0,20}", payload in proptest::collection::vec(any::<u8>(), 0..100), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let msg = AppMessage { topic: topic.into(), payload: Bytes::from(payload) };
            let mut body = rmp_serde::to_vec_named(&msg).unwrap();
            let i = at.index(body.len());
            body[i] = byte;
            let fast = FrameCodec::default().decode(&mut app_frame(&body));
            let general = Message::decode_body(KIND_APP, &body);
            match (fast, general) {
                (Ok(Some(f)), Ok(g)) => prop_assert_eq!(f, g),
                (Err(_), Err(_)) => {}
                (f, g) => prop_assert!(false, "fast {f:?} vs general {g:?}"),
            }
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
