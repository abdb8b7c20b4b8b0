//! Node identity.
//!
//! A node is a [`NodeId`] (128 random bits chosen at every process start) plus
//! an [`Incarnation`] (a number that grows with every start, so that a restarted
//! node's announcements replace its old entry everywhere). Names are for
//! people and are not unique by construction; ids are.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A node's metadata: `--tag KEY=VALUE` pairs, kept sorted so that digests
/// and renderings are stable.
pub type Tags = BTreeMap<String, String>;

/// A number that increases with every start of a node. Derived from wall-clock
/// milliseconds at start by the daemon, so it grows across restarts without
/// any state on disk; the protocol only relies on "greater means newer".
pub type Incarnation = u64;

/// A node's 128-bit identity, shown as 32 lowercase hex digits.
///
/// On the wire it is a 16-byte msgpack `bin` (big-endian), which is smaller
/// than the hex string and keeps beacons compact.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeId(pub u128);

impl NodeId {
    /// A fresh random id.
    pub fn random() -> Self {
        NodeId(rand::random())
    }

    /// The first 8 hex digits, for tables and log lines.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }

    /// True when `prefix` (lowercase or uppercase hex) is a prefix of this
    /// id's hex form.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.to_string().starts_with(&prefix.to_ascii_lowercase())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Why a string is not a [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a node id is 32 hex digits")]
pub struct ParseNodeIdError;

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseNodeIdError);
        }
        u128::from_str_radix(s, 16)
            .map(NodeId)
            .map_err(|_| ParseNodeIdError)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0.to_be_bytes())
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl<'de> Visitor<'de> for IdVisitor {
            type Value = NodeId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("16 bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<NodeId, E> {
                let bytes: [u8; 16] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(NodeId(u128::from_be_bytes(bytes)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<NodeId, A::Error> {
                // Some msgpack writers emit short byte strings as arrays.
                let mut bytes = [0u8; 16];
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(de::Error::invalid_length(17, &self));
                }
                Ok(NodeId(u128::from_be_bytes(bytes)))
            }
        }
        deserializer.deserialize_bytes(IdVisitor)
    }
}

/// A 64-bit digest of a node's tags, carried in beacons so that peers notice
/// a metadata change without the tags themselves (which may be large) being
/// in every datagram. SHA-256 over `key=value\n` lines in key order,
/// truncated to the first 8 bytes (big-endian). An empty tag set digests to 0.
pub fn tags_digest(tags: &Tags) -> u64 {
    if tags.is_empty() {
        return 0;
    }
    let mut hasher = Sha256::new();
    for (k, v) in tags {
        hasher.update(k.as_bytes());
        hasher.update(b"=");
        hasher.update(v.as_bytes());
        hasher.update(b"\n");
    }
    let out = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// Longest node or cluster name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest tag key, in bytes.
pub const MAX_TAG_KEY_LEN: usize = 64;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 256;
/// How far ahead of the receiver's wall clock an incarnation may be. A
/// node's incarnation is its start time in wall-clock milliseconds, so a
/// value far in the future is a broken clock or a forgery meant to outrank
/// every later restart of a real node.
pub const MAX_INCARNATION_AHEAD_MS: u64 = 60_000;

/// Why a name, tag or incarnation from the wire (or a flag) is refused. The
/// input carrying it is dropped and counted; no state changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Empty or longer than [`MAX_NAME_LEN`].
    #[error("a name must be 1 to {MAX_NAME_LEN} bytes")]
    NameLength,
    /// A character outside `A-Z a-z 0-9 - _ .`.
    #[error("a name may contain only letters, digits, '-', '_' and '.'")]
    NameCharset,
    /// Empty key, key longer than [`MAX_TAG_KEY_LEN`], or value longer than
    /// [`MAX_TAG_VALUE_LEN`].
    #[error(
        "a tag key must be 1 to {MAX_TAG_KEY_LEN} bytes and a value at most {MAX_TAG_VALUE_LEN}"
    )]
    TagLength,
    /// A key character outside `A-Z a-z 0-9 - _ . / :`.
    #[error("a tag key may contain only letters, digits, '-', '_', '.', '/' and ':'")]
    TagKeyCharset,
    /// A control character (C0, DEL or C1) in a value.
    #[error("a tag value must not contain control characters")]
    TagValueControl,
    /// An incarnation more than [`MAX_INCARNATION_AHEAD_MS`] ahead of the
    /// receiver's clock, or the largest value (which nothing could outrank).
    #[error("incarnation {0} is in the future")]
    IncarnationAhead(Incarnation),
}

impl IdentityError {
    /// A short, stable label for drop counters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::NameLength | IdentityError::NameCharset => "bad_name",
            IdentityError::TagLength
            | IdentityError::TagKeyCharset
            | IdentityError::TagValueControl => "bad_tag",
            IdentityError::IncarnationAhead(_) => "incarnation_ahead",
        }
    }
}

/// Checks a node or cluster name: 1 to 64 bytes of ASCII letters, digits,
/// `-`, `_` and `.` (what a hostname reduces to). Nothing else can reach a
/// terminal or a log line raw.
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(IdentityError::NameLength);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(IdentityError::NameCharset);
    }
    Ok(())
}

/// Checks one tag: the key is 1 to 64 bytes of ASCII letters, digits and
/// `-_./:`; the value at most 256 bytes of UTF-8 without control characters.
pub fn check_tag(key: &str, value: &str) -> Result<(), IdentityError> {
    if key.is_empty() || key.len() > MAX_TAG_KEY_LEN || value.len() > MAX_TAG_VALUE_LEN {
        return Err(IdentityError::TagLength);
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
    {
        return Err(IdentityError::TagKeyCharset);
    }
    if value.chars().any(char::is_control) {
        return Err(IdentityError::TagValueControl);
    }
    Ok(())
}

/// Checks every tag of a set ([`check_tag`]).
pub fn check_tags(tags: &Tags) -> Result<(), IdentityError> {
    tags.iter().try_for_each(|(k, v)| check_tag(k, v))
}

/// Checks that `incarnation` is not from the future: at most
/// [`MAX_INCARNATION_AHEAD_MS`] past `wall_now_ms` (the receiver's wall
/// clock, in ms since the Unix epoch), and never `u64::MAX`.
pub fn check_incarnation(incarnation: Incarnation, wall_now_ms: u64) -> Result<(), IdentityError> {
    if incarnation == u64::MAX || incarnation > wall_now_ms.saturating_add(MAX_INCARNATION_AHEAD_MS)
    {
        return Err(IdentityError::IncarnationAhead(incarnation));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hex_round_trip_and_short_form() {
        let id = NodeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.to_string(), "0123456789abcdef0011223344556677");
        assert_eq!(id.short(), "01234567");
        assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
        assert!(id.has_prefix("0123456789AB"));
        assert!("xyz".parse::<NodeId>().is_err());
        assert!("0123".parse::<NodeId>().is_err());
    }

    #[test]
    fn id_msgpack_is_16_bytes_bin() {
        let id = NodeId(7);
        let bytes = rmp_serde::to_vec(&id).unwrap();
        assert_eq!(bytes.len(), 18, "bin8 marker + length + 16 bytes");
        assert_eq!(rmp_serde::from_slice::<NodeId>(&bytes).unwrap(), id);
    }

    #[test]
    fn digest_is_stable_and_sensitive() {
        let mut t = Tags::new();
        assert_eq!(tags_digest(&t), 0);
        t.insert("role".into(), "db".into());
        let d1 = tags_digest(&t);
        assert_ne!(d1, 0);
        assert_eq!(d1, tags_digest(&t.clone()));
        t.insert("role".into(), "web".into());
        assert_ne!(d1, tags_digest(&t));
    }

    #[test]
    fn names_and_tags_have_a_charset_and_a_length() {
        assert_eq!(check_name("node-1.a_B"), Ok(()));
        assert_eq!(check_name(""), Err(IdentityError::NameLength));
        assert_eq!(check_name(&"a".repeat(65)), Err(IdentityError::NameLength));
        for bad in ["a b", "e3\n", "\u{1b}[2J", "n\u{7f}", "é", "a/b"] {
            assert_eq!(check_name(bad), Err(IdentityError::NameCharset), "{bad:?}");
        }
        assert_eq!(check_tag("app.kubernetes.io/name", "web server ✓"), Ok(()));
        assert_eq!(check_tag("", "v"), Err(IdentityError::TagLength));
        assert_eq!(
            check_tag("k", &"v".repeat(257)),
            Err(IdentityError::TagLength)
        );
        assert_eq!(check_tag("k k", "v"), Err(IdentityError::TagKeyCharset));
        assert_eq!(
            check_tag("k", "a\u{1b}b"),
            Err(IdentityError::TagValueControl)
        );
        assert_eq!(
            check_tag("k", "a\u{9b}b"),
            Err(IdentityError::TagValueControl)
        );
    }

    #[test]
    fn incarnations_from_the_future_are_refused() {
        let now = 1_700_000_000_000;
        assert_eq!(
            check_incarnation(now + MAX_INCARNATION_AHEAD_MS, now),
            Ok(())
        );
        assert_eq!(check_incarnation(1, now), Ok(()));
        assert!(check_incarnation(now + MAX_INCARNATION_AHEAD_MS + 1, now).is_err());
        assert!(check_incarnation(u64::MAX, u64::MAX).is_err());
    }
}
