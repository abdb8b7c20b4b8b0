//! Choosing interfaces: names or addresses from the command line, or the
//! default-route interface.

use std::net::Ipv4Addr;

use discovery::Interface;

/// Why an `--interface` value cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// Listing the host's interfaces failed.
    #[error("cannot list network interfaces: {0}")]
    List(std::io::Error),
    /// No interface by that name, or it has no IPv4 address.
    #[error("interface {0:?} does not exist or has no IPv4 address")]
    Unknown(String),
    /// No default route to pick an interface from.
    #[error(
        "no default route to choose an interface from; pass --interface (e.g. --interface lo)"
    )]
    NoDefaultRoute,
}

/// Resolves each `--interface` value. Values that do not resolve are
/// returned separately so the caller can warn and go on (fatal only when
/// none resolves).
pub fn resolve(values: &[String]) -> Result<(Vec<Interface>, Vec<IfaceError>), IfaceError> {
    let all = if_addrs::get_if_addrs().map_err(IfaceError::List)?;
    let v4: Vec<Interface> = all
        .iter()
        .filter_map(|i| match &i.addr {
            if_addrs::IfAddr::V4(a) => Some(Interface {
                name: i.name.clone(),
                addr: a.ip,
                netmask: a.netmask,
            }),
            if_addrs::IfAddr::V6(_) => None,
        })
        .collect();
    let wanted: Vec<String> = if values.is_empty() {
        vec![default_route_interface()?]
    } else {
        values.to_vec()
    };
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for w in wanted {
        let hit = match w.parse::<Ipv4Addr>() {
            Ok(ip) => v4.iter().find(|i| i.addr == ip),
            // The first IPv4 address of the named interface.
            Err(_) => v4.iter().find(|i| i.name == w),
        };
        match hit {
            Some(i) if !found.contains(i) => found.push(i.clone()),
            Some(_) => {}
            None => missing.push(IfaceError::Unknown(w)),
        }
    }
    Ok((found, missing))
}

/// The interface of the IPv4 default route, from `/proc/net/route`.
fn default_route_interface() -> Result<String, IfaceError> {
    let table =
        std::fs::read_to_string("/proc/net/route").map_err(|_| IfaceError::NoDefaultRoute)?;
    parse_default_route(&table).ok_or(IfaceError::NoDefaultRoute)
}

fn parse_default_route(table: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let iface = cols.next()?;
        let dest = cols.next()?;
        (dest == "00000000").then(|| iface.to_string())
    })
}

/// The IPv4 networks routed through the interfaces named in `names` (the
/// main table, `/proc/net/route`; the default route as `0.0.0.0/0`): what
/// the node can reach through the interfaces it was configured for, beyond
/// their own subnets. Empty when the table cannot be read.
pub fn routes_via(names: &[&str]) -> Vec<proto::addr_rule::Cidr> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_routes(&t, names))
        .unwrap_or_default()
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
    fn loopback_resolves_by_name_and_address() {
        let (by_name, _) = resolve(&["lo".into()]).unwrap();
        assert_eq!(by_name[0].addr, Ipv4Addr::LOCALHOST);
        let (by_addr, _) = resolve(&["127.0.0.1".into()]).unwrap();
        assert_eq!(by_addr[0].name, "lo");
        let (none, missing) = resolve(&["no-such-if0".into()]).unwrap();
        assert!(none.is_empty());
        assert_eq!(missing.len(), 1);
    }
}
