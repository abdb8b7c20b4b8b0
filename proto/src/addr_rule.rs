//! The address rule: which advertised data addresses a node may dial.
//!
//! A beacon (and a TCP hello) *says* where its sender listens; without a
//! cluster secret anyone on the group can say anything. Dialling whatever is
//! advertised lets a forged beacon make a node connect to itself
//! (`0.0.0.0:<own port>`), to a broadcast address, or to any host its default
//! route reaches, even when the node was told to stay on one interface.
//! [`AddrRule::check`] decides, from what the node knows without asking the
//! network:
//!
//! 1. never dialable, whatever the configuration: port 0, the unspecified
//!    address, multicast, the limited broadcast `255.255.255.255` and the
//!    directed broadcast of one of the node's own subnets; a loopback
//!    address said by a source that is not itself on loopback (another host's
//!    loopback is not ours); and an IPv6 link-local address without a scope
//!    id (the discovery driver gives a link-local beacon address the scope of
//!    the interface it arrived on);
//! 2. dialable when the address is the one the datagram (or connection) came
//!    from, or lies in the subnet of one of the node's interfaces (a loopback
//!    interface stands for all of `127.0.0.0/8`), or in a CIDR the operator
//!    allow-listed (`--allow-advertise`, for `--advertise` across NAT);
//! 3. refused otherwise ([`Refused::Unroutable`]).
//!
//! It is a pure function of its inputs (no IO, no clock, no state): the
//! discovery driver applies it to every beacon before the peer table sees it,
//! and the daemon can apply the same rule to addresses learned on links.
//! It does *not* prove anything: an allowed address may still be a lie
//! (identity is proven on the link); it only keeps a node's dials on the
//! networks it was configured for.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::str::FromStr;

/// The drop reason under which refused beacons are counted.
pub const DROP_REASON: &str = "address";

/// An IP network in CIDR notation (`10.0.0.0/8`, `192.0.2.7` = `/32`,
/// `2001:db8::/32`). The address is stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// Why a text is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IP address.
    #[error("{0:?} is not an IP address (expected ADDR[/PREFIX], e.g. 203.0.113.0/24)")]
    Address(String),
    /// The prefix length is not a number within the address family's width.
    #[error("prefix length {given:?} must be 0 to {max}")]
    Prefix {
        /// The text after `/`.
        given: String,
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },
}

impl Cidr {
    /// `addr/prefix`, host bits cleared; `None` if `prefix` is too long for
    /// the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = canonical(addr);
        let net = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask4(prefix)))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask6(prefix)))
            }
            _ => return None,
        };
        Some(Cidr { net, prefix })
    }

    /// The network address (host bits zero).
    pub fn network(&self) -> IpAddr {
        self.net
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network (an IPv4-mapped IPv6 address counts
    /// as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask4(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask6(self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| CidrError::Address(addr.to_string()))?;
        let max = if canonical(ip).is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| CidrError::Prefix {
                    given: p.to_string(),
                    max,
                })?,
        };
        Ok(Cidr::new(ip, prefix).expect("prefix checked against the family"))
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `addr` without an IPv6 scope id (and flow info): what goes on the wire,
/// since an interface index means nothing on another host.
pub fn unscoped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(*a.ip(), a.port(), 0, 0)),
        v4 => v4,
    }
}

/// A link-local IPv6 `addr` heard from `source` (a datagram's source or a
/// connection's peer address, scoped by the kernel to the interface it
/// arrived on) takes the source's scope id: the peer is on that link. Any
/// other address is returned as it is.
pub fn scoped_like(addr: SocketAddr, source: SocketAddr) -> SocketAddr {
    match (addr, source) {
        (SocketAddr::V6(a), SocketAddr::V6(s)) if is_link_local6(*a.ip()) && s.scope_id() != 0 => {
            SocketAddr::V6(SocketAddrV6::new(*a.ip(), a.port(), 0, s.scope_id()))
        }
        _ => addr,
    }
}

/// `fe80::/10`, the IPv6 link-local unicast range.
pub fn is_link_local6(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

fn mask4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// One of the node's own subnets: an interface address and its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Subnet {
    addr: IpAddr,
    net: Cidr,
}

impl Subnet {
    fn contains(&self, ip: IpAddr) -> bool {
        self.net.contains(ip)
    }

    /// The directed broadcast address, for IPv4 subnets that have one (/30
    /// and shorter: /31 and /32 have no host bits to spare). IPv6 has no
    /// broadcast.
    fn broadcast(&self) -> Option<Ipv4Addr> {
        let IpAddr::V4(net) = self.net.network() else {
            return None;
        };
        let host = !mask4(self.net.prefix());
        (host.count_ones() >= 2).then(|| Ipv4Addr::from(u32::from(net) | host))
    }
}

/// Why an advertised address may be dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// It is the address the datagram or connection came from.
    Source,
    /// It lies in the subnet of the interface with this address.
    Subnet {
        /// That interface's address.
        interface: IpAddr,
    },
    /// It lies in this allow-listed network.
    AllowList(Cidr),
}

/// Why an advertised address must not be dialled. Refusing changes no state:
/// the beacon (or hint) is dropped and counted under [`DROP_REASON`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Port 0 is nobody's listening port.
    #[error("port 0")]
    PortZero,
    /// `0.0.0.0` or `::`: dialling it reaches this host (the node itself).
    #[error("unspecified address")]
    Unspecified,
    /// A multicast address is not a TCP endpoint.
    #[error("multicast address")]
    Multicast,
    /// `255.255.255.255`, or the directed broadcast of one of our subnets.
    #[error("broadcast address")]
    Broadcast,
    /// A loopback address said by a source that is not on loopback: another
    /// host's loopback is not reachable from here, ours is not theirs.
    #[error("loopback address from a non-loopback source")]
    LoopbackFromRemote,
    /// An IPv6 link-local address (`fe80::/10`) without a scope id: which
    /// link it is on is unknown, and the kernel cannot dial it.
    #[error("IPv6 link-local address without a scope id")]
    LinkLocalUnscoped,
    /// Neither the source address, nor in one of our interfaces' subnets,
    /// nor allow-listed: reaching it would take a route the node was not
    /// configured for.
    #[error(
        "not routable through any configured interface, not the source address, not allow-listed"
    )]
    Unroutable,
}

/// The rule for one node: its interfaces and its allow-list. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrRule {
    subnets: Vec<Subnet>,
    allow: Vec<Cidr>,
}

impl AddrRule {
    /// The rule for a node on IPv4 `interfaces` (address, netmask) with the
    /// operator's `allow` list. A loopback interface covers `127.0.0.0/8`
    /// whatever its netmask says.
    pub fn new(
        interfaces: impl IntoIterator<Item = (Ipv4Addr, Ipv4Addr)>,
        allow: impl IntoIterator<Item = Cidr>,
    ) -> Self {
        Self::from_prefixes(
            interfaces
                .into_iter()
                .map(|(a, m)| (IpAddr::V4(a), u32::from(m).leading_ones() as u8)),
            allow,
        )
    }

    /// The rule for a node on `interfaces` of either family (address,
    /// prefix length) with the operator's `allow` list. An IPv4 loopback
    /// interface covers `127.0.0.0/8` whatever its prefix says; a prefix too
    /// long for the family is taken as a host route.
    pub fn from_prefixes(
        interfaces: impl IntoIterator<Item = (IpAddr, u8)>,
        allow: impl IntoIterator<Item = Cidr>,
    ) -> Self {
        let subnets = interfaces
            .into_iter()
            .map(|(addr, prefix)| {
                let addr = canonical(addr);
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = match addr {
                    IpAddr::V4(a) if a.is_loopback() => 8,
                    _ => prefix.min(max),
                };
                Subnet {
                    addr,
                    net: Cidr::new(addr, prefix).expect("prefix clamped to the family"),
                }
            })
            .collect();
        AddrRule {
            subnets,
            allow: allow.into_iter().collect(),
        }
    }

    /// The same rule with `more` networks allowed besides the allow-list
    /// (the daemon adds the networks routed through the node's interfaces
    /// for addresses that other nodes report over links).
    pub fn with_allowed(mut self, more: impl IntoIterator<Item = Cidr>) -> Self {
        self.allow.extend(more);
        self
    }

    /// The allow-list.
    pub fn allow_list(&self) -> &[Cidr] {
        &self.allow
    }

    /// Whether `advertised`, heard from `source` (the datagram's source or
    /// the connection's peer address), may be dialled. See the module docs
    /// for the order of the checks.
    pub fn check(&self, advertised: SocketAddr, source: IpAddr) -> Result<Allowed, Refused> {
        let ip = canonical(advertised.ip());
        let source = canonical(source);
        if advertised.port() == 0 {
            return Err(Refused::PortZero);
        }
        if ip.is_unspecified() {
            return Err(Refused::Unspecified);
        }
        if ip.is_multicast() {
            return Err(Refused::Multicast);
        }
        if let IpAddr::V4(v4) = ip {
            if v4.is_broadcast() || self.subnets.iter().any(|s| s.broadcast() == Some(v4)) {
                return Err(Refused::Broadcast);
            }
        }
        if ip.is_loopback() && !source.is_loopback() {
            return Err(Refused::LoopbackFromRemote);
        }
        if let (IpAddr::V6(v6), SocketAddr::V6(sa)) = (ip, advertised) {
            if is_link_local6(v6) && sa.scope_id() == 0 {
                return Err(Refused::LinkLocalUnscoped);
            }
        }
        if ip == source {
            return Ok(Allowed::Source);
        }
        if let Some(s) = self.subnets.iter().find(|s| s.contains(ip)) {
            return Ok(Allowed::Subnet { interface: s.addr });
        }
        if let Some(c) = self.allow.iter().find(|c| c.contains(ip)) {
            return Ok(Allowed::AllowList(*c));
        }
        Err(Refused::Unroutable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn lo() -> AddrRule {
        AddrRule::new([(Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0))], [])
    }

    fn lan() -> AddrRule {
        AddrRule::new(
            [(Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(255, 255, 255, 0))],
            ["203.0.113.0/24".parse().unwrap()],
        )
    }

    #[test]
    fn networks_allowed_later_widen_the_rule_but_never_the_forbidden_classes() {
        let wide = lan().with_allowed(["0.0.0.0/0".parse().unwrap()]);
        assert!(lan().check(sa("10.78.2.5:6777"), ip("10.78.2.4")).is_err());
        assert!(wide.check(sa("10.78.2.5:6777"), ip("10.78.2.4")).is_ok());
        for bad in [
            "127.0.0.1:6777",
            "239.1.2.3:6777",
            "10.1.2.255:6777",
            "10.78.2.5:0",
        ] {
            assert!(wide.check(sa(bad), ip("10.78.2.4")).is_err(), "{bad}");
        }
    }

    #[test]
    fn never_dialable_whatever_the_source() {
        let r = lan();
        let src = ip("10.1.2.9");
        assert_eq!(r.check(sa("10.1.2.9:0"), src), Err(Refused::PortZero));
        assert_eq!(r.check(sa("0.0.0.0:6777"), src), Err(Refused::Unspecified));
        assert_eq!(r.check(sa("[::]:6777"), src), Err(Refused::Unspecified));
        assert_eq!(r.check(sa("239.1.2.3:6777"), src), Err(Refused::Multicast));
        assert_eq!(r.check(sa("[ff02::1]:6777"), src), Err(Refused::Multicast));
        assert_eq!(
            r.check(sa("255.255.255.255:6777"), src),
            Err(Refused::Broadcast)
        );
        assert_eq!(r.check(sa("10.1.2.255:6777"), src), Err(Refused::Broadcast));
        assert_eq!(
            r.check(sa("127.0.0.1:6777"), src),
            Err(Refused::LoopbackFromRemote)
        );
        assert_eq!(
            r.check(sa("[::ffff:0.0.0.0]:6777"), src),
            Err(Refused::Unspecified),
            "a mapped address is judged as the IPv4 address it is"
        );
    }

    #[test]
    fn source_subnet_and_allow_list_are_the_only_ways_in() {
        let r = lan();
        let src = ip("10.1.2.9");
        assert_eq!(r.check(sa("10.1.2.9:6777"), src), Ok(Allowed::Source));
        assert_eq!(
            r.check(sa("10.1.2.50:6777"), src),
            Ok(Allowed::Subnet {
                interface: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))
            })
        );
        assert_eq!(
            r.check(sa("203.0.113.7:6777"), src),
            Ok(Allowed::AllowList("203.0.113.0/24".parse().unwrap()))
        );
        assert_eq!(r.check(sa("10.1.3.1:6777"), src), Err(Refused::Unroutable));
        assert_eq!(r.check(sa("198.51.100.1:9"), src), Err(Refused::Unroutable));
        // A source outside our subnets may still advertise itself (it is
        // where the datagram came from: routable back by definition).
        assert_eq!(
            r.check(sa("192.0.2.1:6777"), ip("192.0.2.1")),
            Ok(Allowed::Source)
        );
    }

    #[test]
    fn a_loopback_only_node_dials_loopback_only() {
        let r = lo();
        let src = ip("127.0.0.1");
        assert_eq!(r.check(sa("127.0.0.1:9"), src), Ok(Allowed::Source));
        assert!(matches!(
            r.check(sa("127.0.0.2:9"), src),
            Ok(Allowed::Subnet { .. })
        ));
        // Even when the interface reports a narrower mask.
        let narrow = AddrRule::new([(Ipv4Addr::LOCALHOST, Ipv4Addr::BROADCAST)], []);
        assert!(narrow.check(sa("127.9.9.9:9"), src).is_ok());
        assert_eq!(r.check(sa("198.51.100.1:9"), src), Err(Refused::Unroutable));
        assert_eq!(r.check(sa("0.0.0.0:6777"), src), Err(Refused::Unspecified));
        assert_eq!(
            r.check(sa("127.255.255.255:9"), src),
            Err(Refused::Broadcast)
        );
    }

    fn v6() -> AddrRule {
        AddrRule::from_prefixes(
            [(ip("fd00:6::1"), 64), (ip("fe80::1"), 64), (ip("::1"), 128)],
            [],
        )
    }

    #[test]
    fn ipv6_subnets_link_local_scopes_and_loopback() {
        let r = v6();
        let src = ip("fd00:6::9");
        assert_eq!(r.check(sa("[fd00:6::9]:6777"), src), Ok(Allowed::Source));
        assert_eq!(
            r.check(sa("[fd00:6::50]:6777"), src),
            Ok(Allowed::Subnet {
                interface: ip("fd00:6::1")
            })
        );
        assert_eq!(
            r.check(sa("[fd00:7::1]:6777"), src),
            Err(Refused::Unroutable)
        );
        assert_eq!(
            r.check(sa("[fe80::2]:6777"), ip("fe80::2")),
            Err(Refused::LinkLocalUnscoped)
        );
        assert_eq!(
            r.check(sa("[fe80::2%3]:6777"), ip("fe80::2")),
            Ok(Allowed::Source)
        );
        assert!(r.check(sa("[fe80::7%3]:6777"), src).is_ok());
        assert_eq!(
            r.check(sa("[::1]:6777"), src),
            Err(Refused::LoopbackFromRemote)
        );
        assert_eq!(r.check(sa("[::1]:6777"), ip("::1")), Ok(Allowed::Source));
        assert_eq!(r.check(sa("[ff02::1]:6777"), src), Err(Refused::Multicast));
        assert_eq!(r.check(sa("[::]:6777"), src), Err(Refused::Unspecified));
        // IPv4 rules are untouched by IPv6 subnets, and the reverse.
        assert_eq!(
            r.check(sa("10.0.0.1:1"), ip("10.0.0.2")),
            Err(Refused::Unroutable)
        );
        assert_eq!(
            lan().check(sa("[fd00:6::50]:1"), src),
            Err(Refused::Unroutable)
        );
        assert_eq!(
            scoped_like(sa("[fe80::2]:6777"), sa("[fe80::2%4]:5000")),
            sa("[fe80::2%4]:6777")
        );
        assert_eq!(
            scoped_like(sa("[fd00:6::2]:6777"), sa("[fe80::2%4]:5000")),
            sa("[fd00:6::2]:6777")
        );
        assert_eq!(unscoped(sa("[fe80::2%4]:6777")), sa("[fe80::2]:6777"));
        assert!(is_link_local6("febf::1".parse().unwrap()));
        assert!(!is_link_local6("fec0::1".parse().unwrap()));
    }

    #[test]
    fn point_to_point_subnets_have_no_broadcast() {
        let r = AddrRule::new(
            [(
                Ipv4Addr::new(10, 0, 0, 0),
                Ipv4Addr::new(255, 255, 255, 254),
            )],
            [],
        );
        assert!(r.check(sa("10.0.0.1:6777"), ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "10.9.8.7/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8", "host bits are cleared");
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().prefix(), 32);
        assert_eq!("2001:db8::/32".parse::<Cidr>().unwrap().prefix(), 32);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix(), 0);
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 32, .. })
        ));
        assert!(matches!(
            "example.com/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        assert!("::ffff:10.0.0.0/8"
            .parse::<Cidr>()
            .unwrap()
            .contains(ip("10.1.1.1")));
        assert!(!"10.0.0.0/8"
            .parse::<Cidr>()
            .unwrap()
            .contains(ip("2001:db8::1")));
    }

    fn arb_v4() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            any::<u32>().prop_map(Ipv4Addr::from),
            (0u8..4, any::<u8>()).prop_map(|(c, d)| Ipv4Addr::new(10, 1, c, d)),
            any::<u8>().prop_map(|d| Ipv4Addr::new(127, 0, 0, d)),
            Just(Ipv4Addr::UNSPECIFIED),
            Just(Ipv4Addr::BROADCAST),
        ]
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            4 => arb_v4().prop_map(IpAddr::V4),
            1 => arb_v4().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
            1 => any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    fn arb_cidr() -> impl Strategy<Value = Cidr> {
        prop_oneof![
            (arb_v4(), 0u8..=32).prop_map(|(a, p)| Cidr::new(IpAddr::V4(a), p).unwrap()),
            (any::<u128>(), 0u8..=128).prop_map(|(a, p)| Cidr::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                p
            )
            .unwrap()),
        ]
    }

    fn arb_rule() -> impl Strategy<Value = AddrRule> {
        (
            proptest::collection::vec((arb_v4(), 0u8..=32), 0..3),
            proptest::collection::vec(arb_cidr(), 0..3),
        )
            .prop_map(|(ifaces, allow)| {
                AddrRule::new(
                    ifaces
                        .into_iter()
                        .map(|(a, p)| (a, Ipv4Addr::from(mask4(p)))),
                    allow,
                )
            })
    }

    proptest! {
        /// Port 0, unspecified and multicast are refused under any rule.
        #[test]
        fn prop_never_dialable(rule in arb_rule(), a in arb_ip(), port in any::<u16>(), src in arb_ip()) {
            let c = canonical(a);
            let verdict = rule.check(SocketAddr::new(a, port), src);
            if port == 0 || c.is_unspecified() || c.is_multicast() {
                prop_assert!(verdict.is_err());
            }
        }

        /// Anything allowed is the source, in one of our subnets or in the
        /// allow-list; and never loopback unless the source is.
        #[test]
        fn prop_allowed_only_for_a_reason(rule in arb_rule(), a in arb_ip(), port in 1u16.., src in arb_ip()) {
            let c = canonical(a);
            match rule.check(SocketAddr::new(a, port), src) {
                Ok(Allowed::Source) => prop_assert_eq!(c, canonical(src)),
                Ok(Allowed::Subnet { interface }) => {
                    prop_assert!(rule.subnets.iter().any(|s| s.addr == interface && s.contains(c)));
                }
                Ok(Allowed::AllowList(cidr)) => prop_assert!(cidr.contains(c) && rule.allow.contains(&cidr)),
                Err(_) => {}
            }
            if rule.check(SocketAddr::new(a, port), src).is_ok() && c.is_loopback() {
                prop_assert!(canonical(src).is_loopback());
            }
        }

        /// A node on `lo` alone never dials outside 127.0.0.0/8 unless the
        /// address is the source's own (or allow-listed: none here).
        #[test]
        fn prop_loopback_node_stays_on_loopback(a in arb_ip(), port in 1u16.., last in any::<u8>()) {
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
            let c = canonical(a);
            if lo().check(SocketAddr::new(a, port), src).is_ok() {
                let IpAddr::V4(v4) = c else { panic!("{c} allowed on lo") };
                prop_assert_eq!(v4.octets()[0], 127);
            }
        }

        /// Widening the allow-list never refuses what was allowed.
        #[test]
        fn prop_allow_list_is_monotonic(rule in arb_rule(), extra in arb_cidr(), a in arb_ip(), port in any::<u16>(), src in arb_ip()) {
            let addr = SocketAddr::new(a, port);
            let mut wider = rule.clone();
            wider.allow.push(extra);
            if rule.check(addr, src).is_ok() {
                prop_assert!(wider.check(addr, src).is_ok());
            }
        }

        /// The text form parses back to the same network, which contains
        /// its own network address.
        #[test]
        fn prop_cidr_text_round_trips(c in arb_cidr()) {
            let back: Cidr = c.to_string().parse().unwrap();
            prop_assert_eq!(back, c);
            prop_assert!(c.contains(c.network()));
        }
    }
}
