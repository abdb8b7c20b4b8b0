//! IPv6 across hosts: nodes in network namespaces on an IPv6-only bridge
//! (unique-local addresses, and hosts with nothing but their link-local
//! address), beacons on an `ff02::` group, links over IPv6, a seed given as
//! a scoped link-local address. (`::1` is tested in `tests/ipv6.rs`.)
//! Every address exists only inside the namespaces; nothing touches the
//! host's interfaces.
//!
//! Needs root and `ip` (iproute2). Where not root the test fails saying so,
//! unless CONSTELLATION_SKIP_NETNS=1 is set. The lab is
//! `support::netns::Lab`.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::netns::Lab;
use support::{wait_until, Daemon, TempDir};

const GROUP: &str = "[ff02::4c:76]:6776";

/// Names of the peers `d` lists alive with their link up, and how many it
/// lists at all.
fn linked_names(d: &Daemon) -> (BTreeSet<String>, usize) {
    let peers = d.peers();
    let up = peers
        .iter()
        .filter(|p| p["state"] == "alive" && p["link"] == "up")
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    (up, peers.len())
}

/// Every node of `nodes` lists exactly the others, linked.
fn full(lab: &Lab, nodes: &[usize]) -> bool {
    nodes.iter().all(|&i| {
        let want: BTreeSet<String> = nodes
            .iter()
            .filter(|&&j| j != i)
            .map(|j| format!("h{j}"))
            .collect();
        let (got, listed) = linked_names(lab.node(i));
        got == want && listed == want.len()
    })
}

fn addrs(d: &Daemon) -> Vec<String> {
    d.peers()
        .iter()
        .filter_map(|p| p["addr"].as_str().map(String::from))
        .collect()
}

/// The kernel index of host `i`'s veth0.
fn index_of_veth0(lab: &Lab, i: usize) -> u32 {
    let out = std::process::Command::new("ip")
        .args(["-n", &lab.ns(i), "-o", "link", "show", "veth0"])
        .output()
        .expect("ip");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .expect("an index")
}

#[test]
fn ipv6_only_bridge_unique_local_and_link_local_hosts_mesh_and_a_link_local_seed_joins() {
    let Some(mut lab) = Lab::new() else { return };
    let dir = TempDir::new("ns-v6");
    // br1: unique-local hosts h1..h3 (h1 also has a fixed link-local
    // address, fe80::1, to be named as a seed) and h7, which has multicast
    // off and joins through that seed. br2: h4..h6 with only the link-local
    // address the kernel made. No IPv4 address on any veth.
    lab.bridge("br1");
    lab.bridge("br2");
    lab.host_with(1, &["fd00:78:6::1/64", "fe80::1/64"], "br1");
    for i in [2, 3] {
        lab.host(i, &format!("fd00:78:6::{i}/64"), "br1");
    }
    // Interface indices differ between hosts (as they do between real
    // ones): h5, h6 and h7 get spare interfaces (veth pairs inside the
    // namespace) first, so that their veth0 is not index 2 like everyone
    // else's. A scope id that crossed the wire would name the wrong
    // interface there.
    let with_dummies = |lab: &mut Lab, i: usize, pairs: usize, cidrs: &[&str], bridge: &str| {
        let ns = lab.ns(i);
        lab.add_ns(&ns);
        for d in 0..pairs {
            let (a, b) = (format!("xa{d}"), format!("xb{d}"));
            support::netns::ip(&[
                "-n", &ns, "link", "add", &a, "type", "veth", "peer", "name", &b,
            ]);
        }
        lab.plug(&ns, "veth0", &format!("p{i}"), cidrs, bridge);
    };
    with_dummies(&mut lab, 7, 2, &["fd00:78:6::7/64"], "br1");
    lab.host_with(4, &[], "br2");
    with_dummies(&mut lab, 5, 1, &[], "br2");
    with_dummies(&mut lab, 6, 2, &[], "br2");
    // The default `--listen 0.0.0.0:6777` becomes `[::]:6777` for an IPv6
    // group; h2 says `[::]` itself.
    for i in [1, 3, 4, 5, 6] {
        lab.start(dir.path(), i, &["--group", GROUP]);
    }
    lab.start_on(dir.path(), 2, "[::]:6777", &["--group", GROUP]);
    let took = wait_until(Duration::from_secs(20), "both IPv6 meshes", || {
        full(&lab, &[1, 2, 3]) && full(&lab, &[4, 5, 6])
    });
    eprintln!("IPv6 multicast: unique-local and link-local meshes in {took:?}");
    for i in 1..=3 {
        for a in addrs(lab.node(i)) {
            assert!(a.starts_with("[fd00:78:6::"), "h{i} lists {a}");
        }
        let v = support::self_info(&lab.node(i).socket);
        assert_eq!(v["group"], "[ff02::4c:76]:6776", "{v}");
        assert!(
            v["counters"]["beacons_received"].as_u64().unwrap_or(0) > 0,
            "{v}"
        );
    }
    for i in 4..=6 {
        let veth0 = index_of_veth0(&lab, i);
        // Link-local peers are listed with the scope of the link they are
        // on: this host's veth0.
        for a in addrs(lab.node(i)) {
            let scope = format!("%{veth0}]:6777");
            assert!(
                a.starts_with("[fe80::") && a.ends_with(&scope),
                "h{i} lists {a}"
            );
        }
    }

    // h7: no multicast socket at all, one seed: h1's link-local address on
    // its own veth0. It learns h2 and h3 over the link and dials them.
    lab.start(
        dir.path(),
        7,
        &["--no-multicast", "--seed", "[fe80::1%veth0]:6777"],
    );
    let took = wait_until(
        Duration::from_secs(20),
        "full tables through a link-local seed",
        || full(&lab, &[1, 2, 3, 7]),
    );
    eprintln!("IPv6 link-local seed: full tables on 4 nodes {took:?} after h7 started");
    let st = support::self_info(&lab.node(7).socket);
    assert_eq!(st["counters"]["beacons_received"], 0, "{st}");
    let out = lab.node(7).cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(v["seeds"][0]["outcome"], "linked", "{v}");
}

#[test]
fn a_node_on_two_ipv6_links_joins_the_group_on_both() {
    let Some(mut lab) = Lab::new() else { return };
    let dir = TempDir::new("ns-v6two");
    // h1, h2 on br1 (fd00:78:8::/64), h3 on br2 (fd00:78:9::/64), and h4 on
    // both: one group socket joined on two interfaces by index, one send
    // socket per interface.
    lab.bridge("br1");
    lab.bridge("br2");
    for i in 1..=2 {
        lab.host(i, &format!("fd00:78:8::{i}/64"), "br1");
    }
    lab.host(3, "fd00:78:9::3/64", "br2");
    lab.host(4, "fd00:78:8::4/64", "br1");
    let ns = lab.ns(4);
    lab.plug(&ns, "veth1", "p4b", &["fd00:78:9::4/64"], "br2");
    for i in 1..=3 {
        lab.start(dir.path(), i, &["--group", GROUP]);
    }
    let both = ["--group", GROUP, "--interface", "veth1"];
    lab.start(dir.path(), 4, &both); // with the Lab's --interface veth0
    let took = wait_until(Duration::from_secs(20), "h4 linked to all three", || {
        linked_names(lab.node(4)).0.len() == 3
    });
    eprintln!("IPv6 group on two links: h4 linked to h1, h2 and h3 in {took:?}");
    let v = support::self_info(&lab.node(4).socket);
    let names: Vec<&str> = v["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["veth0", "veth1"], "{v}");
    // Each side hears h4 on its own link, at its address there.
    let h4_on = |i: usize| {
        lab.node(i)
            .peers()
            .into_iter()
            .find(|p| p["name"] == "h4")
            .and_then(|p| p["addr"].as_str().map(String::from))
    };
    wait_until(Duration::from_secs(20), "h4 listed on both sides", || {
        h4_on(1).as_deref() == Some("[fd00:78:8::4]:6777")
            && h4_on(3).as_deref() == Some("[fd00:78:9::4]:6777")
    });
}
