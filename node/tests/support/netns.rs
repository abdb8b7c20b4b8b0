//! A lab of network namespaces for the multi-host tests: one namespace per
//! host, a switch namespace holding the bridges (and any trunk between
//! them), optional routers, and addresses that exist only inside those
//! namespaces. Nothing touches the host's interfaces. Everything created is
//! deleted on drop, daemons first.
//!
//! Needs root and `ip` (iproute2); some helpers need `sysctl`, `nft` or
//! `iptables`. Where not root a test fails saying so, unless
//! `CONSTELLATION_SKIP_NETNS=1` is set ([`Lab::new`] returns `None`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{bin, wait_until, Daemon};

/// Runs a command that must succeed.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

/// Namespaces (and /etc/netns entries) created by one test.
pub struct Lab {
    prefix: String,
    /// Every namespace created, deleted on drop.
    namespaces: Vec<String>,
    /// `/etc/netns/<ns>` directories created, removed on drop.
    etc: Vec<PathBuf>,
    daemons: Vec<Option<Daemon>>,
    /// Host numbers created with [`Lab::host`].
    hosts: Vec<usize>,
}

impl Lab {
    /// An empty lab with its switch namespace (which holds the bridges);
    /// `None` when the netns tests are skipped.
    pub fn new() -> Option<Lab> {
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
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut lab = Lab {
            prefix: format!("cs{}x{n}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            etc: Vec::new(),
            daemons: Vec::new(),
            hosts: Vec::new(),
        };
        let sw = lab.ns_switch();
        lab.add_ns(&sw);
        Some(lab)
    }

    /// A namespace with `lo` up and IPv6 duplicate address detection off
    /// (so that addresses are usable at once, not tentative for a second).
    pub fn add_ns(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        for key in [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", key]);
        }
    }

    /// Host `i`'s namespace name.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// The switch namespace's name.
    pub fn ns_switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// A bridge in the switch namespace (no IGMP/MLD snooping: the bridge
    /// floods multicast to every port, as a plain switch does).
    pub fn bridge(&self, name: &str) {
        let sw = self.ns_switch();
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            name,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &sw, "link", "set", name, "up"]);
    }

    /// Joins bridges `a` and `b` by a veth pair `trunk0`/`trunk1`, so that
    /// [`Lab::trunk`] can partition the hosts on one from those on the other.
    pub fn join_bridges(&self, a: &str, b: &str) {
        let sw = self.ns_switch();
        ip(&[
            "-n", &sw, "link", "add", "trunk0", "type", "veth", "peer", "name", "trunk1",
        ]);
        for (end, bridge) in [("trunk0", a), ("trunk1", b)] {
            ip(&["-n", &sw, "link", "set", end, "master", bridge]);
            ip(&["-n", &sw, "link", "set", end, "up"]);
        }
    }

    /// Cuts (or heals) the trunk between the two bridges.
    pub fn trunk(&self, up: bool) {
        ip(&[
            "-n",
            &self.ns_switch(),
            "link",
            "set",
            "trunk0",
            if up { "up" } else { "down" },
        ]);
    }

    /// Plugs `dev` of namespace `ns` into `bridge` (switch side `port`),
    /// with addresses `cidrs` (IPv4 or IPv6; none leaves only the IPv6
    /// link-local address the kernel gives every interface).
    pub fn plug(&self, ns: &str, dev: &str, port: &str, cidrs: &[&str], bridge: &str) {
        let sw = self.ns_switch();
        ip(&[
            "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", port, "netns", &sw,
        ]);
        for cidr in cidrs {
            ip(&["-n", ns, "addr", "add", cidr, "dev", dev]);
        }
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", &sw, "link", "set", port, "master", bridge]);
        ip(&["-n", &sw, "link", "set", port, "up"]);
        if cidrs.is_empty() || cidrs.iter().any(|c| c.contains(':')) {
            // The kernel adds the link-local address once the link has a
            // carrier, a moment after both ends are up.
            wait_until(
                Duration::from_secs(10),
                "an IPv6 link-local address",
                || {
                    let out = Command::new("ip")
                        .args(["-n", ns, "-6", "addr", "show", "dev", dev, "scope", "link"])
                        .output()
                        .expect("ip");
                    String::from_utf8_lossy(&out.stdout).contains("inet6 fe80:")
                },
            );
        }
    }

    /// Host `i`: a namespace with `veth0` at `cidr` on `bridge`.
    pub fn host(&mut self, i: usize, cidr: &str, bridge: &str) {
        self.host_with(i, &[cidr], bridge);
    }

    /// Host `i`: a namespace with `veth0` at `cidrs` on `bridge`.
    pub fn host_with(&mut self, i: usize, cidrs: &[&str], bridge: &str) {
        let ns = self.ns(i);
        self.add_ns(&ns);
        self.plug(&ns, "veth0", &format!("p{i}"), cidrs, bridge);
        self.hosts.push(i);
    }

    /// Host `i`'s default route.
    pub fn default_route(&self, i: usize, via: &str) {
        ip(&["-n", &self.ns(i), "route", "add", "default", "via", via]);
    }

    /// A router: one leg per `(bridge, cidr)`, IPv4 forwarding on, and no
    /// multicast routing (nothing runs a multicast routing daemon), so
    /// multicast stays on the subnet it was sent on.
    pub fn router(&mut self, legs: &[(&str, &str)]) {
        let ns = format!("{}-rt", self.prefix);
        self.add_ns(&ns);
        for (k, (bridge, cidr)) in legs.iter().enumerate() {
            self.plug(&ns, &format!("leg{k}"), &format!("rt{k}"), &[cidr], bridge);
        }
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ],
        );
    }

    /// Takes host `i`'s `veth0` down (or up again).
    pub fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.ns(i),
            "link",
            "set",
            "veth0",
            if up { "up" } else { "down" },
        ]);
    }

    /// Drops `percent`% of every packet entering every host (iptables).
    pub fn loss(&self, percent: u32) {
        for &i in &self.hosts {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.ns(i),
                    "iptables",
                    "-A",
                    "INPUT",
                    "-m",
                    "statistic",
                ])
                .args([
                    "--mode",
                    "random",
                    "--probability",
                    &format!("0.{percent:02}"),
                    "-j",
                    "DROP",
                ])
                .output()
                .expect("iptables must be installed for the loss test");
            assert!(
                out.status.success(),
                "iptables: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Drops every multicast packet entering or leaving host `i` (IPv4
    /// 224.0.0.0/4 and IPv6 ff00::/8), counting them.
    pub fn drop_multicast(&self, i: usize) {
        let rules = "table inet nomcast {
  chain in {
    type filter hook input priority 0; policy accept;
    ip daddr 224.0.0.0/4 counter drop
    ip6 daddr ff00::/8 counter drop
  }
  chain out {
    type filter hook output priority 0; policy accept;
    ip daddr 224.0.0.0/4 counter drop
    ip6 daddr ff00::/8 counter drop
  }
}
";
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (nftables) must be installed for this test");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Packets host `i`'s multicast rules dropped so far (in and out).
    pub fn multicast_dropped(&self, i: usize) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(i),
                "nft",
                "list",
                "table",
                "inet",
                "nomcast",
            ])
            .output()
            .expect("nft");
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }

    /// Writes host `i`'s `/etc/hosts` as `ip netns exec` shows it to the
    /// processes it starts (it bind-mounts `/etc/netns/<ns>/hosts` over
    /// `/etc/hosts`). The first call creates the file, with a
    /// `resolv.conf` naming a server inside the namespace, where nothing
    /// answers, so that no name ever leaves it (and a DNS server that is
    /// down must not keep a name the hosts file lists from resolving).
    /// Later calls rewrite the same file in place: a bind mount follows the
    /// inode, so a rename would go unseen by processes already running.
    pub fn hosts_file(&mut self, i: usize, text: &str) {
        let dir = Path::new("/etc/netns").join(self.ns(i));
        if !self.etc.contains(&dir) {
            std::fs::create_dir_all(&dir).expect("/etc/netns/<ns>");
            self.etc.push(dir.clone());
            std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("hosts"))
            .unwrap();
        f.write_all(format!("127.0.0.1 localhost\n{text}").as_bytes())
            .unwrap();
    }

    /// Starts node `h{i}` inside host `i`'s namespace on `veth0` (link port
    /// 6777 on the IPv4 wildcard, socket and log in `dir`), with `extra`
    /// flags; returns once its control socket answers.
    pub fn start(&mut self, dir: &Path, i: usize, extra: &[&str]) {
        self.start_on(dir, i, "0.0.0.0:6777", extra);
    }

    /// [`Lab::start`] with the link listener on `listen`.
    pub fn start_on(&mut self, dir: &Path, i: usize, listen: &str, extra: &[&str]) {
        let mut args = vec!["--interface", "veth0", "--listen", listen];
        args.extend_from_slice(extra);
        self.start_raw(dir, i, i, &args);
    }

    /// Starts node `h{slot}` inside host `host`'s namespace with exactly
    /// `args` after `run --name h{slot} --socket …` (several nodes may share
    /// one host); returns once its control socket answers.
    pub fn start_raw(&mut self, dir: &Path, slot: usize, host: usize, args: &[&str]) {
        let name = format!("h{slot}");
        let socket = dir.join(format!("{name}.sock"));
        // Appended: a restarted node's log keeps its first life.
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(host),
                bin(),
                "run",
                "--name",
                &name,
            ])
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn in netns");
        // `ip netns exec` execs the daemon: this PID is the daemon's.
        let mut d = Daemon {
            child,
            name,
            socket,
            log,
        };
        // A killed node's socket file is still there: wait for an answer.
        wait_until(Duration::from_secs(10), "control socket answers", || {
            assert_eq!(
                d.wait_exit(Duration::ZERO),
                None,
                "{} exited:\n{}",
                d.name,
                d.log_text()
            );
            d.cli(&["status", "--json"]).status.success()
        });
        if self.daemons.len() < slot {
            self.daemons.resize_with(slot, || None);
        }
        self.daemons[slot - 1] = Some(d);
    }

    /// Runs `args` inside host `i`'s namespace; it must succeed.
    pub fn exec(&self, i: usize, args: &[&str]) {
        let mut all = vec!["netns", "exec"];
        let ns = self.ns(i);
        all.push(&ns);
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Node `h{i}`.
    pub fn node(&self, i: usize) -> &Daemon {
        self.daemons[i - 1].as_ref().expect("started")
    }

    /// Node `h{i}`, mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut Daemon {
        self.daemons[i - 1].as_mut().expect("started")
    }

    /// SIGKILL (a crash); returns once it is gone.
    pub fn crash(&mut self, i: usize) {
        let d = self.node_mut(i);
        d.signal("-KILL");
        assert!(d.wait_exit(Duration::from_secs(10)).is_none(), "killed");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.daemons.clear(); // kills the daemons
        for ns in self.namespaces.iter().rev() {
            // Deleting a namespace also deletes its veth ends. Best effort:
            // a failure here must not hide the test's own verdict.
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for dir in &self.etc {
            let _ = std::fs::remove_dir_all(dir); // best effort, as above
        }
        if !self.etc.is_empty() {
            // Only if empty (then nothing else uses it); best effort.
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}
