//! Command line: the daemon's flags and the CLI subcommands.
//!
//! Every daemon flag can also be set as `CONSTELLATION_<FLAG>` (repeatable
//! flags take a comma-separated list there, except `--handler`, whose
//! event lists hold commas: its variable holds one handler), and as a key
//! of the same name
//! in the `--config` file (see [`crate::configfile`]). Values are parsed and
//! checked here, before anything binds: a bad value prints one line naming
//! the flag (or the key and the file) and exits with status 2.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::seeds::SeedSpec;
use clap::{Args, Parser, Subcommand};
use proto::addr_rule::Cidr;

/// A peer-to-peer cluster node: finds its peers by UDP multicast, links to
/// each over TCP, and answers questions about the cluster on a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "constellationd", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Command,
}

/// The subcommands. Everything but `run`, `keygen` is a client of a running
/// daemon's control socket.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node (the daemon).
    #[command(
        after_help = "Example:\n  constellationd run --interface lo --ttl 0 --listen 127.0.0.1:0 --socket /tmp/n1.sock"
    )]
    Run(Box<RunArgs>),
    /// List the peers this node knows.
    #[command(
        after_help = "Examples:\n  constellationd peers --state alive --tag role=db\n  constellationd peers --name 'web-[0-9]+' --tag 'zone=eu-.*'"
    )]
    Peers {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only peers in this state.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(proto::control::PEER_STATES))]
        state: Option<String>,
        /// Only peers whose whole name matches REGEX.
        #[arg(long, value_parser = parse_regex, value_name = "REGEX")]
        name: Option<String>,
        /// Only peers with tag KEY whose whole value matches REGEX;
        /// repeatable, all must match.
        #[arg(long, value_parser = parse_tag_filter, value_name = "KEY=REGEX")]
        tag: Vec<(String, String)>,
    },
    /// This node: identity, counters and warnings.
    #[command(after_help = "Example:\n  constellationd status --json")]
    Status {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow the cluster's events until interrupted.
    #[command(after_help = "Example:\n  constellationd watch --json")]
    Watch {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Print each event's JSON line as received.
        #[arg(long)]
        json: bool,
    },
    /// Send a message to one peer (by name, id or id prefix of 8+ digits).
    #[command(
        after_help = "Examples:\n  constellationd send node2 --topic greet hello\n  echo hello | constellationd send node2 -"
    )]
    Send {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Recipient.
        node: String,
        /// Topic.
        #[arg(long, default_value = "")]
        topic: String,
        /// The message; `-` or absent reads standard input.
        message: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a message to every linked peer.
    #[command(after_help = "Example:\n  constellationd broadcast --topic news 'deploy started'")]
    Broadcast {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Topic.
        #[arg(long, default_value = "")]
        topic: String,
        /// The message; `-` or absent reads standard input.
        message: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the node to leave the cluster gracefully and stop.
    #[command(after_help = "Example:\n  constellationd leave")]
    Leave {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
    },
    /// Print a new random cluster key (base64), for a secret file.
    #[command(
        after_help = "Example:\n  (umask 077; constellationd keygen > /etc/constellationd.key)\n  constellationd run --secret-file /etc/constellationd.key"
    )]
    Keygen,
    /// The cluster keyring of a running node: list, install, use, remove.
    #[command(
        after_help = "Rotation across a cluster, one step at a time on every node:\n  constellationd keys install NEWKEY   # accepted everywhere\n  constellationd keys use NEWKEY       # now sealing everywhere\n  constellationd keys remove OLDKEY    # retired\nOr each step on every node at once, over the links:\n  constellationd keys install --cluster NEWKEY\n  constellationd keys use --cluster NEWKEY\n  constellationd keys list --cluster"
    )]
    Keys {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Do it on every node of the cluster, over the links: prints
        /// `n/N nodes` and the nodes that failed, with why.
        #[arg(long, global = true)]
        cluster: bool,
        /// What to do.
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Exit 0 when the node runs (and has at least --min-peers alive peers).
    #[command(
        after_help = "Example (container health check):\n  constellationd health --min-peers 4"
    )]
    Health {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// Alive peers required.
        #[arg(long, default_value_t = 0)]
        min_peers: usize,
    },
    /// Operations: log level, monitor, completions, man page.
    #[command(flatten)]
    Ops(crate::cli_ops::OpsCommand),
    /// Automation: runtime tags, queries, force-leave.
    #[command(flatten)]
    Auto(crate::cli_auto::AutoCommand),
}

/// `constellationd keys ...`. Keys are given in base64; `use` and `remove`
/// also take a fingerprint as `keys list` shows it.
#[derive(Debug, Subcommand, Clone)]
pub enum KeysAction {
    /// List the installed keys by fingerprint (never the keys themselves).
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Accept KEY from now on (sending still uses the primary key).
    Install {
        /// The key, base64.
        key: String,
    },
    /// Seal everything this node sends with KEY (installed first).
    Use {
        /// The key (base64) or its fingerprint.
        key: String,
    },
    /// Stop accepting KEY (not the primary one).
    Remove {
        /// The key (base64) or its fingerprint.
        key: String,
    },
}

/// `--socket`, shared by every subcommand.
#[derive(Debug, Args, Clone)]
pub struct SocketArg {
    /// Control socket path [default: /run/constellationd.sock as root, else
    /// $XDG_RUNTIME_DIR/constellationd.sock, else /tmp/constellationd-UID.sock].
    #[arg(long, env = "CONSTELLATION_SOCKET", value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
}

/// Flags of `constellationd run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// TOML file whose keys are these flags' names (`beacon-interval =
    /// "2s"`); flags and environment variables win over it. SIGHUP re-reads
    /// it.
    #[arg(long, env = "CONSTELLATION_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log level; RUST_LOG, when set, wins at start and adds per-module
    /// filters (`transport=trace`).
    #[arg(
        long,
        env = "CONSTELLATION_LOG_LEVEL",
        value_enum,
        default_value = "info",
        value_name = "LEVEL"
    )]
    pub log_level: crate::logging::LogLevel,

    /// Log line format on standard error.
    #[arg(
        long,
        env = "CONSTELLATION_LOG_FORMAT",
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,

    /// This node's name [default: the hostname].
    #[arg(long, env = "CONSTELLATION_NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Cluster name; beacons and links of other clusters are refused.
    #[arg(long, env = "CONSTELLATION_CLUSTER", default_value = "default", value_parser = parse_name)]
    pub cluster: String,

    /// Interface (name like `lo`, `eth1`, or an IPv4 or IPv6 address) to
    /// discover on; repeatable [default: the interface of the default
    /// route]. By name, the address of the group's family is used (IPv6: a
    /// global or unique-local one before the link-local one).
    #[arg(
        long,
        env = "CONSTELLATION_INTERFACE",
        value_delimiter = ',',
        value_name = "IFACE"
    )]
    pub interface: Vec<String>,

    /// Multicast group and port: IPv4, or IPv6 in brackets
    /// (`[ff02::4c:1]:6776`, `[ff12::…]:PORT`).
    #[arg(long, env = "CONSTELLATION_GROUP", default_value = "239.255.67.76:6776", value_parser = parse_group)]
    pub group: SocketAddr,

    /// Multicast TTL: 1 stays on the LAN, 0 on this host.
    #[arg(long, env = "CONSTELLATION_TTL", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=255))]
    pub ttl: u32,

    /// TCP address for data links (port 0 picks a free port).
    #[arg(long, env = "CONSTELLATION_LISTEN", default_value = "0.0.0.0:6777")]
    pub listen: SocketAddr,

    /// Address peers should dial, ADDR[:PORT] ([IPV6]:PORT), or a HOST[:PORT]
    /// resolved when the node starts [default: the --listen address when it
    /// is not a wildcard, else the address of the interface each beacon
    /// leaves on, with the listen port].
    #[arg(long, env = "CONSTELLATION_ADVERTISE", value_parser = parse_advertise, value_name = "ADDR[:PORT]")]
    pub advertise: Option<Advertise>,

    /// Also dial peers that advertise an address in CIDR (e.g. the public
    /// side of a NAT their `--advertise` names); repeatable. Without it a
    /// peer's advertised address must be its source address or in the
    /// subnet of one of our interfaces.
    #[arg(long, env = "CONSTELLATION_ALLOW_ADVERTISE", value_delimiter = ',', value_parser = parse_cidr, value_name = "CIDR")]
    pub allow_advertise: Vec<Cidr>,

    /// A node to join through, HOST[:PORT] or [IPV6]:PORT (port: this node's
    /// link port); repeatable. The host is resolved again at every attempt
    /// and every address it returns is dialed; attempts never stop.
    #[arg(long, env = "CONSTELLATION_SEED", value_delimiter = ',', value_parser = parse_seed, value_name = "HOST[:PORT]")]
    pub seed: Vec<SeedSpec>,

    /// No multicast socket at all: peers are found through --seed and
    /// remembered peers (--state-dir) only.
    #[arg(long, env = "CONSTELLATION_NO_MULTICAST", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub no_multicast: bool,

    /// Where to remember peers for the next start [default:
    /// /var/lib/constellationd for a system node (root, default socket),
    /// none otherwise].
    #[arg(long, env = "CONSTELLATION_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Metadata KEY=VALUE; repeatable.
    #[arg(long, env = "CONSTELLATION_TAG", value_delimiter = ',', value_parser = parse_tag, value_name = "KEY=VALUE")]
    pub tag: Vec<(String, String)>,

    /// Control socket.
    #[command(flatten)]
    pub sock: SocketArg,

    /// Control socket file mode (octal), e.g. 0660 to let a group in.
    #[arg(long, env = "CONSTELLATION_SOCKET_MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Mean time between beacons (each is jittered by ±10%).
    #[arg(long, env = "CONSTELLATION_BEACON_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub beacon_interval: Duration,

    /// Silence on every channel after which a peer is suspect.
    #[arg(long, env = "CONSTELLATION_SUSPECT_AFTER", default_value = "600ms", value_parser = parse_duration)]
    pub suspect_after: Duration,

    /// Silence on every channel after which a peer is failed (a peer whose
    /// link is down but whose beacons arrive gets 3 beacon intervals instead).
    #[arg(long, env = "CONSTELLATION_DEAD_AFTER", default_value = "1400ms", value_parser = parse_duration)]
    pub dead_after: Duration,

    /// How long failed and left peers stay listed.
    #[arg(long, env = "CONSTELLATION_TOMBSTONE_TTL", default_value = "10m", value_parser = parse_duration)]
    pub tombstone_ttl: Duration,

    /// Cluster keys (one base64 key per line, first primary; must not be
    /// readable by other users). With it every beacon and link is
    /// authenticated and encrypted and nodes without the key are refused.
    #[arg(long, env = "CONSTELLATION_SECRET_FILE", value_name = "PATH")]
    pub secret_file: Option<PathBuf>,

    /// Bounded overlay: link to about K neighbours (K/2 rings) instead of
    /// every member, and let membership travel over the overlay; 0 is the
    /// full mesh. With at most K + 1 members every member is a neighbour
    /// anyway. See "Bounded overlay" in the README.
    #[arg(long, env = "CONSTELLATION_MAX_LINKS", default_value_t = DEFAULT_MAX_LINKS, value_parser = parse_max_links, value_name = "K")]
    pub max_links: u64,

    /// Largest TCP frame accepted or sent, in bytes.
    #[arg(long, env = "CONSTELLATION_MAX_FRAME", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(4096..=(64 << 20)))]
    pub max_frame: u64,

    /// Run PROGRAM on events, `[EVENTS=]PROGRAM [ARG...]`: EVENTS a comma
    /// list of event types (peer_joined, peer_failed, ..., message),
    /// message:TOPIC or query:NAME (answers queries NAME with its standard
    /// output), every event but queries without it; PROGRAM a path, then
    /// whitespace-separated arguments (no shell). It reads the event's JSON
    /// (for a query: its payload) on standard input; see the README for its
    /// environment. Repeatable; the environment variable holds one handler.
    #[arg(long, env = "CONSTELLATION_HANDLER", value_parser = crate::handlers::parse_handler, value_name = "[EVENTS=]PROGRAM")]
    pub handler: Vec<crate::handlers::HandlerSpec>,

    /// Handler programs running at once.
    #[arg(long, env = "CONSTELLATION_HANDLER_CONCURRENCY", default_value_t = crate::handlers::DEFAULT_CONCURRENCY as u64, value_parser = clap::value_parser!(u64).range(1..=256), value_name = "N")]
    pub handler_concurrency: u64,

    /// Handler runs waiting for a free slot; past it runs are dropped and
    /// counted.
    #[arg(long, env = "CONSTELLATION_HANDLER_BACKLOG", default_value_t = crate::handlers::DEFAULT_BACKLOG as u64, value_parser = clap::value_parser!(u64).range(1..=65536), value_name = "N")]
    pub handler_backlog: u64,

    /// A handler still running after this is killed and counted.
    #[arg(long, env = "CONSTELLATION_HANDLER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handler_timeout: Duration,
}

/// `--max-links` when none is given: 4 rings. A cluster of up to 9 is a
/// full mesh; above it each node keeps about 8 links, so 8 observers watch
/// every member and the overlay stays connected through several
/// simultaneous failures.
pub const DEFAULT_MAX_LINKS: u64 = 8;

/// `--max-links`: 0 (full mesh) or 2 to 1024 (one ring holds two links).
fn parse_max_links(s: &str) -> Result<u64, String> {
    let k: u64 = s.parse().map_err(|e| format!("{e}"))?;
    match k {
        0 | 2..=1024 => Ok(k),
        _ => Err("0 (full mesh) or 2 to 1024".into()),
    }
}

fn parse_seed(s: &str) -> Result<SeedSpec, String> {
    SeedSpec::parse(s)
}

fn parse_name(s: &str) -> Result<String, String> {
    proto::id::check_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn parse_group(s: &str) -> Result<SocketAddr, String> {
    let g: SocketAddr = s.parse().map_err(|_| {
        "expected ADDR:PORT, e.g. 239.255.67.76:6776 or [ff02::4c:1]:6776".to_string()
    })?;
    if !g.ip().is_multicast() {
        let range = if g.is_ipv6() {
            "ff00::/8"
        } else {
            "224.0.0.0/4"
        };
        return Err(format!("{} is not a multicast address ({range})", g.ip()));
    }
    if g.port() == 0 {
        return Err("the port must not be 0".into());
    }
    Ok(g)
}

/// `--advertise`: an address, or a host name resolved when the node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advertise {
    /// An IP address, with the port or none (the listen port).
    Ip(IpAddr, Option<u16>),
    /// A host name, with the port or none (the listen port).
    Host(String, Option<u16>),
}

fn parse_advertise(s: &str) -> Result<Advertise, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return check_advertise(sa.ip()).map(|ip| Advertise::Ip(ip, Some(sa.port())));
    }
    if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse() {
        return check_advertise(ip).map(|ip| Advertise::Ip(ip, None));
    }
    let spec = SeedSpec::parse(s).map_err(|_| {
        "expected an IP address or a host name, with an optional :PORT ([IPV6]:PORT for IPv6)"
            .to_string()
    })?;
    if spec.host.contains('%') {
        return Err("a link-local address cannot be advertised to other hosts".into());
    }
    Ok(Advertise::Host(spec.host, spec.port))
}

fn check_advertise(ip: IpAddr) -> Result<IpAddr, String> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{ip} cannot be dialed by peers"));
    }
    Ok(ip)
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let c: Cidr = s
        .parse()
        .map_err(|e: proto::addr_rule::CidrError| e.to_string())?;
    if c.network().is_multicast() {
        return Err(format!("{c} is multicast: peers can never be dialed there"));
    }
    Ok(c)
}

/// `KEY=VALUE`: the key and value rules of the wire (see PROTOCOL.md).
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE".to_string())?;
    proto::id::check_tag(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}

/// A regex of a peer filter, checked (the daemon compiles it again).
fn parse_regex(s: &str) -> Result<String, String> {
    crate::filter::anchored(s).map_err(|e| format!("invalid regex: {e}"))?;
    Ok(s.to_string())
}

/// `KEY=REGEX` of `peers --tag`.
fn parse_tag_filter(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=REGEX".to_string())?;
    if k.is_empty() {
        return Err("expected KEY=REGEX (the key is empty)".into());
    }
    Ok((k.to_string(), parse_regex(v)?))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| "expected an octal mode such as 0600".to_string())?;
    if m > 0o777 {
        return Err("at most 0777".into());
    }
    if m & 0o600 != 0o600 {
        return Err("the owner needs read and write (0600)".into());
    }
    Ok(m)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 500ms, 2s, 10m)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_parsers_accept_good_and_refuse_bad_values() {
        assert!(parse_group("239.1.2.3:5000").is_ok());
        assert!(parse_group("10.0.0.1:5000").is_err());
        assert!(parse_group("239.1.2.3:0").is_err());
        assert!(parse_group("[ff02::4c:1]:6776").unwrap().is_ipv6());
        assert!(parse_group("[ff12::4c:1]:6776").is_ok());
        assert!(parse_group("[fd00::1]:6776").is_err());
        assert!(parse_group("ff02::1").is_err());
        assert_eq!(
            parse_advertise("[fd00::1]:7947"),
            Ok(Advertise::Ip("fd00::1".parse().unwrap(), Some(7947)))
        );
        assert_eq!(
            parse_advertise("fd00::1"),
            Ok(Advertise::Ip("fd00::1".parse().unwrap(), None))
        );
        assert_eq!(
            parse_advertise("[fd00::1]"),
            Ok(Advertise::Ip("fd00::1".parse().unwrap(), None))
        );
        assert!(parse_advertise("[::]:1").is_err());
        assert!(parse_advertise("[ff02::1]").is_err());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            parse_advertise("192.0.2.1"),
            Ok(Advertise::Ip(ip("192.0.2.1"), None))
        );
        assert_eq!(
            parse_advertise("192.0.2.1:99"),
            Ok(Advertise::Ip(ip("192.0.2.1"), Some(99)))
        );
        assert_eq!(
            parse_advertise("node1.example:99"),
            Ok(Advertise::Host("node1.example".into(), Some(99)))
        );
        assert_eq!(
            parse_advertise("node1"),
            Ok(Advertise::Host("node1".into(), None))
        );
        assert!(parse_advertise("bad name").is_err());
        // A scope id means nothing to other hosts: dropped (receivers scope
        // a link-local address by the link they heard it on).
        assert_eq!(
            parse_advertise("[fe80::1%1]:9"),
            Ok(Advertise::Ip(ip("fe80::1"), Some(9)))
        );
        assert!(parse_advertise("[fe80::1%lo]:9").is_err());
        assert!(parse_advertise("0.0.0.0").is_err());
        assert_eq!(
            parse_cidr("203.0.113.9/24").unwrap().to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(parse_cidr("192.0.2.1").unwrap().prefix(), 32);
        assert!(parse_cidr("2001:db8::/32").is_ok());
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().prefix(), 0);
        assert!(parse_cidr("224.0.0.0/4").is_err());
        assert!(parse_cidr("10.0.0.0/40").is_err());
        assert!(parse_cidr("nat-gw").is_err());
        assert_eq!(parse_tag("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_tag("novalue").is_err());
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("0400").is_err());
        assert!(parse_mode("999").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_name("node-1.a_b").is_ok());
        assert!(parse_name("bad name").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
