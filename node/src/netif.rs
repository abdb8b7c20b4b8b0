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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_is_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway\n\
                     eth1\t0011A8C0\t00000000\n\
                     ens3\t00000000\t0111A8C0\n";
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
