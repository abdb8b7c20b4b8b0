//! Seeds: addresses to dial when multicast cannot find the cluster.
//!
//! A seed is `HOST[:PORT]` (`[v6addr]:port` for IPv6). The host is resolved
//! again on **every** attempt and **every** address it returns is dialed, so
//! a DNS name that lists all members (a Kubernetes headless Service, a
//! compose service name) works, and so does a seed that comes up late or
//! moves. Attempts never stop: after a failure the next one waits with
//! capped exponential backoff and jitter; once every address of a seed is
//! linked, it is looked at again only every [`Config::recheck`] (new
//! addresses behind the name, or a lost link).
//!
//! [`Seeds`] is the sans-IO schedule (time is a parameter); the daemon's
//! seed task resolves and dials and feeds the outcomes back. The first
//! successful join and each class of failure are reported once per seed
//! (the return values of the `on_*` inputs), not once per attempt.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use proto::control::SeedInfo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seed as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port; the node's own link port when not given.
    pub port: Option<u16>,
}

impl SeedSpec {
    /// Parses `HOST`, `HOST:PORT`, `IPV4[:PORT]`, `IPV6` or `[IPV6]:PORT`.
    /// A link-local IPv6 address needs its link: `[fe80::1%eth0]:PORT` (or
    /// the interface index, `%2`).
    pub fn parse(s: &str) -> Result<SeedSpec, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("a seed is HOST[:PORT]".into());
        }
        if let Some(spec) = Self::parse_scoped(s)? {
            return Ok(spec);
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(SeedSpec {
                host: sa.ip().to_string(),
                port: Some(sa.port()),
            });
        }
        if let Ok(ip) = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(SeedSpec {
                host: ip.to_string(),
                port: None,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{s:?}: the port must be 1-65535"))?;
                (h, Some(port))
            }
            None => (s, None),
        };
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!("{s:?}: not a host name or IP address"));
        }
        Ok(SeedSpec {
            host: host.to_string(),
            port,
        })
    }

    /// `IPV6%SCOPE` forms, with or without brackets and port; the scope
    /// (an interface name or index) is kept as an index in `host`.
    fn parse_scoped(s: &str) -> Result<Option<SeedSpec>, String> {
        let (inner, port) = match s.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((inner, "")) => (inner, None),
                Some((inner, tail)) => {
                    let port = tail
                        .strip_prefix(':')
                        .and_then(|p| p.parse::<u16>().ok())
                        .filter(|&p| p != 0)
                        .ok_or_else(|| format!("{s:?}: the port must be 1-65535"))?;
                    (inner, Some(port))
                }
                None => return Err(format!("{s:?}: no closing bracket")),
            },
            None => (s, None),
        };
        let Some((ip, scope)) = inner.split_once('%') else {
            return Ok(None);
        };
        let ip: std::net::Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{s:?}: only an IPv6 address takes a %scope"))?;
        let index = match scope.parse::<u32>() {
            Ok(i) => i,
            Err(_) => crate::netif::index_of(scope)
                .ok_or_else(|| format!("{s:?}: no interface {scope:?} on this host"))?,
        };
        Ok(Some(SeedSpec {
            host: format!("{ip}%{index}"),
            port,
        }))
    }

    /// `host:port` for the resolver (brackets around an IPv6 address, with
    /// its scope id when it has one).
    pub fn target(&self, default_port: u16) -> String {
        let port = self.port.unwrap_or(default_port);
        let unscoped = self.host.split('%').next().unwrap_or_default();
        match unscoped.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{}]:{port}", self.host),
            _ => format!("{}:{port}", self.host),
        }
    }
}

impl std::fmt::Display for SeedSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => f.write_str(&SeedSpec::target(self, p)),
            None => f.write_str(&self.host),
        }
    }
}

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Delay after the first failure.
    pub backoff_min: Duration,
    /// Largest delay between failed attempts.
    pub backoff_max: Duration,
    /// How often a seed whose addresses are all linked is looked at again.
    pub recheck: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            recheck: Duration::from_secs(30),
        }
    }
}

/// How one attempt at one seed ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not tried yet.
    Pending,
    /// Every address it resolved to is linked.
    Linked,
    /// The name did not resolve (or resolved to nothing).
    Unresolved(String),
    /// Some address could not be linked (refused, unreachable, handshake).
    DialFailed(String),
}

impl Outcome {
    fn class(&self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Linked => "linked",
            Outcome::Unresolved(_) => "unresolved",
            Outcome::DialFailed(_) => "dial_failed",
        }
    }
}

#[derive(Debug)]
struct Seed {
    spec: SeedSpec,
    resolved: Vec<SocketAddr>,
    last: Outcome,
    attempts: u64,
    failures: u32,
    next: Instant,
    in_flight: bool,
    reported: Vec<&'static str>,
}

/// The seed schedule (sans-IO).
#[derive(Debug)]
pub struct Seeds {
    cfg: Config,
    seeds: Vec<Seed>,
    rng: StdRng,
}

impl Seeds {
    /// All seeds due at `now`.
    pub fn new(specs: Vec<SeedSpec>, cfg: Config, now: Instant, seed: u64) -> Seeds {
        let mut seeds = Seeds {
            cfg,
            seeds: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
        };
        seeds.add(specs, now);
        seeds
    }

    /// True when there are no seeds at all.
    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    /// Adds seeds (remembered peers) unless already present.
    pub fn add(&mut self, specs: impl IntoIterator<Item = SeedSpec>, now: Instant) {
        for spec in specs {
            if self.seeds.iter().any(|s| s.spec == spec) {
                continue;
            }
            self.seeds.push(Seed {
                spec,
                resolved: Vec::new(),
                last: Outcome::Pending,
                attempts: 0,
                failures: 0,
                next: now,
                in_flight: false,
                reported: Vec::new(),
            });
        }
    }

    /// When the next attempt is due (none while every due one is in flight).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.seeds
            .iter()
            .filter(|s| !s.in_flight)
            .map(|s| s.next)
            .min()
    }

    /// Seeds due at `now`, marked in flight: resolve each (`spec`), dial
    /// the addresses, then call [`Seeds::on_attempt`] with what happened.
    pub fn poll_due(&mut self, now: Instant) -> Vec<(usize, SeedSpec)> {
        let mut due = Vec::new();
        for (i, s) in self.seeds.iter_mut().enumerate() {
            if !s.in_flight && s.next <= now {
                s.in_flight = true;
                s.attempts += 1;
                due.push((i, s.spec.clone()));
            }
        }
        due
    }

    /// One attempt at seed `i` ended: it resolved to `resolved` (or not),
    /// and `outcome` says whether every address is linked. Returns a line
    /// worth logging when this class of outcome is new for this seed.
    pub fn on_attempt(
        &mut self,
        now: Instant,
        i: usize,
        resolved: Vec<SocketAddr>,
        outcome: Outcome,
    ) -> Option<String> {
        let cfg = self.cfg;
        let jitter = self.rng.gen_range(0.8..1.2);
        let s = self.seeds.get_mut(i)?;
        s.in_flight = false;
        if !resolved.is_empty() {
            s.resolved = resolved;
        }
        let delay = if outcome == Outcome::Linked {
            s.failures = 0;
            cfg.recheck
        } else {
            s.failures = s.failures.saturating_add(1);
            cfg.backoff_min
                .saturating_mul(1u32 << (s.failures - 1).min(16))
                .min(cfg.backoff_max)
        };
        s.next = now + delay.mul_f64(jitter);
        let class = outcome.class();
        s.last = outcome;
        if s.reported.contains(&class) {
            return None;
        }
        s.reported.push(class);
        Some(match &s.last {
            Outcome::Linked => format!("joined through seed {}", s.spec),
            Outcome::Unresolved(e) => format!("seed {} does not resolve: {e} (retrying)", s.spec),
            Outcome::DialFailed(e) => format!("seed {} not reachable: {e} (retrying)", s.spec),
            Outcome::Pending => return None,
        })
    }

    /// Every link is gone: try every seed again now.
    pub fn on_isolated(&mut self, now: Instant) {
        for s in &mut self.seeds {
            if !s.in_flight {
                s.next = s.next.min(now);
            }
        }
    }

    /// What `status` shows.
    pub fn status(&self) -> Vec<SeedInfo> {
        self.seeds
            .iter()
            .map(|s| SeedInfo {
                seed: s.spec.to_string(),
                resolved: s.resolved.iter().map(|a| a.to_string()).collect(),
                outcome: s.last.class().to_string(),
                detail: match &s.last {
                    Outcome::Unresolved(d) | Outcome::DialFailed(d) => Some(d.clone()),
                    Outcome::Pending | Outcome::Linked => None,
                },
                attempts: s.attempts,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_as_host_port_ipv4_and_ipv6() {
        let p = |s| SeedSpec::parse(s);
        assert_eq!(
            p("node1").unwrap(),
            SeedSpec {
                host: "node1".into(),
                port: None
            }
        );
        assert_eq!(
            p("seed.svc.cluster.local:6777").unwrap(),
            SeedSpec {
                host: "seed.svc.cluster.local".into(),
                port: Some(6777)
            }
        );
        assert_eq!(
            p("127.0.0.1:9").unwrap(),
            SeedSpec {
                host: "127.0.0.1".into(),
                port: Some(9)
            }
        );
        assert_eq!(p("[::1]:9").unwrap().target(1), "[::1]:9");
        assert_eq!(p("::1").unwrap().target(6777), "[::1]:6777");
        assert_eq!(p("[fe80::1%3]:9").unwrap().target(1), "[fe80::1%3]:9");
        assert_eq!(p("[fe80::1%lo]").unwrap().host.split('%').count(), 2);
        assert_eq!(p("fe80::1%3").unwrap().target(7), "[fe80::1%3]:7");
        let scoped: SocketAddr = p("[fe80::1%3]:9").unwrap().target(1).parse().unwrap();
        assert_eq!(scoped, "[fe80::1%3]:9".parse().unwrap());
        assert!(p("[fe80::1%no-such-if0]:9").is_err());
        assert!(p("[10.0.0.1%3]:9").is_err());
        assert!(p("[fe80::1%3]:0").is_err());
        assert_eq!(p("fe80::1").unwrap().port, None);
        for bad in ["", "a:0", "a:x", "bad host", "a..b", ":9", "a:70000"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn failures_back_off_with_a_cap_and_success_is_rechecked_slowly() {
        let t0 = Instant::now();
        let cfg = Config::default();
        let mut s = Seeds::new(vec![SeedSpec::parse("a").unwrap()], cfg, t0, 1);
        let mut now = t0;
        let mut gaps = Vec::new();
        let mut logged = 0;
        for _ in 0..12 {
            let due = s.poll_due(now);
            assert_eq!(due.len(), 1);
            assert_eq!(s.next_deadline(), None, "in flight");
            logged += s
                .on_attempt(now, 0, vec![], Outcome::Unresolved("no such host".into()))
                .is_some() as u32;
            let next = s.next_deadline().unwrap();
            gaps.push(next - now);
            now = next;
        }
        assert_eq!(logged, 1, "one log line per class of failure");
        assert!(gaps[1] > gaps[0]);
        assert!(gaps.iter().all(|g| *g <= cfg.backoff_max.mul_f64(1.2)));
        assert!(gaps[11] >= cfg.backoff_max.mul_f64(0.8));
        // It comes up: linked, logged once, then rechecked slowly.
        s.poll_due(now);
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let line = s.on_attempt(now, 0, vec![addr], Outcome::Linked);
        assert!(line.unwrap().contains("joined"));
        assert!(s.next_deadline().unwrap() - now >= cfg.recheck.mul_f64(0.8));
        let st = s.status();
        assert_eq!(st[0].resolved, vec!["127.0.0.1:9".to_string()]);
        assert_eq!(st[0].outcome, "linked");
        assert_eq!(st[0].attempts, 13);
        // Isolated again: every seed at once.
        s.on_isolated(now + Duration::from_secs(1));
        assert_eq!(s.next_deadline(), Some(now + Duration::from_secs(1)));
    }
}

/// The seed task: resolves and dials what [`Seeds`] says is due, and feeds
/// the outcomes back. Dials go through the transport like any other, under
/// [`UNKNOWN`] (the node behind an address is not known until its
/// handshake); the membership task reports what became of them.
pub mod task {
    use std::collections::BTreeSet;
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;
    use std::time::Duration;

    use proto::membership::LinkState;
    use proto::NodeId;
    use tokio::sync::mpsc;
    use tokio::time::{sleep_until, timeout, Instant};
    use tokio_util::sync::CancellationToken;
    use tracing::{info, warn};

    use super::{Outcome, SeedSpec, Seeds};
    use crate::state::NodeState;

    /// The id under which addresses of unknown nodes are dialed.
    pub const UNKNOWN: NodeId = NodeId(0);

    /// How long one resolution may take.
    const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
    /// How long the dials of one attempt may take before it is judged.
    const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
    /// While an attempt is in flight, how often the task looks whether the
    /// addresses it waits for are linked by now (a dial that lost the race
    /// to the other side's is not always reported). Idle, it arms no timer:
    /// losing every link is an event ([`SeedEvent::Isolated`]).
    const ATTEMPT_CHECK: Duration = Duration::from_secs(1);
    /// The wait when nothing is due at all (a timer that never fires in
    /// practice; events end it).
    const IDLE: Duration = Duration::from_secs(3600);

    /// What the membership task tells the seed task.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum SeedEvent {
        /// A link this node dialed to `addr` came up.
        Linked(SocketAddr),
        /// A dial to `addr` under [`UNKNOWN`] ended without a link.
        Failed(SocketAddr, String),
        /// The node's last link went down: every seed is tried again now.
        Isolated,
    }

    struct Attempt {
        seed: usize,
        resolved: Vec<SocketAddr>,
        waiting: BTreeSet<SocketAddr>,
        failure: Option<String>,
        deadline: Instant,
    }

    /// Resolves `spec` (again: nothing is cached between attempts, so a
    /// name whose addresses change is followed).
    pub async fn resolve(spec: &SeedSpec, default_port: u16) -> Result<Vec<SocketAddr>, String> {
        let port = spec.port.unwrap_or(default_port);
        if let Ok(ip) = spec.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        // A scoped IPv6 address (`fe80::1%3`) keeps its scope id.
        if let Ok(sa) = spec.target(default_port).parse::<SocketAddr>() {
            return Ok(vec![sa]);
        }
        // The hosts file first, alone when it lists the name (the C
        // library's "files dns" order): the resolver below asks for AAAA and
        // A together and waits for both, so a name the file lists for one
        // family would wait on a DNS server that does not answer, and fail.
        let mut addrs: Vec<SocketAddr> = from_hosts_file(&spec.host)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect();
        if !addrs.is_empty() {
            addrs.sort_unstable();
            addrs.dedup();
            return Ok(addrs);
        }
        // A resolver of our own (no libc NSS: the image is FROM scratch),
        // built per attempt so that /etc/hosts and resolv.conf are read anew.
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .map_err(|e| format!("resolver configuration: {e}"))?
            .build()
            .map_err(|e| format!("resolver: {e}"))?;
        let lookup = timeout(RESOLVE_TIMEOUT, resolver.lookup_ip(spec.host.as_str()))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let mut addrs: Vec<SocketAddr> =
            lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        addrs.sort_unstable();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no address".into());
        }
        Ok(addrs)
    }

    /// The addresses `/etc/hosts` lists for `host` (read anew; none when
    /// it cannot be read or does not list the name).
    fn from_hosts_file(host: &str) -> Vec<IpAddr> {
        use hickory_resolver::proto::op::Query;
        use hickory_resolver::proto::rr::{Name, RecordType};
        let (Ok(hosts), Ok(name)) = (hickory_resolver::Hosts::from_system(), host.parse::<Name>())
        else {
            return Vec::new();
        };
        [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|t| hosts.lookup_static_host(&Query::query(name.clone(), t)))
            .flat_map(|l| {
                hickory_resolver::lookup_ip::LookupIp::from(l)
                    .iter()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn linked(state: &NodeState, addr: SocketAddr) -> bool {
        state
            .peers
            .iter()
            .any(|p| p.link == LinkState::Up && p.addr == addr)
    }

    fn log(line: Option<String>, ok: bool) {
        match line {
            Some(l) if ok => info!("{l}"),
            Some(l) => warn!("{l}"),
            None => {}
        }
    }

    /// Runs until `cancel` fires. `own` are this node's own addresses
    /// (never dialed).
    pub async fn run(
        mut seeds: Seeds,
        state: Arc<NodeState>,
        mut events: mpsc::Receiver<SeedEvent>,
        default_port: u16,
        own: Vec<SocketAddr>,
        cancel: CancellationToken,
    ) {
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut had_links = false;
        loop {
            let now = Instant::now();
            let next = [
                seeds.next_deadline().map(Instant::from_std),
                attempts.iter().map(|a| a.deadline).min(),
                (!attempts.is_empty()).then(|| now + ATTEMPT_CHECK),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + IDLE);
            // Set by the event; the links are looked at on every wake-up
            // too (a full event queue may have lost it).
            let mut isolated = false;
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(SeedEvent::Linked(addr)) => {
                        for a in &mut attempts {
                            a.waiting.remove(&addr);
                        }
                    }
                    Some(SeedEvent::Failed(addr, why)) => {
                        for a in &mut attempts {
                            if a.waiting.remove(&addr) {
                                a.failure.get_or_insert_with(|| format!("{addr}: {why}"));
                            }
                        }
                    }
                    Some(SeedEvent::Isolated) => isolated = true,
                    None => break,
                },
                () = sleep_until(next) => {}
            }
            let now = Instant::now();
            let std_now = now.into_std();
            // A dial that lost the race to the other side's (both dialed at
            // once: the transport drops or merges ours as a duplicate) is not
            // always reported; an address linked by now is linked, whatever
            // became of our own dial.
            for a in &mut attempts {
                a.waiting.retain(|addr| !linked(&state, *addr));
            }
            // Judge finished attempts.
            let mut done = Vec::new();
            attempts.retain(|a| {
                let finished = a.waiting.is_empty() || now >= a.deadline;
                if finished {
                    let outcome = match (&a.failure, a.waiting.first()) {
                        (Some(f), _) => Outcome::DialFailed(f.clone()),
                        (None, Some(addr)) => Outcome::DialFailed(format!("{addr}: no answer")),
                        (None, None) => Outcome::Linked,
                    };
                    done.push((a.seed, a.resolved.clone(), outcome));
                }
                !finished
            });
            for (i, resolved, outcome) in done {
                let ok = outcome == Outcome::Linked;
                log(seeds.on_attempt(std_now, i, resolved, outcome), ok);
            }
            // Lost every link: every seed again, now.
            let links = state.peers.iter().any(|p| p.link == LinkState::Up);
            if (had_links || isolated) && !links {
                seeds.on_isolated(std_now);
            }
            had_links = links;
            // Start what is due.
            for (i, spec) in seeds.poll_due(std_now) {
                match resolve(&spec, default_port).await {
                    Err(e) => {
                        log(
                            seeds.on_attempt(
                                Instant::now().into_std(),
                                i,
                                vec![],
                                Outcome::Unresolved(e),
                            ),
                            false,
                        );
                    }
                    Ok(addrs) => {
                        let waiting: BTreeSet<SocketAddr> = addrs
                            .iter()
                            .copied()
                            .filter(|a| !own.contains(a) && !linked(&state, *a))
                            .collect();
                        for &addr in &waiting {
                            if !state.transport.dial(UNKNOWN, addr) {
                                warn!(%addr, "seed dial not queued (transport busy)");
                            }
                        }
                        attempts.push(Attempt {
                            seed: i,
                            resolved: addrs,
                            waiting,
                            failure: None,
                            deadline: Instant::now() + ATTEMPT_TIMEOUT,
                        });
                    }
                }
            }
            if let Ok(mut status) = state.seeds.lock() {
                *status = seeds.status();
            }
        }
    }
}
