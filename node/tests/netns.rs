//! Multi-host tests: each node in its own network namespace, joined by a
//! bridge that lives in a namespace of its own, with addresses that exist
//! only inside those namespaces. Nothing touches the host's interfaces.
//!
//! Needs root and `ip` (iproute2). Where not root the test fails saying so,
//! unless CONSTELLATION_SKIP_NETNS=1 is set.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{bin, wait_until, Daemon, TempDir};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) must be installed");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces created by one test, deleted on drop (daemons first).
struct Lab {
    prefix: String,
    hosts: usize,
    daemons: Vec<Option<Daemon>>,
}

impl Lab {
    fn new(hosts: usize) -> Option<Lab> {
        if std::env::var_os("CONSTELLATION_SKIP_NETNS").is_some_and(|v| v == "1") {
            eprintln!("netns test skipped: CONSTELLATION_SKIP_NETNS=1");
            return None;
        }
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            });
        assert_eq!(
            uid.as_deref(),
            Some("0"),
            "the netns tests need root (CI runs as root); set CONSTELLATION_SKIP_NETNS=1 to skip them"
        );
        let prefix = format!("cst{}", std::process::id() % 100_000);
        let lab = Lab {
            prefix: prefix.clone(),
            hosts,
            daemons: Vec::new(),
        };
        let br = lab.ns_bridge();
        ip(&["netns", "add", &br]);
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for i in 1..=hosts {
            let ns = lab.ns(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("p{i}");
            ip(&[
                "-n", &ns, "link", "add", "veth0", "type", "veth", "peer", "name", &port, "netns",
                &br,
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{i}/24"),
                "dev",
                "veth0",
            ]);
            ip(&["-n", &ns, "link", "set", "veth0", "up"]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &br, "link", "set", &port, "up"]);
        }
        Some(lab)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    fn ns_bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// Starts a node inside host `i`'s namespace, on veth0 by name.
    fn start(&mut self, dir: &Path, i: usize) {
        let name = format!("h{i}");
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(i),
                bin(),
                "run",
                "--name",
                &name,
                "--interface",
                "veth0",
            ])
            .args(["--listen", "0.0.0.0:6777", "--socket"])
            .arg(&socket)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn in netns");
        // `ip netns exec` execs the daemon: this PID is the daemon's.
        let d = Daemon {
            child,
            name,
            socket,
            log,
        };
        wait_until(Duration::from_secs(10), "control socket", || {
            d.socket.exists()
        });
        if self.daemons.len() < i {
            self.daemons.resize_with(i, || None);
        }
        self.daemons[i - 1] = Some(d);
    }

    fn node(&self, i: usize) -> &Daemon {
        self.daemons[i - 1].as_ref().expect("started")
    }

    fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.ns(i),
            "link",
            "set",
            "veth0",
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.daemons.clear(); // kills the daemons
        for i in 1..=self.hosts {
            // Deleting a namespace also deletes its veth ends.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns_bridge()])
            .status();
    }
}

#[test]
fn three_hosts_mesh_a_cut_host_fails_and_rejoins() {
    let Some(mut lab) = Lab::new(3) else { return };
    let dir = TempDir::new("netns");
    for i in 1..=3 {
        lab.start(dir.path(), i);
    }
    let took = wait_until(Duration::from_secs(10), "3-host full mesh", || {
        (1..=3).all(|i| lab.node(i).linked() == 2)
    });
    eprintln!("3-host mesh in {took:?}");
    // Each advertises its veth address, never loopback or 0.0.0.0.
    for p in lab.node(1).peers() {
        let addr = p["addr"].as_str().unwrap();
        assert!(addr.starts_with("10.77.0."), "{addr}");
    }

    lab.link(3, false);
    let took = wait_until(Duration::from_secs(10), "h3 failed on h1 and h2", || {
        (1..=2).all(|i| lab.node(i).state_of("h3").as_deref() == Some("failed"))
    });
    eprintln!("silent loss detected in {took:?}");
    assert_eq!(lab.node(1).linked(), 1, "h1-h2 unaffected");

    lab.link(3, true);
    let took = wait_until(
        Duration::from_secs(15),
        "full mesh after the link came back",
        || (1..=3).all(|i| lab.node(i).linked() == 2),
    );
    eprintln!("rejoined in {took:?}");
}
