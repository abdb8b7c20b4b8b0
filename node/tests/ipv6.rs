//! IPv6 on this host's loopback: links over `::1` (seeded, multicast off),
//! and beacons on an `ff02::` group on `lo` where the kernel routes IPv6
//! multicast there (Linux does not by default: `lo` has no MULTICAST flag
//! and no `ff00::/8` route; then that part is skipped with the reason
//! printed, and `tests/netns_v6.rs` covers IPv6 multicast over veths).

mod support;

use std::time::Duration;

use support::{unique_group, wait_until, Daemon, TempDir};

fn has_ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Why IPv6 multicast cannot work on `lo` here, if it cannot.
fn lo_v6_multicast_unavailable() -> Option<String> {
    const IFF_MULTICAST: u32 = 0x1000;
    let flags = std::fs::read_to_string("/sys/class/net/lo/flags").unwrap_or_default();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    if flags & IFF_MULTICAST == 0 {
        return Some("lo has no MULTICAST flag".into());
    }
    let routes = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mcast_on_lo = routes.lines().any(|l| {
        let c: Vec<&str> = l.split_whitespace().collect();
        c.first().is_some_and(|d| d.starts_with("ff")) && c.get(9) == Some(&"lo")
    });
    if !mcast_on_lo {
        return Some("no IPv6 multicast route on lo".into());
    }
    None
}

fn listen_port(d: &Daemon) -> u16 {
    let v = support::self_info(&d.socket);
    let listen: std::net::SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    assert!(listen.is_ipv6(), "{v}");
    listen.port()
}

#[test]
fn nodes_link_over_ipv6_loopback_through_a_bracketed_seed() {
    if !has_ipv6_loopback() {
        eprintln!("skipped: this host has no ::1");
        return;
    }
    let dir = TempDir::new("v6lo");
    let group = unique_group();
    let common = ["--no-multicast", "--listen", "[::1]:0"];
    let a = Daemon::start(dir.path(), "a", &group, &common);
    let seed = format!("[::1]:{}", listen_port(&a));
    let mut args = common.to_vec();
    args.extend(["--seed", &seed]);
    let b = Daemon::start(dir.path(), "b", &group, &args);
    let c = Daemon::start(dir.path(), "c", &group, &args);
    wait_until(
        Duration::from_secs(20),
        "three nodes linked over ::1",
        || [&a, &b, &c].iter().all(|d| d.linked() == 2),
    );
    for d in [&a, &b, &c] {
        for p in d.peers() {
            let addr = p["addr"].as_str().unwrap();
            assert!(addr.starts_with("[::1]:"), "{}: {addr}", d.name);
        }
        let v = support::self_info(&d.socket);
        assert!(
            v["addresses"][0].as_str().unwrap().starts_with("[::1]:"),
            "{v}"
        );
    }
}

#[test]
fn nodes_find_each_other_on_an_ff02_group_on_lo_where_the_kernel_allows_it() {
    if !has_ipv6_loopback() {
        eprintln!("skipped: this host has no ::1");
        return;
    }
    let dir = TempDir::new("v6mc");
    let port = std::net::UdpSocket::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let group = format!("[ff02::4c:{:x}]:{port}", port);
    let a = Daemon::start(dir.path(), "a", &group, &["--listen", "[::1]:0"]);
    let v = support::self_info(&a.socket);
    assert_eq!(v["group"], group.as_str(), "{v}");
    assert_eq!(
        v["interfaces"][0]["addr"], "::1",
        "lo means ::1 for an IPv6 group: {v}"
    );
    if let Some(why) = lo_v6_multicast_unavailable() {
        eprintln!(
            "skipped the beacon exchange: {why} (the kernel sends no IPv6 multicast on this lo); \
             tests/netns_v6.rs covers it over veths"
        );
        // The node still runs, and says why nobody hears it.
        wait_until(
            Duration::from_secs(20),
            "the send failures are counted",
            || {
                support::self_info(&a.socket)["counters"]["beacon_send_errors"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
            },
        );
        return;
    }
    let b = Daemon::start(dir.path(), "b", &group, &["--listen", "[::1]:0"]);
    wait_until(
        Duration::from_secs(20),
        "a and b linked over ff02 on lo",
        || a.linked() == 1 && b.linked() == 1,
    );
}

#[test]
fn advertise_takes_an_ipv6_address_or_a_host_name_resolved_at_start() {
    let dir = TempDir::new("v6adv");
    let group = unique_group();
    // `localhost` is in /etc/hosts: resolved there, no DNS query leaves.
    let a = Daemon::start(dir.path(), "a", &group, &["--advertise", "localhost:4321"]);
    let v = support::self_info(&a.socket);
    assert_eq!(v["addresses"][0], "127.0.0.1:4321", "{v}");
    if has_ipv6_loopback() {
        let b = Daemon::start(
            dir.path(),
            "b",
            &group,
            &["--listen", "[::1]:0", "--advertise", "[::1]"],
        );
        let v = support::self_info(&b.socket);
        let port = listen_port(&b);
        assert_eq!(v["addresses"][0], format!("[::1]:{port}"), "{v}");
    }
}
