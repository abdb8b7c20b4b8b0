//! Serde helpers shared by the beacon and frame bodies.

/// `SocketAddr` as its text form (`"192.0.2.1:6777"`), so that a hex dump of
/// a beacon is readable and non-Rust implementations need no enum layout.
pub(crate) mod addr_str {
    use std::net::SocketAddr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(addr)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}
