//! The UDP beacon: how nodes announce themselves on the multicast group.
//!
//! Layout (all integers big-endian; details and a hex dump in `PROTOCOL.md`):
//!
//! ```text
//! magic "CSTL" (4) | version (1) | flags (1) | body length (2) | body | trailer
//! ```
//!
//! The body is a msgpack map with named fields, so fields can be added
//! without a version bump: decoders ignore keys they do not know. The
//! trailer is empty unless `flags` has [`FLAG_SEALED`], reserved for the
//! cluster-secret mode (nonce and authentication tag).
//!
//! Flags are the opposite of body fields: a flag changes how the rest of the
//! datagram is read, so a receiver that does not know a flag cannot read the
//! beacon. Every bit outside [`KNOWN_FLAGS`] must be zero; a beacon with a
//! reserved bit set is refused ([`BeaconError::ReservedFlags`], counted as
//! `reserved_flags`), never read as if the bit were clear. Anything an old
//! receiver may safely ignore belongs in the body instead.
//!
//! A beacon is a *hint*: it says "a node with this id says it is reachable at
//! this address". Nothing here trusts it further than that; identity is proven
//! on the TCP link.
//!
//! Decoding follows the datagram contract: one call consumes the whole
//! datagram, valid or not, and yields a beacon or a typed error. It never
//! returns "need more bytes".
//!
//! Fields added to the body after the first release travel in
//! [`Extensions`], beside the [`Beacon`] rather than inside it: every one is
//! optional on the wire, and an absent one encodes exactly as before the
//! field existed (so the hex dumps in `PROTOCOL.md` stay true, and code that
//! builds a [`Beacon`] by struct literal keeps compiling).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::id::{Incarnation, NodeId};
use crate::wire::addr_str;

/// First four bytes of every beacon.
pub const MAGIC: [u8; 4] = *b"CSTL";
/// The beacon envelope version this crate speaks.
pub const VERSION: u8 = 1;
/// Largest beacon we send or accept, in bytes (fits any path MTU we care about
/// without IP fragmentation).
pub const MAX_BEACON: usize = 1200;
/// Size of the fixed header before the body.
pub const HEADER_LEN: usize = 8;
/// Flag: the body is sealed with the cluster secret and a trailer follows.
pub const FLAG_SEALED: u8 = 0x01;
/// Every flag this build understands; the other bits are reserved and must
/// be zero.
pub const KNOWN_FLAGS: u8 = FLAG_SEALED;

/// What a beacon is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BeaconKind {
    /// Periodic (and first) multicast announcement.
    Announce,
    /// Unicast answer to a newcomer's announcement, so that it learns about
    /// existing nodes within one round trip instead of one beacon interval.
    Reply,
    /// Goodbye sent on graceful shutdown.
    Leave,
}

impl BeaconKind {
    /// The wire name of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            BeaconKind::Announce => "announce",
            BeaconKind::Reply => "reply",
            BeaconKind::Leave => "leave",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "announce" => Some(BeaconKind::Announce),
            "reply" => Some(BeaconKind::Reply),
            "leave" => Some(BeaconKind::Leave),
            _ => None,
        }
    }
}

/// A decoded beacon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    /// Cluster name; beacons of other clusters are dropped by the receiver.
    pub cluster: String,
    /// Sender's node id.
    pub id: NodeId,
    /// Sender's incarnation (grows with every start).
    pub incarnation: Incarnation,
    /// Sender's human name.
    pub name: String,
    /// The TCP data address peers should dial: text on the wire
    /// (`"192.0.2.10:6777"`, `"[fd00::1]:6777"`), always without an IPv6
    /// scope id (the receiver scopes a link-local address itself).
    pub addr: SocketAddr,
    /// Announce, reply or leave.
    pub kind: BeaconKind,
    /// [`crate::tags_digest`] of the sender's tags.
    pub digest: u64,
}

/// Optional body fields added after the first release.
///
/// Each is `None` when absent on the wire, and is left out of the encoding
/// when `None`: a beacon with default extensions is byte-for-byte the beacon
/// an older build sends, and an older build ignores the keys it does not
/// know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// `ivl`: the sender's current mean beacon interval, sent only while it
    /// differs from the sender's configured one (the interval grows with the
    /// number of members, see `PROTOCOL.md`, "Beacon pacing"). Absent means
    /// "the configured default": a receiver then assumes its own configured
    /// interval, as it always did. Whole milliseconds on the wire; a
    /// receiver bounds what it believes of it (the value is not trusted).
    pub interval: Option<Duration>,
}

/// Why a datagram is not a beacon (or a beacon cannot be encoded). Every
/// variant leaves the receiver's state untouched: the datagram is dropped and
/// counted under [`BeaconError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum BeaconError {
    /// Shorter than the fixed header, or shorter than its body length says.
    #[error("truncated beacon ({len} bytes)")]
    Truncated {
        /// Datagram length.
        len: usize,
    },
    /// Does not start with [`MAGIC`]: not ours at all.
    #[error("bad magic")]
    BadMagic,
    /// A beacon version this build does not speak.
    #[error("unsupported beacon version {0}")]
    UnsupportedVersion(u8),
    /// A flag bit outside [`KNOWN_FLAGS`] is set: the sender means something
    /// this build cannot read, so the datagram is refused, not guessed at.
    #[error("reserved beacon flag bits set (flags {0:#04x})")]
    ReservedFlags(u8),
    /// Over [`MAX_BEACON`] bytes (decoding), or would be (encoding).
    #[error("beacon of {len} bytes exceeds the {MAX_BEACON}-byte limit")]
    TooLarge {
        /// Offending length.
        len: usize,
    },
    /// The body is not a valid msgpack beacon map.
    #[error("malformed beacon body: {0}")]
    Malformed(String),
    /// A `kind` this build does not know.
    #[error("unknown beacon kind {0:?}")]
    UnknownKind(String),
    /// The beacon is sealed with a cluster secret that this receiver does not
    /// hold, or this receiver has no secret at all: a security mismatch.
    #[error("sealed beacon but this node has no cluster secret (security mismatch)")]
    Sealed,
    /// An unsealed beacon reached a node that has a cluster secret: a
    /// security mismatch (a node with a secret never accepts plaintext).
    #[error("unsealed beacon but this node requires the cluster secret (security mismatch)")]
    Unsealed,
    /// Sealed, but no installed key opens it: another secret, or tampering.
    #[error("sealed beacon not authenticated by any installed key")]
    AuthFailed,
    /// Authenticated, but not newer than the last beacon from its sender.
    #[error("replayed beacon")]
    Replayed,
    /// Authenticated, but sent outside the replay window of our clock.
    #[error("stale beacon (sent {skew_ms} ms from this node's clock)")]
    Stale {
        /// Send time minus the receiver's clock, in ms.
        skew_ms: i128,
    },
    /// Bytes after the body of an unsealed beacon.
    #[error("{0} unexpected bytes after the beacon body")]
    Trailing(usize),
    /// The sender's name or cluster name breaks the charset or length rules
    /// ([`crate::id::check_name`]).
    #[error("beacon refused: {0}")]
    Identity(#[from] crate::id::IdentityError),
    /// Encoding failed (a value msgpack cannot represent).
    #[error("cannot encode beacon: {0}")]
    Encode(String),
    /// Socket error, only from codec drivers that read the socket themselves.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl BeaconError {
    /// A short, stable label for drop counters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            BeaconError::Truncated { .. } => "truncated",
            BeaconError::BadMagic => "bad_magic",
            BeaconError::UnsupportedVersion(_) => "version",
            BeaconError::ReservedFlags(_) => "reserved_flags",
            BeaconError::TooLarge { .. } => "too_large",
            BeaconError::Malformed(_) => "malformed",
            BeaconError::UnknownKind(_) => "unknown_kind",
            BeaconError::Sealed | BeaconError::Unsealed => "security_mismatch",
            BeaconError::AuthFailed => "auth",
            BeaconError::Replayed => "replay",
            BeaconError::Stale { .. } => "replay_window",
            BeaconError::Trailing(_) => "trailing_bytes",
            BeaconError::Identity(e) => e.reason(),
            BeaconError::Encode(_) => "encode",
            BeaconError::Io(_) => "io",
        }
    }
}

/// The msgpack body as it is on the wire. Field names are the wire names.
#[derive(Serialize, Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    cluster: Cow<'a, str>,
    id: NodeId,
    inc: Incarnation,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(with = "addr_str")]
    addr: SocketAddr,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    digest: u64,
    /// [`Extensions::interval`] in ms. Skipped when absent, so that the map
    /// (its length byte included) is the one older builds send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ivl: Option<u64>,
}

/// The parsed fixed envelope of a beacon, body not yet decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Envelope flags ([`FLAG_SEALED`]; never a reserved bit).
    pub flags: u8,
    /// The body bytes (msgpack, or ciphertext when sealed).
    pub body: &'a [u8],
    /// Bytes after the body (empty unless sealed).
    pub trailer: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Checks size, magic, version, flags and lengths of one whole datagram.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, BeaconError> {
        let len = datagram.len();
        if len > MAX_BEACON {
            return Err(BeaconError::TooLarge { len });
        }
        if len < HEADER_LEN {
            // Too short to carry a magic we could compare: call it bad magic
            // only when what is there already differs.
            if !MAGIC.starts_with(&datagram[..len.min(4)]) {
                return Err(BeaconError::BadMagic);
            }
            return Err(BeaconError::Truncated { len });
        }
        let mut hdr = &datagram[..HEADER_LEN];
        if hdr[..4] != MAGIC {
            return Err(BeaconError::BadMagic);
        }
        hdr.advance(4);
        let version = hdr.get_u8();
        if version != VERSION {
            return Err(BeaconError::UnsupportedVersion(version));
        }
        let flags = hdr.get_u8();
        if flags & !KNOWN_FLAGS != 0 {
            return Err(BeaconError::ReservedFlags(flags));
        }
        let body_len = hdr.get_u16() as usize;
        let rest = &datagram[HEADER_LEN..];
        if rest.len() < body_len {
            return Err(BeaconError::Truncated { len });
        }
        let (body, trailer) = rest.split_at(body_len);
        Ok(Envelope {
            flags,
            body,
            trailer,
        })
    }
}

impl Beacon {
    /// Encodes this beacon as one unsealed datagram. Refuses (rather than
    /// truncating) anything over [`MAX_BEACON`].
    pub fn encode(&self) -> Result<Bytes, BeaconError> {
        self.encode_with(&Extensions::default())
    }

    /// Encodes this beacon with `ext` as one unsealed datagram.
    pub fn encode_with(&self, ext: &Extensions) -> Result<Bytes, BeaconError> {
        let body = self.encode_body_with(ext)?;
        seal_envelope(0, &body, &[])
    }

    /// The msgpack body alone (what a sealing layer encrypts).
    pub fn encode_body(&self) -> Result<Vec<u8>, BeaconError> {
        self.encode_body_with(&Extensions::default())
    }

    /// The msgpack body with `ext`.
    pub fn encode_body_with(&self, ext: &Extensions) -> Result<Vec<u8>, BeaconError> {
        let body = Body {
            cluster: Cow::Borrowed(&self.cluster),
            id: self.id,
            inc: self.incarnation,
            name: Cow::Borrowed(&self.name),
            // A scope id is an interface index of the sender's host: the
            // receiver scopes a link-local address by where it arrived.
            addr: crate::addr_rule::unscoped(self.addr),
            kind: Cow::Borrowed(self.kind.as_str()),
            digest: self.digest,
            // Saturates rather than wraps: no interval is near 2^64 ms.
            ivl: ext
                .interval
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        rmp_serde::to_vec_named(&body).map_err(|e| BeaconError::Encode(e.to_string()))
    }

    /// Decodes one whole unsealed datagram.
    pub fn decode(datagram: &[u8]) -> Result<Self, BeaconError> {
        Self::decode_with(datagram).map(|(b, _)| b)
    }

    /// Decodes one whole unsealed datagram with its [`Extensions`].
    pub fn decode_with(datagram: &[u8]) -> Result<(Self, Extensions), BeaconError> {
        let env = Envelope::parse(datagram)?;
        if env.flags & FLAG_SEALED != 0 {
            return Err(BeaconError::Sealed);
        }
        if !env.trailer.is_empty() {
            return Err(BeaconError::Trailing(env.trailer.len()));
        }
        Self::decode_body_with(env.body)
    }

    /// Decodes a msgpack body (already opened, if it was sealed).
    pub fn decode_body(body: &[u8]) -> Result<Self, BeaconError> {
        Self::decode_body_with(body).map(|(b, _)| b)
    }

    /// Decodes a msgpack body with its [`Extensions`].
    pub fn decode_body_with(body: &[u8]) -> Result<(Self, Extensions), BeaconError> {
        let mut rest = body;
        let raw: Body<'_> = Deserialize::deserialize(&mut rmp_serde::Deserializer::new(&mut rest))
            .map_err(|e| BeaconError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(BeaconError::Malformed(format!(
                "{} bytes after the body map",
                rest.len()
            )));
        }
        let kind = BeaconKind::parse(&raw.kind)
            .ok_or_else(|| BeaconError::UnknownKind(raw.kind.clone().into_owned()))?;
        crate::id::check_name(&raw.name)?;
        crate::id::check_name(&raw.cluster)?;
        let ext = Extensions {
            interval: raw.ivl.map(Duration::from_millis),
        };
        let beacon = Beacon {
            cluster: raw.cluster.into_owned(),
            id: raw.id,
            incarnation: raw.inc,
            name: raw.name.into_owned(),
            addr: crate::addr_rule::unscoped(raw.addr),
            kind,
            digest: raw.digest,
        };
        Ok((beacon, ext))
    }
}

/// Builds `magic | version | flags | len | body | trailer`, refusing anything
/// over [`MAX_BEACON`].
pub fn seal_envelope(flags: u8, body: &[u8], trailer: &[u8]) -> Result<Bytes, BeaconError> {
    let len = HEADER_LEN + body.len() + trailer.len();
    if len > MAX_BEACON {
        return Err(BeaconError::TooLarge { len });
    }
    let mut out = BytesMut::with_capacity(len);
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(flags);
    // Cannot overflow: body.len() < MAX_BEACON < u16::MAX.
    out.put_u16(body.len() as u16);
    out.put_slice(body);
    out.put_slice(trailer);
    Ok(out.freeze())
}

/// tokio-util codec for beacons. `decode` takes the *whole* buffer as one
/// datagram, valid or not; an empty buffer (no datagram) is `Ok(None)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BeaconCodec;

impl Decoder for BeaconCodec {
    type Item = Beacon;
    type Error = BeaconError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Beacon>, BeaconError> {
        if src.is_empty() {
            return Ok(None);
        }
        let datagram = src.split();
        Beacon::decode(&datagram).map(Some)
    }
}

impl Encoder<&Beacon> for BeaconCodec {
    type Error = BeaconError;

    fn encode(&mut self, item: &Beacon, dst: &mut BytesMut) -> Result<(), BeaconError> {
        dst.put_slice(&item.encode()?);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample(kind: BeaconKind) -> Beacon {
        Beacon {
            cluster: "default".into(),
            id: NodeId(0x00112233445566778899aabbccddeeff),
            incarnation: 1_764_000_000_000,
            name: "node1".into(),
            addr: "192.0.2.10:6777".parse().unwrap(),
            kind,
            digest: 0x1234,
        }
    }

    #[test]
    fn ipv6_addresses_travel_as_text_without_their_scope() {
        let mut b = sample(BeaconKind::Announce);
        b.addr = "[fd00::1]:7947".parse().unwrap();
        let bytes = b.encode().unwrap();
        assert!(bytes.windows(14).any(|w| w == b"[fd00::1]:7947"));
        assert_eq!(Beacon::decode(&bytes).unwrap(), b);
        b.addr = "[fe80::1%7]:7947".parse().unwrap();
        let back = Beacon::decode(&b.encode().unwrap()).unwrap();
        assert_eq!(back.addr, "[fe80::1]:7947".parse().unwrap());
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in [BeaconKind::Announce, BeaconKind::Reply, BeaconKind::Leave] {
            let b = sample(kind);
            let bytes = b.encode().unwrap();
            assert_eq!(&bytes[..4], b"CSTL");
            assert_eq!(bytes[4], VERSION);
            assert_eq!(Beacon::decode(&bytes).unwrap(), b);
        }
    }

    #[test]
    fn codec_consumes_whole_datagram_even_when_invalid() {
        let mut codec = BeaconCodec;
        let mut buf = BytesMut::from(&b"CSTL\x01\x00\x00\x05garbage"[..]);
        assert!(codec.decode(&mut buf).is_err());
        assert!(buf.is_empty());
        let mut buf = BytesMut::new();
        assert!(matches!(codec.decode(&mut buf), Ok(None)));
    }

    #[test]
    fn typed_errors() {
        let good = sample(BeaconKind::Announce).encode().unwrap();
        assert!(matches!(
            Beacon::decode(b"XXXXXXXXXX"),
            Err(BeaconError::BadMagic)
        ));
        assert!(matches!(
            Beacon::decode(b"CST"),
            Err(BeaconError::Truncated { .. })
        ));
        let mut v = good.to_vec();
        v[4] = 9;
        assert!(matches!(
            Beacon::decode(&v),
            Err(BeaconError::UnsupportedVersion(9))
        ));
        let mut v = good.to_vec();
        v[5] = FLAG_SEALED;
        assert!(matches!(Beacon::decode(&v), Err(BeaconError::Sealed)));
        for bit in 1..8 {
            let mut v = good.to_vec();
            v[5] = 1 << bit;
            let err = Beacon::decode(&v).unwrap_err();
            assert!(matches!(err, BeaconError::ReservedFlags(f) if f == 1 << bit));
            assert_eq!(err.reason(), "reserved_flags");
        }
        let mut v = good.to_vec();
        v.push(0);
        assert!(matches!(Beacon::decode(&v), Err(BeaconError::Trailing(1))));
        assert!(matches!(
            Beacon::decode(&good[..good.len() - 1]),
            Err(BeaconError::Truncated { .. })
        ));
        assert!(matches!(
            Beacon::decode(&vec![0u8; MAX_BEACON + 1]),
            Err(BeaconError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_kind_is_typed_and_unknown_fields_are_ignored() {
        #[derive(Serialize)]
        struct Future<'a> {
            cluster: &'a str,
            id: NodeId,
            inc: u64,
            name: &'a str,
            addr: &'a str,
            kind: &'a str,
            digest: u64,
            shiny_new_field: Vec<u32>,
        }
        let mut f = Future {
            cluster: "c",
            id: NodeId(5),
            inc: 1,
            name: "n",
            addr: "127.0.0.1:1",
            kind: "announce",
            digest: 0,
            shiny_new_field: vec![1, 2, 3],
        };
        let body = rmp_serde::to_vec_named(&f).unwrap();
        let b = Beacon::decode(&seal_envelope(0, &body, &[]).unwrap()).unwrap();
        assert_eq!(b.kind, BeaconKind::Announce);
        f.kind = "teleport";
        let body = rmp_serde::to_vec_named(&f).unwrap();
        let err = Beacon::decode(&seal_envelope(0, &body, &[]).unwrap()).unwrap_err();
        assert!(matches!(err, BeaconError::UnknownKind(k) if k == "teleport"));
    }

    /// The bytes of `sample(Announce)` as every build before the `ivl`
    /// field encoded them: default extensions must still give exactly these.
    const SAMPLE_ANNOUNCE: &str = "4353544c0100006b\
        87a7636c7573746572a764656661756c74a26964c410\
        00112233445566778899aabbccddeeff\
        a3696e63cf0000019ab697e800a46e616d65a56e6f646531\
        a461646472af3139322e302e322e31303a36373737\
        a46b696e64a8616e6e6f756e6365a6646967657374cd1234";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn default_extensions_encode_exactly_as_before() {
        let b = sample(BeaconKind::Announce);
        assert_eq!(hex(&b.encode().unwrap()), SAMPLE_ANNOUNCE);
        let with = b.encode_with(&Extensions::default()).unwrap();
        assert_eq!(hex(&with), SAMPLE_ANNOUNCE);
        let (back, ext) = Beacon::decode_with(&with).unwrap();
        assert_eq!((back, ext), (b, Extensions::default()));
    }

    #[test]
    fn the_interval_travels_as_ivl_and_older_decoders_ignore_it() {
        let b = sample(BeaconKind::Announce);
        let ext = Extensions {
            interval: Some(Duration::from_millis(2500)),
        };
        let bytes = b.encode_with(&ext).unwrap();
        // One more map entry, `ivl` = 2500 (uint 16).
        assert_eq!(bytes[8], 0x88);
        assert!(bytes.ends_with(&[0xa3, b'i', b'v', b'l', 0xcd, 0x09, 0xc4]));
        assert_eq!(Beacon::decode_with(&bytes).unwrap(), (b.clone(), ext));
        // What a build without the field sees: the same beacon.
        assert_eq!(Beacon::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn oversized_beacon_is_refused_not_truncated() {
        let mut b = sample(BeaconKind::Announce);
        b.name = "x".repeat(MAX_BEACON);
        assert!(matches!(b.encode(), Err(BeaconError::TooLarge { .. })));
    }

    #[test]
    fn names_with_control_characters_are_refused_and_counted() {
        for bad in ["e3\n", "\u{1b}[2Jboom", "", "a b"] {
            let mut b = sample(BeaconKind::Announce);
            b.name = bad.into();
            let bytes = b.encode().unwrap();
            let err = Beacon::decode(&bytes).unwrap_err();
            assert_eq!(err.reason(), "bad_name", "{bad:?}: {err}");
        }
    }

    pub(crate) fn arb_beacon() -> impl Strategy<Value = Beacon> {
        (
            "[a-z0-9-]{1,40}",
            any::<u128>(),
            any::<u64>(),
            "[A-Za-z0-9._-]{1,60}",
            any::<([u8; 4], u16)>(),
            prop_oneof![
                Just(BeaconKind::Announce),
                Just(BeaconKind::Reply),
                Just(BeaconKind::Leave)
            ],
            any::<u64>(),
        )
            .prop_map(
                |(cluster, id, inc, name, (ip, port), kind, digest)| Beacon {
                    cluster,
                    id: NodeId(id),
                    incarnation: inc,
                    name,
                    addr: SocketAddr::from((ip, port)),
                    kind,
                    digest,
                },
            )
    }

    proptest! {
        #[test]
        fn prop_encode_decode(b in arb_beacon()) {
            let bytes = b.encode().unwrap();
            prop_assert!(bytes.len() <= MAX_BEACON);
            prop_assert_eq!(Beacon::decode(&bytes).unwrap(), b);
        }

        /// Any interval round-trips, and a decoder that does not ask for
        /// the extensions reads the same beacon.
        #[test]
        fn prop_extensions_round_trip(b in arb_beacon(), ivl in proptest::option::of(any::<u32>())) {
            let ext = Extensions { interval: ivl.map(|ms| Duration::from_millis(ms.into())) };
            let bytes = b.encode_with(&ext).unwrap();
            prop_assert!(bytes.len() <= MAX_BEACON);
            prop_assert_eq!(Beacon::decode_with(&bytes).unwrap(), (b.clone(), ext));
            prop_assert_eq!(Beacon::decode(&bytes).unwrap(), b);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic_and_are_consumed(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut buf = BytesMut::from(&data[..]);
            let _outcome = BeaconCodec.decode(&mut buf); // any outcome but a panic is fine
            prop_assert!(buf.is_empty());
        }

        /// Any reserved bit, with or without SEALED, refuses the datagram
        /// before anything else of it is read.
        #[test]
        fn prop_reserved_flags_are_refused(b in arb_beacon(), flags in any::<u8>()) {
            let mut v = b.encode().unwrap().to_vec();
            v[5] = flags;
            let got = Beacon::decode(&v);
            if flags & !KNOWN_FLAGS != 0 {
                prop_assert!(matches!(got, Err(BeaconError::ReservedFlags(f)) if f == flags));
            } else if flags & FLAG_SEALED != 0 {
                prop_assert!(matches!(got, Err(BeaconError::Sealed)));
            } else {
                prop_assert_eq!(got.unwrap(), b);
            }
        }

        #[test]
        fn prop_mutated_beacons_never_panic(b in arb_beacon(), idx in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut v = b.encode().unwrap().to_vec();
            let i = idx.index(v.len());
            v[i] = byte;
            let _outcome = Beacon::decode(&v); // must return, valid or not
        }
    }
}
