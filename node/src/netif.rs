//! Choosing interfaces: names or addresses from the command line, or the
//! default-route interface; and what the chosen interfaces reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use discovery::Interface;

/// Why an `--interface` value cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// Listing the host's interfaces failed.
    #[error("cannot list network interfaces: {0}")]
    List(std::io::Error),
    /// No interface by that name, or no interface has that address.
    #[error("interface {0:?} does not exist or has no IP address")]
    Unknown(String),
    /// No default route to pick an interface from.
    #[error(
        "no default route to choose an interface from; pass --interface (e.g. --interface lo)"
    )]
    NoDefaultRoute,
}

/// The interfaces `--interface` chose.
#[derive(Debug, Default)]
pub struct Resolved {
    /// One entry per chosen interface, with the address beacons use: of
    /// the group's family when the interface has one (IPv6: a global or
    /// unique-local address before a link-local one), else its first
    /// address of the other family. An `--interface` given as an address
    /// is that address.
    pub interfaces: Vec<Interface>,
    /// Every address (both families) of the chosen interfaces with its
    /// prefix length: the subnets of the address rule.
    pub prefixes: Vec<(IpAddr, u8)>,
    /// Values that did not resolve (the caller warns and goes on; fatal
    /// only when nothing resolved).
    pub missing: Vec<IfaceError>,
}

/// Resolves each `--interface` value (a name such as `lo`, `eth1`, or an
/// address of either family) for a group of the given family.
pub fn resolve(values: &[String], ipv6: bool) -> Result<Resolved, IfaceError> {
    let all = if_addrs::get_if_addrs().map_err(IfaceError::List)?;
    let wanted: Vec<String> = if values.is_empty() {
        vec![default_route_interface(ipv6)?]
    } else {
        values.to_vec()
    };
    let entry = |i: &if_addrs::Interface| Interface {
        name: i.name.clone(),
        addr: i.ip(),
        prefix: prefix_of(&i.addr),
        index: i.index.unwrap_or(0),
    };
    // Preference among one interface's addresses: the group's family
    // first; within IPv6, routable before link-local.
    let rank = |i: &if_addrs::Interface| {
        let family = u8::from(i.ip().is_ipv6() != ipv6);
        let link_local = match i.ip() {
            IpAddr::V6(a) => u8::from(proto::addr_rule::is_link_local6(a)),
            IpAddr::V4(_) => 0,
        };
        (family, link_local)
    };
    let mut out = Resolved::default();
    for w in wanted {
        let hit = match w
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => all.iter().find(|i| i.ip() == ip),
            Err(_) => all.iter().filter(|i| i.name == w).min_by_key(|i| rank(i)),
        };
        match hit {
            Some(i) => {
                let e = entry(i);
                if !out.interfaces.contains(&e) {
                    out.interfaces.push(e);
                }
                for a in all.iter().filter(|a| a.name == i.name) {
                    let p = (a.ip(), prefix_of(&a.addr));
                    if !out.prefixes.contains(&p) {
                        out.prefixes.push(p);
                    }
                }
            }
            None => out.missing.push(IfaceError::Unknown(w)),
        }
    }
    Ok(out)
}

fn prefix_of(a: &if_addrs::IfAddr) -> u8 {
    match a {
        if_addrs::IfAddr::V4(v) => u32::from(v.netmask).leading_ones() as u8,
        if_addrs::IfAddr::V6(v) => u128::from(v.netmask).leading_ones() as u8,
    }
}

/// The kernel index of the interface called `name`, if there is one.
pub fn index_of(name: &str) -> Option<u32> {
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .find(|i| i.name == name)
        .and_then(|i| i.index)
}

/// The interface of the default route, from `/proc/net/ipv6_route` for an
/// IPv6 group (falling back to IPv4's), else `/proc/net/route`.
fn default_route_interface(ipv6: bool) -> Result<String, IfaceError> {
    let v6 = || {
        std::fs::read_to_string("/proc/net/ipv6_route")
            .ok()
            .and_then(|t| parse_default_route6(&t))
    };
    let v4 = || {
        std::fs::read_to_string("/proc/net/route")
            .ok()
            .and_then(|t| parse_default_route(&t))
    };
    let found = if ipv6 { v6().or_else(v4) } else { v4() };
    found.ok_or(IfaceError::NoDefaultRoute)
}

fn parse_default_route(table: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let iface = cols.next()?;
        let dest = cols.next()?;
        (dest == "00000000").then(|| iface.to_string())
    })
}

fn parse_default_route6(table: &str) -> Option<String> {
    parse_routes6_all(table)
        .into_iter()
        .find(|(_, c)| c.prefix() == 0)
        .map(|(iface, _)| iface)
}

/// Every usable route of `/proc/net/ipv6_route`, as (interface, network).
/// Columns: destination, its prefix length, source, its prefix length,
/// next hop, metric, refcount, use, flags, interface; addresses in hex.
fn parse_routes6_all(table: &str) -> Vec<(String, proto::addr_rule::Cidr)> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    table
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (dest, plen, flags, iface) =
                (cols.first()?, cols.get(1)?, cols.get(8)?, cols.get(9)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            if flags & RTF_UP == 0 || flags & RTF_REJECT != 0 {
                return None;
            }
            let dest = Ipv6Addr::from(u128::from_str_radix(dest, 16).ok()?);
            if dest.is_multicast() {
                return None;
            }
            let plen = u8::from_str_radix(plen, 16).ok()?;
            Some((
                iface.to_string(),
                proto::addr_rule::Cidr::new(dest.into(), plen)?,
            ))
        })
        .collect()
}

/// The networks routed through the interfaces named in `names`: IPv4 from
/// the main table (`/proc/net/route`), IPv6 from `/proc/net/ipv6_route`;
/// a default route as `0.0.0.0/0` or `::/0`. What the node can reach
/// through the interfaces it was configured for, beyond their own subnets.
/// A table that cannot be read adds nothing.
pub fn routes_via(names: &[&str]) -> Vec<proto::addr_rule::Cidr> {
    let mut out = std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_routes(&t, names))
        .unwrap_or_default();
    if let Ok(t) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(parse_routes6(&t, names));
    }
    out
}

fn parse_routes6(table: &str, names: &[&str]) -> Vec<proto::addr_rule::Cidr> {
    parse_routes6_all(table)
        .into_iter()
        .filter(|(iface, _)| names.contains(&iface.as_str()))
        .map(|(_, c)| c)
        .collect()
}

fn parse_routes(table: &str, names: &[&str]) -> Vec<proto::addr_rule::Cidr> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...;
    // addresses are printed as the kernel's u32 in host byte order.
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, flags, mask) =
                (cols.first()?, cols.get(1)?, cols.get(3)?, cols.get(7)?);
            let flags = hex(flags)?;
            if !names.contains(iface) || flags & RTF_UP == 0 || flags & RTF_REJECT != 0 {
                return None;
            }
            let dest = Ipv4Addr::from(hex(dest)?.to_ne_bytes());
            let mask = Ipv4Addr::from(hex(mask)?.to_ne_bytes());
            proto::addr_rule::Cidr::new(dest.into(), u32::from(mask).count_ones() as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_through_the_named_interfaces_are_read_from_the_route_table() {
        // Little-endian host: 10.78.1.0/24 on veth0, default via veth0,
        // 198.51.100.0/24 on eth1 (a documentation range), a rejected route on veth0.
        let table =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                     veth0\t00000000\tFE014E0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     veth0\t00014E0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth1\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     veth0\t0000000B\t00000000\t0201\t0\t0\t0\t000000FF\t0\t0\t0\n";
        if cfg!(target_endian = "little") {
            let got: Vec<String> = parse_routes(table, &["veth0"])
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, ["0.0.0.0/0", "10.78.1.0/24"]);
            let eth1: Vec<String> = parse_routes(table, &["eth1"])
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(eth1, ["198.51.100.0/24"]);
        }
        assert!(parse_routes(table, &["lo"]).is_empty());
        assert!(parse_routes("Iface\tDestination\n", &["veth0"]).is_empty());
    }

    #[test]
    fn default_route_is_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway\n\
                     eth1\t006433C6\t00000000\n\
                     ens3\t00000000\t016433C6\n";
        assert_eq!(parse_default_route(table), Some("ens3".into()));
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
    }

    #[test]
    fn ipv6_routes_are_read_from_the_ipv6_route_table() {
        // fd00:6::/64 on veth0, a default via veth0, fe80::/64 on veth0, an
        // unreachable default on lo (reject), a multicast route, and a
        // documentation prefix on eth1.
        let table = "\
fd000006000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 veth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000006000000000000000000000001 00000400 00000001 00000000 00000003 veth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 veth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 veth0
20010db8000000000000000000000000 20 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth1
";
        let got: Vec<String> = parse_routes6(table, &["veth0"])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["fd00:6::/64", "::/0", "fe80::/64"]);
        let eth1: Vec<String> = parse_routes6(table, &["eth1"])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(eth1, ["2001:db8::/32"]);
        assert!(
            parse_routes6(table, &["lo"]).is_empty(),
            "reject routes are not routes"
        );
        assert_eq!(parse_default_route6(table), Some("veth0".into()));
        assert_eq!(parse_default_route6("garbage\n"), None);
    }

    #[test]
    fn loopback_resolves_by_name_and_address() {
        let by_name = resolve(&["lo".into()], false).unwrap();
        assert_eq!(by_name.interfaces[0].addr, Ipv4Addr::LOCALHOST);
        assert!(by_name.prefixes.contains(&(Ipv4Addr::LOCALHOST.into(), 8)));
        let by_addr = resolve(&["127.0.0.1".into()], false).unwrap();
        assert_eq!(by_addr.interfaces[0].name, "lo");
        let none = resolve(&["no-such-if0".into()], false).unwrap();
        assert!(none.interfaces.is_empty());
        assert_eq!(none.missing.len(), 1);
        // For an IPv6 group, `lo` means ::1 where the host has it.
        let v6 = resolve(&["lo".into()], true).unwrap();
        let has_v6 = v6.prefixes.iter().any(|(a, _)| a.is_ipv6());
        assert_eq!(v6.interfaces[0].addr.is_ipv6(), has_v6);
        if has_v6 {
            assert_eq!(v6.interfaces[0].addr, IpAddr::from(Ipv6Addr::LOCALHOST));
            assert!(v6.interfaces[0].index > 0);
            let by_v6 = resolve(&["[::1]".into()], false).unwrap();
            assert_eq!(by_v6.interfaces[0].name, "lo");
        }
    }
}
