//! Serde helpers shared by the beacon and frame bodies.

/// `SocketAddr` as its text form (`"192.0.2.1:6777"`, `"[fe80::1]:6777"`),
/// so that a hex dump of a beacon is readable and non-Rust implementations
/// need no enum layout.
///
/// An IPv6 scope id never crosses the wire: it is an index of one host's
/// interfaces, meaningless to the receiver. Addresses are encoded without
/// it (and without flow info), and a decoded address has none even when
/// the sender wrote one; the receiver gives a link-local address the scope
/// of the link it learnt it on (`addr_rule::scoped_like`).
pub(crate) mod addr_str {
    use std::net::SocketAddr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    use crate::addr_rule::unscoped;

    pub fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&unscoped(*addr))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map(unscoped).map_err(de::Error::custom)
    }

    #[cfg(test)]
    mod tests {
        use std::net::{SocketAddr, SocketAddrV6};

        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Rec {
            #[serde(with = "super")]
            addr: SocketAddr,
        }

        #[test]
        fn scope_ids_never_cross_the_wire() {
            let scoped = SocketAddrV6::new("fe80::1".parse().unwrap(), 6777, 7, 3);
            let bytes = rmp_serde::to_vec_named(&Rec {
                addr: scoped.into(),
            })
            .unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.contains("[fe80::1]:6777"), "{text}");
            assert!(!text.contains('%'), "no scope encoded: {text}");
            let back: Rec = rmp_serde::from_slice(&bytes).unwrap();
            let SocketAddr::V6(v6) = back.addr else {
                panic!("{back:?}")
            };
            assert_eq!((v6.scope_id(), v6.flowinfo()), (0, 0));
            assert_eq!(v6.ip(), scoped.ip());

            // A scope written by another sender is dropped on decoding.
            let foreign =
                rmp_serde::to_vec_named(&serde_json::json!({"addr": "[fe80::2%9]:1"})).unwrap();
            let back: Rec = rmp_serde::from_slice(&foreign).unwrap();
            assert_eq!(back.addr, "[fe80::2]:1".parse::<SocketAddr>().unwrap());
            assert_eq!(back.addr.to_string(), "[fe80::2]:1");

            // IPv4 and global IPv6 go through unchanged.
            for a in ["192.0.2.1:6777", "[2001:db8::1]:6777"] {
                let addr: SocketAddr = a.parse().unwrap();
                let bytes = rmp_serde::to_vec_named(&Rec { addr }).unwrap();
                assert_eq!(rmp_serde::from_slice::<Rec>(&bytes).unwrap().addr, addr);
            }
        }
    }
}
