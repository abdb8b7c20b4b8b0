//! The typed codes that travel in `reject` and `goodbye` frames.
//!
//! On the wire both are msgpack strings, exactly as they were before they
//! were typed (`"cluster"`, `"version"`, `"self"`, `"duplicate"`, and
//! `"shutdown"`), so that nodes of either build interoperate and
//! `PROTOCOL.md` stays true. A string this build does not know decodes to
//! the `Other` variant, keeping the text: a newer peer's code is reported,
//! never refused.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a link was refused: the `code` of a `reject` frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The peer speaks another protocol version (`"version"`).
    Version,
    /// The peer belongs to another cluster (`"cluster"`).
    Cluster,
    /// The peer is this node, reached through one of its own addresses
    /// (`"self"`).
    SelfDial,
    /// A link between the two nodes already exists and this one lost the
    /// tie-break (`"duplicate"`). Not an error: the other link carries on.
    Duplicate,
    /// Bounded overlay: neither node wants this link any more
    /// (`"not-neighbour"`). Not an error and no sign of trouble: both
    /// stay members, known to each other through the overlay.
    NotNeighbour,
    /// A code this build does not know, kept verbatim.
    Other(String),
}

impl RejectCode {
    /// The wire form.
    pub fn as_str(&self) -> &str {
        match self {
            RejectCode::Version => "version",
            RejectCode::Cluster => "cluster",
            RejectCode::SelfDial => "self",
            RejectCode::Duplicate => "duplicate",
            RejectCode::NotNeighbour => "not-neighbour",
            RejectCode::Other(s) => s,
        }
    }

    /// The drop-counter label when this node refuses a peer with this code
    /// (what `status` shows under `links_refused`).
    pub fn drop_reason(&self) -> &'static str {
        match self {
            RejectCode::Version => "version",
            RejectCode::Cluster => "cluster",
            RejectCode::SelfDial => "self",
            RejectCode::Duplicate | RejectCode::NotNeighbour | RejectCode::Other(_) => "rejected",
        }
    }
}

impl From<&str> for RejectCode {
    fn from(s: &str) -> Self {
        match s {
            "version" => RejectCode::Version,
            "cluster" => RejectCode::Cluster,
            "self" => RejectCode::SelfDial,
            "duplicate" => RejectCode::Duplicate,
            "not-neighbour" => RejectCode::NotNeighbour,
            other => RejectCode::Other(other.to_owned()),
        }
    }
}

impl From<String> for RejectCode {
    fn from(s: String) -> Self {
        match RejectCode::from(s.as_str()) {
            RejectCode::Other(_) => RejectCode::Other(s),
            known => known,
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with the wire form, so `code == "duplicate"` reads naturally
/// in tests and logs filters.
impl PartialEq<&str> for RejectCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for RejectCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RejectCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Whatever a `String` accepted before, this accepts.
        String::deserialize(d).map(RejectCode::from)
    }
}

/// Why a peer says goodbye: the `reason` of a `goodbye` frame. Every
/// goodbye means "the sender is leaving"; the reason is for logs (and for
/// later kinds of goodbye, which will get variants of their own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GoodbyeReason {
    /// The node is shutting down (`"shutdown"`).
    Shutdown,
    /// A reason this build does not know, kept verbatim (empty when the
    /// sender gave none).
    Other(String),
}

impl GoodbyeReason {
    /// The wire form.
    pub fn as_str(&self) -> &str {
        match self {
            GoodbyeReason::Shutdown => "shutdown",
            GoodbyeReason::Other(s) => s,
        }
    }
}

impl Default for GoodbyeReason {
    /// An absent `reason` field (it is optional on the wire).
    fn default() -> Self {
        GoodbyeReason::Other(String::new())
    }
}

impl From<&str> for GoodbyeReason {
    fn from(s: &str) -> Self {
        match s {
            "shutdown" => GoodbyeReason::Shutdown,
            other => GoodbyeReason::Other(other.to_owned()),
        }
    }
}

impl From<String> for GoodbyeReason {
    fn from(s: String) -> Self {
        match GoodbyeReason::from(s.as_str()) {
            GoodbyeReason::Other(_) => GoodbyeReason::Other(s),
            known => known,
        }
    }
}

impl fmt::Display for GoodbyeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for GoodbyeReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for GoodbyeReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for GoodbyeReason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(GoodbyeReason::from)
    }
}
